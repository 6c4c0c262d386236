"""Right-sizing in the activator: each Version's advice, the size its new pods get, and its old pods replaced.

The data path only counts: every reply's peak memory and CPU go to the Version's `Sizer`
(`VersionState.record_usage`, in `ember.activator.invoke`), and so does an agent's
`Runtime.OutOfMemory`. Everything else runs here, in one loop of its own every `sizing_tick_s`
(never in the scaling loop, which it must not slow), over every Version of the registry:

1. a Version seen for the first time starts measuring (`VersionState.start_sizing`, with what its
   pods' sandbox takes beyond the worker: `PodSource.sandbox_overhead_mib`);
2. pods the pod source saw killed at their memory bound (`PodSource.memory_kills`: the sandbox's
   cgroup locally, `OOMKilled` in a cluster) tell the Version it ran out of memory;
3. the advice (`ember.scaling.rightsize.Sizer.advice`) is published where the Version's status
   lives (`PodSource.report_sizing`: its annotation in a cluster, which the operator folds into
   `status.recommendation` and `status.resources`; nothing locally): when it changed, at most once
   per `sizing_interval_s`, and at once when the Version ran out of memory at a new size;
4. with `resources.autoResize`, in local mode, where the activator is the Version's operator, the
   advice becomes the size of its new pods (`applied_resources`, `VersionState.resize`): at once when
   it grows, at most once per `sizing_interval_s` when it shrinks. In a cluster the size comes from
   the Version's status instead (`Registry.size_version`, fed by the catalog), the same rule applied
   by the operator, so every activator replica uses one size and the operator has made its pool;
5. serving pods of another size are replaced: those at or below a size that ran out of memory leave
   routing at once (their invocations finish; the scaler starts pods of the new size); the others
   one at a time, once a generic pod of the new size is warm (in a cluster, once the operator's
   pool of it has one; locally, when there is no warm pool at all, at once) and nothing else of the
   Version is starting or draining, so the Version loses at most one pod's capacity for a warm start.

Portions keep their Function's `resources` (their pods are not resized); their use is measured.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from ember.activator.config import ActivatorConfig
from ember.activator.registry import Registry
from ember.activator.version_state import Phase, VersionState
from ember.api.version import ResourceRecommendation
from ember.pods.base import PodSource, PoolKey, VersionKey
from ember.scaling.rightsize import applied_resources, encode_report

log = logging.getLogger(__name__)

REPORT_TIMEOUT_S = 10.0  # one publish; a slow API server delays only this loop


@dataclass
class _Seen:
    """What the loop last did about one Version."""

    kills: int = 0  # `memory_kills(...).count` already told
    published: ResourceRecommendation | None = None
    published_at: float = -1e18
    resized_at: float = -1e18


class Sizing:
    """Right-sizes every Version of a registry (see the module docstring)."""

    def __init__(
        self,
        registry: Registry,
        source: PodSource,
        config: ActivatorConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._registry = registry
        self._source = source
        self._config = config
        self._clock = clock
        self._seen: dict[VersionKey, _Seen] = {}
        self._followed: set[PoolKey] = set()  # pools of a new size (cluster) made known to the pod source

    async def run(self) -> None:
        """The sizing loop; cancel it to stop."""
        while True:
            try:
                await self.step()
            except Exception:
                log.exception("sizing step failed")
            await asyncio.sleep(self._config.sizing_tick_s)

    async def step(self) -> None:
        """One pass over every Version."""
        now = self._clock()
        live: set[VersionKey] = set()
        for vs in self._registry.all_versions():
            live.add(vs.key)
            seen = self._seen.setdefault(vs.key, _Seen())
            self._measure(vs, seen)
            if vs.portion or vs.fs.removed or vs.phase is Phase.FAILED:
                continue
            if vs.sizes_itself:
                self._apply(vs, seen, now)
            elif vs.outdated and vs.pool not in self._followed:
                # the pod source counts the new pool's warm pods from now on (`_replace_outdated`)
                self._followed.add(vs.pool)
                await self._source.ensure_pool(vs.pool, self._config.warm_pool_size)
            self._replace_outdated(vs)
            await self._publish(vs, seen, now)
        for gone in set(self._seen) - live:
            del self._seen[gone]

    def _measure(self, vs: VersionState, seen: _Seen) -> None:
        if vs.sizer is None:
            vs.start_sizing(
                overhead_mib=self._source.sandbox_overhead_mib(vs.pool), min_samples=self._config.sizing_min_samples
            )
        kills = self._source.memory_kills(vs.key)
        if kills.count > seen.kills:
            seen.kills = kills.count
            vs.out_of_memory(kills.largest_mib)

    def _apply(self, vs: VersionState, seen: _Seen, now: float) -> None:
        """Local mode: the advice becomes the size of new pods (growth at once, shrinks once per interval)."""
        assert vs.sizer is not None
        wanted = applied_resources(vs.spec.resources, max_memory_mib=vs.max_memory_mib, advice=vs.sizer.advice())
        shrinks = wanted.memory_mib < vs.resources.memory_mib
        if shrinks and now - seen.resized_at < self._config.sizing_interval_s:
            return
        if vs.resize(wanted):
            seen.resized_at = now

    def _replace_outdated(self, vs: VersionState) -> None:
        outdated = vs.outdated
        if not outdated:
            return
        too_small = vs.sizer.oom_at_mib if vs.sizer is not None else None
        doomed = [p for p in outdated if too_small is not None and p.handle.pool.memory_mib <= too_small]
        if doomed:
            for pod in doomed:
                vs.drain(pod)
            return
        if vs.starting or vs.draining:
            return
        # A replacement must find a warm pod of the new size: in a cluster always (the operator
        # may still be making its pool; a claim would wait for it), locally when there is a warm pool.
        if (self._config.warm_pool_size > 0 or not vs.sizes_itself) and self._source.warm_pods().get(vs.pool, 0) < 1:
            return
        vs.drain(min(outdated, key=lambda p: (p.in_flight, p.handle.id)))

    async def _publish(self, vs: VersionState, seen: _Seen, now: float) -> None:
        assert vs.sizer is not None
        advice = vs.sizer.advice()
        if advice is None:
            return
        last = seen.published
        if last is not None and (advice.memory_mib, advice.cpu_millicores, advice.out_of_memory_at_mib) == (
            last.memory_mib,
            last.cpu_millicores,
            last.out_of_memory_at_mib,
        ):
            return
        ran_out = last is None or advice.out_of_memory_at_mib != last.out_of_memory_at_mib
        if not ran_out and now - seen.published_at < self._config.sizing_interval_s:
            return
        seen.published, seen.published_at = advice, now
        try:
            async with asyncio.timeout(REPORT_TIMEOUT_S):
                await self._source.report_sizing(vs.key, report=encode_report(advice))
        except TimeoutError:
            log.warning("sizing not reported function=%s version=%d: timed out", vs.fs.label, vs.key.number)
