"""The operator against a real kube-apiserver tells users which fields they set in vain (issue #10).

A Function or SecurityPolicy that sets a field accepted but not implemented yet gets
`Unsupported=True` naming it, and a Warning Event (`kubectl describe` shows both); removing the
field turns the condition False. Which fields are on the list is the unit tier's
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

FREEZE_MESSAGE = "spec.freeze is accepted but not implemented yet; it has no effect."


def _condition_is(ember: Ember, plural: str, name: str, status: str) -> dict[str, Any] | None:
    obj = ember.get(plural, name)
    found = condition(obj, "Unsupported")
    if found.get("status") != status or found.get("observedGeneration") != (obj or {})["metadata"]["generation"]:
        return None
    return found


def test_function_setting_freeze_is_unsupported_with_a_warning_event(ember: Ember, operator: OperatorProcess) -> None:
    ember.create("functions", hello_function(freeze={"enabled": True}))
    unsupported = eventually(
        lambda: _condition_is(ember, "functions", "hello", "True"), what="Function hello Unsupported=True"
    )
    assert (unsupported["reason"], unsupported["message"]) == ("FieldsNotImplemented", FREEZE_MESSAGE)
    ready = condition(ember.get("functions", "hello"), "Ready")
    assert ready.get("reason") != "FieldsNotImplemented", "Unsupported is not part of Ready"

    warnings = eventually(
        lambda: [e for e in ember.events("hello") if e.reason == "FieldsNotImplemented"],
        what="a FieldsNotImplemented Event",
    )
    assert [(e.type, e.message) for e in warnings] == [("Warning", FREEZE_MESSAGE)]

    ember.patch("functions", "hello", {"spec": {"freeze": None}})
    supported = eventually(
        lambda: _condition_is(ember, "functions", "hello", "False"), what="Function hello Unsupported=False"
    )
    assert supported["reason"] == "AllSupported"


def test_security_policy_setting_unimplemented_fields_is_unsupported(ember: Ember, operator: OperatorProcess) -> None:
    # services and trustLevel work (their fields are not reported); limits.pids does not in a cluster yet
    service = {"name": "db", "url": "https://db.example.com", "credentialsSecretRef": {"name": "db", "key": "token"}}
    spec = {"trustLevel": "trusted", "services": [service], "limits": {"pids": 64}}
    ember.create("securitypolicies", {"kind": "SecurityPolicy", "metadata": {"name": "p"}, "spec": spec})
    unsupported = eventually(
        lambda: _condition_is(ember, "securitypolicies", "p", "True"), what="SecurityPolicy p Unsupported=True"
    )
    assert unsupported["message"] == "spec.limits.pids is accepted but not implemented yet; it has no effect."
    eventually(
        lambda: any(e.type == "Warning" and e.reason == "FieldsNotImplemented" for e in ember.events("p")),
        what="a FieldsNotImplemented Event on the policy",
    )
