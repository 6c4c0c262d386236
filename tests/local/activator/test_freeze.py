"""Freezing idle pods end to end in local mode (issue #15): a real activator over real sandboxed
agents (gVisor's runsc when installed), a real `redis-server` and a real aiohttp server with
keep-alive on an address of this host the test adds, reached through the policy's allow-list.

The function holds a pooled keep-alive HTTP connection (urllib3) and a Redis connection (redis-py),
both copied into its code from this environment: real client libraries. Frozen after 1 s idle, its
connections are ended before the freeze answer (the servers see them closed long before their own
idle timeouts would), it sleeps past those timeouts, and the next invocation thaws it and succeeds
with no error, both clients having reconnected on their own. A frozen pod uses ~0 CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import urllib3
from aiohttp import web
from tests.local.sources.brokers import redis_server

from ember.api.function import Function
from ember.api.security_policy import SecurityPolicySpec
from ember.pods.local import egress

from .helpers import FAST, Activator, run_activator

AS_ROOT = pytest.mark.skipif(os.geteuid() != 0, reason="the allow-list's network namespaces need root")
ADDRESS = "198.18.0.9"  # added to this host's loopback for the test (198.18.0.0/15: benchmarks)
IDLE_TIMEOUT_S = 6  # both servers close a connection idle this long (the first freeze waits for the template's import)

HOLDER = """
import os, time, uuid
import redis, urllib3

POD = uuid.uuid4().hex
HTTP = None
REDIS = None


def handler(event, context):
    global HTTP, REDIS
    if HTTP is None:
        HTTP = urllib3.HTTPConnectionPool(event["http_host"], event["http_port"], maxsize=1, retries=False)
        REDIS = redis.Redis(host=event["redis_host"], port=event["redis_port"], socket_timeout=5)
    reply = HTTP.request("GET", "/hello")
    ports = [c.sock.getsockname()[1] for c in list(HTTP.pool.queue) if c is not None and c.sock is not None]
    REDIS.incr("calls")
    return {"pod": POD, "http": reply.data.decode(), "http_ports": ports, "redis_id": REDIS.client_id()}
"""

SPINNER = """
import threading, time

def _spin():
    while True:  # 30 ms of CPU every 50 ms, for as long as the code runs
        end = time.perf_counter() + 0.03
        while time.perf_counter() < end:
            pass
        time.sleep(0.02)

threading.Thread(target=_spin, daemon=True).start()

def handler(event, context):
    return {"ok": True}
"""


@pytest.fixture
def host_address() -> Iterator[str]:
    assert not egress.problem(), egress.problem()
    subprocess.run(["ip", "addr", "add", f"{ADDRESS}/32", "dev", "lo"], check=True)
    try:
        yield ADDRESS
    finally:
        subprocess.run(["ip", "addr", "del", f"{ADDRESS}/32", "dev", "lo"], check=False)


class _HttpServer:
    """An aiohttp server that closes keep-alive connections idle for IDLE_TIMEOUT_S; keeps the
    transport of each connection it served, to see when one ended."""

    def __init__(self) -> None:
        self.connections: list[asyncio.BaseTransport] = []

    async def hello(self, request: web.Request) -> web.Response:
        if request.transport is not None and request.transport not in self.connections:
            self.connections.append(request.transport)
        return web.Response(text="hello")

    def open_connections(self) -> int:
        return sum(not transport.is_closing() for transport in self.connections)

    @contextlib.asynccontextmanager
    async def run(self, host: str) -> AsyncIterator[int]:
        app = web.Application()
        app.router.add_get("/hello", self.hello)
        runner = web.AppRunner(app, keepalive_timeout=IDLE_TIMEOUT_S, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, host, 0).start()
        try:
            yield int(runner.addresses[0][1])
        finally:
            await runner.cleanup()


@contextlib.contextmanager
def _redis(host: str, folder: Path) -> Iterator[tuple[int, redis.Redis]]:
    """A real redis-server on `host` that closes clients idle for IDLE_TIMEOUT_S, and a client of the test's."""
    options = ("--timeout", str(IDLE_TIMEOUT_S), "--protected-mode", "no")
    with redis_server(folder, host=host, options=options) as server:
        client = redis.Redis(host=host, port=server.port)
        try:
            yield server.port, client
        finally:
            client.close()


def _code_dir(folder: Path, main: str) -> Path:
    """The function's code: main.py and copies of the real redis-py and urllib3 packages."""
    code = folder / "code"
    code.mkdir()
    (code / "main.py").write_text(main)
    for package in (redis, urllib3):
        shutil.copytree(Path(package.__file__).parent, code / package.__name__, ignore=shutil.ignore_patterns("*.pyc"))
    return code


def _function(name: str, code: dict[str, Any], **spec: Any) -> Function:
    body = {"runtime": "python3.11", "handler": "main.handler", "code": code, "timeoutSeconds": 30, **spec}
    return Function.model_validate({"metadata": {"name": name}, "spec": body})


async def _result(act: Activator, name: str, event: object) -> dict[str, Any]:
    async with act.http.post(act.invoke_url(name), data=json.dumps(event).encode()) as response:
        text = await response.text()
        assert response.status == 200, text
        assert "X-Ember-Function-Error" not in response.headers, text
        return dict(json.loads(text))


async def _wait_frozen(act: Activator, name: str, timeout_s: float = 15) -> float:
    deadline = time.monotonic() + timeout_s
    while True:
        pods = [p for vs in act.registry.all_versions() if vs.fs.name == name for p in vs.serving]
        if pods and all(p.frozen for p in pods) and not any(p.gate.locked() for p in pods):
            return time.monotonic()
        assert time.monotonic() < deadline, f"{name}'s pods were not frozen within {timeout_s} s"
        await asyncio.sleep(0.02)


def _redis_clients(client: redis.Redis) -> list[dict[str, Any]]:
    mine = client.client_id()
    return [c for c in client.client_list() if int(c["id"]) != mine]


@AS_ROOT
async def test_a_frozen_pod_ends_its_connections_and_its_code_reconnects_after_the_thaw(
    host_address: str, tmp_path: Path
) -> None:
    http = _HttpServer()
    code = _code_dir(tmp_path, HOLDER)
    policy = SecurityPolicySpec.model_validate(
        {"egress": {"mode": "allowList", "allow": [{"cidr": f"{host_address}/32"}]}}
    )
    with _redis(host_address, tmp_path) as (redis_port, observer):
        async with http.run(host_address) as http_port, run_activator() as act:
            event = {
                "http_host": host_address,
                "http_port": http_port,
                "redis_host": host_address,
                "redis_port": redis_port,
            }
            fn = _function("holder", {"path": str(code)}, freeze={"enabled": True, "idleSeconds": 1})
            act.registry.apply(fn, policy=policy, base_dir=tmp_path)
            first = await _result(act, "holder", event)
            used_at = time.monotonic()
            assert len(_redis_clients(observer)) == 1
            assert http.open_connections() == 1
            frozen_at = await _wait_frozen(act, "holder")
            # both servers saw the close by the time the freeze was done, seconds before their idle timeouts
            assert http.open_connections() == 0
            assert _redis_clients(observer) == []
            assert frozen_at - used_at < IDLE_TIMEOUT_S - 0.5, "the freeze came too late to tell the cases apart"
            await asyncio.sleep(IDLE_TIMEOUT_S + 1 - (time.monotonic() - used_at))  # past both idle timeouts
            second = await _result(act, "holder", event)
            thawed = await act.metric("ember_pod_freezes_total", outcome="thawed")
    assert second["pod"] == first["pod"]  # the same pod, thawed: not a new one
    assert second["http"] == first["http"] == "hello"
    assert second["redis_id"] != first["redis_id"]  # redis-py reconnected
    assert second["http_ports"] != first["http_ports"]  # so did urllib3's pool
    assert len(http.connections) == 2
    assert thawed == 1


def _tree_cpu_ticks(pid: int) -> int:
    """utime + stime of a process and all its descendants, in clock ticks."""
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{current}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
            for task in Path(f"/proc/{current}/task").iterdir():
                todo.extend(int(c) for c in (task / "children").read_text().split())
    return total


async def _cpu_share(pid: int, seconds: float) -> float:
    before = _tree_cpu_ticks(pid)
    await asyncio.sleep(seconds)
    return (_tree_cpu_ticks(pid) - before) / os.sysconf("SC_CLK_TCK") / seconds


async def test_a_frozen_pod_uses_no_cpu_and_thaws_on_the_next_invocation() -> None:
    async with run_activator(FAST) as act:
        # one pod (a cold start that queues the first call may otherwise start a second one)
        one = {"maxScale": 1}
        act.registry.apply(
            _function("spinner", {"inline": SPINNER}, freeze={"enabled": True, "idleSeconds": 2}, scaling=one)
        )
        assert await _result(act, "spinner", {}) == {"ok": True}
        [pod] = [p for vs in act.registry.all_versions() if vs.fs.name == "spinner" for p in vs.serving]
        pid = act.source.pods()[pod.handle.id].pid
        running = await _cpu_share(pid, 1.0)
        await _wait_frozen(act, "spinner")
        frozen = await _cpu_share(pid, 2.0)
        started = time.perf_counter()
        assert await _result(act, "spinner", {}) == {"ok": True}
        thaw_ms = (time.perf_counter() - started) * 1000
        after = await _cpu_share(pid, 1.0)
    assert running > 0.3, running  # the spinning thread runs while the pod is warm
    assert frozen < 0.02, frozen  # ~0 once frozen: only the agent's idle threads remain, asleep
    assert after > 0.3, after
    assert thaw_ms < 2000, thaw_ms  # a thaw, not a cold start (the benchmark measures it)
