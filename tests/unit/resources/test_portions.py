"""Portions, pure parts: which calls are declared, the trust order, the policies each portion gets,
and how the registry makes a Version's portions. Real calls between sandboxes are
tests/local/security/test_portions_local.py."""

from __future__ import annotations

from typing import Any

import pytest

from ember.activator.config import ActivatorConfig
from ember.activator.errors import FunctionNotFound
from ember.activator.metrics import Metrics
from ember.activator.registry import Registry
from ember.api.function import Function, FunctionSpec
from ember.api.security_policy import SecurityPolicySpec
from ember.resources.portions import MAIN, callees, may_call, portion_spec, resolve_portions

UNTRUSTED = SecurityPolicySpec(trust_level="untrusted")
STANDARD = SecurityPolicySpec(trust_level="standard")
TRUSTED = SecurityPolicySpec(trust_level="trusted")


def _spec(*portions: dict[str, Any], **extra: Any) -> FunctionSpec:
    return FunctionSpec.model_validate(
        {
            "runtime": "python3.12",
            "handler": "main.handler",
            "code": {"inline": "x"},
            "portions": list(portions),
            **extra,
        }
    )


def _portion(name: str, policy: str, *calls: str) -> dict[str, Any]:
    return {"name": name, "handler": f"main.{name}", "securityPolicyRef": {"name": policy}, "calls": list(calls)}


SHOP = _spec(_portion("parse", "low"), _portion("charge", "high", "audit"), _portion("audit", "mid"))


def test_the_handler_may_call_every_portion_a_portion_only_what_it_declares() -> None:
    assert callees(SHOP, MAIN) == ("parse", "charge", "audit")
    assert callees(SHOP, "charge") == ("audit",)
    assert callees(SHOP, "parse") == ()
    assert callees(SHOP, "nosuch") == ()


@pytest.mark.parametrize(
    ("caller", "callee", "allowed"),
    [
        ("trusted", "untrusted", True),
        ("trusted", "trusted", True),
        ("standard", "untrusted", True),
        ("standard", "trusted", False),
        ("untrusted", "standard", False),
        ("untrusted", "untrusted", True),
    ],
)
def test_calls_never_go_up_in_trust(caller: str, callee: str, allowed: bool) -> None:
    assert may_call(caller, callee) is allowed


def _resolve(spec: FunctionSpec, main: SecurityPolicySpec, **found: SecurityPolicySpec) -> list[str]:
    return resolve_portions(
        spec, namespace="shop", main_policy=main, main_policy_name="main", lookup=found.get
    ).problems


def test_a_shop_in_trust_order_resolves() -> None:
    resolved = resolve_portions(
        SHOP,
        namespace="shop",
        main_policy=TRUSTED,
        main_policy_name="main",
        lookup={"low": UNTRUSTED, "high": TRUSTED, "mid": STANDARD}.get,
    )
    assert resolved.problems == []
    assert resolved.policies == {"parse": UNTRUSTED, "charge": TRUSTED, "audit": STANDARD}
    assert resolved.names == {"parse": "low", "charge": "high", "audit": "mid"}


def test_a_call_up_in_trust_is_refused_naming_both_ends() -> None:
    problems = _resolve(SHOP, STANDARD, low=UNTRUSTED, high=TRUSTED, mid=STANDARD)
    assert problems == [
        "the Function's handler (standard, SecurityPolicy 'main') may not call portion 'charge' "
        "(trusted, SecurityPolicy 'high'): a call goes only to portions at the caller's trustLevel or below"
    ]
    up = _spec(_portion("parse", "low", "charge"), _portion("charge", "high"))
    [problem] = _resolve(up, TRUSTED, low=UNTRUSTED, high=TRUSTED)
    assert problem.startswith("portion 'parse' (untrusted, SecurityPolicy 'low') may not call portion 'charge'")


def test_a_missing_policy_and_a_portion_over_its_limits_are_named() -> None:
    small = SecurityPolicySpec.model_validate({"limits": {"maxMemoryMiB": 128}})
    spec = _spec(_portion("parse", "small"), _portion("charge", "gone"), resources={"memoryMiB": 256})
    problems = _resolve(spec, TRUSTED, small=small)
    assert problems == [
        "portion 'parse': spec.resources.memoryMiB (256) exceeds limits.maxMemoryMiB (128) of SecurityPolicy 'small'",
        "spec.portions[1].securityPolicyRef: SecurityPolicy 'gone' (portion 'charge') does not exist "
        "in namespace 'shop'",
    ]


def test_a_portion_runs_the_functions_code_with_its_own_handler_and_nothing_from_outside() -> None:
    spec = _spec(
        _portion("parse", "low"),
        env={"A": "1"},
        traffic=[{"version": 1, "percent": 100}],
        scaling={"minScale": 2},
        http={"routes": [{"path": "/x"}]},
    )
    part = portion_spec(spec, spec.portions[0])
    assert (part.handler, part.env, part.code) == ("main.parse", {"A": "1"}, spec.code)
    assert part.security_policy_ref is not None
    assert part.security_policy_ref.name == "low"
    assert (part.portions, part.traffic, part.http, part.scaling.min_scale) == ([], [], None, 0)


# -- the registry: a Version and its portions


def _fn(spec: FunctionSpec) -> Function:
    return Function.model_validate({"metadata": {"name": "shop"}, "spec": spec.model_dump(by_alias=True)})


def test_a_version_owns_one_state_per_portion_linked_as_declared() -> None:
    registry = Registry(ActivatorConfig(), Metrics())
    policies = {"parse": UNTRUSTED, "charge": TRUSTED, "audit": STANDARD}
    vs = registry.apply(_fn(SHOP), policy=TRUSTED, portion_policies=policies)
    assert vs is not None
    assert sorted(vs.portions) == ["audit", "charge", "parse"]
    assert sorted(vs.callees) == ["audit", "charge", "parse"]
    charge = vs.portions["charge"]
    assert list(charge.callees) == ["audit"]
    assert vs.portions["parse"].callees == {}
    assert (charge.key.function, charge.key.number, charge.key.portion) == ("shop", 1, "charge")
    assert (charge.fs.label, charge.trust_level) == ("default/shop.charge", "trusted")
    assert charge.spec.handler == "main.charge"
    # pools: the caller's pods get a channel for calls, the parser's none
    assert vs.pool.calls
    assert charge.pool.calls
    assert not vs.portions["parse"].pool.calls
    assert vs.pool.policy_hash != vs.portions["parse"].pool.policy_hash
    # the scaler sees every part; only the Function is reachable from outside
    assert len(registry.all_versions()) == 4
    with pytest.raises(FunctionNotFound):
        registry.route("default", "shop.charge", None)
    assert registry.route("default", "shop", None) is vs


def test_a_portions_policy_change_makes_a_new_version() -> None:
    registry = Registry(ActivatorConfig(), Metrics())
    policies = {"parse": UNTRUSTED, "charge": TRUSTED, "audit": STANDARD}
    first = registry.apply(_fn(SHOP), policy=TRUSTED, portion_policies=policies)
    assert registry.apply(_fn(SHOP), policy=TRUSTED, portion_policies=policies) is None
    stricter = {**policies, "parse": SecurityPolicySpec.model_validate({"limits": {"pids": 32}})}
    second = registry.apply(_fn(SHOP), policy=TRUSTED, portion_policies=stricter)
    assert first is not None
    assert second is not None
    assert second.key.number == 2
    assert second.portions["parse"].pool != first.portions["parse"].pool
    assert second.portions["charge"].pool == first.portions["charge"].pool  # same pool, a state of its own
    assert second.portions["charge"] is not first.portions["charge"]


def test_removing_the_function_fails_its_portions_waiters() -> None:
    registry = Registry(ActivatorConfig(), Metrics())
    vs = registry.apply(_fn(SHOP), policy=TRUSTED, portion_policies={"parse": UNTRUSTED})
    assert vs is not None
    assert list(vs.portions) == ["parse"]  # the others have no policy: not made, calls to them fail
    registry.remove("default", "shop")
    assert vs.portions["parse"].fs.removed
