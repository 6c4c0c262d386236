"""Object metadata helpers: owner references and the labels every Ember-made object carries."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ember.api.common import API_VERSION
from ember.resources import labels


class MissingUid(ValueError):
    """An owner has no metadata.uid: it was never stored by the API server."""


def owner_reference(*, kind: str, name: str, uid: str | None, api_version: str = API_VERSION) -> dict[str, Any]:
    """A controller owner reference; garbage collection deletes the child with the owner."""
    if not uid:
        raise MissingUid(f"{kind} {name!r} has no metadata.uid; only stored objects can own others")
    return {
        "apiVersion": api_version,
        "kind": kind,
        "name": name,
        "uid": uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def managed_labels(**extra: str) -> dict[str, str]:
    """`managed-by` plus the given labels."""
    return {labels.MANAGED_BY: labels.MANAGER, **extra}


def pod_ready(pod: Mapping[str, Any]) -> bool:
    """A pod that is not being deleted and whose Ready condition is True (as a kubelet reports it)."""
    if (pod.get("metadata") or {}).get("deletionTimestamp"):
        return False
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
