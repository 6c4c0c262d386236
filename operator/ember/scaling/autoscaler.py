"""Concurrency-based autoscaling of one Version, after Knative's KPA; pure, with an injected clock.

The activator records the Version's observed concurrency (invocations in flight plus queued)
with `record`, and asks `decide` how many specialized pods it should have. The decision:

- **stable mode**: the average concurrency over the stable window (60 s) divided by the
  per-pod target (`concurrency * targetUtilization`), rounded up;
- **panic mode**: entered when the panic window's (6 s) average asks for at least
  `panic_threshold` (200 %) of the ready pods; then the panic-window figure rules and the
  count never drops until the panic window has been calm for a whole stable window;
- **immediate demand**: never fewer pods than needed to run what is in flight and queued
  right now at full per-pod concurrency (so a cold request gets a pod without waiting for a
  window to fill);
- **keep-alive**: a lower figure only takes effect once it has been enough for
  `keepAliveSeconds` (scale-down delay), and after `keepAliveSeconds` without any request the
  Version goes to `minScale`, which may be zero. With `scaling.predictive` the predictor says
  instead whether that last pod stays (or comes back before an expected invocation): `keep_one`;
- always within this activator replica's share of `[minScale, maxScale]` (`replica_bounds`).

The bounds are a Function's, but each of N activator replicas scales its own pods for the
invocations it receives (the Service spreads them evenly), so each replica keeps a Version within
`ceil(minScale / N)` and `ceil(maxScale / N)`. Rounding up keeps every replica able to serve (a
replica whose share were 0 would turn all its invocations away) and keeps at least `minScale`
warm in all; the price is that the replicas together may run up to N - 1 pods more than `maxScale`
when it is not a multiple of N. Splitting the remainder by replica rank would hold `maxScale`
exactly only while every replica agrees on the ranks, give replicas equal load unequal capacity,
and still need a share of 1 each when `maxScale < N`.

Samples are bucketed by `granularity_s`; a window's average divides by the buckets the
window spans since the first sample, missing buckets counting as zero concurrency.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import TypeVar


@dataclass(frozen=True, slots=True)
class Bounds:
    """The pod counts one activator replica keeps a Version within."""

    min_scale: int
    max_scale: int


def replica_share(total: int, replicas: int) -> int:
    """One of `replicas` activator replicas' part of a Function-wide pod count: ceil(total / replicas)."""
    if replicas < 1:
        raise ValueError(f"replicas ({replicas}) must be at least 1")
    if total < 0:
        raise ValueError(f"total ({total}) must not be negative")
    return -(-total // replicas)


def replica_bounds(*, min_scale: int, max_scale: int, replicas: int) -> Bounds:
    """A replica's `[minScale, maxScale]` when `replicas` share a Version (see the module docstring)."""
    return Bounds(replica_share(min_scale, replicas), replica_share(max_scale, replicas))


def initial_target(*, min_scale: int, max_scale: int, serving: int, replicas: int) -> int:
    """Pods a new Version loads on one replica before it is Ready: the predecessor's (`serving`), at least 1.

    Within the replica's bounds, so a new Version never starts above its share of `maxScale`.
    """
    bounds = replica_bounds(min_scale=min_scale, max_scale=max_scale, replicas=replicas)
    return min(bounds.max_scale, max(1, bounds.min_scale, serving))


@dataclass(frozen=True, slots=True)
class ScalingParams:
    """Knobs of one Version's autoscaler (from its Function's spec and the activator's config)."""

    concurrency: int
    target_utilization: float = 0.7
    min_scale: int = 0
    max_scale: int = 10
    keep_alive_s: float = 300.0
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0
    granularity_s: float = 1.0

    def __post_init__(self) -> None:
        if self.concurrency < 1:
            raise ValueError(f"concurrency ({self.concurrency}) must be at least 1")
        if not 0 < self.target_utilization <= 1:
            raise ValueError(f"target_utilization ({self.target_utilization}) must be in (0, 1]")
        if not 0 <= self.min_scale <= self.max_scale:
            raise ValueError(f"min_scale ({self.min_scale}) must be within 0..max_scale ({self.max_scale})")
        if not 0 < self.granularity_s <= self.panic_window_s <= self.stable_window_s:
            raise ValueError(
                f"need 0 < granularity_s ({self.granularity_s}) <= panic_window_s ({self.panic_window_s})"
                f" <= stable_window_s ({self.stable_window_s})"
            )
        if self.panic_threshold < 1:
            raise ValueError(f"panic_threshold ({self.panic_threshold}) must be at least 1 (100 %)")
        if self.keep_alive_s < 0:
            raise ValueError(f"keep_alive_s ({self.keep_alive_s}) must not be negative")

    def bounds(self, replicas: int) -> Bounds:
        """This replica's `[min_scale, max_scale]` when `replicas` activator replicas share the Version."""
        return replica_bounds(min_scale=self.min_scale, max_scale=self.max_scale, replicas=replicas)

    @property
    def target_per_pod(self) -> float:
        """Concurrency one pod is meant to carry on average."""
        return max(self.concurrency * self.target_utilization, 0.01)


@dataclass(frozen=True, slots=True)
class Decision:
    """How many pods a Version should have, and why (for logs and metrics)."""

    desired: int
    panic: bool
    stable_concurrency: float
    panic_concurrency: float
    reason: str


class _Window:
    """Average of bucketed samples over a trailing time window."""

    __slots__ = ("_buckets", "_granularity", "_span")

    def __init__(self, span_s: float, granularity_s: float) -> None:
        self._span = span_s
        self._granularity = granularity_s
        # (bucket index, sum of samples, number of samples), oldest first
        self._buckets: deque[list[float]] = deque()

    def record(self, now: float, value: float) -> None:
        index = math.floor(now / self._granularity)
        if self._buckets and self._buckets[-1][0] == index:
            self._buckets[-1][1] += value
            self._buckets[-1][2] += 1
        elif not self._buckets or index > self._buckets[-1][0]:
            self._buckets.append([index, value, 1])
        self._trim(now)

    def _trim(self, now: float) -> None:
        oldest = math.floor(now / self._granularity) - math.ceil(self._span / self._granularity) + 1
        while self._buckets and self._buckets[0][0] < oldest:
            self._buckets.popleft()

    def average(self, now: float, first_sample_at: float) -> float:
        self._trim(now)
        if not self._buckets:
            return 0.0
        span_buckets = math.ceil(self._span / self._granularity)
        lived = math.floor(now / self._granularity) - math.floor(first_sample_at / self._granularity) + 1
        count = max(1, min(span_buckets, lived))
        return sum(total / n for _, total, n in self._buckets) / count


class Autoscaler:
    """Decides the pod count of one Version from its recorded concurrency."""

    def __init__(self, params: ScalingParams, *, now: float) -> None:
        self.params = params
        self._stable = _Window(params.stable_window_s, params.granularity_s)
        self._panic = _Window(params.panic_window_s, params.granularity_s)
        self._first_sample_at: float | None = None
        self._last_active_at = now
        self._panic_since: float | None = None
        self._panic_calm_since: float | None = None
        self._panic_floor = 0
        # (time, desired) of recent decisions: a lower count waits out keep-alive
        self._recent: deque[tuple[float, int]] = deque()

    def record(self, now: float, concurrency: float) -> None:
        """One observation of invocations in flight plus queued."""
        if concurrency < 0:
            raise ValueError(f"concurrency ({concurrency}) must not be negative")
        if self._first_sample_at is None:
            self._first_sample_at = now
        self._stable.record(now, concurrency)
        self._panic.record(now, concurrency)
        if concurrency > 0:
            self._last_active_at = now

    def mark_active(self, now: float) -> None:
        """A request arrived: the Version is not idle."""
        self._last_active_at = now

    @property
    def last_active_at(self) -> float:
        """When it last saw a request or a busy sample."""
        return self._last_active_at

    def idle_for(self, now: float) -> float:
        """Seconds since the last request or busy sample."""
        return max(0.0, now - self._last_active_at)

    def hold(self, now: float, count: int) -> None:
        """Ask for at least `count` pods for the keep-alive (a new Version prewarmed to its predecessor's size)."""
        self._recent.append((now, count))

    def decide(
        self,
        now: float,
        *,
        ready_pods: int,
        demand_now: float = 0.0,
        replicas: int = 1,
        keep_one: bool | None = None,
    ) -> Decision:
        """Desired pod count now; `demand_now` is what is in flight plus queued at this moment.

        `keep_one` replaces the keep-alive's "one pod until `keepAliveSeconds` idle" with a
        predictor's answer (`ember.scaling.predictor.Forecast.wants_warm`): True keeps (or starts)
        one pod while idle, False lets an idle Version go to `minScale` at once. Scale-down from
        more pods is still delayed by `keepAliveSeconds`.

        `ready_pods` and `demand_now` are this replica's, one of `replicas` activator replicas
        serving the Version: the result is within this replica's share of the bounds.
        """
        p = self.params
        bounds = p.bounds(replicas)
        first = self._first_sample_at if self._first_sample_at is not None else now
        stable = self._stable.average(now, first)
        panic_avg = self._panic.average(now, first)
        want_stable = math.ceil(round(stable / p.target_per_pod, 9))
        want_panic = math.ceil(round(panic_avg / p.target_per_pod, 9))
        immediate = math.ceil(demand_now / p.concurrency)
        if demand_now > 0:
            self._last_active_at = now

        over = want_panic >= p.panic_threshold * ready_pods if ready_pods > 0 else False
        if over:
            if self._panic_since is None:
                self._panic_since = now
            self._panic_calm_since = None
        elif self._panic_since is not None:
            if self._panic_calm_since is None:
                self._panic_calm_since = now
            if now - self._panic_calm_since >= p.stable_window_s:
                self._panic_since = None
                self._panic_calm_since = None
                self._panic_floor = 0
        in_panic = self._panic_since is not None

        if in_panic:
            want = max(want_panic, want_stable, self._panic_floor)
            self._panic_floor = want
            reason = "panic"
        else:
            want = want_stable
            reason = "stable"
        if immediate > want:
            want, reason = immediate, "demand"

        idle = self.idle_for(now)
        if keep_one is None:
            cold = idle >= p.keep_alive_s
            why = f"idle {idle:.1f}s >= keepAlive"
        else:
            cold = not keep_one
            why = "idle, no invocation predicted"
            if keep_one and want == 0:
                reason = "predicted invocation"
        if cold and demand_now == 0:
            self._recent.clear()
            desired = bounds.min_scale
            return Decision(desired, in_panic, stable, panic_avg, why)

        if want == 0 and not cold:
            want = 1  # not idle for keep-alive yet (or an invocation is predicted): keep one pod
        self._recent.append((now, want))
        while self._recent and now - self._recent[0][0] > p.keep_alive_s:
            self._recent.popleft()
        held = max(w for _, w in self._recent)
        if held > want:
            reason += ", scale-down delayed by keepAlive"
        desired = min(bounds.max_scale, max(bounds.min_scale, held))
        if desired == bounds.max_scale and held > bounds.max_scale:
            reason += ", capped at maxScale" if replicas == 1 else f", capped at maxScale / {replicas} replicas"
        return Decision(desired, in_panic, stable, panic_avg, reason)


K = TypeVar("K", bound=str)


def pods_to_release(idle_since: Mapping[K, float], busy: AbstractSet[K], surplus: int) -> list[K]:
    """Which pods to release when a Version has `surplus` too many: idle ones, longest idle first.

    Busy pods are never picked (the caller drains them instead); keep-alive was already waited
    out by the autoscaler's scale-down delay.
    """
    if surplus <= 0:
        return []
    candidates = sorted((since, pod) for pod, since in idle_since.items() if pod not in busy)
    return [pod for _, pod in candidates[:surplus]]


def pods_to_drain(in_flight: Mapping[K, int], count: int) -> list[K]:
    """Which busy pods to take out of routing when `count` must go now: fewest invocations in flight first.

    Used when a Version is above what it may have (its maxScale share shrank, or it must have none);
    the drained pods finish what they run, so the ones closest to idle free their slot soonest.
    """
    if count <= 0:
        return []
    return [pod for _, pod in sorted((n, pod) for pod, n in in_flight.items())[:count]]
