"""Warm pools: the generic pool Deployments of the Versions that serve, and each pool's NetworkPolicy.

A pool is keyed by (runtime, sandbox, size, policy hash) and shared by every Function whose
serving Versions need it: each such Function is a (non-controller) owner, and a pool goes when its
last owner drops it. Replicas are not set here after creation: `pool_size` owns them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ember.api.function import Function
from ember.api.security_policy import SecurityPolicySpec, policy_hash
from ember.api.version import Version
from ember.controller.children import SPEC_HASH_ANNOTATION, spec_digest
from ember.controller.kube import Kube, Obj
from ember.controller.settings import Settings
from ember.controller.status import Recorder
from ember.resources import labels
from ember.resources.network_policy import pool_network_policy
from ember.resources.pool import PoolSpec, pool_deployment


def _function_owner(fn: Function) -> dict[str, Any]:
    """A non-controller owner reference: a pool may be shared by several Functions."""
    return {"apiVersion": fn.api_version, "kind": "Function", "name": fn.metadata.name, "uid": fn.metadata.uid}


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


async def ensure_pools(
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
    spec_hash = spec_digest(desired["spec"]["template"])
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
    spec_hash = spec_digest(desired["spec"])
    desired["metadata"]["annotations"] = {SPEC_HASH_ANNOTATION: spec_hash}
    actual = await kube.get_network_policy(pool.namespace, desired["metadata"]["name"])
    if actual is None:
        await kube.create_network_policy(desired)
    elif (actual["metadata"].get("annotations") or {}).get(SPEC_HASH_ANNOTATION) != spec_hash:
        desired["metadata"]["resourceVersion"] = actual["metadata"]["resourceVersion"]
        await kube.replace_network_policy(desired)
