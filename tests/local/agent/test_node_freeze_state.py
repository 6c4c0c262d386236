"""The Node.js agent's freeze and `context.state` (runtime-images/CONTRACT.md: `POST /v1/freeze`,
Key-value state), with real peers on loopback: a `redis-server`, aiohttp servers with keep-alive,
and the kernel's own view of sockets (/proc/net/tcp) and CPU time (/proc/<pid>/task/<tid>/stat).

A freeze must end the code's TCP connections before it is answered (the peer sees them closed),
stop its code (no CPU, even with a busy interval), and leave everything as it was when a
before-freeze hook fails.  The state server here is a test fixture implementing the contract's
state API over a dict, to check the agent's client against the contract (this tier tests the
agent); the activator's own state endpoint and its stores are left to the activator's tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis as redis_client
from aiohttp import web
from tests.local.sources.brokers import RedisServer, free_port, redis_server

from conftest import Agent, spec

pytestmark = [pytest.mark.parametrize("lang", ["node"]), pytest.mark.timeout(60)]

FUNCTION = r"""
const fs = require('node:fs');
const http = require('node:http');
const net = require('node:net');

const pool = new http.Agent({ keepAlive: true });
const seen = { redisConnects: 0, redisCloses: 0 };
let redis = null;
let failFreeze = false;
let spinner = null;

exports.beforeFreeze = async () => { if (failFreeze) throw new Error('not now'); };

function httpGet(port) {
  return new Promise((resolve, reject) => {
    http.get({ host: '127.0.0.1', port, path: '/hello', agent: pool }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (c) => { body += c; });
      res.on('end', () => resolve(body));
    }).on('error', reject);
  });
}

// RESP over one raw TCP connection kept between invocations, opened again once it was closed
function redisPing(port) {
  return new Promise((resolve, reject) => {
    let out = '*1\r\n$4\r\nPING\r\n';
    if (redis === null) {
      seen.redisConnects += 1;
      const sock = redis = net.connect(port, '127.0.0.1');
      sock.setEncoding('utf8');
      sock.on('error', () => {});
      sock.on('close', () => { seen.redisCloses += 1; if (redis === sock) redis = null; });
      out = '*3\r\n$6\r\nCLIENT\r\n$7\r\nSETNAME\r\n$8\r\nember-fn\r\n' + out;
    }
    const sock = redis;
    let got = '';
    const onClose = () => reject(new Error('the redis connection closed'));
    const onData = (d) => {
      got += d;
      if (!got.endsWith('+PONG\r\n')) return;
      sock.off('data', onData);
      sock.off('close', onClose);
      resolve(got);
    };
    sock.on('data', onData);
    sock.once('close', onClose);
    sock.write(out);
  });
}

exports.handler = async (event, context) => {
  switch (event.action) {
    case 'connect':
      return { http: await httpGet(event.httpPort), redis: await redisPing(event.redisPort), ...seen };
    case 'failFreeze': failFreeze = event.on; return failFreeze;
    case 'spinInBackground':
      spinner = spinner || setInterval(() => { const end = Date.now() + 50; while (Date.now() < end); }, 60);
      return fs.readlinkSync('/proc/thread-self'); // '<pid>/task/<tid>'
    case 'state': {
      const out = [];
      for (const [method, ...args] of event.ops) {
        try {
          const r = await context.state[method](...args);
          out.push({ ok: r === undefined ? 'undefined' : r });
        } catch (e) {
          out.push({ error: [e.name, e.errorType, e.status === undefined ? null : e.status] });
        }
      }
      return out;
    }
    case 'stateNotJSON': {
      const out = [];
      for (const value of [10n, undefined]) {
        try { await context.state.put('k', value); out.push('sent'); } catch (e) { out.push([e.name, e.errorType]); }
      }
      return out;
    }
    default: return { echo: event };
  }
};
"""


def specialize(agent: Agent, **env: str) -> None:
    r = agent.specialize(spec(FUNCTION, env=env, timeoutSeconds=10))
    assert r.status == 200, r


def post(agent: Agent, path: str):
    return agent.request("POST", path)


# ---------------------------------------------------------------------------------------------
# real peers


class LoopThread:
    """An asyncio loop in a thread of its own: the servers answer while the test blocks on the agent."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Awaitable):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)  # type: ignore[arg-type]

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def loop_thread() -> Iterator[LoopThread]:
    lt = LoopThread()
    yield lt
    lt.close()


@contextlib.contextmanager
def serving(lt: LoopThread, handler: Callable) -> Iterator[int]:
    """aiohttp on loopback, port 0 (keep-alive, its default), stopped even on failure."""
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)

    async def start() -> int:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return int(runner.addresses[0][1])

    port = lt.run(start())
    try:
        yield port
    finally:
        lt.run(runner.cleanup())


@dataclass
class HelloServer:
    port: int = 0
    client_ports: list[int] = field(default_factory=list)  # the client's port of each request


@pytest.fixture
def hello(loop_thread: LoopThread) -> Iterator[HelloServer]:
    server = HelloServer()

    async def handler(request: web.Request) -> web.Response:
        server.client_ports.append(request.transport.get_extra_info("peername")[1])
        return web.Response(text="hello")

    with serving(loop_thread, handler) as port:
        server.port = port
        yield server


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis") as server:
        yield server


def function_clients(server: RedisServer) -> int:
    """How many connections Redis holds from the function (it names them `ember-fn`)."""
    with contextlib.closing(redis_client.Redis.from_url(server.url)) as r:
        return sum(1 for c in r.client_list() if c.get("name") == "ember-fn")


def established_to(port: int) -> int:
    """The kernel's count of ESTABLISHED TCP connections accepted on `port` (state 01): a server's
    socket leaves that state as soon as the peer's FIN or RST arrives, whenever the server reads it."""
    n = 0
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in f.readlines()[1:]:
                local, _remote, state = line.split()[1:4]
                n += state == "01" and int(local.rsplit(":", 1)[1], 16) == port
    return n


# ---------------------------------------------------------------------------------------------
# freeze ends the code's connections, stops its code; thaw starts it again


def test_freeze_ends_pooled_http_and_raw_redis_connections_and_code_reconnects_after_thaw(agent, hello, redis):
    specialize(agent)
    call = {"action": "connect", "httpPort": hello.port, "redisPort": redis.port}
    r = agent.invoke(call)
    assert r.status == 200, r
    assert r.json() == {"http": "hello", "redis": "+OK\r\n+PONG\r\n", "redisConnects": 1, "redisCloses": 0}
    assert (established_to(hello.port), established_to(redis.port), function_clients(redis)) == (1, 1, 1)

    r = post(agent, "/v1/freeze")
    # both peers have the close before the answer: nothing is ESTABLISHED to them any more, and
    # Redis, which serves in order what it reads, has dropped the client before this CLIENT LIST
    assert (established_to(hello.port), established_to(redis.port), function_clients(redis)) == (0, 0, 0)
    assert r.status == 200, r
    assert r.json() == {"state": "frozen", "connectionsClosed": 2}
    assert agent.invoke(call).status == 503

    assert post(agent, "/v1/thaw").json() == {"state": "specialized"}
    r = agent.invoke(call)
    assert r.status == 200, r
    assert r.header("X-Ember-Function-Error") is None
    assert r.json() == {"http": "hello", "redis": "+OK\r\n+PONG\r\n", "redisConnects": 2, "redisCloses": 1}
    assert len(set(hello.client_ports)) == 2  # the pool opened a new connection
    assert function_clients(redis) == 1


def _cpu_ticks(stat_path: str) -> int:
    with open(stat_path) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime (fields 14 and 15 of proc(5))


def _ticks_over(stat_path: str, seconds: float) -> int:
    before = _cpu_ticks(stat_path)
    time.sleep(seconds)
    return _cpu_ticks(stat_path) - before


def test_a_frozen_worker_uses_no_cpu_even_with_a_busy_interval(agent):
    """Node workers are threads of the agent process: the worker's thread is read by its tid
    (/proc/thread-self in the code), and the whole process too, agent thread included."""
    specialize(agent)
    r = agent.invoke({"action": "spinInBackground"})
    assert r.status == 200, r
    pid, _, tid = r.json().partition("/task/")
    assert int(pid) == agent.proc.pid
    thread_stat, process_stat = f"/proc/{pid}/task/{tid}/stat", f"/proc/{pid}/stat"
    hz = os.sysconf("SC_CLK_TCK")
    assert _ticks_over(thread_stat, 0.5) > 0  # it spins 50 ms in every 60 ms (less on a busy machine)

    assert post(agent, "/v1/freeze").json() == {"state": "frozen", "connectionsClosed": 0}
    time.sleep(0.1)  # an interval already running when it parked ends within 50 ms
    process_before = _cpu_ticks(process_stat)
    assert _ticks_over(thread_stat, 1.0) == 0
    assert _cpu_ticks(process_stat) - process_before <= 0.02 * hz  # the whole agent: below 2 %

    assert post(agent, "/v1/thaw").json() == {"state": "specialized"}
    assert _ticks_over(thread_stat, 1.0) > 0
    assert agent.invoke({"x": 1}).json() == {"echo": {"x": 1}}


def test_a_failed_before_freeze_hook_keeps_connections_and_code_running(agent, hello, redis):
    specialize(agent)
    call = {"action": "connect", "httpPort": hello.port, "redisPort": redis.port}
    assert agent.invoke(call).status == 200
    assert agent.invoke({"action": "failFreeze", "on": True}).json() is True

    r = post(agent, "/v1/freeze")
    assert r.status == 500, r
    body = r.json()
    assert (body["errorType"], body["state"]) == ("Runtime.BeforeFreezeError", "specialized")
    assert "not now" in body["errorMessage"]
    assert agent.healthz()["state"] == "specialized"
    assert (established_to(hello.port), established_to(redis.port), function_clients(redis)) == (1, 1, 1)
    r = agent.invoke(call)
    assert r.json() == {"http": "hello", "redis": "+PONG\r\n", "redisConnects": 1, "redisCloses": 0}, r
    assert len(set(hello.client_ports)) == 1  # the same pooled connection

    assert agent.invoke({"action": "failFreeze", "on": False}).json() is False
    assert post(agent, "/v1/freeze").json() == {"state": "frozen", "connectionsClosed": 2}
    assert post(agent, "/v1/thaw").json() == {"state": "specialized"}


# ---------------------------------------------------------------------------------------------
# context.state


MAX_VALUE_BYTES = 256 * 1024


@dataclass
class StateServer:
    """The contract's state API over a dict (see the module docstring).  `drop`: "reused" drops
    every request after the first on a connection, "all" every request."""

    url: str = ""
    drop: str = ""
    values: dict[str, tuple[object, float | None]] = field(default_factory=dict)
    seen: list[tuple[int, dict]] = field(default_factory=list)  # (client port, body) of each request
    per_connection: dict[int, int] = field(default_factory=dict)

    def now_value(self, key: str) -> object | None:
        value, expires = self.values.get(key, (None, None))
        if expires is not None and expires <= time.monotonic():
            del self.values[key]
            return None
        return value

    def answer(self, body: dict) -> tuple[int, dict]:
        def refuse(status: int, error_type: str, message: str) -> tuple[int, dict]:
            return status, {"errorType": error_type, "errorMessage": message}

        key, ttl = body.get("key"), body.get("ttl")
        if not isinstance(key, str) or not 1 <= len(key.encode()) <= 512:
            return refuse(400, "InvalidStateRequest", "a key is a string of 1-512 bytes")
        if ttl is not None and not (isinstance(ttl, int) and 1 <= ttl <= 31536000):
            return refuse(400, "InvalidStateRequest", "ttl is whole seconds, 1-31536000")
        expires = None if ttl is None else time.monotonic() + ttl
        if "value" in body:
            if body["value"] is None:
                return refuse(400, "InvalidStateRequest", "a value is not null")
            size = len(json.dumps(body["value"]).encode())
            if size > MAX_VALUE_BYTES:
                return refuse(413, "ValueTooLarge", f"the value is {size} bytes; the limit is {MAX_VALUE_BYTES}")
        current = self.now_value(key)
        op = body.get("op")
        if op == "get":
            return 200, {"found": current is not None, "value": current}
        if op == "put":
            self.values[key] = (body["value"], expires)
            return 200, {}
        if op == "delete":
            return 200, {"deleted": self.values.pop(key, None) is not None and current is not None}
        if op == "incr":
            by = body.get("by", 1)
            if current is not None and (not isinstance(current, int) or isinstance(current, bool)):
                return refuse(409, "NotAnInteger", f"{key!r} does not hold an integer")
            kept = self.values.get(key, (None, None))[1]
            self.values[key] = ((current or 0) + by, expires if ttl is not None else kept)
            return 200, {"value": self.values[key][0]}
        if op == "compare_and_set":
            if current != body.get("expected"):
                return 200, {"swapped": False, "value": current}
            self.values[key] = (body["value"], expires)
            return 200, {"swapped": True, "value": body["value"]}
        return refuse(400, "InvalidStateRequest", f"unknown op {op!r}")


@pytest.fixture
def state_server(loop_thread: LoopThread) -> Iterator[StateServer]:
    server = StateServer()

    async def handler(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        client_port = request.transport.get_extra_info("peername")[1]
        server.seen.append((client_port, body))
        n = server.per_connection[client_port] = server.per_connection.get(client_port, 0) + 1
        if (server.drop == "reused" and n > 1) or server.drop == "all":
            request.transport.abort()  # closed under the client, as an idle kept-alive connection is
            return web.Response()
        status, answer = server.answer(body)
        return web.json_response(answer, status=status)

    with serving(loop_thread, handler) as port:
        server.url = f"http://127.0.0.1:{port}/pod-token/_state"
        yield server


def run_state(agent: Agent, *ops: list) -> list:
    r = agent.invoke({"action": "state", "ops": list(ops)})
    assert r.status == 200, r
    assert r.header("X-Ember-Function-Error") is None, r
    return r.json()


def test_context_state_round_trip_on_one_kept_alive_connection(agent, state_server):
    specialize(agent, EMBER_STATE_URL=state_server.url)
    doc = {"a": 1, "b": [True, "x"]}
    assert run_state(
        agent,
        ["get", "k", "dflt"],
        ["get", "k"],
        ["put", "k", doc],
        ["get", "k", "dflt"],
        ["compareAndSet", "k", {"b": [True, "x"], "a": 1}, "swapped"],
        ["compare_and_set", "k", "not this", "again"],
        ["compareAndSet", "fresh", None, 1, {"ttl": 60}],
        ["incr", "n"],
        ["incr", "n", 41, {"ttl": 30}],
        ["delete", "k"],
        ["delete", "k"],
        ["put", "t", "v", {"ttl": 5}],
    ) == [
        {"ok": "dflt"},
        {"ok": "undefined"},
        {"ok": "undefined"},
        {"ok": doc},
        {"ok": True},
        {"ok": False},
        {"ok": True},
        {"ok": 1},
        {"ok": 42},
        {"ok": True},
        {"ok": False},
        {"ok": "undefined"},
    ]
    assert [body for _, body in state_server.seen] == [
        {"op": "get", "key": "k"},
        {"op": "get", "key": "k"},
        {"op": "put", "key": "k", "value": doc},
        {"op": "get", "key": "k"},
        {"op": "compare_and_set", "key": "k", "expected": {"b": [True, "x"], "a": 1}, "value": "swapped"},
        {"op": "compare_and_set", "key": "k", "expected": "not this", "value": "again"},
        {"op": "compare_and_set", "key": "fresh", "expected": None, "value": 1, "ttl": 60},
        {"op": "incr", "key": "n", "by": 1},
        {"op": "incr", "key": "n", "by": 41, "ttl": 30},
        {"op": "delete", "key": "k"},
        {"op": "delete", "key": "k"},
        {"op": "put", "key": "t", "value": "v", "ttl": 5},
    ]
    assert run_state(agent, ["get", "n"]) == [{"ok": 42}]  # the next invocation, the same worker
    assert len({port for port, _ in state_server.seen}) == 1


def test_context_state_refusals_reject_with_a_state_error(agent, state_server):
    specialize(agent, EMBER_STATE_URL=state_server.url)
    assert run_state(
        agent,
        ["put", "big", "x" * (MAX_VALUE_BYTES + 1)],
        ["put", "s", "text"],
        ["incr", "s"],
        ["put", "k", None],
        ["get", 7],
    ) == [
        {"error": ["StateError", "ValueTooLarge", 413]},
        {"ok": "undefined"},
        {"error": ["StateError", "NotAnInteger", 409]},
        {"error": ["StateError", "InvalidStateRequest", 400]},
        {"error": ["StateError", "InvalidStateRequest", None]},  # refused before sending
    ]
    refused = ["StateError", "InvalidStateRequest"]
    assert agent.invoke({"action": "stateNotJSON"}).json() == [refused, refused]  # 10n, undefined: not sent
    assert len(state_server.seen) == 4


def test_context_state_without_a_url_is_not_enabled(agent):
    specialize(agent)
    assert run_state(agent, ["get", "k"], ["incr", "n"]) == [
        {"error": ["StateError", "StateNotEnabled", None]},
        {"error": ["StateError", "StateNotEnabled", None]},
    ]


def test_context_state_unreachable_is_state_unavailable(agent):
    specialize(agent, EMBER_STATE_URL=f"http://127.0.0.1:{free_port()}/pod-token/_state")
    assert run_state(agent, ["get", "k"]) == [{"error": ["StateError", "StateUnavailable", None]}]


@pytest.mark.parametrize(
    ("drop", "expected", "requests"),
    [
        pytest.param("reused", [{"ok": 1}, {"ok": 2}, {"ok": 3}], 5, id="a-closed-reused-connection-is-retried-once"),
        pytest.param("all", [{"error": ["StateError", "StateUnavailable", None]}], 1, id="a-new-connection-is-not"),
    ],
)
def test_context_state_retries_only_a_closed_kept_alive_connection(agent, state_server, drop, expected, requests):
    specialize(agent, EMBER_STATE_URL=state_server.url)
    state_server.drop = drop
    ops = [["incr", "n"] for _ in expected]
    assert run_state(agent, *ops) == expected
    assert len(state_server.seen) == requests
