"""Start, track and stop the cluster's processes by pid.

Every process is started in its own session with stdout/stderr going to a log file, and its pid is written
to `<state>/pids/<name>.pid` so a later `down` (or a crashed test run's successor) stops exactly the
processes this harness started, never anything matched by name.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .paths import StateLayout


class ClusterError(RuntimeError):
    """A cluster component failed to build, start or become healthy."""


@dataclass(frozen=True, kw_only=True)
class Proc:
    name: str
    pid: int
    log: Path


def _pid_file(state: StateLayout, name: str) -> Path:
    return state.pids / f"{name}.pid"


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie of ours still answers kill(0); treat it as gone.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def start(
    state: StateLayout,
    name: str,
    argv: Sequence[str | Path],
    *,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Proc:
    """Start `argv` in the background, logging to `<state>/logs/<name>.log` and recording its pid."""
    state.logs.mkdir(parents=True, exist_ok=True)
    state.pids.mkdir(parents=True, exist_ok=True)
    log = state.logs / f"{name}.log"
    with log.open("ab") as out:
        out.write(f"\n==== {time.strftime('%Y-%m-%dT%H:%M:%S')} {' '.join(map(str, argv))}\n".encode())
        out.flush()
        proc = subprocess.Popen(
            [str(a) for a in argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            start_new_session=True,
        )
    _pid_file(state, name).write_text(f"{proc.pid}\n")
    return Proc(name=name, pid=proc.pid, log=log)


def recorded_pid(state: StateLayout, name: str) -> int | None:
    try:
        return int(_pid_file(state, name).read_text().strip())
    except (OSError, ValueError):
        return None


def running(state: StateLayout, name: str) -> bool:
    pid = recorded_pid(state, name)
    return pid is not None and pid_alive(pid)


def _reap(pid: int) -> None:
    # Our own children must be waited for, or they linger as zombies until this process exits.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def stop_pid(pid: int, *, grace_s: float = 10.0) -> None:
    """SIGTERM `pid`, wait up to `grace_s`, then SIGKILL it."""
    if not pid_alive(pid):
        _reap(pid)
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        _reap(pid)
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)
    while pid_alive(pid):
        _reap(pid)
        time.sleep(0.05)


def stop(state: StateLayout, name: str, *, grace_s: float = 10.0) -> None:
    """Stop the process recorded as `name` (if it is still running) and forget it."""
    pid = recorded_pid(state, name)
    if pid is not None:
        stop_pid(pid, grace_s=grace_s)
    _pid_file(state, name).unlink(missing_ok=True)


def log_tail(log: Path, lines: int = 30) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no log at {log})"


def wait_for(
    what: str, check: Callable[[], bool], *, timeout_s: float, proc: Proc | None = None, interval_s: float = 0.1
) -> None:
    """Poll `check` until it is true; fail early, with the log tail, if `proc` exits first."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        if proc is not None and not pid_alive(proc.pid):
            raise ClusterError(f"{proc.name} exited while waiting for {what}; last log lines:\n{log_tail(proc.log)}")
        time.sleep(interval_s)
    tail = f"; last log lines of {proc.name}:\n{log_tail(proc.log)}" if proc else ""
    raise ClusterError(f"timed out after {timeout_s:.0f} s waiting for {what}{tail}")


def run(
    argv: Sequence[str | Path], *, log: Path | None = None, timeout_s: float | None = None, **kwargs: object
) -> str:
    """Run a short command to completion; raise with its output if it fails."""
    result = subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
        **kwargs,  # type: ignore[arg-type]
    )
    if log is not None:
        with log.open("a") as out:
            out.write(f"$ {' '.join(map(str, argv))}\n{result.stdout}{result.stderr}")
    if result.returncode != 0:
        raise ClusterError(
            f"command failed ({result.returncode}): {' '.join(map(str, argv))}\n"
            f"{result.stdout[-2000:]}{result.stderr[-3000:]}"
        )
    return result.stdout
