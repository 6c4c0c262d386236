"""The scaler keeps a Version within this replica's share of minScale and maxScale, for N = 1, 2, 3 replicas.

Pure scaling logic: a fake pod source whose claims and specializations succeed at once, a fake clock,
the real Registry, VersionState, Throttler and Autoscaler (tests/unit/activator/fakes.py). Real agents
and pods are tests/local/activator; two activators on a real cluster are tests/cluster/test_activator_replicas.py.
"""

from __future__ import annotations

import asyncio

import pytest

from ember.activator.errors import Throttled
from ember.activator.throttler import PodSlots
from ember.activator.version_state import Phase, VersionState
from tests.unit.activator.fakes import QUEUE_DEPTH, World

REPLICAS = [pytest.param(1, id="N=1"), pytest.param(2, id="N=2"), pytest.param(3, id="N=3")]


@pytest.mark.parametrize("replicas", REPLICAS)
async def test_a_new_version_loads_its_share_of_min_scale_and_becomes_ready(replicas: int) -> None:
    world = World(replicas)
    vs = world.function(minScale=5, maxScale=9)
    share = -(-5 // replicas)  # 5, 3, 2
    assert vs.initial_target == share
    await world.step()
    assert vs.phase is Phase.READY
    assert vs.ready_pods == share
    for _ in range(4):
        await world.step()
    assert vs.ready_pods == share, "idle: the min share stays, no more"


@pytest.mark.parametrize("replicas", REPLICAS)
async def test_load_grows_to_the_max_share_and_what_does_not_fit_is_throttled(replicas: int) -> None:
    world = World(replicas)
    vs = world.function(maxScale=7)
    share = -(-7 // replicas)  # 7, 4, 3: at most 7 + N - 1 pods over N replicas
    await world.step()
    assert vs.ready_pods == 1
    waiting = [asyncio.create_task(vs.throttler.acquire()) for _ in range(1 + QUEUE_DEPTH)]
    await asyncio.sleep(0)
    for _ in range(3):
        await world.step()
    # A queue kept full (what arrives while the pods are busy): the count stops at the share.
    while vs.ready_pods < share:
        waiting += [asyncio.create_task(vs.throttler.acquire()) for _ in range(QUEUE_DEPTH - vs.throttler.queued)]
        await asyncio.sleep(0)
        await world.step()
    for _ in range(3):
        await world.step()
    assert vs.ready_pods == share
    assert len(world.pods.live) == share
    assert vs.throttler.capacity == share
    assert vs.throttler.in_flight == share

    # Capacity is pods x concurrency in flight plus the queue; one more is a 429, not a wait.
    more = [asyncio.create_task(vs.throttler.acquire()) for _ in range(QUEUE_DEPTH - vs.throttler.queued)]
    await asyncio.sleep(0)
    assert vs.throttler.queued == QUEUE_DEPTH
    with pytest.raises(Throttled, match=f"all {share} slots busy and {QUEUE_DEPTH} invocations queued"):
        await vs.throttler.acquire()

    # Nothing was dropped: every accepted invocation gets a slot once the ones ahead finish.
    pending = set(waiting + more)
    while pending:
        for task in [t for t in pending if t.done()]:
            vs.throttler.release(task.result())
            pending.discard(task)
        await asyncio.sleep(0)
    assert vs.throttler.in_flight == 0
    assert vs.throttler.queued == 0


async def _busy(vs: VersionState, count: int) -> list[PodSlots]:
    slots = [await vs.throttler.acquire() for _ in range(count)]
    assert len({id(s) for s in slots}) == count, "one invocation per pod"
    return slots


async def test_a_replica_joining_drains_busy_surplus_pods_without_cutting_their_work_and_one_leaving_grows_back() -> (
    None
):
    world = World(1)
    vs = world.function(minScale=4, maxScale=4)
    await world.step()
    assert vs.ready_pods == 4
    slots = await _busy(vs, 4)

    world.replicas = 2  # a second activator's Lease appeared
    await world.step()
    assert vs.ready_pods == 2, "over the new share: two pods leave routing at the next step"
    assert len(vs.draining) == 2
    assert vs.throttler.in_flight == 4, "their invocations run on"
    assert world.pods.released == []
    drained = [s for s in slots if s in vs.draining]
    for slot in drained:
        vs.throttler.release(slot)
    await world.step()
    assert sorted(world.pods.released) == sorted(s.handle.id for s in drained)
    assert vs.ready_pods == 2

    world.replicas = 1  # the other activator's Lease is gone: the min share is the whole minScale again
    await world.step()
    assert vs.ready_pods == 4


async def test_a_removed_function_drains_every_pod_whatever_the_replicas() -> None:
    world = World(3)
    vs = world.function(minScale=6, maxScale=6)
    await world.step()
    assert vs.ready_pods == 2
    slots = await _busy(vs, 2)
    world.registry.remove("default", "f")
    await world.step()
    assert vs.ready_pods == 0
    assert len(vs.draining) == 2
    for slot in slots:
        vs.throttler.release(slot)
    await world.step()
    assert world.pods.live == {}
