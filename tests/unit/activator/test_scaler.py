"""The scaler carries out scaling decisions through a Version's transitions: starts, failures, lost pods, rollouts.

Fake pod source and clock (tests/unit/activator/fakes.py), real Registry, VersionState and Scaler; the
decisions themselves are tests/unit/scaling/test_step.py, real agents tests/local/activator.
"""

from __future__ import annotations

from ember.activator.version_state import Phase
from tests.unit.activator.fakes import FakePods, LoadFailureReport, World

BAD = "import nope\ndef handler(e, c): return 1"


async def test_bad_code_fails_the_version_and_is_reported_once_per_failure() -> None:
    world = World(pods=FakePods())
    good = world.function(minScale=3)
    await world.step()
    assert good.phase is Phase.READY
    bad = world.function(BAD, minScale=3)
    world.pods.bad_code.add(bad.key)
    await world.step()  # three starts, all refused: one transition to Failed
    assert bad.phase is Phase.FAILED
    assert "ImportError: No module named 'nope'" in bad.message
    expected = LoadFailureReport(bad.key, bad.code_hash, bad.message)
    assert world.pods.reports == [expected]
    for _ in range(3):
        await world.step()
    assert world.pods.reports == [expected], "a failed Version starts no more pods and is not reported again"
    assert good.ready_pods == 3, "the old Version keeps serving"
    worse = world.function(BAD + "\n# edited", minScale=3)
    world.pods.bad_code.add(worse.key)
    await world.step()
    assert [r.version.number for r in world.pods.reports] == [2, 3]


async def test_pods_that_fail_to_start_fail_the_version_after_its_attempts_and_are_not_a_code_report() -> None:
    world = World(pods=FakePods(flaky=3), load_attempts=3)
    vs = world.function()
    for _ in range(2):
        await world.step()
        assert vs.phase is Phase.LOADING
    await world.step()
    assert vs.phase is Phase.FAILED
    assert "connection refused" in vs.message
    assert world.pods.reports == []
    assert vs.starting == 0


async def test_a_start_that_succeeds_resets_the_attempts() -> None:
    world = World(pods=FakePods(flaky=2), load_attempts=3)
    vs = world.function()
    for _ in range(3):
        await world.step()
    assert vs.phase is Phase.READY
    assert vs.ready_pods == 1


async def test_a_pod_gone_from_the_source_leaves_routing_and_is_replaced() -> None:
    world = World()
    vs = world.function(minScale=1)
    await world.step()
    (lost,) = vs.serving
    del world.pods.live[lost.handle.id]  # the source no longer lists it
    await world.step()
    assert lost not in vs.serving
    assert lost.handle.id in world.pods.released
    await world.step()
    assert vs.ready_pods == 1
    assert vs.serving[0].handle.id != lost.handle.id


async def test_old_version_serves_until_the_new_one_is_ready_then_keeps_only_what_runs_on_it() -> None:
    world = World()
    old = world.function(minScale=2)
    await world.step()
    assert (old.phase, old.ready_pods) == (Phase.READY, 2)
    busy = await old.throttler.acquire()
    new = world.function("def handler(e, c): return 2")
    assert new.initial_target == 2, "as big as the Version it replaces"
    fs = world.registry.get("default", "f")
    assert fs.latest() == 1, "the new Version loads while the old one takes the traffic"
    await world.step()
    assert (new.phase, new.ready_pods) == (Phase.READY, 2)
    assert fs.latest() == 2
    await world.step()
    assert old.serving == (busy,), "unreferenced: only the invocation in flight keeps a pod"
    assert len(world.pods.released) == 1, "its idle pod went at once"
    old.throttler.release(busy)
    await world.step()
    assert busy.handle.id in world.pods.released
    assert not old.holds_pods
