"""One local pod: an agent process, the pool it was started for, and where it is in its life.

A process goes STARTING -> GENERIC -> (WARM ->) CLAIMED -> SPECIALIZED, and from any of these to
STOPPING (this source stops it) and DEAD (seen exit, forgotten). A pool refill health-checks a
GENERIC process and makes it WARM; a claim on an empty pool takes a GENERIC one straight away.

An agent process starts with `agent_environment`: `AGENT_ENV` and its own settings, never the
environment of the process running `ember dev` (a function sees the agent's environment and
its own `env`; DESIGN.md, Trust boundaries). `ember.pods.local.sandbox` enforces the same at
the sandbox's entry, whatever environment the caller passes.
"""

from __future__ import annotations

import asyncio
import enum
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from ember.pods.base import PodHandle, PodId, PoolKey, PoolUnavailable

LISTENING_PREFIX = b"EMBER_AGENT_LISTENING "

# The whole environment an agent starts with, besides its settings: nothing here is a secret,
# and nothing names the host (HOME is the sandbox's private /tmp).
AGENT_ENV: Mapping[str, str] = MappingProxyType(
    {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": "/tmp"}
)
# The settings the agents read (runtime-images/CONTRACT.md, Configuration); no other variable
# reaches an agent. None is a secret: the agents pass their environment on to function code.
AGENT_SETTINGS = (
    "EMBER_AGENT_HOST",
    "EMBER_AGENT_PORT",
    "EMBER_AGENT_SOCKET",
    "EMBER_AGENT_LISTEN_FD",
    "EMBER_AGENT_SERVICES_SOCKET",
    "EMBER_AGENT_CONCURRENCY",
    "EMBER_AGENT_MAX_PAYLOAD_BYTES",
    "EMBER_AGENT_CODE_DIR",
    "EMBER_AGENT_MAX_CODE_BYTES",
    "EMBER_AGENT_SHUTDOWN_GRACE_SECONDS",
    "EMBER_AGENT_TRACE",
    "EMBER_AGENT_PIDS_LIMIT",
)


def agent_environment(settings: Mapping[str, str]) -> dict[str, str]:
    """The environment of a new agent process: `AGENT_ENV` and `settings` (`AGENT_SETTINGS` only)."""
    unknown = sorted(set(settings) - set(AGENT_SETTINGS))
    if unknown:
        raise ValueError(f"not an agent setting: {', '.join(unknown)} (allowed: {', '.join(AGENT_SETTINGS)})")
    return {**AGENT_ENV, **settings}


class ProcessState(enum.Enum):
    """Where an agent process is in its life (see the module docstring)."""

    STARTING = "starting"  # spawned; its port not yet known
    GENERIC = "generic"  # listening, holding no code, not yet in a pool
    WARM = "warm"  # healthy and waiting in its pool
    CLAIMED = "claimed"  # handed out by a claim
    SPECIALIZED = "specialized"  # its Version's code loaded: an endpoint
    STOPPING = "stopping"  # being stopped by this source
    DEAD = "dead"  # exited and forgotten

    @property
    def ending(self) -> bool:
        """Stopped on purpose, or gone: an exit now is no surprise."""
        return self in (ProcessState.STOPPING, ProcessState.DEAD)


@dataclass(frozen=True, slots=True)
class PodPlace:
    """One pod's private folder on the host (mode 0700, removed with the pod) and its name.

    `run/` in it holds the agent's socket; it is the only host folder a sandbox may write."""

    root: Path
    name: str

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def socket(self) -> Path:
        """The agent's socket, as this process connects to it."""
        return self.run_dir / "agent.sock"

    @property
    def services_socket(self) -> Path:
        """The pod's services proxy socket (`ember.pods.services`), as this process listens on it."""
        return self.run_dir / "services.sock"


@dataclass(frozen=True, slots=True)
class LocalPod:
    """A read-only view of one agent process (for tests and tools)."""

    id: PodId
    pool: PoolKey
    pid: int
    state: ProcessState
    address: str  # unix:<path> of its agent's socket ("" while starting)
    services_port: int | None = None  # its agent's services relay, on the sandbox's loopback


@dataclass(eq=False)
class AgentProcess:
    """An agent process this source started, until it is seen exit."""

    id: PodId
    pool: PoolKey
    proc: asyncio.subprocess.Process
    address: str = ""
    handle: PodHandle | None = None
    state: ProcessState = ProcessState.STARTING
    monitor: asyncio.Task[None] | None = None
    started_at: float = field(default_factory=time.monotonic)
    refill_due: asyncio.TimerHandle | None = None
    services_port: int | None = None  # where its agent relays to the services proxy, on its loopback
    services_socket: str | None = None  # the services proxy's socket, where its sandbox sees it
    oom_events: int | None = None  # an eventfd of its memory cgroup's OOM (bwrap, cgroup v1)
    oom_noted: bool = False  # its out-of-memory kill is logged

    def view(self) -> LocalPod:
        """This process as it is now, read-only."""
        return LocalPod(
            id=self.id,
            pool=self.pool,
            pid=self.proc.pid,
            state=self.state,
            address=self.address,
            services_port=self.services_port,
        )


async def read_listening(proc: asyncio.subprocess.Process) -> str:
    """What a starting agent prints it listens on (`socket=<path>` or `port=<n>`);
    `PoolUnavailable` if it exits first."""
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
            return line[len(LISTENING_PREFIX) :].decode(errors="replace").strip()
        seen.append(line)
