"""Freezing idle pods (`spec.freeze`): the one place that decides and carries out freezes and thaws.

A specialized pod of a Version whose Function has `freeze.enabled` that has run nothing for
`freeze.idleSeconds` is frozen (the scaler asks `due` every step): the activator first drops its
kept-alive connections to the pod, then POSTs `/v1/freeze` (CONTRACT.md) on a connection of its
own that the agent closes, and opens one new connection for the thaw (the agent process is never
stopped, so a connection made after the freeze stays sound). The agent runs the code's
before-freeze callbacks, ends the code's TCP connections (so their peers see them closed now,
and the code reconnects after the thaw) and stops the code's processes: the pod uses no CPU.

A frozen pod still counts as warm capacity: it stays in routing and in every scaling decision
(its idle time goes on counting towards keep-alive and scale-down as any pod's). The first
invocation that takes a slot on it thaws it (`thaw`, POST `/v1/thaw`, whose connection the
invocation then reuses) and every other one that arrives meanwhile waits for the same thaw.
A freeze and a thaw of one pod never cross (`PodSlots.gate`): an invocation that arrives while
its pod is being frozen waits for the freeze to end and thaws it.

What goes wrong: an agent that refuses the freeze because an invocation got there first (409)
leaves the pod as it was; a freeze or thaw that fails otherwise takes the pod out of routing
(`VersionState.pod_lost`, the invoker's own rule for an unreachable pod) so that the invocation
goes to another pod and the scaler replaces it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable

from ember.activator.agent_client import AgentClient, AgentLost, AgentUnreachable
from ember.activator.metrics import Metrics
from ember.activator.throttler import PodSlots
from ember.activator.version_state import VersionState

log = logging.getLogger(__name__)

CONTROL_TIMEOUT_S = 30.0  # the agent gives before-freeze / after-thaw callbacks 10 s per process


class ThawFailed(Exception):
    """The pod could not be thawed; it left routing."""


class Freezer:
    """Freezes the idle pods of Versions with `freeze.enabled`, and thaws them on demand."""

    def __init__(self, client: AgentClient, metrics: Metrics, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._client = client
        self._metrics = metrics
        self._clock = clock

    @staticmethod
    def due(vs: VersionState, now: float) -> list[PodSlots]:
        """The Version's serving pods to freeze now: idle for `freeze.idleSeconds`, not frozen, no
        freeze or thaw under way."""
        freeze = vs.spec.freeze
        if not freeze.enabled:
            return []
        return [
            pod
            for pod in vs.serving
            if not pod.frozen
            and pod.in_flight == 0
            and not pod.gate.locked()
            and now - pod.idle_since >= freeze.idle_seconds
        ]

    async def freeze(self, vs: VersionState, pod: PodSlots) -> None:
        """Freeze one idle pod (see the module docstring); never raises."""
        async with pod.gate:
            if pod.frozen or pod.in_flight or pod.draining:
                return
            self._client.forget(pod.address)  # no kept-alive connection to a frozen pod
            try:
                status, body = await self._client.control(pod, "/v1/freeze", timeout_s=CONTROL_TIMEOUT_S)
            except (AgentUnreachable, AgentLost, TimeoutError) as err:
                self._failed(vs, pod, "freeze", str(err) or "no answer")
                return
            if status == 409:  # an invocation reached the agent first
                self._metrics.freezes.labels(vs.fs.label, "busy").inc()
                return
            if status != 200:
                self._failed(vs, pod, "freeze", f"answered {status}: {body[:200]!r}")
                return
            pod.frozen = True
            self._metrics.freezes.labels(vs.fs.label, "frozen").inc()
            closed = _connections_closed(body)
            # one connection made after the freeze, for the thaw: the agent process itself is never
            # stopped, so it stays sound however long the pod sleeps (a thaw on a new connection
            # would wait for the agent's accept and a thread: milliseconds under gVisor)
            with contextlib.suppress(AgentUnreachable):
                await self._client.preconnect(pod.address)
            log.info(
                "pod frozen function=%s version=%d pod=%s connections_closed=%s",
                vs.fs.label,
                vs.key.number,
                pod.handle.id,
                closed,
            )

    async def thaw(self, vs: VersionState, pod: PodSlots) -> None:
        """Make sure the pod whose slot the caller holds is not frozen; raises ThawFailed."""
        started = time.perf_counter()
        async with pod.gate:
            if pod.frozen:
                try:
                    status, body = await self._client.control(pod, "/v1/thaw", timeout_s=CONTROL_TIMEOUT_S, keep=True)
                except (AgentUnreachable, AgentLost, TimeoutError) as err:
                    raise ThawFailed(self._failed(vs, pod, "thaw", str(err) or "no answer")) from err
                if status != 200:
                    raise ThawFailed(self._failed(vs, pod, "thaw", f"answered {status}: {body[:200]!r}"))
                pod.frozen = False
                self._metrics.freezes.labels(vs.fs.label, "thawed").inc()
        self._metrics.thaw_duration.observe(time.perf_counter() - started)

    def _failed(self, vs: VersionState, pod: PodSlots, what: str, why: str) -> str:
        message = f"{vs.fs.label}: pod {pod.handle.id}: {what} failed: {why}"
        log.warning("%s; the pod leaves routing", message)
        self._metrics.freezes.labels(vs.fs.label, "failed").inc()
        vs.pod_lost(pod)
        return message


def _connections_closed(body: bytes) -> int | str:
    """The agent's count of the code's TCP connections it ended (CONTRACT.md), or "?"."""
    try:
        count = json.loads(body).get("connectionsClosed")
    except (ValueError, AttributeError):
        return "?"
    return count if isinstance(count, int) else "?"


def needs_thaw(pod: PodSlots) -> bool:
    """The invoker's check on the hot path: frozen, or a freeze or thaw under way."""
    return pod.frozen or pod.gate.locked()
