"""Cluster tier (issue #15): key-value state and freezing in gVisor pods of the real node.

The operator and the activator run as host processes (as in test_services_cluster.py): the
activator's services proxy, which also takes state operations, listens on the node address its
pods reach, and its async store is a real `redis-server` on the host's loopback, so the state is
in Redis as with the chart (`open_state_store`: the state shares the async store's Redis). The
Functions use the default policy (egress `none`): their only channel is the one to Ember.

- State: a counter Function (concurrency 1, maxScale 3) takes 30 concurrent invocations of 10
  `incr` each; at least two gVisor pods serve them, every value 1..300 is handed out exactly once
  and the counter ends at 300, in Redis too. A second Function of the namespace has keys of its
  own; a value over 256 KiB is refused with `ValueTooLarge` (413) in the code.
- Freeze: a Function whose module spins a thread (30 ms of CPU every 50 ms) and whose handler
  keeps its state connection alive is frozen after 2 s idle. The pod's CPU is read from its
  cgroup on the node (the kubelet's cgroupfs layout on cgroup v1, as test_rightsize_cluster.py):
  well above 20 % of a CPU while warm, under 2 % while frozen. The activator's side of the state
  connection is seen (in the host's /proc/net/tcp) to end by the time the freeze is done, so the
  agent's shutdown of the sockets it finds in /proc/self/fd works inside gVisor. The next
  invocation thaws the same pod and its state operation succeeds on a new connection; the
  activator counts the freeze and the thaw in `ember_pod_freezes_total`.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis

from tests.apiserver.operator_harness import Ember
from tests.cluster.node import NODE_IP
from tests.cluster.scenarios import ActivatorProcess
from tests.cluster.test_agent_restart_cluster import _call, _create_ready, _function
from tests.cluster.test_services_cluster import host_activator_services_port  # noqa: F401 (a fixture)
from tests.local.sources.brokers import redis_server

STATE = {"state": {"keyValue": True}, "timeoutSeconds": 60}
TOTAL_CALLS, INCRS_EACH = 30, 10
LIMIT = 256 * 1024

COUNTER = r"""
import socket, time
import ember_runtime

def handler(event, context):
    s = context.state
    if event["op"] == "incr":
        values = []
        for _ in range(event["n"]):
            values.append(s.incr("hits"))
            time.sleep(event["pause"])
        return {"pod": socket.gethostname(), "values": values}
    if event["op"] == "get":
        return {"pod": socket.gethostname(), "value": s.get(event["key"])}
    try:
        s.put(event["key"], "x" * event["chars"])
    except ember_runtime.StateError as e:
        return {"error": e.error_type, "status": e.status, "message": e.error_message}
    return {"stored": len(s.get(event["key"]))}
"""

SPINNER = r"""
import os, socket, threading, time
from urllib.parse import urlsplit

def _spin():
    while True:  # 30 ms of CPU every 50 ms, for as long as the code runs
        end = time.perf_counter() + 0.03
        while time.perf_counter() < end:
            pass
        time.sleep(0.02)

threading.Thread(target=_spin, daemon=True).start()

def handler(event, context):
    calls = context.state.incr("calls")  # on the kept-alive connection to the activator's services port
    return {"pod": socket.gethostname(), "calls": calls, "state_port": urlsplit(os.environ["EMBER_STATE_URL"]).port}
"""


@pytest.fixture
def redis_store(tmp_path: Path) -> Iterator[tuple[str, redis.Redis]]:
    """A real redis-server on the host's loopback (stopped by pid): its URL and a client of the test's."""
    with redis_server(tmp_path) as server:
        client = redis.Redis(host=server.host, port=server.port)
        try:
            yield server.url, client
        finally:
            client.close()


@pytest.fixture
def activator_env(
    redis_store: tuple[str, redis.Redis],
    host_activator_services_port: int,  # noqa: F811 (the fixture imported above)
) -> dict[str, str]:
    port = str(host_activator_services_port)
    return {"EMBER_SERVICES_ADDRESS": NODE_IP, "EMBER_SERVICES_PORT": port, "EMBER_ASYNC_STORE": redis_store[0]}


async def _result(http: aiohttp.ClientSession, activator: ActivatorProcess, ns: str, name: str, event: object) -> Any:
    status, text = await _call(http, activator.url, ns, name, event)
    assert status == 200, text
    answer = json.loads(text)
    assert not (isinstance(answer, dict) and "errorType" in answer), answer  # the function's own error
    return answer


def _pods(ember: Ember, name: str) -> list[Any]:
    selector = f"ember.run/function={name},ember.run/state=specialized"
    return [
        p for p in ember.core.list_namespaced_pod(ember.ns, label_selector=selector).items
        if p.metadata.deletion_timestamp is None
    ]  # fmt: skip


async def test_key_value_state_is_one_per_function_across_its_gvisor_pods(
    ember_ns: Ember, activator: ActivatorProcess, redis_store: tuple[str, redis.Redis]
) -> None:
    ember = ember_ns
    scaled = {"concurrency": 1, "scaling": {"maxScale": 3}}
    _create_ready(ember, _function("counter", COUNTER, **STATE, **scaled), _function("other", COUNTER, **STATE))
    incr = {"op": "incr", "n": INCRS_EACH, "pause": 0.05}
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as http:
        started = time.monotonic()
        answers = await asyncio.gather(
            *(_result(http, activator, ember.ns, "counter", incr) for _ in range(TOTAL_CALLS))
        )
        burst_s = time.monotonic() - started
        final = await _result(http, activator, ember.ns, "counter", {"op": "get", "key": "hits"})
        other_before = await _result(http, activator, ember.ns, "other", {"op": "get", "key": "hits"})
        other_incr = await _result(http, activator, ember.ns, "other", {"op": "incr", "n": 1, "pause": 0})
        final_after = await _result(http, activator, ember.ns, "counter", {"op": "get", "key": "hits"})
        big = await _result(http, activator, ember.ns, "counter", {"op": "put", "key": "big", "chars": LIMIT + 1})
        fits = await _result(http, activator, ember.ns, "counter", {"op": "put", "key": "fits", "chars": LIMIT - 64})
    served = {a["pod"] for a in answers}
    values = sorted(v for a in answers for v in a["values"])
    pods = {p.metadata.name: p for p in _pods(ember, "counter")}
    print(f"{TOTAL_CALLS} x {INCRS_EACH} incr in {burst_s:.1f} s on pods {sorted(served)}; big: {big}")
    assert len(served) >= 2, served
    assert served <= set(pods), (served, set(pods))
    assert {pods[name].spec.runtime_class_name for name in served} == {"gvisor"}
    assert values == list(range(1, TOTAL_CALLS * INCRS_EACH + 1))  # each value handed out once: linearizable
    assert final["value"] == final_after["value"] == TOTAL_CALLS * INCRS_EACH
    assert redis_store[1].get(f"ember:state:{{{ember.ns}/counter}}:hits") == b"300"  # in the activator's Redis
    assert other_before["value"] is None  # the other Function does not see the counter's keys
    assert other_incr["values"] == [1]
    assert (big["error"], big["status"]) == ("ValueTooLarge", 413), big
    assert f"{LIMIT + 3} bytes" in big["message"], big  # the size, quotes included, and the limit
    assert str(LIMIT) in big["message"], big
    assert fits == {"stored": LIMIT - 64}


def _cgroup_cpu_s(pod: Any) -> float:
    """CPU time the pod's cgroup used (the gVisor sandbox, its Sentry and stubs included), in seconds."""
    found = list(Path("/sys/fs/cgroup/cpuacct/kubepods").glob(f"**/pod{pod.metadata.uid}/cpuacct.usage"))
    assert found, f"no cpuacct cgroup for pod {pod.metadata.name} ({pod.metadata.uid})"
    return int(found[0].read_text()) / 1e9


async def _cpu_share(pod: Any, seconds: float) -> float:
    before = _cgroup_cpu_s(pod)
    await asyncio.sleep(seconds)
    return (_cgroup_cpu_s(pod) - before) / seconds


def _connections_to(port: int, peer: str) -> dict[int, str]:
    """The host's IPv4 TCP connections to local `port` from `peer`: {peer's port: state (hex, 01 established)}."""
    out: dict[int, str] = {}
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local, remote, state = fields[1], fields[2], fields[3]
        local_port = int(local.split(":")[1], 16)
        remote_ip = socket.inet_ntoa(bytes.fromhex(remote.split(":")[0])[::-1])
        if local_port == port and remote_ip == peer:
            out[int(remote.split(":")[1], 16)] = state
    return out


def _established(connections: dict[int, str]) -> set[int]:
    return {port for port, state in connections.items() if state == "01"}


async def _freezes(http: aiohttp.ClientSession, activator: ActivatorProcess, function: str, outcome: str) -> float:
    async with http.get(f"{activator.url}/metrics") as rsp:
        text = await rsp.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("ember_pod_freezes_total{") and f'outcome="{outcome}"' in line and function in line
    )


async def test_a_frozen_gvisor_pod_uses_no_cpu_ends_its_state_connection_and_thaws(
    ember_ns: Ember, activator: ActivatorProcess
) -> None:
    ember = ember_ns
    freeze = {"freeze": {"enabled": True, "idleSeconds": 2}, "scaling": {"maxScale": 1}}
    _create_ready(ember, _function("spinner", SPINNER, **STATE, **freeze))
    label = f"{ember.ns}/spinner"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        first = await _result(http, activator, ember.ns, "spinner", {})
        await _result(http, activator, ember.ns, "spinner", {})  # the template has imported the module by now
        last_call = time.monotonic()
        (pod,) = _pods(ember, "spinner")
        warm = await _cpu_share(pod, 1.5)  # idle for less than idleSeconds: not frozen yet
        assert await _freezes(http, activator, label, "frozen") == 0, "frozen during the warm measurement"
        held = _established(_connections_to(first["state_port"], pod.status.pod_ip))
        while await _freezes(http, activator, label, "frozen") < 1:
            assert time.monotonic() - last_call < 30, f"not frozen within 30 s:\n{activator.log_tail()}"
            await asyncio.sleep(0.1)
        frozen_after_s = time.monotonic() - last_call
        after_freeze = _connections_to(first["state_port"], pod.status.pod_ip)
        frozen = await _cpu_share(pod, 3.0)
        started = time.monotonic()
        thawed = await _result(http, activator, ember.ns, "spinner", {})
        thaw_ms = (time.monotonic() - started) * 1000
        reopened = _established(_connections_to(first["state_port"], pod.status.pod_ip))
        counts = [await _freezes(http, activator, label, outcome) for outcome in ("frozen", "thawed", "failed")]
        again = await _cpu_share(pod, 1.5)
    print(
        f"cpu warm {warm:.1%}, frozen {frozen:.2%}, after thaw {again:.1%} of a CPU; frozen ~{frozen_after_s:.1f} s "
        f"after the last call; thaw + call {thaw_ms:.0f} ms; state connections held {held}, after the freeze "
        f"{after_freeze}, after the thaw {reopened}; freezes frozen/thawed/failed {counts}"
    )
    assert pod.spec.runtime_class_name == "gvisor"
    assert warm > 0.2, warm
    assert frozen < 0.02, frozen
    assert again > 0.2, again
    assert held, "the code held no state connection to the activator"
    assert not held & _established(after_freeze), after_freeze  # ended by the agent inside gVisor
    assert thawed["pod"] == first["pod"] == pod.metadata.name  # the same pod, thawed: not a new one
    assert thawed["calls"] == 3  # its state operation worked after the thaw
    assert reopened, "no state connection after the thaw"
    assert not reopened & held, (held, reopened)  # a new one: the code reconnected
    assert min(counts[:2]) >= 1, counts
    assert counts[2] == 0, counts
