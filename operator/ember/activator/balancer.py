"""Picking a pod with a free slot: least in flight, ties broken round-robin; pure.

Kept apart from the throttler (which owns waiting) so the policy can be tested on plain values.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar


class Slotted(Protocol):
    """What the balancer needs to know about a pod."""

    @property
    def in_flight(self) -> int: ...

    @property
    def capacity(self) -> int: ...


P = TypeVar("P", bound=Slotted)


def least_in_flight(pods: Sequence[P], start: int) -> P | None:
    """The pod with the fewest invocations in flight among those with a free slot, or None.

    `start` rotates where the scan begins, so equal pods share the load.
    """
    best: P | None = None
    best_load = 0
    n = len(pods)
    for i in range(n):
        pod = pods[(start + i) % n]
        load = pod.in_flight
        if load < pod.capacity and (best is None or load < best_load):
            best, best_load = pod, load
            if load == 0:
                break
    return best
