"""The operator against a real kube-apiserver tells users which fields they set in vain (issue #10).

A SecurityPolicy that sets a field accepted but not implemented yet gets `Unsupported=True` naming
it, and a Warning Event (`kubectl describe` shows both); a Function of implemented fields gets
`Unsupported=False` (no Function field is a gap in a cluster any more). Which fields are on the list is the unit tier's
(tests/unit/api/test_unsupported.py), as is the event-on-transition logic
(tests/unit/controller/test_reconcile.py).
"""

from __future__ import annotations

from typing import Any

from tests.apiserver.operator_harness import (  # the fixtures are used by name
    Ember,
    OperatorProcess,
    condition,
    crds,
    ember,
    eventually,
    hello_function,
    ns,
    operator,
)

__all__ = ["crds", "ember", "ns", "operator"]


def _condition_is(ember: Ember, plural: str, name: str, status: str) -> dict[str, Any] | None:
    obj = ember.get(plural, name)
    found = condition(obj, "Unsupported")
    if found.get("status") != status or found.get("observedGeneration") != (obj or {})["metadata"]["generation"]:
        return None
    return found


def test_function_setting_only_implemented_fields_is_all_supported(ember: Ember, operator: OperatorProcess) -> None:
    # every Function field works in a cluster now (state and freeze were the last, issue #15): the
    # condition says so; Unsupported=True on a Function is the unit tier's, over a gap list of its own
    spec = {"freeze": {"enabled": True, "idleSeconds": 5}, "state": {"keyValue": True}}
    ember.create("functions", hello_function(**spec))
    supported = eventually(
        lambda: _condition_is(ember, "functions", "hello", "False"), what="Function hello Unsupported=False"
    )
    assert supported["reason"] == "AllSupported"
    assert [e for e in ember.events("hello") if e.reason == "FieldsNotImplemented"] == []


def test_security_policy_setting_unimplemented_fields_is_unsupported(ember: Ember, operator: OperatorProcess) -> None:
    # services and trustLevel work (their fields are not reported); limits.pids does not for pods
    # without a kernel of their own (sandbox none: the agent's rlimit would count the node's uid)
    service = {"name": "db", "url": "https://db.example.com", "credentialsSecretRef": {"name": "db", "key": "token"}}
    unsandboxed = {"sandbox": "none", "allowUnsandboxed": True}
    spec = {"trustLevel": "trusted", "services": [service], "limits": {"pids": 64}, **unsandboxed}
    ember.create("securitypolicies", {"kind": "SecurityPolicy", "metadata": {"name": "p"}, "spec": spec})
    unsupported = eventually(
        lambda: _condition_is(ember, "securitypolicies", "p", "True"), what="SecurityPolicy p Unsupported=True"
    )
    assert unsupported["message"] == "spec.limits.pids is accepted but not implemented yet; it has no effect."
    eventually(
        lambda: any(e.type == "Warning" and e.reason == "FieldsNotImplemented" for e in ember.events("p")),
        what="a FieldsNotImplemented Event on the policy",
    )
