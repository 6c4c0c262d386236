"""Freezing idle pods (`spec.freeze`): the one place that decides and carries out freezes and thaws.

A specialized pod of a Version whose Function has `freeze.enabled` that has run nothing for
`freeze.idleSeconds` is frozen (the scaler asks `due` every step): the activator first drops its
kept-alive connections to the pod, then POSTs `/v1/freeze` (CONTRACT.md) on a connection of its
own that the agent closes, and opens one new connection for the invocation that thaws it (the
agent process is never stopped, so a connection made after the freeze stays sound). The agent runs the code's
before-freeze callbacks, ends the code's TCP connections (so their peers see them closed now,
and the code reconnects after the thaw) and stops the code's processes: the pod uses no CPU.

A frozen pod still counts as warm capacity: it stays in routing and in every scaling decision
(its idle time goes on counting towards keep-alive and scale-down as any pod's). An invocation
that takes a slot on it carries `X-Ember-Thaw: 1` (CONTRACT.md): the agent thaws, then runs it,
in one round trip on the connection made after the freeze (`before_invoke`, `after_invoke`);
invocations that arrive together all carry it, and the agent thaws once. A freeze and a thaw of
one pod never cross (`PodSlots.gate`): an invocation that arrives while its pod is being frozen
waits for the freeze to end, then thaws it.

What goes wrong: an agent that refuses the freeze because an invocation got there first (409)
leaves the pod as it was; a freeze or thaw that fails otherwise (an after-thaw callback raised)
takes the pod out of routing (`VersionState.pod_lost`, the invoker's own rule for an unreachable
pod) so that the invocation goes to another pod and the scaler replaces it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Callable

from ember.activator.agent_client import AgentClient, AgentLost, AgentReply, AgentUnreachable
from ember.activator.metrics import Metrics
from ember.activator.throttler import PodSlots
from ember.activator.version_state import VersionState

log = logging.getLogger(__name__)

CONTROL_TIMEOUT_S = 30.0  # the agent gives before-freeze / after-thaw callbacks 10 s per process


class Freezer:
    """Freezes the idle pods of Versions with `freeze.enabled`, and thaws them on demand."""

    def __init__(self, client: AgentClient, metrics: Metrics, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._client = client
        self._metrics = metrics
        self._clock = clock

    @staticmethod
    def due(vs: VersionState, now: float) -> list[PodSlots]:
        """The Version's serving pods to freeze now: idle for `freeze.idleSeconds`, not frozen, no
        freeze under way."""
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
            # one connection made after the freeze, for the thawing invocation: the agent process is
            # never stopped, so it stays sound however long the pod sleeps (a new connection then
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

    async def before_invoke(self, pod: PodSlots) -> bool:
        """Wait for a freeze of the pod under way (the caller holds a slot on it); -> whether its
        invocation must thaw it (`X-Ember-Thaw`, CONTRACT.md: the thaw and the invocation in one
        round trip; the agent thaws once however many invocations ask)."""
        started = time.perf_counter()
        if pod.gate.locked():
            async with pod.gate:
                pass
        self._metrics.thaw_wait.observe(time.perf_counter() - started)
        return pod.frozen

    def after_invoke(self, vs: VersionState, pod: PodSlots, reply: AgentReply) -> bool:
        """The answer to an invocation that asked for a thaw: True when the thaw failed (the pod
        left routing, the invocation did not run), else the pod is thawed."""
        if reply.status == 500 and b"Runtime.AfterThawError" in reply.body[:200]:
            self._failed(vs, pod, "thaw", f"answered 500: {reply.body[:200]!r}")
            return True
        if pod.frozen:
            pod.frozen = False
            self._metrics.freezes.labels(vs.fs.label, "thawed").inc()
        return False

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
    """The invoker's check on the hot path: frozen, or a freeze under way."""
    return pod.frozen or pod.gate.locked()
