"""Level-based reconcilers: from the whole object to the desired children, applied, and a status.

Each `reconcile_*` reads what exists, asks `ember.resources` what should exist, converges
(create what is missing, replace what differs, delete what is no longer wanted) and returns
the status to write. Nothing depends on having seen an event: running one twice, or after a
restart in the middle of a previous run, gives the same result. Transient API faults surface
as `KubeError` (the handler retries); invalid specs become `Ready=False, reason=InvalidSpec`.

Who triggers whom: a Version that changes phase annotates its Function, and a SecurityPolicy
that changes annotates the Functions that use it; annotations are updates kopf hands to the
Function's handler; so do code ConfigMaps, RuntimeClasses and deleted pools (see handlers).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from pydantic import ValidationError

from ember.api.common import Condition, ConditionStatus, content_digest
from ember.api.function import Function, FunctionSpec, ObjectRef
from ember.api.security_policy import SecurityPolicySpec, policy_hash
from ember.api.unsupported import not_implemented_message, unsupported_function_fields, unsupported_policy_fields
from ember.api.version import Version, code_hash, version_name
from ember.controller.kube import Conflict, Kube, Obj
from ember.controller.settings import Settings
from ember.resources import conditions as cond
from ember.resources import labels
from ember.resources.code import (
    CodeError,
    CodeFiles,
    code_configmap,
    code_configmap_name,
    files_from_configmap,
    version_files,
)
from ember.resources.meta import pod_ready
from ember.resources.network_policy import function_network_policy, pool_network_policy
from ember.resources.policy import choose_policy, policy_name_for
from ember.resources.pool import PoolSpec, pool_deployment
from ember.resources.retention import referenced_versions, versions_to_delete
from ember.resources.version import build_version, plan_version

log = logging.getLogger(__name__)

SPEC_HASH_ANNOTATION = f"{labels.PREFIX}/spec-hash"
VERSION_TRANSITION_ANNOTATION = f"{labels.PREFIX}/last-version-transition"
EventType = Literal["Normal", "Warning"]


class Recorder(Protocol):
    """Records a Kubernetes Event about an object (kopf.event in the operator)."""

    def __call__(self, obj: Mapping[str, Any], *, type: EventType, reason: str, message: str) -> None: ...


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


def _digest(obj: Any) -> str:
    return content_digest(obj)[:16]


def _conditions_of(status: Mapping[str, Any] | None) -> list[Condition]:
    out: list[Condition] = []
    for raw in (status or {}).get("conditions", []) or []:
        try:
            out.append(Condition.model_validate(raw))
        except ValidationError:
            continue
    return out


def _wire_conditions(conditions: Sequence[Condition]) -> list[dict[str, Any]]:
    return [c.model_dump(by_alias=True, exclude_none=True, mode="json") for c in conditions]


def _resource(body: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a stored object the models parse (status is read separately)."""
    return {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in body}


def _status_changed(old: Sequence[Condition], new: Sequence[Condition], type_: str) -> Condition | None:
    """The new condition of a type when its status changed (or it is new), else None."""
    before, after = cond.find(old, type_), cond.find(new, type_)
    if after is not None and (before is None or before.status != after.status):
        return after
    return None


def _mark_unsupported(
    conditions: Sequence[Condition],
    fields: Sequence[str],
    body: Obj,
    record: Recorder,
    *,
    generation: int | None,
    now: dt.datetime,
) -> list[Condition]:
    """`Unsupported`: the fields the spec sets that have no effect yet (issue #10: no silent fields).

    Informational, never part of Ready. A Warning Event when it turns True or names other fields,
    a Normal one when the last such field is gone; none while nothing changes."""
    old = cond.find(conditions, cond.UNSUPPORTED)
    if not fields:
        if old is not None and old.status == "True":
            record(body, type="Normal", reason=cond.Reason.ALL_SUPPORTED, message="Every field set is implemented.")
        return cond.mark_false(
            conditions,
            cond.UNSUPPORTED,
            cond.Reason.ALL_SUPPORTED,
            "Every field set is implemented.",
            generation=generation,
            now=now,
        )
    message = not_implemented_message(fields) + "."
    if old is None or old.status != "True" or old.message != message:
        record(body, type="Warning", reason=cond.Reason.FIELDS_NOT_IMPLEMENTED, message=message)
    return cond.mark_true(
        conditions, cond.UNSUPPORTED, cond.Reason.FIELDS_NOT_IMPLEMENTED, message, generation=generation, now=now
    )


def _function_owner(fn: Function) -> dict[str, Any]:
    """A non-controller owner reference: a pool may be shared by several Functions."""
    return {"apiVersion": fn.api_version, "kind": "Function", "name": fn.metadata.name, "uid": fn.metadata.uid}


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


# Function


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
            owned.append((Version.model_validate(_resource(item)), item.get("status") or {}))
        except ValidationError:
            log.warning("version=%s is not a valid Version; ignored", item.get("metadata", {}).get("name"))
    return owned, foreign


def _pool_of(settings: Settings, version: Version) -> PoolSpec:
    """The generic pool a Version's pods come from: its runtime and size, under its frozen policy."""
    spec = version.spec.function
    return PoolSpec(
        namespace=version.metadata.namespace,
        runtime=spec.runtime,
        memory_mib=spec.resources.memory_mib,
        policy=version.spec.policy,
        policy_hash=policy_hash(version.spec.policy),
        image=settings.image_for(spec.runtime),
        replicas=settings.pool_size_for(spec.runtime),
        image_pull_policy=settings.image_pull_policy,
        run_as_user=settings.run_as_user,
        cpu_burst_millicores=settings.pool_cpu_burst_millicores,
    )


async def _ensure_pools(
    kube: Kube, settings: Settings, fn: Function, serving: Sequence[Version], record: Recorder, fn_body: Obj
) -> None:
    """The pools of the Versions that serve (or are about to) exist and list the Function as an owner.

    A Version keeps the pool of the policy and size it was made with, so while a new Version (a
    policy or memory edit) loads, the old one can still claim pods from its own pool. Pools whose
    sandbox has no RuntimeClass are not made (their pods could never start); other pools drop the
    Function as an owner and are deleted when no Function owns them.
    """
    ns, uid = fn.metadata.namespace, fn.metadata.uid
    wanted: dict[str, PoolSpec] = {}
    runtime_classes: dict[str, bool] = {}
    for version in serving:
        pool = _pool_of(settings, version)
        runtime_class = pool.policy.runtime_class
        if runtime_class is not None and runtime_class not in runtime_classes:
            runtime_classes[runtime_class] = await kube.runtime_class_exists(runtime_class)
        if runtime_class is None or runtime_classes[runtime_class]:
            wanted.setdefault(pool.name, pool)
    for pool in wanted.values():
        await _ensure_pool(kube, fn, pool, record, fn_body)
    pools = await kube.list_deployments(
        ns, label_selector=f"{labels.COMPONENT}=pool,{labels.MANAGED_BY}={labels.MANAGER}"
    )
    for deployment in pools:
        meta = deployment["metadata"]
        if meta["name"] in wanted:
            continue
        owners = meta.get("ownerReferences") or []
        rest = [o for o in owners if o.get("uid") != uid]
        if len(rest) == len(owners):
            continue
        if rest:
            meta["ownerReferences"] = rest
            deployment.pop("status", None)
            await kube.replace_deployment(deployment)
        else:
            await kube.delete_deployment(ns, meta["name"])
            await kube.delete_network_policy(ns, meta["name"])
            record(
                fn_body,
                type="Normal",
                reason="PoolDeleted",
                message=f"Deleted warm pool {meta['name']}: no Version of a Function uses it any more.",
            )


async def _ensure_pool(kube: Kube, fn: Function, wanted: PoolSpec, record: Recorder, fn_body: Obj) -> None:
    """One pool Deployment exists, lists the Function as an owner and runs the wanted template."""
    desired = pool_deployment(wanted)
    spec_hash = _digest(desired["spec"]["template"])
    desired["metadata"]["annotations"][SPEC_HASH_ANNOTATION] = spec_hash
    actual = await kube.get_deployment(wanted.namespace, wanted.name)
    if actual is None:
        desired["metadata"]["ownerReferences"] = [_function_owner(fn)]
        await kube.create_deployment(desired)
        record(
            fn_body,
            type="Normal",
            reason="PoolCreated",
            message=f"Created warm pool {wanted.name} ({wanted.runtime}, {wanted.sandbox}, "
            f"{wanted.memory_mib}Mi) with {wanted.replicas} generic pods.",
        )
    else:
        owners = actual["metadata"].get("ownerReferences") or []
        changed = False
        if not any(o.get("uid") == fn.metadata.uid for o in owners):
            actual["metadata"]["ownerReferences"] = [*owners, _function_owner(fn)]
            changed = True
        if actual["metadata"].get("annotations", {}).get(SPEC_HASH_ANNOTATION) != spec_hash:
            actual["spec"]["template"] = desired["spec"]["template"]
            actual["metadata"].setdefault("annotations", {}).update(desired["metadata"]["annotations"])
            changed = True
        if changed:
            actual.pop("status", None)
            await kube.replace_deployment(actual)
    stored = await kube.get_deployment(wanted.namespace, wanted.name)
    if stored is not None:
        await _ensure_pool_network_policy(kube, wanted, wanted.policy, stored["metadata"].get("uid"))


async def _ensure_pool_network_policy(
    kube: Kube, pool: PoolSpec, policy: SecurityPolicySpec, deployment_uid: str | None
) -> None:
    desired = pool_network_policy(
        pool_id=pool.id, namespace=pool.namespace, owner_uid=deployment_uid, egress=policy.egress
    ).network_policy
    spec_hash = _digest(desired["spec"])
    desired["metadata"]["annotations"] = {SPEC_HASH_ANNOTATION: spec_hash}
    actual = await kube.get_network_policy(pool.namespace, desired["metadata"]["name"])
    if actual is None:
        await kube.create_network_policy(desired)
    elif (actual["metadata"].get("annotations") or {}).get(SPEC_HASH_ANNOTATION) != spec_hash:
        desired["metadata"]["resourceVersion"] = actual["metadata"]["resourceVersion"]
        await kube.replace_network_policy(desired)


async def _ensure_network_policy(kube: Kube, fn: Function, policy: SecurityPolicySpec) -> tuple[str, ...]:
    plan = function_network_policy(
        function_name=fn.metadata.name,
        namespace=fn.metadata.namespace,
        function_uid=fn.metadata.uid,
        egress=policy.egress,
    )
    desired = plan.network_policy
    spec_hash = _digest(desired["spec"])
    desired["metadata"]["annotations"] = {SPEC_HASH_ANNOTATION: spec_hash}
    actual = await kube.get_network_policy(fn.metadata.namespace, desired["metadata"]["name"])
    if actual is None:
        await kube.create_network_policy(desired)
    elif (actual["metadata"].get("annotations") or {}).get(SPEC_HASH_ANNOTATION) != spec_hash:
        desired["metadata"]["resourceVersion"] = actual["metadata"]["resourceVersion"]
        await kube.replace_network_policy(desired)
    return plan.unenforced_hosts


def _version_ready_condition(
    latest: int, created: bool, by_number: Mapping[int, Obj], ready_version: int | None
) -> tuple[ConditionStatus, str, str]:
    serving = f" Version {ready_version} serves meanwhile." if ready_version and ready_version != latest else ""
    if created:
        return "Unknown", cond.Reason.VERSION_LOADING, f"Version {latest} was created and is loading.{serving}"
    ready = cond.find(_conditions_of(by_number.get(latest)), cond.READY)
    if ready is not None and ready.status == "True":
        return "True", cond.Reason.READY, f"Version {latest} is ready."
    if ready is not None and ready.status == "False" and ready.reason in cond.PERMANENT_REASONS:
        return "False", cond.Reason.VERSION_FAILED, f"Version {latest} failed: {ready.message}{serving}"
    detail = f" ({ready.message})" if ready is not None and ready.message else ""
    return "Unknown", cond.Reason.VERSION_LOADING, f"Version {latest} is loading{detail}.{serving}"


async def reconcile_function(
    kube: Kube, settings: Settings, body: Obj, *, now: dt.datetime, record: Recorder
) -> dict[str, Any]:
    """Converge one Function: its Versions, pool, NetworkPolicy; returns its new status."""
    meta = body.get("metadata", {})
    generation = meta.get("generation")
    old_status = body.get("status") or {}
    old_conditions = _conditions_of(old_status)
    try:
        fn = Function.model_validate(_resource(body))
    except ValidationError as err:
        conditions = cond.mark_false(
            old_conditions, cond.READY, cond.Reason.INVALID_SPEC, f"Invalid spec: {err}", generation=generation, now=now
        )
        if _status_changed(old_conditions, conditions, cond.READY):
            record(body, type="Warning", reason=cond.Reason.INVALID_SPEC, message=f"Invalid spec: {err}")
        return {"observedGeneration": generation, "conditions": _wire_conditions(conditions)}

    ns, name = fn.metadata.namespace, fn.metadata.name
    conditions = list(old_conditions)
    policy = await resolve_policy(kube, settings, ns, fn.spec.security_policy_ref)
    conditions = cond.set_condition(
        conditions,
        type_=cond.POLICY_RESOLVED,
        status=policy.status,
        reason=policy.reason,
        message=policy.message,
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
    ready_numbers = [n for n, st in by_number.items() if cond.is_true(_conditions_of(st), cond.READY)]
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
        if policy.spec is None:
            # No policy to freeze into a Version: none is made until it resolves (PolicyResolved says why).
            status_, reason, message = (
                _version_ready_condition(latest, False, by_number, ready_version)
                if latest is not None
                else ("Unknown", cond.Reason.VERSION_LOADING, "No Version yet: waiting for the SecurityPolicy.")
            )
        else:
            desired_hash = code_hash(fn.spec, policy.spec, digest)
            plan = plan_version(list(versions.values()), desired_hash, last_number=old_status.get("latestVersion"))
            if plan.create is not None:
                new_body = build_version(
                    fn, number=plan.create, code_hash=desired_hash, policy=policy.spec, policy_name=policy.name
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
    await _ensure_pools(kube, settings, fn, [versions[n] for n in sorted(serving) if n in versions], record, body)
    if policy.usable and policy.spec is not None:
        hosts = await _ensure_network_policy(kube, fn, policy.spec)
        if hosts:
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

    conditions = _mark_unsupported(
        conditions, unsupported_function_fields(fn.spec), body, record, generation=generation, now=now
    )
    conditions = cond.with_ready(conditions, cond.FUNCTION_DEPENDENTS, generation=generation, now=now)
    for type_ in (cond.READY, cond.POLICY_RESOLVED, cond.EGRESS_ENFORCED):
        changed = _status_changed(old_conditions, conditions, type_)
        if changed is not None and (changed.status != "Unknown"):
            record(
                body,
                type="Normal" if changed.status == "True" else "Warning",
                reason=changed.reason,
                message=changed.message,
            )
    return {
        "observedGeneration": generation,
        "conditions": _wire_conditions(conditions),
        "latestVersion": latest,
        "readyVersion": ready_version,
        "url": settings.function_url(ns, name),
    }


# Version


async def _ensure_code(kube: Kube, version: Version) -> tuple[ConditionStatus, str, str]:
    spec: FunctionSpec = version.spec.function
    ns = version.metadata.namespace
    if spec.code.url is not None:
        return "True", cond.Reason.CODE_BY_URL, "Code is fetched by the agent from spec.code.url and checked."
    cm_name = code_configmap_name(version.metadata.name)
    if await kube.get_configmap(ns, cm_name) is not None:
        return "True", cond.Reason.CODE_STORED, f"Code is stored in ConfigMap {cm_name}."
    referenced: CodeFiles | None = None
    try:
        if spec.code.config_map_ref is not None:
            ref = spec.code.config_map_ref
            source = await kube.get_configmap(ns, ref.name)
            if source is None:
                return "False", cond.Reason.CODE_MISSING, f"ConfigMap {ref.name!r} with the code does not exist."
            referenced = files_from_configmap(source, key=ref.key)
            if code_hash(spec, version.spec.policy, referenced.digest()) != version.spec.code_hash:
                return (
                    "False",
                    cond.Reason.VERSION_FAILED,
                    f"ConfigMap {ref.name!r} changed after this Version was made; its code is gone "
                    "(a newer Version has the new code).",
                )
        files = version_files(spec, referenced)
    except CodeError as err:
        return "False", cond.Reason.INVALID_SPEC, str(err)
    if files is None:
        return "True", cond.Reason.CODE_BY_URL, "Code is fetched by the agent."
    try:
        await kube.create_configmap(code_configmap(version, files))
    except CodeError as err:
        return "False", cond.Reason.INVALID_SPEC, str(err)
    except Conflict:
        pass  # made by a previous run that stopped before writing the status
    return "True", cond.Reason.CODE_STORED, f"Code is stored in ConfigMap {cm_name}."


async def reconcile_version(
    kube: Kube, settings: Settings, body: Obj, *, now: dt.datetime, record: Recorder
) -> dict[str, Any]:
    """Converge one Version: its code ConfigMap and conditions; returns its new status (a patch)."""
    generation = body.get("metadata", {}).get("generation")
    old_status = body.get("status") or {}
    old_conditions = _conditions_of(old_status)
    try:
        version = Version.model_validate(_resource(body))
    except ValidationError as err:
        conditions = cond.mark_false(
            old_conditions, cond.READY, cond.Reason.INVALID_SPEC, f"Invalid spec: {err}", generation=generation, now=now
        )
        return {"observedGeneration": generation, "conditions": _wire_conditions(conditions), "phase": "Failed"}

    ns = version.metadata.namespace
    code_status, code_reason, code_message = await _ensure_code(kube, version)
    conditions = cond.set_condition(
        old_conditions,
        type_=cond.CODE_READY,
        status=code_status,
        reason=code_reason,
        message=code_message,
        generation=generation,
        now=now,
    )
    annotations = version.metadata.annotations or {}
    ready_pods = await _count_ready_pods(kube, ns, version.spec.function_name, version.spec.number)
    loaded_status, loaded_reason, loaded_message = cond.version_loaded(
        code_hash=version.spec.code_hash,
        loaded_mark=annotations.get(labels.LOADED_ANNOTATION),
        load_error=_load_error(annotations.get(labels.LOAD_ERROR_ANNOTATION)),
        ready_pods=ready_pods,
    )
    conditions = cond.set_condition(
        conditions,
        type_=cond.LOADED,
        status=loaded_status,
        reason=loaded_reason,
        message=loaded_message,
        generation=generation,
        now=now,
    )
    conditions = cond.with_ready(conditions, cond.VERSION_DEPENDENTS, generation=generation, now=now)
    if code_status == "False" and code_reason in cond.PERMANENT_REASONS:
        conditions = cond.mark_false(conditions, cond.READY, code_reason, code_message, generation=generation, now=now)
    phase = cond.version_phase(conditions)
    changed = _status_changed(old_conditions, conditions, cond.READY)
    if changed is not None and changed.status != "Unknown":
        record(
            body,
            type="Normal" if changed.status == "True" else "Warning",
            reason=changed.reason,
            message=changed.message,
        )
    status = {
        "observedGeneration": generation,
        "conditions": _wire_conditions(conditions),
        "phase": phase,
        "readyPods": ready_pods,
    }
    if old_status.get("phase") != phase:
        # The Function's reconcile reads this status: it must be stored before the Function is nudged
        # (kopf writes the returned status only after the handler, which would race the nudge).
        await kube.patch_custom_status("versions", ns, version.metadata.name, status)
        await kube.annotate_custom(
            "functions",
            ns,
            version.spec.function_name,
            {VERSION_TRANSITION_ANNOTATION: f"{version.spec.number}:{phase}"},
        )
    return status


def _load_error(raw: str | None) -> dict[str, Any] | None:
    """The activator's load-error mark (`labels.LOAD_ERROR_ANNOTATION`), or None when absent or unreadable."""
    if not raw:
        return None
    try:
        parsed = json.loads(raw)
    except ValueError:
        return {"codeHash": None, "message": raw}
    return parsed if isinstance(parsed, dict) else None


async def _count_ready_pods(kube: Kube, namespace: str, function: str, number: int) -> int:
    """A Version's specialized pods that are ready (activators specialize them, kubelets report Ready)."""
    selector = f"{labels.FUNCTION}={function},{labels.VERSION}={number},{labels.STATE}={labels.STATE_SPECIALIZED}"
    return sum(1 for pod in await kube.list_pods(namespace, label_selector=selector) if pod_ready(pod))


async def report_version_pods(kube: Kube, namespace: str, function: str, version_label: str) -> int | None:
    """Count a Version's specialized, ready pods into its `status.readyPods` (written only on change).

    Called on every event of a pod labelled with a Function and Version (activators claim, specialize
    and delete them). Returns the count, or None when the label names no Version."""
    try:
        number = int(version_label)
    except ValueError:
        number = 0
    if number < 1:
        log.warning("pod labelled %s=%r in %s: not a Version number; ignored", labels.VERSION, version_label, namespace)
        return None
    name = version_name(function, number)
    version = await kube.get_custom("versions", namespace, name)
    if version is None:
        return None
    ready = await _count_ready_pods(kube, namespace, function, number)
    if (version.get("status") or {}).get("readyPods", 0) != ready:
        await kube.patch_custom_status("versions", namespace, name, {"readyPods": ready})
    code_hash_ = (version.get("spec") or {}).get("codeHash")
    annotations = version.get("metadata", {}).get("annotations") or {}
    if ready > 0 and code_hash_ and annotations.get(labels.LOADED_ANNOTATION) != code_hash_:
        # The lasting evidence that the code loads; the annotation makes kopf reconcile the Version.
        await kube.annotate_custom("versions", namespace, name, {labels.LOADED_ANNOTATION: code_hash_})
    return ready


# SecurityPolicy


async def reconcile_security_policy(
    kube: Kube, settings: Settings, body: Obj, *, now: dt.datetime, record: Recorder
) -> dict[str, Any]:
    """Validate a SecurityPolicy, check its RuntimeClass, and nudge the Functions that use it."""
    meta = body.get("metadata", {})
    generation = meta.get("generation")
    ns, name = meta.get("namespace", "default"), meta.get("name", "")
    old_conditions = _conditions_of(body.get("status"))
    try:
        spec = SecurityPolicySpec.model_validate(body.get("spec") or {})
    except ValidationError as err:
        conditions = cond.mark_false(
            old_conditions, cond.READY, cond.Reason.INVALID_SPEC, f"Invalid spec: {err}", generation=generation, now=now
        )
        return {"observedGeneration": generation, "conditions": _wire_conditions(conditions)}
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
    conditions = _mark_unsupported(
        conditions, unsupported_policy_fields(spec), body, record, generation=generation, now=now
    )
    conditions = cond.with_ready(conditions, (cond.POLICY_RESOLVED,), generation=generation, now=now)
    changed = _status_changed(old_conditions, conditions, cond.READY)
    if changed is not None:
        record(
            body,
            type="Normal" if changed.status == "True" else "Warning",
            reason=changed.reason,
            message=changed.message,
        )
    await notify_functions(kube, settings, ns, name, f"{digest[:16]}-{policy.status}")
    return {"observedGeneration": generation, "conditions": _wire_conditions(conditions), "policyHash": digest}


async def notify_functions(kube: Kube, settings: Settings, namespace: str, policy_name: str, token: str) -> None:
    """Annotate the Functions that use a policy, so that their handlers re-reconcile (pools re-roll)."""
    for item in await kube.list_custom("functions", namespace):
        ref = (item.get("spec") or {}).get("securityPolicyRef") or {}
        uses = ref.get("name") == policy_name or (not ref and policy_name == settings.default_policy_name)
        current = (item["metadata"].get("annotations") or {}).get(labels.POLICY_HASH_ANNOTATION)
        if uses and current != token:
            await kube.annotate_custom(
                "functions", namespace, item["metadata"]["name"], {labels.POLICY_HASH_ANNOTATION: token}
            )
