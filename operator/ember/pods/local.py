"""Local pods: runtime-agent processes on this machine, each in a gVisor sandbox when possible.

The pod source of `ember dev` and of the local test tier. Per `PoolKey` it keeps a generic pool
of agent processes that listen but hold no code; `claim` takes one (a pool hit) or starts one
(a pool miss), and a background task refills the pool. Every process is watched: one that
exits is dropped from the pool (and replaced) or from its Version's endpoints (watchers hear).
`close` stops every process by pid: SIGTERM, then SIGKILL after a grace period.

Sandboxes, best first (`EMBER_SANDBOX=runsc|bwrap|none` forces one):

- **runsc** (gVisor; `EMBER_RUNSC` names the binary, else PATH): `runsc --rootless
  --network=host do`. The sandbox gets gVisor's own kernel (syscalls never reach the host
  kernel directly) and a read-only view of the host filesystem with a private writable
  overlay. `runsc do` without `--network=host` gives the sandbox its own network namespace,
  which it wires with a veth pair and iptables NAT on a 192.168.10.0/24 address per sandbox:
  that needs iptables, puts every sandbox on the same fixed address, and uses a private range
  this machine must not send traffic to. With `--network=host` the sandboxed agent binds a
  port on the host's loopback (gVisor's hostinet), which the activator reaches like any local
  process, so local mode does not isolate the network (a cluster enforces the
  SecurityPolicy's egress with NetworkPolicy instead). `EMBER_RUNSC_FLAGS` adds flags (e.g.
  `--platform=systrap` for a newer runsc).
- **bwrap** (bubblewrap): new user, mount, pid, ipc and uts namespaces, read-only root,
  private /tmp, host network (for the same reason).
- **none**: a plain child process, with a loud warning: the function is not isolated.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import deque
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from ember.pods.base import (
    ClaimKind,
    PodGone,
    PodHandle,
    PodId,
    PoolKey,
    PoolUnavailable,
    SpecializeFailed,
    SpecializeRequest,
    VersionKey,
)

log = logging.getLogger(__name__)

LISTENING_PREFIX = b"EMBER_AGENT_LISTENING port="
# A claim's refill waits for the claimed pod's cold start (see `LocalPodSource._refill_after`):
# until this long after its specialize ends (its first invocations follow at once), or at most
# REFILL_DEFER_MAX_S when no specialize follows the claim.
REFILL_GRACE_S = 0.025
REFILL_DEFER_MAX_S = 1.0
RUNTIME_IMAGES = Path(__file__).resolve().parents[3] / "runtime-images"


class Sandbox(enum.Enum):
    """How agent processes are isolated."""

    RUNSC = "runsc"
    BWRAP = "bwrap"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class SandboxChoice:
    """The sandbox in use, the binary that provides it, and why (for `ember dev`'s banner)."""

    kind: Sandbox
    binary: str | None
    note: str

    @property
    def isolated(self) -> bool:
        return self.kind is not Sandbox.NONE


def detect_sandbox(env: Mapping[str, str] | None = None) -> SandboxChoice:
    """The best sandbox available here (see the module docstring)."""
    env = os.environ if env is None else env
    forced = env.get("EMBER_SANDBOX", "").strip().lower()
    if forced and forced not in {s.value for s in Sandbox}:
        raise ValueError(f"EMBER_SANDBOX={forced!r}: must be one of runsc, bwrap, none")
    runsc = env.get("EMBER_RUNSC") or shutil.which("runsc")
    bwrap = shutil.which("bwrap")
    if forced in ("", "runsc") and runsc:
        if not os.access(runsc, os.X_OK):
            raise ValueError(f"EMBER_RUNSC={runsc!r} is not an executable file")
        return SandboxChoice(Sandbox.RUNSC, runsc, f"gVisor ({runsc}, host network)")
    if forced == "runsc":
        raise ValueError("EMBER_SANDBOX=runsc but runsc is not installed (apt-get install runsc, or set EMBER_RUNSC)")
    if forced in ("", "bwrap") and bwrap:
        return SandboxChoice(Sandbox.BWRAP, bwrap, f"bubblewrap ({bwrap}); install runsc for gVisor")
    if forced == "bwrap":
        raise ValueError("EMBER_SANDBOX=bwrap but bwrap is not installed (apt-get install bubblewrap)")
    return SandboxChoice(
        Sandbox.NONE, None, "NONE: functions run as plain processes, NOT ISOLATED (install runsc or bubblewrap)"
    )


def _python_for(version: str) -> str:
    """The real interpreter binary for python3.X (pyenv shims resolved: sandboxes run it directly)."""
    candidate = shutil.which(f"python{version}")
    if candidate is not None and "/shims/" in candidate:
        # a pyenv shim picks the interpreter by the current directory; find the binary itself
        root = Path(os.environ.get("PYENV_ROOT") or Path(candidate).parents[1])
        installed = sorted(root.glob(f"versions/{version}*/bin/python{version}"))
        candidate = str(installed[-1]) if installed else None
    if candidate is None:
        if f"{sys.version_info[0]}.{sys.version_info[1]}" == version:
            return sys.executable
        raise PoolUnavailable(f"runtime python{version} is not installed on this machine")
    try:
        resolved = subprocess.run(
            [candidate, "-c", "import sys; print(sys.executable)"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as err:
        raise PoolUnavailable(f"runtime python{version} ({candidate}) does not start: {err}") from err
    # The agent runs with -S -E on the standard library alone, so a virtualenv's interpreter is
    # replaced by the binary it links to: a sandbox then needs no view of the virtualenv.
    return os.path.realpath(resolved or candidate)


def agent_command(runtime: str, runtime_images: Path = RUNTIME_IMAGES) -> list[str]:
    """The command line of a generic agent for a runtime."""
    if runtime.startswith("python"):
        # the agent package's one-file build, as images run it (importing the package module by
        # module would cost every start ~2 ms, ~48 ms under gVisor): see runtime-images/python/bundle.py
        bundle = runtime_images / "python" / "bundle.py"
        if not bundle.is_file():
            raise PoolUnavailable(f"the Python agent is missing: {bundle}")
        python = _python_for(runtime.removeprefix("python"))
        try:
            built = subprocess.run(
                [python, "-S", "-E", str(bundle), "--cached"], capture_output=True, text=True, timeout=60, check=True
            )
        except subprocess.CalledProcessError as err:
            raise PoolUnavailable(f"building the Python agent failed: {err.stderr.strip()}") from err
        except (OSError, subprocess.SubprocessError) as err:
            raise PoolUnavailable(f"building the Python agent failed: {err}") from err
        return [python, "-S", "-E", built.stdout.strip()]
    if runtime.startswith("nodejs"):
        agent = runtime_images / "nodejs" / "agent.js"
        node = shutil.which("node")
        if not agent.is_file() or node is None:
            raise PoolUnavailable(f"runtime {runtime} needs node and {agent}")
        return [node, str(agent)]
    raise PoolUnavailable(f"runtime {runtime!r} has no local agent")


def sandboxed(choice: SandboxChoice, command: list[str], env: Mapping[str, str] | None = None) -> list[str]:
    """Wrap an agent command line in the chosen sandbox."""
    env = os.environ if env is None else env
    if choice.kind is Sandbox.RUNSC:
        assert choice.binary is not None
        extra = env.get("EMBER_RUNSC_FLAGS", "").split()
        return [choice.binary, "--rootless", "--network=host", *extra, "do", *command]
    if choice.kind is Sandbox.BWRAP:
        assert choice.binary is not None
        # the private /tmp hides the host's; an interpreter or agent living there is bound back
        keep = sorted({str(root) for p in command if (root := _tmp_root(Path(p))) is not None})
        binds = [arg for path in keep for arg in ("--ro-bind", path, path)]
        return [
            choice.binary,
            "--ro-bind", "/", "/",
            "--dev", "/dev",
            "--proc", "/proc",
            "--tmpfs", "/tmp",
            *binds,
            "--unshare-all",
            "--share-net",
            "--die-with-parent",
            "--new-session",
            "--",
            *command,
        ]  # fmt: skip
    return list(command)


def _tmp_root(path: Path) -> Path | None:
    """The top folder under /tmp holding `path` (e.g. /tmp/clone for /tmp/clone/x/y), or None."""
    parts = path.resolve().parts if path.is_absolute() else ()
    if len(parts) > 2 and parts[1] == "tmp":
        return Path("/", "tmp", parts[2])
    return None


@dataclass(eq=False)
class _Process:
    id: PodId
    pool: PoolKey
    proc: asyncio.subprocess.Process
    address: str = ""
    handle: PodHandle | None = None
    state: str = "starting"  # starting, warm, claimed, specialized, stopping, dead
    monitor: asyncio.Task[None] | None = None
    started_at: float = field(default_factory=time.monotonic)
    refill_due: asyncio.TimerHandle | None = None


@dataclass
class _Pool:
    target: int = 0
    warm: deque[_Process] = field(default_factory=deque)
    starting: int = 0


class LocalPodSource:
    """A `PodSource` of agent processes on this machine."""

    def __init__(
        self,
        *,
        sandbox: SandboxChoice | None = None,
        runtime_images: Path = RUNTIME_IMAGES,
        start_timeout_s: float = 60.0,
        stop_grace_s: float = 3.0,
        max_parallel_starts: int | None = None,
    ) -> None:
        self.sandbox = sandbox or detect_sandbox()
        if not self.sandbox.isolated:
            log.warning("local pods are NOT sandboxed: %s", self.sandbox.note)
        self._runtime_images = runtime_images
        self._start_timeout_s = start_timeout_s
        self._stop_grace_s = stop_grace_s
        self._commands: dict[str, list[str]] = {}
        self._pools: dict[PoolKey, _Pool] = {}
        self._processes: dict[PodId, _Process] = {}
        self._by_version: dict[VersionKey, dict[PodId, PodHandle]] = {}
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._starts = asyncio.Semaphore(max_parallel_starts or max(2, os.cpu_count() or 2))
        self._session: aiohttp.ClientSession | None = None
        self._closed = False

    # -- the PodSource interface

    async def claim(self, pool: PoolKey) -> PodHandle:
        state = self._pool(pool)
        while state.warm:
            process = state.warm.popleft()
            if process.proc.returncode is None:
                self._refill_after(process)
                return self._claimed(process, ClaimKind.POOL_HIT)
            self._refill(pool)
        process = await self._start(pool)
        self._refill_after(process)
        return self._claimed(process, ClaimKind.POOL_MISS)

    async def specialize(self, pod: PodHandle, request: SpecializeRequest) -> PodHandle:
        process = self._processes.get(pod.id)
        if process is None or process.proc.returncode is not None:
            raise PodGone(f"pod {pod.id} is not running")
        session = await self._http()
        url = f"http://{pod.address}/v1/specialize"
        try:
            async with session.post(url, json=dict(request.payload)) as response:
                body = await response.read()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as err:
            raise PodGone(f"pod {pod.id} at {pod.address}: specialize request failed: {err}") from err
        finally:
            self._refill_soon(process)
        if status != 200:
            error_type, message = _error_of(body)
            raise SpecializeFailed(pod.id, status, error_type, message)
        handle = replace(pod, version=request.version, concurrency=request.concurrency)
        process.handle = handle
        process.state = "specialized"
        self._by_version.setdefault(request.version, {})[pod.id] = handle
        await self._notify()
        return handle

    async def release(self, pod: PodHandle) -> None:
        process = self._processes.get(pod.id)
        if process is None:
            return
        await self._stop(process)

    def endpoints(self, version: VersionKey) -> Sequence[PodHandle]:
        return list(self._by_version.get(version, {}).values())

    async def watch(self, version: VersionKey) -> AsyncIterator[Sequence[PodHandle]]:
        last: list[PodHandle] | None = None
        while not self._closed:
            current = list(self.endpoints(version))
            if current != last:
                last = current
                yield current
            async with self._changed:
                await self._changed.wait()

    def warm_pods(self) -> Mapping[PoolKey, int]:
        return {key: len(pool.warm) for key, pool in self._pools.items()}

    async def ensure_pool(self, pool: PoolKey, size: int) -> None:
        if size < 0:
            raise ValueError(f"pool size ({size}) must not be negative")
        state = self._pool(pool)
        state.target = size
        while len(state.warm) > size:
            self._spawn(self._stop(state.warm.pop()))
        self._refill(pool)

    async def report_load_failure(self, version: VersionKey, *, code_hash: str, message: str) -> None:
        """Nothing to write: in local mode the activator's own Version state is the only status."""

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(self._stop(p) for p in list(self._processes.values())), return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
        async with self._changed:
            self._changed.notify_all()

    # -- processes

    def running_pids(self) -> list[int]:
        """Pids of every process this source started and has not yet seen exit."""
        return [p.proc.pid for p in self._processes.values() if p.proc.returncode is None]

    def _pool(self, key: PoolKey) -> _Pool:
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool()
        return pool

    def _claimed(self, process: _Process, kind: ClaimKind) -> PodHandle:
        process.state = "claimed"
        process.handle = PodHandle(id=process.id, address=process.address, pool=process.pool, claim=kind)
        return process.handle

    def _refill_after(self, process: _Process) -> None:
        """Refill the pool of a claimed pod once that pod's cold start is over: `REFILL_GRACE_S`
        after its specialize ends (time for the first invocations, which follow at once), at
        once when it is gone, at the latest `REFILL_DEFER_MAX_S` after the claim.

        Starting a sandbox costs a few hundred ms of CPU; begun at the claim, it competes with
        the very cold start it replaces the pod for (on a 2-core machine that was about a third
        of a warm-pool cold start). The pool is short of one pod for some ms longer instead.
        """
        process.refill_due = asyncio.get_running_loop().call_later(REFILL_DEFER_MAX_S, self._refill_now, process)

    def _refill_soon(self, process: _Process) -> None:
        """The claimed pod's specialize ended: its refill starts `REFILL_GRACE_S` from now."""
        due = process.refill_due
        if due is not None:
            due.cancel()
            process.refill_due = asyncio.get_running_loop().call_later(REFILL_GRACE_S, self._refill_now, process)

    def _refill_now(self, process: _Process) -> None:
        due, process.refill_due = process.refill_due, None
        if due is not None:
            due.cancel()
            if not self._closed:
                self._refill(process.pool)

    def _refill(self, key: PoolKey) -> None:
        pool = self._pool(key)
        missing = pool.target - len(pool.warm) - pool.starting
        for _ in range(max(0, missing)):
            pool.starting += 1
            self._spawn(self._refill_one(key, pool))

    async def _refill_one(self, key: PoolKey, pool: _Pool) -> None:
        try:
            process = await self._start(key)
        except PoolUnavailable as err:
            log.error("pool refill failed pool=%s error=%s", key, err)
            await asyncio.sleep(1.0)  # do not spin on a runtime that cannot start
            return
        finally:
            pool.starting -= 1
        if self._closed or len(pool.warm) >= pool.target:
            await self._stop(process)
            return
        if not await self._healthy(process):
            await self._stop(process)
            self._refill(key)
            return
        process.state = "warm"
        pool.warm.append(process)

    async def _healthy(self, process: _Process) -> bool:
        """Check a new agent over a connection the session keeps for `specialize`.

        Inside gVisor a new connection costs the agent an accept and a thread (tens of ms
        under ptrace); doing it here, before the pod is claimed, keeps it off the cold start.
        """
        session = await self._http()
        try:
            async with session.get(f"http://{process.address}/healthz") as response:
                state = (await response.json()).get("state")
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError) as err:
            log.warning("new pod failed its health check pod=%s error=%s", process.id, err)
            return False
        return response.status == 200 and state == "generic"

    async def _command(self, runtime: str) -> list[str]:
        command = self._commands.get(runtime)
        if command is None:
            # resolving the interpreter runs it once: keep that off the event loop
            agent = await asyncio.to_thread(agent_command, runtime, self._runtime_images)
            command = self._commands[runtime] = sandboxed(self.sandbox, agent)
        return command

    async def _start(self, key: PoolKey) -> _Process:
        if self._closed:
            raise PoolUnavailable("the local pod source is closed")
        command = await self._command(key.runtime)
        pod_id = PodId(f"local-{os.getpid()}-{next(self._ids)}")
        env = {
            **os.environ,
            "EMBER_AGENT_HOST": "127.0.0.1",
            "EMBER_AGENT_PORT": "0",
            "EMBER_AGENT_CONCURRENCY": "1",
        }
        async with self._starts:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *command,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            except OSError as err:
                raise PoolUnavailable(f"cannot start {command[0]}: {err}") from err
            process = _Process(pod_id, key, proc)
            self._processes[pod_id] = process
            try:
                async with asyncio.timeout(self._start_timeout_s):
                    port = await _read_port(proc)
            except (TimeoutError, PoolUnavailable) as err:
                await self._stop(process)
                raise PoolUnavailable(f"agent {pod_id} ({' '.join(command)}) did not start: {err}") from err
        process.address = f"127.0.0.1:{port}"
        process.state = "generic"
        process.monitor = asyncio.create_task(self._watch_process(process), name=f"ember-pod-{pod_id}")
        log.debug(
            "pod started pod=%s pid=%d address=%s ms=%.0f",
            pod_id,
            proc.pid,
            process.address,
            (time.monotonic() - process.started_at) * 1000,
        )
        return process

    async def _watch_process(self, process: _Process) -> None:
        """Forward the agent's output to the log, and notice when it exits."""
        stream = process.proc.stdout
        assert stream is not None
        while True:
            line = await stream.readline()
            if not line:
                break
            log.info("pod=%s %s", process.id, line.decode(errors="replace").rstrip())
        code = await process.proc.wait()
        if process.state not in ("stopping", "dead"):
            log.warning("pod exited pod=%s pid=%d code=%s state=%s", process.id, process.proc.pid, code, process.state)
        await self._forget(process)

    async def _forget(self, process: _Process) -> None:
        self._refill_now(process)
        previous = process.state
        process.state = "dead"
        self._processes.pop(process.id, None)
        pool = self._pools.get(process.pool)
        if pool is not None and process in pool.warm:
            pool.warm.remove(process)
            if previous == "warm":
                self._refill(process.pool)
        if process.handle is not None and process.handle.version is not None:
            pods = self._by_version.get(process.handle.version, {})
            if pods.pop(process.id, None) is not None:
                if not pods:
                    self._by_version.pop(process.handle.version, None)
                await self._notify()

    async def _stop(self, process: _Process) -> None:
        if process.state == "dead":
            return
        process.state = "stopping"
        proc = process.proc
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                async with asyncio.timeout(self._stop_grace_s):
                    await proc.wait()
            except TimeoutError:
                log.warning("pod did not stop on SIGTERM, killing pod=%s pid=%d", process.id, proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if process.monitor is not None and process.monitor is not asyncio.current_task():
            process.monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await process.monitor
        await self._forget(process)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _http(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120))
        return self._session


async def _read_port(proc: asyncio.subprocess.Process) -> int:
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


def _error_of(body: bytes) -> tuple[str, str]:
    try:
        parsed = json.loads(body)
    except ValueError:
        return "InvalidResponse", body[:200].decode(errors="replace")
    if isinstance(parsed, dict):
        return str(parsed.get("errorType", "Unknown")), str(parsed.get("errorMessage", ""))
    return "InvalidResponse", str(parsed)[:200]
