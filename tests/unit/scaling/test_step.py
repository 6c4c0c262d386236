"""One scaling step's decisions (`ember.scaling.step`): regime, desired count, which pods start or leave; plain values.

The scaler carrying these out is tests/unit/activator/test_scaler.py; on real agents, tests/local/activator.
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.scaling.autoscaler import Bounds
from ember.scaling.step import PodLoad, Regime, desired_pods, plan_pods, regime


@pytest.mark.parametrize(
    ("serves", "referenced", "since_qualified_s", "expected"),
    [
        pytest.param(False, True, 0.0, Regime.NONE, id="removed-or-failed-gets-nothing"),
        pytest.param(True, True, 1e9, Regime.AUTOSCALED, id="referenced-follows-its-autoscaler"),
        pytest.param(True, False, 10.0, Regime.AUTOSCALED, id="asked-for-by-number-within-keep-alive"),
        pytest.param(True, False, 61.0, Regime.ON_DEMAND, id="unreferenced-and-not-asked-for-runs-only-demand"),
    ],
)
def test_regime(serves: bool, referenced: bool, since_qualified_s: float, expected: Regime) -> None:
    got = regime(serves=serves, referenced=referenced, since_qualified_s=since_qualified_s, keep_alive_s=60.0)
    assert got is expected


def _desired(
    how: Regime, *, demand: int = 0, autoscaled: int = 0, loading: bool = False, initial_target: int = 1
) -> int:
    return desired_pods(
        how,
        demand=demand,
        concurrency=2,
        bounds=Bounds(0, 5),
        autoscaled=autoscaled,
        loading=loading,
        initial_target=initial_target,
    )


def test_desired_pods_by_regime() -> None:
    assert _desired(Regime.NONE, demand=9, autoscaled=4) == 0
    assert _desired(Regime.ON_DEMAND, demand=0, autoscaled=4) == 0, "scales to zero when nothing runs"
    assert _desired(Regime.ON_DEMAND, demand=3) == 2, "what runs now at full concurrency"
    assert _desired(Regime.ON_DEMAND, demand=99) == 5, "capped at the max share"
    assert _desired(Regime.AUTOSCALED, autoscaled=3) == 3
    assert _desired(Regime.AUTOSCALED, autoscaled=0, loading=True, initial_target=4) == 4, "loads to its predecessor"
    assert _desired(Regime.AUTOSCALED, autoscaled=0, loading=True, initial_target=9) == 5


@given(
    how=st.sampled_from(Regime),
    demand=st.integers(0, 200),
    concurrency=st.integers(1, 10),
    max_scale=st.integers(0, 20),
    autoscaled_frac=st.floats(0, 1),
    loading=st.booleans(),
    initial_target=st.integers(1, 30),
)
def test_desired_pods_stay_within_the_max_share(
    how: Regime,
    demand: int,
    concurrency: int,
    max_scale: int,
    autoscaled_frac: float,
    loading: bool,
    initial_target: int,
) -> None:
    autoscaled = int(autoscaled_frac * max_scale)  # the autoscaler's answer is within the bounds already
    got = desired_pods(
        how,
        demand=demand,
        concurrency=concurrency,
        bounds=Bounds(0, max_scale),
        autoscaled=autoscaled,
        loading=loading,
        initial_target=initial_target,
    )
    assert 0 <= got <= max_scale
    if how is Regime.ON_DEMAND and demand > 0:
        assert got == min(max_scale, -(-demand // concurrency))
    if how is Regime.AUTOSCALED and loading:
        assert got >= min(initial_target, max_scale)


def test_plan_starts_what_is_missing_counting_starts_under_way() -> None:
    serving = {"a": PodLoad(1, 0.0)}
    assert plan_pods(desired=4, serving=serving, starting=1, can_start=True, max_scale=5).start == 2
    assert plan_pods(desired=4, serving=serving, starting=1, can_start=False, max_scale=5).start == 0
    assert plan_pods(desired=2, serving=serving, starting=1, can_start=True, max_scale=5).start == 0


def test_plan_releases_idle_pods_longest_idle_first_and_keeps_busy_ones_serving() -> None:
    serving = {"busy": PodLoad(2, 0.0), "new": PodLoad(0, 50.0), "old": PodLoad(0, 10.0)}
    plan = plan_pods(desired=2, serving=serving, starting=0, can_start=True, max_scale=5)
    assert plan.retire == ("old",)
    plan = plan_pods(desired=1, serving=serving, starting=0, can_start=True, max_scale=5)
    assert plan.retire == ("old", "new"), "busy pods are not drained while the count is within the max share"


def test_plan_drains_busy_pods_fewest_in_flight_first_over_the_max_share_or_to_zero() -> None:
    serving = {"a": PodLoad(3, 0.0), "b": PodLoad(1, 0.0), "c": PodLoad(2, 0.0)}
    assert plan_pods(desired=1, serving=serving, starting=0, can_start=True, max_scale=1).retire == ("b", "c")
    assert plan_pods(desired=0, serving=serving, starting=0, can_start=True, max_scale=5).retire == ("b", "c", "a")


loads = st.dictionaries(
    st.text("abcdefgh", min_size=1, max_size=3),
    st.builds(PodLoad, st.integers(0, 3), st.floats(0, 100, allow_nan=False)),
    max_size=10,
)


@given(serving=loads, starting=st.integers(0, 5), max_scale=st.integers(1, 12), desired_frac=st.floats(0, 1))
def test_plan_never_cuts_below_desired_drains_idle_before_busy_and_enforces_the_ceiling(
    serving: dict[str, PodLoad], starting: int, max_scale: int, desired_frac: float
) -> None:
    desired = int(desired_frac * max_scale)  # the desired count is within the max share
    plan = plan_pods(desired=desired, serving=serving, starting=starting, can_start=True, max_scale=max_scale)
    ready = len(serving)
    assert plan.start == max(0, desired - ready - starting)
    assert not (plan.start and plan.retire)
    assert len(set(plan.retire)) == len(plan.retire)
    assert set(plan.retire) <= set(serving)
    left = ready - len(plan.retire)
    if desired >= ready:
        assert plan.retire == ()
    elif desired == 0:
        assert left == 0, "none wanted: busy pods drain too"
    else:
        assert desired <= left <= max_scale
    busy_retired = [p for p in plan.retire if serving[p].in_flight > 0]
    if busy_retired:
        idle = {p for p, load in serving.items() if load.in_flight == 0}
        assert idle <= set(plan.retire), "no busy pod leaves while an idle one stays"
        kept_busy = [serving[p].in_flight for p in serving if p not in plan.retire and serving[p].in_flight > 0]
        assert all(serving[p].in_flight <= n for p in busy_retired for n in kept_busy), "fewest in flight first"
