"""Condition helpers: transitions, Ready derived from dependents, phase derived (pure, clock injected)."""

from __future__ import annotations

import datetime as dt

import pytest

from ember.api.common import Condition
from ember.resources import conditions as c

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
T1 = T0 + dt.timedelta(minutes=5)


def test_transition_time_moves_only_when_status_changes() -> None:
    conds = c.mark_true([], c.CODE_READY, "A", "a", generation=1, now=T0)
    same = c.mark_true(conds, c.CODE_READY, "B", "b", generation=2, now=T1)
    (cond,) = same
    assert (cond.last_transition_time, cond.reason, cond.observed_generation) == (T0, "B", 2)
    flipped = c.mark_false(same, c.CODE_READY, "C", "c", generation=2, now=T1)
    assert flipped[0].last_transition_time == T1


def _conds(**statuses: str) -> list[Condition]:
    out: list[Condition] = []
    for type_, status in statuses.items():
        out = c.set_condition(
            out, type_=type_, status=status, reason=f"R{type_}", message=f"m {type_}", generation=1, now=T0
        )  # type: ignore[arg-type]
    return out


@pytest.mark.parametrize(
    ("statuses", "ready", "reason"),
    [
        pytest.param({"PolicyResolved": "True", "VersionReady": "True"}, "True", "Ready", id="all-true"),
        pytest.param({"PolicyResolved": "False", "VersionReady": "True"}, "False", "RPolicyResolved", id="one-false"),
        pytest.param(
            {"PolicyResolved": "Unknown", "VersionReady": "False"}, "False", "RVersionReady", id="false-beats-unknown"
        ),
        pytest.param({"PolicyResolved": "True"}, "Unknown", "Reconciling", id="missing-is-unknown"),
        pytest.param({"PolicyResolved": "True", "VersionReady": "Unknown"}, "Unknown", "RVersionReady", id="unknown"),
    ],
)
def test_ready_is_derived(statuses: dict[str, str], ready: str, reason: str) -> None:
    out = c.with_ready(_conds(**statuses), c.FUNCTION_DEPENDENTS, generation=1, now=T0)
    found = c.find(out, c.READY)
    assert found is not None
    assert (found.status, found.reason) == (ready, reason)
    assert out[0].type == c.READY


@pytest.mark.parametrize(
    ("generation", "observed", "expected"),
    [pytest.param(2, 2, True, id="current"), pytest.param(3, 2, False, id="stale-true-is-not-ready")],
)
def test_is_ready_requires_observed_generation(generation: int, observed: int, expected: bool) -> None:
    out = c.with_ready(_conds(PolicyResolved="True", VersionReady="True"), c.FUNCTION_DEPENDENTS, generation=1, now=T0)
    assert c.is_ready(out, generation=generation, observed_generation=observed) is expected


def test_version_phase_loading_when_code_is_there_but_not_ready() -> None:
    out = c.mark_true([], c.CODE_READY, "CodeStored", "x", generation=1, now=T0)
    out = c.mark_unknown(out, c.READY, "VersionLoading", "y", generation=1, now=T0)
    assert c.version_phase(out) == "Loading"


@pytest.mark.parametrize(
    ("statuses", "ready_reason", "phase"),
    [
        pytest.param({}, None, "Pending", id="nothing-known"),
        pytest.param({"CodeReady": "Unknown"}, None, "Pending", id="code-unknown"),
        pytest.param({"CodeReady": "True"}, None, "Loading", id="stored-not-loaded"),
        pytest.param({"CodeReady": "True", "Loaded": "True"}, None, "Ready", id="ready"),
        pytest.param({"CodeReady": "True", "Loaded": "False"}, "LoadFailed", "Failed", id="load-failed"),
        pytest.param({"CodeReady": "False"}, "InvalidSpec", "Failed", id="permanent-failure"),
        pytest.param({"CodeReady": "False"}, "CodeMissing", "Pending", id="transient-failure"),
    ],
)
def test_version_phase(statuses: dict[str, str], ready_reason: str | None, phase: str) -> None:
    out = c.with_ready(_conds(**statuses), c.VERSION_DEPENDENTS, generation=1, now=T0)
    if ready_reason is not None:
        out = c.mark_false(out, c.READY, ready_reason, "x", generation=1, now=T0)
    assert c.version_phase(out) == phase
