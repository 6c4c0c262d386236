"""Writing one child object the way every reconciler does (Knative's child pattern), in one place.

`ensure_child` gets the child; creates it if missing, with the owner references and labels the
builder put on it; if it exists but is not Ember's, leaves it untouched and reports `NOT_OWNED`
(the reconciler turns that into `Ready=False, reason=NotOwned` naming it, and a Warning Event);
else replaces it when stale. It serves every object a Function leads to: pool Deployments, their
NetworkPolicies, the Function's NetworkPolicy.

Ours means: labelled `app.kubernetes.io/managed-by: ember-operator`, and no controller owner
reference other than the one the builder wants (same group, kind and name). A controller of the
wanted kind and name but another uid is a predecessor that was deleted (names are unique in a
namespace), whose garbage collection has not run yet: the child is adopted, not refused.

Whether a stored child is current is told by a hash of the part of it Ember decides
(`SPEC_HASH_ANNOTATION`), not by comparing it with the desired object: the API server adds
defaults, which would make every comparison differ. A kind whose stored object carries fields
another owner sets (a pool's replicas, set by `pool_size`) passes a `Merge` that keeps them.
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
    NOT_OWNED = "not-owned"


@dataclass(frozen=True, slots=True)
class Child:
    """A child after `ensure_child`: what was done, its uid (to own grandchildren), and for
    `NOT_OWNED` a sentence for people naming it and saying why it is not Ember's."""

    kind: str
    name: str
    outcome: Outcome
    uid: str | None
    problem: str = ""


def _owner_uids(obj: Obj) -> set[str]:
    return {str(o.get("uid")) for o in (obj.get("metadata") or {}).get("ownerReferences") or []}


def _controller(obj: Obj) -> tuple[str, str, str] | None:
    """(API group, kind, name) of an object's controller owner reference, if it has one."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            group = str(ref.get("apiVersion", "")).rpartition("/")[0]
            return group, str(ref.get("kind", "")), str(ref.get("name", ""))
    return None


def not_ours(kind: str, actual: Obj, *, controller: tuple[str, str, str] | None) -> str | None:
    """Why a stored child is not Ember's to change (a sentence naming it), or None when it is.

    `controller` is the (API group, kind, name) of the controller Ember gives it, or None when
    Ember gives it none (a pool, owned by every Function that uses it)."""
    meta = actual.get("metadata") or {}
    what = f"{kind} {meta.get('name')}"
    advice = "Ember leaves it untouched; once it is deleted, Ember makes its own on the next reconcile."
    if (meta.get("labels") or {}).get(labels.MANAGED_BY) != labels.MANAGER:
        return f"{what} exists and is not Ember's (no label {labels.MANAGED_BY}={labels.MANAGER}). {advice}"
    found = _controller(actual)
    if found is not None and found != controller:
        _, owner_kind, owner_name = found
        return f"{what} exists and is not Ember's (it is controlled by {owner_kind} {owner_name}). {advice}"
    return None


async def ensure_child(api: ChildKind, desired: Obj, *, compared: Any = None, merge: Merge = take_desired) -> Child:
    """Make the stored child match `desired`: create it if missing, replace it when stale, and
    leave it alone (`NOT_OWNED`) when it is not Ember's.

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
    problem = not_ours(api.kind, actual, controller=_controller(desired))
    if problem is not None:
        return Child(api.kind, name, Outcome.NOT_OWNED, uid, problem)
    current = (actual_meta.get("annotations") or {}).get(SPEC_HASH_ANNOTATION) == spec_hash
    if current and _owner_uids(desired) <= _owner_uids(actual):
        return Child(api.kind, name, Outcome.UNCHANGED, uid)
    body = merge(actual, desired)
    body.pop("status", None)
    body["metadata"]["resourceVersion"] = actual_meta.get("resourceVersion")
    await api.replace(body)
    return Child(api.kind, name, Outcome.REPLACED, uid)
