"""Waking the scaling loop from the data path: the `Wake` Protocol callers see, and the signal the loop waits on.

An invocation that queues, a pod found unreachable, a Version that became Ready: each wants a
scaling decision now rather than at the next tick. They `poke` one `Wakeup` that `make_app`
builds first and hands to the registry (for its Versions' throttlers), the invoker and the
scaler, so neither the registry nor the invoker knows the scaler. Pokes are level-triggered:
several before the loop wakes count as one.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol


class Wake(Protocol):
    """Something that wants a scaling decision soon."""

    def poke(self) -> None: ...


class Asleep:
    """A `Wake` nobody listens to (a throttler or registry used without a scaler, as in tests)."""

    __slots__ = ()

    def poke(self) -> None:
        return None


class Wakeup:
    """The scaling loop's signal: `poke` from anywhere on the event loop, `wait` in the loop."""

    __slots__ = ("_event",)

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def poke(self) -> None:
        self._event.set()

    async def wait(self, timeout_s: float) -> None:
        """Until poked (or already poked since the last wait), or `timeout_s` passed."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._event.wait()
        self._event.clear()
