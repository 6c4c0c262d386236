"""Right-sizing in the activator (`ember.activator.sizing`): replies measured per Version, advice applied
to new pods (local mode) or taken from the operator's status (cluster), out-of-memory growth, pods of
an old size replaced, the advice published at a bounded rate.

Fake pod source and clock (tests/unit/activator/fakes.py), real Registry, VersionState, Scaler and
Sizing; the advice itself is tests/unit/scaling/test_rightsize.py, real agents tests/local/activator.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from ember.activator.agent_client import AgentReply
from ember.activator.config import ActivatorConfig
from ember.activator.sizing import Sizing
from ember.activator.version_state import VersionState
from ember.api.function import Function
from ember.api.security_policy import SecurityPolicySpec
from ember.api.version import ResourceRecommendation, VersionResources
from ember.devmode import _report_phases
from ember.pods.base import MemoryKills
from ember.pods.payload import pool_key
from ember.scaling.rightsize import decode_report
from tests.unit.activator.fakes import World

CONFIG = ActivatorConfig(sizing_min_samples=5, sizing_interval_s=10.0, warm_pool_size=0)
OOM_BODY = json.dumps({"errorMessage": "out of memory (memoryMiB 64)", "errorType": "Runtime.OutOfMemory"}).encode()


def _spec(memory_mib: int = 1024, **resources: Any) -> dict[str, Any]:
    return {
        "runtime": "python3.12",
        "handler": "main.handler",
        "code": {"inline": "def handler(e, c): return 1"},
        "resources": {"memoryMiB": memory_mib, **resources},
        "scaling": {"minScale": 1},
    }


def _function(world: World, memory_mib: int = 1024, *, policy: SecurityPolicySpec | None = None, **res: Any) -> Any:
    fn = Function.model_validate({"metadata": {"name": "f"}, "spec": _spec(memory_mib, **res)})
    vs = world.registry.apply(fn, policy=policy)
    assert vs is not None
    return vs


def _reply(peak_mib: int, *, error: str | None = None, body: bytes = b"{}") -> AgentReply:
    return AgentReply(
        status=200,
        body=body,
        function_error=error,
        log_result=None,
        duration_ms="100.0",
        max_rss_kib=str(peak_mib * 1024),
        cpu_ms="40.0",
    )


def _serve(vs: VersionState, peak_mib: int, n: int = 5) -> None:
    for _ in range(n):
        vs.record_usage(_reply(peak_mib), vs.pool.memory_mib)


async def _steps(world: World, sizing: Sizing, n: int = 1) -> None:
    for _ in range(n):
        await world.step()
        await sizing.step()


async def test_auto_resize_gives_new_pods_the_advice_and_replaces_the_old_ones() -> None:
    world = World()
    sizing = Sizing(world.registry, world.pods, CONFIG, clock=world.clock)
    vs = _function(world, auto_resize=True)
    await _steps(world, sizing)
    assert [p.handle.pool.memory_mib for p in vs.serving] == [1024]
    _serve(vs, 219)
    await sizing.step()
    assert vs.resources.memory_mib == 256
    assert vs.resources.reason.startswith("autoResize: p99 peak 220 MiB + 30 MiB sandbox")
    assert vs.pool.memory_mib == 256
    assert vs.request is not None
    assert vs.request.payload["memoryMiB"] == 256
    assert vs.draining, "the pod of the old size leaves routing"
    await _steps(world, sizing, 2)
    assert [p.handle.pool.memory_mib for p in vs.serving] == [256]
    assert not vs.outdated


async def test_without_auto_resize_the_advice_is_only_shown() -> None:
    world = World()
    sizing = Sizing(world.registry, world.pods, CONFIG, clock=world.clock)
    vs = _function(world)
    await _steps(world, sizing)
    _serve(vs, 219)
    await _steps(world, sizing)
    assert vs.sizer is not None
    assert vs.sizer.current is not None
    assert vs.sizer.current.memory_mib == 256
    assert (vs.resources.memory_mib, vs.pool.memory_mib) == (1024, 1024)
    assert not vs.draining


async def test_an_agent_out_of_memory_grows_the_size_at_once_within_the_policy() -> None:
    world = World()
    sizing = Sizing(world.registry, world.pods, CONFIG, clock=world.clock)
    policy = SecurityPolicySpec.model_validate({"limits": {"maxMemoryMiB": 192}})
    vs = _function(world, 64, policy=policy, auto_resize=True)
    await _steps(world, sizing)
    vs.record_usage(_reply(0, error="Unhandled", body=OOM_BODY), 64)
    await sizing.step()
    assert vs.resources.memory_mib == 128
    assert not vs.serving, "pods of a size that ran out of memory leave routing at once"
    await _steps(world, sizing)
    vs.record_usage(_reply(0, error="Unhandled", body=OOM_BODY), 128)
    await sizing.step()
    await world.step()
    assert vs.resources.memory_mib == 192, "doubled, but not past limits.maxMemoryMiB"
    assert [p.handle.pool.memory_mib for p in vs.serving] == [192]


async def test_a_sandbox_killed_at_its_memory_bound_grows_the_size() -> None:
    world = World()
    sizing = Sizing(world.registry, world.pods, CONFIG, clock=world.clock)
    vs = _function(world, 64, auto_resize=True)
    await _steps(world, sizing)
    world.pods.kills[vs.key] = MemoryKills(1, 64)
    await sizing.step()
    assert vs.resources.memory_mib == 128
    await sizing.step()
    assert vs.resources.memory_mib == 128, "a kill is told once"


async def test_function_code_cannot_fake_an_out_of_memory() -> None:
    world = World()
    sizing = Sizing(world.registry, world.pods, CONFIG, clock=world.clock)
    vs = _function(world, 64, auto_resize=True)
    await _steps(world, sizing)
    faked = json.dumps({"errorType": "Runtime.OutOfMemory", "errorMessage": "raised by the code"}).encode()
    vs.record_usage(_reply(40, error="Handled", body=faked), 64)  # a class named so, raised: Handled
    exited = json.dumps({"errorType": "Runtime.ExitError", "errorMessage": "sys.exit('Runtime.OutOfMemory')"})
    vs.record_usage(_reply(40, error="Unhandled", body=exited.encode()), 64)
    await sizing.step()
    assert vs.sizer is not None
    assert vs.sizer.oom_at_mib is None
    assert vs.resources.memory_mib == 64


async def test_a_shrink_waits_for_the_interval_a_growth_does_not() -> None:
    world = World()
    sizing = Sizing(world.registry, world.pods, CONFIG, clock=world.clock)
    vs = _function(world, auto_resize=True)
    await _steps(world, sizing)
    _serve(vs, 219, n=1000)
    await sizing.step()
    assert vs.resources.memory_mib == 256
    _serve(vs, 100, n=2000)  # both windows now say ~136 MiB
    await sizing.step()
    assert vs.resources.memory_mib == 256, "shrunk once already within the interval"
    world.clock.now += CONFIG.sizing_interval_s
    await sizing.step()
    assert vs.resources.memory_mib < 150
    _serve(vs, 300, n=30)  # past the p99 of the windows
    await sizing.step()
    assert vs.resources.memory_mib > 300, "growth is applied at once"


async def test_the_advice_is_published_on_change_at_most_once_per_interval_and_at_once_on_oom() -> None:
    world = World()
    sizing = Sizing(world.registry, world.pods, CONFIG, clock=world.clock)
    vs = _function(world)
    await _steps(world, sizing)
    assert world.pods.sizing_reports == []
    _serve(vs, 219)
    await sizing.step()
    await sizing.step()
    reports = [decode_report(text) for _, text in world.pods.sizing_reports]
    assert [r.memory_mib for r in reports if r is not None] == [256]
    _serve(vs, 500)
    await sizing.step()
    assert len(world.pods.sizing_reports) == 1, "a change within the interval waits"
    vs.record_usage(_reply(0, error="Unhandled", body=OOM_BODY), 1024)
    await sizing.step()
    last = decode_report(world.pods.sizing_reports[-1][1])
    assert last is not None
    assert last.out_of_memory_at_mib == 1024
    assert last.memory_mib == 2048


async def test_a_cluster_version_takes_its_size_from_the_operator_not_its_own_advice() -> None:
    world = World()
    sizing = Sizing(world.registry, world.pods, CONFIG, clock=world.clock)
    fn = Function.model_validate({"metadata": {"name": "f"}, "spec": _spec(1024, autoResize=True)})
    world.registry.follow(fn)
    vs = world.registry.apply_version("default", "f", 1, "sha256:" + "0" * 64, fn.spec, pool_key(fn.spec, None))
    assert vs is not None
    assert not vs.sizes_itself
    await _steps(world, sizing)
    _serve(vs, 219)
    await sizing.step()
    assert vs.resources.memory_mib == 1024, "the operator has not written it yet"
    assert world.pods.sizing_reports, "but it is published for the operator"
    sized = VersionResources(memory_mib=256, reason="autoResize: from the status")
    stored = ResourceRecommendation(memory_mib=256, out_of_memory_at_mib=128)
    assert world.registry.size_version("default", "f", 1, resources=sized, advice=stored)
    assert vs.pool.memory_mib == 256
    assert vs.sizer is not None
    assert vs.sizer.oom_at_mib == 128, "another activator's kill is learned"
    assert not world.registry.size_version("default", "f", 1, resources=sized, advice=stored)
    assert not world.registry.size_version("default", "nope", 1, resources=sized, advice=None)


async def test_ember_dev_prints_the_recommendation_and_the_size_in_use() -> None:
    world = World()
    sizing = Sizing(world.registry, world.pods, CONFIG, clock=world.clock)
    vs = _function(world, auto_resize=True)
    await _steps(world, sizing)
    lines: list[str] = []
    printing = asyncio.create_task(_report_phases(world.registry, lines.append))
    try:
        await asyncio.sleep(0.05)
        _serve(vs, 219)
        await sizing.step()
        await asyncio.sleep(0.3)
    finally:
        printing.cancel()
    sized = [line for line in lines if "recommended" in line]
    assert sized == [
        "Version 1 of default/f: recommended 256 MiB (p99 peak 220 MiB + 30 MiB sandbox + 2%); "
        "new pods get 256 MiB (autoResize: p99 peak 220 MiB + 30 MiB sandbox + 2%)"
    ]
