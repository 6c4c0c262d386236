"""Per-Version capacity: pod slots, a bounded wait queue, throttling.

A Version's pods each take at most `capacity` (the Function's `concurrency`) invocations at
once: never more. `acquire` takes a slot on the least busy pod at once when one is free;
otherwise the caller waits in a FIFO queue of at most `queue_depth` (more is `Throttled`, a
429), for at most `queue_timeout_s` (then `CapacityTimeout`, a 504). A released slot, or a
new pod, is handed directly to the oldest waiter, so waiting invocations are served in order
and a slot is never both free and wanted.

All of this runs on the event loop: there MUST be NO await between checking a slot and
taking it.

The throttler routes over the pods it is given; it does not own them. Its Version
(`ember.activator.version_state.VersionState`) adds and removes pods, and keeps the draining
ones; an invocation that has to wait pokes the scaling loop (`wake`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Callable

from ember.activator.balancer import least_in_flight
from ember.activator.errors import CapacityTimeout, Throttled
from ember.activator.wake import Asleep, Wake
from ember.pods.base import PodHandle, http_host


class PodSlots:
    """One pod as the router sees it."""

    __slots__ = (
        "address",
        "capacity",
        "draining",
        "frozen",
        "gate",
        "handle",
        "idle_since",
        "in_flight",
        "invoke_head",
    )

    def __init__(self, handle: PodHandle, *, now: float) -> None:
        self.handle = handle
        self.address = handle.address
        # The invoke request's fixed head lines, its agent's token included, built once per pod
        # (`AgentClient.invoke` adds the request id and the length).
        self.invoke_head = (
            f"POST /v1/invoke HTTP/1.1\r\nHost: {http_host(handle.address)}\r\nContent-Type: application/json\r\n"
            f"Authorization: {handle.authorization}\r\n"
        ).encode("latin-1")
        self.capacity = handle.concurrency
        self.in_flight = 0
        self.draining = False
        self.idle_since = now
        # freezing (`ember.activator.freezer`): frozen pods still route; their first invocation thaws
        # them, and `gate` keeps a freeze and a thaw of one pod from crossing
        self.frozen = False
        self.gate = asyncio.Lock()


class Throttler:
    """Slots of one Version's pods, and the invocations waiting for one."""

    def __init__(
        self,
        *,
        name: str,
        queue_depth: int,
        queue_timeout_s: float,
        retry_after_s: int = 1,
        wake: Wake | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.queue_depth = queue_depth
        self.queue_timeout_s = queue_timeout_s
        self.retry_after_s = retry_after_s
        self._wake: Wake = wake or Asleep()
        self._clock = clock
        self.pods: list[PodSlots] = []
        self._waiters: deque[asyncio.Future[PodSlots]] = deque()
        self._rr = 0
        self.in_flight = 0
        self._closed: Exception | None = None  # set by `close`: every acquire raises it

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def capacity(self) -> int:
        return sum(p.capacity for p in self.pods)

    def try_acquire(self) -> PodSlots | None:
        """A slot now, or None; never waits."""
        if self._waiters:
            return None  # keep FIFO: earlier callers first
        self._rr += 1
        pod = least_in_flight(self.pods, self._rr)
        if pod is not None:
            pod.in_flight += 1
            self.in_flight += 1
        return pod

    async def acquire(self) -> PodSlots:
        """A slot on one of the Version's pods; waits in the queue while capacity is coming."""
        if self._closed is not None:
            raise self._closed.with_traceback(None)
        pod = self.try_acquire()
        if pod is not None:
            return pod
        if len(self._waiters) >= self.queue_depth:
            raise Throttled(
                f"{self.name}: all {self.capacity} slots busy and {len(self._waiters)} invocations queued",
                self.retry_after_s,
            )
        waiter: asyncio.Future[PodSlots] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self._wake.poke()
        try:
            async with asyncio.timeout(self.queue_timeout_s):
                return await waiter
        except TimeoutError:
            self._give_back(waiter)
            raise CapacityTimeout(f"{self.name}: no pod slot within {self.queue_timeout_s:g} s") from None
        except BaseException:
            self._give_back(waiter)
            raise
        finally:
            if not waiter.done() or waiter.cancelled():
                waiter.cancel()
                with contextlib.suppress(ValueError):  # already popped by a release that found it cancelled
                    self._waiters.remove(waiter)

    def _give_back(self, waiter: asyncio.Future[PodSlots]) -> None:
        # A slot handed over just as the caller timed out or was cancelled must not leak.
        if waiter.done() and not waiter.cancelled() and waiter.exception() is None:
            self.release(waiter.result())

    def release(self, pod: PodSlots) -> None:
        """Give a slot back: to the oldest waiter when the pod still serves, else free it."""
        if not pod.draining:
            while self._waiters:
                waiter = self._waiters.popleft()
                if not waiter.done():
                    waiter.set_result(pod)
                    return
        pod.in_flight -= 1
        self.in_flight -= 1
        if pod.in_flight == 0:
            pod.idle_since = self._clock()

    def add_pod(self, pod: PodSlots) -> None:
        """A new ready pod: serve waiters from it first."""
        self.pods.append(pod)
        self._hand_over(pod)

    def _hand_over(self, pod: PodSlots) -> None:
        while self._waiters and pod.in_flight < pod.capacity and not pod.draining:
            waiter = self._waiters.popleft()
            if not waiter.done():
                pod.in_flight += 1
                self.in_flight += 1
                waiter.set_result(pod)

    def remove_pod(self, pod: PodSlots) -> None:
        """Take a pod out of routing; invocations on it finish (the caller releases it once idle)."""
        pod.draining = True
        with contextlib.suppress(ValueError):
            self.pods.remove(pod)

    def close(self, error: Exception) -> None:
        """Wake every waiter with `error` and refuse every later `acquire` with it (the Version failed
        or is gone: nothing reopens it; a caller holding the Version, like a portion call, learns why
        at once instead of waiting out the queue timeout)."""
        self._closed = error
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_exception(error)
