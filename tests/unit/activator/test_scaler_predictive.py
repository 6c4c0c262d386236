"""`scaling.predictive` in the scaler: the forecast keeps, drops and prewarms a Version's pod, and expects claims.

Fake pod source and clock (tests/unit/activator/fakes.py), real Registry, Scaler and Predictor; the
predictor's own tests are tests/unit/scaling/test_predictor.py, real agents tests/local/activator.
"""

from __future__ import annotations

import asyncio

from ember.activator.version_state import VersionState
from ember.api.function import Function
from tests.unit.activator.fakes import World

PERIOD = 300.0
RUNS = 16  # three find the timer, the fourth trusts it, ten in a row it explains: ticks alone


async def run_once(world: World, vs: VersionState) -> None:
    """One invocation that takes one scaling step."""
    vs.mark_requested(world.clock.now, qualified=False)
    waiting = asyncio.create_task(vs.throttler.acquire())  # queued when the Version has no pod
    await asyncio.sleep(0)
    await world.step()
    slot = await asyncio.wait_for(waiting, 1)
    vs.throttler.release(slot)
    await world.step()


async def at(world: World, t: float) -> None:
    world.clock.now = t - 0.25  # World.step adds a tick
    await world.step()


async def test_a_timer_gets_a_prewarmed_pod_at_each_tick_and_none_between_them() -> None:
    world = World()
    vs = world.function(predictive=True, keepAliveSeconds=600)
    fs = world.registry.get("default", "f")
    start = world.clock.now
    for k in range(RUNS):
        await at(world, start + k * PERIOD)
        await run_once(world, vs)
    assert fs.forecast is not None
    assert fs.forecast.policy.periods, "the timer was found"
    tick = start + RUNS * PERIOD
    await at(world, tick - 61)
    assert vs.ready_pods == 0, "no keep-alive between a timer's runs"
    await at(world, tick - 60)  # the step after the pod left: its Version has none
    assert world.pods.expected == {vs.pool: 1}, "the prewarm is announced as an expected claim of its pool"
    await at(world, tick - 1.5)
    assert vs.ready_pods == 1, "prewarmed before the tick"
    await world.step()
    assert world.pods.expected == {}, "a Version that has its pod expects no claim"
    await at(world, tick)
    await run_once(world, vs)
    await at(world, tick + 30)
    assert vs.ready_pods == 0


async def test_without_predictive_the_keep_alive_holds_the_pod_and_nothing_is_expected() -> None:
    world = World()
    vs = world.function(keepAliveSeconds=600)
    start = world.clock.now
    for k in range(12):
        await at(world, start + k * PERIOD)
        await run_once(world, vs)
    await at(world, start + 12 * PERIOD - 60)
    assert vs.ready_pods == 1, "a 600 s keep-alive spans the 300 s gap"
    assert world.pods.expected == {}
    assert world.registry.get("default", "f").forecast is None


async def test_turning_predictive_off_drops_the_forecast_and_on_again_starts_learning() -> None:
    world = World()
    world.function(predictive=True)
    fs = world.registry.get("default", "f")
    assert fs.forecast is not None

    def scaling(**fields: object) -> None:
        assert fs.spec is not None
        spec = fs.spec.model_copy(update={"scaling": fs.spec.scaling.model_copy(update=fields)})
        world.registry.apply(Function.model_validate({"metadata": {"name": "f"}, "spec": spec.model_dump()}))

    scaling(predictive=False)
    assert fs.forecast is None
    scaling(predictive=True, keep_alive_seconds=42)
    assert fs.forecast is not None
    assert fs.forecast.policy.fallback_keep_s == 42, "its 'unsure' keep-alive is the Function's"
