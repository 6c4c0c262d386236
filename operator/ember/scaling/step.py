"""One scaling step of one Version, as pure decisions: how many pods it should have, and which pods go.

The activator's scaler (`ember.activator.scaler`) calls these every tick for every Version with
numbers it read from the Version (demand, pods, phase) and a clock, and carries out what they
return; nothing here touches a pod.

1. `regime`: how the count is chosen. A Version whose Function was removed, or that failed to
   load, gets no pods (`NONE`). One that nothing routes to (not "latest", not in `spec.traffic`,
   no alias) and that nobody asked for by number within its keep-alive only runs what is in
   flight and queued right now (`ON_DEMAND`: it scales from zero when invoked by number, and
   drains otherwise). Every other Version follows its autoscaler (`AUTOSCALED`).
2. `desired_pods`: the count. A Version still loading wants at least its initial target (its
   predecessor's size), so traffic moves to it only with the capacity the old one had.
3. `plan_pods`: start the missing pods, or take surplus ones out of routing: idle ones first,
   longest idle first; busy ones only down to what must not be exceeded (none, or this
   replica's `maxScale` share), fewest in flight first. Pods taken out of routing finish what
   they run and are released once idle; none is ever cut.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from ember.scaling.autoscaler import Bounds, pods_to_drain, pods_to_release


class Regime(enum.Enum):
    """How a Version's pod count is chosen in this step."""

    NONE = "none"
    ON_DEMAND = "on-demand"
    AUTOSCALED = "autoscaled"


def regime(*, serves: bool, referenced: bool, since_qualified_s: float, keep_alive_s: float) -> Regime:
    """`serves`: its Function exists and it did not fail; `since_qualified_s`: since an invocation named it."""
    if not serves:
        return Regime.NONE
    if not referenced and since_qualified_s > keep_alive_s:
        return Regime.ON_DEMAND
    return Regime.AUTOSCALED


def desired_pods(
    how: Regime,
    *,
    demand: int,
    concurrency: int,
    bounds: Bounds,
    autoscaled: int,
    loading: bool,
    initial_target: int,
) -> int:
    """The pod count a Version should have now.

    `demand` is what is in flight plus queued; `autoscaled` the autoscaler's count (asked only in
    the `AUTOSCALED` regime: its windows must not see the other regimes' steps); `loading` whether
    the Version is not Ready yet.
    """
    if how is Regime.NONE:
        return 0
    if how is Regime.ON_DEMAND:
        return 0 if demand <= 0 else min(bounds.max_scale, max(1, -(-demand // concurrency)))
    if loading:
        return max(autoscaled, min(initial_target, bounds.max_scale))
    return autoscaled


K = TypeVar("K", bound=str)


@dataclass(frozen=True, slots=True)
class PodLoad:
    """A serving pod as the plan sees it."""

    in_flight: int
    idle_since: float


@dataclass(frozen=True, slots=True)
class PodPlan(Generic[K]):
    """What to do with a Version's pods: start `start` more, or take `retire` out of routing (idle ones first)."""

    start: int
    retire: tuple[K, ...]


def plan_pods(
    *, desired: int, serving: Mapping[K, PodLoad], starting: int, can_start: bool, max_scale: int
) -> PodPlan[K]:
    """Reach `desired` serving pods from `serving` plus the `starting` ones.

    `can_start` is False when the Version has no code to load or the activator is closing: then
    missing pods stay missing. `max_scale` is this replica's share of the Version's `maxScale`.
    """
    ready = len(serving)
    if desired > ready + starting:
        return PodPlan(desired - ready - starting if can_start else 0, ())
    if desired >= ready:
        return PodPlan(0, ())
    idle = {pod: load.idle_since for pod, load in serving.items() if load.in_flight == 0}
    busy = {pod: load.in_flight for pod, load in serving.items() if load.in_flight > 0}
    released = pods_to_release(idle, busy.keys(), ready - desired)
    ceiling = 0 if desired == 0 else max_scale
    drained = pods_to_drain(busy, ready - len(released) - ceiling)
    return PodPlan(0, (*released, *drained))
