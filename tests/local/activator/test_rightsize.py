"""Right-sizing end to end in local mode: a real activator over real sandboxed agents (gVisor's runsc
when installed), real allocations, the sandbox's real memory cgroup.

Covers `resources.autoResize` (issue #14): a function given 1024 MiB that needs ~250 MiB ends on a
size within 10 % above what its sandbox really peaked at, without a failed invocation; one given
64 MiB that allocates 100 MiB runs out of memory (its agent says so, or its sandbox is killed at
the cgroup's bound), grows at once, then succeeds; the Ember API shows the size in use and why.
`resources.cpuMillicores` bounds the sandbox's CPU. The advice's arithmetic is
tests/unit/scaling/test_rightsize.py; the cluster tests/cluster/test_rightsize_cluster.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import time
from typing import Any

import pytest

from ember.activator.version_state import VersionState

from .helpers import FAST, Activator, function, run_activator

SIZING = dataclasses.replace(FAST, sizing_min_samples=5, sizing_interval_s=1.0, sizing_tick_s=0.1)
AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="sandboxes get memory and CPU cgroups only as root")

ALLOCATE = """
    def handler(event, context):
        mib = event.get("mib", 0)
        if event.get("chunks"):  # grows a MiB at a time: the sandbox's bound, not the worker's, is hit
            kept = []
            for _ in range(mib):
                block = bytearray(1 << 20)
                for i in range(0, len(block), 4096):
                    block[i] = 1
                kept.append(block)
            return {"allocated_mib": len(kept)}
        block = bytearray(mib << 20)
        for i in range(0, len(block), 4096):
            block[i] = 1
        return {"allocated_mib": mib}
"""

BURN = """
    import time

    def handler(event, context):
        n = 0
        started = time.perf_counter()
        while n < event["n"]:
            n += 1
        return {"wall_ms": (time.perf_counter() - started) * 1000}
"""


async def _invoke(act: Activator, name: str, event: object) -> tuple[int, dict[str, str], Any]:
    async with act.http.post(act.invoke_url(name), data=json.dumps(event).encode()) as response:
        return response.status, dict(response.headers), json.loads(await response.read())


async def _wait_for(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        await asyncio.sleep(0.05)


def _version(act: Activator, name: str) -> VersionState:
    return act.registry.get("default", name).versions[1]


@AS_ROOT
async def test_a_function_given_1024_mib_that_needs_250_ends_within_ten_percent_of_its_sandboxs_peak() -> None:
    async with run_activator(SIZING) as act:
        act.registry.apply(function("big", ALLOCATE, resources={"memoryMiB": 1024, "autoResize": True}))
        vs_errors: list[object] = []
        for _ in range(SIZING.sizing_min_samples):
            status, headers, body = await _invoke(act, "big", {"mib": 200})
            if status != 200 or "X-Ember-Function-Error" in headers:
                vs_errors.append(body)
        vs = _version(act, "big")
        await _wait_for(lambda: vs.resources.memory_mib < 1024, 10, "the recommendation to be applied")
        # the pod of 1024 MiB is replaced by one of the new size, without a failed invocation meanwhile
        # (the advice may still grow by a step as samples come in: then that size replaces it again)
        for _ in range(3):
            while vs.outdated or vs.draining or not vs.serving:
                status, headers, body = await _invoke(act, "big", {"mib": 200})
                if status != 200 or "X-Ember-Function-Error" in headers:
                    vs_errors.append(body)
                await asyncio.sleep(0.05)
            for _ in range(5):
                status, headers, body = await _invoke(act, "big", {"mib": 200})
                if status != 200 or "X-Ember-Function-Error" in headers:
                    vs_errors.append(body)
            if not vs.outdated:
                break
        sized = vs.resources.memory_mib
        sizes = {pod.handle.pool.memory_mib for pod in vs.serving}
        peaks = [act.source.memory_peak_mib(pod.handle.id) for pod in vs.serving]
        async with act.http.get(f"{act.url}/v1/namespaces/default/functions/big/versions") as response:
            shown = (await response.json())["versions"][0]
    assert vs_errors == []
    assert sizes == {sized}
    assert None not in peaks, "a sandbox's memory cgroup as root"
    peak = max(p for p in peaks if p is not None)  # of the pod that ran the most (the autoscaler may keep two)
    assert peak <= sized <= peak * 1.10, (sized, peak)
    assert shown["resources"]["memoryMiB"] == sized
    assert shown["resources"]["reason"].startswith("autoResize: p99 peak"), shown
    assert shown["recommendation"]["memoryMiB"] == sized
    assert shown["recommendation"]["samples"] >= SIZING.sizing_min_samples


@AS_ROOT
@pytest.mark.parametrize(
    "chunks",
    [pytest.param(False, id="the-agent-runs-out"), pytest.param(True, id="the-sandbox-is-killed")],
)
async def test_a_function_given_64_mib_that_allocates_100_runs_out_grows_and_then_succeeds(chunks: bool) -> None:
    async with run_activator(SIZING) as act:
        act.registry.apply(function("greedy", ALLOCATE, resources={"memoryMiB": 64, "autoResize": True}))
        status, headers, first = await _invoke(act, "greedy", {"mib": 100, "chunks": chunks})
        vs = _version(act, "greedy")
        await _wait_for(lambda: vs.resources.memory_mib > 64, 10, "the size to grow")
        grown = vs.resources.memory_mib
        results: list[Any] = []
        deadline = time.monotonic() + 60
        while not results or results[-1] != {"allocated_mib": 100}:
            assert time.monotonic() < deadline, results
            _, _, body = await _invoke(act, "greedy", {"mib": 100, "chunks": chunks})
            results.append(body)
        ok = [await _invoke(act, "greedy", {"mib": 100, "chunks": chunks}) for _ in range(SIZING.sizing_min_samples)]
        await asyncio.sleep(1.5)  # the measured advice replaces the doubled one (one interval)
        settled = vs.resources
    assert (status, headers.get("X-Ember-Function-Error")) == (200, "Unhandled"), first
    expected = "Runtime.ExitError" if chunks else "Runtime.OutOfMemory"
    assert first["errorType"] == expected, first
    assert grown >= 128
    assert [s for s, h, _ in ok if s != 200 or "X-Ember-Function-Error" in h] == []
    assert vs.sizer is not None
    assert vs.sizer.oom_at_mib is not None
    assert vs.sizer.oom_at_mib >= 64
    assert settled.memory_mib > vs.sizer.oom_at_mib, "never back to a size that ran out"


@AS_ROOT
async def test_cpu_millicores_bounds_the_sandboxs_cpu() -> None:
    async with run_activator(FAST) as act:
        act.registry.apply(function("free", BURN, timeoutSeconds=30))
        act.registry.apply(function("bound", BURN, timeoutSeconds=30, resources={"cpuMillicores": 100}))
        walls: dict[str, float] = {}
        for name in ("free", "bound"):
            await _invoke(act, name, {"n": 1})
            _, _, body = await _invoke(act, name, {"n": 2_000_000})
            walls[name] = body["wall_ms"]
        bound_pool = _version(act, "bound").pool
    assert bound_pool.cpu_millicores == 100
    assert walls["bound"] > 3 * walls["free"], walls
