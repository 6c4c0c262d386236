"""Local pods: runtime-agent processes on this machine, each in a gVisor sandbox when possible.

The pod source of `ember dev` and of the local test tier. Per `PoolKey` it keeps a generic pool
of agent processes that listen but hold no code; `claim` takes one (a pool hit) or starts one
(a pool miss), and a background task refills the pool. Every process is watched: one that
exits is dropped from the pool (and replaced) or from its Version's endpoints (watchers hear).
`close` stops every process by pid: SIGTERM, then SIGKILL after a grace period.

The sandbox each process runs in is chosen in `ember.pods.local.sandbox`; the agent command per
runtime comes from `ember.pods.local.runtimes`; one process and its state is `ember.pods.local.process`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import logging
import os
import re
import secrets
import signal
import socket
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import aiohttp

from ember.pods.base import (
    MAX_BOUND_DISCARDS,
    BoundByAnotherClient,
    ClaimKind,
    MemoryKills,
    PodGone,
    PodHandle,
    PodId,
    PoolKey,
    PoolUnavailable,
    Portal,
    SpecializeFailed,
    SpecializeRequest,
    StateHandler,
    VersionKey,
    agent_error,
    bound_by_another,
    new_agent_token,
    unix_socket,
)
from ember.pods.local import egress
from ember.pods.local.process import AGENT_SETTINGS, AgentProcess, LocalPod, PodPlace, ProcessState, read_listening
from ember.pods.local.runtimes import RUNTIME_IMAGES, agent_command
from ember.pods.local.sandbox import (
    SANDBOX_SERVICES_SOCKET,
    SANDBOX_SOCKET,
    Sandbox,
    SandboxChoice,
    VolumeBind,
    agent_makes_its_socket,
    detect_sandbox,
    kill_cgroup,
    make_place,
    memory_peak_bytes,
    oom_kills,
    release_place,
    remove_tree,
    sandboxed,
    sweep_cgroups,
    watch_oom,
)
from ember.pods.services import Credentials, ServiceProxy, no_credentials
from ember.scaling.rightsize import Isolation, sandbox_overhead_mib

log = logging.getLogger(__name__)

# A claim's refill waits for the claimed pod's cold start (see `LocalPodSource._refill_after`):
# until this long after its specialize ends (its first invocations follow at once), or at most
# REFILL_DEFER_MAX_S when no specialize follows the claim.
REFILL_GRACE_S = 0.025
REFILL_DEFER_MAX_S = 1.0


@dataclass
class _Pool:
    floor: int = 0  # ensure_pool's size
    expected: int = 0  # claims the predictor expects soon (expect_claims)
    warm: deque[AgentProcess] = field(default_factory=deque)
    starting: int = 0

    @property
    def target(self) -> int:
        return self.floor + self.expected


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
        credentials: Credentials = no_credentials,
        volumes: Path | None = None,
    ) -> None:
        self.sandbox = sandbox or detect_sandbox()
        # `state.volume`: each Function's folder is `volumes/<namespace>/<function>`, bound into
        # every sandbox of its pools (`PoolKey.volume`) and kept when this source closes; without
        # it, such pools cannot start
        self._volumes = volumes
        if not self.sandbox.isolated:
            log.warning("local pods are NOT sandboxed: %s", self.sandbox.note)
        self._runtime_images = runtime_images
        self._start_timeout_s = start_timeout_s
        self._stop_grace_s = stop_grace_s
        self._commands: dict[str, list[str]] = {}
        # Every pod's private folder (its agent's socket, its OCI bundle) lives under this one,
        # made here with mode 0700 and removed by `close`.
        self._places = Path(tempfile.mkdtemp(prefix="ember-pods-"))
        self._sessions: dict[PodId, aiohttp.ClientSession] = {}
        self._checked_control_socket = False
        self._pod_places: dict[PodId, PodPlace] = {}  # the folders of pods made and not yet released
        self._releasing: set[asyncio.Future[None]] = set()  # releases of pods in flight (`_release_place`)
        self._pools: dict[PoolKey, _Pool] = {}
        self._processes: dict[PodId, AgentProcess] = {}
        self._by_version: dict[VersionKey, dict[PodId, PodHandle]] = {}
        self._changed = asyncio.Condition()
        self._tasks: set[asyncio.Task[None]] = set()
        self._ids = itertools.count(1)
        self._starts = asyncio.Semaphore(max_parallel_starts or max(2, os.cpu_count() or 2))
        self._closed = False
        self.discarded_bound = 0  # pods discarded because another client had bound them first
        self._memory_kills: dict[VersionKey, MemoryKills] = {}  # specialized pods killed at their memory bound
        self._services = ServiceProxy(credentials)  # pods with a channel (`PoolKey.channel`)
        if not egress.problem():
            egress.sweep(_of_a_dead_process)  # network namespaces a killed `ember dev` left
        sweep_cgroups(_of_a_dead_process)  # and cgroups a sandbox left busy past its release

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
        claimed = pod
        try:
            discards = 0
            while True:
                status, body = await self._post_specialize(pod, request)
                if not bound_by_another(status):
                    break
                # Another client bound this agent first (function code shares the loopback with
                # every agent here): it may hold anyone's code under any codeHash. Never use it.
                self.discarded_bound += 1
                discards += 1
                log.warning("pod discarded: bound by another client pod=%s pool=%s status=%d", pod.id, pod.pool, status)
                await self.release(pod)
                if discards >= MAX_BOUND_DISCARDS:
                    raise BoundByAnotherClient(
                        f"pool {pod.pool}: {discards} pods in a row were bound by another client; all discarded"
                    )
                pod = await self.claim(pod.pool)
            if status != 200:
                error_type, message = agent_error(body)
                raise SpecializeFailed(pod.id, status, error_type, message)
        except BaseException:
            if pod is not claimed:  # the caller releases the pod it claimed, not its replacement
                await self.release(pod)
            raise
        process = self._processes.get(pod.id)
        if process is None:
            raise PodGone(f"pod {pod.id} exited while being specialized")
        handle = replace(pod, version=request.version, concurrency=request.concurrency)
        process.handle = handle
        process.state = ProcessState.SPECIALIZED
        self._by_version.setdefault(request.version, {})[pod.id] = handle
        await self._notify()
        return handle

    async def _post_specialize(self, pod: PodHandle, request: SpecializeRequest) -> tuple[int, bytes]:
        process = self._processes.get(pod.id)
        if process is None or process.proc.returncode is not None:
            raise PodGone(f"pod {pod.id} is not running")
        session = self._http(process)
        url = "http://agent/v1/specialize"
        headers = {"Authorization": pod.authorization}
        payload = dict(request.payload)
        if pod.pool.channel and process.services_port is not None:
            services = pod.pool.isolation.services
            scope = request.version.state_scope if pod.pool.key_value else None
            token = self._services.grant(pod.id, request.version.namespace, services, state_scope=scope)
            base = f"http://127.0.0.1:{process.services_port}"
            announced = ServiceProxy.announce(base, token, services, calls=pod.pool.calls, state=pod.pool.key_value)
            if process.services_socket is not None and (pod.pool.calls or pod.pool.key_value):
                # Ember's own clients (state, portions) skip the relay (CONTRACT.md, EMBER_CHANNEL_SOCKET)
                announced["EMBER_CHANNEL_SOCKET"] = process.services_socket
            payload["env"] = {**payload.get("env", {}), **announced}
        try:
            async with session.post(url, json=payload, headers=headers) as response:
                return response.status, await response.read()
        except (aiohttp.ClientError, TimeoutError) as err:
            raise PodGone(f"pod {pod.id} at {pod.address}: specialize request failed: {err}") from err
        finally:
            self._refill_soon(process)

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
        state.floor = size
        self._resize(pool, state)

    def expect_claims(self, claims: Mapping[PoolKey, int]) -> None:
        """Keep that many more generic processes warm in each pool, on top of its size, until the
        next call says otherwise (the predictor's prewarms, so that they find a warm process)."""
        for key, state in self._pools.items():
            expected = max(0, claims.get(key, 0))
            if expected != state.expected:
                state.expected = expected
                self._resize(key, state)

    def _resize(self, key: PoolKey, state: _Pool) -> None:
        while len(state.warm) > state.target:
            self._spawn(self._stop(state.warm.pop()))
        self._refill(key)

    def route_calls(self, portal: Portal) -> None:
        self._services.portal = portal

    def route_state(self, handler: StateHandler) -> None:
        self._services.state = handler

    async def report_load_failure(self, version: VersionKey, *, code_hash: str, message: str) -> None:
        """Nothing to write: in local mode the activator's own Version state is the only status."""

    def memory_kills(self, version: VersionKey) -> MemoryKills:
        """The Version's pods whose sandbox was killed at its memory bound (`_note_oom`)."""
        return self._memory_kills.get(version, MemoryKills())

    def sandbox_overhead_mib(self, pool: PoolKey) -> int:
        """What this machine's sandbox takes beyond the worker (`ember.scaling.rightsize`): gVisor's
        Sentry under runsc, next to nothing for plain processes (bwrap, none)."""
        isolation = Isolation.GVISOR if self.sandbox.kind is Sandbox.RUNSC else Isolation.PROCESS
        return sandbox_overhead_mib(pool.runtime, isolation)

    async def report_sizing(self, version: VersionKey, *, report: str) -> None:
        """Nothing to write: in local mode the activator's own Version state is the only status."""

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.gather(*(self._stop(p) for p in list(self._processes.values())), return_exceptions=True)
        for session in list(self._sessions.values()):
            await session.close()
        self._sessions.clear()
        # pods whose start was cut short (a refill cancelled above): their sandboxes and cgroups
        for pod_id in list(self._pod_places):
            await self._release_place(pod_id)
        await asyncio.gather(*self._releasing, return_exceptions=True)
        await self._services.close()
        mine = f"ember-local-{os.getpid()}-"  # `_start`'s place names
        await asyncio.to_thread(egress.sweep, lambda name: name.startswith(mine))
        await asyncio.to_thread(remove_tree, self._places)
        async with self._changed:
            self._changed.notify_all()

    # -- processes

    def pods(self) -> dict[PodId, LocalPod]:
        """Every process this source started and has not yet seen exit, as read-only views."""
        return {pod_id: process.view() for pod_id, process in self._processes.items()}

    def memory_peak_mib(self, pod: PodId) -> float | None:
        """The most memory the pod's sandbox has used at once, in MiB, as its cgroup counts it (None
        without one, or once the pod is gone): for tests and benchmarks of right-sizing."""
        place = self._pod_places.get(pod)
        peak = memory_peak_bytes(place) if place is not None else None
        return None if peak is None else peak / 2**20

    def running_pids(self) -> list[int]:
        """Pids of every process this source started and has not yet seen exit."""
        return [p.proc.pid for p in self._processes.values() if p.proc.returncode is None]

    def _pool(self, key: PoolKey) -> _Pool:
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = _Pool()
        return pool

    def _claimed(self, process: AgentProcess, kind: ClaimKind) -> PodHandle:
        process.state = ProcessState.CLAIMED
        process.handle = PodHandle(
            id=process.id, address=process.address, pool=process.pool, claim=kind, token=new_agent_token()
        )
        return process.handle

    def _refill_after(self, process: AgentProcess) -> None:
        """Refill the pool of a claimed pod once that pod's cold start is over: `REFILL_GRACE_S`
        after its specialize ends (time for the first invocations, which follow at once), at
        once when it is gone, at the latest `REFILL_DEFER_MAX_S` after the claim.

        Starting a sandbox costs a few hundred ms of CPU; begun at the claim, it competes with
        the very cold start it replaces the pod for (on a 2-core machine that was about a third
        of a warm-pool cold start). The pool is short of one pod for some ms longer instead.
        """
        process.refill_due = asyncio.get_running_loop().call_later(REFILL_DEFER_MAX_S, self._refill_now, process)

    def _refill_soon(self, process: AgentProcess) -> None:
        """The claimed pod's specialize ended: its refill starts `REFILL_GRACE_S` from now."""
        due = process.refill_due
        if due is not None:
            due.cancel()
            process.refill_due = asyncio.get_running_loop().call_later(REFILL_GRACE_S, self._refill_now, process)

    def _refill_now(self, process: AgentProcess) -> None:
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
        process.state = ProcessState.WARM
        pool.warm.append(process)

    async def _healthy(self, process: AgentProcess) -> bool:
        """Check a new agent over a connection the session keeps for `specialize`.

        Inside gVisor a new connection costs the agent an accept and a thread (tens of ms
        under ptrace); doing it here, before the pod is claimed, keeps it off the cold start.
        """
        session = self._http(process)
        try:
            async with session.get("http://agent/healthz") as response:
                state = (await response.json()).get("state")
        except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError) as err:
            log.warning("new pod failed its health check pod=%s error=%s", process.id, err)
            return False
        return response.status == 200 and state == "generic"

    async def _agent_command(self, runtime: str) -> list[str]:
        command = self._commands.get(runtime)
        if command is None:
            # resolving the interpreter runs it once: keep that off the event loop
            command = self._commands[runtime] = await asyncio.to_thread(agent_command, runtime, self._runtime_images)
        return command

    async def _start(self, key: PoolKey) -> AgentProcess:
        if self._closed:
            raise PoolUnavailable("the local pod source is closed")
        agent = await self._agent_command(key.runtime)
        volume = self._volume_bind(key)
        pod_id = PodId(f"local-{os.getpid()}-{next(self._ids)}")
        # runsc names the sandbox's cgroups after its container: a name never used before on this
        # machine (a pod id repeats in every source of a process), so no cgroup is ever shared
        place = PodPlace(self._places / pod_id, f"ember-{pod_id}-{secrets.token_hex(4)}")
        self._pod_places[pod_id] = place
        # The agent settings this process was started with (tuning, tracing), then the pod's own.
        settings = {k: v for k in AGENT_SETTINGS if (v := os.environ.get(k)) is not None}
        for name in ("EMBER_AGENT_HOST", "EMBER_AGENT_PORT", "EMBER_AGENT_SOCKET", "EMBER_AGENT_LISTEN_FD"):
            settings.pop(name, None)
        settings.pop("EMBER_AGENT_SERVICES_SOCKET", None)
        channel = key.channel  # auxiliary services, portion calls
        if channel:  # the agent relays from its loopback to the proxy's socket for this pod
            seen_at = str(place.services_socket) if self.sandbox.kind is Sandbox.NONE else SANDBOX_SERVICES_SOCKET
            settings["EMBER_AGENT_SERVICES_SOCKET"] = seen_at
        settings["EMBER_AGENT_CONCURRENCY"] = "1"
        listener: socket.socket | None = None
        if agent_makes_its_socket(self.sandbox):
            settings["EMBER_AGENT_SOCKET"] = SANDBOX_SOCKET
            expected = f"socket={SANDBOX_SOCKET}"
        else:
            listener = await asyncio.to_thread(_listener, place)
            settings["EMBER_AGENT_LISTEN_FD"] = str(listener.fileno())
            expected = f"fd={listener.fileno()}"
        # makes the pod's folders, its bundle and maybe its network namespace: a start cancelled
        # meanwhile waits for the thread to end, so that what it made is released below
        making = asyncio.ensure_future(
            asyncio.to_thread(
                sandboxed,
                self.sandbox,
                agent,
                settings,
                place,
                memory_mib=key.memory_mib,
                isolation=key.isolation,
                channel=key.channel,
                cpu_millicores=key.cpu_millicores,
                volume=volume,
            )
        )
        try:
            try:
                command = await asyncio.shield(making)
            except asyncio.CancelledError:
                await asyncio.gather(making, return_exceptions=True)
                raise
            if channel:  # after `sandboxed`, which mounts the pod's run/ folder
                await self._services.open_pod(pod_id, place.services_socket)
        except BaseException:
            if listener is not None:
                listener.close()
            await self._release_place(pod_id)
            raise
        async with self._starts:
            try:
                proc = await asyncio.create_subprocess_exec(
                    *command,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                    pass_fds=() if listener is None else (listener.fileno(),),
                    preexec_fn=_die_with_parent,
                )
            except OSError as err:
                await self._release_place(pod_id)
                raise PoolUnavailable(f"cannot start {command[0]}: {err}") from err
            finally:
                if listener is not None:
                    listener.close()  # the agent holds it now
            process = AgentProcess(pod_id, key, proc)
            process.services_socket = settings.get("EMBER_AGENT_SERVICES_SOCKET")
            self._processes[pod_id] = process
            if self.sandbox.kind is Sandbox.BWRAP:
                self._watch_oom(process, place)
            try:
                async with asyncio.timeout(self._start_timeout_s):
                    listening = await read_listening(proc)
                where, _, relay = listening.partition(" services=")
                if where != expected:
                    # an agent that ignored its socket setting would listen where others reach it
                    raise PoolUnavailable(f"listens on {listening!r}, not on its pod's socket")
                if channel:
                    if not relay.isdigit():
                        raise PoolUnavailable(f"does not relay auxiliary services (it printed {listening!r})")
                    process.services_port = int(relay)
            except (TimeoutError, PoolUnavailable) as err:
                await self._stop(process)
                raise PoolUnavailable(f"agent {pod_id} ({' '.join(command)}) did not start: {err}") from err
        process.address = f"unix:{place.socket}"
        process.state = ProcessState.GENERIC
        if self.sandbox.kind is Sandbox.RUNSC and not self._checked_control_socket:
            await self._warn_if_control_socket_is_shared(pod_id)
        process.monitor = asyncio.create_task(self._watch_process(process), name=f"ember-pod-{pod_id}")
        log.debug(
            "pod started pod=%s pid=%d address=%s ms=%.0f",
            pod_id,
            proc.pid,
            process.address,
            (time.monotonic() - process.started_at) * 1000,
        )
        return process

    def _volume_bind(self, key: PoolKey) -> VolumeBind | None:
        """Where the Function's volume of a pool is on this machine, and where its sandboxes see it."""
        if key.volume is None:
            return None
        if self._volumes is None:
            raise PoolUnavailable("spec.state.volume: this local pod source was given no folder for volumes")
        host = self._volumes / key.volume.namespace / key.volume.function
        return VolumeBind(root=self._volumes, host=host, mount_path=key.volume.mount_path)

    async def _warn_if_control_socket_is_shared(self, pod_id: PodId) -> None:
        """At the first runsc pod: say so if its control socket is in the abstract namespace of the
        host's network, where any local process may drive the sandbox. Debian's runsc names it in
        the namespace it starts in, and every runsc starts in a network namespace of its own
        (`ember.pods.local.sandbox`), so this is a check that it stays so."""
        self._checked_control_socket = True
        table = await asyncio.to_thread(Path("/proc/net/unix").read_text)
        if f"@runsc-sandbox.{pod_id}" in table:
            log.warning(
                "runsc %s put the control socket of sandbox %s in the host's network namespace: any local "
                "process may drive it; use a newer runsc (EMBER_RUNSC), which keeps it in a private folder",
                self.sandbox.binary,
                pod_id,
            )

    async def _watch_process(self, process: AgentProcess) -> None:
        """Forward the agent's output to the log, and notice when it exits."""
        stream = process.proc.stdout
        assert stream is not None
        while True:
            line = await stream.readline()
            if not line:
                break
            log.info("pod=%s %s", process.id, line.decode(errors="replace").rstrip())
        await process.proc.wait()
        await self._forget(process)

    async def _forget(self, process: AgentProcess) -> None:
        """The process exited (on its own, or stopped by this source): drop it everywhere."""
        self._refill_now(process)
        previous = process.state
        if not previous.ending:
            log.warning(
                "pod exited pod=%s pid=%d code=%s state=%s",
                process.id,
                process.proc.pid,
                process.proc.returncode,
                previous.value,
            )
        self._note_oom(process)
        process.state = ProcessState.DEAD
        self._stop_watching_oom(process)
        self._processes.pop(process.id, None)
        session = self._sessions.pop(process.id, None)
        if session is not None:
            await session.close()
        await self._release_place(process.id)
        pool = self._pools.get(process.pool)
        if pool is not None and process in pool.warm:
            pool.warm.remove(process)
            if previous is ProcessState.WARM:
                self._refill(process.pool)
        if process.handle is not None and process.handle.version is not None:
            pods = self._by_version.get(process.handle.version, {})
            if pods.pop(process.id, None) is not None:
                if not pods:
                    self._by_version.pop(process.handle.version, None)
                await self._notify()

    async def _stop(self, process: AgentProcess) -> None:
        if process.state is ProcessState.DEAD:
            return
        process.state = ProcessState.STOPPING
        proc = process.proc
        self._note_oom(process)  # a runsc sandbox the kernel killed lingers in `runsc run`
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

    def _note_oom(self, process: AgentProcess, *, hit: bool = False) -> None:
        """Log, once, that the pod was killed at its memory cgroup's bound (`hit`: its OOM event
        came, and the kernel may not have killed anything yet)."""
        place = self._pod_places.get(process.id)
        if not process.oom_noted and place is not None and (hit or oom_kills(place)):
            process.oom_noted = True
            log.warning("pod=%s killed: out of memory (memoryMiB=%d)", process.id, process.pool.memory_mib)
            version = process.handle.version if process.handle is not None else None
            if version is not None:  # right-sizing grows the Version (`memory_kills`)
                self._memory_kills[version] = self.memory_kills(version).plus(process.pool.memory_mib)

    def _watch_oom(self, process: AgentProcess, place: PodPlace) -> None:
        """A bwrap pod in cgroup v1 goes whole when its memory bound is hit (`watch_oom`)."""
        events = watch_oom(place)
        if events is None:
            return
        process.oom_events = events

        def hit() -> None:
            with contextlib.suppress(OSError):
                os.eventfd_read(events)
            self._note_oom(process, hit=True)
            self._stop_watching_oom(process)
            self._spawn(asyncio.to_thread(kill_cgroup, place))

        asyncio.get_running_loop().add_reader(events, hit)

    def _stop_watching_oom(self, process: AgentProcess) -> None:
        if process.oom_events is not None:
            asyncio.get_running_loop().remove_reader(process.oom_events)
            os.close(process.oom_events)
            process.oom_events = None

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _release_place(self, pod_id: PodId) -> None:
        """Remove a pod's folders, mounts and cgroups and kill what is left in them, once (`release_place`).

        The release runs to its end even when the caller is cancelled (the monitor of a pod that
        `_stop` stops): a cancelled `to_thread` whose thread had not started yet would drop the
        call, and leave the pod's sandbox running in its cgroups. `close` waits for them."""
        await self._services.close_pod(pod_id)
        place = self._pod_places.pop(pod_id, None)
        if place is not None:
            releasing = asyncio.ensure_future(asyncio.to_thread(release_place, place))
            self._releasing.add(releasing)
            releasing.add_done_callback(self._releasing.discard)
            await asyncio.shield(releasing)

    def _http(self, process: AgentProcess) -> aiohttp.ClientSession:
        """The session of one pod's agent (over its socket): its health check's connection is
        kept for its specialize."""
        session = self._sessions.get(process.id)
        if session is None:
            session = self._sessions[process.id] = agent_session(process.address)
        return session


def agent_session(address: str, *, timeout_s: float = 120) -> aiohttp.ClientSession:
    """An HTTP session to the agent of a local pod at `address` (`unix:<path>`): its URLs are
    `http://agent/...`. For this source, and for tests and benchmarks that call an agent directly."""
    path = unix_socket(address)
    if path is None:
        raise ValueError(f"not a local pod's address: {address!r}")
    return aiohttp.ClientSession(
        connector=aiohttp.UnixConnector(path=path), timeout=aiohttp.ClientTimeout(total=timeout_s)
    )


def _listener(place: PodPlace) -> socket.socket:
    """A listening Unix socket at the pod's socket path, for the agent to be handed (bwrap, none)."""
    make_place(place)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(str(place.socket))
        listener.listen(1024)
    except OSError:
        listener.close()
        raise
    return listener


def _die_with_parent() -> None:
    """In the child before exec: the kernel kills it when this process dies (PR_SET_PDEATHSIG),
    so a sandbox never outlives an `ember dev` that was killed."""
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _of_a_dead_process(name: str) -> bool:
    """Whether `name` is a pod's place name (`_start`) of a process that is gone."""
    found = re.fullmatch(r"ember-local-(\d+)-\d+-[0-9a-f]{8}", name)
    return found is not None and not Path(f"/proc/{found[1]}").exists()
