"""A Function's volume claim reconciled (tables): the claim before, then the writes, the
`StateVolumeReady` condition and the Events after, with an injected refusal to resize; and the
pools of a Function with a volume, which mount its claim and have the id the activators compute.

Against `FakeKube` taught PersistentVolumeClaims; a real API server and kubelet bind and mount
one in tests/cluster/test_state_volume_cluster.py.
"""

from __future__ import annotations

import copy
import datetime as dt
from dataclasses import dataclass, field
from typing import Any

import pytest

from ember.activator.catalog import plan
from ember.api.function import Function
from ember.controller.function import reconcile_function
from ember.controller.kube import KubeError
from ember.controller.settings import Settings
from ember.controller.state_volume import ensure_state_claim
from ember.pods.kubernetes import pool_id_of
from ember.resources import labels
from ember.resources.state_volume import STATE_VOLUME_READY, Reason
from tests.unit.controller.fake_kube import FakeKube

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
NS = "ns1"
CLAIM = "ember-state-notes"
Obj = dict[str, Any]


@dataclass
class ClaimKube(FakeKube):
    """`FakeKube` with PersistentVolumeClaims."""

    claims: dict[tuple[str, str], Obj] = field(default_factory=dict)

    async def get_persistent_volume_claim(self, namespace: str, name: str) -> Obj | None:
        self._check("get_persistent_volume_claim")
        return copy.deepcopy(self.claims.get((namespace, name)))

    async def create_persistent_volume_claim(self, body: Obj) -> None:
        self._check("create_persistent_volume_claim")
        self.writes.append(f"create pvc/{body['metadata']['name']}")
        stored = self._stored(body)
        stored["status"] = {"phase": "Pending"}
        self.claims[(body["metadata"]["namespace"], body["metadata"]["name"])] = stored

    async def patch_persistent_volume_claim(self, namespace: str, name: str, patch: Obj) -> None:
        self._check("patch_persistent_volume_claim")
        self.writes.append(f"patch pvc/{name} {sorted(patch)}")
        stored = self.claims[(namespace, name)]
        if "spec" in patch:
            stored["spec"]["resources"] = patch["spec"]["resources"]
        if "metadata" in patch:
            stored["metadata"].update(patch["metadata"])


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str]] = []

    def __call__(self, obj: Any, *, type: str, reason: str, message: str) -> None:
        self.seen.append((type, reason))


def _fn(volume: Obj | None = None, *, uid: str = "uid-fn") -> Obj:
    spec: Obj = {"runtime": "python3.12", "handler": "main.handler", "code": {"inline": "x = 1\n"}}
    if volume is not None:
        spec["state"] = {"volume": volume}
    meta = {"name": "notes", "namespace": NS, "uid": uid, "generation": 1}
    return {"apiVersion": "ember.run/v1alpha1", "kind": "Function", "metadata": meta, "spec": spec}


def _stored_claim(
    *,
    storage: str = "1Gi",
    phase: str = "Bound",
    storage_class: str = "rwx",
    owner_uid: str = "uid-fn",
    ours: bool = True,
) -> Obj:
    meta: Obj = {
        "name": CLAIM,
        "namespace": NS,
        "uid": "uid-claim",
        "resourceVersion": "1",
        "labels": {labels.MANAGED_BY: labels.MANAGER} if ours else {},
        "ownerReferences": [
            {
                "apiVersion": "ember.run/v1alpha1",
                "kind": "Function",
                "name": "notes",
                "uid": owner_uid,
                "controller": True,
            }
        ],
    }
    return {
        "metadata": meta,
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "storageClassName": storage_class,
            "resources": {"requests": {"storage": storage}},
        },
        "status": {"phase": phase, "capacity": {"storage": storage}},
    }


RWX_1G: Obj = {"sizeMiB": 1024, "storageClassName": "rwx"}


@pytest.mark.parametrize(
    ("volume", "before", "fail", "writes", "condition", "events"),
    [
        pytest.param(
            RWX_1G,
            None,
            None,
            [f"create pvc/{CLAIM}"],
            ("Unknown", Reason.PENDING),
            [("Normal", "StateVolumeCreated")],
            id="created-and-pending",
        ),
        pytest.param(RWX_1G, _stored_claim(), None, [], ("True", Reason.BOUND), [("Normal", Reason.BOUND)], id="bound"),
        pytest.param(
            {**RWX_1G, "sizeMiB": 2048},
            _stored_claim(),
            None,
            [f"patch pvc/{CLAIM} ['spec']"],
            ("True", Reason.BOUND),
            [("Normal", Reason.BOUND)],
            id="grows",
        ),
        pytest.param(
            {**RWX_1G, "sizeMiB": 2048},
            _stored_claim(phase="Pending"),
            None,
            [],
            ("Unknown", Reason.PENDING),
            [],
            id="an-unbound-claim-grows-once-bound",
        ),
        pytest.param(
            {**RWX_1G, "sizeMiB": 512},
            _stored_claim(),
            None,
            [],
            ("False", Reason.SIZE_NOT_APPLIED),
            [("Warning", Reason.SIZE_NOT_APPLIED)],
            id="never-shrinks",
        ),
        pytest.param(
            {**RWX_1G, "storageClassName": "fast"},
            _stored_claim(),
            None,
            [],
            ("False", Reason.STORAGE_CLASS_NOT_APPLIED),
            [("Warning", Reason.STORAGE_CLASS_NOT_APPLIED)],
            id="class-is-kept",
        ),
        pytest.param(
            {**RWX_1G, "sizeMiB": 2048},
            _stored_claim(),
            KubeError("patch", 403, "Forbidden"),
            [],
            ("False", Reason.RESIZE_REFUSED),
            [("Warning", Reason.RESIZE_REFUSED)],
            id="resize-refused",
        ),
        pytest.param(
            RWX_1G,
            _stored_claim(owner_uid="uid-old"),
            None,
            [f"patch pvc/{CLAIM} ['metadata']"],
            ("True", Reason.BOUND),
            [("Normal", Reason.BOUND)],
            id="a-predecessors-claim-is-adopted",
        ),
        pytest.param(
            RWX_1G,
            _stored_claim(ours=False),
            None,
            [],
            ("False", "NotOwned"),
            [],
            id="not-ours",
        ),
    ],
)
async def test_the_claim_follows_the_spec_as_far_as_a_claim_can_change(
    volume: Obj, before: Obj | None, fail: KubeError | None, writes: list[str], condition: tuple[str, str], events: Any
) -> None:
    kube = ClaimKube()
    if before is not None:
        kube.claims[(NS, CLAIM)] = before
    if fail is not None:
        kube.fail["patch_persistent_volume_claim"] = fail
    body = _fn(volume)
    record = Events()
    conditions, not_owned = await ensure_state_claim(
        kube,  # type: ignore[arg-type]
        Function.model_validate(body),
        [],
        body,
        record,
        generation=1,
        now=NOW,
    )
    assert kube.writes == writes
    (found,) = [c for c in conditions if c.type == STATE_VOLUME_READY]
    assert (found.status, found.reason) == condition
    assert record.seen == events
    assert [c.name for c in not_owned] == ([CLAIM] if condition[1] == "NotOwned" else [])
    if before is None:
        created = kube.claims[(NS, CLAIM)]
        assert created["spec"]["accessModes"] == ["ReadWriteMany"]
        assert created["spec"]["resources"]["requests"]["storage"] == "1024Mi"
        assert created["metadata"]["ownerReferences"][0]["uid"] == "uid-fn"


async def test_a_spec_without_its_volume_keeps_the_claim_and_drops_the_condition() -> None:
    kube = ClaimKube()
    kube.claims[(NS, CLAIM)] = _stored_claim()
    body = _fn(RWX_1G)
    record = Events()
    conditions, _ = await ensure_state_claim(
        kube,  # type: ignore[arg-type]
        Function.model_validate(body),
        [],
        body,
        record,
        generation=1,
        now=NOW,
    )
    plain = _fn()
    conditions, _ = await ensure_state_claim(
        kube,  # type: ignore[arg-type]
        Function.model_validate(plain),
        conditions,
        plain,
        record,
        generation=2,
        now=NOW,
    )
    assert [c.type for c in conditions] == []
    assert (NS, CLAIM) in kube.claims
    assert record.seen[-1] == ("Normal", "StateVolumeKept")


async def test_the_function_makes_its_claim_first_and_pools_that_mount_it() -> None:
    kube = ClaimKube()
    body = _fn({"mountPath": "/data"})
    record = Events()
    status = await reconcile_function(kube, Settings(), body, now=NOW, record=record)  # type: ignore[arg-type]
    creates = [w for w in kube.writes if w.startswith("create ")]
    assert creates[:2] == ["create versions/notes-v1", f"create pvc/{CLAIM}"]
    assert any(w.startswith("create deployment/ember-pool-") for w in creates)
    conditions = {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}
    assert conditions[STATE_VOLUME_READY] == ("Unknown", Reason.PENDING)
    (pool,) = kube.deployments.values()
    pod = pool["spec"]["template"]["spec"]
    assert {"name": "state", "persistentVolumeClaim": {"claimName": CLAIM}} in pod["volumes"]
    assert {"name": "state", "mountPath": "/data"} in pod["containers"][0]["volumeMounts"]

    # the activators' catalog names the same pool for the Version the operator made
    versions = {(NS, o["metadata"]["name"]): o for (p, _, _), o in kube.custom.items() if p == "versions"}
    wanted = plan({(NS, "notes"): body}, versions)
    (version,) = wanted.functions[(NS, "notes")].versions
    assert pool["metadata"]["labels"][labels.POOL] == pool_id_of(version.pool)
