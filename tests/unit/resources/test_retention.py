"""Which Versions are kept: referenced by traffic or aliases, the ready one, plus the last N."""

from __future__ import annotations

from typing import Any

import pytest

from ember.api.function import FunctionSpec
from ember.resources.retention import versions_to_delete

BASE: dict[str, Any] = {"runtime": "python3.12", "handler": "main.handler", "code": {"inline": "x"}}


@pytest.mark.parametrize(
    ("extra", "existing", "keep_last", "ready", "deleted"),
    [
        pytest.param({}, [1, 2, 3, 4, 5], 2, 5, [1, 2, 3], id="last-n-only"),
        pytest.param({}, [1, 2, 3, 4, 5], 2, 2, [1, 3], id="ready-version-kept-while-newer-load"),
        pytest.param({"traffic": [{"version": 1, "percent": 100}]}, [1, 2, 3, 4], 1, 4, [2, 3], id="traffic-pin"),
        pytest.param(
            {"traffic": [{"version": 2, "percent": 90}, {"latest": True, "percent": 10}]},
            [1, 2, 3, 4],
            1,
            3,
            [1],
            id="traffic-split-with-latest",
        ),
        pytest.param(
            {"traffic": [{"version": 2, "percent": 100}]}, [1, 2, 3, 4], 1, 3, [1, 3], id="pinned-ignores-ready"
        ),
        pytest.param(
            {"aliases": {"prod": {"version": 1, "additionalVersion": 2, "additionalWeight": 10}}},
            [1, 2, 3, 4, 5],
            1,
            5,
            [3, 4],
            id="alias-and-canary",
        ),
        pytest.param({}, [7], 1, None, [], id="single-version-never-deleted"),
        pytest.param({}, [], 3, None, [], id="nothing-exists"),
        pytest.param({"traffic": [{"version": 9, "percent": 100}]}, [1, 2], 1, 2, [1], id="reference-to-missing"),
    ],
)
def test_versions_to_delete(
    extra: dict[str, Any], existing: list[int], keep_last: int, ready: int | None, deleted: list[int]
) -> None:
    spec = FunctionSpec.model_validate({**BASE, **extra})
    assert versions_to_delete(spec, existing, keep_last=keep_last, ready_version=ready) == deleted


@pytest.mark.parametrize("keep_last", [pytest.param(0, id="zero"), pytest.param(-1, id="negative")])
def test_keep_last_below_one_is_rejected(keep_last: int) -> None:
    spec = FunctionSpec.model_validate(BASE)
    with pytest.raises(ValueError, match="keep_last must be at least 1"):
        versions_to_delete(spec, [1, 2], keep_last=keep_last, ready_version=None)
