"""The Kubernetes pod source: generic pods of the operator's pool Deployments, claimed by relabelling.

Pods come from the per-namespace pool Deployments the operator keeps (`ember.resources.pool`),
labelled `ember.run/pool=<id>` and `ember.run/state=generic`. One watch over the namespace's
Ember pods keeps a cache (`ember.pods.kubernetes.cache`); every read here is from that cache.

Claim: pick a ready generic pod of the pool and PATCH its `ember.run/state` to `claimed` with
the pod's `metadata.resourceVersion` as a precondition. Two activators racing for one pod cannot
both win: the API server answers 409 to the second, which tries another pod. The relabelled pod
no longer matches its Deployment's selector, so the ReplicaSet orphans it and starts a
replacement - the pool refills itself.

Specialize: POST the Version's code to the agent, then in one PATCH label the pod with its
Function and Version, mark it `specialized` (which makes it an endpoint) and make the Version its
controller owner (so it goes with the Version). Egress is already limited before any code runs:
the pool's NetworkPolicy selects the pod from its start. The Version's uid and code are read once
(`ember.pods.kubernetes.code`). Release: delete the pod.

Several activators share a namespace; each claims under its own holder name and keeps a Lease, and
the pods of activators whose Lease died are swept: see `ember.pods.kubernetes.leases`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import aiohttp
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException

from ember.api.common import API_VERSION, GROUP, VERSION
from ember.api.version import version_name
from ember.pods.base import (
    MAX_BOUND_DISCARDS,
    BoundByAnotherClient,
    ClaimKind,
    MemoryKills,
    PodGone,
    PodHandle,
    PodId,
    PoolKey,
    PoolShortage,
    PoolUnavailable,
    Portal,
    SpecializeFailed,
    SpecializeRequest,
    StateHandler,
    VersionKey,
    agent_error,
    bound_by_another,
    new_agent_token,
)
from ember.pods.kubernetes.cache import Obj, PodCache, memory_limit_mib, oom_kills, ready, restarts, state_of
from ember.pods.kubernetes.code import VersionCode
from ember.pods.kubernetes.leases import (
    CLAIMED_AT,
    CLAIMED_BY,
    HELD_STATES,
    ActivatorLease,
    holder_name,
    holder_of,
    pods_of_dead_holders,
)
from ember.pods.services import ServiceProxy
from ember.resources import labels
from ember.resources.pool import AGENT_PORT, pool_id
from ember.scaling.pool_demand import DEFAULT_WINDOW_S, ClaimRate
from ember.scaling.rightsize import isolation_of, sandbox_overhead_mib

log = logging.getLogger(__name__)


def pool_id_of(pool: PoolKey) -> str:
    """The `ember.run/pool` label value of a pool key."""
    return pool_id(
        runtime=pool.runtime,
        sandbox=pool.sandbox,
        memory_mib=pool.memory_mib,
        policy_hash=pool.policy_hash,
        calls=pool.calls,
        cpu_millicores=pool.cpu_millicores,
        key_value=pool.key_value,
        volume=pool.volume,
    )


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
        lease_duration_s: float = 15.0,
        demand_window_s: float = DEFAULT_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
        services: ServiceProxy | None = None,
        services_base: str = "",
    ) -> None:
        if holder != holder_name(holder):
            raise ValueError(
                f"holder {holder!r} must be a DNS label (lower case, digits, '-', at most 63); see holder_name"
            )
        if lease_duration_s < 1:
            raise ValueError(f"lease_duration_s ({lease_duration_s}) must be at least 1")
        self.namespace = namespace
        self.holder = holder
        self._api: Any = api
        self._core: Any = client.CoreV1Api(api)
        self._custom: Any = client.CustomObjectsApi(api)
        self._coordination: Any = client.CoordinationV1Api(api)
        self._lease = ActivatorLease(
            api, self._coordination, namespace=namespace, holder=holder, duration_s=lease_duration_s, clock=clock
        )
        self._claim_rate = ClaimRate(window_s=demand_window_s)
        self._expected: dict[str, int] = {}  # pool id -> prewarm claims the predictor expects
        self._clock = clock
        self._agent_port = agent_port
        self._claim_timeout_s = claim_timeout_s
        self._specialize_timeout_s = specialize_timeout_s
        self._stale_claim_s = stale_claim_s
        self._cache = PodCache()
        self._handles: dict[str, PodHandle] = {}
        self._restarts_at_claim: dict[str, int] = {}  # pods claimed here: their restarts then
        self._restarted: set[str] = set()  # specialized pods whose agent restarted: being deleted
        self.discarded_bound = 0  # pods discarded because another client had bound them first
        # right-sizing: Versions' pods whose container the kubelet saw killed at its memory limit
        self._memory_kills: dict[VersionKey, MemoryKills] = {}
        self._kills_seen: set[tuple[str, str]] = set()  # (pod, dead container) counted already
        self._pool_keys: dict[str, PoolKey] = {}  # pool label value -> key, for pools asked for here
        self._version_code = VersionCode(api, core=self._core, custom=self._custom)
        self._changed = asyncio.Condition()
        self._synced = asyncio.Event()
        self._starting: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()  # relabels of specialized pods
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        # auxiliary services: this activator's proxy, and the URL pods reach it at
        self._services = services
        self._services_base = services_base

    @property
    def cached_pods(self) -> Mapping[str, Obj]:
        """The namespace's Ember pods by name, as the watch last saw them (read-only)."""
        return self._cache.view

    # -- lifecycle

    async def start(self) -> None:
        """Hold this activator's Lease, list the namespace's Ember pods and keep following them.

        Every caller (claim and watch call it too) waits for the one start: no claim happens before
        the Lease exists and the previous incarnation's pods are gone.
        """
        if self._starting is None:
            self._starting = asyncio.create_task(self._start_once(), name=f"ember-start-{self.namespace}")
        await asyncio.shield(self._starting)

    async def _start_once(self) -> None:
        await self.renew_lease()
        self._watcher = asyncio.create_task(self._follow(), name=f"ember-pods-{self.namespace}")
        await self._synced.wait()
        await self._delete_previous_incarnations_pods()
        # The first sweep deletes nothing (every Lease is new to it) but counts the replicas before any claim.
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            await self.sweep_dead_holders()
        self._renewer = asyncio.create_task(self._renew_forever(), name=f"ember-lease-{self.namespace}")
        self._sweeper = asyncio.create_task(self._sweep_forever(), name=f"ember-sweep-{self.namespace}")

    async def close(self) -> None:
        """Stop watching and give up the Lease. Pods stay: the activator released its own before."""
        self._closed = True
        if self._background:  # relabels in flight finish (or release their pod) first
            await asyncio.gather(*self._background, return_exceptions=True)
        for task in (self._starting, self._renewer, self._sweeper, self._watcher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):  # a failed start raised to its callers
                    await task
        self._starting = self._watcher = self._renewer = self._sweeper = None
        await self._lease.drop()
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
        self._claim_rate.record(wanted, self._clock())  # published on the Lease: the operator sizes pools
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._claim_timeout_s
        kind = ClaimKind.POOL_HIT
        tried: set[tuple[str, str]] = set()
        while not self._closed:
            candidates = [
                pod
                for pod in self._cache.claimable(wanted)
                if (pod["metadata"]["name"], pod["metadata"]["resourceVersion"]) not in tried
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
                    self._restarts_at_claim[meta["name"]] = restarts(claimed)
                    return replace(self._handle(claimed, pool, kind), token=new_agent_token())
            kind = ClaimKind.POOL_MISS
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                async with self._changed:
                    await asyncio.wait_for(self._changed.wait(), timeout=remaining)
        if self._closed:
            raise PoolUnavailable("the pod source is closed")
        raise PoolShortage(
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
        facts = await self._version_code.facts(version, request.payload.get("code"))
        payload = {**request.payload, "code": facts.code}
        loop = asyncio.get_running_loop()
        started = loop.time()
        discards = 0
        while True:
            status, body = await self._post_specialize(pod, self._with_services(pod, version, payload))
            if status == 200:
                break
            await self.release(pod)  # every failure releases the pod: the caller's release is a no-op
            if not bound_by_another(status):
                error_type, message = agent_error(body)
                raise SpecializeFailed(pod.id, status, error_type, message)
            # Another client (another pod's code, reaching this one over the pod network where
            # NetworkPolicy does not stop it) bound the agent first: never use it.
            self.discarded_bound += 1
            discards += 1
            log.warning("pod discarded: bound by another client pod=%s pool=%s status=%d", pod.id, pod.pool, status)
            if discards >= MAX_BOUND_DISCARDS:
                raise BoundByAnotherClient(
                    f"pool {pod.pool}: {discards} pods in a row were bound by another client; all discarded"
                )
            pod = await self.claim(pod.pool)
        agent_s = loop.time() - started
        handle = replace(pod, version=version, concurrency=request.concurrency)
        self._handles[pod.id] = handle
        # The activator routes to its own handles at once; the relabel that makes the pod the
        # Version's (owner reference, labels for everyone else) follows off the cold path.
        task = asyncio.create_task(self._mark_specialized(handle, facts.uid))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        log.debug("pod=%s version=%s specialized agent_ms=%.1f", pod.id, version, agent_s * 1000)
        return handle

    def _with_services(self, pod: PodHandle, version: VersionKey, payload: dict[str, Any]) -> dict[str, Any]:
        """The specialize body, with the URLs of the pool's auxiliary services and its portions
        (a fresh grant of this activator's proxy for the pod) in its environment."""
        if not pod.pool.channel:
            return payload
        services = pod.pool.isolation.services
        if self._services is None or not self._services_base:
            raise SpecializeFailed(
                pod.id,
                503,
                "ServicesUnavailable",
                "the policy lists auxiliary services, the code calls portions or uses key-value state, but this "
                "activator serves no services proxy (EMBER_SERVICES_ADDRESS)",
            )
        scope = version.state_scope if pod.pool.key_value else None
        token = self._services.grant(PodId(pod.id), version.namespace, services, state_scope=scope)
        announced = ServiceProxy.announce(
            self._services_base, token, services, calls=pod.pool.calls, state=pod.pool.key_value
        )
        return {**payload, "env": {**payload.get("env", {}), **announced}}

    def _forget_services(self, pod: str) -> None:
        if self._services is not None:
            self._services.revoke(PodId(pod))

    async def _post_specialize(self, pod: PodHandle, payload: Mapping[str, Any]) -> tuple[int, bytes]:
        headers = {"Authorization": pod.authorization}
        try:
            async with self._http().post(f"http://{pod.address}/v1/specialize", json=payload, headers=headers) as r:
                return r.status, await r.read()
        except (aiohttp.ClientError, TimeoutError) as err:
            await self.release(pod)
            raise PodGone(f"pod {pod.id} at {pod.address}: specialize request failed: {err}") from err

    async def _mark_specialized(self, handle: PodHandle, owner_uid: str) -> None:
        """Label a specialized pod with its Function and Version and make the Version its owner.

        Retried while the API server is busy. If it still fails the pod leaves this source's
        endpoints: the scaler drains it (invocations in flight finish) and then releases it."""
        version = handle.version
        assert version is not None
        patch = {
            "metadata": {
                "annotations": {labels.AGENT_RESTARTS_ANNOTATION: str(self._restarts_at_claim.get(handle.id, 0))},
                "labels": {
                    labels.STATE: labels.STATE_SPECIALIZED,
                    labels.FUNCTION: version.function,
                    labels.VERSION: str(version.number),
                    **({labels.PORTION: version.portion} if version.portion else {}),
                },
                "ownerReferences": [
                    {
                        "apiVersion": API_VERSION,
                        "kind": "Version",
                        "name": version_name(version.function, version.number),
                        "uid": owner_uid,
                        "controller": True,
                        # blocking the owner's deletion needs update on versions/finalizers where
                        # OwnerReferencesPermissionEnforcement is on; pods go with the Version anyway
                        "blockOwnerDeletion": False,
                    }
                ],
            }
        }
        started = time.perf_counter()
        error = ""
        for delay in (0.2, 0.5, 1.0, None):
            try:
                self._cache.store(await self._merge_patch_pod(handle.id, patch))
            except ApiException as err:
                error = f"{err.status} {err.reason}"
                if err.status == 404 or (err.status != 429 and (err.status or 0) < 500):
                    break  # gone, or refused for good
            except (aiohttp.ClientError, TimeoutError, ValueError) as err:
                error = f"{type(err).__name__}: {err}"
            except Exception as err:  # the pod must not stay half-specialized because of a fault here
                log.exception("pod=%s version=%s relabel crashed", handle.id, version)
                error = f"{type(err).__name__}: {err}"
                break
            else:
                log.debug(
                    "pod=%s version=%s relabelled ms=%.1f", handle.id, version, (time.perf_counter() - started) * 1000
                )
                await self._notify()
                return
            if delay is None or handle.id not in self._handles:
                break
            await asyncio.sleep(delay)
        if self._handles.pop(handle.id, None) is not None:
            log.warning(
                "pod=%s version=%s not relabelled (%s); it leaves routing and goes when idle", handle.id, version, error
            )
        await self._notify()

    async def release(self, pod: PodHandle) -> None:
        """Delete the pod; idempotent."""
        self._handles.pop(pod.id, None)
        self._restarts_at_claim.pop(pod.id, None)
        self._forget_services(pod.id)
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
        for pod in self._cache.values():
            pod_labels = pod["metadata"].get("labels", {})
            name = pod["metadata"]["name"]
            if name in self._restarted:
                continue
            known = self._handles.get(name)
            if known is not None and known.version == version and ready(pod):
                out.append(known)  # specialized here (its relabel may still be on its way)
            elif (
                pod_labels.get(labels.STATE) == labels.STATE_SPECIALIZED
                and pod_labels.get(labels.FUNCTION) == version.function
                and pod_labels.get(labels.VERSION) == str(version.number)
                and pod_labels.get(labels.PORTION, "") == version.portion
                and ready(pod)
            ):
                out.append(self._handle(pod, None, ClaimKind.POOL_HIT, version=version))
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
        for wanted, key in self._pool_keys.items():
            counts[key] += len(self._cache.claimable(wanted))
        return counts

    async def ensure_pool(self, pool: PoolKey, size: int) -> None:
        """Nothing to do: pool size is the operator's (`ember.controller.pool_size`), from this source's
        published claims (`pool_demand`) and its floor. Remembers the pool for `warm_pods`."""
        if size < 0:
            raise ValueError(f"pool size ({size}) must not be negative")
        self._pool_keys[pool_id_of(pool)] = pool

    def expect_claims(self, claims: Mapping[PoolKey, int]) -> None:
        """The predictor's prewarms due within the demand window: added to `pool_demand`, so the
        operator has a generic pod ready for each when it comes."""
        self._expected = {pool_id_of(pool): count for pool, count in claims.items() if count > 0}

    def pool_demand(self) -> dict[str, int]:
        """Claims per pool id over the last minute plus the claims the predictor expects in the next
        one, as published on this activator's Lease."""
        demand = self._claim_rate.demand(self._clock())
        for pool, count in self._expected.items():
            demand[pool] = demand.get(pool, 0) + count
        return demand

    # -- internals

    def route_calls(self, portal: Portal) -> None:
        if self._services is not None:
            self._services.portal = portal

    def route_state(self, handler: StateHandler) -> None:
        if self._services is not None:
            self._services.state = handler

    async def report_load_failure(self, version: VersionKey, *, code_hash: str, message: str) -> None:
        """Annotate the Version with its load error (`labels.LOAD_ERROR_ANNOTATION`); the operator reads it.

        Best effort: a failed write is logged, and the next failed load of the Version writes again.
        A portion's failure is its own annotation (`labels.PORTION_LOAD_ERROR_PREFIX` + its name), not
        the Version's Loaded: the operator shows it as PortionsLoaded=False, and this activator fails
        the calls to that portion with it."""
        mark = json.dumps({"codeHash": code_hash, "message": message[: labels.LOAD_ERROR_MAX_CHARS]})
        key = labels.PORTION_LOAD_ERROR_PREFIX + version.portion if version.portion else labels.LOAD_ERROR_ANNOTATION
        patch = {"metadata": {"annotations": {key: mark}}}
        name = version_name(version.function, version.number)
        try:
            await self._custom.patch_namespaced_custom_object(
                GROUP, VERSION, version.namespace, "versions", name, patch, _content_type="application/merge-patch+json"
            )
        except (ApiException, aiohttp.ClientError, TimeoutError) as err:
            log.warning("load failure not reported version=%s error=%s", version, err)

    def memory_kills(self, version: VersionKey) -> MemoryKills:
        """The Version's pods (any activator's) the kubelet reported `OOMKilled` (`_check_oom`)."""
        return self._memory_kills.get(version, MemoryKills())

    def sandbox_overhead_mib(self, pool: PoolKey) -> int:
        """What the pool's sandbox takes beyond the worker: gVisor's Sentry runs in the pod's cgroup."""
        return sandbox_overhead_mib(pool.runtime, isolation_of(pool.sandbox))

    async def report_sizing(self, version: VersionKey, *, report: str) -> None:
        """Annotate the Version with this activator's right-sizing advice (`labels.SIZING_ANNOTATION`);
        the operator folds it into the Version's status. Best effort: the next change writes again."""
        if version.portion:
            return  # a portion's pods keep their Function's size (`ember.activator.sizing`)
        patch = {"metadata": {"annotations": {labels.SIZING_ANNOTATION: report}}}
        name = version_name(version.function, version.number)
        try:
            await self._custom.patch_namespaced_custom_object(
                GROUP, VERSION, version.namespace, "versions", name, patch, _content_type="application/merge-patch+json"
            )
        except (ApiException, aiohttp.ClientError, TimeoutError) as err:
            log.warning("sizing not reported version=%s error=%s", version, err)

    def _check_oom(self, pod: Obj) -> None:
        """Count a Version's pod whose container was killed at its memory limit, once per dead container."""
        meta = pod["metadata"]
        pod_labels = meta.get("labels") or {}
        function, number = pod_labels.get(labels.FUNCTION), pod_labels.get(labels.VERSION)
        if not function or not number or not str(number).isdigit():
            return
        for mark in oom_kills(pod):
            seen = (meta["name"], mark)
            if seen in self._kills_seen:
                continue
            self._kills_seen.add(seen)
            version = VersionKey(self.namespace, function, int(number), pod_labels.get(labels.PORTION, ""))
            size = memory_limit_mib(pod)
            self._memory_kills[version] = self.memory_kills(version).plus(size)
            log.warning("pod=%s version=%s killed: out of memory (memoryMiB=%d)", meta["name"], version, size)

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
            plain = await self._merge_patch_pod(name, patch)
        except ApiException as err:
            if err.status in (404, 409):
                return None
            raise PoolUnavailable(f"pod {name}: claim failed with {err.status} {err.reason}") from err
        self._cache.store(plain)
        return plain

    async def _merge_patch_pod(self, name: str, patch: Obj) -> Obj:
        """Merge-patch a pod; the API server's JSON as a dict (`ApiException` on an error status).

        Read as plain JSON: the client's model classes cost about 2 ms of CPU per pod, on the cold path."""
        response = await self._core.patch_namespaced_pod(
            name, self.namespace, patch, _content_type="application/merge-patch+json", _preload_content=False
        )
        async with response:
            data = await response.read()
            if not 200 <= response.status <= 299:
                raise ApiException(status=response.status, reason=response.reason)
        pod: Obj = json.loads(data)
        return pod

    def _check_restart(self, pod: Obj) -> None:
        """A specialized (or claimed-here) pod whose containers restarted since its claim holds a
        generic agent now (its code and token died with the old one; after an OOM kill, say):
        it leaves the endpoints at once and is deleted (whichever activator sees it first)."""
        meta = pod["metadata"]
        name = meta["name"]
        if name in self._restarted:
            return
        recorded: int | None = self._restarts_at_claim.get(name)
        if recorded is None and state_of(pod) == labels.STATE_SPECIALIZED:
            try:
                recorded = int((meta.get("annotations") or {}).get(labels.AGENT_RESTARTS_ANNOTATION, ""))
            except ValueError:
                recorded = None  # specialized before this annotation existed
        if recorded is None or restarts(pod) <= recorded:
            return
        self._restarted.add(name)
        self._handles.pop(name, None)
        log.warning(
            "pod=%s version=%s agent restarted since its claim (restarts %d, then %d): deleted",
            name,
            (meta.get("labels") or {}).get(labels.VERSION),
            recorded,
            restarts(pod),
        )
        task = asyncio.create_task(self._delete_pod(name))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

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
        for pod in list(self._cache.values()):
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
            await self._delete_pod(name)
            log.warning(
                "namespace=%s pod=%s deleted: claimed over %.0fs ago and never specialized",
                self.namespace,
                name,
                self._stale_claim_s,
            )
        return stale

    # -- the holder's Lease and the sweeps (see the module docstring)

    def live_replicas(self) -> int:
        """Live activators sharing this namespace, this one included, as of the last sweep; at least 1."""
        return self._lease.live_replicas

    @property
    def sweep_period_s(self) -> float:
        """How often the Lease is renewed and the sweeps run."""
        return self._lease.period_s

    async def renew_lease(self) -> None:
        """Create or renew this activator's Lease with its `pool_demand`; `PoolUnavailable` when refused."""
        await self._lease.renew(self.pool_demand())

    async def _delete_previous_incarnations_pods(self) -> None:
        """Delete pods claimed under this holder name before this process started: nothing routes to them."""
        mine = [
            pod["metadata"]["name"]
            for pod in self._cache.values()
            if holder_of(pod) == self.holder and state_of(pod) in HELD_STATES
        ]
        for name in mine:
            await self._delete_pod(name)
        if mine:
            log.warning(
                "namespace=%s holder=%s deleted %d pods of a previous incarnation: %s",
                self.namespace,
                self.holder,
                len(mine),
                ",".join(sorted(mine)),
            )

    async def sweep_dead_holders(self) -> list[str]:
        """Delete pods whose holder's Lease is dead, then the dead Leases; the pods deleted. Counts `live_replicas`.

        The Leases are listed before the pod cache is read: a pod claimed after the list shows a
        holder whose Lease looks missing, which `HolderLiveness` forgives for a whole lease duration.
        """
        leases = await self._lease.list_activator_leases()
        if leases is None:
            return []
        pods = list(self._cache.values())
        dead = self._lease.observe(leases, pods)
        if not dead:
            return []
        doomed = pods_of_dead_holders(pods, dead, own=self.holder)
        for name in doomed:
            await self._delete_pod(name)
        if doomed:
            log.warning(
                "namespace=%s deleted %d pods of activators without a live lease: %s",
                self.namespace,
                len(doomed),
                ",".join(doomed),
            )
        await self._lease.delete_dead(leases, dead)
        return doomed

    async def _delete_pod(self, name: str) -> None:
        try:
            await self._core.delete_namespaced_pod(name, self.namespace, grace_period_seconds=1)
        except ApiException as err:
            if err.status != 404:
                log.warning("namespace=%s pod=%s delete failed: %s %s", self.namespace, name, err.status, err.reason)

    async def _renew_forever(self) -> None:
        while not self._closed:
            await asyncio.sleep(self.sweep_period_s)
            try:
                await self.renew_lease()
            except (PoolUnavailable, aiohttp.ClientError, TimeoutError) as err:
                log.warning("namespace=%s lease=%s not renewed: %s", self.namespace, self._lease.name, err)
            except Exception:  # the loop must outlive any fault: without it the others delete our pods
                log.exception("namespace=%s lease=%s renewal crashed", self.namespace, self._lease.name)

    async def _sweep_forever(self) -> None:
        stale_period_s = max(1.0, self._stale_claim_s / 4)
        last_stale = self._clock()
        while not self._closed:
            await asyncio.sleep(self.sweep_period_s)
            try:
                await self.sweep_dead_holders()
                if self._clock() - last_stale >= stale_period_s:
                    last_stale = self._clock()
                    await self.sweep_stale_claims()
            except (aiohttp.ClientError, TimeoutError) as err:
                log.warning("namespace=%s sweep interrupted: %s", self.namespace, err)
            except Exception:
                log.exception("namespace=%s sweep failed", self.namespace)

    async def _follow(self) -> None:
        """List, then watch, the namespace's Ember pods; relist when the watch expires (410)."""
        selector = f"{labels.MANAGED_BY}={labels.MANAGER}"
        while not self._closed:
            try:
                listed = await self._core.list_namespaced_pod(self.namespace, label_selector=selector)
                self._cache.replace(self._api.sanitize_for_serialization(p) for p in listed.items)
                for pod in list(self._cache.values()):
                    self._check_restart(pod)
                    self._check_oom(pod)
                self._synced.set()
                await self._notify()
                stream = watch.Watch(return_type="object")  # plain dicts: no model classes per event
                async for event in stream.stream(
                    self._core.list_namespaced_pod,
                    self.namespace,
                    label_selector=selector,
                    resource_version=listed.metadata.resource_version,
                    timeout_seconds=300,
                ):
                    if event["type"] == "ERROR":
                        break  # typically 410 Gone: the resourceVersion is too old; relist
                    pod = event["raw_object"]
                    name = pod["metadata"]["name"]
                    if event["type"] == "DELETED":
                        self._cache.remove(name)
                        self._handles.pop(name, None)
                        self._restarts_at_claim.pop(name, None)
                        self._restarted.discard(name)
                        self._forget_services(name)
                        self._kills_seen = {seen for seen in self._kills_seen if seen[0] != name}
                    else:
                        self._cache.put(pod)
                        self._check_restart(pod)
                        self._check_oom(pod)
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
