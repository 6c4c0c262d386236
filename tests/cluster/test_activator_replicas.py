"""Cluster tier: two activators on one namespace share its pools, and one's crash is cleaned up by the other.

The operator and two activators (`python -m ember.activator_main`, holders `act-a` and `act-b`, a 6 s
holder Lease) run as host processes against the real cluster; function pods are real gVisor pods.
200 invocations at concurrency 8, half through each activator, all succeed; pods were claimed by both
holders; no pod ever ran more invocations at once than the Function's concurrency (the handler keeps
a per-pod in-flight count in the pod's /tmp, shared by the agent's worker processes). Then `act-a` is
SIGKILLed: `act-b`'s sweep deletes `act-a`'s pods within the lease duration and two sweep periods,
while clients of `act-b` keep invoking with no failure. A Function with maxScale 2 (concurrency 1) under a
burst through both activators never has more than 2 specialized pods in all (each activator keeps its
share, ceil(2 / 2) = 1), and what does not fit in a pod and its activator's queue gets 429, never a 5xx.
Lease and sweep logic against the API server alone is tests/apiserver/test_activator_leases.py; the
share arithmetic and the scaler's use of it are tests/unit.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kubernetes import client

from tests.apiserver.operator_harness import Ember, OperatorProcess, condition, eventually
from tests.cluster.scenarios import ActivatorProcess as Activator

LEASE_S = 6.0
SWEEP_S = LEASE_S / 3
CONCURRENCY = 2
# Each invocation counts itself in and out of a file in the pod's /tmp under flock: the peak is the
# most invocations that pod ever ran at once (workers are processes, so a file, not a global).
CODE = """\
import fcntl, socket, time

PATH = "/tmp/ember-in-flight"


def _add(delta):
    with open(PATH, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        now, peak = (int(x) for x in (f.read().split() or ["0", "0"]))
        now += delta
        peak = max(peak, now)
        f.seek(0)
        f.truncate()
        f.write(f"{now} {peak}")
        return peak


def handler(event, context):
    peak = _add(1)
    try:
        time.sleep(event.get("sleep_s", 0.05))
    finally:
        _add(-1)
    return {"pod": socket.gethostname(), "peak": peak}
"""
SPEC: dict[str, Any] = {
    "runtime": "python3.12",
    "handler": "main.handler",
    "code": {"inline": CODE},
    "concurrency": CONCURRENCY,
}


@pytest.fixture
def pool_size() -> int:
    """A pool of 4 warm pods: both activators find capacity without waiting for refills."""
    return 4


@pytest.fixture
def activators(
    kubeconfig: Path, ember_ns: Ember, operator: OperatorProcess, tmp_path: Path
) -> Iterator[tuple[Activator, Activator]]:
    pair = tuple(
        Activator(
            kubeconfig,
            ember_ns.ns,
            tmp_path / f"{holder}.log",
            holder=holder,
            env={"EMBER_ACTIVATOR_LEASE_S": str(LEASE_S)},
        )
        for holder in ("act-a", "act-b")
    )
    try:
        for activator in pair:
            activator.start()
        yield pair  # type: ignore[misc]
    finally:
        for activator in pair:
            activator.stop()
            print(f"--- {activator.holder} log ---\n{activator.log_tail()}")


Outcome = tuple[int, str, Any]


async def _invoke(http: aiohttp.ClientSession, url: str, ns: str) -> Outcome:
    async with http.post(f"{url}/v1/namespaces/{ns}/functions/hello/invoke", data=json.dumps({})) as rsp:
        body = await rsp.read()
        error = rsp.headers.get("X-Ember-Function-Error", "")
        return rsp.status, error, json.loads(body) if rsp.status == 200 else body.decode(errors="replace")


async def _clients(url: str, ns: str, *, clients: int, calls: int | None, stop: asyncio.Event | None) -> list[Outcome]:
    """`clients` concurrent callers of one activator, each making `calls` calls or calling until `stop`."""
    outcomes: list[Outcome] = []

    async def one() -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            made = 0
            while (calls is None or made < calls) and (stop is None or not stop.is_set()):
                outcomes.append(await _invoke(http, url, ns))
                made += 1

    await asyncio.gather(*(one() for _ in range(clients)))
    return outcomes


def _failures(outcomes: list[Outcome]) -> list[Outcome]:
    return [o for o in outcomes if o[0] != 200 or o[1]]


def _ready_generic(ember: Ember) -> int:
    pods = ember.core.list_namespaced_pod(ember.ns, label_selector="ember.run/state=generic")
    return sum(
        1
        for p in pods.items
        if p.metadata.deletion_timestamp is None
        and any(c.type == "Ready" and c.status == "True" for c in (p.status.conditions or []))
    )


def _leases(ember: Ember) -> list[Any]:
    return list(client.CoordinationV1Api(ember.core.api_client).list_namespaced_lease(ember.ns).items)


def _live_pods_of(ember: Ember, holder: str) -> set[str]:
    pods = ember.core.list_namespaced_pod(ember.ns, label_selector=f"ember.run/claimed-by={holder}")
    return {p.metadata.name for p in pods.items if p.metadata.deletion_timestamp is None}


async def test_two_activators_share_the_pools_and_a_killed_ones_pods_are_swept(
    ember_ns: Ember, activators: tuple[Activator, Activator]
) -> None:
    ember = ember_ns
    one, two = activators
    ember.create("functions", {"kind": "Function", "metadata": {"name": "hello"}, "spec": SPEC})
    eventually(
        lambda: condition(ember.get("functions", "hello"), "Ready").get("status") == "True",
        timeout_s=60,
        what="Function Ready",
    )
    eventually(lambda: _ready_generic(ember) == 4, timeout_s=240, what="4 ready generic pods in gVisor")

    # 200 invocations at concurrency 8: 4 clients x 25 calls through each activator.
    outcomes = await asyncio.gather(*(_clients(a.url, ember.ns, clients=4, calls=25, stop=None) for a in activators))
    every = [*outcomes[0], *outcomes[1]]
    assert len(every) == 200
    assert _failures(every) == []
    peaks: dict[str, int] = {}
    for _, _, body in every:
        peaks[body["pod"]] = max(peaks.get(body["pod"], 0), body["peak"])
    assert max(peaks.values()) <= CONCURRENCY, peaks

    pods = ember.core.list_namespaced_pod(ember.ns, label_selector="ember.run/function=hello").items
    holders = {p.metadata.labels.get("ember.run/claimed-by") for p in pods}
    assert holders == {"act-a", "act-b"}, holders
    assert {p.metadata.name for p in pods} >= set(peaks)
    assert {lease.spec.holder_identity for lease in _leases(ember)} == {"act-a", "act-b"}

    # SIGKILL act-a while act-b keeps serving; act-a's pods go within the lease and two sweep periods.
    orphans = _live_pods_of(ember, "act-a")
    survivors = _live_pods_of(ember, "act-b")
    assert orphans
    assert survivors
    stop = asyncio.Event()
    load = asyncio.create_task(_clients(two.url, ember.ns, clients=4, calls=None, stop=stop))
    try:
        await asyncio.sleep(1.0)
        one.kill()
        killed_at = time.monotonic()
        bound_s = LEASE_S + 2 * SWEEP_S + 5.0  # + deletion and watch latency
        for _ in range(int(bound_s / 0.2)):
            # the client calls of the load run on this loop: the API calls go to a thread
            if not await asyncio.to_thread(_live_pods_of, ember, "act-a") & orphans:
                break
            await asyncio.sleep(0.2)
        swept_after_s = time.monotonic() - killed_at
        left = await asyncio.to_thread(_live_pods_of, ember, "act-a") & orphans
        assert not left, f"pods of the killed activator still there after {swept_after_s:.1f}s: {left}"
        print(f"act-a's {len(orphans)} pods deleted {swept_after_s:.1f}s after SIGKILL (lease {LEASE_S:.0f}s)")
        await asyncio.sleep(2 * SWEEP_S)  # a couple more sweeps while act-b serves
    finally:
        stop.set()
        served = await load
    assert served, "act-b served nothing during the sweep"
    assert _failures(served) == []
    assert max(body["peak"] for _, _, body in served) <= CONCURRENCY
    assert survivors <= _live_pods_of(ember, "act-b"), "the live activator's pods must stay"
    eventually(
        lambda: "act-a" not in {lease.spec.holder_identity for lease in _leases(ember)},
        timeout_s=LEASE_S + 3 * SWEEP_S,
        what="act-a's expired Lease deleted",
    )


CAPPED_MAX_SCALE = 2
QUEUE_DEPTH = 200  # the activator's default per Version: one pod busy plus this many queued, then 429
CAPPED_SPEC: dict[str, Any] = {
    "runtime": "python3.12",
    "handler": "main.handler",
    "code": {
        "inline": "import socket, time\n\ndef handler(event, context):\n    time.sleep(0.02)\n"
        "    return {'pod': socket.gethostname()}\n"
    },
    "concurrency": 1,
    "scaling": {"maxScale": CAPPED_MAX_SCALE},
}


def _function_pods(ember: Ember, function: str) -> dict[str, str]:
    """Specialized pods of a Function that are not being deleted, by name, with their holder."""
    pods = ember.core.list_namespaced_pod(ember.ns, label_selector=f"ember.run/function={function}").items
    return {
        p.metadata.name: p.metadata.labels.get("ember.run/claimed-by", "")
        for p in pods
        if p.metadata.deletion_timestamp is None
    }


async def _burst(url: str, ns: str, calls: int) -> list[int]:
    """`calls` invocations of `capped` at once through one activator; their statuses."""
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:

        async def one() -> int:
            async with http.post(f"{url}/v1/namespaces/{ns}/functions/capped/invoke", data=b"{}") as rsp:
                await rsp.read()
                return rsp.status

        return list(await asyncio.gather(*(one() for _ in range(calls))))


async def test_max_scale_holds_across_two_activators_and_excess_load_is_throttled(
    ember_ns: Ember, activators: tuple[Activator, Activator]
) -> None:
    ember = ember_ns
    ember.create("functions", {"kind": "Function", "metadata": {"name": "capped"}, "spec": CAPPED_SPEC})
    eventually(
        lambda: condition(ember.get("functions", "capped"), "Ready").get("status") == "True",
        timeout_s=60,
        what="Function Ready",
    )
    eventually(lambda: _ready_generic(ember) >= CAPPED_MAX_SCALE, timeout_s=240, what="ready generic pods in gVisor")
    for activator in activators:  # each loads the Version on its first pod
        assert await _burst(activator.url, ember.ns, 1) == [200], activator.log_tail()

    # More than one pod and a full queue at once through each activator, while the pods are counted.
    peak: dict[str, str] = {}
    done = asyncio.Event()

    async def count() -> None:
        while not done.is_set():
            pods = await asyncio.to_thread(_function_pods, ember, "capped")
            if len(pods) > len(peak):
                peak.clear()
                peak.update(pods)
            await asyncio.sleep(0.2)

    counter = asyncio.create_task(count())
    try:
        statuses = await asyncio.gather(*(_burst(a.url, ember.ns, QUEUE_DEPTH + 60) for a in activators))
        await asyncio.sleep(2.0)  # a scaling step or two after the burst: no late pods either
    finally:
        done.set()
        await counter
    assert 0 < len(peak) <= CAPPED_MAX_SCALE, f"specialized pods at the peak: {peak}"
    for activator, seen in zip(activators, statuses, strict=True):
        tally = {status: seen.count(status) for status in set(seen)}
        assert set(tally) == {200, 429}, f"{activator.holder}: {tally}\n{activator.log_tail()}"
        print(f"{activator.holder}: {tally}")
    print(f"peak specialized pods {len(peak)}: {peak}")
