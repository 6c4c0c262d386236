"""Builders of API objects for the resource-builder tests."""

from __future__ import annotations

from typing import Any

import pytest

from ember.api.function import Function


def function_body(name: str = "hello", uid: str | None = "uid-1", **spec: Any) -> dict[str, Any]:
    """A stored Function's body with a minimal valid spec, overridden by `spec`."""
    base: dict[str, Any] = {"runtime": "python3.12", "handler": "main.handler", "code": {"inline": "x = 1\n"}}
    base.update(spec)
    meta: dict[str, Any] = {"name": name, "namespace": "ns1", "generation": 1}
    if uid is not None:
        meta["uid"] = uid
    return {"apiVersion": "ember.run/v1alpha1", "kind": "Function", "metadata": meta, "spec": base}


@pytest.fixture
def make_function() -> Any:
    def make(**kwargs: Any) -> Function:
        return Function.model_validate(function_body(**kwargs))

    return make
