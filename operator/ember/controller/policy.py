"""SecurityPolicies: which one a Function runs under, a policy's own status, and nudging its Functions.

`resolve_policy` applies the one rule (`ember.resources.policy`, shared with local mode): the
Function's `securityPolicyRef`, else the namespace's policy named like the operator's default,
else the built-in default; a usable policy also needs its sandbox's RuntimeClass. A policy's
change reaches its Functions as an annotation (`notify_functions`), an update kopf hands to the
Function's handler, whose reconcile then makes a new Version (the policy is frozen into it).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from ember.api.common import ConditionStatus
from ember.api.function import ObjectRef
from ember.api.security_policy import SecurityPolicySpec, policy_hash
from ember.api.unsupported import unsupported_policy_fields
from ember.controller.kube import Kube, Obj
from ember.controller.settings import Settings
from ember.controller.status import Recorder, conditions_of, mark_unsupported, status_changed, wire_conditions
from ember.resources import conditions as cond
from ember.resources import labels
from ember.resources.policy import choose_policy, policy_name_for


@dataclass(frozen=True, slots=True)
class PolicyResolution:
    """The SecurityPolicy a Function runs under, or why there is none usable."""

    spec: SecurityPolicySpec | None
    name: str | None
    status: ConditionStatus
    reason: str
    message: str

    @property
    def usable(self) -> bool:
        """Pools may be built from it."""
        return self.spec is not None and self.status == "True"


async def resolve_policy(kube: Kube, settings: Settings, namespace: str, ref: ObjectRef | None) -> PolicyResolution:
    """The Function's SecurityPolicy (`ember.resources.policy`), checked for a usable RuntimeClass."""
    lookup = policy_name_for(ref, settings.default_policy_name)
    body = await kube.get_custom("securitypolicies", namespace, lookup)
    found: SecurityPolicySpec | None = None
    if body is not None:
        try:
            found = SecurityPolicySpec.model_validate(body.get("spec") or {})
        except ValidationError as err:
            return PolicyResolution(
                None, lookup, "False", cond.Reason.POLICY_INVALID, f"SecurityPolicy {lookup!r} is invalid: {err}"
            )
    choice = choose_policy(namespace=namespace, ref=ref, default_name=settings.default_policy_name, found=found)
    if choice.spec is None:
        return PolicyResolution(None, choice.name, "False", cond.Reason.POLICY_MISSING, choice.problem)
    spec, name = choice.spec, choice.name
    which = f"SecurityPolicy {name!r}" if name else "the built-in default policy"
    runtime_class = spec.runtime_class
    if runtime_class is not None and not await kube.runtime_class_exists(runtime_class):
        return PolicyResolution(
            spec,
            name,
            "False",
            cond.Reason.RUNTIME_CLASS_MISSING,
            f"{which} needs RuntimeClass {runtime_class!r} (sandbox {spec.sandbox}), which does not exist; "
            f"install the sandbox on the nodes and create the RuntimeClass (chart value runtimeClasses).",
        )
    shown = runtime_class or "cluster default"
    return PolicyResolution(
        spec, name, "True", cond.Reason.RESOLVED, f"Using {which}: sandbox {spec.sandbox}, RuntimeClass {shown}."
    )


async def reconcile_security_policy(
    kube: Kube, settings: Settings, body: Obj, *, now: dt.datetime, record: Recorder
) -> dict[str, Any]:
    """Validate a SecurityPolicy, check its RuntimeClass, and nudge the Functions that use it."""
    meta = body.get("metadata", {})
    generation = meta.get("generation")
    ns, name = meta.get("namespace", "default"), meta.get("name", "")
    old_conditions = conditions_of(body.get("status"))
    try:
        spec = SecurityPolicySpec.model_validate(body.get("spec") or {})
    except ValidationError as err:
        conditions = cond.mark_false(
            old_conditions, cond.READY, cond.Reason.INVALID_SPEC, f"Invalid spec: {err}", generation=generation, now=now
        )
        return {"observedGeneration": generation, "conditions": wire_conditions(conditions)}
    digest = policy_hash(spec)
    policy = await resolve_policy(kube, settings, ns, ObjectRef(name=name))
    conditions = cond.set_condition(
        old_conditions,
        type_=cond.POLICY_RESOLVED,
        status=policy.status,
        reason=policy.reason,
        message=policy.message,
        generation=generation,
        now=now,
    )
    conditions = mark_unsupported(
        conditions, unsupported_policy_fields(spec), body, record, generation=generation, now=now
    )
    conditions = cond.with_ready(conditions, (cond.POLICY_RESOLVED,), generation=generation, now=now)
    changed = status_changed(old_conditions, conditions, cond.READY)
    if changed is not None:
        record(
            body,
            type="Normal" if changed.status == "True" else "Warning",
            reason=changed.reason,
            message=changed.message,
        )
    await notify_functions(kube, settings, ns, name, f"{digest[:16]}-{policy.status}")
    return {"observedGeneration": generation, "conditions": wire_conditions(conditions), "policyHash": digest}


async def notify_functions(kube: Kube, settings: Settings, namespace: str, policy_name: str, token: str) -> None:
    """Annotate the Functions that use a policy, so that their handlers re-reconcile (pools re-roll)."""
    for item in await kube.list_custom("functions", namespace):
        spec = item.get("spec") or {}
        ref = spec.get("securityPolicyRef") or {}
        uses = ref.get("name") == policy_name or (not ref and policy_name == settings.default_policy_name)
        for portion in spec.get("portions") or []:  # a portion's policy is part of its Version too
            uses = uses or (portion.get("securityPolicyRef") or {}).get("name") == policy_name
        current = (item["metadata"].get("annotations") or {}).get(labels.POLICY_HASH_ANNOTATION)
        if uses and current != token:
            await kube.annotate_custom(
                "functions", namespace, item["metadata"]["name"], {labels.POLICY_HASH_ANNOTATION: token}
            )
