"""Cluster tier: warm pools are sized by the operator alone, from the claims the activators publish.

The operator (pool floor 1) and an activator run as host processes against the real cluster; the
activator publishes its claims per pool over a short window (`EMBER_POOL_DEMAND_WINDOW_S=20`) on its
Lease. A burst that needs four pods at once claims them from the pool; the pool's Deployment grows
by the claims (floor + demand) and its ReplicaSet starts real gVisor pods for them, then the pool
shrinks back to its floor once the window has passed without claims. The operator's arithmetic
alone is tests/unit/controller/test_pool_size.py and tests/apiserver/test_operator_pool_size.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import pytest

from tests.apiserver.operator_harness import Ember, OperatorProcess, condition, eventually
from tests.cluster.scenarios import ActivatorProcess, invoke

WINDOW_S = 20
SLOW = "import time\n\ndef handler(event, context):\n    time.sleep(3)\n    return {'version': 1, 'hello': 'ember'}\n"
SPEC: dict[str, Any] = {
    "runtime": "python3.12",
    "handler": "main.handler",
    "code": {"inline": SLOW},
    "concurrency": 1,
    "timeoutSeconds": 20,
    "scaling": {"maxScale": 4},
}


@pytest.fixture
def pool_size() -> int:
    return 1


@pytest.fixture
def activator_env() -> dict[str, str]:
    return {"EMBER_POOL_DEMAND_WINDOW_S": str(WINDOW_S)}


def _pool_replicas(ember: Ember) -> int | None:
    pools = list(ember.pools().values())
    return int(pools[0].spec.replicas) if len(pools) == 1 else None


async def test_pool_grows_with_the_claims_and_returns_to_its_floor(
    ember_ns: Ember, operator: OperatorProcess, activator: ActivatorProcess
) -> None:
    ember = ember_ns
    ember.create("functions", {"kind": "Function", "metadata": {"name": "hello"}, "spec": SPEC})
    await asyncio.to_thread(
        eventually,
        lambda: condition(ember.get("functions", "hello"), "Ready").get("status") == "True",
        timeout_s=180,
        what="Function Ready (Version 1 loaded by one claimed pod)",
    )
    seen: list[int] = []

    async def watch(stop: asyncio.Event) -> None:
        while not stop.is_set():
            replicas = await asyncio.to_thread(_pool_replicas, ember)
            if replicas is not None:
                seen.append(replicas)
            await asyncio.sleep(0.5)

    stop = asyncio.Event()
    watcher = asyncio.create_task(watch(stop))
    try:
        # Four slow calls at once with concurrency 1: the activator claims three more pods.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
            results = await asyncio.gather(*(invoke(http, activator.url, ember.ns, "hello") for _ in range(4)))
        assert [r[:3] for r in results] == [(200, "1", "")] * 4, results
        grown = await asyncio.to_thread(
            eventually,
            lambda: (r := _pool_replicas(ember)) is not None and r >= 3 and r,
            timeout_s=30,
            what="the pool grown by the burst's claims",
        )
        print(f"pool grew to {grown} replicas (floor 1)")
        started = time.monotonic()
        await asyncio.to_thread(
            eventually,
            lambda: _pool_replicas(ember) == 1,
            timeout_s=WINDOW_S + 40,
            what="the pool back at its floor once the claims left the window",
        )
        print(f"back at the floor {time.monotonic() - started:.1f} s later")
    finally:
        stop.set()
        await watcher
    assert max(seen) >= 3
    assert max(seen) <= 1 + 4, "never more than the floor plus the claims the burst made"
