"""A Function's `spec.state.volume` → its PersistentVolumeClaim, and what its pods mount (pure).

One claim per Function (`state_claim_name`), ReadWriteMany, in the Function's namespace and owned
by it: garbage collection deletes it with the Function, never with a Version, so the files
outlive every Version change. Every pod of the Function (its Versions and their portions) mounts
it read-write at `mountPath`. Pods are generic until claimed and cannot be handed a volume then,
so the volume is part of the pool key (`StateMount`, `PoolKey.volume`, `pool_id`): a Function with
a volume has warm pools of its own whose pod template mounts its claim.

A stored claim changes only within what Kubernetes allows (`claim_update`): its storage request
may grow (the StorageClass must allow expansion), never shrink, and its StorageClass is
immutable. What cannot be applied is said in the Function's `StateVolumeReady` condition
(`claim_condition`), as is a claim that is not bound yet: its pool's pods stay Pending until it is.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import ROUND_CEILING, Decimal, InvalidOperation
from typing import Any, Final

from ember.api.common import ConditionStatus
from ember.api.function import StateVolume
from ember.resources import labels
from ember.resources.meta import managed_labels, owner_reference

CLAIM_PREFIX: Final = "ember-state-"
CLAIM_NAME_MAX: Final = 63  # a DNS label: a claim's name also names the pod volume that mounts it
VOLUME_NAME: Final = "state"  # the pod volume of the claim, beside `tmp` and `code`
COMPONENT: Final = "state"  # `labels.COMPONENT` of the claim

# The Function's condition about its claim: informational (the Version's readiness already waits
# for pods, which wait for the claim), with one of these reasons.
STATE_VOLUME_READY: Final = "StateVolumeReady"


class Reason:
    """Reasons of `STATE_VOLUME_READY`."""

    BOUND: Final = "ClaimBound"
    PENDING: Final = "ClaimPending"
    LOST: Final = "ClaimLost"
    SIZE_NOT_APPLIED: Final = "SizeNotApplied"
    STORAGE_CLASS_NOT_APPLIED: Final = "StorageClassNotApplied"
    RESIZE_REFUSED: Final = "ResizeRefused"


@dataclass(frozen=True, slots=True)
class StateMount:
    """A Function's volume as its pods see it; part of their pool key. Each mode backs it its own
    way: a cluster by the Function's claim (`claim_name`), local mode by a folder per Function."""

    namespace: str
    function: str
    mount_path: str

    @property
    def claim_name(self) -> str:
        """The Function's PersistentVolumeClaim."""
        return state_claim_name(self.function)

    def __str__(self) -> str:
        return f"{self.claim_name}:{self.mount_path}"


def state_mount(volume: StateVolume | None, *, namespace: str, function: str) -> StateMount | None:
    """The mount of a Function's `spec.state.volume` (None without one)."""
    if volume is None:
        return None
    return StateMount(namespace=namespace, function=function, mount_path=volume.mount_path)


def state_claim_name(function: str) -> str:
    """`ember-state-<function>`; Function names are DNS labels of at most 40 characters, so it fits."""
    name = CLAIM_PREFIX + function
    if len(name) > CLAIM_NAME_MAX or not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", name):
        raise ValueError(f"Function name {function!r} gives no valid claim name ({name!r}: a DNS label of 63)")
    return name


def state_claim(volume: StateVolume, *, namespace: str, function: str, function_uid: str | None) -> dict[str, Any]:
    """The PersistentVolumeClaim of a Function's volume (see the module docstring)."""
    spec: dict[str, Any] = {
        "accessModes": ["ReadWriteMany"],
        "volumeMode": "Filesystem",
        "resources": {"requests": {"storage": f"{volume.size_mib}Mi"}},
    }
    if volume.storage_class_name is not None:
        spec["storageClassName"] = volume.storage_class_name
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {
            "name": state_claim_name(function),
            "namespace": namespace,
            "labels": managed_labels(**{labels.FUNCTION: function, labels.COMPONENT: COMPONENT}),
            "ownerReferences": [owner_reference(kind="Function", name=function, uid=function_uid)],
        },
        "spec": spec,
    }


def pod_volume(mount: StateMount) -> dict[str, Any]:
    """The pod volume of a pool whose key holds `mount`."""
    return {"name": VOLUME_NAME, "persistentVolumeClaim": {"claimName": mount.claim_name}}


def volume_mount(mount: StateMount) -> dict[str, Any]:
    """The agent container's mount of it: read-write (fsGroup makes it the pod user's)."""
    return {"name": VOLUME_NAME, "mountPath": mount.mount_path}


_UNITS: Final = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
}


def quantity_bytes(quantity: object) -> int | None:
    """Bytes of a Kubernetes storage quantity ("1Gi", "500M", "1073741824", "1e9"); None if unreadable."""
    text = str(quantity).strip()
    found = re.fullmatch(r"([0-9.]+(?:[eE][-+]?[0-9]+)?)([KMGTPE]i|[kMGTPE])?", text)
    if found is None:
        return None
    try:
        number = Decimal(found[1]) * _UNITS.get(found[2] or "", 1)
    except InvalidOperation:
        return None
    return int(number.to_integral_value(rounding=ROUND_CEILING))


@dataclass(frozen=True, slots=True)
class ClaimUpdate:
    """What of the wanted claim can be applied to the stored one: a new storage request (grow
    only), and why the rest cannot (sentences for the condition)."""

    storage: str | None
    problems: tuple[tuple[str, str], ...]  # (reason, message)


def claim_update(actual: dict[str, Any], volume: StateVolume) -> ClaimUpdate:
    """Compare the stored claim with `spec.state.volume`: grow its request when asked for more;
    a smaller size or another StorageClass cannot be applied to a claim (Kubernetes refuses both)."""
    spec = actual.get("spec") or {}
    name = (actual.get("metadata") or {}).get("name")
    problems: list[tuple[str, str]] = []
    wanted_class = volume.storage_class_name
    stored_class = spec.get("storageClassName")
    if wanted_class is not None and stored_class != wanted_class:
        problems.append(
            (
                Reason.STORAGE_CLASS_NOT_APPLIED,
                f"spec.state.volume.storageClassName ({wanted_class}) differs from the StorageClass of "
                f"PersistentVolumeClaim {name} ({stored_class or 'none'}), which cannot change: the volume "
                "keeps its class (to move, copy the files out, delete the claim and Ember makes a new one)",
            )
        )
    wanted = volume.size_mib * 2**20
    raw = ((spec.get("resources") or {}).get("requests") or {}).get("storage")
    stored = quantity_bytes(raw)
    storage: str | None = None
    if stored is None or wanted > stored:
        storage = f"{volume.size_mib}Mi"
    elif wanted < stored:
        problems.append(
            (
                Reason.SIZE_NOT_APPLIED,
                f"spec.state.volume.sizeMiB ({volume.size_mib}) is below the {raw} PersistentVolumeClaim {name} "
                "already asks for, and a claim cannot shrink: the volume keeps its size",
            )
        )
    return ClaimUpdate(storage=storage, problems=tuple(problems))


def claim_condition(
    actual: dict[str, Any], update: ClaimUpdate, *, mount_path: str, resize_error: str = ""
) -> tuple[ConditionStatus, str, str]:
    """`StateVolumeReady` of a Function from its stored claim: (status, reason, message).

    Not bound is Unknown (a claim of a StorageClass that binds on first use waits for the pool's
    pods, which wait for it), Lost is False, a change that cannot be applied is False too (the
    volume serves, at its old size or class); bound and as asked is True."""
    name = (actual.get("metadata") or {}).get("name")
    status = actual.get("status") or {}
    phase = status.get("phase") or "Pending"
    if phase == "Lost":
        return (
            "False",
            Reason.LOST,
            f"PersistentVolumeClaim {name} lost its PersistentVolume: the Function's pods cannot start "
            "until it is bound again (kubectl describe pvc).",
        )
    if phase != "Bound":
        wanted = (actual.get("spec") or {}).get("storageClassName")
        of_class = f"of StorageClass {wanted} " if wanted else ""
        return (
            "Unknown",
            Reason.PENDING,
            f"PersistentVolumeClaim {name} is {phase}: no ReadWriteMany PersistentVolume {of_class}is bound "
            "to it yet, and the Function's warm pods stay Pending until one is (kubectl describe pvc "
            f"{name}).",
        )
    if resize_error:
        wanted = update.storage or "the size asked"
        return (
            "False",
            Reason.RESIZE_REFUSED,
            f"PersistentVolumeClaim {name} could not grow to {wanted} ({resize_error}): its StorageClass must "
            "allow volume expansion; the volume keeps its size.",
        )
    if update.problems:
        reason = update.problems[0][0]
        return "False", reason, "; ".join(message for _, message in update.problems) + "."
    capacity = (status.get("capacity") or {}).get("storage")
    size = f" ({capacity})" if capacity else ""
    return "True", Reason.BOUND, f"PersistentVolumeClaim {name}{size} is bound; every pod mounts it at {mount_path}."
