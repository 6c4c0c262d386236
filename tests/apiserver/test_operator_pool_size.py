"""Pool size has one owner, the operator: pool replicas follow the demand activators publish on their Leases.

The operator runs as a subprocess against the session's real kube-apiserver; the demand comes from
the real `KubernetesPodSource` (an activator's pod source) claiming from a pool that has no ready
pod (no kubelet runs in this tier, so every claim waits, which is exactly the demand a pool must
meet) and renewing its Lease. A graceful close deletes the Lease, and the pool falls back to its
floor.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from kubernetes_asyncio import client as aclient
from kubernetes_asyncio import config as aconfig
from tests.apiserver.operator_harness import (  # the fixtures are used by name
    Ember,
    OperatorProcess,
    crds,
    ember,
    eventually,
    hello_function,
    ns,
    operator,
)

from ember.api.function import FunctionSpec
from ember.api.security_policy import DEFAULT_POLICY
from ember.pods.base import PoolUnavailable
from ember.pods.kubernetes import KubernetesPodSource
from ember.pods.payload import pool_key

__all__ = ["crds", "ember", "ns", "operator"]


def _replicas(ember: Ember) -> int | None:
    pools = ember.pools()
    if len(pools) != 1:
        return None
    (pool,) = pools.values()
    return int(pool.spec.replicas)


async def test_pool_replicas_follow_the_claims_activators_publish(
    ember: Ember, operator: OperatorProcess, kubeconfig: Path
) -> None:
    fn = ember.create("functions", hello_function())
    eventually(lambda: _replicas(ember) == 1, what="the pool at its floor (EMBER_POOL_SIZE=1)")
    pool = pool_key(FunctionSpec.model_validate(fn["spec"]), DEFAULT_POLICY)

    configuration = aclient.Configuration()
    await aconfig.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    async with aclient.ApiClient(configuration) as api:
        source = KubernetesPodSource(api, namespace=ember.ns, holder="busy-activator", claim_timeout_s=0.2)
        try:
            for _ in range(3):
                with pytest.raises(PoolUnavailable):
                    await source.claim(pool)  # no ready pod: the claim waits, then gives up
            await source.renew_lease()
            eventually(lambda: _replicas(ember) == 4, what="the pool at floor 1 + 3 claims")
        finally:
            await source.close()  # deletes the Lease: its demand is gone
    eventually(lambda: _replicas(ember) == 1, what="the pool back at its floor")
    assert operator.alive()
