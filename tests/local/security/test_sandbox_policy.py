"""A local sandbox enforces its pool's SecurityPolicy (issue #11, Policy enforcement, local mode).

A real activator over the real `LocalPodSource`, in each isolating sandbox this machine has
(each runsc binary, bwrap), with functions that try to get past their policy and return what
happened. A bounded background load on another function runs during each attack and must see
no error. What each sandbox enforces is `ember.pods.local.sandbox`'s docstring:

- egress: every sandbox has a network namespace of its own. With `none` it has loopback only: a
  server the test starts on the host's loopback and the activator's own port are unreachable.
  With an allow-list it reaches the listed addresses (and ports) of servers the test starts on
  an interface it makes, nothing else (not the host's loopback, not the activator), and cannot
  lift the rules (`ember.pods.local.egress`);
- `filesystem.tmpSizeMiB`: /tmp is that big, no bigger;
- `limits.pids`: the sandbox's tasks, the agent's included: a fork or a thread past it fails
  with EAGAIN inside, as in a cluster's gVisor pod (under runsc the agent's RLIMIT_NPROC, which
  gVisor counts per sandbox; under bwrap the pod's pids cgroup), the code cannot lift it, and the
  pod keeps serving;
- `resources.memoryMiB`: the sandbox as a whole (under runsc gVisor's kernel too) stays within
  it: many processes that together allocate past it get the sandbox killed, the invocation
  fails with the reason, and the function's next invocation gets a fresh pod.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.local.activator.helpers import Activator, run_activator
from tests.local.security.test_sandbox_local import ISOLATED, _use, background_load

from ember.api.function import Function
from ember.api.security_policy import SecurityPolicySpec
from ember.pods.local import Sandbox, SandboxChoice, egress

CONNECT = """
import json, socket

def attempt(host, port):
    try:
        with socket.create_connection((host, port), timeout=3) as s:
            s.sendall(b"GET / HTTP/1.0\\r\\n\\r\\n")
            return {"ok": True, "got": s.recv(64).decode(errors="replace")}
    except OSError as e:
        return {"ok": False, "error": repr(e)}

def handler(event, context):
    return {name: attempt(*target) for name, target in event.items()}
"""

LIFT = """
import socket, subprocess

def attempt(host, port):
    try:
        with socket.create_connection((host, port), timeout=3) as s:
            return {"ok": True}
    except OSError as e:
        return {"ok": False, "error": repr(e)}

def run(*argv):
    try:
        return subprocess.run(argv, capture_output=True, timeout=20).returncode == 0
    except OSError:
        return False

def handler(event, context):
    changes = {
        "iptables": run("iptables", "-F", "OUTPUT") or run("iptables", "-P", "OUTPUT", "ACCEPT"),
        "ip_route": run("ip", "route", "add", event["target"][0], "dev", "eth0"),
        "ip_addr": run("ip", "addr", "add", "198.18.9.9/32", "dev", "eth0"),
    }
    return {"changes": changes, "after": attempt(*event["target"])}
"""

FILL_TMP = """
import errno, os

def handler(event, context):
    written = 0
    chunk = b"x" * (1 << 20)
    try:
        with open("/tmp/fill", "wb") as f:
            while written < event["mib"]:
                f.write(chunk)
                f.flush()
                written += 1
    except OSError as e:
        return {"written_mib": written, "error": errno.errorcode.get(e.errno, str(e.errno))}
    finally:
        if os.path.exists("/tmp/fill"):
            os.unlink("/tmp/fill")
    return {"written_mib": written, "error": None}
"""

MANY_PROCESSES = """
import os, time

def handler(event, context):
    if event.get("noop"):
        return {"pid": os.getpid()}
    children = []
    for _ in range(event["processes"]):
        pid = os.fork()
        if pid == 0:
            block = bytearray(event["mib_each"] << 20)
            for i in range(0, len(block), 4096):
                block[i] = 1
            time.sleep(10)
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    return {"survived": True}
"""


FORK_BOMB = """
import os, time

def handler(event, context):
    if event.get("noop"):
        return {"pid": os.getpid()}
    if event.get("lift"):
        import resource
        try:
            resource.setrlimit(resource.RLIMIT_NPROC, (4096, 4096))
        except (OSError, ValueError) as e:
            return {"error": str(e), "limit": resource.getrlimit(resource.RLIMIT_NPROC)}
        return {"error": None, "limit": resource.getrlimit(resource.RLIMIT_NPROC)}
    if "threads" in event:
        import threading
        started, stop = 0, threading.Event()
        try:
            while started < event["threads"]:
                threading.Thread(target=stop.wait, daemon=True).start()
                started += 1
        except RuntimeError as e:
            return {"started": started, "error": str(e)}
        finally:
            stop.set()
        return {"started": started, "error": None}
    children, error = [], None
    try:
        while len(children) < event["processes"]:
            pid = os.fork()
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            children.append(pid)
    except OSError as e:
        error = str(e)
    for pid in children:  # the bomb's processes end with its invocation
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    return {"forked": len(children), "error": error}
"""


NODE_FORK_BOMB = """
const { spawn } = require('node:child_process');
exports.handler = async (event) => {
  if (event.noop) return { pid: process.pid };
  const children = [];
  let error = null;
  while (children.length < event.processes) {
    const child = spawn('/bin/sleep', ['30'], { stdio: 'ignore' });
    const failed = await new Promise((done) => { child.once('spawn', () => done(null)); child.once('error', done); });
    if (failed) { error = failed.code; break; }
    children.push(child);
  }
  // the bomb's processes end with its invocation
  const ended = (child) => new Promise((done) => { child.once('exit', done); child.kill('SIGKILL'); });
  await Promise.all(children.map(ended));
  return { forked: children.length, error };
};
"""


def _function(name: str, code: str, *, memory_mib: int = 128, runtime: str = "python3.11") -> Function:
    spec = {
        "runtime": runtime,
        "handler": "index.handler" if runtime.startswith("nodejs") else "main.handler",
        "code": {"inline": code},
        "resources": {"memoryMiB": memory_mib},
        "timeoutSeconds": 60,
    }
    return Function.model_validate({"metadata": {"name": name}, "spec": spec})


def _policy(**spec: Any) -> SecurityPolicySpec:
    return SecurityPolicySpec.model_validate(spec)


async def _call(act: Activator, name: str, event: object) -> tuple[int, dict[str, str], str]:
    async with act.http.post(act.invoke_url(name), data=json.dumps(event).encode()) as response:
        return response.status, dict(response.headers), await response.text()


async def _result(act: Activator, name: str, event: object) -> dict[str, Any]:
    status, headers, text = await _call(act, name, event)
    assert status == 200, text
    assert "X-Ember-Function-Error" not in headers, text
    return dict(json.loads(text))


def _pods_of(act: Activator, name: str) -> set[str]:
    return {s.handle.id for vs in act.registry.all_versions() if vs.fs.name == name for s in vs.serving}


@contextlib.contextmanager
def _host_server(host: str = "127.0.0.1") -> Iterator[int]:
    """A TCP server on the host at `host` that answers every connection; its port."""
    server = socket.socket()
    server.bind((host, 0))
    server.listen(16)
    server.settimeout(0.2)
    stop = False

    def serve() -> None:
        while not stop:
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(b"HTTP/1.0 200 OK\r\n\r\nhost")

    loop = asyncio.get_running_loop()
    thread = loop.run_in_executor(None, serve)
    try:
        yield server.getsockname()[1]
    finally:
        stop = True
        del thread
        server.close()


# Two addresses of this host the test adds to its loopback interface (from 198.18.0.0/15, reserved
# for benchmarks), so the allow-list is tried on destinations off the sandbox's own loopback
TEST_ADDRESSES = ("198.18.0.1", "198.18.0.2")


@pytest.fixture
def host_addresses() -> Iterator[tuple[str, str]]:
    assert not egress.problem(), egress.problem()  # the allow-list is enforced as root with ip/iptables
    added: list[str] = []
    try:
        for address in TEST_ADDRESSES:
            subprocess.run(["ip", "addr", "add", f"{address}/32", "dev", "lo"], check=True)
            added.append(address)
        yield TEST_ADDRESSES
    finally:
        for address in added:
            subprocess.run(["ip", "addr", "del", f"{address}/32", "dev", "lo"], check=False)


@pytest.mark.parametrize("choice", ISOLATED)
async def test_egress_none_reaches_nothing_and_an_allow_list_reaches_only_what_it_lists(
    choice: SandboxChoice,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    host_addresses: tuple[str, str],
) -> None:
    _use(choice, monkeypatch)
    first, second = host_addresses
    with _host_server() as loopback_port, _host_server("0.0.0.0") as allowed, _host_server("0.0.0.0") as other:
        async with run_activator() as act, background_load(act) as errors:
            activator_port = int(act.url.rsplit(":", 1)[1].split("/")[0])
            targets = {
                "host_loopback": ["127.0.0.1", loopback_port],
                "activator": ["127.0.0.1", activator_port],
                "listed_port": [first, allowed],
                "unlisted_port": [first, other],
                "any_port_1": [second, allowed],
                "any_port_2": [second, other],
                "unlisted_address": ["198.18.0.3", allowed],
            }
            act.registry.apply(_function("closed", CONNECT), policy=_policy())
            closed = await _result(act, "closed", targets)
            allow = [{"cidr": f"{first}/32", "ports": [allowed]}, {"cidr": f"{second}/32"}]
            # 127.0.0.1 listed: the sandbox's own loopback, as in a pod, never the host's
            listed = _policy(egress={"mode": "allowList", "allow": [*allow, {"cidr": "127.0.0.1/32"}]})
            act.registry.apply(_function("open", CONNECT), policy=listed)
            opened = await _result(act, "open", targets)
            host_sockets = await asyncio.to_thread(Path("/proc/net/unix").read_text)
            pods = _pods_of(act, "closed") | _pods_of(act, "open")
    assert errors == []
    # no runsc control socket is where host processes find it (Debian's runsc names it in the
    # abstract namespace of its network namespace): every sandbox has a network namespace of its own
    assert [p for p in pods if f"runsc-sandbox.{p}" in host_sockets] == []
    assert "in the host's network namespace" not in caplog.text
    assert not any(result["ok"] for result in closed.values()), closed
    reached = {name for name, result in opened.items() if result["ok"]}
    assert reached == {"listed_port", "any_port_1", "any_port_2"}, opened
    assert opened["listed_port"]["got"] == "HTTP/1.0 200 OK\r\n\r\nhost"
    # refused at once (a reset), not left to time out
    assert "ConnectionRefusedError" in opened["unlisted_port"]["error"], opened


UDP = """
import socket

def attempt(host, port):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(2)
        try:
            s.sendto(b"ping", (host, port))
            return {"ok": True, "got": s.recv(64).decode()}
        except OSError as e:
            return {"ok": False, "error": repr(e)}

def handler(event, context):
    return {name: attempt(*target) for name, target in event.items()}
"""


@contextlib.contextmanager
def _udp_echo(host: str, port: int = 0) -> Iterator[tuple[int, list[bytes]]]:
    """A UDP server on the host that answers each datagram with `pong <port>`; its port and what it got."""
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind((host, port))
    server.settimeout(0.2)
    bound, got, stop = server.getsockname()[1], [], False

    def serve() -> None:
        while not stop:
            try:
                data, peer = server.recvfrom(64)
            except TimeoutError:
                continue
            got.append(data)
            server.sendto(f"pong {bound}".encode(), peer)

    loop = asyncio.get_running_loop()
    thread = loop.run_in_executor(None, serve)
    try:
        yield bound, got
    finally:
        stop = True
        del thread
        server.close()


@pytest.mark.parametrize("choice", ISOLATED)
async def test_listing_port_53_allows_dns_over_udp_and_no_other_udp(
    choice: SandboxChoice, monkeypatch: pytest.MonkeyPatch, host_addresses: tuple[str, str]
) -> None:
    """Ports are TCP, and 53 is UDP too (a resolver): the same as the NetworkPolicy a cluster gets."""
    _use(choice, monkeypatch)
    first, _ = host_addresses
    with _udp_echo(first, 53) as (dns, dns_got), _udp_echo(first) as (other, other_got):
        targets = {"dns": [first, dns], "other_udp": [first, other]}
        async with run_activator() as act:
            act.registry.apply(_function("closed-udp", UDP), policy=_policy())
            closed = await _result(act, "closed-udp", targets)
            listed = _policy(egress={"mode": "allowList", "allow": [{"cidr": f"{first}/32", "ports": [53, other + 1]}]})
            act.registry.apply(_function("resolver", UDP), policy=listed)
            opened = await _result(act, "resolver", targets)
    assert closed == {name: {"ok": False, "error": closed[name]["error"]} for name in targets}, closed
    assert opened["dns"] == {"ok": True, "got": "pong 53"}, opened
    assert not opened["other_udp"]["ok"], opened
    assert dns_got == [b"ping"], dns_got  # the resolver's datagram, from `resolver` only
    assert other_got == [], other_got


@pytest.mark.parametrize("choice", ISOLATED)
async def test_a_sandbox_cannot_lift_its_allow_list(
    choice: SandboxChoice, monkeypatch: pytest.MonkeyPatch, host_addresses: tuple[str, str]
) -> None:
    """The rules live in a network namespace the host's root owns: code in the sandbox (no
    capability over it) can neither flush them nor add a route or an address."""
    _use(choice, monkeypatch)
    first, _ = host_addresses
    with _host_server("0.0.0.0") as port:
        async with run_activator() as act:
            policy = _policy(egress={"mode": "allowList", "allow": [{"cidr": "198.18.0.2/32"}]})
            act.registry.apply(_function("lifter", LIFT), policy=policy)
            tried = await _result(act, "lifter", {"target": [first, port]})
    assert tried["changes"] == {"iptables": False, "ip_route": False, "ip_addr": False}, tried
    assert not tried["after"]["ok"], tried


@pytest.mark.parametrize("choice", ISOLATED)
async def test_tmp_is_as_big_as_the_policy_says(choice: SandboxChoice, monkeypatch: pytest.MonkeyPatch) -> None:
    _use(choice, monkeypatch)
    async with run_activator() as act, background_load(act) as errors:
        act.registry.apply(_function("filler", FILL_TMP), policy=_policy(filesystem={"tmpSizeMiB": 16}))
        small = await _result(act, "filler", {"mib": 64})
        act.registry.apply(_function("roomy", FILL_TMP), policy=_policy(filesystem={"tmpSizeMiB": 128}))
        roomy = await _result(act, "roomy", {"mib": 64})
    assert errors == []
    assert small["error"] == "ENOSPC", small
    assert 8 <= small["written_mib"] < 16, small  # the agent's own files share the 16 MiB
    assert roomy == {"written_mib": 64, "error": None}


@pytest.mark.parametrize("choice", ISOLATED)
async def test_memory_bounds_the_whole_sandbox_not_one_process(
    choice: SandboxChoice, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _use(choice, monkeypatch)
    async with run_activator() as act, background_load(act) as errors:
        act.registry.apply(_function("greedy", MANY_PROCESSES, memory_mib=256))
        await _result(act, "greedy", {"noop": True})
        before = _pods_of(act, "greedy")
        # each child alone fits in 256 MiB; together (4 x 100 MiB) they do not
        status, headers, text = await _call(act, "greedy", {"processes": 4, "mib_each": 100})
        again = await _result(act, "greedy", {"noop": True})
        after = _pods_of(act, "greedy")
        # within the bound, the same code runs to the end
        fits = await _result(act, "greedy", {"processes": 1, "mib_each": 64})
    assert errors == []
    assert "survived" not in text, (status, text)
    # reported as the function's error, as Lambda reports a runtime killed for its memory
    assert (status, headers.get("X-Ember-Function-Error")) == (200, "Unhandled"), (status, headers, text)
    error = json.loads(text)
    assert error["errorType"] == "Runtime.ExitError", error
    assert "sandbox stopped during the invocation" in error["errorMessage"], error
    assert "killed: out of memory (memoryMiB=256)" in caplog.text  # ember dev's log says why
    assert "pid" in again, again
    assert before, before
    assert before - after, (before, after)  # the killed sandbox is gone (another pod serves)
    assert fits == {"survived": True}


@pytest.mark.parametrize("choice", ISOLATED)
async def test_a_fork_bomb_is_bounded(choice: SandboxChoice, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fork past `limits.pids` fails with EAGAIN in the code (the agent and its workers count),
    after the code tried to lift the bound (runsc: the rlimit's hard limit; bwrap: the cgroup
    holds whatever the rlimit says); a thread past it fails too, and the pod keeps serving."""
    _use(choice, monkeypatch)
    async with run_activator() as act, background_load(act) as errors:
        act.registry.apply(_function("bomb", FORK_BOMB, memory_mib=1024), policy=_policy(limits={"pids": 64}))
        await _result(act, "bomb", {"noop": True})
        before = _pods_of(act, "bomb")
        lifted = await _result(act, "bomb", {"lift": True})  # then bomb from that same worker
        status, headers, text = await _call(act, "bomb", {"processes": 5000})
        threads = await _result(act, "bomb", {"threads": 200})
        again = await _result(act, "bomb", {"noop": True})
        after = _pods_of(act, "bomb")
    assert errors == []
    assert "pid" in again, again
    assert (status, headers.get("X-Ember-Function-Error")) == (200, None), (status, headers, text)
    bombed = json.loads(text)
    assert 16 < bombed["forked"] < 64, bombed
    assert "Resource temporarily unavailable" in bombed["error"], bombed
    if choice.kind is Sandbox.RUNSC:  # the bound is the agent's rlimit: raising it is refused
        assert lifted["error"] is not None, lifted
    assert threads["started"] < 64, threads
    assert "can't start new thread" in threads["error"], threads
    assert before <= after  # no pod was lost: the bombed one kept serving


@pytest.mark.parametrize("choice", ISOLATED)
async def test_a_node_fork_bomb_is_bounded(choice: SandboxChoice, monkeypatch: pytest.MonkeyPatch) -> None:
    """The Node agent sets the same bound (through util-linux's prlimit, Node has no setrlimit):
    a child process past `limits.pids` fails with EAGAIN in the code, the pod keeps serving."""
    _use(choice, monkeypatch)
    async with run_activator() as act, background_load(act) as errors:
        function = _function("nodebomb", NODE_FORK_BOMB, memory_mib=1024, runtime="nodejs20")
        act.registry.apply(function, policy=_policy(limits={"pids": 64}))
        await _result(act, "nodebomb", {"noop": True})
        before = _pods_of(act, "nodebomb")
        bombed = await _result(act, "nodebomb", {"processes": 5000})
        again = await _result(act, "nodebomb", {"noop": True})
        after = _pods_of(act, "nodebomb")
    assert errors == []
    assert 8 < bombed["forked"] < 64, bombed
    assert bombed["error"] == "EAGAIN", bombed
    assert "pid" in again, again
    assert before <= after
