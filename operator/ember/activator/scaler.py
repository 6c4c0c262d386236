"""Turns scaling decisions into pods: claim + specialize on demand, release when idle.

One loop for the activator: every `tick_s` (and at once when something pokes the shared
`Wakeup`: an invocation queued, a pod found unreachable, a Version became Ready) it samples each
Version's concurrency, asks the pure decisions of `ember.scaling.step` (fed by the Version's
`Autoscaler`) how many pods it should have and which ones go, and carries them out through the
`PodSource` and the Version's own transitions (`ember.activator.version_state`): it never
writes a Version's pods or phase itself. A Version still loading wants at least its initial
target (its predecessor's size), becomes Ready when it has that, and only then takes "latest"
traffic. A predictive Function's `Forecast` (`ember.scaling.predictor`) is fed here each step
(its newest request, what it runs); it keeps or prewarms its one idle pod, and its prewarms due
within the demand window go to the pod source as expected claims (`expect_claims`); pools no
Version uses any more are let drain. Pods the source reports gone leave routing; busy pods are
drained, never cut. When a Version's code is bad (the agent refused it), the failure is also
reported to the pod source (`report_load_failure`: the Version object's annotation in a cluster)
in a task of its own, so a slow API server never holds up the loop. Pods of a Function with
`freeze.enabled` idle for its `idleSeconds` are frozen, each in a task of its own
(`ember.activator.freezer`); they stay in every decision above.

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
from ember.activator.freezer import Freezer
from ember.activator.metrics import Metrics
from ember.activator.registry import Registry
from ember.activator.version_state import Phase, VersionState
from ember.activator.wake import Wakeup
from ember.pods.base import PodGone, PodHandle, PodSource, PodSourceError, PoolKey, PoolShortage, SpecializeFailed
from ember.scaling.pool_demand import DEFAULT_WINDOW_S
from ember.scaling.step import PodLoad, Regime, desired_pods, plan_pods, regime

log = logging.getLogger(__name__)


class _StartFailed(Exception):
    """A pod start ended without a pod (whatever it had was released)."""

    def __init__(self, message: str, *, code_error: bool, shortage: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.code_error = code_error
        self.shortage = shortage  # the pool had no pod to claim (`PoolShortage`)


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
        wakeup: Wakeup | None = None,
        freezer: Freezer | None = None,
    ) -> None:
        self._registry = registry
        self._freezer = freezer or Freezer(client, metrics, clock=clock)
        self._source = source
        self._config = config
        self._metrics = metrics
        self._client = client
        self._clock = clock
        self._replicas = replicas
        self._wakeup = wakeup or Wakeup()
        self._tasks: set[asyncio.Task[None]] = set()
        self._pools: set[PoolKey] = set()
        self._closing = False
        self._demand_window_s = DEFAULT_WINDOW_S  # how far ahead prewarms count as expected claims

    def poke(self) -> None:
        """Decide now rather than at the next tick."""
        self._wakeup.poke()

    async def run(self) -> None:
        """The scaling loop; cancel it to stop."""
        while True:
            try:
                await self.step()
            except Exception:
                log.exception("scaling step failed")
            await self._wakeup.wait(self._config.tick_s)

    async def step(self) -> None:
        """One pass over every Version."""
        now = self._clock()
        replicas = max(1, self._replicas())
        self._forecast(now)
        versions = self._registry.all_versions()
        for vs in versions:
            await self._ensure_pool(vs.pool)
            self._step_version(vs, now, replicas)
        await self._drop_unused_pools({vs.pool for vs in versions})

    def _forecast(self, now: float) -> None:
        """Feed each predictive Function's forecast, and tell the pod source which pools the
        forecasts will claim from within its demand window (prewarms of Functions with no pod)."""
        expected: dict[PoolKey, int] = {}
        for fs in self._registry.functions():
            if fs.forecast is None:
                continue
            versions = list(fs.versions.values())
            fs.forecast.observe(
                now,
                last_request_at=max((vs.autoscaler.last_active_at for vs in versions), default=-1e18),
                demand=sum(vs.in_flight + vs.queued for vs in versions),
            )
            serving = [vs for vs in versions if vs.key.number in fs.referenced()]
            if not any(vs.holds_pods for vs in serving) and fs.forecast.starts_within(now, self._demand_window_s):
                for vs in serving:
                    expected[vs.pool] = expected.get(vs.pool, 0) + 1
        self._source.expect_claims(expected)

    async def _drop_unused_pools(self, used: set[PoolKey]) -> None:
        """Let pools that no Version takes pods from any more drain (a resized Version's old size, a
        removed Function's); a Version that needs one again makes it again."""
        for pool in self._pools - used:
            self._pools.discard(pool)
            await self._source.ensure_pool(pool, 0)

    async def _ensure_pool(self, pool: PoolKey) -> None:
        if pool not in self._pools and self._config.warm_pool_size > 0:
            self._pools.add(pool)
            await self._source.ensure_pool(pool, self._config.warm_pool_size)

    def _step_version(self, vs: VersionState, now: float, replicas: int) -> None:
        self._forget_lost_pods(vs)
        demand = vs.in_flight + vs.queued
        vs.autoscaler.record(now, demand)
        params = vs.autoscaler.params
        bounds = params.bounds(replicas)
        how = regime(
            serves=not vs.fs.removed and vs.phase is not Phase.FAILED,
            referenced=vs.key.number in vs.fs.referenced(),
            since_qualified_s=now - vs.last_qualified_at,
            keep_alive_s=params.keep_alive_s,
        )
        autoscaled = 0
        if how is Regime.AUTOSCALED:
            forecast = vs.forecast
            decision = vs.autoscaler.decide(
                now,
                ready_pods=vs.ready_pods,
                demand_now=demand,
                replicas=replicas,
                keep_one=None if forecast is None else forecast.wants_warm(now),
            )
            autoscaled = decision.desired
        desired = desired_pods(
            how,
            demand=demand,
            concurrency=vs.spec.concurrency,
            bounds=bounds,
            autoscaled=autoscaled,
            loading=vs.phase is Phase.LOADING,
            initial_target=vs.initial_target,
        )
        serving = {pod.handle.id: pod for pod in vs.serving}
        plan = plan_pods(
            desired=desired,
            serving={pid: PodLoad(pod.in_flight, pod.idle_since) for pid, pod in serving.items()},
            starting=vs.starting,
            can_start=vs.request is not None and not self._closing,
            max_scale=bounds.max_scale,
        )
        for _ in range(plan.start):
            self._spawn(self._start_pod(vs))
        for pid in plan.retire:
            vs.drain(serving[pid])
        for handle in vs.take_drained_idle():
            self._spawn(self._release(handle))
        if not self._closing:
            for pod in self._freezer.due(vs, now):
                self._spawn(self._freezer.freeze(vs, pod))

    def _forget_lost_pods(self, vs: VersionState) -> None:
        serving = vs.serving
        if not serving:
            return
        alive = {p.id for p in self._source.endpoints(vs.key)}
        for pod in serving:
            if pod.handle.id not in alive:
                log.warning("pod lost function=%s version=%d pod=%s", vs.fs.label, vs.key.number, pod.handle.id)
                vs.pod_lost(pod)
                self.poke()

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
        vs.pod_starting()
        started = time.perf_counter()
        try:
            handle = await self._claim_and_specialize(vs)
        except _StartFailed as failed:
            attempts = self._config.load_attempts
            failed_now = vs.pod_start_failed(
                failed.message, code_error=failed.code_error, shortage=failed.shortage, max_attempts=attempts
            )
            if failed_now and failed.code_error:  # where the Version's status lives, without holding up the loop
                self._spawn(self._report_load_failure(vs, failed.message))
            return
        except BaseException:
            vs.pod_start_cancelled()
            raise
        kind = handle.claim.value
        elapsed = time.perf_counter() - started
        self._metrics.cold_starts.labels(vs.fs.label, kind).inc()
        self._metrics.cold_start_duration.labels(kind).observe(elapsed)
        if self._closing:
            vs.pod_start_cancelled()
            await self._release(handle)
            return
        loading = vs.phase is Phase.LOADING
        if vs.pod_ready(handle, self._clock()) is None:  # failed or removed meanwhile
            await self._release(handle)
            return
        log.info(
            "pod ready function=%s version=%d pod=%s kind=%s ms=%.1f",
            vs.fs.label,
            vs.key.number,
            handle.id,
            kind,
            elapsed * 1000,
        )
        if loading and vs.phase is Phase.READY:
            self.poke()  # "latest" moved: its predecessor may drain now

    async def _claim_and_specialize(self, vs: VersionState) -> PodHandle:
        """A pod specialized for the Version; raises `_StartFailed` after releasing whatever it had."""
        assert vs.request is not None, "pod_starting refuses a Version without code"
        handle: PodHandle | None = None
        try:
            handle = await self._source.claim(vs.pool)
            # the first invocation's connection is opened while the code loads
            connecting = asyncio.create_task(self._client.preconnect(handle.address))
            try:
                return await self._source.specialize(handle, vs.request)
            finally:
                with contextlib.suppress(Exception):
                    await connecting
        except SpecializeFailed as err:
            failure = (
                _StartFailed(f"{err.error_type}: {err.message}", code_error=True)
                if err.is_code_error
                else _StartFailed(str(err), code_error=False)
            )
        except PoolShortage as err:
            failure = _StartFailed(str(err), code_error=False, shortage=True)
        except (PodSourceError, PodGone, OSError) as err:
            failure = _StartFailed(str(err), code_error=False)
        except Exception as err:
            log.exception("pod start crashed function=%s version=%d", vs.fs.label, vs.key.number)
            failure = _StartFailed(f"{type(err).__name__}: {err}", code_error=False)
        if handle is not None:
            await self._release(handle)
        raise failure

    async def _report_load_failure(self, vs: VersionState, message: str) -> None:
        try:
            await self._source.report_load_failure(vs.key, code_hash=vs.version_hash, message=message)
        except Exception as err:  # the Version failed here either way; the report is best effort
            log.warning("load failure not reported function=%s version=%d error=%s", vs.fs.label, vs.key.number, err)

    async def close(self) -> None:
        """Stop starting pods, then release every pod of every Version."""
        self._closing = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        releases = [self._release(handle) for vs in self._registry.all_versions() for handle in vs.take_all()]
        await asyncio.gather(*releases, return_exceptions=True)
