"""Functions: from the whole Function to its Versions, retention, pools, NetworkPolicy and conditions.

A change of code, configuration or SecurityPolicy (the Function's or a portion's) is a new,
numbered Version (`ember.resources.version.plan_version`); scaling, traffic, aliases and
triggers are not.
Versions that traffic or aliases reference, the ready one and the last `keep_versions` stay; the
rest are deleted with their code. The pools of the Versions that serve (and of the newest, so it
can load) exist (`pools`), and so does the Function's NetworkPolicy. Status: `PolicyResolved`,
`VersionReady`, `EgressEnforced`, `RoutesAccepted` (`ember.controller.routes`),
`StateVolumeReady` (`ember.controller.state_volume`, its volume's claim), `Unsupported`, and
`Ready` from the first two (a spec beyond its policy's `limits` is `PolicyResolved=False,
ExceedsPolicyLimits`, portions whose policies are missing, over their limits or called up in
trust `PortionPoliciesRefused`, and neither mints a Version), except that a child Ember wants
but may not touch (`children.Outcome.NOT_OWNED`) makes it `False, NotOwned`, naming the child;
`readyVersion` is the newest Ready Version.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from pydantic import ValidationError

from ember.api.common import Condition, ConditionStatus
from ember.api.function import Function
from ember.api.security_policy import SecurityPolicySpec
from ember.api.unsupported import unsupported_function_fields
from ember.api.version import Version, code_hash
from ember.controller.children import Child, Outcome, ensure_child, network_policies
from ember.controller.kube import Kube, Obj
from ember.controller.policy import PolicyResolution, resolve_policy
from ember.controller.pools import ensure_pools
from ember.controller.routes import routes_of
from ember.controller.settings import Settings
from ember.controller.state_volume import ensure_state_claim
from ember.controller.status import (
    Recorder,
    conditions_of,
    mark_unsupported,
    resource_of,
    status_changed,
    wire_conditions,
)
from ember.resources import conditions as cond
from ember.resources import labels
from ember.resources.code import CodeError, code_configmap_name, files_from_configmap
from ember.resources.network_policy import function_network_policy
from ember.resources.policy import limit_violations
from ember.resources.portions import PortionPolicies, resolve_portions
from ember.resources.retention import referenced_versions, versions_to_delete
from ember.resources.version import build_version, plan_version

log = logging.getLogger(__name__)


async def _read_code_digest(kube: Kube, fn: Function) -> str | None:
    ref = fn.spec.code.config_map_ref
    if ref is None:
        return None
    cm = await kube.get_configmap(fn.metadata.namespace, ref.name)
    if cm is None:
        raise CodeError(f"spec.code.configMapRef: ConfigMap {ref.name!r} does not exist in {fn.metadata.namespace!r}")
    return files_from_configmap(cm, key=ref.key).digest()


def _parse_versions(items: Sequence[Obj], fn: Function) -> tuple[list[tuple[Version, Obj]], list[Obj]]:
    """Versions owned by this Function (with their status), and leftovers of an earlier Function of the name."""
    owned: list[tuple[Version, Obj]] = []
    foreign: list[Obj] = []
    for item in items:
        owners = item.get("metadata", {}).get("ownerReferences", [])
        if not any(o.get("uid") == fn.metadata.uid for o in owners):
            foreign.append(item)
            continue
        try:
            owned.append((Version.model_validate(resource_of(item)), item.get("status") or {}))
        except ValidationError:
            log.warning("version=%s is not a valid Version; ignored", item.get("metadata", {}).get("name"))
    return owned, foreign


async def _ensure_network_policy(kube: Kube, fn: Function, policy: SecurityPolicySpec) -> tuple[Child, tuple[str, ...]]:
    """The NetworkPolicy limiting the egress of every pod of the Function; the host rules it cannot express."""
    plan = function_network_policy(
        function_name=fn.metadata.name,
        namespace=fn.metadata.namespace,
        function_uid=fn.metadata.uid,
        egress=policy.egress,
    )
    return await ensure_child(network_policies(kube), plan.network_policy), plan.unenforced_hosts


async def _resolve_portions(kube: Kube, settings: Settings, fn: Function, policy: PolicyResolution) -> PortionPolicies:
    """The policies of the Function's portions, checked against their limits and the trust order
    (`ember.resources.portions`); nothing to check while the Function's own policy is missing."""
    if not fn.spec.portions or policy.spec is None:
        return PortionPolicies()
    ns = fn.metadata.namespace
    found: dict[str, SecurityPolicySpec | None] = {}
    for portion in fn.spec.portions:
        ref = portion.security_policy_ref
        if ref.name not in found:
            found[ref.name] = (await resolve_policy(kube, settings, ns, ref)).spec
    return resolve_portions(
        fn.spec, namespace=ns, main_policy=policy.spec, main_policy_name=policy.name, lookup=found.get
    )


def _version_ready_condition(
    latest: int, created: bool, by_number: Mapping[int, Obj], ready_version: int | None
) -> tuple[ConditionStatus, str, str]:
    serving = f" Version {ready_version} serves meanwhile." if ready_version and ready_version != latest else ""
    if created:
        return "Unknown", cond.Reason.VERSION_LOADING, f"Version {latest} was created and is loading.{serving}"
    ready = cond.find(conditions_of(by_number.get(latest)), cond.READY)
    if ready is not None and ready.status == "True":
        return "True", cond.Reason.READY, f"Version {latest} is ready."
    if ready is not None and ready.status == "False" and ready.reason in cond.PERMANENT_REASONS:
        return "False", cond.Reason.VERSION_FAILED, f"Version {latest} failed: {ready.message}{serving}"
    detail = f" ({ready.message})" if ready is not None and ready.message else ""
    return "Unknown", cond.Reason.VERSION_LOADING, f"Version {latest} is loading{detail}.{serving}"


def _mark_not_owned(
    old_conditions: Sequence[Condition],
    conditions: Sequence[Condition],
    not_owned: Sequence[Child],
    body: Obj,
    record: Recorder,
    *,
    generation: int | None,
    now: dt.datetime,
) -> list[Condition]:
    """`Ready=False, reason=NotOwned` naming the children that exist but are not Ember's (as Knative).

    Whatever else Ready would say, a child Ember may not touch needs a person first. A Warning
    Event whenever the set of such children changes, including from another False reason."""
    message = " ".join(child.problem for child in not_owned)
    before = cond.find(old_conditions, cond.READY)
    if before is None or (before.status, before.reason, before.message) != ("False", cond.Reason.NOT_OWNED, message):
        record(body, type="Warning", reason=cond.Reason.NOT_OWNED, message=message)
    return cond.mark_false(conditions, cond.READY, cond.Reason.NOT_OWNED, message, generation=generation, now=now)


async def reconcile_function(
    kube: Kube, settings: Settings, body: Obj, *, now: dt.datetime, record: Recorder
) -> dict[str, Any]:
    """Converge one Function: its Versions, pool, NetworkPolicy; returns its new status."""
    meta = body.get("metadata", {})
    generation = meta.get("generation")
    old_status = body.get("status") or {}
    old_conditions = conditions_of(old_status)
    try:
        fn = Function.model_validate(resource_of(body))
    except ValidationError as err:
        conditions = cond.mark_false(
            old_conditions, cond.READY, cond.Reason.INVALID_SPEC, f"Invalid spec: {err}", generation=generation, now=now
        )
        if status_changed(old_conditions, conditions, cond.READY):
            record(body, type="Warning", reason=cond.Reason.INVALID_SPEC, message=f"Invalid spec: {err}")
        return {"observedGeneration": generation, "conditions": wire_conditions(conditions)}

    ns, name = fn.metadata.namespace, fn.metadata.name
    conditions = list(old_conditions)
    policy = await resolve_policy(kube, settings, ns, fn.spec.security_policy_ref)
    over_limits = limit_violations(fn.spec, policy.spec, policy_name=policy.name) if policy.spec is not None else []
    portions = await _resolve_portions(kube, settings, fn, policy)
    refused = over_limits or portions.problems
    reason = cond.Reason.EXCEEDS_LIMITS if over_limits else cond.Reason.PORTIONS_REFUSED
    conditions = cond.set_condition(
        conditions,
        type_=cond.POLICY_RESOLVED,
        status="False" if refused else policy.status,
        reason=reason if refused else policy.reason,
        message=("; ".join(refused) + ". No Version is made of this spec.") if refused else policy.message,
        generation=generation,
        now=now,
    )

    items = await kube.list_custom("versions", ns, label_selector=f"{labels.FUNCTION}={name}")
    owned, foreign = _parse_versions(items, fn)
    for item in foreign:
        # Left by an earlier Function of this name; garbage collection would take them too.
        await kube.delete_custom("versions", ns, item["metadata"]["name"])
    versions = {v.spec.number: v for v, _ in owned}
    by_number = {v.spec.number: status for v, status in owned}
    # Ready means stored *and* loaded by a pod (see reconcile_version): only such a Version serves.
    ready_numbers = [n for n, st in by_number.items() if cond.is_true(conditions_of(st), cond.READY)]
    ready_version = max(ready_numbers, default=None)

    created = False
    latest: int | None = max(by_number, default=None)
    try:
        digest = await _read_code_digest(kube, fn)
    except CodeError as err:
        conditions = cond.mark_false(
            conditions, cond.VERSION_READY, cond.Reason.CODE_MISSING, str(err), generation=generation, now=now
        )
    else:
        if policy.spec is None or refused:
            # No policy to freeze into a Version, or a spec beyond its limits: none is made until that
            # changes (PolicyResolved says why); the Version that serves keeps serving.
            status_, reason, message = (
                _version_ready_condition(latest, False, by_number, ready_version)
                if latest is not None
                else ("Unknown", cond.Reason.VERSION_LOADING, "No Version yet: PolicyResolved says why.")
            )
        else:
            desired_hash = code_hash(fn.spec, policy.spec, digest, portions.policies)
            plan = plan_version(list(versions.values()), desired_hash, last_number=old_status.get("latestVersion"))
            if plan.create is not None:
                new_body = build_version(
                    fn,
                    number=plan.create,
                    code_hash=desired_hash,
                    policy=policy.spec,
                    policy_name=policy.name,
                    portion_policies=portions.policies,
                )
                await kube.create_custom("versions", new_body)
                versions[plan.create] = Version.model_validate(new_body)
                created = True
                record(
                    body,
                    type="Normal",
                    reason="VersionCreated",
                    message=f"Created Version {plan.create} ({new_body['metadata']['name']}) "
                    "for a change of code, config or SecurityPolicy.",
                )
            latest = plan.latest_after
            status_, reason, message = _version_ready_condition(latest, created, by_number, ready_version)
        conditions = cond.set_condition(
            conditions,
            type_=cond.VERSION_READY,
            status=status_,
            reason=reason,
            message=message,
            generation=generation,
            now=now,
        )

    for number in versions_to_delete(fn.spec, versions, keep_last=settings.keep_versions, ready_version=ready_version):
        version_name = f"{name}-v{number}"
        await kube.delete_custom("versions", ns, version_name)
        await kube.delete_configmap(ns, code_configmap_name(version_name))
        versions.pop(number)
        record(
            body,
            type="Normal",
            reason="VersionDeleted",
            message=f"Deleted Version {number}: no traffic or alias references it, it is not the ready one, "
            f"and it is older than the last {settings.keep_versions}.",
        )

    serving = referenced_versions(fn.spec, ready_version=ready_version) | ({latest} if latest is not None else set())
    # before the pools: their pods mount the claim
    conditions, not_owned = await ensure_state_claim(kube, fn, conditions, body, record, generation=generation, now=now)
    not_owned += await ensure_pools(
        kube, settings, fn, [versions[n] for n in sorted(serving) if n in versions], record, body, by_number
    )
    if policy.usable and policy.spec is not None:
        network_policy, hosts = await _ensure_network_policy(kube, fn, policy.spec)
        if network_policy.outcome is Outcome.NOT_OWNED:
            not_owned.append(network_policy)
            conditions = cond.mark_false(
                conditions,
                cond.EGRESS_ENFORCED,
                cond.Reason.NOT_OWNED,
                network_policy.problem,
                generation=generation,
                now=now,
            )
        elif hosts:
            conditions = cond.mark_false(
                conditions,
                cond.EGRESS_ENFORCED,
                cond.Reason.HOSTS_NOT_ENFORCEABLE,
                f"Egress to host names ({', '.join(hosts)}) cannot be expressed in a NetworkPolicy and stays denied; "
                "allow their CIDRs instead.",
                generation=generation,
                now=now,
            )
        else:
            conditions = cond.mark_true(
                conditions,
                cond.EGRESS_ENFORCED,
                cond.Reason.ENFORCED,
                "Egress is limited by a NetworkPolicy.",
                generation=generation,
                now=now,
            )

    served: list[str] = []
    if fn.spec.http is not None:
        routes = await routes_of(kube, fn, token=now.isoformat())
        served = list(routes.served)
        if routes.refused:
            conditions = cond.mark_false(
                conditions,
                cond.ROUTES_ACCEPTED,
                cond.Reason.ROUTE_CONFLICT,
                "; ".join(routes.refused) + ".",
                generation=generation,
                now=now,
            )
        else:
            conditions = cond.mark_true(
                conditions,
                cond.ROUTES_ACCEPTED,
                cond.Reason.ROUTES_SERVED,
                f"The activator serves {', '.join(served) or 'no routes'}"
                + (" and the function URL." if fn.spec.http.function_url is not None else "."),
                generation=generation,
                now=now,
            )
    else:
        conditions = [c for c in conditions if c.type != cond.ROUTES_ACCEPTED]
    conditions = mark_unsupported(
        conditions, unsupported_function_fields(fn.spec), body, record, generation=generation, now=now
    )
    conditions = cond.with_ready(conditions, cond.FUNCTION_DEPENDENTS, generation=generation, now=now)
    transitions: tuple[str, ...] = (cond.READY, cond.POLICY_RESOLVED, cond.EGRESS_ENFORCED, cond.ROUTES_ACCEPTED)
    if not_owned:
        conditions = _mark_not_owned(
            old_conditions, conditions, not_owned, body, record, generation=generation, now=now
        )
        transitions = (cond.POLICY_RESOLVED, cond.EGRESS_ENFORCED, cond.ROUTES_ACCEPTED)
    for type_ in transitions:
        changed = status_changed(old_conditions, conditions, type_)
        if changed is not None and (changed.status != "Unknown"):
            record(
                body,
                type="Normal" if changed.status == "True" else "Warning",
                reason=changed.reason,
                message=changed.message,
            )
    return {
        "observedGeneration": generation,
        "conditions": wire_conditions(conditions),
        "latestVersion": latest,
        "readyVersion": ready_version,
        "url": settings.function_url(ns, name),
        "routes": served,
    }
