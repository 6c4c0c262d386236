"""Claim holders and their Leases: who holds a claimed pod, whether that activator is still alive.

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
  deleted whoever holds them (`KubernetesPodSource.sweep_stale_claims`): a live activator that lost
  a claim mid-specialize never releases it.

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

import contextlib
import hashlib
import logging
import math
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

import aiohttp
from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from ember.pods.base import PoolUnavailable
from ember.pods.kubernetes.cache import Obj, state_of
from ember.resources import labels
from ember.scaling.pool_demand import encode_demand

log = logging.getLogger(__name__)

CLAIMED_BY = f"{labels.PREFIX}/claimed-by"
CLAIMED_AT = f"{labels.PREFIX}/claimed-at"
LEASE_PREFIX = "ember-activator-"
LEASE_COMPONENT = "activator"
HELD_STATES = (labels.STATE_CLAIMED, labels.STATE_SPECIALIZED)

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
        if state_of(pod) not in HELD_STATES or meta.get("deletionTimestamp"):
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


class ActivatorLease:
    """This activator's Lease in one namespace, and its verdict on the other activators' Leases."""

    def __init__(
        self,
        api: client.ApiClient,
        coordination: Any,
        *,
        namespace: str,
        holder: str,
        duration_s: float,
        clock: Callable[[], float],
    ) -> None:
        self.namespace = namespace
        self.holder = holder
        self.name = lease_name(holder)
        self.duration_s = duration_s
        self._api: Any = api
        self._coordination = coordination
        self._clock = clock
        self._held: _HeldLease | None = None  # as this process last wrote it
        self._liveness = HolderLiveness(own=self.name, missing_duration_s=duration_s)
        self._live_replicas = 1  # as of the last observation

    @property
    def live_replicas(self) -> int:
        """Live activators sharing this namespace, this one included, as of the last `observe`; at least 1."""
        return self._live_replicas

    @property
    def period_s(self) -> float:
        """How often the Lease is renewed and the sweeps run."""
        return self.duration_s / 3

    @property
    def _call_s(self) -> float:
        """Limit of one Lease call: a renewal stuck on a dead connection must not outlast the Lease."""
        return max(1.0, self.period_s)

    def _body(self, held: _HeldLease, *, version: str | None, demand: Mapping[str, int]) -> Obj:
        metadata: Obj = {
            "name": self.name,
            "namespace": self.namespace,
            "labels": {labels.MANAGED_BY: labels.MANAGER, labels.COMPONENT: LEASE_COMPONENT},
            "annotations": {labels.POOL_DEMAND_ANNOTATION: encode_demand(demand)},
        }
        if version is not None:
            metadata["resourceVersion"] = version
        return {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": metadata,
            "spec": {
                "holderIdentity": self.holder,
                "leaseDurationSeconds": math.ceil(self.duration_s),
                "acquireTime": held.acquired,
                "renewTime": _micro_time(datetime.now(UTC)),
                "leaseTransitions": held.transitions,
            },
        }

    async def renew(self, demand: Mapping[str, int]) -> None:
        """Create or renew the Lease, publishing `demand`; raises `PoolUnavailable` when the API server refuses.

        A renewal replaces the Lease under the resourceVersion this process last wrote. A conflict
        means another writer: a previous incarnation (taken over) or, wrongly, a second process with
        the same holder name, which is logged because the two would delete each other's pods.
        """
        held = self._held
        if held is not None:
            try:
                written = await self._coordination.replace_namespaced_lease(
                    self.name,
                    self.namespace,
                    self._body(held, version=held.version, demand=demand),
                    _request_timeout=self._call_s,
                )
            except ApiException as err:
                if err.status not in (404, 409):
                    raise PoolUnavailable(
                        f"Lease {self.namespace}/{self.name}: renewal failed with {err.status} {err.reason}"
                    ) from err
                if err.status == 409:
                    log.error(
                        "namespace=%s lease=%s was written by another process: is holder %s used twice?",
                        self.namespace,
                        self.name,
                        self.holder,
                    )
                self._held = None
            else:
                self._held = replace(held, version=str(written.metadata.resource_version))
                return
        await self._acquire(demand)

    async def _acquire(self, demand: Mapping[str, int]) -> None:
        """Create the Lease, or take over the one a previous incarnation (same holder) left."""
        held = _HeldLease(version="", acquired=_micro_time(datetime.now(UTC)), transitions=0)
        try:
            written = await self._coordination.create_namespaced_lease(
                self.namespace, self._body(held, version=None, demand=demand), _request_timeout=self._call_s
            )
        except ApiException as err:
            if err.status != 409:
                raise PoolUnavailable(
                    f"Lease {self.namespace}/{self.name}: create failed with {err.status} {err.reason}"
                ) from err
            try:
                current = await self._coordination.read_namespaced_lease(
                    self.name, self.namespace, _request_timeout=self._call_s
                )
                spec = current.spec
                held = replace(held, transitions=(spec.lease_transitions or 0) + 1 if spec is not None else 1)
                written = await self._coordination.replace_namespaced_lease(
                    self.name,
                    self.namespace,
                    self._body(held, version=current.metadata.resource_version, demand=demand),
                    _request_timeout=self._call_s,
                )
            except ApiException as again:
                raise PoolUnavailable(
                    f"Lease {self.namespace}/{self.name}: take-over failed with {again.status} {again.reason}"
                ) from again
        self._held = replace(held, version=str(written.metadata.resource_version))

    async def drop(self) -> None:
        """Delete the Lease (if it is still the one this process wrote), so nobody waits for it to expire.

        A renewal cancelled by `close` may have reached the API server after all: then the Lease is
        newer than the version this process knows (409), and it is read again and deleted if it
        still names this holder."""
        if self._held is None:
            return
        version: str | None = self._held.version
        self._held = None
        for _attempt in range(2):
            try:
                await self._coordination.delete_namespaced_lease(
                    self.name,
                    self.namespace,
                    body=client.V1DeleteOptions(preconditions=client.V1Preconditions(resource_version=version)),
                    _request_timeout=self._call_s,
                )
                return
            except ApiException as err:
                if err.status == 404:
                    return
                if err.status != 409:
                    log.warning("namespace=%s lease=%s delete failed: %s", self.namespace, self.name, err.status)
                    return
            except (aiohttp.ClientError, TimeoutError) as err:
                log.warning("namespace=%s lease=%s delete failed: %s", self.namespace, self.name, err)
                return
            try:
                current = await self._coordination.read_namespaced_lease(
                    self.name, self.namespace, _request_timeout=self._call_s
                )
            except (ApiException, aiohttp.ClientError, TimeoutError):
                return
            if current.spec is None or current.spec.holder_identity != self.holder:
                return
            version = current.metadata.resource_version

    async def list_activator_leases(self) -> list[ObservedLease] | None:
        """The namespace's activator Leases; None (logged) when the API server refuses the list."""
        selector = f"{labels.MANAGED_BY}={labels.MANAGER},{labels.COMPONENT}={LEASE_COMPONENT}"
        try:
            listed = await self._coordination.list_namespaced_lease(
                self.namespace, label_selector=selector, _request_timeout=self._call_s
            )
        except ApiException as err:
            log.warning("namespace=%s listing activator leases failed: %s %s", self.namespace, err.status, err.reason)
            return None
        plain = self._api.sanitize_for_serialization(listed).get("items") or []
        return [
            lease
            for lease in (parse_lease(item, default_duration_s=self.duration_s) for item in plain)
            if lease is not None
        ]

    def observe(self, leases: Iterable[ObservedLease], pods: Iterable[Mapping[str, Any]]) -> set[str]:
        """The dead Lease names, given the listed Leases and the pods read after the list; counts `live_replicas`."""
        leases = list(leases)
        wanted = {lease_name(holder_of(pod)) for pod in pods if state_of(pod) in HELD_STATES}
        dead = self._liveness.observe(self._clock(), leases, wanted)
        self._live_replicas = count_live_replicas(leases, dead, own=self.name)
        return dead

    async def delete_dead(self, leases: Iterable[ObservedLease], dead: Collection[str]) -> None:
        """Delete the dead Leases, each only if it is still at the version seen dead."""
        for lease in leases:
            if lease.name in dead:
                with contextlib.suppress(ApiException):  # 404: gone already; 409: renewed meanwhile
                    await self._coordination.delete_namespaced_lease(
                        lease.name,
                        self.namespace,
                        body=client.V1DeleteOptions(
                            preconditions=client.V1Preconditions(resource_version=lease.resource_version)
                        ),
                        _request_timeout=self._call_s,
                    )
                log.info(
                    "namespace=%s lease=%s deleted: not renewed for %.0fs", self.namespace, lease.name, lease.duration_s
                )
