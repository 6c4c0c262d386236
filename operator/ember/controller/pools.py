"""Warm pools: the generic pool Deployments of the Versions that serve, and each pool's NetworkPolicy.

A pool is keyed by (runtime, sandbox, size, CPU when the Function sets one, policy hash, whether
its pods' code calls portions: such pods reach the activators' services port) and shared by every Function whose
serving Versions need it: each such Function is a (non-controller) owner, and a pool goes when its
last owner drops it. A Version with `resources.autoResize` takes the pool of its right-sized memory
(`version_memory_mib`, from its stored recommendation): when that changes, the pool of the new size
is made and the old one goes once no serving Version wants it (pods already claimed from it stay
with their Version). Replicas are not set here after creation: `pool_size` owns them. A pool
or pool NetworkPolicy of the wanted name that is not Ember's is left untouched and returned, for
the Function to report (`children`).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any

from ember.api.function import Function
from ember.api.security_policy import SecurityPolicySpec, policy_hash
from ember.api.version import Version
from ember.controller.children import Child, Outcome, deployments, ensure_child, network_policies, not_ours
from ember.controller.kube import Kube, Obj
from ember.controller.settings import Settings
from ember.controller.status import Recorder
from ember.resources import labels
from ember.resources.network_policy import pool_network_policy
from ember.resources.pool import PoolSpec, pool_deployment
from ember.resources.state_volume import state_mount
from ember.scaling.rightsize import applied_resources, parse_recommendation


def _function_owner(fn: Function) -> dict[str, Any]:
    """A non-controller owner reference: a pool may be shared by several Functions."""
    return {"apiVersion": fn.api_version, "kind": "Function", "name": fn.metadata.name, "uid": fn.metadata.uid}


def version_memory_mib(version: Version, status: Mapping[str, Any] | None) -> int:
    """The memory of a Version's new pods: the spec's, or with `autoResize` its stored recommendation's
    (`ember.scaling.rightsize.applied_resources`, the rule `reconcile_version` writes into
    `status.resources`)."""
    advice = parse_recommendation((status or {}).get("recommendation"))
    limit = version.spec.policy.limits.max_memory_mib
    return applied_resources(version.spec.function.resources, max_memory_mib=limit, advice=advice).memory_mib


def _pools_of(settings: Settings, version: Version, status: Mapping[str, Any] | None = None) -> list[PoolSpec]:
    """The generic pools a Version's pods come from: its runtime and size (right-sized with
    `autoResize`, from its stored `status`), under its frozen policy, and as much for each of its
    portions under the portion's (`ember.resources.portions`; they keep the spec's size); with
    `state.volume`, pools of the Function's own that mount its claim."""
    spec = version.spec.function
    sized = version_memory_mib(version, status)
    volume = state_mount(
        spec.state.volume if spec.state is not None else None,
        namespace=version.metadata.namespace,
        function=version.spec.function_name,
    )

    def pool(policy: SecurityPolicySpec, calls: bool, memory_mib: int) -> PoolSpec:
        return PoolSpec(
            namespace=version.metadata.namespace,
            runtime=spec.runtime,
            memory_mib=memory_mib,
            policy=policy,
            policy_hash=policy_hash(policy),
            image=settings.image_for(spec.runtime),
            replicas=settings.pool_size_for(spec.runtime),
            image_pull_policy=settings.image_pull_policy,
            run_as_user=settings.run_as_user,
            cpu_burst_millicores=settings.pool_cpu_burst_millicores,
            activators=settings.activators,
            calls=calls,
            cpu_millicores=spec.resources.cpu_millicores,
            key_value=spec.state is not None and spec.state.key_value,
            volume=volume,
        )

    portions = version.spec.portion_policies
    return [
        pool(version.spec.policy, bool(spec.portions), sized),
        *(
            pool(portions[p.name], bool(p.calls), spec.resources.memory_mib)
            for p in spec.portions
            if p.name in portions
        ),
    ]


async def ensure_pools(
    kube: Kube,
    settings: Settings,
    fn: Function,
    serving: Sequence[Version],
    record: Recorder,
    fn_body: Obj,
    statuses: Mapping[int, Mapping[str, Any]] | None = None,
) -> list[Child]:
    """The pools of the Versions that serve (or are about to) exist and list the Function as an owner.

    A Version keeps the pool of the policy and size it was made with, so while a new Version (a
    policy or memory edit) loads, the old one can still claim pods from its own pool. Pools whose
    sandbox has no RuntimeClass are not made (their pods could never start); other pools drop the
    Function as an owner and are deleted when no Function owns them. Returns the pools and pool
    NetworkPolicies that exist but are not Ember's (`children.Outcome.NOT_OWNED`), left untouched.
    """
    ns, uid = fn.metadata.namespace, fn.metadata.uid
    wanted: dict[str, PoolSpec] = {}
    runtime_classes: dict[str, bool] = {}
    for version in serving:
        for pool in _pools_of(settings, version, (statuses or {}).get(version.spec.number)):
            runtime_class = pool.policy.runtime_class
            if runtime_class is not None and runtime_class not in runtime_classes:
                runtime_classes[runtime_class] = await kube.runtime_class_exists(runtime_class)
            if runtime_class is None or runtime_classes[runtime_class]:
                wanted.setdefault(pool.name, pool)
    not_owned: list[Child] = []
    for pool in wanted.values():
        not_owned += await _ensure_pool(kube, fn, pool, record, fn_body)
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
            await _delete_pool_network_policy(kube, ns, meta["name"])
            record(
                fn_body,
                type="Normal",
                reason="PoolDeleted",
                message=f"Deleted warm pool {meta['name']}: no Version of a Function uses it any more.",
            )
    return not_owned


async def _delete_pool_network_policy(kube: Kube, namespace: str, name: str) -> None:
    """A deleted pool's NetworkPolicy goes too, unless it is not Ember's."""
    found = await kube.get_network_policy(namespace, name)
    if found is not None and not_ours("NetworkPolicy", found, controller=("apps", "Deployment", name)) is None:
        await kube.delete_network_policy(namespace, name)


def _keep_replicas(actual: Obj, desired: Obj) -> Obj:
    """A stale pool: the wanted template and annotations, the owners it has plus the wanted ones.

    Its replicas stay as stored: `pool_size` owns them."""
    body = copy.deepcopy(actual)
    meta = body["metadata"]
    owners = meta.get("ownerReferences") or []
    have = {o.get("uid") for o in owners}
    meta["ownerReferences"] = [*owners, *(o for o in desired["metadata"]["ownerReferences"] if o["uid"] not in have)]
    meta.setdefault("annotations", {}).update(desired["metadata"]["annotations"])
    body["spec"]["template"] = desired["spec"]["template"]
    return body


async def _ensure_pool(kube: Kube, fn: Function, wanted: PoolSpec, record: Recorder, fn_body: Obj) -> list[Child]:
    """One pool Deployment exists, lists the Function as an owner and runs the wanted template, and
    its NetworkPolicy exists; returns those of the two that are not Ember's."""
    desired = pool_deployment(wanted)
    desired["metadata"]["ownerReferences"] = [_function_owner(fn)]
    pool = await ensure_child(deployments(kube), desired, compared=desired["spec"]["template"], merge=_keep_replicas)
    if pool.outcome is Outcome.CREATED:
        record(
            fn_body,
            type="Normal",
            reason="PoolCreated",
            message=f"Created warm pool {wanted.name} ({wanted.runtime}, {wanted.sandbox}, "
            f"{wanted.memory_mib}Mi) with {wanted.replicas} generic pods.",
        )
    if pool.outcome is Outcome.NOT_OWNED:
        return [pool]  # not Ember's pool: its pods get no NetworkPolicy of Ember's either
    if pool.uid is None:
        return []  # deleted right after it was made; its deletion nudges the Function
    network_policy = await _ensure_pool_network_policy(kube, wanted, wanted.policy, pool.uid)
    return [network_policy] if network_policy.outcome is Outcome.NOT_OWNED else []


async def _ensure_pool_network_policy(
    kube: Kube, pool: PoolSpec, policy: SecurityPolicySpec, deployment_uid: str
) -> Child:
    desired = pool_network_policy(
        pool_id=pool.id,
        namespace=pool.namespace,
        owner_uid=deployment_uid,
        egress=policy.egress,
        activators=pool.activators,
        services=bool(policy.services) or pool.calls or pool.key_value,
    ).network_policy
    return await ensure_child(network_policies(kube), desired)
