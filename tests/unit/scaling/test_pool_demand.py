"""Pool demand (pure): claims per pool over a sliding window, replicas from floor + demand, the published form."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.scaling.pool_demand import MAX_DEMAND_CHARS, ClaimRate, decode_demand, encode_demand, pool_replicas


def test_claims_count_within_the_window_and_then_fall_away() -> None:
    rate = ClaimRate(window_s=60)
    for t in (0.0, 10.0, 20.0):
        rate.record("a", t)
    rate.record("b", 30.0)
    assert rate.demand(30.0) == {"a": 3, "b": 1}
    assert rate.demand(65.0) == {"a": 2, "b": 1}, "claims older than the window no longer count"
    assert rate.demand(85.0) == {"b": 1}
    assert rate.demand(200.0) == {}, "a pool without claims is dropped, not kept at 0"


def test_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="window_s"):
        ClaimRate(window_s=0)


@pytest.mark.parametrize(
    ("floor", "demands", "ceiling", "expected"),
    [
        pytest.param(1, [], 20, 1, id="no-demand-floor"),
        pytest.param(1, [3, 2], 20, 6, id="floor-plus-every-activator"),
        pytest.param(1, [30], 20, 20, id="capped"),
        pytest.param(5, [1], 3, 5, id="floor-above-ceiling-wins"),
        pytest.param(0, [0, -4], 20, 0, id="negative-demand-ignored"),
    ],
)
def test_pool_replicas(floor: int, demands: list[int], ceiling: int, expected: int) -> None:
    assert pool_replicas(floor=floor, demands=demands, ceiling=ceiling) == expected


def test_pool_replicas_rejects_negative_bounds() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        pool_replicas(floor=-1, demands=[], ceiling=3)


@given(
    floor=st.integers(0, 50),
    demands=st.lists(st.integers(-5, 100), max_size=8),
    ceiling=st.integers(0, 100),
)
def test_pool_replicas_stays_between_floor_and_ceiling(floor: int, demands: list[int], ceiling: int) -> None:
    out = pool_replicas(floor=floor, demands=demands, ceiling=ceiling)
    assert out >= floor
    assert out <= max(floor, ceiling)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param('{"p1": 3, "p2": 1}', {"p1": 3, "p2": 1}, id="valid"),
        pytest.param(None, {}, id="absent"),
        pytest.param("", {}, id="empty"),
        pytest.param("not json", {}, id="garbled"),
        pytest.param("[1, 2]", {}, id="not-an-object"),
        pytest.param('{"p": "3", "q": true, "r": -1, "s": 0, "t": 99999999, "u": 2}', {"u": 2}, id="bad-counts"),
    ],
)
def test_decode_demand_treats_bad_input_as_no_demand(text: str | None, expected: dict[str, int]) -> None:
    assert decode_demand(text) == expected


@given(st.dictionaries(st.text(min_size=1, max_size=20), st.integers(1, 10_000), max_size=400))
def test_encode_demand_round_trips_and_stays_small(demand: dict[str, int]) -> None:
    text = encode_demand(demand)
    assert len(text) <= MAX_DEMAND_CHARS
    decoded = decode_demand(text)
    assert decoded.items() <= demand.items()
    if len(json.dumps(demand, separators=(",", ":"))) <= MAX_DEMAND_CHARS:
        assert decoded == demand
    elif decoded:
        assert min(decoded.values()) >= max(v for k, v in demand.items() if k not in decoded), "busiest kept"
