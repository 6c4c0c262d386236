"""A hostile function against other functions' agents in local mode (issue #11, first bullet).

In local mode every agent listens on the host's loopback, so function code can reach all of
them. The attack of #11: read a victim agent's codeHash from its `GET /healthz`, specialize the
warm generic agents with the attacker's own code under that codeHash and handler, so that the
victim's next cold start hits the agent's idempotent path ("already specialized with the same
codeHash and handler: 200") and the victim's calls run the attacker's code; and invoke the
victim's agents directly, around the activator.

A real activator over the real `LocalPodSource` (tests/local/activator/helpers.py), in the
sandbox `ember dev` would pick. The test tells the attacker the agents' ports, read from the
process list (what a port scan would find); it even hands the attacker the victim's codeHash, as
if it had leaked elsewhere. The attacker returns everything it saw. A bounded background load
on the victim runs throughout and must see only the victim's answers.

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
from tests.local.activator.helpers import Activator, function, run_activator

from ember.pods.local.process import ProcessState

VICTIM = """
def handler(event, context):
    return {"who": "victim", "n": event.get("n")}
"""

ATTACKER = r"""
import http.client, json, secrets

MINE = "def handler(event, context):\n    return {'who': 'attacker', 'n': event.get('n')}\n"

def call(port, method, path, body=None, token=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = "Bearer " + token
    try:
        conn.request(method, path, body=json.dumps(body).encode() if body is not None else None, headers=headers)
        r = conn.getresponse()
        return {"port": port, "status": r.status, "body": r.read().decode(errors="replace")}
    except OSError as e:
        return {"port": port, "error": repr(e)}
    finally:
        conn.close()

def handler(event, context):
    if event.get("noop"):
        return {"ready": True}
    seen = {"healthz": [], "poison": [], "respecialize": [], "invoke": []}
    for port in event["victim_ports"]:
        seen["healthz"].append(call(port, "GET", "/healthz"))
    code_hash = event["victim_code_hash"]  # handed over, as if leaked: /healthz no longer says it
    poison = {"function": {"namespace": "default", "name": "victim", "version": 1},
              "handler": "main.handler", "code": {"inline": MINE}, "codeHash": code_hash}
    for port in event["generic_ports"]:
        seen["poison"].append(call(port, "POST", "/v1/specialize", poison, token=secrets.token_urlsafe(32)))
    for port in event["victim_ports"]:
        for token in (None, secrets.token_urlsafe(32)):
            seen["respecialize"].append(call(port, "POST", "/v1/specialize", poison, token=token))
            seen["invoke"].append(call(port, "POST", "/v1/invoke", {"n": -1}, token=token))
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


def _ports_of(act: Activator, state: ProcessState, ids: list[str] | None = None) -> list[int]:
    ports: set[int] = set()
    for pod_id, pod in act.source.pods().items():
        if pod.state is state and (ids is None or pod_id in ids):
            ports |= _listening_ports(pod.pid)
    return sorted(ports)


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


async def test_a_hostile_function_cannot_poison_the_pool_nor_invoke_another_functions_agent() -> None:
    async with run_activator() as act:
        act.registry.apply(function("victim", VICTIM))
        assert await _invoke(act, "victim", {"n": 0}) == {"who": "victim", "n": 0}
        act.registry.apply(function("attacker", ATTACKER))
        assert await _invoke(act, "attacker", {"noop": True}) == {"ready": True}
        await _warm_pods(act, 2)  # the pool the victim's next cold start claims from
        (victim_version,) = [vs for vs in act.registry.all_versions() if vs.fs.name == "victim"]
        victim_ports = _ports_of(act, ProcessState.SPECIALIZED, _victim_pods(act))
        generic_ports = _ports_of(act, ProcessState.WARM)
        assert victim_ports, "no victim agent port found"
        assert len(generic_ports) >= 2, generic_ports

        async with _victim_load(act) as errors:
            seen = await _invoke(
                act,
                "attacker",
                {
                    "victim_ports": victim_ports,
                    "generic_ports": generic_ports,
                    "victim_code_hash": victim_version.code_hash,
                },
            )
            # the victim's next cold start: its pods drain (in-flight calls finish), and the pool
            # holds only agents the attacker bound
            for slots in victim_version.serving:
                victim_version.drain(slots)
            replies = [await _invoke(act, "victim", {"n": 100 + i}) for i in range(5)]

        # what the attacker saw: liveness only, and 401 for every request to another's agent
        for probe in seen["healthz"]:
            assert probe["status"] == 200, probe
            assert set(json.loads(probe["body"])) == {"state", "runtime"}, probe
            assert victim_version.code_hash not in probe["body"]
        assert seen["respecialize"], seen
        assert seen["invoke"], seen
        for attempt in seen["respecialize"] + seen["invoke"]:
            assert attempt.get("status") == 401, attempt
            assert '"who"' not in attempt["body"]
        # binding a generic agent works (the first token wins), but the activator never uses it
        assert [p["status"] for p in seen["poison"]] == [200] * len(generic_ports), seen["poison"]
        assert replies == [{"who": "victim", "n": 100 + i} for i in range(5)]
        assert act.source.discarded_bound >= 1  # the victim's cold start met a poisoned pod and discarded it
        assert errors == []
