"""Hostile functions in the local sandboxes (issue #11): what function code can see and do.

Each test runs a real activator over the real `LocalPodSource` (tests/local/activator/helpers.py), in each sandbox
this machine has, with a function that attempts an attack and returns every attempt's outcome;
the test asserts the outcomes, and for writes also checks the host filesystem. A bounded
background load on another function runs during the attacks and must see no error.

What each sandbox is held to (see `ember.pods.local.sandbox`):

- every sandbox, `none` included: the agent's environment is minimal and explicit, so a
  variable of the process running `ember dev` never reaches a function;
- bwrap: a non-root uid with no capabilities, no new user namespace, read-only and minimal
  binds (no project tree, no /root, no /etc/shadow), writes only to its private /tmp;
- runsc (an OCI bundle, with any runsc, Debian's included): a non-root uid with no
  capabilities, a minimal root (no project tree, no /root, no /etc/shadow), writes only to its
  private /tmp.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from tests.local.activator.helpers import Activator, run_activator

from ember.api.function import Function
from ember.pods.local import Sandbox, SandboxChoice, detect_sandbox

PROJECT = Path(__file__).resolve().parents[3]
CANARY = "EMBER_TEST_CANARY_" + secrets.token_hex(4).upper()


def _sandboxes() -> list[Any]:
    """Every sandbox on this machine: each distinct runsc binary, bwrap, none."""
    found: list[Any] = []
    runscs = {p for p in (os.environ.get("EMBER_RUNSC"), shutil.which("runsc")) if p}
    for binary in sorted(runscs):
        choice = detect_sandbox({"EMBER_SANDBOX": "runsc", "EMBER_RUNSC": binary})
        found.append(pytest.param(choice, id=f"runsc:{binary}"))
    if shutil.which("bwrap"):
        found.append(pytest.param(detect_sandbox({"EMBER_SANDBOX": "bwrap"}), id="bwrap"))
    found.append(pytest.param(detect_sandbox({"EMBER_SANDBOX": "none"}), id="none"))
    return found


SANDBOXES = _sandboxes()
ISOLATED = [p for p in SANDBOXES if p.values[0].isolated]

PY_ENV = """
import os
def handler(event, context):
    return {"env": dict(os.environ), "uid": os.getuid()}
"""

NODE_ENV = """
exports.handler = async () => ({ env: { ...process.env }, uid: process.getuid() });
"""

# Every attempt is caught and reported: the test, not the function, decides what is a hole.
PY_ATTACKS = r"""
import os, subprocess, sys

def attempt(fn):
    try:
        return {"ok": True, "value": fn()}
    except BaseException as err:
        return {"ok": False, "error": f"{type(err).__name__}: {err}"}

def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return line.split()[1]

def run(*argv):
    done = subprocess.run(argv, capture_output=True, text=True, timeout=20)
    if done.returncode != 0:
        raise OSError(f"{argv[0]} exited {done.returncode}: {done.stderr.strip()[:200]}")
    return done.stdout.strip()[:200]

def write(path):
    with open(path, "w") as f:
        f.write("written by a hostile function\n")
    return path

def raw_socket():
    import socket
    socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP).close()
    return "opened"

def agent_pid():
    # the agent (which checks the token) is the farthest ancestor running Python (bwrap's own
    # init is not); the ones between it and this worker are its template and standbys, exec'ed
    # without its memory
    pid, found = os.getppid(), None
    while pid > 0:
        with open(f"/proc/{pid}/comm") as f:
            if f.read().startswith("python"):
                found = pid
        with open(f"/proc/{pid}/stat") as f:
            pid = int(f.read().rsplit(")", 1)[1].split()[1])
    return found

def ptrace_agent():
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    pid = agent_pid()
    if libc.ptrace(16, pid, None, None) != 0:  # PTRACE_ATTACH
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    libc.ptrace(17, pid, None, None)  # PTRACE_DETACH
    return pid

def agent_memory():
    with open(f"/proc/{agent_pid()}/mem", "rb") as f:
        return len(f.read(1))

def handler(event, context):
    token, project = os.environ["PROBE_TOKEN"], os.environ["PROBE_PROJECT"]
    stdlib = os.path.dirname(os.__file__)
    mounts = [line.split()[1] for line in open("/proc/self/mounts")]
    remounts = {m: attempt(lambda m=m: run("mount", "-o", "remount,rw,bind", m)) for m in ("/", "/usr", stdlib)}
    return {
        "uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
        "caps": {f: status(f) for f in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")},
        "no_new_privs": status("NoNewPrivs"),
        "mounts": mounts,
        "remount": remounts,
        "unshare": attempt(lambda: run("unshare", "--user", "--map-root-user", "--mount", "true")),
        "write_project": attempt(lambda: write(os.path.join(project, f"hostile-{token}"))),
        "write_stdlib": attempt(lambda: write(os.path.join(stdlib, f"hostile-{token}"))),
        "write_usr": attempt(lambda: write(f"/usr/hostile-{token}")),
        "write_etc": attempt(lambda: write(f"/etc/hostile-{token}")),
        "write_tmp": attempt(lambda: write(f"/tmp/hostile-{token}")),
        "shadow": attempt(lambda: open("/etc/shadow").read()[:10]),
        "root": attempt(lambda: sorted(os.listdir("/root"))),
        "project_listing": attempt(lambda: sorted(os.listdir(project))),
        "project_readme": attempt(lambda: open(os.path.join(project, "README.md")).read()[:10]),
        "examples": attempt(lambda: sorted(os.listdir(os.path.join(project, "examples")))),
        "agent_pid": attempt(agent_pid),
        "raw_socket": attempt(raw_socket),
        "ptrace_agent": attempt(ptrace_agent),
        "agent_memory": attempt(agent_memory),
        # a process outside the sandbox (the activator's): signal 0 only asks whether it could be signalled
        "signal_host": attempt(lambda: os.kill(int(os.environ["PROBE_HOST_PID"]), 0)),
    }
"""

LOAD = """
def handler(event, context):
    return {"n": event.get("n")}
"""


def _function(name: str, runtime: str, code: str, env: dict[str, str] | None = None) -> Function:
    handler = "index.handler" if runtime.startswith("nodejs") else "main.handler"
    spec = {"runtime": runtime, "handler": handler, "code": {"inline": code}, "env": env or {}}
    return Function.model_validate({"metadata": {"name": name}, "spec": spec})


def _use(choice: SandboxChoice, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the activator's pod source pick this sandbox (as `ember dev` would from its env)."""
    monkeypatch.setenv("EMBER_SANDBOX", choice.kind.value)
    if choice.kind is Sandbox.RUNSC:
        assert choice.binary is not None
        monkeypatch.setenv("EMBER_RUNSC", choice.binary)


async def _invoke(act: Activator, name: str, event: object = None) -> dict[str, Any]:
    async with act.http.post(act.invoke_url(name), data=json.dumps(event or {}).encode()) as response:
        text = await response.text()
        assert response.status == 200, text
        assert "X-Ember-Function-Error" not in response.headers, text
        return dict(json.loads(text))


@contextlib.asynccontextmanager
async def background_load(act: Activator, *, rate_hz: float = 20.0) -> AsyncIterator[list[str]]:
    """Invoke a well-behaved function at a bounded rate until the block ends; yield its errors."""
    act.registry.apply(_function("bystander", "python3.11", LOAD))
    assert await _invoke(act, "bystander", {"n": 0}) == {"n": 0}
    errors: list[str] = []
    done = asyncio.Event()
    sent = 0

    async def loop() -> None:
        nonlocal sent
        while not done.is_set():
            sent += 1
            try:
                reply = await _invoke(act, "bystander", {"n": sent})
                if reply != {"n": sent}:
                    errors.append(f"invocation {sent}: {reply}")
            except (AssertionError, aiohttp.ClientError, TimeoutError) as err:
                errors.append(f"invocation {sent}: {err!r}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 1 / rate_hz)

    task = asyncio.create_task(loop())
    try:
        yield errors
        async with asyncio.timeout(30):  # the load overlapped the attacks by a few invocations at least
            while sent < 5:  # noqa: ASYNC110 - the loop above counts
                await asyncio.sleep(0.05)
    finally:
        done.set()
        await task


# -- hole 1: the activator's environment


@pytest.mark.parametrize("choice", SANDBOXES)
@pytest.mark.parametrize(("runtime", "code"), [("python3.11", PY_ENV), ("nodejs20", NODE_ENV)], ids=["python", "node"])
async def test_a_function_sees_only_its_own_env_not_the_activators(
    choice: SandboxChoice, runtime: str, code: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CANARY, "leaked")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "leaked")
    _use(choice, monkeypatch)
    async with run_activator() as act, background_load(act) as errors:
        assert act.source.sandbox == choice
        act.registry.apply(_function("envprobe", runtime, code, {"MINE": "yes"}))
        seen = (await _invoke(act, "envprobe"))["env"]
    assert errors == []
    assert CANARY not in seen
    assert "AWS_SECRET_ACCESS_KEY" not in seen
    assert "leaked" not in seen.values()
    assert seen["MINE"] == "yes"
    # what is left is the agent's minimal environment: nothing of the host's beyond these names
    allowed = {"PATH", "LANG", "LC_ALL", "HOME", "TZ", "TMPDIR", "MINE", "PWD", "SHLVL", "_"}
    assert {k for k in seen if not k.startswith("EMBER_AGENT_")} <= allowed, sorted(seen)


# -- holes 2 and 3: privileges and the host filesystem


@pytest.mark.parametrize("choice", ISOLATED)
async def test_a_hostile_function_has_no_privilege_and_cannot_write_the_host(
    choice: SandboxChoice, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = secrets.token_hex(6)
    env = {"PROBE_TOKEN": token, "PROBE_PROJECT": str(PROJECT), "PROBE_HOST_PID": str(os.getpid())}
    _use(choice, monkeypatch)
    async with run_activator() as act, background_load(act) as errors:
        assert act.source.sandbox == choice
        act.registry.apply(_function("hostile", "python3.11", PY_ATTACKS, env))
        seen = await _invoke(act, "hostile")
    assert errors == []
    host_files = [
        PROJECT / f"hostile-{token}",
        Path(os.__file__).parent / f"hostile-{token}",
        Path(f"/usr/hostile-{token}"),
        Path(f"/etc/hostile-{token}"),
        Path(f"/tmp/hostile-{token}"),
    ]
    written = [p for p in host_files if p.exists()]
    for path in written:
        path.unlink()
    assert written == [], f"a sandboxed function wrote on the host: {written}"

    assert seen["caps"]["CapEff"] == seen["caps"]["CapPrm"] == "0000000000000000", seen["caps"]
    assert seen["caps"]["CapBnd"] == "0000000000000000", seen["caps"]
    assert seen["caps"]["CapAmb"] in ("0000000000000000", None), seen["caps"]  # Debian's gVisor has no CapAmb
    assert seen["no_new_privs"] in ("1", None), seen  # Debian's gVisor has no NoNewPrivs line
    assert not any(r["ok"] for r in seen["remount"].values()), seen["remount"]
    if choice.kind is Sandbox.BWRAP:  # gVisor lets it make user namespaces of gVisor's own kernel
        assert not seen["unshare"]["ok"], seen["unshare"]
    assert seen["write_tmp"]["ok"], seen["write_tmp"]  # its own /tmp is writable, and private

    assert (seen["uid"], seen["euid"], seen["gid"]) == (65534, 65534, 65534), seen
    # under /tmp the project's path is only the sandbox's private /tmp (the host check holds)
    attempts = ["write_stdlib", "write_usr", "write_etc"] + ([] if PROJECT.parts[1] == "tmp" else ["write_project"])
    for attempt in attempts:
        assert not seen[attempt]["ok"], (attempt, seen[attempt])
    assert not seen["shadow"]["ok"], seen["shadow"]
    # /root shows at most the path to an interpreter bound from it (pyenv's), never its files
    assert not seen["root"]["ok"] or set(seen["root"]["value"]) <= {".pyenv"}, seen["root"]
    # the project's path shows only the folders down to the agent's own sources
    listing = seen["project_listing"]
    assert not listing["ok"] or [n for n in listing["value"] if token not in n] == ["runtime-images"], listing
    assert not seen["project_readme"]["ok"], seen["project_readme"]
    assert not seen["examples"]["ok"], seen["examples"]
    # no raw sockets (no CAP_NET_RAW), and the agent (which holds the token) cannot be traced or read
    assert not seen["raw_socket"]["ok"], seen["raw_socket"]
    assert seen["agent_pid"]["ok"], seen["agent_pid"]
    assert isinstance(seen["agent_pid"]["value"], int), seen["agent_pid"]  # the attacks below aim at a process
    assert not seen["ptrace_agent"]["ok"], seen["ptrace_agent"]
    assert not seen["agent_memory"]["ok"], seen["agent_memory"]
    # processes outside the sandbox are not there to signal (its own pid namespace)
    assert not seen["signal_host"]["ok"], seen["signal_host"]


def test_bwrap_is_refused_where_it_cannot_make_an_unprivileged_user_namespace() -> None:
    """Where no user namespace can be made, bwrap would run privileged (or not at all): it is
    refused, forced or not. Shown inside a sandbox that forbids user namespaces."""
    bwrap = shutil.which("bwrap")
    assert bwrap is not None, "bwrap is not installed (tests/cluster/install-deps.sh installs it)"
    probe = (
        "import os\n"
        "from ember.pods.local import detect_sandbox\n"
        "try:\n"
        "    detect_sandbox({'EMBER_SANDBOX': 'bwrap'})\n"
        "except ValueError as err:\n"
        "    print('forced:', err)\n"
        "print('auto:', detect_sandbox({'EMBER_RUNSC': '', 'PATH': os.environ['PATH']}).note)\n"
    )
    jail = [bwrap, "--unshare-user", "--disable-userns", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
    env = {**os.environ, "PATH": f"{Path(bwrap).parent}:/usr/bin:/bin"}
    env.pop("EMBER_RUNSC", None)
    done = subprocess.run(
        [*jail, "--", sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, env=env, check=True
    )
    forced, auto = done.stdout.splitlines()
    assert forced.startswith("forced: EMBER_SANDBOX=bwrap but bwrap cannot make an unprivileged user namespace"), forced
    if shutil.which("runsc", path="/usr/bin:/bin") is None:
        assert "NOT ISOLATED (bwrap cannot make an unprivileged user namespace" in auto, auto
