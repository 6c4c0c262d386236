"""KPA-style autoscaler: windows, panic mode, keep-alive, scale to zero, bounds; plain values and a fake clock.

The activator's use of these decisions (claiming and releasing real pods) is tested in tests/local/activator.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.scaling.autoscaler import Autoscaler, ScalingParams, pods_to_release


def _steady(scaler: Autoscaler, start: float, seconds: float, concurrency: float) -> float:
    """Record one sample a second for `seconds`; returns the time of the last sample."""
    for i in range(1, int(seconds) + 1):
        scaler.record(start + i, concurrency)
    return start + int(seconds)


def test_stable_load_asks_for_concurrency_over_target() -> None:
    params = ScalingParams(concurrency=10, target_utilization=0.5, max_scale=100)
    scaler = Autoscaler(params, now=0)
    t = _steady(scaler, 0, 120, 20)
    # 20 in flight / (10 x 0.5) per pod = 4 pods
    assert scaler.decide(t, ready_pods=4).desired == 4


def test_burst_enters_panic_and_never_scales_down_during_it() -> None:
    params = ScalingParams(concurrency=1, target_utilization=1.0, max_scale=50, keep_alive_s=1)
    scaler = Autoscaler(params, now=0)
    t = _steady(scaler, 0, 60, 2)
    assert scaler.decide(t, ready_pods=2).desired == 2
    t = _steady(scaler, t, 6, 10)
    burst = scaler.decide(t, ready_pods=2)
    assert burst.panic
    assert burst.desired >= 8
    # load drops back, but panic holds the count until the stable window has been calm
    t = _steady(scaler, t, 10, 2)
    held = scaler.decide(t, ready_pods=burst.desired)
    assert held.panic
    assert held.desired >= burst.desired


def test_panic_ends_after_a_calm_stable_window() -> None:
    params = ScalingParams(concurrency=1, target_utilization=1.0, max_scale=50, keep_alive_s=1)
    scaler = Autoscaler(params, now=0)
    t = _steady(scaler, 0, 6, 10)
    assert scaler.decide(t, ready_pods=1).panic
    for _ in range(70):
        t += 1
        scaler.record(t, 1)
        decision = scaler.decide(t, ready_pods=1)
    assert not decision.panic
    assert decision.desired == 1


def test_cold_request_gets_a_pod_without_waiting_for_a_window() -> None:
    scaler = Autoscaler(ScalingParams(concurrency=1, keep_alive_s=60), now=0)
    decision = scaler.decide(0.01, ready_pods=0, demand_now=3)
    assert decision.desired == 3
    assert decision.reason.startswith("demand")


def test_idle_for_keep_alive_scales_to_zero_and_back() -> None:
    params = ScalingParams(concurrency=1, keep_alive_s=30, stable_window_s=60)
    scaler = Autoscaler(params, now=0)
    t = _steady(scaler, 0, 10, 1)
    assert scaler.decide(t, ready_pods=2).desired >= 1
    t = _steady(scaler, t, 29, 0)
    assert scaler.decide(t, ready_pods=2).desired >= 1, "released before keep-alive"
    t = _steady(scaler, t, 5, 0)
    zero = scaler.decide(t, ready_pods=2)
    assert zero.desired == 0
    assert "idle" in zero.reason
    assert scaler.decide(t + 1, ready_pods=0, demand_now=1).desired == 1


def test_min_scale_is_kept_when_idle() -> None:
    scaler = Autoscaler(ScalingParams(concurrency=1, min_scale=2, keep_alive_s=1), now=0)
    assert scaler.decide(100, ready_pods=2).desired == 2


def test_scale_down_waits_for_keep_alive() -> None:
    params = ScalingParams(concurrency=1, target_utilization=1.0, keep_alive_s=20, stable_window_s=6, panic_window_s=6)
    scaler = Autoscaler(params, now=0)
    t = _steady(scaler, 0, 10, 5)
    assert scaler.decide(t, ready_pods=5).desired == 5
    t = _steady(scaler, t, 10, 1)
    assert scaler.decide(t, ready_pods=5).desired == 5
    t = _steady(scaler, t, 15, 1)
    assert scaler.decide(t, ready_pods=5).desired == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"concurrency": 0}, "concurrency", id="zero-concurrency"),
        pytest.param({"concurrency": 1, "min_scale": 3, "max_scale": 2}, "min_scale", id="min-above-max"),
        pytest.param({"concurrency": 1, "target_utilization": 0}, "target_utilization", id="zero-target"),
        pytest.param({"concurrency": 1, "panic_window_s": 100}, "panic_window_s", id="panic-longer-than-stable"),
        pytest.param({"concurrency": 1, "panic_threshold": 0.5}, "panic_threshold", id="threshold-below-one"),
        pytest.param({"concurrency": 1, "keep_alive_s": -1}, "keep_alive_s", id="negative-keep-alive"),
    ],
)
def test_bad_params_are_named(kwargs: dict[str, float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ScalingParams(**kwargs)  # type: ignore[arg-type]


def test_negative_concurrency_sample_is_refused() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        Autoscaler(ScalingParams(concurrency=1), now=0).record(1, -1)


samples = st.lists(
    st.tuples(st.floats(min_value=0.0, max_value=5.0), st.floats(min_value=0, max_value=500)), min_size=1, max_size=60
)


@settings(max_examples=200, deadline=None)
@given(
    trace=samples,
    concurrency=st.integers(1, 50),
    min_scale=st.integers(0, 5),
    extra=st.integers(0, 20),
    ready=st.integers(0, 30),
    demand=st.floats(min_value=0, max_value=1000),
)
def test_decisions_stay_within_bounds(
    trace: list[tuple[float, float]], concurrency: int, min_scale: int, extra: int, ready: int, demand: float
) -> None:
    params = ScalingParams(concurrency=concurrency, min_scale=min_scale, max_scale=min_scale + max(extra, 1))
    scaler = Autoscaler(params, now=0)
    t = 0.0
    for step, value in trace:
        t += step
        scaler.record(t, value)
        decision = scaler.decide(t, ready_pods=ready, demand_now=demand)
        assert params.min_scale <= decision.desired <= params.max_scale


@settings(max_examples=200, deadline=None)
@given(concurrency=st.integers(1, 20), load=st.floats(min_value=0.1, max_value=200), util=st.floats(0.1, 1.0))
def test_enough_capacity_for_steady_load(concurrency: int, load: float, util: float) -> None:
    params = ScalingParams(concurrency=concurrency, target_utilization=util, max_scale=100_000)
    scaler = Autoscaler(params, now=0)
    t = _steady(scaler, 0, 70, load)
    desired = scaler.decide(t, ready_pods=1).desired
    # never less capacity than the load needs at the target, and at most one pod more than that
    assert desired * concurrency * util >= load - 1e-6
    assert (desired - 1) * concurrency * util < load + 1e-6


@settings(max_examples=100, deadline=None)
@given(
    idle=st.dictionaries(st.text(min_size=1, max_size=4), st.floats(0, 100), max_size=10),
    busy_pick=st.sets(st.integers(0, 9)),
    surplus=st.integers(-2, 12),
)
def test_release_picks_only_idle_pods_longest_idle_first(
    idle: dict[str, float], busy_pick: set[int], surplus: int
) -> None:
    names = sorted(idle)
    busy = {names[i] for i in busy_pick if i < len(names)}
    chosen = pods_to_release(idle, busy, surplus)
    assert len(chosen) == min(max(surplus, 0), len(idle) - len(busy))
    assert not set(chosen) & busy
    free_since = sorted(idle[p] for p in idle if p not in busy)
    assert [idle[p] for p in chosen] == free_since[: len(chosen)]
