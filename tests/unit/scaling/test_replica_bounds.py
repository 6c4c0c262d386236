"""A Function's minScale and maxScale split over N activator replicas; plain values and a fake clock.

The scaler acting on these shares is tests/unit/activator/test_scaler_replicas.py; two activators on
a real cluster holding a Function's maxScale together is tests/cluster/test_activator_replicas.py.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ember.scaling.autoscaler import (
    Autoscaler,
    Bounds,
    ScalingParams,
    initial_target,
    pods_to_drain,
    replica_bounds,
    replica_share,
)


@pytest.mark.parametrize(
    ("total", "replicas", "share"),
    [
        pytest.param(0, 1, 0, id="zero-stays-zero-1"),
        pytest.param(0, 3, 0, id="zero-stays-zero-3"),
        pytest.param(5, 1, 5, id="one-replica-keeps-all"),
        pytest.param(4, 2, 2, id="multiple-splits-exactly"),
        pytest.param(5, 2, 3, id="remainder-rounds-up"),
        pytest.param(1, 3, 1, id="fewer-than-replicas-still-one-each"),
        pytest.param(10, 3, 4, id="ten-over-three"),
    ],
)
def test_a_replica_share_is_the_total_over_replicas_rounded_up(total: int, replicas: int, share: int) -> None:
    assert replica_share(total, replicas) == share


@pytest.mark.parametrize(
    ("total", "replicas", "message"),
    [
        pytest.param(3, 0, r"replicas \(0\) must be at least 1", id="no-replicas"),
        pytest.param(-1, 2, r"total \(-1\) must not be negative", id="negative-total"),
    ],
)
def test_a_share_of_nonsense_is_refused_naming_the_value(total: int, replicas: int, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        replica_share(total, replicas)


@settings(max_examples=300, deadline=None)
@given(min_scale=st.integers(0, 1000), extra=st.integers(0, 1000), replicas=st.integers(1, 50))
def test_shares_together_keep_min_scale_and_overshoot_max_scale_by_less_than_the_replicas(
    min_scale: int, extra: int, replicas: int
) -> None:
    max_scale = max(1, min_scale + extra)
    bounds = replica_bounds(min_scale=min_scale, max_scale=max_scale, replicas=replicas)
    assert 0 <= bounds.min_scale <= bounds.max_scale
    assert bounds.max_scale >= 1, "every replica can serve"
    assert replicas * bounds.min_scale >= min_scale
    assert max_scale <= replicas * bounds.max_scale <= max_scale + replicas - 1
    assert (bounds.min_scale == 0) == (min_scale == 0)
    if max_scale % replicas == 0:
        assert replicas * bounds.max_scale == max_scale
    if replicas == 1:
        assert bounds == Bounds(min_scale, max_scale)


@pytest.mark.parametrize(
    ("min_scale", "max_scale", "serving", "replicas", "target"),
    [
        pytest.param(0, 10, 0, 1, 1, id="first-version-gets-one"),
        pytest.param(0, 10, 0, 3, 1, id="first-version-gets-one-per-replica"),
        pytest.param(4, 10, 0, 2, 2, id="min-share"),
        pytest.param(0, 4, 6, 1, 4, id="predecessor-capped-at-max"),
        pytest.param(0, 4, 3, 2, 2, id="predecessor-capped-at-max-share"),
        pytest.param(0, 9, 2, 3, 2, id="predecessor-within-share"),
    ],
)
def test_a_new_versions_initial_target_is_within_the_replicas_share(
    min_scale: int, max_scale: int, serving: int, replicas: int, target: int
) -> None:
    assert initial_target(min_scale=min_scale, max_scale=max_scale, serving=serving, replicas=replicas) == target


def test_params_bounds_are_the_replica_bounds() -> None:
    params = ScalingParams(concurrency=1, min_scale=3, max_scale=7)
    assert params.bounds(1) == Bounds(3, 7)
    assert params.bounds(2) == Bounds(2, 4)
    assert params.bounds(3) == Bounds(1, 3)


@pytest.mark.parametrize(("replicas", "cap"), [(1, 6), (2, 3), (3, 2)])
def test_a_burst_is_capped_at_the_max_share(replicas: int, cap: int) -> None:
    scaler = Autoscaler(ScalingParams(concurrency=1, max_scale=6), now=0)
    scaler.record(1, 50)
    decision = scaler.decide(1, ready_pods=1, demand_now=50, replicas=replicas)
    assert decision.desired == cap
    assert "capped at maxScale" in decision.reason


@pytest.mark.parametrize(("replicas", "floor"), [(1, 5), (2, 3), (3, 2)])
def test_an_idle_version_keeps_its_min_share(replicas: int, floor: int) -> None:
    scaler = Autoscaler(ScalingParams(concurrency=1, min_scale=5, max_scale=10, keep_alive_s=10), now=0)
    scaler.record(1, 0)
    assert scaler.decide(20, ready_pods=0, replicas=replicas).desired == floor


@settings(max_examples=200, deadline=None)
@given(
    trace=st.lists(st.tuples(st.floats(0.0, 5.0), st.floats(0, 500)), min_size=1, max_size=40),
    min_scale=st.integers(0, 8),
    extra=st.integers(1, 20),
    replicas=st.lists(st.integers(1, 5), min_size=1, max_size=40),
)
def test_decisions_stay_within_the_share_as_replicas_come_and_go(
    trace: list[tuple[float, float]], min_scale: int, extra: int, replicas: list[int]
) -> None:
    params = ScalingParams(concurrency=2, min_scale=min_scale, max_scale=min_scale + extra)
    scaler = Autoscaler(params, now=0)
    t = 0.0
    for i, (step, value) in enumerate(trace):
        t += step
        scaler.record(t, value)
        n = replicas[i % len(replicas)]
        bounds = params.bounds(n)
        desired = scaler.decide(t, ready_pods=3, demand_now=value, replicas=n).desired
        assert bounds.min_scale <= desired <= bounds.max_scale


@settings(max_examples=100, deadline=None)
@given(
    in_flight=st.dictionaries(st.text(min_size=1, max_size=4), st.integers(1, 50), max_size=10),
    count=st.integers(-2, 12),
)
def test_drain_picks_the_fewest_in_flight_first(in_flight: dict[str, int], count: int) -> None:
    chosen = pods_to_drain(in_flight, count)
    assert len(chosen) == min(max(count, 0), len(in_flight))
    assert len(set(chosen)) == len(chosen)
    assert [in_flight[p] for p in chosen] == sorted(in_flight.values())[: len(chosen)]
