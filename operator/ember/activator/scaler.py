"""Turns autoscaler decisions into pods: claim + specialize on demand, release when idle.

One loop for the activator: every `tick_s` (and at once when an invocation queues) it samples
each Version's concurrency, asks its `Autoscaler` for a pod count, and starts or releases pods
through the `PodSource`. A Version still loading wants at least its initial target (its
predecessor's size), becomes Ready when it has that, and only then takes "latest" traffic.
Pods the source reports gone leave routing here; busy pods are drained, never cut.

With several activator replicas each runs this loop over its own invocations and its own pods.
A Version's `minScale` and `maxScale` are the Function's, so each replica keeps it within its share
(`ember.scaling.autoscaler.replica_bounds`): with N live replicas (the injected `replicas` count,
read once per step; the Kubernetes pod source counts live activator Leases), ceil(minScale / N)
and ceil(maxScale / N). Together they keep at least `minScale` warm and run at most `maxScale`,
or up to N - 1 more when it is not a multiple of N. A replica's throttler then admits its share:
pods x concurrency in flight, plus its queue, and turns the rest away with 429. When N changes (a
replica joins, or one's Lease is gone or dead), the next step moves every Version to its new
share: pods over a smaller `maxScale` share leave routing at once, idle ones first, and busy ones
finish their invocations before they are released; a bigger share grows with demand as usual. The
Kubernetes pod source's docstring says how pods of a replica that died are reclaimed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

from ember.activator.agent_client import AgentClient
from ember.activator.config import ActivatorConfig
from ember.activator.metrics import Metrics
from ember.activator.registry import Phase, Registry, VersionState
from ember.activator.throttler import PodSlots
from ember.pods.base import PodGone, PodHandle, PodSource, PodSourceError, PoolKey, SpecializeFailed
from ember.scaling.autoscaler import pods_to_drain, pods_to_release

log = logging.getLogger(__name__)


class Scaler:
    """Keeps every Version's pod count where its autoscaler wants it."""

    def __init__(
        self,
        registry: Registry,
        source: PodSource,
        config: ActivatorConfig,
        metrics: Metrics,
        client: AgentClient,
        *,
        clock: Callable[[], float] = time.monotonic,
        replicas: Callable[[], int] = lambda: 1,
    ) -> None:
        self._registry = registry
        self._source = source
        self._config = config
        self._metrics = metrics
        self._client = client
        self._clock = clock
        self._replicas = replicas
        self._wake = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._pools: set[PoolKey] = set()
        self._closing = False

    def poke(self) -> None:
        """Decide now rather than at the next tick (an invocation is waiting)."""
        self._wake.set()

    async def run(self) -> None:
        """The scaling loop; cancel it to stop."""
        while True:
            try:
                await self.step()
            except Exception:
                log.exception("scaling step failed")
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._config.tick_s):
                    await self._wake.wait()
            self._wake.clear()

    async def step(self) -> None:
        """One pass over every Version."""
        now = self._clock()
        replicas = max(1, self._replicas())
        for vs in self._registry.all_versions():
            await self._ensure_pool(vs.pool)
            self._step_version(vs, now, replicas)

    async def _ensure_pool(self, pool: PoolKey) -> None:
        if pool not in self._pools and self._config.warm_pool_size > 0:
            self._pools.add(pool)
            await self._source.ensure_pool(pool, self._config.warm_pool_size)

    def _step_version(self, vs: VersionState, now: float, replicas: int) -> None:
        self._forget_lost_pods(vs)
        throttler = vs.throttler
        demand = throttler.in_flight + throttler.queued
        vs.autoscaler.record(now, demand)
        bounds = vs.autoscaler.params.bounds(replicas)
        fs = vs.fs
        if fs.removed or vs.phase is Phase.FAILED:
            desired = 0
        elif vs.key.number not in fs.referenced() and now - vs.last_qualified_at > vs.autoscaler.params.keep_alive_s:
            desired = 0 if demand == 0 else min(bounds.max_scale, max(1, -(-demand // vs.spec.concurrency)))
        else:
            decision = vs.autoscaler.decide(now, ready_pods=vs.ready_pods, demand_now=demand, replicas=replicas)
            desired = decision.desired
            if vs.phase is Phase.LOADING:
                desired = max(desired, min(vs.initial_target, bounds.max_scale))
        have = vs.ready_pods + vs.starting
        if desired > have and vs.request is not None and not self._closing:
            for _ in range(desired - have):
                self._spawn(self._start_pod(vs))
        elif desired < vs.ready_pods:
            idle = {pid: slot.idle_since for pid, slot in vs.pods.items() if slot.in_flight == 0}
            busy = {pid for pid, slot in vs.pods.items() if slot.in_flight > 0}
            chosen = pods_to_release(idle, busy, vs.ready_pods - desired)
            for pid in chosen:
                self._retire(vs, vs.pods[pid])
            # Still above what must not be exceeded (nothing, or this replica's maxScale share): drain
            # busy ones too, fewest in flight first; they take no new invocations and go once idle.
            ceiling = 0 if desired == 0 else bounds.max_scale
            for pid in pods_to_drain({pid: vs.pods[pid].in_flight for pid in busy}, vs.ready_pods - ceiling):
                self._retire(vs, vs.pods[pid])
        for pid, slot in list(vs.draining.items()):
            if slot.in_flight == 0:
                del vs.draining[pid]
                self._spawn(self._release(slot.handle))

    def _forget_lost_pods(self, vs: VersionState) -> None:
        if not vs.pods:
            return
        alive = {p.id for p in self._source.endpoints(vs.key)}
        for pid, slot in list(vs.pods.items()):
            if pid not in alive:
                log.warning("pod lost function=%s version=%d pod=%s", vs.fs.label, vs.key.number, pid)
                self.pod_lost(vs, slot)

    def pod_lost(self, vs: VersionState, slot: PodSlots) -> None:
        """A pod is gone (reported by the source, or unreachable): stop routing to it."""
        if vs.pods.pop(slot.handle.id, None) is not None:
            vs.throttler.remove_pod(slot)
            vs.draining[slot.handle.id] = slot
            self.poke()

    def _retire(self, vs: VersionState, slot: PodSlots) -> None:
        vs.pods.pop(slot.handle.id, None)
        vs.throttler.remove_pod(slot)
        vs.draining[slot.handle.id] = slot
        log.info(
            "pod released function=%s version=%d pod=%s in_flight=%d",
            vs.fs.label,
            vs.key.number,
            slot.handle.id,
            slot.in_flight,
        )

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release(self, handle: PodHandle) -> None:
        self._client.forget(handle.address)
        try:
            await self._source.release(handle)
        except PodSourceError as err:
            log.warning("release failed pod=%s error=%s", handle.id, err)

    async def _start_pod(self, vs: VersionState) -> None:
        assert vs.request is not None
        vs.starting += 1
        started = time.perf_counter()
        handle: PodHandle | None = None
        try:
            handle = await self._source.claim(vs.pool)
            # the first invocation's connection is opened while the code loads
            connecting = asyncio.create_task(self._client.preconnect(handle.address))
            try:
                handle = await self._source.specialize(handle, vs.request)
            finally:
                with contextlib.suppress(Exception):
                    await connecting
        except SpecializeFailed as err:
            if handle is not None:
                await self._release(handle)
            if err.is_code_error:
                if vs.phase is not Phase.FAILED:
                    vs.mark_failed(f"{err.error_type}: {err.message}")
                    self._metrics.version_failures.labels(vs.fs.label).inc()
                return
            self._load_failure(vs, str(err))
            return
        except (PodSourceError, PodGone, OSError) as err:
            if handle is not None:
                await self._release(handle)
            self._load_failure(vs, str(err))
            return
        except Exception as err:
            log.exception("pod start crashed function=%s version=%d", vs.fs.label, vs.key.number)
            if handle is not None:
                await self._release(handle)
            self._load_failure(vs, f"{type(err).__name__}: {err}")
            return
        finally:
            vs.starting -= 1
        kind = handle.claim.value
        elapsed = time.perf_counter() - started
        self._metrics.cold_starts.labels(vs.fs.label, kind).inc()
        self._metrics.cold_start_duration.labels(kind).observe(elapsed)
        if vs.phase is Phase.FAILED or vs.fs.removed or self._closing:
            await self._release(handle)
            return
        slot = PodSlots(handle, now=self._clock())
        vs.pods[handle.id] = slot
        vs.throttler.add_pod(slot)
        vs.failures = 0
        log.info(
            "pod ready function=%s version=%d pod=%s kind=%s ms=%.1f",
            vs.fs.label,
            vs.key.number,
            handle.id,
            kind,
            elapsed * 1000,
        )
        if vs.phase is Phase.LOADING and (vs.ready_pods >= vs.initial_target or vs.starting == 0):
            vs.phase = Phase.READY
            log.info("version ready function=%s version=%d pods=%d", vs.fs.label, vs.key.number, vs.ready_pods)
            self.poke()

    def _load_failure(self, vs: VersionState, message: str) -> None:
        vs.failures += 1
        log.warning(
            "pod start failed function=%s version=%d attempt=%d error=%s",
            vs.fs.label,
            vs.key.number,
            vs.failures,
            message,
        )
        if vs.phase is Phase.LOADING and vs.ready_pods == 0 and vs.failures >= self._config.load_attempts:
            vs.mark_failed(message)
            self._metrics.version_failures.labels(vs.fs.label).inc()

    async def close(self) -> None:
        """Stop starting pods, then release every pod of every Version."""
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        releases = []
        for vs in self._registry.all_versions():
            for slot in [*vs.pods.values(), *vs.draining.values()]:
                vs.throttler.remove_pod(slot)
                releases.append(self._release(slot.handle))
            vs.pods.clear()
            vs.draining.clear()
        await asyncio.gather(*releases, return_exceptions=True)
