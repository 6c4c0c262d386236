"""The Kubernetes pod source: generic pods of the operator's pool Deployments, claimed by relabelling.

Pods come from the per-namespace pool Deployments the operator keeps (`ember.resources.pool`),
labelled `ember.run/pool=<id>` and `ember.run/state=generic`. One watch over the namespace's
Ember pods (kubernetes_asyncio) keeps a cache; every read here is from that cache.

Claim: pick a ready generic pod of the pool and PATCH its `ember.run/state` to `claimed` with
the pod's `metadata.resourceVersion` as a precondition. Two activators racing for one pod cannot
both win: the API server answers 409 to the second, which tries another pod. The relabelled pod
no longer matches its Deployment's selector, so the ReplicaSet orphans it and starts a
replacement - the pool refills itself.

Specialize: POST the Version's code to the agent, then in one PATCH label the pod with its
Function and Version, mark it `specialized` (which makes it an endpoint) and make the Version its
controller owner (so it goes with the Version). Egress is already limited before any code runs:
the pool's NetworkPolicy selects the pod from its start. Code kept in the Version's ConfigMap is
read from there, so a pod gets the snapshot the Version was made with. Release: delete the pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import aiohttp
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from ember.api.common import API_VERSION, GROUP, VERSION
from ember.api.version import version_name
from ember.pods.base import (
    ClaimKind,
    PodGone,
    PodHandle,
    PodId,
    PoolKey,
    PoolUnavailable,
    SpecializeFailed,
    SpecializeRequest,
    VersionKey,
)
from ember.resources import labels
from ember.resources.code import agent_code_payload, code_configmap_name, files_from_configmap
from ember.resources.pool import AGENT_PORT, pool_id, pool_name

log = logging.getLogger(__name__)

CLAIMED_BY = f"{labels.PREFIX}/claimed-by"
CLAIMED_AT = f"{labels.PREFIX}/claimed-at"
Obj = dict[str, Any]


def pool_id_of(pool: PoolKey) -> str:
    """The `ember.run/pool` label value of a pool key."""
    return pool_id(runtime=pool.runtime, sandbox=pool.sandbox, memory_mib=pool.memory_mib, policy_hash=pool.policy_hash)


def _ready(pod: Obj) -> bool:
    if pod["metadata"].get("deletionTimestamp") or not (pod.get("status") or {}).get("podIP"):
        return False
    conditions = (pod.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _error_of(body: bytes) -> tuple[str, str]:
    try:
        parsed = json.loads(body)
    except ValueError:
        return "InvalidResponse", body[:200].decode(errors="replace")
    if isinstance(parsed, dict):
        return str(parsed.get("errorType", "Unknown")), str(parsed.get("errorMessage", ""))
    return "InvalidResponse", str(parsed)[:200]


class KubernetesPodSource:
    """A `PodSource` over the pods of one namespace."""

    def __init__(
        self,
        api: client.ApiClient,
        *,
        namespace: str,
        holder: str,
        agent_port: int = AGENT_PORT,
        claim_timeout_s: float = 60.0,
        specialize_timeout_s: float = 120.0,
        stale_claim_s: float = 300.0,
    ) -> None:
        self.namespace = namespace
        self.holder = holder
        self._api: Any = api
        self._core: Any = client.CoreV1Api(api)
        self._apps: Any = client.AppsV1Api(api)
        self._custom: Any = client.CustomObjectsApi(api)
        self._agent_port = agent_port
        self._claim_timeout_s = claim_timeout_s
        self._specialize_timeout_s = specialize_timeout_s
        self._stale_claim_s = stale_claim_s
        self._pods: dict[str, Obj] = {}
        self._handles: dict[str, PodHandle] = {}
        self._pool_keys: dict[str, PoolKey] = {}  # pool label value -> key, for pools asked for here
        self._versions: dict[VersionKey, tuple[str, Any]] = {}
        self._changed = asyncio.Condition()
        self._synced = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    # -- lifecycle

    async def start(self) -> None:
        """List the namespace's Ember pods and keep following them."""
        if self._watcher is None:
            self._watcher = asyncio.create_task(self._follow(), name=f"ember-pods-{self.namespace}")
            self._sweeper = asyncio.create_task(self._sweep_forever(), name=f"ember-sweep-{self.namespace}")
        await self._synced.wait()

    async def close(self) -> None:
        """Stop watching. Pods stay: they belong to pools and Versions, not to this process."""
        self._closed = True
        for task in (self._watcher, self._sweeper):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._watcher = self._sweeper = None
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self._notify()

    # -- the PodSource interface

    async def claim(self, pool: PoolKey) -> PodHandle:
        """A ready generic pod of the pool, relabelled `claimed` under a resourceVersion precondition."""
        await self.start()
        wanted = pool_id_of(pool)
        self._pool_keys[wanted] = pool
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._claim_timeout_s
        kind = ClaimKind.POOL_HIT
        tried: set[tuple[str, str]] = set()
        while not self._closed:
            candidates = [
                pod
                for pod in self._pods.values()
                if pod["metadata"].get("labels", {}).get(labels.POOL) == wanted
                and pod["metadata"].get("labels", {}).get(labels.STATE) == labels.STATE_GENERIC
                and _ready(pod)
                and (pod["metadata"]["name"], pod["metadata"]["resourceVersion"]) not in tried
            ]
            # Spread activators over the pool, so that they rarely race for the same pod.
            random.shuffle(candidates)
            for pod in candidates:
                meta = pod["metadata"]
                tried.add((meta["name"], meta["resourceVersion"]))
                claimed = await self._relabel(
                    meta["name"],
                    meta["resourceVersion"],
                    {labels.STATE: labels.STATE_CLAIMED, CLAIMED_BY: self.holder},
                )
                if claimed is not None:
                    return self._handle(claimed, pool, kind)
            kind = ClaimKind.POOL_MISS
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                async with self._changed:
                    await asyncio.wait_for(self._changed.wait(), timeout=remaining)
        raise PoolUnavailable(
            f"no ready generic pod in pool {pool} (ember.run/pool={wanted}) in namespace {self.namespace} "
            f"within {self._claim_timeout_s:.0f}s"
        )

    async def specialize(self, pod: PodHandle, request: SpecializeRequest) -> PodHandle:
        """Load the Version's code through the agent, then own the pod by the Version and make it an endpoint.

        The hot path is one agent call and one PATCH: the Version's uid and code are read once per
        Version (both are immutable) and the pool's NetworkPolicy already holds the pod's egress, so
        relabelling after the code is loaded opens nothing.
        """
        version = request.version
        owner_uid, code = await self._version_facts(version, request.payload.get("code"))
        payload = {**request.payload, "code": code}
        session = self._http()
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            async with session.post(f"http://{pod.address}/v1/specialize", json=payload) as response:
                body = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as err:
            await self.release(pod)
            raise PodGone(f"pod {pod.id} at {pod.address}: specialize request failed: {err}") from err
        if status != 200:
            await self.release(pod)
            error_type, message = _error_of(body)
            raise SpecializeFailed(pod.id, status, error_type, message)
        agent_s = loop.time() - started
        await self._patch_pod(
            pod.id,
            {
                "metadata": {
                    "labels": {
                        labels.STATE: labels.STATE_SPECIALIZED,
                        labels.FUNCTION: version.function,
                        labels.VERSION: str(version.number),
                    },
                    "ownerReferences": [
                        {
                            "apiVersion": API_VERSION,
                            "kind": "Version",
                            "name": version_name(version.function, version.number),
                            "uid": owner_uid,
                            "controller": True,
                            "blockOwnerDeletion": True,
                        }
                    ],
                }
            },
        )
        log.debug(
            "pod=%s version=%s specialized agent_ms=%.1f relabel_ms=%.1f",
            pod.id,
            version,
            agent_s * 1000,
            (loop.time() - started - agent_s) * 1000,
        )
        handle = replace(pod, version=version, concurrency=request.concurrency)
        self._handles[pod.id] = handle
        return handle

    async def release(self, pod: PodHandle) -> None:
        """Delete the pod; idempotent."""
        self._handles.pop(pod.id, None)
        try:
            await self._core.delete_namespaced_pod(pod.id, self.namespace, grace_period_seconds=1)
        except ApiException as err:
            if err.status != 404:
                raise PodGone(f"pod {pod.id}: delete failed with {err.status} {err.reason}") from err

    def endpoints(self, version: VersionKey) -> Sequence[PodHandle]:
        """Specialized, ready pods of the Version, as the watch last saw them."""
        if version.namespace != self.namespace:
            return []
        out: list[PodHandle] = []
        for pod in self._pods.values():
            pod_labels = pod["metadata"].get("labels", {})
            if (
                pod_labels.get(labels.STATE) == labels.STATE_SPECIALIZED
                and pod_labels.get(labels.FUNCTION) == version.function
                and pod_labels.get(labels.VERSION) == str(version.number)
                and _ready(pod)
            ):
                name = pod["metadata"]["name"]
                known = self._handles.get(name)
                out.append(known or self._handle(pod, None, ClaimKind.POOL_HIT, version=version))
        return sorted(out, key=lambda h: h.id)

    async def watch(self, version: VersionKey) -> AsyncIterator[Sequence[PodHandle]]:
        """The Version's endpoints now, then after every change of them."""
        await self.start()
        last: list[PodHandle] | None = None
        while not self._closed:
            current = list(self.endpoints(version))
            if current != last:
                last = current
                yield current
            async with self._changed:
                await self._changed.wait()

    def warm_pods(self) -> Mapping[PoolKey, int]:
        """Ready generic pods per pool this source has claimed from or sized (for metrics)."""
        counts = dict.fromkeys(self._pool_keys.values(), 0)
        for pod in self._pods.values():
            pod_labels = pod["metadata"].get("labels", {})
            key = self._pool_keys.get(pod_labels.get(labels.POOL, ""))
            if key is not None and pod_labels.get(labels.STATE) == labels.STATE_GENERIC and _ready(pod):
                counts[key] += 1
        return counts

    async def ensure_pool(self, pool: PoolKey, size: int) -> None:
        """Scale the pool's Deployment (made by the operator) to `size` generic pods."""
        if size < 0:
            raise ValueError(f"pool size ({size}) must not be negative")
        self._pool_keys[pool_id_of(pool)] = pool
        name = pool_name(pool_id_of(pool))
        try:
            await self._apps.patch_namespaced_deployment_scale(name, self.namespace, {"spec": {"replicas": size}})
        except ApiException as err:
            if err.status == 404:
                raise PoolUnavailable(
                    f"pool {pool}: Deployment {self.namespace}/{name} does not exist (yet); the operator makes it "
                    "for each Function that uses the pool"
                ) from err
            raise PoolUnavailable(f"pool {pool}: scaling failed with {err.status} {err.reason}") from err

    # -- internals

    def _handle(
        self, pod: Obj, pool: PoolKey | None, kind: ClaimKind, *, version: VersionKey | None = None
    ) -> PodHandle:
        status = pod.get("status") or {}
        key = pool or PoolKey(runtime="", sandbox="", memory_mib=0, policy_hash="")
        return PodHandle(
            id=PodId(pod["metadata"]["name"]),
            address=f"{status.get('podIP')}:{self._agent_port}",
            pool=key,
            claim=kind,
            version=version,
        )

    async def _relabel(self, name: str, resource_version: str, new_labels: Mapping[str, str]) -> Obj | None:
        """Patch labels if the pod is still at `resource_version`; None when someone else changed it first."""
        patch = {
            "metadata": {
                "resourceVersion": resource_version,
                "labels": dict(new_labels),
                "annotations": {CLAIMED_AT: f"{time.time():.0f}"},
            }
        }
        try:
            pod = await self._core.patch_namespaced_pod(
                name, self.namespace, patch, _content_type="application/merge-patch+json"
            )
        except ApiException as err:
            if err.status in (404, 409):
                return None
            raise PoolUnavailable(f"pod {name}: claim failed with {err.status} {err.reason}") from err
        plain: Obj = self._api.sanitize_for_serialization(pod)
        self._pods[name] = plain
        return plain

    async def _patch_pod(self, name: str, patch: Obj) -> None:
        try:
            pod = await self._core.patch_namespaced_pod(
                name, self.namespace, patch, _content_type="application/merge-patch+json"
            )
        except ApiException as err:
            raise PodGone(f"pod {name}: patch failed with {err.status} {err.reason}") from err
        self._pods[name] = self._api.sanitize_for_serialization(pod)

    async def _version_facts(self, version: VersionKey, given: Any) -> tuple[str, Any]:
        """(uid, agent code payload) of a Version, read once: a Version and its code never change."""
        cached = self._versions.get(version)
        if cached is not None:
            return cached
        name = version_name(version.function, version.number)
        try:
            owner = await self._custom.get_namespaced_custom_object(GROUP, VERSION, version.namespace, "versions", name)
        except ApiException as err:
            raise PodGone(f"Version {version} cannot be read ({err.status} {err.reason})") from err
        facts = (str(owner["metadata"]["uid"]), await self._code_for(version, given))
        self._versions[version] = facts
        return facts

    async def _code_for(self, version: VersionKey, given: Any) -> Any:
        """The Version's snapshotted code from its ConfigMap; the request's own code for url code."""
        cm_name = code_configmap_name(version_name(version.function, version.number))
        try:
            cm = await self._core.read_namespaced_config_map(cm_name, version.namespace)
        except ApiException as err:
            if err.status == 404 and given is not None:
                return given
            raise PodGone(f"Version {version}: code ConfigMap {cm_name} cannot be read ({err.status})") from err
        return agent_code_payload(files_from_configmap(self._api.sanitize_for_serialization(cm), key=None))

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self._specialize_timeout_s))
        return self._session

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def sweep_stale_claims(self, *, now: float | None = None) -> list[str]:
        """Delete pods left `claimed` longer than `stale_claim_s` (their activator died mid-specialize).

        They left their pool's Deployment when claimed and no Version owns them yet, so nothing else
        would ever remove them. Any activator may sweep; deleting twice is harmless.
        """
        current = time.time() if now is None else now
        stale = []
        for pod in list(self._pods.values()):
            meta = pod["metadata"]
            if meta.get("labels", {}).get(labels.STATE) != labels.STATE_CLAIMED or meta.get("deletionTimestamp"):
                continue
            try:
                claimed_at = float((meta.get("annotations") or {}).get(CLAIMED_AT, "nan"))
            except ValueError:
                claimed_at = float("nan")
            if not current - claimed_at <= self._stale_claim_s:  # NaN (no stamp) counts as stale
                stale.append(meta["name"])
        for name in stale:
            with contextlib.suppress(ApiException):
                await self._core.delete_namespaced_pod(name, self.namespace, grace_period_seconds=1)
            log.warning(
                "namespace=%s pod=%s deleted: claimed over %.0fs ago and never specialized",
                self.namespace,
                name,
                self._stale_claim_s,
            )
        return stale

    async def _sweep_forever(self) -> None:
        while not self._closed:
            await asyncio.sleep(max(1.0, self._stale_claim_s / 4))
            await self.sweep_stale_claims()

    async def _follow(self) -> None:
        """List, then watch, the namespace's Ember pods; relist when the watch expires (410)."""
        selector = f"{labels.MANAGED_BY}={labels.MANAGER}"
        while not self._closed:
            try:
                listed = await self._core.list_namespaced_pod(self.namespace, label_selector=selector)
                self._pods = {p.metadata.name: self._api.sanitize_for_serialization(p) for p in listed.items}
                self._synced.set()
                await self._notify()
                stream = watch.Watch()
                async for event in stream.stream(
                    self._core.list_namespaced_pod,
                    self.namespace,
                    label_selector=selector,
                    resource_version=listed.metadata.resource_version,
                    timeout_seconds=300,
                ):
                    if event["type"] == "ERROR":
                        break  # typically 410 Gone: the resourceVersion is too old; relist
                    pod = self._api.sanitize_for_serialization(event["object"])
                    name = pod["metadata"]["name"]
                    if event["type"] == "DELETED":
                        self._pods.pop(name, None)
                        self._handles.pop(name, None)
                    else:
                        self._pods[name] = pod
                    await self._notify()
            except asyncio.CancelledError:
                raise
            except ApiException as err:
                if err.status != 410:
                    log.warning(
                        "namespace=%s pod watch failed: %s %s; retrying", self.namespace, err.status, err.reason
                    )
                    await asyncio.sleep(1.0)
            except (aiohttp.ClientError, TimeoutError) as err:
                log.warning("namespace=%s pod watch interrupted: %s; retrying", self.namespace, err)
                await asyncio.sleep(1.0)
