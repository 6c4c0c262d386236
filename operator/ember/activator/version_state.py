"""One Version in the activator: the single owner of its pods, its queue and its phase.

A `VersionState` holds every specialized pod of its Version in one place (`_held`): a pod there
either serves (it is also in the throttler's routing list, which only this class changes) or
drains (`PodSlots.draining`: out of routing, its invocations finish, then the scaler releases
it). Others change that state only through the transitions below and read it through views
(`serving`, `draining`, `starting`, `ready_pods`, `in_flight`, `queued`, `holds_pods`):

    pod_starting()                          a claim + specialize began
      ├─ pod_ready(handle, now) -> slots    it serves (None: the Version takes no more pods)
      ├─ pod_start_failed(message, ...)     it ended without a pod (may fail the Version)
      └─ pod_start_cancelled()              it was abandoned (the activator is closing)
    pod_lost(pod) / drain(pod)              serving -> draining (unreachable; or no longer wanted)
    take_drained_idle() -> handles          draining pods with nothing in flight leave for release
    take_all() -> handles                   every pod leaves (the activator is closing)

Phase: `LOADING` -> `READY` (`mark_ready`, on its initial capacity) and `LOADING | READY` ->
`FAILED` (`mark_failed`); nothing leaves `FAILED`. Both transitions change which Version "latest"
means, so they tell the Function (`Owner.phase_changed`) there and then.

Right-sizing (`ember.activator.sizing`): `record_usage` counts each reply's memory and CPU into
its `sizer`, `out_of_memory` tells it the Version ran out at a size; `resize` changes the size its
new pods get (`resources`, and with it `pool` and `request`), and `outdated` lists the serving
pods of another size, which the sizing loop drains.

The data path reads `throttler` (acquire and release slots) on every invocation; nothing else
writes its pods. All of this runs on the event loop: no transition awaits.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
from typing import Protocol

from prometheus_client import Counter, Histogram

from ember.activator.agent_client import AgentReply
from ember.activator.config import ActivatorConfig
from ember.activator.errors import NotReady
from ember.activator.metrics import Metrics, VersionGauges
from ember.activator.throttler import PodSlots, Throttler
from ember.activator.wake import Wake
from ember.api.function import FunctionSpec
from ember.api.version import VersionResources
from ember.pods.base import PodHandle, PodId, PoolKey, SpecializeRequest, VersionKey
from ember.scaling.autoscaler import Autoscaler, ScalingParams
from ember.scaling.predictor import Forecast
from ember.scaling.rightsize import MAX_MEMORY_MIB, Sizer, SizingFacts

log = logging.getLogger(__name__)


class Phase(enum.Enum):
    """Lifecycle of a Version in the activator."""

    LOADING = "Loading"
    READY = "Ready"
    FAILED = "Failed"


class Owner(Protocol):
    """What a Version asks of, and tells, the Function it belongs to (`ember.activator.registry.FunctionState`)."""

    @property
    def namespace(self) -> str: ...

    @property
    def name(self) -> str: ...

    @property
    def label(self) -> str:
        """`namespace/name`, as logs and metrics show it."""
        ...

    @property
    def removed(self) -> bool: ...

    def referenced(self) -> set[int]: ...

    @property
    def forecast(self) -> Forecast | None:
        """When the Function expects its next invocation (`scaling.predictive`), else None."""
        ...

    def phase_changed(self) -> None:
        """A Version became Ready or Failed: "latest" may now mean another one."""
        ...


def scaling_params(spec: FunctionSpec, config: ActivatorConfig) -> ScalingParams:
    """Autoscaler knobs of a Version: the Function's scaling block plus the activator's windows."""
    return ScalingParams(
        concurrency=spec.concurrency,
        target_utilization=spec.scaling.target_utilization,
        min_scale=spec.scaling.min_scale,
        max_scale=spec.scaling.max_scale,
        keep_alive_s=float(spec.scaling.keep_alive_seconds),
        stable_window_s=config.stable_window_s,
        panic_window_s=min(config.panic_window_s, config.stable_window_s),
        panic_threshold=config.panic_threshold,
        granularity_s=min(1.0, config.panic_window_s, config.tick_s * 4),
    )


class VersionState:
    """One Version: its code, pods, queue, autoscaler and phase."""

    def __init__(
        self,
        *,
        owner: Owner,
        number: int,
        spec: FunctionSpec,
        digest: str,
        request: SpecializeRequest | None,
        pool: PoolKey,
        config: ActivatorConfig,
        metrics: Metrics,
        now: float,
        wake: Wake,
        initial_target: int,
        portion: str = "",
    ) -> None:
        self.fs = owner
        self.key = VersionKey(owner.namespace, owner.name, number, portion)
        self.spec = spec
        self.code_hash = digest
        # The code hash on the Version object, which its status and annotations are about: this one's,
        # or for a portion (whose own hash covers its handler and policy) its Version's (the registry's).
        self.version_hash = digest
        # The spec's pool and specialize body; `pool` and `request` are those of the size in use
        # (`resources`: the spec's, or right-sizing's with autoResize, `resize`).
        self._spec_pool = self._pool = pool
        self._spec_request = self._request = request
        self.resources = VersionResources(
            memory_mib=pool.memory_mib, cpu_millicores=pool.cpu_millicores, reason="spec.resources.memoryMiB"
        )
        self.max_memory_mib = MAX_MEMORY_MIB  # its policy's limits.maxMemoryMiB (set by the registry)
        # Local mode: the activator is the operator, and applies its own advice (set by the
        # registry); in a cluster the size comes from the Version's status (`resize`, by the catalog).
        self.sizes_itself = False
        self.sizer: Sizer | None = None  # right-sizing, once the sizing loop started it (`start_sizing`)
        self.created_at = now
        self.last_qualified_at = -1e18
        self.initial_target = initial_target
        self.timeout_s = spec.timeout_seconds + config.agent_timeout_margin_s
        self.label = str(number)
        self.throttler = Throttler(
            name=f"{owner.label}@{number}",
            queue_depth=config.queue_depth,
            queue_timeout_s=config.queue_timeout_s,
            retry_after_s=config.retry_after_s,
            wake=wake,
        )
        self.autoscaler = Autoscaler(scaling_params(spec, config), now=now)
        self.duration: Histogram = metrics.duration.labels(owner.label, self.label)
        self._metrics = metrics
        self._outcomes: dict[str, Counter] = {}
        self._phase = Phase.LOADING
        self._message = ""
        self._starting = 0
        self._failures = 0  # pod starts that failed in a row (not for bad code: that fails at once)
        self._held: dict[PodId, PodSlots] = {}  # serving (also in the throttler) and draining pods
        # Portions (`ember.resources.portions`), set by the registry when the Version is made:
        # which portion of its Function this is (MAIN: the Function's own handler), the trust
        # level of its policy, the portions its code may call, and (MAIN only) all of them.
        self.portion = portion
        self.trust_level = "untrusted"
        self.callees: dict[str, VersionState] = {}
        self.portions: dict[str, VersionState] = {}
        self.family: tuple[str, ...] = ()  # the names of every portion of its Function

    def count(self, outcome: str) -> None:
        """Count one invocation outcome (label child cached: this is on the hot path)."""
        child = self._outcomes.get(outcome)
        if child is None:
            child = self._outcomes[outcome] = self._metrics.invocations.labels(self.fs.label, self.label, outcome)
        child.inc()

    @property
    def forecast(self) -> Forecast | None:
        """Its Function's forecast (`scaling.predictive`), which keeps or prewarms one pod while it is idle."""
        return self.fs.forecast

    def mark_requested(self, now: float, *, qualified: bool) -> None:
        """An invocation chose this Version (by number or alias when `qualified`): it is not idle."""
        self.autoscaler.mark_active(now)
        if qualified:
            self.last_qualified_at = now

    # Right-sizing (`ember.activator.sizing`, `ember.scaling.rightsize`)

    @property
    def pool(self) -> PoolKey:
        """The pool its new pods come from: the spec's, at the size in use (`resources`)."""
        return self._pool

    @property
    def request(self) -> SpecializeRequest | None:
        """The specialize body of its new pods (their `memoryMiB` is the size in use); None: no code."""
        return self._request

    def start_sizing(self, *, overhead_mib: int, min_samples: int) -> Sizer:
        """Right-sizing starts measuring its invocations; `overhead_mib`: what its pods' sandbox takes."""
        if self.sizer is None:
            facts = SizingFacts(
                runtime=self.spec.runtime,
                overhead_mib=overhead_mib,
                concurrency=self.spec.concurrency,
                max_memory_mib=self.max_memory_mib,
                min_samples=min_samples,
            )
            self.sizer = Sizer(facts)
        return self.sizer

    def record_usage(self, reply: AgentReply, pod_memory_mib: int) -> None:
        """What one invocation on a pod of `pod_memory_mib` used, from the agent's reply (the hot path:
        `Usage.record_reply`, a few hundred ns). An agent that ran out of memory (`Runtime.OutOfMemory`)
        reports nothing else: that is `out_of_memory`."""
        sizer = self.sizer
        if sizer is None:
            return
        if reply.function_error is not None and reply.function_error == "Unhandled" and _out_of_memory(reply.body):
            self.out_of_memory(pod_memory_mib)
            return
        sizer.usage.record_reply(reply.max_rss_kib, reply.cpu_ms, reply.duration_ms)

    def out_of_memory(self, pod_memory_mib: int) -> None:
        """A pod of `pod_memory_mib` ran out of memory (its agent said so, or its sandbox was killed)."""
        if self.sizer is not None and self.sizer.out_of_memory(pod_memory_mib):
            log.warning(
                "out of memory function=%s version=%d memoryMiB=%d autoResize=%s",
                self.fs.label,
                self.key.number,
                pod_memory_mib,
                self.spec.resources.auto_resize,
            )

    def resize(self, resources: VersionResources) -> bool:
        """New pods get `resources` (memory; CPU stays the spec's); True when that changed the size.

        Pods already serving keep their size: `outdated` lists them (the sizing loop replaces them)."""
        if resources == self.resources:
            return False
        before, self.resources = self.resources, resources
        if resources.memory_mib == before.memory_mib:
            return False
        self._pool = dataclasses.replace(self._spec_pool, memory_mib=resources.memory_mib)
        spec_request = self._spec_request
        if spec_request is not None:
            payload = {**spec_request.payload, "memoryMiB": resources.memory_mib}
            self._request = dataclasses.replace(spec_request, payload=payload)
        log.info(
            "resized function=%s version=%d memoryMiB=%d->%d reason=%s",
            self.fs.label,
            self.key.number,
            before.memory_mib,
            resources.memory_mib,
            resources.reason,
        )
        return True

    @property
    def outdated(self) -> tuple[PodSlots, ...]:
        """Serving pods of another size than the one in use (`resize`)."""
        memory = self._pool.memory_mib
        return tuple(p for p in self.throttler.pods if p.handle.pool.memory_mib != memory)

    # Views

    @property
    def phase(self) -> Phase:
        return self._phase

    @property
    def message(self) -> str:
        """Why the Version failed ("" unless it did)."""
        return self._message

    @property
    def ready_pods(self) -> int:
        return len(self.throttler.pods)

    @property
    def serving(self) -> tuple[PodSlots, ...]:
        """Pods in routing."""
        return tuple(self.throttler.pods)

    @property
    def draining(self) -> tuple[PodSlots, ...]:
        """Pods out of routing whose invocations finish before they are released."""
        return tuple(p for p in self._held.values() if p.draining)

    @property
    def starting(self) -> int:
        """Pod starts (claim + specialize) under way."""
        return self._starting

    @property
    def in_flight(self) -> int:
        return self.throttler.in_flight

    @property
    def queued(self) -> int:
        return self.throttler.queued

    def capacity(self, replicas: int) -> int:
        """Invocations this replica can run at once at its share of `maxScale` (the bound of what
        event sources and asynchronous invocations take at a time)."""
        params = self.autoscaler.params
        return params.bounds(replicas).max_scale * params.concurrency

    @property
    def holds_pods(self) -> bool:
        """Whether it has, or is getting, any pod (a Version that does cannot be forgotten)."""
        return bool(self._held) or self._starting > 0

    def gauges(self) -> VersionGauges:
        """What /metrics shows of it, read at scrape time."""
        return VersionGauges(
            function=self.fs.label,
            version=self.label,
            in_flight=self.throttler.in_flight,
            queued=self.throttler.queued,
            ready=self.ready_pods,
            starting=self._starting,
            draining=len(self.draining),
            phase=self._phase.value,
        )

    # Pod transitions

    def pod_starting(self) -> None:
        """A pod start (claim + specialize) began; exactly one of the three endings below follows."""
        if self.request is None:
            raise RuntimeError(f"{self.fs.label} Version {self.key.number} has no code to load: {self._message}")
        self._starting += 1

    def pod_ready(self, handle: PodHandle, now: float) -> PodSlots | None:
        """A started pod serves; the Version is Ready once it has its initial target (or nothing else is starting).

        None when the Version takes no more pods (it failed, or its Function was removed): the
        caller releases the pod.
        """
        self._starting -= 1
        if self._phase is Phase.FAILED or self.fs.removed:
            return None
        slot = PodSlots(handle, now=now)
        self._held[handle.id] = slot
        self.throttler.add_pod(slot)
        self._failures = 0
        if self._phase is Phase.LOADING and (self.ready_pods >= self.initial_target or self._starting == 0):
            self.mark_ready()
        return slot

    def pod_start_failed(self, message: str, *, code_error: bool, max_attempts: int, shortage: bool = False) -> bool:
        """A pod start ended without a pod; returns True when that failed the Version (this call, not before).

        Bad code (`code_error`) fails it at once; a `shortage` (the pool had no pod to claim: other
        activators hold them, or new ones still start) never does, as the next start may find one;
        anything else only after `max_attempts` starts in a row failed while it still loads with no pod.
        """
        self._starting -= 1
        if code_error:
            return self.mark_failed(message)
        if shortage:
            log.warning("no pod to claim function=%s version=%d error=%s", self.fs.label, self.key.number, message)
            return False
        self._failures += 1
        log.warning(
            "pod start failed function=%s version=%d attempt=%d error=%s",
            self.fs.label,
            self.key.number,
            self._failures,
            message,
        )
        if self._phase is Phase.LOADING and self.ready_pods == 0 and self._failures >= max_attempts:
            return self.mark_failed(message)
        return False

    def pod_start_cancelled(self) -> None:
        """A pod start was abandoned (the activator is closing); the caller releases what it had."""
        self._starting -= 1

    def pod_lost(self, pod: PodSlots) -> None:
        """A serving pod is gone or unreachable: out of routing; what runs on it ends on its own."""
        self._stop_routing(pod)

    def drain(self, pod: PodSlots) -> None:
        """A serving pod is no longer wanted: out of routing now, released once nothing runs on it."""
        if self._stop_routing(pod):
            log.info(
                "pod released function=%s version=%d pod=%s in_flight=%d",
                self.fs.label,
                self.key.number,
                pod.handle.id,
                pod.in_flight,
            )

    def _stop_routing(self, pod: PodSlots) -> bool:
        if pod.draining or self._held.get(pod.handle.id) is not pod:
            return False
        self.throttler.remove_pod(pod)
        return True

    def take_drained_idle(self) -> list[PodHandle]:
        """Draining pods with nothing in flight: they leave the Version, for the caller to release."""
        done = [pid for pid, p in self._held.items() if p.draining and p.in_flight == 0]
        return [self._held.pop(pid).handle for pid in done]

    def take_all(self) -> list[PodHandle]:
        """Every pod leaves routing and the Version, for the caller to release (the activator is closing)."""
        for pod in self._held.values():
            self.throttler.remove_pod(pod)
        handles = [p.handle for p in self._held.values()]
        self._held.clear()
        return handles

    # Phase transitions

    def mark_ready(self) -> None:
        """LOADING -> READY: it has its initial capacity and may take "latest" traffic."""
        if self._phase is not Phase.LOADING:
            return
        self._phase = Phase.READY
        log.info("version ready function=%s version=%d pods=%d", self.fs.label, self.key.number, self.ready_pods)
        self.fs.phase_changed()

    def mark_failed(self, message: str) -> bool:
        """-> FAILED: its code cannot load; waiters get NotReady. Returns False when it had already failed."""
        if self._phase is Phase.FAILED:
            return False
        self._phase = Phase.FAILED
        self._message = message
        self.throttler.close(NotReady(f"{self.fs.label} Version {self.key.number} failed to load: {message}"))
        self._metrics.version_failures.labels(self.fs.label).inc()
        log.error("version failed function=%s version=%d reason=%s", self.fs.label, self.key.number, message)
        self.fs.phase_changed()
        return True

    def fail_waiters(self, error: Exception) -> None:
        """Wake every queued invocation, and refuse every later one, with `error` (its Function or the
        Version itself is gone)."""
        self.throttler.close(error)


def _out_of_memory(body: bytes) -> bool:
    """Whether an agent's `Unhandled` error reply says the worker ran out of memory (CONTRACT.md)."""
    if b"Runtime.OutOfMemory" not in body:
        return False
    try:
        parsed = json.loads(body)
    except ValueError:
        return False
    return isinstance(parsed, dict) and parsed.get("errorType") == "Runtime.OutOfMemory"
