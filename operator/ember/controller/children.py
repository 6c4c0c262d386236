"""Writing one child object the way every reconciler does: get it, create it if missing, replace it if stale.

`ensure_child` is the one place that does this for the objects a Function leads to (pool
Deployments, their NetworkPolicies, the Function's NetworkPolicy). Whether a stored child is
current is told by a hash of the part of it Ember decides (`SPEC_HASH_ANNOTATION`), not by
comparing it with the desired object: the API server adds defaults, which would make every
comparison differ. A kind whose stored object carries fields another owner sets (a pool's
replicas, set by `pool_size`) passes a `Merge` that keeps them.
"""

from __future__ import annotations

import copy
import enum
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from ember.api.common import content_digest
from ember.controller.kube import Kube, Obj
from ember.resources import labels

SPEC_HASH_ANNOTATION = f"{labels.PREFIX}/spec-hash"


def spec_digest(obj: Any) -> str:
    """The short content hash stored in `SPEC_HASH_ANNOTATION`."""
    return content_digest(obj)[:16]


@dataclass(frozen=True, slots=True)
class ChildKind:
    """The API calls for one kind of child (`deployments`, `network_policies`)."""

    kind: str
    get: Callable[[str, str], Awaitable[Obj | None]]
    create: Callable[[Obj], Awaitable[None]]
    replace: Callable[[Obj], Awaitable[None]]


def deployments(kube: Kube) -> ChildKind:
    """Deployments (pools)."""
    return ChildKind("Deployment", kube.get_deployment, kube.create_deployment, kube.replace_deployment)


def network_policies(kube: Kube) -> ChildKind:
    """NetworkPolicies (egress)."""
    return ChildKind("NetworkPolicy", kube.get_network_policy, kube.create_network_policy, kube.replace_network_policy)


class Merge(Protocol):
    """The body that replaces a stale child, from the stored one and the desired one."""

    def __call__(self, actual: Obj, desired: Obj) -> Obj: ...


def take_desired(actual: Obj, desired: Obj) -> Obj:
    """Replace the whole child with the desired object (the default `Merge`)."""
    return copy.deepcopy(desired)


class Outcome(enum.Enum):
    """What `ensure_child` did."""

    CREATED = "created"
    REPLACED = "replaced"
    UNCHANGED = "unchanged"


@dataclass(frozen=True, slots=True)
class Child:
    """A child after `ensure_child`: what was done, and its uid (to own grandchildren)."""

    kind: str
    name: str
    outcome: Outcome
    uid: str | None


def _owner_uids(obj: Obj) -> set[str]:
    return {str(o.get("uid")) for o in (obj.get("metadata") or {}).get("ownerReferences") or []}


async def ensure_child(api: ChildKind, desired: Obj, *, compared: Any = None, merge: Merge = take_desired) -> Child:
    """Make the stored child match `desired`: create it if missing, replace it when stale.

    `compared` is the part of `desired` whose change needs a replace (default: its spec); its hash
    goes into `SPEC_HASH_ANNOTATION`. A stored child is stale when that hash differs or it lacks
    an owner reference of `desired` (a second Function sharing a pool, a successor of a deleted
    owner). The replace carries the stored resourceVersion, so a concurrent change makes it fail
    with `Conflict` (retried by the handler) instead of being overwritten.
    """
    meta = desired["metadata"]
    namespace, name = meta["namespace"], meta["name"]
    spec_hash = spec_digest(desired["spec"] if compared is None else compared)
    meta.setdefault("annotations", {})[SPEC_HASH_ANNOTATION] = spec_hash
    actual = await api.get(namespace, name)
    if actual is None:
        await api.create(desired)
        stored = await api.get(namespace, name)
        return Child(api.kind, name, Outcome.CREATED, (stored or {}).get("metadata", {}).get("uid"))
    actual_meta = actual["metadata"]
    uid = actual_meta.get("uid")
    current = (actual_meta.get("annotations") or {}).get(SPEC_HASH_ANNOTATION) == spec_hash
    if current and _owner_uids(desired) <= _owner_uids(actual):
        return Child(api.kind, name, Outcome.UNCHANGED, uid)
    body = merge(actual, desired)
    body.pop("status", None)
    body["metadata"]["resourceVersion"] = actual_meta.get("resourceVersion")
    await api.replace(body)
    return Child(api.kind, name, Outcome.REPLACED, uid)
