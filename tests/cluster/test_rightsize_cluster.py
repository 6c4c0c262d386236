"""Cluster tier: right-sizing on the real node (real API server, kubelet, gVisor pods).

The operator and an activator run as host processes; the activator publishes its advice every 2 s at
most after 5 invocations (`EMBER_SIZING_INTERVAL_S`, `EMBER_SIZING_MIN_SAMPLES`). With
`resources.autoResize`: a function given 1024 MiB that allocates 200 MiB ends on pods of a smaller
size from a pool of that size, within 10 % above what its pod's memory cgroup really peaked at, with
no failed invocation, and `kubectl get versions` shows the size and the recommendation; one given
64 MiB that allocates 100 MiB runs out of memory, grows at once (the Version's status says why) and
then succeeds. The same in local mode is tests/local/activator/test_rightsize.py; the operator's
side alone tests/unit/controller/test_sizing_status.py.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.apiserver.operator_harness import Ember, OperatorProcess, condition, eventually
from tests.cluster.conftest import Kubectl
from tests.cluster.scenarios import ActivatorProcess

ALLOCATE = textwrap.dedent(
    """
    def handler(event, context):
        block = bytearray(event["mib"] << 20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        return {"allocated_mib": event["mib"]}
    """
)


@pytest.fixture
def activator_env() -> dict[str, str]:
    return {"EMBER_SIZING_INTERVAL_S": "2", "EMBER_SIZING_MIN_SAMPLES": "5"}


def _spec(memory_mib: int) -> dict[str, Any]:
    return {
        "runtime": "python3.12",
        "handler": "main.handler",
        "code": {"inline": ALLOCATE},
        "resources": {"memoryMiB": memory_mib, "autoResize": True},
        "timeoutSeconds": 30,
        "scaling": {"maxScale": 1},
    }


async def _call(http: aiohttp.ClientSession, url: str, ns: str, name: str, mib: int) -> tuple[int, str, Any]:
    async with http.post(f"{url}/v1/namespaces/{ns}/functions/{name}/invoke", data=json.dumps({"mib": mib})) as rsp:
        body = await rsp.read()
        return rsp.status, rsp.headers.get("X-Ember-Function-Error", ""), json.loads(body) if body else None


def _status(ember: Ember, name: str) -> dict[str, Any]:
    return (ember.get("versions", f"{name}-v1") or {}).get("status") or {}


def _pods_of(ember: Ember, name: str) -> list[Any]:
    selector = f"ember.run/function={name},ember.run/state=specialized"
    return [
        p for p in ember.core.list_namespaced_pod(ember.ns, label_selector=selector).items
        if p.metadata.deletion_timestamp is None
    ]  # fmt: skip


def _limit_mib(pod: Any) -> int:
    limit = str(pod.spec.containers[0].resources.limits["memory"])  # the API server writes 1024Mi as 1Gi
    return int(limit[:-2]) * 1024 if limit.endswith("Gi") else int(limit.removesuffix("Mi"))


def _cgroup_peak_mib(pod: Any) -> float | None:
    """The most the pod's memory cgroup held (the kubelet's cgroupfs layout on cgroup v1), None if not found."""
    for path in Path("/sys/fs/cgroup/memory/kubepods").glob(f"**/pod{pod.metadata.uid}/memory.max_usage_in_bytes"):
        return int(path.read_text()) / 2**20
    return None


async def test_a_function_given_1024_mib_that_needs_200_ends_on_a_smaller_size(
    ember_ns: Ember, operator: OperatorProcess, activator: ActivatorProcess, kubectl: Kubectl
) -> None:
    ember = ember_ns
    ember.create("functions", {"kind": "Function", "metadata": {"name": "big"}, "spec": _spec(1024)})
    await asyncio.to_thread(
        eventually,
        lambda: condition(ember.get("functions", "big"), "Ready").get("status") == "True",
        timeout_s=180,
        what="Function Ready",
    )
    failures: list[Any] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as http:

        async def resized() -> bool:
            status, error, body = await _call(http, activator.url, ember.ns, "big", 200)
            if status != 200 or error:
                failures.append((status, error, body))
            pods = await asyncio.to_thread(_pods_of, ember, "big")
            memory = (await asyncio.to_thread(_status, ember, "big")).get("resources", {}).get("memoryMiB")
            return memory is not None and memory < 1024 and bool(pods) and all(_limit_mib(p) == memory for p in pods)

        for _ in range(300):
            if await resized():
                break
        else:
            raise AssertionError(f"not resized: {_status(ember, 'big')}")
        for _ in range(5):
            status, error, body = await _call(http, activator.url, ember.ns, "big", 200)
            if status != 200 or error:
                failures.append((status, error, body))
    status = _status(ember, "big")
    size = status["resources"]["memoryMiB"]
    peaks = [p for p in (_cgroup_peak_mib(pod) for pod in _pods_of(ember, "big")) if p is not None]
    listed = kubectl("get", "versions", "-n", ember.ns, "-o", "wide").stdout
    print(f"size {size} MiB, pod cgroup peaks {peaks}, status {status['resources']}, {status['recommendation']}")
    assert failures == []
    assert status["resources"]["reason"].startswith("autoResize: p99 peak"), status
    assert status["recommendation"]["memoryMiB"] == size
    if peaks:
        assert max(peaks) <= size <= max(peaks) * 1.10, (size, peaks)
    header, row = listed.splitlines()[:2]
    assert "MEMORY" in header, listed
    assert "RECOMMENDED" in header, listed
    assert f" {size} " in row, listed
    pool_sizes = {d.metadata.annotations.get("ember.run/pool-key", "") for d in ember.pools().values()}
    assert any(key.endswith(f"/{size}Mi") for key in pool_sizes), pool_sizes


async def test_a_function_given_64_mib_that_allocates_100_runs_out_grows_and_then_succeeds(
    ember_ns: Ember, operator: OperatorProcess, activator: ActivatorProcess
) -> None:
    ember = ember_ns
    ember.create("functions", {"kind": "Function", "metadata": {"name": "greedy"}, "spec": _spec(64)})
    await asyncio.to_thread(
        eventually,
        lambda: condition(ember.get("functions", "greedy"), "Ready").get("status") == "True",
        timeout_s=180,
        what="Function Ready",
    )
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as http:
        first = await _call(http, activator.url, ember.ns, "greedy", 100)
        grown = await asyncio.to_thread(
            eventually,
            lambda: (_status(ember, "greedy").get("resources") or {}).get("memoryMiB", 64) > 64 or None,
            timeout_s=60,
            what="the Version's size to grow",
        )
        results = []
        for _ in range(120):
            results.append(await _call(http, activator.url, ember.ns, "greedy", 100))
            if results[-1][:2] == (200, ""):
                break
            await asyncio.sleep(0.5)
    status = _status(ember, "greedy")
    print(f"first {first}, then {len(results)} calls, status {status.get('resources')}, {status.get('recommendation')}")
    assert first[:2] == (200, "Unhandled"), first
    assert grown
    assert status["recommendation"]["outOfMemoryAtMiB"] >= 64
    assert status["resources"]["memoryMiB"] > status["recommendation"]["outOfMemoryAtMiB"]
    assert results[-1] == (200, "", {"allocated_mib": 100}), results[-3:]
