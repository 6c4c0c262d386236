"""One local pod: an agent process, the pool it was started for, and where it is in its life."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from ember.pods.base import PodHandle, PodId, PoolKey, PoolUnavailable

LISTENING_PREFIX = b"EMBER_AGENT_LISTENING port="


@dataclass(eq=False)
class AgentProcess:
    """An agent process this source started, until it is seen exit."""

    id: PodId
    pool: PoolKey
    proc: asyncio.subprocess.Process
    address: str = ""
    handle: PodHandle | None = None
    state: str = "starting"  # starting, warm, claimed, specialized, stopping, dead
    monitor: asyncio.Task[None] | None = None
    started_at: float = field(default_factory=time.monotonic)
    refill_due: asyncio.TimerHandle | None = None


async def read_port(proc: asyncio.subprocess.Process) -> int:
    """The port a starting agent prints it listens on; `PoolUnavailable` if it exits first."""
    stream = proc.stdout
    assert stream is not None
    seen: list[bytes] = []
    while True:
        line = await stream.readline()
        if not line:
            code = await proc.wait()
            tail = b"".join(seen[-5:]).decode(errors="replace").strip()
            raise PoolUnavailable(f"exited with code {code} before listening: {tail or 'no output'}")
        if line.startswith(LISTENING_PREFIX):
            return int(line[len(LISTENING_PREFIX) :].strip())
        seen.append(line)
