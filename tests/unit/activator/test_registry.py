"""Versions in the registry: numbering, what makes a new Version, where traffic goes while one loads or fails.

Pure state (no pods, no sockets); pods arriving and the scaler are exercised in tests/local/activator.
"""

from __future__ import annotations

import pytest

from ember.activator.config import ActivatorConfig
from ember.activator.errors import FunctionNotFound, NotReady
from ember.activator.metrics import Metrics
from ember.activator.registry import Registry
from ember.activator.version_state import Phase
from ember.api.function import Function
from ember.api.security_policy import SecurityPolicySpec


def _fn(code: str = "def handler(e, c): return 1", **spec: object) -> Function:
    return Function.model_validate(
        {
            "metadata": {"name": "f"},
            "spec": {"runtime": "python3.12", "handler": "main.handler", "code": {"inline": code}, **spec},
        }
    )


@pytest.fixture
def registry() -> Registry:
    return Registry(ActivatorConfig(), Metrics())


def test_new_code_makes_a_new_numbered_version(registry: Registry) -> None:
    first = registry.apply(_fn())
    assert first is not None
    assert first.key.number == 1
    assert registry.apply(_fn()) is None  # unchanged: no Version
    second = registry.apply(_fn("def handler(e, c): return 2"))
    assert second is not None
    assert second.key.number == 2
    assert first.code_hash != second.code_hash


def test_scaling_and_alias_changes_make_no_version(registry: Registry) -> None:
    registry.apply(_fn())
    assert registry.apply(_fn(scaling={"maxScale": 3, "keepAliveSeconds": 5})) is None
    assert registry.apply(_fn(scaling={"maxScale": 3}, aliases={"live": {"version": 1}})) is None
    version = registry.get("default", "f").versions[1]
    assert version.autoscaler.params.max_scale == 3


def test_a_different_policy_makes_a_new_version(registry: Registry) -> None:
    registry.apply(_fn())
    again = registry.apply(_fn(), policy=SecurityPolicySpec(trust_level="trusted"))
    assert again is not None
    assert again.pool.policy_hash != registry.get("default", "f").versions[1].pool.policy_hash


def test_latest_stays_on_ready_version_until_the_new_one_is_ready(registry: Registry) -> None:
    v1 = registry.apply(_fn())
    assert v1 is not None
    assert registry.route("default", "f", None) is v1  # never ready yet: the loading one queues
    v1.mark_ready()
    v2 = registry.apply(_fn("def handler(e, c): return 2"))
    assert v2 is not None
    assert v2.initial_target >= 1
    assert registry.route("default", "f", None) is v1
    assert registry.get("default", "f").referenced() == {1, 2}
    v2.mark_ready()
    assert registry.route("default", "f", None) is v2
    assert registry.get("default", "f").referenced() == {2}


def test_failed_version_leaves_traffic_and_is_named(registry: Registry) -> None:
    v1 = registry.apply(_fn())
    assert v1 is not None
    v1.mark_ready()
    v2 = registry.apply(_fn("def handler(e, c): return 2"))
    assert v2 is not None
    v2.mark_failed("ImportError: no module named x")
    assert registry.route("default", "f", None) is v1
    with pytest.raises(NotReady, match="Version 2 failed to load: ImportError"):
        registry.route("default", "f", "2")


def test_code_that_cannot_be_sent_fails_the_version_at_once(registry: Registry) -> None:
    fn = Function.model_validate(
        {
            "metadata": {"name": "f"},
            "spec": {"runtime": "python3.12", "handler": "main.handler", "code": {"configMapRef": {"name": "cm"}}},
        }
    )
    version = registry.apply(fn)
    assert version is not None
    assert version.phase is Phase.FAILED
    assert "only available in a cluster" in version.message
    with pytest.raises(NotReady):
        registry.route("default", "f", None)


def test_removed_function_is_not_found(registry: Registry) -> None:
    registry.apply(_fn())
    registry.remove("default", "f")
    with pytest.raises(FunctionNotFound, match="function default/f not found"):
        registry.route("default", "f", None)
    with pytest.raises(FunctionNotFound):
        registry.route("default", "other", None)
