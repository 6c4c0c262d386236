"""The throttler and balancer: never more than capacity in flight, FIFO hand-over, bounded queue, timeouts.

Runs on a real event loop with plain pod handles (no sockets); routing through real agents is in tests/local.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.activator.balancer import least_in_flight
from ember.activator.errors import CapacityTimeout, NotReady, Throttled
from ember.activator.throttler import PodSlots, Throttler
from ember.pods.base import ClaimKind, PodHandle, PodId, PoolKey

POOL = PoolKey("python3.12", "gvisor", 128, "x")


def _pod(name: str, concurrency: int = 1) -> PodSlots:
    handle = PodHandle(PodId(name), "127.0.0.1:1", POOL, ClaimKind.POOL_HIT, concurrency=concurrency)
    return PodSlots(handle, now=0.0)


def _throttler(depth: int = 10, timeout: float = 5.0) -> Throttler:
    return Throttler(name="f@1", queue_depth=depth, queue_timeout_s=timeout)


async def test_slots_never_exceed_capacity_and_waiters_are_served_in_order() -> None:
    t = _throttler()
    pod = _pod("a", concurrency=2)
    t.add_pod(pod)
    first, second = await t.acquire(), await t.acquire()
    assert pod.in_flight == 2
    order: list[int] = []

    async def wait(i: int) -> None:
        got = await t.acquire()
        order.append(i)
        assert got.in_flight <= got.capacity
        t.release(got)

    waiters = [asyncio.create_task(wait(i)) for i in range(5)]
    await asyncio.sleep(0)
    assert t.queued == 5
    t.release(first)
    t.release(second)
    await asyncio.gather(*waiters)
    assert order == [0, 1, 2, 3, 4]
    assert pod.in_flight == 0
    assert t.in_flight == 0


async def test_full_queue_throttles_with_retry_after() -> None:
    t = _throttler(depth=1)
    t.add_pod(_pod("a"))
    await t.acquire()
    queued = asyncio.create_task(t.acquire())
    await asyncio.sleep(0)
    with pytest.raises(Throttled) as info:
        await t.acquire()
    assert info.value.status == 429
    assert info.value.retry_after_s == 1
    queued.cancel()


async def test_wait_for_capacity_times_out_with_504() -> None:
    t = _throttler(timeout=0.05)
    with pytest.raises(CapacityTimeout) as info:
        await t.acquire()
    assert info.value.status == 504
    assert t.queued == 0


async def test_new_pod_serves_waiters() -> None:
    t = _throttler()
    task = asyncio.create_task(t.acquire())
    await asyncio.sleep(0)
    pod = _pod("late")
    t.add_pod(pod)
    assert await task is pod
    assert pod.in_flight == 1


async def test_closing_wakes_the_waiters_and_refuses_every_later_caller_at_once() -> None:
    t = _throttler(timeout=30.0)
    waiter = asyncio.create_task(t.acquire())
    await asyncio.sleep(0)
    t.close(NotReady("f@1 failed to load: handler 'main.nothere' not found"))
    with pytest.raises(NotReady, match="nothere"):
        await waiter
    # a caller that holds the Version (a portion call) must not wait out the 30 s queue timeout
    async with asyncio.timeout(1):
        with pytest.raises(NotReady, match="nothere"):
            await t.acquire()
    assert t.queued == 0


async def test_cancelled_waiter_does_not_leak_a_slot() -> None:
    t = _throttler()
    pod = _pod("a")
    t.add_pod(pod)
    held = await t.acquire()
    waiter = asyncio.create_task(t.acquire())
    await asyncio.sleep(0)
    t.release(held)  # handed to the waiter...
    waiter.cancel()  # ...which is cancelled before it runs
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert pod.in_flight == 0
    assert t.in_flight == 0


async def test_draining_pod_takes_no_new_invocations() -> None:
    t = _throttler(timeout=0.05)
    pod = _pod("a")
    t.add_pod(pod)
    held = await t.acquire()
    t.remove_pod(pod)
    t.release(held)
    assert pod.in_flight == 0
    with pytest.raises(CapacityTimeout):
        await t.acquire()


@given(loads=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 5)), max_size=8), start=st.integers(0, 20))
def test_balancer_picks_least_loaded_free_pod(loads: list[tuple[int, int]], start: int) -> None:
    pods = []
    for i, (in_flight, capacity) in enumerate(loads):
        pod = _pod(str(i), capacity)
        pod.in_flight = min(in_flight, capacity)
        pods.append(pod)
    chosen = least_in_flight(pods, start)
    free = [p for p in pods if p.in_flight < p.capacity]
    if not free:
        assert chosen is None
    else:
        assert chosen is not None
        assert chosen.in_flight < chosen.capacity
        assert chosen.in_flight == min(p.in_flight for p in free)
