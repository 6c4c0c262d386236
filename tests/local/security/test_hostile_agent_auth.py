"""A hostile function against other functions' agents in local mode (issue #11, first bullet).

The attack of #11, found when every agent listened on the host's loopback: read a victim
agent's codeHash from its `GET /healthz`, specialize the warm generic agents with the attacker's
own code under that codeHash and handler, so that the victim's next cold start hits the agent's
idempotent path and the victim's calls run the attacker's code; and invoke the victim's agents
directly, around the activator. Agents now bind a token at their first specialize (CONTRACT.md,
Authentication) and listen on a Unix socket in their pod's private folder, never on a TCP port
(`ember.pods.local.sandbox`): a port scan finds no agent, and a function cannot reach another
pod's socket.

A real activator over the real `LocalPodSource` (tests/local/activator/helpers.py), in each
isolating sandbox this machine has. The test checks that no agent process listens on TCP, then hands
the attacker the host paths of the victim's and the warm agents' sockets, as if they had leaked,
and the victim's codeHash; the attacker also tries its own agent's socket without the token.
It returns everything it saw. A bounded background load on the victim runs throughout and must
see only the victim's answers.

The agent-level rules (401s, what /healthz says) are tests/local/agent/test_agent_auth.py;
pod-to-pod on the cluster is tests/cluster/test_agent_auth_cluster.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from tests.local.activator.helpers import Activator, function, run_activator
from tests.local.security.test_sandbox_local import ISOLATED, _use

from ember.pods.local import SandboxChoice
from ember.pods.local.process import ProcessState

VICTIM = """
def handler(event, context):
    return {"who": "victim", "n": event.get("n")}
"""

ATTACKER = r"""
import json, os, secrets, socket

MINE = "def handler(event, context):\n    return {'who': 'attacker', 'n': event.get('n')}\n"
# where its own agent's socket is in its sandbox (runsc); under bwrap the agent was handed its
# socket and no such path exists in the sandbox
OWN = os.environ.get("EMBER_AGENT_SOCKET", "/run/ember/agent.sock")

def call(path, method, url, body=None, token=None):
    data = json.dumps(body).encode() if body is not None else b""
    head = f"{method} {url} HTTP/1.1\r\nHost: agent\r\nContent-Length: {len(data)}\r\nConnection: close\r\n"
    if token:
        head += f"Authorization: Bearer {token}\r\n"
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(path)
            s.sendall(head.encode() + b"\r\n" + data)
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        return {"path": path, "status": int(reply.split(b" ", 2)[1]), "body": reply.decode(errors="replace")}
    except OSError as e:
        return {"path": path, "error": repr(e)}

def swap_own_socket():
    # replace the agent's socket with a symlink to a host socket: the activator would follow it
    try:
        os.unlink(OWN)
        os.symlink("/var/run/some-host.sock", OWN)
        return "swapped"
    except OSError as e:
        return repr(e)

def fill_socket_folder():
    # the socket's folder is the one the sandbox may write on the host: fill the host's disk?
    written = 0
    try:
        with open(os.path.join(os.path.dirname(OWN), "fill"), "wb") as f:
            while written < 64:
                f.write(b"x" * (1 << 20))
                f.flush()
                written += 1
    except OSError as e:
        return {"written_mib": written, "error": repr(e)}
    return {"written_mib": written, "error": None}

def handler(event, context):
    if event.get("noop"):
        return {"ready": True}
    seen = {"healthz": [], "poison": [], "invoke": [], "own": []}
    seen["swap"] = swap_own_socket()
    seen["fill"] = fill_socket_folder()
    code_hash = event["victim_code_hash"]  # handed over, as if leaked: /healthz never says it
    poison = {"function": {"namespace": "default", "name": "victim", "version": 1},
              "handler": "main.handler", "code": {"inline": MINE}, "codeHash": code_hash}
    for path in event["victim_sockets"]:
        seen["healthz"].append(call(path, "GET", "/healthz"))
        seen["invoke"].append(call(path, "POST", "/v1/invoke", {"n": -1}, token=secrets.token_urlsafe(32)))
    for path in event["generic_sockets"]:
        seen["poison"].append(call(path, "POST", "/v1/specialize", poison, token=secrets.token_urlsafe(32)))
    for token in (None, secrets.token_urlsafe(32)):
        seen["own"].append(call(OWN, "POST", "/v1/specialize", poison, token=token))
        seen["own"].append(call(OWN, "POST", "/v1/invoke", {"n": -1}, token=token))
    return seen
"""


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
                children.setdefault(ppid, []).append(int(entry))
    out, todo = {pid}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.add(child)
            todo.append(child)
    return out


def _listening_ports(pid: int) -> set[int]:
    """TCP ports in LISTEN state held by the process or its descendants (a sandbox's processes)."""
    inodes: set[str] = set()
    for p in _descendants(pid):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{p}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{p}/fd/{fd}")
                    if link.startswith("socket:["):
                        inodes.add(link[8:-1])
    ports: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            for line in f.readlines()[1:]:
                fields = line.split()
                if fields[3] == "0A" and fields[9] in inodes:
                    ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


async def _invoke(act: Activator, name: str, event: object) -> dict[str, Any]:
    async with act.http.post(act.invoke_url(name), data=json.dumps(event).encode()) as response:
        text = await response.text()
        assert response.status == 200, text
        assert "X-Ember-Function-Error" not in response.headers, text
        return dict(json.loads(text))


def _victim_pods(act: Activator) -> list[str]:
    return [s.handle.id for vs in act.registry.all_versions() if vs.fs.name == "victim" for s in vs.serving]


def _sockets_of(act: Activator, state: ProcessState, ids: list[str] | None = None) -> list[str]:
    """The host paths of the agent sockets of the pods in `state` (and `ids`)."""
    return sorted(
        pod.address.removeprefix("unix:")
        for pod_id, pod in act.source.pods().items()
        if pod.state is state and (ids is None or pod_id in ids)
    )


@contextlib.asynccontextmanager
async def _victim_load(act: Activator, *, rate_hz: float = 20.0) -> AsyncIterator[list[str]]:
    """Invoke the victim at a bounded rate until the block ends; yield what went wrong."""
    errors: list[str] = []
    done = asyncio.Event()
    sent = 0

    async def loop() -> None:
        nonlocal sent
        while not done.is_set():
            sent += 1
            try:
                reply = await _invoke(act, "victim", {"n": sent})
                if reply != {"who": "victim", "n": sent}:
                    errors.append(f"invocation {sent}: {reply}")
            except (AssertionError, aiohttp.ClientError, TimeoutError) as err:
                errors.append(f"invocation {sent}: {err!r}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 1 / rate_hz)

    task = asyncio.create_task(loop())
    try:
        yield errors
        async with asyncio.timeout(30):  # the load overlaps the attack by a few invocations at least
            while sent < 5:  # noqa: ASYNC110 - the loop above counts
                await asyncio.sleep(0.05)
    finally:
        done.set()
        await task


async def _warm_pods(act: Activator, n: int, timeout_s: float = 60) -> None:
    async with asyncio.timeout(timeout_s):
        while sum(act.source.warm_pods().values()) < n:  # noqa: ASYNC110 - polling the source is the point
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("choice", ISOLATED)
async def test_a_hostile_function_cannot_poison_the_pool_nor_invoke_another_functions_agent(
    choice: SandboxChoice, monkeypatch: pytest.MonkeyPatch
) -> None:
    _use(choice, monkeypatch)
    async with run_activator() as act:
        assert act.source.sandbox == choice
        act.registry.apply(function("victim", VICTIM))
        assert await _invoke(act, "victim", {"n": 0}) == {"who": "victim", "n": 0}
        act.registry.apply(function("attacker", ATTACKER))
        assert await _invoke(act, "attacker", {"noop": True}) == {"ready": True}
        await _warm_pods(act, 2)  # the pool the victim's next cold start claims from
        (victim_version,) = [vs for vs in act.registry.all_versions() if vs.fs.name == "victim"]
        victim_sockets = _sockets_of(act, ProcessState.SPECIALIZED, _victim_pods(act))
        generic_sockets = _sockets_of(act, ProcessState.WARM)
        assert victim_sockets, "no victim agent found"
        assert len(generic_sockets) >= 2, generic_sockets
        # a port scan finds no agent: none of the pods' processes listens on TCP
        assert {pod_id: _listening_ports(pod.pid) for pod_id, pod in act.source.pods().items()} == {
            pod_id: set() for pod_id in act.source.pods()
        }

        async with _victim_load(act) as errors:
            seen = await _invoke(
                act,
                "attacker",
                {
                    "victim_sockets": victim_sockets,
                    "generic_sockets": generic_sockets,
                    "victim_code_hash": victim_version.code_hash,
                },
            )
            # the victim's next cold start: its pods drain (in-flight calls finish), and the pool
            # holds the agents the attacker tried to bind
            for slots in victim_version.serving:
                victim_version.drain(slots)
            replies = [await _invoke(act, "victim", {"n": 100 + i}) for i in range(5)]

        # another pod's socket is not there for the attacker (its sandbox holds only its own)
        for attempt in seen["healthz"] + seen["invoke"] + seen["poison"]:
            assert "status" not in attempt, attempt
            assert "FileNotFoundError" in attempt["error"] or "ConnectionRefused" in attempt["error"], attempt
        # its own agent refuses it (the activator bound it with a token the code cannot read), or
        # is not reachable at all (gVisor lets the agent make its host socket, not connect to one)
        assert len(seen["own"]) == 4, seen["own"]
        for attempt in seen["own"]:
            refused = ("PermissionError", "FileNotFoundError")
            assert attempt.get("status") == 401 or any(e in attempt.get("error", "") for e in refused), attempt
        # its agent's socket cannot be swapped for a symlink to a host socket (gVisor refuses the
        # unlink; a bwrap sandbox has no such file), and the one host folder a runsc sandbox may
        # write is a 1 MiB tmpfs (as root): no host disk to fill
        assert seen["swap"] != "swapped", seen["swap"]
        assert seen["fill"]["written_mib"] <= 1, seen["fill"]
        assert seen["fill"]["error"], seen["fill"]
        assert replies == [{"who": "victim", "n": 100 + i} for i in range(5)]
        assert act.source.discarded_bound == 0  # no pod was bound by anyone but the activator
        assert errors == []
