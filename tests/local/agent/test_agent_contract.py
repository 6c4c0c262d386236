"""runtime-images/CONTRACT.md, checked against the Python and the Node.js agent as real processes."""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import agent_command, b64, make_zip, spec

# ---------------------------------------------------------------------------------------------
# helpers


def specialize_main(agent, code, **extra):
    r = agent.specialize(spec(code["main"], **extra))
    assert r.status == 200, r
    return r


def assert_usable(agent):
    r = agent.invoke({"x": 1})
    assert r.status == 200, r
    assert r.json() == {"echo": {"x": 1}}
    assert r.header("X-Ember-Function-Error") is None


def bind_generic(agent, code):
    """Bind the agent's token and leave it generic: a specialize the agent refuses (422) binds too."""
    r = agent.specialize(spec(code["hello"], handler="main"))
    assert r.status == 422, r


def assert_generic_then_ok(agent, code):
    assert agent.healthz()["state"] == "generic"
    r = agent.specialize(spec(code["hello"]))
    assert r.status == 200, r
    r = agent.invoke({"name": "after"})
    assert r.status == 200, r
    assert r.json() == {"hello": "after"}


def raw_http(port: int, data: bytes, read_timeout: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as s:
        s.sendall(data)
        chunks = []
        try:
            while True:
                c = s.recv(65536)
                if not c:
                    break
                chunks.append(c)
        except TimeoutError:
            pass
    return b"".join(chunks)


class _CodeServer:
    """A real local HTTP server serving fixed bytes, for code.url."""

    def __init__(self, files: dict[str, bytes], delay: float = 0.0) -> None:
        files_ = files

        class H(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                time.sleep(delay)
                data = files_.get(self.path)
                if data is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def code_server():
    servers = []

    def make(files, delay=0.0):
        s = _CodeServer(files, delay)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


# ---------------------------------------------------------------------------------------------
# health, specialize


def test_healthz_generic(agent, lang, code):
    h = agent.healthz()
    assert h == {"state": "generic", "runtime": h["runtime"]}  # no token bound yet: liveness only
    assert h["runtime"].startswith("python3." if lang == "python" else "nodejs")
    bind_generic(agent, code)
    h = agent.healthz()
    assert h["state"] == "generic"
    assert h["codeHash"] is None
    assert h["inFlight"] == 0
    assert h["concurrency"] == 1


def test_invoke_before_specialize_is_401_then_503_once_bound(agent, code):
    r = agent.invoke({})
    assert r.status == 401, r
    bind_generic(agent, code)
    r = agent.invoke({})
    assert r.status == 503
    assert r.json()["errorType"] == "NotSpecialized"


def test_specialize_inline_and_invoke_with_context(agent, code):
    r = specialize_main(agent, code, memoryMiB=256, timeoutSeconds=7)
    body = r.json()
    assert body["state"] == "specialized"
    assert body["codeHash"].startswith("sha256:")
    assert isinstance(body["durationMs"], (int, float))
    h = agent.healthz()
    assert h["state"] == "specialized"
    assert h["codeHash"] == body["codeHash"]
    r = agent.invoke({"action": "context"}, headers={"X-Ember-Request-Id": "req-123"})
    assert r.status == 200, r
    ctx = r.json()
    assert ctx["function_name"] == "hello"
    assert ctx["function_version"] == "3"
    assert ctx["invoked_function_arn"].endswith(":function:hello:3")
    assert ctx["memory_limit_in_mb"] == "256"
    assert ctx["aws_request_id"] == "req-123"
    assert ctx["log_group_name"] == "/ember/default/hello"
    assert "[3]" in ctx["log_stream_name"]
    assert 0 < ctx["remaining"] <= 7000
    assert r.header("X-Ember-Request-Id") == "req-123"
    # the init output went to the agent's stdout
    agent.wait_output("init: loading main")


def test_specialize_is_idempotent_for_same_hash(agent, code):
    s = spec(code["main"])
    assert agent.specialize(s).status == 200
    r = agent.specialize(s)
    assert r.status == 200, r
    assert r.json()["state"] == "specialized"
    assert_usable(agent)


def test_specialize_different_hash_is_409(agent, code):
    specialize_main(agent, code)
    r = agent.specialize(spec(code["hello_v2"]))
    assert r.status == 409, r
    assert r.json()["errorType"] == "AlreadySpecialized"
    assert_usable(agent)


def test_specialize_env_is_visible(agent, code):
    specialize_main(agent, code, env={"GREETING": "bonjour"})
    assert agent.invoke({"action": "env", "name": "GREETING"}).json() == "bonjour"


@pytest.mark.parametrize(
    "bad",
    [
        b"not json",
        b"[]",
        json.dumps({"code": {"inline": "x"}}).encode(),  # no handler
        json.dumps({"handler": "main.handler"}).encode(),  # no code
        json.dumps({"handler": "main.handler", "code": {"inline": "x", "url": "http://x"}}).encode(),
        json.dumps({"handler": "main.handler", "code": {"url": "http://x", "sha256": "abc"}}).encode(),
        json.dumps({"handler": "main.handler", "code": {"inline": "x"}, "timeoutSeconds": -1}).encode(),
        json.dumps({"handler": "main.handler", "code": {"inline": "x"}, "env": {"A": 1}}).encode(),
    ],
)
def test_specialize_malformed_request_is_400(agent, code, bad):
    r = agent.request("POST", "/v1/specialize", bad)
    assert r.status == 400, r
    body = r.json()
    assert body["errorType"] == "InvalidRequest"
    assert body["errorMessage"]
    assert_generic_then_ok(agent, code)


def test_specialize_malformed_handler_name_is_422(agent, code):
    r = agent.specialize(spec(code["hello"], handler="main"))
    assert r.status == 422, r
    assert r.json()["errorType"] == "Runtime.MalformedHandlerName"
    assert "main" in r.json()["errorMessage"]
    assert_generic_then_ok(agent, code)


def test_specialize_missing_module(agent, code, ext):
    r = agent.specialize(
        spec(code["hello"], handler="nosuch.handler", code={"inline": code["hello"], "filename": "main" + ext})
    )
    assert r.status == 422, r
    body = r.json()
    assert body["errorType"] == "Runtime.ImportModuleError"
    assert "nosuch" in body["errorMessage"]
    assert "main" + ext in body["errorMessage"]
    assert_generic_then_ok(agent, code)


def test_specialize_missing_dependency(agent, code):
    r = agent.specialize(spec(code["import_missing_dep"]))
    assert r.status == 422, r
    assert r.json()["errorType"] == "Runtime.ImportModuleError"
    assert "not" in r.json()["errorMessage"]
    assert "real" in r.json()["errorMessage"]
    assert_generic_then_ok(agent, code)


def test_specialize_missing_handler(agent, code):
    r = agent.specialize(spec(code["hello"], handler="main.hander"))
    assert r.status == 422, r
    body = r.json()
    assert body["errorType"] == "Runtime.HandlerNotFound"
    assert "'main.hander' not found" in body["errorMessage"]
    assert "hander" in body["errorMessage"]
    assert "'main'" in body["errorMessage"]
    assert_generic_then_ok(agent, code)


def test_specialize_syntax_error(agent, code, ext):
    r = agent.specialize(spec(code["syntax_error"]))
    assert r.status == 422, r
    body = r.json()
    assert body["errorType"] == "Runtime.UserCodeSyntaxError"
    assert "main" in body["errorMessage"]
    assert "line 2" in body["errorMessage"]
    assert_generic_then_ok(agent, code)


def test_specialize_import_raises(agent, code):
    r = agent.specialize(spec(code["import_raises"]))
    assert r.status == 422, r
    body = r.json()
    assert body["errorType"] == "Runtime.InitError"
    assert "cannot connect to the database" in body["errorMessage"]
    assert_generic_then_ok(agent, code)


def test_specialize_import_exits(agent, code):
    r = agent.specialize(spec(code["import_exit"]))
    assert r.status == 422, r
    body = r.json()
    assert body["errorType"] == "Runtime.ExitError"
    assert "exit status 7" in body["errorMessage"]
    assert_generic_then_ok(agent, code)


def test_specialize_inline_zip_with_package(agent, code, lang, ext):
    if lang == "python":
        files = {
            "main.py": code["main"],
            "pkg/__init__.py": code["pkg_init"],
            "pkg/mod.py": code["pkg_mod"],
            "pkg/helper.py": code["pkg_helper"],
        }
    else:
        files = {"main.js": code["main"], "pkg/mod.js": code["pkg_mod"], "pkg/helper.js": code["pkg_helper"]}
    data = make_zip(files)
    r = agent.specialize(spec(handler="pkg/mod.handler", code={"inline": b64(data), "encoding": "base64-zip"}))
    assert r.status == 200, r
    assert agent.invoke({}).json() == {"from": "pkg.helper"}


@pytest.mark.parametrize("payload", ["corrupt", "truncated", "badbase64"])
def test_specialize_corrupt_archive(agent, code, ext, payload):
    good = make_zip({"main" + ext: code["hello"]})
    if payload == "corrupt":
        data = bytearray(good)
        mid = len(data) // 3
        data[mid : mid + 16] = b"\xff" * 16
        inline = b64(bytes(data))
    elif payload == "truncated":
        inline = b64(good[: len(good) // 2])
    else:
        inline = "!!!not base64!!!"
    r = agent.specialize(spec(code={"inline": inline, "encoding": "base64-zip"}))
    assert r.status == 422, r
    assert r.json()["errorType"] == "InvalidArchive", r
    assert_generic_then_ok(agent, code)


def test_specialize_url_single_file(agent, code, code_server):
    data = code["main"].encode()
    srv = code_server({"/code": data})
    r = agent.specialize(spec(code={"url": srv.url + "/code", "sha256": hashlib.sha256(data).hexdigest()}))
    assert r.status == 200, r
    assert_usable(agent)


def test_specialize_url_zip(agent, code, ext, code_server):
    data = make_zip({"main" + ext: code["main"]})
    srv = code_server({"/code.zip": data})
    r = agent.specialize(spec(code={"url": srv.url + "/code.zip", "sha256": hashlib.sha256(data).hexdigest()}))
    assert r.status == 200, r
    assert_usable(agent)


def test_specialize_url_sha256_mismatch(agent, code, ext, code_server):
    data = make_zip({"main" + ext: code["main"]})
    srv = code_server({"/code.zip": data})
    wrong = hashlib.sha256(b"something else").hexdigest()
    r = agent.specialize(spec(code={"url": srv.url + "/code.zip", "sha256": wrong}))
    assert r.status == 422, r
    body = r.json()
    assert body["errorType"] == "ChecksumMismatch"
    assert wrong in body["errorMessage"]
    assert hashlib.sha256(data).hexdigest() in body["errorMessage"]
    assert_generic_then_ok(agent, code)


def test_specialize_url_not_found(agent, code, code_server):
    srv = code_server({})
    r = agent.specialize(spec(code={"url": srv.url + "/missing", "sha256": "0" * 64}))
    assert r.status == 422, r
    assert r.json()["errorType"] == "CodeFetchFailed"
    assert "404" in r.json()["errorMessage"]
    assert_generic_then_ok(agent, code)


def test_specialize_configmap_directory(agent, code, ext, tmp_path):
    # A ConfigMap volume: files are symlinks into a timestamped ..data directory.
    root = tmp_path / "configmap"
    real = root / "..2024_01_01_00_00_00.000000000"
    real.mkdir(parents=True)
    (real / ("main" + ext)).write_text(code["main"])
    (root / "..data").symlink_to(real.name)
    (root / ("main" + ext)).symlink_to(f"..data/main{ext}")
    r = agent.specialize(spec(code={"path": str(root)}, code_hash="sha256:" + "1" * 64))
    assert r.status == 200, r
    assert_usable(agent)


def test_specialize_path_not_a_directory(agent, code, tmp_path):
    r = agent.specialize(spec(code={"path": str(tmp_path / "nope")}, code_hash="sha256:" + "2" * 64))
    assert r.status == 422, r
    assert r.json()["errorType"] == "Runtime.CodeNotFound"
    assert_generic_then_ok(agent, code)


# ---------------------------------------------------------------------------------------------
# invoke


def test_invoke_event_roundtrip_and_metrics(agent, code):
    specialize_main(agent, code)
    event = {"a": [1, 2.5, "ü"], "b": None, "nested": {"t": True}}
    r = agent.invoke(event)
    assert r.status == 200, r
    assert r.json() == {"echo": event}
    assert r.header("Content-Type") == "application/json"
    assert float(r.header("X-Ember-Duration-Ms")) >= 0
    assert int(r.header("X-Ember-Max-Rss-Kib")) > 1000
    assert float(r.header("X-Ember-Cpu-Ms")) >= 0
    rid = r.header("X-Ember-Request-Id")
    assert rid
    assert len(rid) >= 8
    assert r.header("X-Ember-Function-Error") is None
    assert r.header("X-Ember-Log-Result") is None


def test_invoke_empty_body_is_empty_object(agent, code):
    specialize_main(agent, code)
    r = agent.invoke(raw=b"")
    assert r.status == 200, r
    assert r.json() == {"echo": {}}


def test_invoke_keep_alive_many_requests(agent, code):
    specialize_main(agent, code)
    for i in range(50):
        r = agent.invoke({"i": i})
        assert r.json() == {"echo": {"i": i}}


def test_invoke_async_handler(agent, code):
    assert agent.specialize(spec(code["async"])).status == 200
    r = agent.invoke({}, headers={"X-Ember-Request-Id": "abc"})
    assert r.status == 200, r
    assert r.json() == {"async": True, "id": "abc"}


@pytest.mark.parametrize("lang", ["node"])  # callback-style handlers are a Node.js feature
def test_invoke_callback_handler(agent, code, lang):
    assert agent.specialize(spec(code["callback"])).status == 200
    assert agent.invoke({"n": 5}).json() == {"callback": True, "n": 5}


def test_invoke_non_json_is_400_then_usable(agent, code):
    specialize_main(agent, code)
    r = agent.invoke(raw=b"{not json")
    assert r.status == 400, r
    assert r.json()["errorType"] == "InvalidRequest"
    assert "JSON" in r.json()["errorMessage"]
    assert_usable(agent)


def test_invoke_oversize_is_413_then_usable(agent_factory, code):
    agent = agent_factory(EMBER_AGENT_MAX_PAYLOAD_BYTES=1024)
    specialize_main(agent, code)
    r = agent.invoke(raw=json.dumps({"pad": "x" * 2000}).encode(), fresh=True)
    assert r.status == 413, r
    assert r.json()["errorType"] == "RequestTooLarge"
    assert "1024" in r.json()["errorMessage"]
    assert_usable(agent)


def test_invoke_default_payload_limit_is_6mib(agent, code):
    specialize_main(agent, code)
    ok = json.dumps({"pad": "x" * (6 * 1024 * 1024 - 100)}).encode()
    r = agent.invoke(raw=ok)
    assert r.status == 200, r
    assert len(r.body) > 6 * 1024 * 1024 - 100
    r = agent.invoke(raw=b'"' + b"x" * (6 * 1024 * 1024) + b'"', fresh=True)
    assert r.status == 413, r
    assert_usable(agent)


def test_handler_raises_is_handled(agent, code):
    specialize_main(agent, code)
    r = agent.invoke({"action": "raise", "msg": "bad input"})
    assert r.status == 200
    assert r.header("X-Ember-Function-Error") == "Handled"
    body = r.json()
    assert body["errorType"] == "ValueError"
    assert body["errorMessage"] == "boom: bad input"
    assert isinstance(body["stackTrace"], list)
    assert any("main" in line for line in body["stackTrace"])
    assert_usable(agent)


def test_unserializable_result_is_unhandled(agent, code):
    specialize_main(agent, code)
    r = agent.invoke({"action": "unserializable"})
    assert r.status == 200
    assert r.header("X-Ember-Function-Error") == "Unhandled"
    assert r.json()["errorType"] == "Runtime.MarshalError"
    assert "Unable to marshal response" in r.json()["errorMessage"]
    assert_usable(agent)


@pytest.mark.parametrize(("action", "status"), [("exit", 3), ("hard_exit", 4)])
def test_exit_is_unhandled_then_usable(agent, code, action, status):
    specialize_main(agent, code)
    r = agent.invoke({"action": action})
    assert r.status == 200
    assert r.header("X-Ember-Function-Error") == "Unhandled"
    body = r.json()
    assert body["errorType"] == "Runtime.ExitError"
    assert str(status) in body["errorMessage"]
    assert_usable(agent)


def test_memory_leak_is_unhandled_then_usable(agent, code):
    specialize_main(agent, code, memoryMiB=64, timeoutSeconds=30)
    r = agent.invoke({"action": "leak"})
    assert r.status == 200
    assert r.header("X-Ember-Function-Error") == "Unhandled"
    assert r.json()["errorType"] == "Runtime.OutOfMemory", r
    assert "64" in r.json()["errorMessage"]
    assert_usable(agent)
    assert agent.proc.poll() is None


@pytest.mark.parametrize("action", ["sleep", "spin"])
def test_timeout_is_unhandled_then_usable(agent, code, action):
    specialize_main(agent, code, timeoutSeconds=1)
    t0 = time.monotonic()
    r = agent.invoke({"action": action, "seconds": 30})
    took = time.monotonic() - t0
    assert r.status == 200
    assert took < 5, took
    assert r.header("X-Ember-Function-Error") == "Unhandled"
    body = r.json()
    assert body["errorType"] == "Sandbox.Timedout"
    assert "Task timed out after 1.00 seconds" in body["errorMessage"]
    assert float(r.header("X-Ember-Duration-Ms")) >= 1000
    t0 = time.monotonic()
    assert_usable(agent)
    # the next invocation does not wait for a full code load from scratch
    assert time.monotonic() - t0 < 2


def test_timeout_header_overrides(agent, code):
    specialize_main(agent, code, timeoutSeconds=30)
    r = agent.invoke({"action": "sleep", "seconds": 10}, headers={"X-Ember-Timeout-Ms": "300"})
    assert r.json()["errorType"] == "Sandbox.Timedout"
    assert "0.30 seconds" in r.json()["errorMessage"]
    r = agent.invoke({}, headers={"X-Ember-Timeout-Ms": "soon"})
    assert r.status == 400


def _slow_in_background(agent, seconds):
    result = {}

    def run():
        result["r"] = agent.invoke({"action": "sleep", "seconds": seconds}, fresh=True)

    t = threading.Thread(target=run)
    t.start()
    return t, result


def _wait_in_flight(agent, n, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if agent.request("GET", "/healthz", fresh=True).json()["inFlight"] >= n:
            return
        time.sleep(0.01)
    raise AssertionError(f"never saw {n} in flight")


def test_over_concurrency_is_429(agent, code):
    specialize_main(agent, code, timeoutSeconds=10)
    t, res = _slow_in_background(agent, 1.0)
    _wait_in_flight(agent, 1)
    r = agent.invoke({}, fresh=True)
    assert r.status == 429, r
    assert r.json()["errorType"] == "TooManyRequests"
    t.join()
    assert res["r"].json() == "slept"
    assert_usable(agent)


def test_concurrency_two_runs_two_at_once(agent, code):
    specialize_main(agent, code, timeoutSeconds=10, concurrency=2)
    assert agent.healthz()["concurrency"] == 2
    t0 = time.monotonic()
    a = _slow_in_background(agent, 1.0)
    b = _slow_in_background(agent, 1.0)
    _wait_in_flight(agent, 2)
    r = agent.invoke({}, fresh=True)
    assert r.status == 429, r
    for t, res in (a, b):
        t.join()
        assert res["r"].status == 200, res
        assert res["r"].json() == "slept"
    assert time.monotonic() - t0 < 1.9  # they ran in parallel
    assert_usable(agent)


def test_concurrency_from_environment(agent_factory, code):
    agent = agent_factory(EMBER_AGENT_CONCURRENCY=3)
    bind_generic(agent, code)
    assert agent.healthz()["concurrency"] == 3


# ---------------------------------------------------------------------------------------------
# logs


def test_log_tail_and_stdout_prefix(agent, code):
    specialize_main(agent, code)
    r = agent.invoke({"action": "log"}, headers={"X-Ember-Log-Type": "Tail", "X-Ember-Request-Id": "logreq-1"})
    assert r.status == 200
    tail = base64.b64decode(r.header("X-Ember-Log-Result")).decode()
    assert "warned via logging" in tail
    assert "to stderr" in tail
    assert "to stdout" in tail
    out = agent.wait_output("logreq-1\tto stdout")
    assert "logreq-1\tto stderr" in out
    # without the header: no tail
    assert agent.invoke({"action": "log"}).header("X-Ember-Log-Result") is None


def test_log_tail_is_last_4kb(agent, code):
    specialize_main(agent, code)
    r = agent.invoke({"action": "print", "lines": 200, "width": 100}, headers={"X-Ember-Log-Type": "Tail"})
    tail = base64.b64decode(r.header("X-Ember-Log-Result"))
    assert 3000 < len(tail) <= 4096
    assert tail.decode().rstrip("\n").endswith("line 199 " + "x" * 100)
    assert b"line 0 " not in tail


def test_log_tail_of_handled_error_and_timeout(agent, code):
    specialize_main(agent, code, timeoutSeconds=1)
    r = agent.invoke({"action": "raise", "msg": "m"}, headers={"X-Ember-Log-Type": "Tail"})
    assert "boom: m" in base64.b64decode(r.header("X-Ember-Log-Result")).decode()
    r = agent.invoke({"action": "sleep", "seconds": 5}, headers={"X-Ember-Log-Type": "Tail"})
    assert "Task timed out" in base64.b64decode(r.header("X-Ember-Log-Result")).decode()


# ---------------------------------------------------------------------------------------------
# freeze / thaw


def test_freeze_thaw_hooks(agent, code):
    specialize_main(agent, code)
    assert agent.invoke({"action": "state"}).json()["frozen"] == 0
    r = agent.request("POST", "/v1/freeze")
    assert r.status == 200, r
    assert r.json() == {"state": "frozen", "connectionsClosed": 0}
    assert agent.healthz()["state"] == "frozen"
    assert agent.request("POST", "/v1/freeze").json() == {"state": "frozen"}  # idempotent
    r = agent.invoke({})
    assert r.status == 503
    assert r.json()["errorType"] == "Frozen"
    r = agent.request("POST", "/v1/thaw")
    assert r.status == 200, r
    assert r.json() == {"state": "specialized"}
    state = agent.invoke({"action": "state"}).json()
    assert state["frozen"] == 1
    assert state["thawed"] == 1
    agent.wait_output("before freeze hook ran")
    agent.wait_output("after thaw hook ran")


def test_an_invocation_asking_for_the_thaw_thaws_then_runs(agent, code):
    specialize_main(agent, code)
    assert agent.invoke({"action": "state"}).json()["thawed"] == 0
    assert agent.request("POST", "/v1/freeze").status == 200
    assert agent.invoke({}).status == 503  # without the header: still frozen
    r = agent.invoke({"action": "state"}, headers={"X-Ember-Thaw": "1"})
    assert r.status == 200, r
    assert r.json()["thawed"] == 1  # the after-thaw hooks ran before the invocation
    assert agent.healthz()["state"] == "specialized"
    r = agent.invoke({"action": "state"}, headers={"X-Ember-Thaw": "1"})  # not frozen: no thaw, no hook
    assert r.json()["thawed"] == 1


def test_freeze_generic_agent(agent, code):
    bind_generic(agent, code)
    assert agent.request("POST", "/v1/freeze").json() == {"state": "frozen"}
    assert agent.request("POST", "/v1/thaw").json() == {"state": "generic"}
    assert_generic_then_ok(agent, code)


# ---------------------------------------------------------------------------------------------
# HTTP edge cases


def test_unknown_route_and_method(agent):
    r = agent.request("GET", "/nope")
    assert r.status == 404
    assert r.json()["errorType"] == "NotFound"
    r = agent.request("GET", "/v1/invoke")
    assert r.status == 405
    assert r.header("Allow") == "POST"


def test_malformed_http_is_400(agent, code):
    out = raw_http(agent.port, b"THIS IS NOT HTTP\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400"), out
    out = raw_http(agent.port, b"POST /v1/invoke HTTP/1.1\r\nContent-Length: abc\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400"), out
    specialize_main(agent, code)
    assert_usable(agent)


def test_pipelined_keep_alive_requests(agent, code):
    specialize_main(agent, code)
    body = b'{"p":1}'
    req = b"POST /v1/invoke HTTP/1.1\r\nHost: x\r\n%sContent-Length: %d\r\n\r\n%s" % (
        agent.auth_header(),
        len(body),
        body,
    )
    last = b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    out = raw_http(agent.port, req + req + last)
    assert out.count(b"HTTP/1.1 200") == 3, out
    assert out.count(b'{"echo":{"p":1}}') == 2


def test_chunked_request_body(agent, code):
    specialize_main(agent, code)
    req = (
        b"POST /v1/invoke HTTP/1.1\r\nHost: x\r\n%sTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
        b'4\r\n{"c"\r\n4\r\n:42}\r\n0\r\n\r\n'
    ) % agent.auth_header()
    out = raw_http(agent.port, req)
    assert out.startswith(b"HTTP/1.1 200"), out
    assert out.endswith(b'{"echo":{"c":42}}')


def test_sigterm_stops_agent_and_workers(agent, code):
    specialize_main(agent, code)
    assert_usable(agent)
    agent.proc.terminate()
    assert agent.proc.wait(timeout=10) == 0


def test_code_dir_env(agent_factory, code, tmp_path: Path):
    d = tmp_path / "codedir"
    d.mkdir()
    agent = agent_factory(EMBER_AGENT_CODE_DIR=str(d))
    specialize_main(agent, code)
    assert any(p.name.startswith("main") for p in d.rglob("main*")), list(d.rglob("*"))
    assert os.listdir(d)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("EMBER_AGENT_CONCURRENCY", "abc"),
        ("EMBER_AGENT_CONCURRENCY", "0"),
        ("EMBER_AGENT_PORT", "70000"),
        ("EMBER_AGENT_MAX_PAYLOAD_BYTES", "-5"),
        ("EMBER_AGENT_SHUTDOWN_GRACE_SECONDS", "soon"),
    ],
)
def test_invalid_environment_exits_naming_the_variable(lang, tmp_path, name, value):
    env = {"PATH": os.environ.get("PATH", ""), "EMBER_AGENT_PORT": "0", "TMPDIR": str(tmp_path), name: value}
    proc = subprocess.run(agent_command(lang), env=env, capture_output=True, text=True, timeout=30, check=False)
    assert proc.returncode != 0
    assert "EMBER_AGENT_LISTENING" not in proc.stdout
    assert name in proc.stderr
    assert value in proc.stderr


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_drains_in_flight_then_exits_leaving_no_process(agent, code):
    specialize_main(agent, code, timeoutSeconds=10, concurrency=2)
    assert_usable(agent)
    procs = _descendants(agent.proc.pid)
    t, res = _slow_in_background(agent, 1.0)
    _wait_in_flight(agent, 1)
    agent.proc.terminate()
    t.join()
    assert res["r"].status == 200
    assert res["r"].json() == "slept"
    assert agent.proc.wait(timeout=15) == 0
    time.sleep(0.2)
    assert [p for p in procs if _alive(p)] == []


@pytest.mark.parametrize("lang", ["python"])  # only the Python agent has a template process
def test_template_killed_is_reloaded(agent, code, lang):
    specialize_main(agent, code, timeoutSeconds=1)
    assert_usable(agent)
    children = [p for p in _descendants(agent.proc.pid) if _alive(p)]
    direct = []
    for p in children:
        with open(f"/proc/{p}/stat") as f:
            if int(f.read().rsplit(")", 1)[1].split()[1]) == agent.proc.pid:
                direct.append(p)
    assert len(direct) == 1, direct  # the template (the standby was used by the specialization)
    os.kill(direct[0], 9)
    # the warm worker still answers; a timeout kills it, and the next worker needs a new template
    assert_usable(agent)
    r = agent.invoke({"action": "sleep", "seconds": 5})
    assert r.json()["errorType"] == "Sandbox.Timedout"
    assert_usable(agent)
    agent.wait_output("template process died")


def test_specialize_import_slower_than_init_timeout(agent, code, lang):
    slow = (
        "import time\ntime.sleep(5)\n\ndef handler(e, c):\n    return 1\n"
        if lang == "python"
        else "const end = Date.now() + 5000;\nwhile (Date.now() < end) {}\nexports.handler = async () => 1;\n"
    )
    t0 = time.monotonic()
    r = agent.specialize(spec(slow, initTimeoutSeconds=1))
    assert r.status == 422, r
    assert r.json()["errorType"] == "Runtime.InitTimeout"
    assert "initTimeoutSeconds" in r.json()["errorMessage"]
    assert time.monotonic() - t0 < 4
    assert_generic_then_ok(agent, code)


def test_specialize_url_slower_than_init_timeout(agent, code, code_server):
    data = code["main"].encode()
    srv = code_server({"/slow": data}, delay=2.5)
    t0 = time.monotonic()
    r = agent.specialize(
        spec(code={"url": srv.url + "/slow", "sha256": hashlib.sha256(data).hexdigest()}, initTimeoutSeconds=1)
    )
    assert r.status == 422, r
    assert r.json()["errorType"] == "Runtime.InitTimeout"
    assert time.monotonic() - t0 < 4
    assert_generic_then_ok(agent, code)


def test_concurrent_identical_specializations_all_succeed(agent, code):
    s = spec(code["main"])
    results = []

    def one():
        results.append(agent.request("POST", "/v1/specialize", json.dumps(s), fresh=True))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status for r in results] == [200] * 4, results
    assert {r.json()["codeHash"] for r in results} == {s["codeHash"]}
    assert_usable(agent)


def test_default_code_dir_is_removed_on_sigterm(agent, code, tmp_path):
    specialize_main(agent, code)
    made = [p for p in tmp_path.iterdir() if p.name.startswith("ember-agent-")]
    assert len(made) == 1, list(tmp_path.iterdir())
    agent.proc.terminate()
    assert agent.proc.wait(timeout=15) == 0
    assert not made[0].exists()


# ---------------------------------------------------------------------------------------------
# the Python agent's first worker: pre-forked blank, loads the code itself (no fork on the cold path)


@pytest.mark.parametrize("lang", ["python"])
def test_init_output_is_logged_once(agent, code, lang):
    specialize_main(agent, code)
    assert_usable(agent)
    agent.invoke({"action": "exit", "code": 3})  # the next worker is forked from the template
    assert_usable(agent)
    agent.wait_output("init: loading main")
    agent.stop()
    time.sleep(0.3)  # let the output reader reach the end
    assert agent.output().count("init: loading main") == 1, agent.output()


@pytest.mark.parametrize("lang", ["python"])
def test_first_worker_imported_the_code_itself(agent, lang):
    src = (
        "import os, time\nLOADED_IN = os.getpid()\n\n"
        "def handler(e, c):\n    time.sleep(e.get('sleep', 0))\n    return [LOADED_IN, os.getpid()]\n"
    )
    r = agent.specialize(spec(src, timeoutSeconds=1))
    assert r.status == 200, r
    loaded_in, pid = agent.invoke({}).json()
    assert loaded_in == pid  # the blank worker imported the module: it was not forked after specialize
    r = agent.invoke({"sleep": 5}, headers={"X-Ember-Timeout-Ms": "100"})
    assert r.json()["errorType"] == "Sandbox.Timedout", r
    loaded_in2, pid2 = agent.invoke({}).json()
    assert pid2 != pid
    assert loaded_in2 != pid2  # a replacement is forked from the template, code already imported


@pytest.mark.parametrize("lang", ["python"])
def test_inline_module_looks_the_same_imported_from_memory(agent, lang):
    # The blank worker executes single-file inline code from the bytes it wrote; the template
    # (which forks later workers) uses `import`. Either way the module must look the same.
    src = (
        "# -*- coding: latin-1 -*-\n"
        "import os, sys, time\n"
        "WORD = 'caf\u00e9'\n\n"
        "def handler(e, c):\n"
        "    time.sleep(e.get('sleep', 0))\n"
        "    me = sys.modules[__name__]\n"
        "    return {'name': __name__, 'package': __package__, 'word': WORD,\n"
        "            'file': __file__, 'cwd': os.getcwd(), 'origin': __spec__.origin, 'cached': __cached__,\n"
        "            'loader': type(__loader__).__name__, 'spec_loader': type(__spec__.loader).__name__,\n"
        "            'initializing': getattr(__spec__, '_initializing', None), 'is_module': me.handler is handler,\n"
        "            'source': open(__file__, 'rb').read().decode('latin-1') == __loader__.get_source(__name__),\n"
        "            'attrs': sorted(k for k in vars(me) if k.startswith('__'))}\n"
    )
    r = agent.specialize(spec(src, timeoutSeconds=1))
    assert r.status == 200, r
    first = agent.invoke({}).json()
    assert first["word"] == "caf\u00c3\u00a9"  # the UTF-8 bytes read as latin-1: the coding cookie applies
    assert os.path.dirname(first["file"]) == first["cwd"]
    assert first["origin"] == first["file"]
    assert first["loader"] == first["spec_loader"] == "SourceFileLoader"
    assert first["source"]
    assert first["is_module"]
    assert first["initializing"] is False
    r = agent.invoke({"sleep": 5}, headers={"X-Ember-Timeout-Ms": "100"})
    assert r.json()["errorType"] == "Sandbox.Timedout", r
    assert agent.invoke({}).json() == first  # a worker forked from the template, which used `import`


@pytest.mark.parametrize("lang", ["python"])
def test_concurrent_invokes_right_after_specialize_get_workers(agent, lang):
    # The template gets its spec only when a second worker is needed; the request for that
    # worker follows the spec on the same socket at once.
    src = "import time\n\ndef handler(e, c):\n    time.sleep(0.3)\n    return 'ok'\n"
    assert agent.specialize(spec(src, concurrency=4, timeoutSeconds=5)).status == 200
    results = []
    threads = [threading.Thread(target=lambda: results.append(agent.invoke({}, fresh=True))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status for r in results] == [200] * 4, results
    assert all(r.json() == "ok" for r in results)


@pytest.mark.parametrize("lang", ["python"])
def test_init_timeout_leaves_no_loading_process(agent, code, lang):
    slow = "import time\ntime.sleep(30)\n\ndef handler(e, c):\n    return 1\n"
    r = agent.specialize(spec(slow, initTimeoutSeconds=1))
    assert r.status == 422, r
    # what is left: a fresh standby template and its blank worker, nothing still importing
    deadline = time.monotonic() + 5
    while True:
        alive = [p for p in _descendants(agent.proc.pid) if _alive(p)]
        if len(alive) <= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(alive) <= 2, alive
    assert_generic_then_ok(agent, code)


@pytest.mark.parametrize("lang", ["python"])
def test_template_import_failing_after_the_worker_loaded(agent, lang, tmp_path):
    # the blank worker imports first (and answers), the template second: code that only imports
    # once serves from the first worker; the template's failure shows when a new worker is needed
    marker = tmp_path / "imported-once"
    src = (
        "import os\n"
        "if os.path.exists(os.environ['MARKER']):\n"
        "    raise RuntimeError('imported twice')\n"
        "open(os.environ['MARKER'], 'w').close()\n\n"
        "def handler(e, c):\n"
        "    if e.get('exit'):\n"
        "        os._exit(3)\n"
        "    return 'ok'\n"
    )
    r = agent.specialize(spec(src, env={"MARKER": str(marker)}))
    assert r.status == 200, r
    assert agent.invoke({}).json() == "ok"
    assert agent.invoke({"exit": True}).json()["errorType"] == "Runtime.ExitError"
    r = agent.invoke({})
    assert r.status == 502, r
    assert r.json()["errorType"] == "Runtime.WorkerUnavailable"
    agent.wait_output("reloading failed")


# -- portion calls (CONTRACT.md, Portions): the agent hands the call token to the code, which POSTs
# the event to EMBER_PORTIONS_URL/<name> with it; here a real HTTP server stands where Ember's
# services proxy would


class _Portal:
    """A real HTTP server on loopback recording portion calls; answers as the activator does."""

    def __init__(self) -> None:
        import http.server
        import threading

        seen = self.seen = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                seen.append((self.path, self.headers.get("X-Ember-Call-Token"), json.loads(body)))
                if self.path.endswith("/nosuch"):
                    status, reply = 404, {"errorType": "PortionNotFound", "errorMessage": "no portion 'nosuch'"}
                else:
                    status, reply = 200, {"doubled": json.loads(body)["n"] * 2}
                data = json.dumps(reply).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/pod-token/_portions"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def portal():
    server = _Portal()
    yield server
    server.close()


def test_code_calls_a_portion_with_its_invocations_call_token(agent, code, portal):
    specialize_main(agent, code, env={"EMBER_PORTIONS_URL": portal.url})
    call = {"action": "portion", "name": "double", "event": {"n": 21}}
    r = agent.invoke(call, headers={"X-Ember-Call-Token": "tok-1_A"})
    assert r.json() == {"result": {"doubled": 42}}, r
    r = agent.invoke({"action": "portion", "name": "nosuch", "event": {}}, headers={"X-Ember-Call-Token": "tok-2"})
    assert r.json() == {"error": "PortionError", "errorType": "PortionNotFound", "status": 404}, r
    again = agent.invoke(call, headers={"X-Ember-Call-Token": "tok-3"})  # the kept connection, a new token
    assert again.json() == {"result": {"doubled": 42}}
    assert portal.seen == [
        ("/pod-token/_portions/double", "tok-1_A", {"n": 21}),
        ("/pod-token/_portions/nosuch", "tok-2", {}),
        ("/pod-token/_portions/double", "tok-3", {"n": 21}),
    ]


def test_without_a_call_token_code_calls_no_portion(agent, code, portal):
    specialize_main(agent, code, env={"EMBER_PORTIONS_URL": portal.url})
    r = agent.invoke({"action": "portion", "name": "double", "event": {"n": 1}})
    assert r.json() == {"error": "PortionError", "errorType": "PortionsUnavailable", "status": None}, r
    assert portal.seen == []


@pytest.mark.parametrize("bad", ["has space", "x" * 65, "semi;colon", "ü"])
def test_a_malformed_call_token_is_400_then_usable(agent, code, bad):
    specialize_main(agent, code)
    r = agent.invoke({"x": 1}, headers={"X-Ember-Call-Token": bad})
    assert r.status == 400, r
    assert "X-Ember-Call-Token" in r.json()["errorMessage"]
    assert_usable(agent)
