"""Pool size, owned by the operator: each generic pool's replicas from its floor and the activators' demand.

The floor is the runtime's configured pool size (`EMBER_POOL_SIZE`, `EMBER_POOL_SIZES`); the demand
is what every live activator published on its Lease (`ember.scaling.pool_demand`: its claims per
pool over the last minute). Level-based: every call recomputes all pools of the namespace from
what is stored, so the order and number of Lease events do not matter. The handler calls it on
every activator Lease event (renewals come every few seconds, so demand that stops decays back
to the floor within a minute); a pool the Function reconcile creates starts at its floor.

A Lease counts while its `renewTime` plus twice its duration is not in the past by this
process's clock. Clocks of different machines are compared here, which the activators' own
liveness sweep avoids; for a sizing hint a skew of seconds only delays a resize.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from ember.controller.kube import Kube, Obj
from ember.controller.settings import Settings
from ember.resources import labels
from ember.scaling.pool_demand import decode_demand, pool_replicas

log = logging.getLogger(__name__)

ACTIVATOR_LEASES = f"{labels.COMPONENT}=activator,{labels.MANAGED_BY}={labels.MANAGER}"
POOLS = f"{labels.COMPONENT}=pool,{labels.MANAGED_BY}={labels.MANAGER}"


def _parse_time(raw: Any) -> dt.datetime | None:
    if not isinstance(raw, str):
        return None
    try:
        parsed = dt.datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=dt.UTC)


def live_demand(leases: Iterable[Mapping[str, Any]], *, now: dt.datetime) -> dict[str, int]:
    """Claims per pool id summed over the Leases that are still live (pure)."""
    total: dict[str, int] = {}
    for lease in leases:
        spec = lease.get("spec") or {}
        renewed = _parse_time(spec.get("renewTime"))
        seconds = spec.get("leaseDurationSeconds")
        duration = float(seconds) if isinstance(seconds, int) and not isinstance(seconds, bool) and seconds > 0 else 15
        if renewed is None or renewed + dt.timedelta(seconds=2 * duration) < now:
            continue  # expired: a crashed activator's claims are not demand any more
        annotations = (lease.get("metadata") or {}).get("annotations") or {}
        for pool, count in decode_demand(annotations.get(labels.POOL_DEMAND_ANNOTATION)).items():
            total[pool] = total.get(pool, 0) + count
    return total


def desired_replicas(pool: Mapping[str, Any], settings: Settings, demand: Mapping[str, int]) -> int:
    """Replicas one pool Deployment should have (pure)."""
    meta_labels = (pool.get("metadata") or {}).get("labels") or {}
    floor = settings.pool_size_for(str(meta_labels.get(labels.RUNTIME, "")))
    pool_id = str(meta_labels.get(labels.POOL, ""))
    return pool_replicas(floor=floor, demands=[demand.get(pool_id, 0)], ceiling=settings.max_pool_size)


async def current_demand(kube: Kube, namespace: str, *, now: dt.datetime) -> dict[str, int]:
    """The live activators' demand per pool id in a namespace."""
    return live_demand(await kube.list_leases(namespace, label_selector=ACTIVATOR_LEASES), now=now)


async def reconcile_pool_sizes(kube: Kube, settings: Settings, namespace: str, *, now: dt.datetime) -> list[str]:
    """Scale every pool of the namespace to its desired replicas; returns one line per change."""
    demand = await current_demand(kube, namespace, now=now)
    changes: list[str] = []
    for pool in await kube.list_deployments(namespace, label_selector=POOLS):
        name = pool["metadata"]["name"]
        wanted = desired_replicas(pool, settings, demand)
        have: Obj = pool.get("spec") or {}
        if have.get("replicas") != wanted:
            await kube.scale_deployment(namespace, name, wanted)
            changes.append(f"pool {namespace}/{name}: {have.get('replicas')} -> {wanted} replicas")
    for change in changes:
        log.info("%s", change)
    return changes
