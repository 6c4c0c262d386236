"""`ensure_child` alone: create, leave, replace when stale (keeping what another owner set), refuse what is not ours.

The reconciler tables (test_reconcile.py) cover how a Function reports a child that is not ours.
"""

from __future__ import annotations

from typing import Any, cast

import pytest

from ember.controller.children import (
    SPEC_HASH_ANNOTATION,
    Outcome,
    deployments,
    ensure_child,
    network_policies,
    not_ours,
)
from ember.controller.kube import Conflict
from tests.unit.controller.fake_kube import FakeKube

Obj = dict[str, Any]
NS = "ns1"
OURS = {"app.kubernetes.io/managed-by": "ember-operator"}


def _netpol(egress: list[Obj], *, owner_uid: str = "fn-uid") -> Obj:
    owner = {"apiVersion": "ember.run/v1alpha1", "kind": "Function", "name": "hello", "uid": owner_uid}
    return {
        "metadata": {
            "name": "np",
            "namespace": NS,
            "labels": dict(OURS),
            "ownerReferences": [owner | {"controller": True}],
        },
        "spec": {"egress": egress},
    }


async def test_created_then_left_alone_then_replaced_when_its_spec_changes() -> None:
    kube = FakeKube()
    api = network_policies(cast(Any, kube))
    created = await ensure_child(api, _netpol([]))
    assert (created.outcome, created.uid) == (Outcome.CREATED, "uid-np")
    assert SPEC_HASH_ANNOTATION in kube.network_policies[(NS, "np")]["metadata"]["annotations"]
    assert (await ensure_child(api, _netpol([]))).outcome is Outcome.UNCHANGED
    replaced = await ensure_child(api, _netpol([{"to": []}]))
    assert (replaced.outcome, replaced.uid) == (Outcome.REPLACED, "uid-np")
    assert kube.network_policies[(NS, "np")]["spec"] == {"egress": [{"to": []}]}
    assert kube.writes == ["create networkpolicy/np", "replace networkpolicy/np"]


async def test_a_merge_keeps_what_another_owner_set_and_a_concurrent_change_conflicts() -> None:
    kube = FakeKube()
    api = deployments(cast(Any, kube))
    desired: Obj = {"metadata": {"name": "pool", "namespace": NS, "labels": dict(OURS)}, "spec": {"replicas": 1}}
    await ensure_child(api, desired | {"spec": {"replicas": 1, "template": "a"}}, compared="a")
    kube.deployments[(NS, "pool")]["spec"]["replicas"] = 5  # pool_size's

    def keep_replicas(actual: Obj, wanted: Obj) -> Obj:
        return {**wanted, "spec": {**wanted["spec"], "replicas": actual["spec"]["replicas"]}}

    changed = await ensure_child(
        api, desired | {"spec": {"replicas": 1, "template": "b"}}, compared="b", merge=keep_replicas
    )
    assert changed.outcome is Outcome.REPLACED
    assert kube.deployments[(NS, "pool")]["spec"] == {"replicas": 5, "template": "b"}

    real_get = kube.get_deployment

    async def stale_get(namespace: str, name: str) -> Obj | None:
        found = await real_get(namespace, name)
        assert found is not None
        found["metadata"]["resourceVersion"] = "0"  # someone wrote it since
        return found

    kube.get_deployment = stale_get  # type: ignore[method-assign]
    with pytest.raises(Conflict):
        await ensure_child(deployments(cast(Any, kube)), desired | {"spec": {"template": "c"}}, compared="c")


def _ref(kind: str, name: str, *, api_version: str = "ember.run/v1alpha1", controller: bool = True) -> Obj:
    return {"apiVersion": api_version, "kind": kind, "name": name, "uid": "x", "controller": controller}


@pytest.mark.parametrize(
    ("labels", "owners", "wanted", "problem"),
    [
        pytest.param(OURS, [], None, None, id="ours-without-controller"),
        pytest.param(OURS, [_ref("Function", "a", controller=False)], None, None, id="ours-with-sharing-owners"),
        pytest.param(OURS, [_ref("Function", "hello")], ("ember.run", "Function", "hello"), None, id="ours"),
        pytest.param({}, [], None, "no label app.kubernetes.io/managed-by=ember-operator", id="unlabelled"),
        pytest.param({"app.kubernetes.io/managed-by": "helm"}, [], None, "no label", id="managed-by-someone-else"),
        pytest.param(
            OURS, [_ref("Tenant", "t")], None, "controlled by Tenant t", id="a-controller-where-none-is-wanted"
        ),
        pytest.param(
            OURS, [_ref("Function", "other")], ("ember.run", "Function", "hello"), "Function other", id="other-function"
        ),
        pytest.param(
            OURS,
            [_ref("Function", "hello", api_version="fission.io/v1")],
            ("ember.run", "Function", "hello"),
            "Function hello",
            id="same-name-other-group",
        ),
    ],
)
def test_not_ours(
    labels: dict[str, str], owners: list[Obj], wanted: tuple[str, str, str] | None, problem: str | None
) -> None:
    found = not_ours(
        "NetworkPolicy", {"metadata": {"name": "np", "labels": labels, "ownerReferences": owners}}, controller=wanted
    )
    if problem is None:
        assert found is None
    else:
        assert found is not None
        assert found.startswith("NetworkPolicy np exists and is not Ember's")
        assert problem in found
