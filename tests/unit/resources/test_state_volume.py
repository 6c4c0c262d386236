"""`spec.state.volume` → the Function's PersistentVolumeClaim, the pool that mounts it, what of a
stored claim can change and the condition about it (pure).

The reconcile against a fake API is tests/unit/controller/test_state_volume_reconcile.py; local
mode's folders tests/local/activator/test_state_volume.py; a real claim
tests/cluster/test_state_volume_cluster.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from ember.api.function import FunctionSpec, StateVolume
from ember.api.security_policy import SecurityPolicySpec, policy_hash
from ember.pods.kubernetes import pool_id_of
from ember.pods.payload import pool_key
from ember.resources.pool import PoolSpec, pool_deployment
from ember.resources.portions import portion_spec
from ember.resources.state_volume import (
    Reason,
    StateMount,
    claim_condition,
    claim_update,
    quantity_bytes,
    state_claim,
    state_claim_name,
    state_mount,
)

GVISOR = SecurityPolicySpec()
MOUNT = StateMount(namespace="ns1", function="notes", mount_path="/mnt/state")


def _pool(volume: StateMount | None) -> PoolSpec:
    return PoolSpec(
        namespace="ns1",
        runtime="python3.12",
        memory_mib=256,
        policy=GVISOR,
        policy_hash=policy_hash(GVISOR),
        image="registry.example/ember-python3.12:1",
        replicas=2,
        volume=volume,
    )


def _claim(*, phase: str = "Bound", storage: str = "1Gi", storage_class: str | None = "rwx") -> dict[str, Any]:
    spec: dict[str, Any] = {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": storage}}}
    if storage_class is not None:
        spec["storageClassName"] = storage_class
    return {
        "metadata": {"name": "ember-state-notes"},
        "spec": spec,
        "status": {"phase": phase, "capacity": {"storage": storage}} if phase == "Bound" else {"phase": phase},
    }


def test_the_claim_is_readwritemany_of_the_asked_size_and_class_owned_by_the_function() -> None:
    volume = StateVolume(sizeMiB=512, storageClassName="shared")
    claim = state_claim(volume, namespace="ns1", function="notes", function_uid="uid-1")
    assert claim["metadata"]["name"] == "ember-state-notes"
    assert claim["metadata"]["namespace"] == "ns1"
    assert claim["metadata"]["labels"]["ember.run/function"] == "notes"
    assert claim["metadata"]["labels"]["ember.run/component"] == "state"
    (owner,) = claim["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"], owner["controller"]) == ("Function", "notes", "uid-1", True)
    assert claim["spec"] == {
        "accessModes": ["ReadWriteMany"],
        "volumeMode": "Filesystem",
        "resources": {"requests": {"storage": "512Mi"}},
        "storageClassName": "shared",
    }


def test_without_a_storage_class_the_claim_takes_the_clusters_default() -> None:
    claim = state_claim(StateVolume(), namespace="ns1", function="notes", function_uid="uid-1")
    assert "storageClassName" not in claim["spec"]
    assert claim["spec"]["resources"]["requests"]["storage"] == "1024Mi"


def test_the_claim_name_of_the_longest_function_name_is_a_dns_label() -> None:
    name = state_claim_name("f" * 40)
    assert len(name) <= 63
    with pytest.raises(ValueError, match="no valid claim name"):
        state_claim_name("f" * 60)


def test_pods_of_a_pool_with_a_volume_mount_its_claim_read_write_and_stay_restricted() -> None:
    pod = pool_deployment(_pool(MOUNT))["spec"]["template"]["spec"]
    assert {"name": "state", "persistentVolumeClaim": {"claimName": "ember-state-notes"}} in pod["volumes"]
    (container,) = pod["containers"]
    assert {"name": "state", "mountPath": "/mnt/state"} in container["volumeMounts"]
    assert all(not m.get("readOnly") for m in container["volumeMounts"])
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["fsGroupChangePolicy"] == "OnRootMismatch"
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    plain = pool_deployment(_pool(None))["spec"]["template"]["spec"]
    assert [v["name"] for v in plain["volumes"]] == ["tmp", "code"]
    assert "fsGroupChangePolicy" not in plain["securityContext"]


def test_a_function_with_a_volume_has_pools_of_its_own() -> None:
    other = StateMount(namespace="ns1", function="other", mount_path="/mnt/state")
    elsewhere = StateMount(namespace="ns1", function="notes", mount_path="/data")
    ids = {_pool(None).id, _pool(MOUNT).id, _pool(other).id, _pool(elsewhere).id}
    assert len(ids) == 4
    assert _pool(MOUNT).id == _pool(StateMount("ns1", "notes", "/mnt/state")).id


def test_the_activator_and_the_operator_name_the_same_pool() -> None:
    spec = FunctionSpec.model_validate(
        {
            "runtime": "python3.12",
            "handler": "main.handler",
            "code": {"inline": "x = 1"},
            "resources": {"memoryMiB": 256},
            "state": {"volume": {"mountPath": "/mnt/state"}},
        }
    )
    key = pool_key(spec, GVISOR, namespace="ns1", function="notes")
    assert key.volume == state_mount(spec.state.volume if spec.state else None, namespace="ns1", function="notes")
    assert pool_id_of(key) == _pool(MOUNT).id
    with pytest.raises(ValueError, match="needs its Function's namespace and name"):
        pool_key(spec, GVISOR)


@pytest.mark.parametrize(
    ("quantity", "expected"),
    [("1Gi", 2**30), ("512Mi", 2**29), ("1G", 10**9), ("1073741824", 2**30), ("1.5Gi", 3 * 2**29), ("1e3", 1000)],
)
def test_storage_quantities_are_read(quantity: str, expected: int) -> None:
    assert quantity_bytes(quantity) == expected


def test_an_unreadable_quantity_is_none() -> None:
    assert quantity_bytes("lots") is None


@pytest.mark.parametrize(
    ("size_mib", "storage_class", "storage", "reasons"),
    [
        pytest.param(1024, "rwx", None, [], id="as-asked"),
        pytest.param(2048, "rwx", "2048Mi", [], id="grows"),
        pytest.param(512, "rwx", None, [Reason.SIZE_NOT_APPLIED], id="never-shrinks"),
        pytest.param(1024, "fast", None, [Reason.STORAGE_CLASS_NOT_APPLIED], id="class-is-immutable"),
        pytest.param(1024, None, None, [], id="no-class-asked"),
    ],
)
def test_what_of_the_spec_a_stored_claim_takes(
    size_mib: int, storage_class: str | None, storage: str | None, reasons: list[str]
) -> None:
    update = claim_update(_claim(), StateVolume(sizeMiB=size_mib, storageClassName=storage_class))
    assert update.storage == storage
    assert [reason for reason, _ in update.problems] == reasons


def test_a_smaller_size_says_the_claim_cannot_shrink() -> None:
    update = claim_update(_claim(), StateVolume(sizeMiB=512, storageClassName="rwx"))
    status, reason, message = claim_condition(_claim(), update, mount_path="/mnt/state")
    assert (status, reason) == ("False", Reason.SIZE_NOT_APPLIED)
    assert "spec.state.volume.sizeMiB (512) is below the 1Gi" in message
    assert "cannot shrink" in message


@pytest.mark.parametrize(
    ("phase", "status", "reason"),
    [
        pytest.param("Bound", "True", Reason.BOUND, id="bound"),
        pytest.param("Pending", "Unknown", Reason.PENDING, id="pending"),
        pytest.param("Lost", "False", Reason.LOST, id="lost"),
    ],
)
def test_the_condition_follows_the_claims_phase(phase: str, status: str, reason: str) -> None:
    claim = _claim(phase=phase)
    update = claim_update(claim, StateVolume(storageClassName="rwx"))
    got = claim_condition(claim, update, mount_path="/mnt/state")
    assert got[:2] == (status, reason)
    assert "ember-state-notes" in got[2]


def test_a_pending_claim_says_the_pods_wait_for_it() -> None:
    claim = _claim(phase="Pending")
    _, _, message = claim_condition(claim, claim_update(claim, StateVolume()), mount_path="/mnt/state")
    assert "StorageClass rwx" in message
    assert "warm pods stay Pending" in message


def test_a_refused_resize_is_reported() -> None:
    update = claim_update(_claim(), StateVolume(sizeMiB=4096, storageClassName="rwx"))
    status, reason, message = claim_condition(
        _claim(), update, mount_path="/mnt/state", resize_error="API server answered 403 Forbidden"
    )
    assert (status, reason) == ("False", Reason.RESIZE_REFUSED)
    assert "could not grow to 4096Mi" in message


@pytest.mark.parametrize(
    ("mount_path", "words"),
    [
        pytest.param("/tmp", "collides with /tmp", id="tmp"),
        pytest.param("/tmp/state", "collides with /tmp", id="in-tmp"),
        pytest.param("/var/ember/code", "collides with /var/ember/code, the code directory", id="code"),
        pytest.param("/var", "collides with /var/ember/code", id="above-code"),
        pytest.param("/opt/ember/x", "the runtime agent", id="agent"),
        pytest.param("/proc", "a system folder", id="proc"),
        pytest.param("/", "must be an absolute path, not '/'", id="root"),
        pytest.param("/mnt/state/", "no trailing '/'", id="trailing-slash"),
        pytest.param("/mnt/../tmp", "do not start with '.'", id="dot-dot"),
        pytest.param("mnt", "should match pattern '^/'", id="relative"),
    ],
)
def test_a_mount_path_that_collides_is_refused(mount_path: str, words: str) -> None:
    with pytest.raises(ValidationError, match="mountPath") as err:
        StateVolume(mountPath=mount_path)
    assert words in str(err.value)


@pytest.mark.parametrize("mount_path", ["/mnt/state", "/data", "/var/ember/state", "/srv/files.d"])
def test_a_free_mount_path_is_taken(mount_path: str) -> None:
    assert StateVolume(mountPath=mount_path).mount_path == mount_path


def test_the_pods_of_a_portion_mount_the_functions_volume_too() -> None:
    spec = FunctionSpec.model_validate(
        {
            "runtime": "python3.12",
            "handler": "main.handler",
            "code": {"inline": "x = 1"},
            "state": {"volume": {"mountPath": "/mnt/state"}},
            "portions": [{"name": "parse", "handler": "main.parse", "securityPolicyRef": {"name": "strict"}}],
        }
    )
    portion = portion_spec(spec, spec.portions[0])
    assert pool_key(portion, GVISOR, namespace="ns1", function="notes").volume == MOUNT
