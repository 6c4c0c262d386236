"""Contract tests run against both runtime agents, each started as a real process on port 0.

`agent_factory(**env)` starts an agent and returns an `Agent`; every agent started in a test is
stopped by pid (SIGTERM, then SIGKILL with its process group) when the test ends, pass or fail.
An `Agent` holds a fresh bearer token, as the activator does per claimed pod, and sends it with
every request unless told otherwise (`token=None`, or another token).
"""

from __future__ import annotations

import base64
import contextlib
import enum
import hashlib
import http.client
import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agent_code import CODE

ROOT = Path(__file__).resolve().parents[3]
PY_SOURCE_AGENT = ROOT / "runtime-images" / "python" / "agent.py"  # runs the ember_agent package itself


def _python_agent_build() -> Path:
    """The one-file build of the Python agent (runtime-images/python/bundle.py), which images and
    local mode run; made once per change of the agent's sources."""
    bundle = ROOT / "runtime-images" / "python" / "bundle.py"
    done = subprocess.run([sys.executable, "-S", "-E", str(bundle), "--cached"], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{bundle} --cached failed: {done.stderr.strip()}")
    return Path(done.stdout.strip())


PY_AGENT = _python_agent_build()
NODE_AGENT = ROOT / "runtime-images" / "nodejs" / "agent.js"
NODE = shutil.which("node")


def agent_command(lang: str) -> list[str]:
    if lang == "python":
        # EMBER_TEST_AGENT_PYTHON runs the agent under another interpreter (e.g. python3.12)
        return [os.environ.get("EMBER_TEST_AGENT_PYTHON") or sys.executable, "-S", "-E", str(PY_AGENT)]
    node = os.environ.get("EMBER_TEST_AGENT_NODE") or NODE  # e.g. Debian bookworm's Node 18
    if node is None:
        pytest.fail("node is not installed: the Node.js agent cannot be tested")
    return [node, str(NODE_AGENT)]


class Response:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self):
        return json.loads(self.body)

    def header(self, name: str) -> str | None:
        return self.headers.get(name.lower())

    def __repr__(self) -> str:
        return f"<Response {self.status} {self.headers} {self.body[:300]!r}>"


class _Own(enum.Enum):
    TOKEN = "the Agent's own token"


_OWN_TOKEN = _Own.TOKEN  # the default of request(token=...)


class Agent:
    def __init__(self, lang: str, proc: subprocess.Popen, port: int, out_lines: list[str]) -> None:
        self.token = secrets.token_urlsafe(32)
        self.lang = lang
        self.proc = proc
        self.port = port
        self.out_lines = out_lines
        self.services_port: int | None = None  # its services relay (EMBER_AGENT_SERVICES_SOCKET)
        self._conn: http.client.HTTPConnection | None = None

    # -- HTTP
    def conn(self) -> http.client.HTTPConnection:
        if self._conn is None:
            self._conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        return self._conn

    def request(
        self,
        method: str,
        path: str,
        body: bytes | str | None = None,
        headers: dict[str, str] | None = None,
        fresh: bool = False,
        token: str | _Own | None = _OWN_TOKEN,
    ) -> Response:
        if isinstance(body, str):
            body = body.encode()
        headers = dict(headers or {})
        if token is _OWN_TOKEN:
            token = self.token
        if token is not None:
            headers.setdefault("Authorization", f"Bearer {token}")
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60) if fresh else self.conn()
        try:
            conn.request(method, path, body=body, headers=headers)
            r = conn.getresponse()
            data = r.read()
            return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, data)
        except (ConnectionError, http.client.HTTPException):
            if not fresh:
                self._conn = None
            raise
        finally:
            if fresh:
                conn.close()

    def healthz(self, token: str | _Own | None = _OWN_TOKEN) -> dict:
        r = self.request("GET", "/healthz", token=token)
        assert r.status == 200, r
        return r.json()

    def specialize(self, body: dict, token: str | _Own | None = _OWN_TOKEN) -> Response:
        headers = {"Content-Type": "application/json"}
        return self.request("POST", "/v1/specialize", json.dumps(body), headers, token=token)

    def invoke(
        self,
        event=None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        fresh: bool = False,
        token: str | _Own | None = _OWN_TOKEN,
    ) -> Response:
        data = raw if raw is not None else json.dumps(event if event is not None else {}).encode()
        return self.request("POST", "/v1/invoke", data, headers, fresh=fresh, token=token)

    def auth_header(self) -> bytes:
        """The Authorization header line, for requests written by hand."""
        return f"Authorization: Bearer {self.token}\r\n".encode()

    def output(self) -> str:
        return "".join(self.out_lines)

    def wait_output(self, needle: str, timeout: float = 5.0) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            out = self.output()
            if needle in out:
                return out
            time.sleep(0.02)
        raise AssertionError(f"{needle!r} not in agent output:\n{self.output()[-3000:]}")

    # -- lifecycle
    def stop(self) -> None:
        if self._conn is not None:
            self._conn.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _start(
    lang: str, env: dict[str, str], tmp: Path, *, command: list[str] | None = None, user: int | None = None
) -> Agent:
    """Start an agent (`command`, default `agent_command(lang)`; as `user` and its group if given)."""
    full_env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "TMPDIR": str(tmp),
        "EMBER_AGENT_PORT": "0",
        "EMBER_AGENT_HOST": "127.0.0.1",
        **env,
    }
    as_user = {} if user is None else {"user": user, "group": user, "extra_groups": []}
    proc = subprocess.Popen(
        command or agent_command(lang),
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=tmp,
        **as_user,
    )
    lines: list[str] = []
    first = threading.Event()

    def drain() -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            lines.append(raw.decode("utf-8", "replace"))
            if raw.startswith(b"EMBER_AGENT_LISTENING"):
                first.set()
        first.set()

    threading.Thread(target=drain, daemon=True).start()
    if not first.wait(15):
        proc.kill()
        raise AssertionError(f"{lang} agent did not print EMBER_AGENT_LISTENING: {''.join(lines)}")
    listening = [ln for ln in lines if ln.startswith("EMBER_AGENT_LISTENING")]
    if not listening:
        proc.wait(5)
        raise AssertionError(f"{lang} agent exited: {''.join(lines)}")
    fields = dict(f.split("=", 1) for f in listening[0].split()[1:])
    agent = Agent(lang, proc, int(fields["port"]), lines)
    agent.services_port = int(fields["services"]) if "services" in fields else None
    return agent


@pytest.fixture(params=["python", "node"])
def lang(request) -> str:
    return request.param


@pytest.fixture
def agent_factory(lang: str, tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    started: list[Agent] = []

    def factory(**env: str) -> Agent:
        a = _start(lang, {k: str(v) for k, v in env.items()}, tmp_path)
        started.append(a)
        return a

    yield factory
    for a in started:
        with contextlib.suppress(Exception):
            a.stop()


@pytest.fixture
def agent(agent_factory) -> Agent:
    return agent_factory()


@pytest.fixture
def code(lang: str) -> dict[str, str]:
    return CODE[lang]


@pytest.fixture
def ext(lang: str) -> str:
    return ".py" if lang == "python" else ".js"


def spec(
    source: str | None = None,
    *,
    handler: str = "main.handler",
    code: dict | None = None,
    code_hash: str | None = None,
    **extra,
) -> dict:
    if code is None:
        code = {"inline": source}
    if code_hash is None:
        code_hash = "sha256:" + hashlib.sha256(json.dumps(code, sort_keys=True).encode()).hexdigest()
    return {
        "function": {"namespace": "default", "name": "hello", "version": 3},
        "handler": handler,
        "code": code,
        "codeHash": code_hash,
        **extra,
    }


def make_zip(files: dict[str, str | bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
