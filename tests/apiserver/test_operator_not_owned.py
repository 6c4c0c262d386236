"""The operator against a real kube-apiserver leaves alone a child it wants that is not Ember's (NotOwned).

A NetworkPolicy named `ember-fn-<function>` made by someone else (no label
`app.kubernetes.io/managed-by: ember-operator`) exists before the Function: the operator does not
touch it, reports `Ready=False, reason=NotOwned` naming it and a Warning Event, and makes its own
once it is gone. The other children (pool Deployment, pool NetworkPolicy) and the foreign-controller
case go through the same helper and are the unit tier's (tests/unit/controller/test_reconcile.py,
test_children.py).
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
    ready_function,
)

__all__ = ["crds", "ember", "ns", "operator"]

THEIRS = "ember-fn-hello"


def _not_owned(ember: Ember) -> dict[str, Any] | None:
    fn = ember.get("functions", "hello")
    ready = condition(fn, "Ready")
    return fn if (ready.get("status"), ready.get("reason")) == ("False", "NotOwned") else None


def test_a_network_policy_that_is_not_ours_is_left_alone_and_named(ember: Ember, operator: OperatorProcess) -> None:
    body = {
        "metadata": {"name": THEIRS, "labels": {"team": "a"}},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"]},
    }
    theirs = ember.net.create_namespaced_network_policy(ember.ns, body)
    ember.create("functions", hello_function())

    fn = eventually(lambda: _not_owned(ember), what="Function hello Ready=False NotOwned")
    message = condition(fn, "Ready")["message"]
    assert f"NetworkPolicy {THEIRS}" in message
    assert "app.kubernetes.io/managed-by=ember-operator" in message
    assert condition(fn, "EgressEnforced")["reason"] == "NotOwned", "Ember does not claim to limit egress"
    eventually(
        lambda: any(
            e.type == "Warning" and e.reason == "NotOwned" and THEIRS in e.message for e in ember.events("hello")
        ),
        what="a Warning NotOwned Event naming it",
    )
    ember.serve("hello", 1)
    fn = eventually(
        lambda: (f := _not_owned(ember)) and condition(f, "VersionReady").get("status") == "True" and f,
        what="Version 1 ready, the Function still NotOwned",
    )
    assert fn["status"]["observedGeneration"] == fn["metadata"]["generation"]
    stored = ember.net.read_namespaced_network_policy(THEIRS, ember.ns)
    assert stored.metadata.resource_version == theirs.metadata.resource_version, "untouched"
    assert stored.spec.policy_types == ["Ingress"]
    assert ember.pools(), "the rest is made as usual"

    ember.net.delete_namespaced_network_policy(THEIRS, ember.ns)
    ember.patch("functions", "hello", {"metadata": {"annotations": {"example.com/touched": "1"}}})
    eventually(lambda: ready_function(ember, "hello"), what="Function hello Ready once it is gone")
    ours = ember.net.read_namespaced_network_policy(THEIRS, ember.ns)
    assert ours.metadata.labels["app.kubernetes.io/managed-by"] == "ember-operator"
    assert ours.spec.policy_types == ["Egress"]
