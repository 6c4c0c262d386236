"""How many generic pods a warm pool keeps: its floor plus the claims the activators expect.

Pool size has one owner, the operator. Each activator counts the claims it made from each pool
over a sliding window (`ClaimRate`) and publishes the counts (the Kubernetes pod source writes
them on its Lease, renewed every few seconds); the operator sets every pool's replicas to
`pool_replicas(floor, demands)`. A pool that saw N claims in the last window keeps N spares warm
on top of its floor, so that the next window's claims find ready pods instead of waiting for a
pod to start (seconds in gVisor), and it falls back to the floor once claims stop. The predictor
will add its expected arrivals to the same sum. Pure: no I/O, the clock is passed in.
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Iterable, Mapping
from typing import Final

DEFAULT_WINDOW_S: Final = 60.0
MAX_DEMAND_CHARS: Final = 4096  # one pool id and count is ~25 characters: room for ~150 pools


class ClaimRate:
    """Claims per pool over the last `window_s` seconds."""

    def __init__(self, *, window_s: float = DEFAULT_WINDOW_S) -> None:
        if window_s <= 0:
            raise ValueError(f"window_s ({window_s}) must be positive")
        self.window_s = window_s
        self._claims: dict[str, deque[float]] = {}

    def record(self, pool: str, now: float) -> None:
        """One claim from `pool` at `now`."""
        self._claims.setdefault(pool, deque()).append(now)

    def demand(self, now: float) -> dict[str, int]:
        """Claims per pool in the window ending at `now`; pools without any are left out."""
        out: dict[str, int] = {}
        for pool, times in list(self._claims.items()):
            while times and times[0] <= now - self.window_s:
                times.popleft()
            if times:
                out[pool] = len(times)
            else:
                del self._claims[pool]
        return out


def pool_replicas(*, floor: int, demands: Iterable[int], ceiling: int) -> int:
    """Replicas of one pool: the floor plus every activator's demand, at most `ceiling` (never below the floor)."""
    if floor < 0 or ceiling < 0:
        raise ValueError(f"floor ({floor}) and ceiling ({ceiling}) must not be negative")
    wanted = floor + sum(max(0, d) for d in demands)
    return max(floor, min(ceiling, wanted))


def encode_demand(demand: Mapping[str, int]) -> str:
    """The published form of one activator's demand (compact JSON, sorted, bounded in size)."""
    text = json.dumps(dict(sorted(demand.items())), separators=(",", ":"))
    if len(text) > MAX_DEMAND_CHARS:  # keep the busiest pools; a Lease annotation must stay small
        busiest = sorted(demand.items(), key=lambda kv: (-kv[1], kv[0]))
        kept: dict[str, int] = {}
        for pool, count in busiest:
            kept[pool] = count
            if len(json.dumps(kept, separators=(",", ":"))) > MAX_DEMAND_CHARS:
                del kept[pool]
                break
        text = json.dumps(dict(sorted(kept.items())), separators=(",", ":"))
    return text


def decode_demand(text: str | None) -> dict[str, int]:
    """One activator's published demand; anything malformed counts as none (it is a hint, not a command)."""
    if not text:
        return {}
    try:
        parsed = json.loads(text)
    except ValueError:
        return {}
    if not isinstance(parsed, dict):
        return {}
    return {
        str(pool): count
        for pool, count in parsed.items()
        if isinstance(count, int) and not isinstance(count, bool) and 0 < count <= 10_000
    }
