"""CONTRACT.md `EMBER_AGENT_SERVICES_SOCKET`, against both agents as real processes: the agent
relays every connection to its loopback port, byte for byte and both ways (a half-close passed
on), to a new connection to the host's Unix socket; function code reaches it with the language's
own HTTP client; at most 256 connections are relayed at once; a bad setting ends the agent at
start naming the setting.  The host's side (the services proxy, its tokens and credentials) is
tests/local/security/test_services_proxy.py's; the whole path in sandboxes is test_services_local.py's.
"""

from __future__ import annotations

import http.server
import os
import socket
import socketserver
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import agent_command, spec


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = 512  # room for every connection the bound test opens at once


class _Proxy:
    """A real Unix stream socket playing the host's proxy: `handler` serves each connection."""

    def __init__(self, path: Path, handler: type[socketserver.BaseRequestHandler]) -> None:
        self.path = path
        self.server = _UnixServer(str(path), handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy_at(tmp_path: Path) -> Iterator:
    made: list[_Proxy] = []

    def start(handler: type[socketserver.BaseRequestHandler]) -> _Proxy:
        made.append(_Proxy(tmp_path / f"services-{len(made)}.sock", handler))
        return made[-1]

    yield start
    for p in made:
        p.close()


class _Shout(socketserver.StreamRequestHandler):
    """Reads to the end (the relay must pass the client's half-close on), then answers."""

    def handle(self) -> None:
        data = self.rfile.read()
        self.wfile.write(b"got " + str(len(data)).encode() + b": " + data.upper())


class _Http(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = f"{self.command} {self.path} auth={self.headers.get('Authorization')}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def address_string(self) -> str:  # a Unix peer has no address
        return "host"

    def log_message(self, *args) -> None:
        pass


def _relay_connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def test_the_relay_copies_both_ways_and_passes_a_half_close_on(agent_factory, proxy_at):
    plain = agent_factory()
    assert plain.services_port is None, "no relay without the setting"
    proxy = proxy_at(_Shout)
    agent = agent_factory(EMBER_AGENT_SERVICES_SOCKET=str(proxy.path))
    assert agent.services_port
    assert agent.services_port != agent.port
    payload = os.urandom(200_000).hex().encode()  # several chunks each way
    with _relay_connect(agent.services_port) as c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        reply = b""
        while chunk := c.recv(65536):
            reply += chunk
    assert reply == b"got %d: " % len(payload) + payload.upper()
    # the agent still serves its own contract beside the relay
    assert agent.healthz()["state"] == "generic"


PY_FETCH = """
import os, urllib.request

def handler(event, context):
    with urllib.request.urlopen(os.environ["EMBER_SERVICE_BILLING_URL"] + "/invoices?n=2", timeout=10) as r:
        return {"status": r.status, "body": r.read().decode()}
"""

JS_FETCH = """
exports.handler = async () => {
  const r = await fetch(process.env.EMBER_SERVICE_BILLING_URL + '/invoices?n=2');
  return { status: r.status, body: await r.text() };
};
"""


def test_function_code_reaches_the_socket_through_the_announced_url(agent_factory, proxy_at, lang):
    proxy = proxy_at(_Http)
    agent = agent_factory(EMBER_AGENT_SERVICES_SOCKET=str(proxy.path))
    url = f"http://127.0.0.1:{agent.services_port}/tok3n/billing"
    r = agent.specialize(spec(PY_FETCH if lang == "python" else JS_FETCH, env={"EMBER_SERVICE_BILLING_URL": url}))
    assert r.status == 200, r
    for _ in range(3):  # a fresh relayed connection each time
        r = agent.invoke({})
        assert r.status == 200, r
        assert r.json() == {"status": 200, "body": "GET /tok3n/billing/invoices?n=2 auth=None"}


class _Hold(socketserver.BaseRequestHandler):
    accepted = 0
    lock = threading.Lock()
    release = threading.Event()

    def handle(self) -> None:
        with _Hold.lock:
            _Hold.accepted += 1
        _Hold.release.wait(60)


def test_at_most_256_connections_are_relayed_at_once(agent_factory, proxy_at):
    _Hold.accepted = 0
    _Hold.release.clear()
    proxy = proxy_at(_Hold)
    agent = agent_factory(EMBER_AGENT_SERVICES_SOCKET=str(proxy.path))
    held = []
    try:
        for _ in range(256):
            held.append(_relay_connect(agent.services_port))
        deadline = time.monotonic() + 20
        while _Hold.accepted < 256 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _Hold.accepted == 256
        with _relay_connect(agent.services_port) as extra:
            assert extra.recv(1) == b"", "the 257th connection is closed, not relayed"
        time.sleep(0.2)
        assert _Hold.accepted == 256
        _Hold.release.set()  # the proxy ends them: their slots are free again
        for c in held:
            assert c.recv(1) == b""
            c.close()
        held.clear()
        _Hold.release.clear()
        deadline = time.monotonic() + 10
        while _Hold.accepted == 256 and time.monotonic() < deadline:
            held.append(_relay_connect(agent.services_port))  # refused while the old slots drain
            time.sleep(0.05)
        assert _Hold.accepted == 257
    finally:
        _Hold.release.set()
        for c in held:
            c.close()


def _refused(lang: str, value: str, tmp: Path) -> tuple[int, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "TMPDIR": str(tmp),
        "EMBER_AGENT_PORT": "0",
        "EMBER_AGENT_HOST": "127.0.0.1",
        "EMBER_AGENT_SERVICES_SOCKET": value,
    }
    proc = subprocess.run(agent_command(lang), env=env, capture_output=True, text=True, timeout=30, check=False)
    return proc.returncode, proc.stdout + proc.stderr


def test_bad_settings_end_the_agent_at_start_naming_the_setting(lang, tmp_path):
    plain = tmp_path / "plain"
    plain.write_text("not a socket")
    long_path = "/" + "s" * 107
    for value, why in (
        ("services.sock", "must be an absolute path"),
        (long_path, "is longer than 107 bytes"),
        (str(tmp_path / "missing.sock"), "No such file or directory"),
        (str(plain), "is not a Unix socket"),
    ):
        status, out = _refused(lang, value, tmp_path)
        assert status != 0, (value, out)
        assert f"EMBER_AGENT_SERVICES_SOCKET={value!r}" in out or f'EMBER_AGENT_SERVICES_SOCKET="{value}"' in out
        assert why in out, (value, out)
        assert "EMBER_AGENT_LISTENING" not in out, (value, out)
