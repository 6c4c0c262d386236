"""Qualifier and traffic resolution (pure); the Version lifecycle with real pods is in tests/local/activator."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.activator.errors import FunctionNotFound, NotReady
from ember.activator.traffic import AliasTarget, Split, Targets, latest_serving, resolve

KNOWN = {1: True, 2: True, 3: True}


def _resolve(qualifier: str | None, **kw: object) -> Targets:
    args: dict[str, object] = {"function": "default/f", "known": KNOWN, "latest": 3, "traffic": (), "aliases": {}}
    args.update(kw)
    return resolve(qualifier, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize("qualifier", [None, "", "$LATEST", "latest"])
def test_unqualified_and_latest_go_to_latest(qualifier: str | None) -> None:
    assert _resolve(qualifier).versions == (3,)


def test_version_number_and_alias() -> None:
    assert _resolve("2").versions == (2,)
    assert _resolve("live", aliases={"live": AliasTarget(1)}).versions == (1,)


def test_alias_with_weight_splits() -> None:
    targets = _resolve("live", aliases={"live": AliasTarget(1, 2, 10)})
    assert targets.pick(5.0) == 1
    assert targets.pick(95.0) == 2
    picks = [targets.pick(d / 10) for d in range(1000)]
    assert picks.count(2) == 100


def test_traffic_split_with_latest_entry() -> None:
    targets = _resolve(None, traffic=(Split(1, 25), Split(None, 75)))
    assert targets.versions == (1, 3)
    assert targets.pick(24.9) == 1
    assert targets.pick(25.0) == 3


@pytest.mark.parametrize(
    ("qualifier", "message"),
    [
        pytest.param("9", "no Version 9", id="unknown-version"),
        pytest.param("nope", "no alias or Version 'nope'", id="unknown-alias"),
    ],
)
def test_unknown_qualifiers_are_not_found(qualifier: str, message: str) -> None:
    with pytest.raises(FunctionNotFound, match=message):
        _resolve(qualifier)


def test_latest_is_newest_ready_else_newest_loading() -> None:
    assert latest_serving([1, 2], [3], "f") == 2
    assert latest_serving([], [1, 2], "f") == 2
    with pytest.raises(NotReady, match="no Version that can serve"):
        latest_serving([], [], "f")


def test_all_zero_weights_cannot_serve() -> None:
    with pytest.raises(NotReady, match="weight 0"):
        _resolve(None, traffic=(Split(1, 0), Split(2, 0)))


@given(
    weights=st.lists(st.integers(0, 100), min_size=1, max_size=5).filter(lambda ws: sum(ws) > 0),
    draw=st.floats(0, 99.999),
)
def test_pick_always_returns_a_weighted_target(weights: list[int], draw: float) -> None:
    traffic = tuple(Split(i + 1, w) for i, w in enumerate(weights))
    targets = _resolve(None, traffic=traffic, known={i + 1: True for i in range(len(weights))})
    chosen = targets.pick(draw)
    assert weights[chosen - 1] > 0
