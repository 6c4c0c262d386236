"""Freezing idle pods (`ember.activator.freezer`): which pods freeze when, that a freeze and a thaw of
one pod never cross, and what a refused or failed freeze or thaw does to the pod.

Fake pods, agents and clock (tests/unit/activator/fakes.py), real Registry, VersionState, Scaler and
Freezer; real agents and sandboxes are tests/local/activator/test_freeze.py.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from ember.activator.agent_client import AgentClient, AgentReply, AgentUnreachable
from ember.activator.freezer import Freezer, needs_thaw
from ember.activator.version_state import VersionState
from ember.api.function import Function
from tests.unit.activator.fakes import World


def _freezing(world: World, idle_seconds: int = 30, **spec: Any) -> VersionState:
    body = {
        "runtime": "python3.12",
        "handler": "main.handler",
        "code": {"inline": "def handler(e, c): return 1"},
        "concurrency": 1,
        "scaling": {"minScale": 2},
        "freeze": {"enabled": True, "idleSeconds": idle_seconds},
        **spec,
    }
    vs = world.registry.apply(Function.model_validate({"metadata": {"name": "f"}, "spec": body}))
    assert vs is not None
    return vs


async def test_pods_idle_for_idle_seconds_are_frozen_once_and_stay_serving() -> None:
    world = World()
    vs = _freezing(world, idle_seconds=30)
    await world.step()
    assert len(vs.serving) == 2
    busy = vs.serving[0]
    busy.in_flight = 1  # an invocation holds it
    world.clock.now += 29
    await world.step()
    assert world.agents.controls == []  # not idle long enough
    world.clock.now += 2
    await world.step()
    idle = vs.serving[1]
    assert world.agents.controls == [(idle.address, "/v1/freeze")]
    assert idle.frozen
    assert not busy.frozen
    assert idle.address in world.agents.forgotten  # its kept-alive connections dropped first
    assert idle.address in world.agents.preconnected  # and one made after, for the thaw
    assert len(vs.serving) == 2  # a frozen pod is still warm capacity
    await world.step()
    assert world.agents.controls == [(idle.address, "/v1/freeze")]  # frozen once


async def test_functions_without_freeze_never_freeze() -> None:
    world = World()
    vs = world.function(minScale=1)
    await world.step()
    world.clock.now += 10_000
    assert Freezer.due(vs, world.clock.now) == []
    await world.step()
    assert world.agents.controls == []


async def test_an_agent_busy_at_the_freeze_keeps_the_pod_as_it_was() -> None:
    world = World()
    vs = _freezing(world, idle_seconds=1)
    await world.step()
    world.agents.answers["/v1/freeze"] = 409
    world.clock.now += 2
    await world.step()
    assert len(world.agents.controls) == 2
    assert not any(p.frozen for p in vs.serving)
    assert len(vs.serving) == 2


async def test_a_freeze_that_fails_takes_the_pod_out_of_routing() -> None:
    world = World()
    vs = _freezing(world, idle_seconds=1)
    await world.step()
    world.agents.answers["/v1/freeze"] = AgentUnreachable("agent at x: refused")
    world.clock.now += 2
    await world.step()
    assert all(not p.frozen for p in vs.serving)
    assert len(vs.draining) == 2  # both left routing; the scaler replaces them


async def test_an_invocation_waits_for_a_freeze_under_way_and_then_asks_for_the_thaw() -> None:
    world = World()
    vs = _freezing(world, idle_seconds=1)
    await world.step()
    pod = vs.serving[0]
    freezer = Freezer(cast(AgentClient, world.agents), world.metrics)
    freezing = asyncio.create_task(freezer.freeze(vs, pod))
    await asyncio.sleep(0)  # the freeze holds the gate, its request in flight
    assert needs_thaw(pod)
    first, second = await asyncio.gather(freezer.before_invoke(pod), freezer.before_invoke(pod))
    await freezing
    assert (first, second) == (True, True)  # both carry X-Ember-Thaw; the agent thaws once
    assert [path for _, path in world.agents.controls] == ["/v1/freeze"]
    assert freezer.after_invoke(vs, pod, _reply(200)) is False
    assert not pod.frozen
    assert not needs_thaw(pod)
    assert await freezer.before_invoke(pod) is False


async def test_a_thaw_that_fails_takes_the_pod_out_of_routing() -> None:
    world = World()
    vs = _freezing(world, idle_seconds=1)
    await world.step()
    pod = vs.serving[0]
    freezer = Freezer(cast(AgentClient, world.agents), world.metrics)
    await freezer.freeze(vs, pod)
    assert pod.frozen
    failed = _reply(500, b'{"errorType": "Runtime.AfterThawError", "errorMessage": "hook raised", "state": "x"}')
    assert freezer.after_invoke(vs, pod, failed) is True
    assert pod in vs.draining
    # a function's own error after a good thaw is not a failed thaw
    other = vs.serving[0]
    other.frozen = True
    assert freezer.after_invoke(vs, other, _reply(200, b'{"errorType": "Runtime.AfterThawError"}')) is False
    assert not other.frozen


def _reply(status: int, body: bytes = b"{}") -> AgentReply:
    return AgentReply(
        status=status, body=body, function_error=None, log_result=None, duration_ms=None, max_rss_kib=None
    )
