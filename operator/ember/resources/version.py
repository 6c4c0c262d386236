"""Function → Version: when a new Version is due, its number, and the Version object itself."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ember.api.function import Function
from ember.api.security_policy import SecurityPolicySpec
from ember.api.version import Version, version_name
from ember.resources import labels
from ember.resources.meta import managed_labels, owner_reference


@dataclass(frozen=True, slots=True)
class VersionPlan:
    """What a Function's reconcile does about Versions: mint `create` (a number) or nothing."""

    create: int | None
    latest: int | None

    @property
    def latest_after(self) -> int:
        """The newest Version number once the plan is applied."""
        if self.create is not None:
            return self.create
        assert self.latest is not None, "a plan without a Version to create has a latest one"
        return self.latest


def plan_version(existing: Sequence[Version], desired_hash: str, *, last_number: int | None = None) -> VersionPlan:
    """A new Version when the newest one's content differs from `desired_hash` (or none exists).

    Only the newest counts: reverting code to an older state mints a new Version, as publishing
    in Lambda does. `last_number` (status.latestVersion) keeps numbers from being reused when the
    newest Version object was deleted by hand.
    """
    newest = max(existing, key=lambda v: v.spec.number, default=None)
    return plan_next_version(
        desired_hash,
        newest_number=newest.spec.number if newest is not None else None,
        newest_hash=newest.spec.code_hash if newest is not None else None,
        last_number=last_number,
    )


def plan_next_version(
    desired_hash: str, *, newest_number: int | None, newest_hash: str | None, last_number: int | None = None
) -> VersionPlan:
    """`plan_version` from the newest Version's number and hash alone (what local mode's activator keeps).

    The next number is one past both the newest Version and `last_number`, so none is reused.
    """
    if newest_number is not None and newest_hash == desired_hash:
        return VersionPlan(create=None, latest=newest_number)
    return VersionPlan(create=max(newest_number or 0, last_number or 0) + 1, latest=newest_number)


def version_labels(function_name: str, number: int) -> dict[str, str]:
    """Labels of a Version and of everything made for it."""
    return managed_labels(**{labels.FUNCTION: function_name, labels.VERSION: str(number)})


def build_version(
    fn: Function,
    *,
    number: int,
    code_hash: str,
    policy: SecurityPolicySpec,
    policy_name: str | None = None,
    portion_policies: Mapping[str, SecurityPolicySpec] | None = None,
) -> dict[str, Any]:
    """The Version object for a Function's spec under its policy: numbered, content-hashed, owned by the Function.

    The policy is frozen into the Version, as the spec is: the Version's pods run under it (and come
    from its pool) whatever happens to the SecurityPolicy object later; an edit makes a new Version.
    So are its portions' policies (`portion_policies`)."""
    if number < 1:
        raise ValueError(f"Version number must be at least 1 (got {number})")
    name = version_name(fn.metadata.name, number)
    body: dict[str, Any] = {
        "apiVersion": fn.api_version,
        "kind": "Version",
        "metadata": {
            "name": name,
            "namespace": fn.metadata.namespace,
            "labels": version_labels(fn.metadata.name, number),
            "annotations": {labels.CODE_HASH_ANNOTATION: code_hash},
            "ownerReferences": [owner_reference(kind="Function", name=fn.metadata.name, uid=fn.metadata.uid)],
        },
        "spec": {
            "functionName": fn.metadata.name,
            "number": number,
            "codeHash": code_hash,
            "function": fn.spec.to_wire(),
            "policy": policy.to_wire(),
            **({"policyName": policy_name} if policy_name is not None else {}),
            **(
                {"portionPolicies": {n: p.to_wire() for n, p in sorted(portion_policies.items())}}
                if portion_policies
                else {}
            ),
        },
    }
    # The model checks what the CRD would (hash format, name patterns) before any API call.
    Version.model_validate(body)
    return body
