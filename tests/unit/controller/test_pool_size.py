"""Pool size (the operator owns it): replicas from the floor and the live activators' published demand.

Runs `reconcile_pool_sizes` against `FakeKube`; the same against a real kube-apiserver, with the
demand written by the real Kubernetes pod source, is in tests/apiserver/test_operator_pool_size.py.
"""

from __future__ import annotations

import datetime as dt
from typing import Any, cast

from ember.controller.pool_size import live_demand, reconcile_pool_sizes
from ember.controller.settings import Settings
from tests.unit.controller.fake_kube import FakeKube

NOW = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
NS = "ns1"
Obj = dict[str, Any]


def _lease(name: str, demand: str | None, *, renewed_s_ago: float = 1.0, duration_s: int = 15) -> Obj:
    annotations = {"ember.run/pool-demand": demand} if demand is not None else {}
    renewed = (NOW - dt.timedelta(seconds=renewed_s_ago)).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return {
        "metadata": {
            "name": name,
            "namespace": NS,
            "labels": {"ember.run/component": "activator", "app.kubernetes.io/managed-by": "ember-operator"},
            "annotations": annotations,
        },
        "spec": {"holderIdentity": name, "leaseDurationSeconds": duration_s, "renewTime": renewed},
    }


def _pool(pool_id: str, runtime: str, replicas: int) -> Obj:
    return {
        "metadata": {
            "name": f"ember-pool-{pool_id}",
            "namespace": NS,
            "labels": {
                "ember.run/component": "pool",
                "ember.run/pool": pool_id,
                "ember.run/runtime": runtime,
                "app.kubernetes.io/managed-by": "ember-operator",
            },
        },
        "spec": {"replicas": replicas},
    }


def test_live_demand_sums_live_leases_and_ignores_expired_and_garbled_ones() -> None:
    leases = [
        _lease("a", '{"p1": 2, "p2": 1}'),
        _lease("b", '{"p1": 3}'),
        _lease("crashed", '{"p1": 50}', renewed_s_ago=120),  # older than twice its duration
        _lease("garbled", "{not json"),
        _lease("silent", None),
        {"metadata": {"name": "no-spec"}},
    ]
    assert live_demand(leases, now=NOW) == {"p1": 5, "p2": 1}


async def test_pools_follow_demand_within_floor_and_ceiling() -> None:
    kube = FakeKube()
    for pool in (_pool("p1", "python3.12", 1), _pool("p2", "nodejs20", 1), _pool("p3", "python3.12", 1)):
        kube.deployments[(NS, pool["metadata"]["name"])] = pool
    kube.leases = [_lease("a", '{"p1": 2, "p2": 40}'), _lease("b", '{"p1": 3}')]
    settings = Settings(default_pool_size=1, pool_sizes={"nodejs20": 2}, max_pool_size=10)
    changes = await reconcile_pool_sizes(cast(Any, kube), settings, NS, now=NOW)
    assert sorted(kube.writes) == ["scale deployment/ember-pool-p1=6", "scale deployment/ember-pool-p2=10"]
    assert len(changes) == 2
    # Level-based: the same picture again writes nothing; demand gone brings pools back to the floor.
    kube.writes.clear()
    assert await reconcile_pool_sizes(cast(Any, kube), settings, NS, now=NOW) == []
    kube.leases = []
    await reconcile_pool_sizes(cast(Any, kube), settings, NS, now=NOW)
    assert sorted(kube.writes) == ["scale deployment/ember-pool-p1=1", "scale deployment/ember-pool-p2=2"]
