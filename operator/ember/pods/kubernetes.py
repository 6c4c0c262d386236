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

More than one activator (replicas of the chart's Deployment, or host processes) share a namespace.
Each one claims under its own *holder* name (`ember.run/claimed-by`, a DNS label: the pod name in
a cluster, `<host>-<pid>` on a host; see `holder_name`) and routes only to the pods it specialized
itself. Pods outlive the activator that claimed them unless something deletes them, so:

- Each activator holds a coordination.k8s.io/v1 Lease `ember-activator-<holder>` in the namespace
  (labelled `ember.run/component=activator`), renewed every `lease_duration_s / 3`. It is created
  before the first claim, so a claimed pod's holder always had a Lease; a graceful close deletes it.
  Every renewal also publishes the activator's claims per pool over the last minute
  (`ember.run/pool-demand`, `ember.scaling.pool_demand`): the operator, which owns pool size, keeps
  that many spare generic pods on top of each pool's floor.
- Every activator sweeps every `lease_duration_s / 3`: it lists the activator Leases and deletes
  the claimed and specialized pods whose holder's Lease is *dead*, then the dead Leases themselves
  (with a resourceVersion precondition, so a Lease renewed meanwhile stays). Dead means: not
  renewed (its resourceVersion unchanged), or missing, for the Lease's duration as measured by the
  sweeper's own monotonic clock since it last saw a change (`HolderLiveness`). Like client-go's
  leader election, no machine's `renewTime` is compared with another machine's clock; the price is
  that a sweeper needs one lease duration of watching before it deletes anything after it starts.
  A pod with no or a malformed holder label counts as one whose Lease is missing. The sweep is
  level-based and idempotent: several activators deleting the same pod is harmless.
- On start, before its first claim, an activator deletes the pods still claimed by its own holder
  name: a previous incarnation's (a restarted container keeps its pod name), which it cannot route
  to because it never knew them.
- Independently, every `stale_claim_s / 4`, pods left `claimed` longer than `stale_claim_s` are
  deleted whoever holds them (`sweep_stale_claims`): a live activator that lost a claim
  mid-specialize never releases it.

So an activator that dies without closing (crash, SIGKILL, node loss) loses its pods to the others
within about one lease duration plus two sweep periods of its last renewal. An activator that
cannot renew for a lease duration (partitioned from the API server) is treated as dead: its pods
are deleted under it, its routing sees them go, and it recreates its Lease when it can.

Scaling is per activator: each replica runs its own autoscaler per Version over the invocations it
receives and keeps the pods it claimed. Demand-driven pod counts add up (the Service spreads the
load, each replica scales for its share), and so do the bounds: `live_replicas` counts the live
activator Leases of the namespace (this one's included) as of the last sweep, and with N of them
each replica keeps a Version within ceil(minScale / N) and ceil(maxScale / N)
(`ember.scaling.autoscaler.replica_bounds`). A Lease counts until it is deleted (a graceful close)
or seen dead, so after a crash the survivors keep their smaller shares for about a lease duration,
and a replica that just started counts every Lease it finds until it has watched them that long.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
import random
import re
import time
from collections.abc import AsyncIterator, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
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
from ember.resources.meta import pod_ready
from ember.resources.objects import Obj
from ember.resources.pool import AGENT_PORT, pool_id
from ember.scaling.pool_demand import ClaimRate, encode_demand

log = logging.getLogger(__name__)

CLAIMED_BY = f"{labels.PREFIX}/claimed-by"
CLAIMED_AT = f"{labels.PREFIX}/claimed-at"
LEASE_PREFIX = "ember-activator-"
LEASE_COMPONENT = "activator"

_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_NOT_DNS = re.compile(r"[^a-z0-9-]+")


def holder_name(raw: str) -> str:
    """`raw` as a claim holder: a DNS label (a valid label value and Lease name part), unique per `raw`.

    A pod name is usually one already and is kept as it is; anything else (an FQDN host name, a
    253-character pod name) is folded to lower case and `-`, cut, and suffixed with 32 bits of a
    hash of `raw`, so that names that fold alike (`Host_1`, `host.1`) still get different holders.
    """
    if _DNS_LABEL.match(raw):
        return raw
    folded = _NOT_DNS.sub("-", raw.lower()).strip("-")
    digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
    return f"{folded[:54].rstrip('-')}-{digest}".lstrip("-")


def lease_name(holder: str) -> str:
    """The Lease an activator with this holder name keeps alive."""
    return f"{LEASE_PREFIX}{holder}"


def holder_of(pod: Mapping[str, Any]) -> str:
    """The `claimed-by` holder of a pod; "" when missing or not a string (no Lease can match it)."""
    value = ((pod.get("metadata") or {}).get("labels") or {}).get(CLAIMED_BY)
    return value if isinstance(value, str) else ""


def _state_of(pod: Mapping[str, Any]) -> Any:
    return ((pod.get("metadata") or {}).get("labels") or {}).get(labels.STATE)


@dataclass(frozen=True, slots=True)
class ObservedLease:
    """What the sweep needs of an activator Lease: its name, its version (a renewal changes it), its term."""

    name: str
    resource_version: str
    duration_s: float


def parse_lease(obj: Mapping[str, Any], *, default_duration_s: float) -> ObservedLease | None:
    """An activator Lease as the sweep sees it; None when it has no name or resourceVersion."""
    meta = obj.get("metadata") or {}
    name, version = meta.get("name"), meta.get("resourceVersion")
    if not isinstance(name, str) or not isinstance(version, str):
        return None
    seconds = (obj.get("spec") or {}).get("leaseDurationSeconds")
    duration_s = default_duration_s
    if isinstance(seconds, int) and not isinstance(seconds, bool) and seconds > 0:
        duration_s = float(seconds)
    return ObservedLease(name=name, resource_version=version, duration_s=duration_s)


class HolderLiveness:
    """Which Leases went unrenewed (or missing) for their whole duration, by this process's clock.

    `observe` is called once per sweep with the Leases that exist and the Lease names that pods'
    holders need; a Lease is seen renewed whenever its resourceVersion changes (or it appears or
    disappears), and dead once `duration_s` has passed on `now` (monotonic seconds) since then.
    Only Lease names seen in the last call are remembered.
    """

    def __init__(self, *, own: str, missing_duration_s: float) -> None:
        self._own = own
        self._missing_duration_s = missing_duration_s
        self._seen: dict[str, tuple[str | None, float]] = {}

    def observe(self, now: float, leases: Iterable[ObservedLease], wanted: Collection[str]) -> set[str]:
        """Record this sweep's view; return the dead Lease names (never this process's own)."""
        existing = {lease.name: lease for lease in leases}
        dead = set()
        seen: dict[str, tuple[str | None, float]] = {}
        for name in existing.keys() | set(wanted):
            if name == self._own:
                continue
            lease = existing.get(name)
            marker = lease.resource_version if lease is not None else None
            previous = self._seen.get(name)
            since = previous[1] if previous is not None and previous[0] == marker else now
            seen[name] = (marker, since)
            duration = lease.duration_s if lease is not None else self._missing_duration_s
            if now - since >= duration:
                dead.add(name)
        self._seen = seen
        return dead


def count_live_replicas(leases: Iterable[ObservedLease], dead: Collection[str], *, own: str) -> int:
    """Activators sharing the namespace: the Leases not seen dead, and this process's own (at least 1)."""
    return len({lease.name for lease in leases if lease.name not in dead} | {own})


def pods_of_dead_holders(pods: Iterable[Mapping[str, Any]], dead: Collection[str], *, own: str) -> list[str]:
    """Names of claimed or specialized pods, not being deleted, whose holder's Lease is in `dead`."""
    out = []
    for pod in pods:
        meta = pod.get("metadata") or {}
        if _state_of(pod) not in (labels.STATE_CLAIMED, labels.STATE_SPECIALIZED) or meta.get("deletionTimestamp"):
            continue
        holder = holder_of(pod)
        if holder != own and lease_name(holder) in dead and isinstance(meta.get("name"), str):
            out.append(meta["name"])
    return sorted(out)


@dataclass(frozen=True, slots=True)
class _HeldLease:
    """This process's own Lease: the resourceVersion it last wrote, and what a renewal keeps."""

    version: str
    acquired: str  # MicroTime
    transitions: int


def _micro_time(at: datetime) -> str:
    """A Kubernetes MicroTime (RFC 3339, microseconds, UTC)."""
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def pool_id_of(pool: PoolKey) -> str:
    """The `ember.run/pool` label value of a pool key."""
    return pool_id(runtime=pool.runtime, sandbox=pool.sandbox, memory_mib=pool.memory_mib, policy_hash=pool.policy_hash)


def _ready(pod: Obj) -> bool:
    """Ready and reachable: the activator routes to the pod's IP."""
    return pod_ready(pod) and bool((pod.get("status") or {}).get("podIP"))


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
        lease_duration_s: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
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
        self._lease_duration_s = lease_duration_s
        self._lease_name = lease_name(holder)
        self._lease: _HeldLease | None = None  # as this process last wrote it
        self._liveness = HolderLiveness(own=self._lease_name, missing_duration_s=lease_duration_s)
        self._live_replicas = 1  # as of the last sweep
        self._claim_rate = ClaimRate()
        self._clock = clock
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
        self._starting: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()  # relabels of specialized pods
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

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
        await self._drop_lease()
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
        handle = replace(pod, version=version, concurrency=request.concurrency)
        self._handles[pod.id] = handle
        # The activator routes to its own handles at once; the relabel that makes the pod the
        # Version's (owner reference, labels for everyone else) follows off the cold path.
        task = asyncio.create_task(self._mark_specialized(handle, owner_uid))
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        log.debug("pod=%s version=%s specialized agent_ms=%.1f", pod.id, version, agent_s * 1000)
        return handle

    async def _mark_specialized(self, handle: PodHandle, owner_uid: str) -> None:
        """Label a specialized pod with its Function and Version and make the Version its owner.

        Retried while the API server is busy. If it still fails the pod leaves this source's
        endpoints: the scaler drains it (invocations in flight finish) and then releases it."""
        version = handle.version
        assert version is not None
        patch = {
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
                self._store(await self._merge_patch_pod(handle.id, patch))
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
            name = pod["metadata"]["name"]
            known = self._handles.get(name)
            if known is not None and known.version == version and _ready(pod):
                out.append(known)  # specialized here (its relabel may still be on its way)
            elif (
                pod_labels.get(labels.STATE) == labels.STATE_SPECIALIZED
                and pod_labels.get(labels.FUNCTION) == version.function
                and pod_labels.get(labels.VERSION) == str(version.number)
                and _ready(pod)
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
        for pod in self._pods.values():
            pod_labels = pod["metadata"].get("labels", {})
            key = self._pool_keys.get(pod_labels.get(labels.POOL, ""))
            if key is not None and pod_labels.get(labels.STATE) == labels.STATE_GENERIC and _ready(pod):
                counts[key] += 1
        return counts

    async def ensure_pool(self, pool: PoolKey, size: int) -> None:
        """Nothing to do: pool size is the operator's (`ember.controller.pool_size`), from this source's
        published claims (`pool_demand`) and its floor. Remembers the pool for `warm_pods`."""
        if size < 0:
            raise ValueError(f"pool size ({size}) must not be negative")
        self._pool_keys[pool_id_of(pool)] = pool

    def pool_demand(self) -> dict[str, int]:
        """Claims per pool id over the last minute, as published on this activator's Lease."""
        return self._claim_rate.demand(self._clock())

    # -- internals

    async def report_load_failure(self, version: VersionKey, *, code_hash: str, message: str) -> None:
        """Annotate the Version with its load error (`labels.LOAD_ERROR_ANNOTATION`); the operator reads it.

        Best effort: a failed write is logged, and the next failed load of the Version writes again."""
        mark = json.dumps({"codeHash": code_hash, "message": message[: labels.LOAD_ERROR_MAX_CHARS]})
        patch = {"metadata": {"annotations": {labels.LOAD_ERROR_ANNOTATION: mark}}}
        name = version_name(version.function, version.number)
        try:
            await self._custom.patch_namespaced_custom_object(
                GROUP, VERSION, version.namespace, "versions", name, patch, _content_type="application/merge-patch+json"
            )
        except (ApiException, aiohttp.ClientError, TimeoutError) as err:
            log.warning("load failure not reported version=%s error=%s", version, err)

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
        self._store(plain)
        return plain

    def _store(self, pod: Obj) -> None:
        """Put a pod the API server returned into the cache, unless the watch already knows better.

        A reply can arrive after a newer watch event: a pod deleted meanwhile stays out, and an
        older resourceVersion does not replace a newer one."""
        name = pod["metadata"]["name"]
        cached = self._pods.get(name)
        if cached is None:
            return
        try:
            if int(pod["metadata"]["resourceVersion"]) < int(cached["metadata"]["resourceVersion"]):
                return
        except (KeyError, TypeError, ValueError):
            pass  # resourceVersions are opaque in general; these are the API server's integers
        self._pods[name] = pod

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
        return self._live_replicas

    @property
    def sweep_period_s(self) -> float:
        """How often the Lease is renewed and the sweeps run."""
        return self._lease_duration_s / 3

    @property
    def _lease_call_s(self) -> float:
        """Limit of one Lease call: a renewal stuck on a dead connection must not outlast the Lease."""
        return max(1.0, self.sweep_period_s)

    def _lease_body(self, held: _HeldLease, *, version: str | None) -> Obj:
        metadata: Obj = {
            "name": self._lease_name,
            "namespace": self.namespace,
            "labels": {labels.MANAGED_BY: labels.MANAGER, labels.COMPONENT: LEASE_COMPONENT},
            "annotations": {labels.POOL_DEMAND_ANNOTATION: encode_demand(self.pool_demand())},
        }
        if version is not None:
            metadata["resourceVersion"] = version
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": {
                "holderIdentity": self.holder,
                "leaseDurationSeconds": math.ceil(self._lease_duration_s),
                "acquireTime": held.acquired,
                "renewTime": _micro_time(datetime.now(UTC)),
                "leaseTransitions": held.transitions,
            },
        }

    async def renew_lease(self) -> None:
        """Create or renew this activator's Lease; raises `PoolUnavailable` when the API server refuses.

        A renewal replaces the Lease under the resourceVersion this process last wrote. A conflict
        means another writer: a previous incarnation (taken over) or, wrongly, a second process with
        the same holder name, which is logged because the two would delete each other's pods.
        """
        held = self._lease
        if held is not None:
            try:
                written = await self._coordination.replace_namespaced_lease(
                    self._lease_name,
                    self.namespace,
                    self._lease_body(held, version=held.version),
                    _request_timeout=self._lease_call_s,
                )
            except ApiException as err:
                if err.status not in (404, 409):
                    raise PoolUnavailable(
                        f"Lease {self.namespace}/{self._lease_name}: renewal failed with {err.status} {err.reason}"
                    ) from err
                if err.status == 409:
                    log.error(
                        "namespace=%s lease=%s was written by another process: is holder %s used twice?",
                        self.namespace,
                        self._lease_name,
                        self.holder,
                    )
                self._lease = None
            else:
                self._lease = replace(held, version=str(written.metadata.resource_version))
                return
        await self._acquire_lease()

    async def _acquire_lease(self) -> None:
        """Create the Lease, or take over the one a previous incarnation (same holder) left."""
        held = _HeldLease(version="", acquired=_micro_time(datetime.now(UTC)), transitions=0)
        try:
            written = await self._coordination.create_namespaced_lease(
                self.namespace, self._lease_body(held, version=None), _request_timeout=self._lease_call_s
            )
        except ApiException as err:
            if err.status != 409:
                raise PoolUnavailable(
                    f"Lease {self.namespace}/{self._lease_name}: create failed with {err.status} {err.reason}"
                ) from err
            try:
                current = await self._coordination.read_namespaced_lease(
                    self._lease_name, self.namespace, _request_timeout=self._lease_call_s
                )
                spec = current.spec
                held = replace(held, transitions=(spec.lease_transitions or 0) + 1 if spec is not None else 1)
                written = await self._coordination.replace_namespaced_lease(
                    self._lease_name,
                    self.namespace,
                    self._lease_body(held, version=current.metadata.resource_version),
                    _request_timeout=self._lease_call_s,
                )
            except ApiException as again:
                raise PoolUnavailable(
                    f"Lease {self.namespace}/{self._lease_name}: take-over failed with {again.status} {again.reason}"
                ) from again
        self._lease = replace(held, version=str(written.metadata.resource_version))

    async def _drop_lease(self) -> None:
        """Delete this process's Lease (if it is still the one it wrote), so nobody waits for it to expire.

        A renewal cancelled by `close` may have reached the API server after all: then the Lease is
        newer than the version this process knows (409), and it is read again and deleted if it
        still names this holder."""
        if self._lease is None:
            return
        version: str | None = self._lease.version
        self._lease = None
        for _attempt in range(2):
            try:
                await self._coordination.delete_namespaced_lease(
                    self._lease_name,
                    self.namespace,
                    body=client.V1DeleteOptions(preconditions=client.V1Preconditions(resource_version=version)),
                    _request_timeout=self._lease_call_s,
                )
                return
            except ApiException as err:
                if err.status == 404:
                    return
                if err.status != 409:
                    log.warning("namespace=%s lease=%s delete failed: %s", self.namespace, self._lease_name, err.status)
                    return
            except (aiohttp.ClientError, TimeoutError) as err:
                log.warning("namespace=%s lease=%s delete failed: %s", self.namespace, self._lease_name, err)
                return
            try:
                current = await self._coordination.read_namespaced_lease(
                    self._lease_name, self.namespace, _request_timeout=self._lease_call_s
                )
            except (ApiException, aiohttp.ClientError, TimeoutError):
                return
            if current.spec is None or current.spec.holder_identity != self.holder:
                return
            version = current.metadata.resource_version

    async def _delete_previous_incarnations_pods(self) -> None:
        """Delete pods claimed under this holder name before this process started: nothing routes to them."""
        mine = [
            pod["metadata"]["name"]
            for pod in self._pods.values()
            if holder_of(pod) == self.holder and _state_of(pod) in (labels.STATE_CLAIMED, labels.STATE_SPECIALIZED)
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
        selector = f"{labels.MANAGED_BY}={labels.MANAGER},{labels.COMPONENT}={LEASE_COMPONENT}"
        try:
            listed = await self._coordination.list_namespaced_lease(
                self.namespace, label_selector=selector, _request_timeout=self._lease_call_s
            )
        except ApiException as err:
            log.warning("namespace=%s listing activator leases failed: %s %s", self.namespace, err.status, err.reason)
            return []
        plain = self._api.sanitize_for_serialization(listed).get("items") or []
        leases = [
            lease
            for lease in (parse_lease(item, default_duration_s=self._lease_duration_s) for item in plain)
            if lease is not None
        ]
        pods = list(self._pods.values())
        held = (labels.STATE_CLAIMED, labels.STATE_SPECIALIZED)
        wanted = {lease_name(holder_of(pod)) for pod in pods if _state_of(pod) in held}
        dead = self._liveness.observe(self._clock(), leases, wanted)
        self._live_replicas = count_live_replicas(leases, dead, own=self._lease_name)
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
        for lease in leases:
            if lease.name in dead:
                with contextlib.suppress(ApiException):  # 404: gone already; 409: renewed meanwhile
                    await self._coordination.delete_namespaced_lease(
                        lease.name,
                        self.namespace,
                        body=client.V1DeleteOptions(
                            preconditions=client.V1Preconditions(resource_version=lease.resource_version)
                        ),
                        _request_timeout=self._lease_call_s,
                    )
                log.info(
                    "namespace=%s lease=%s deleted: not renewed for %.0fs", self.namespace, lease.name, lease.duration_s
                )
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
                log.warning("namespace=%s lease=%s not renewed: %s", self.namespace, self._lease_name, err)
            except Exception:  # the loop must outlive any fault: without it the others delete our pods
                log.exception("namespace=%s lease=%s renewal crashed", self.namespace, self._lease_name)

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
                self._pods = {p.metadata.name: self._api.sanitize_for_serialization(p) for p in listed.items}
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
