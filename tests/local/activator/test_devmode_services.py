"""`examples/auxiliary-service.yaml` under a real `ember dev`: the Function, its policy (egress
none) and the Secret manifest from the served folder; the function calls the payments service
and the service sees the Secret's credential, which the function's own request never carried; a
Secret edited in place is used from the next call on; a broken Secret file is reported naming
its field, and the Secret it defined before keeps serving.  The proxy's rules are
tests/local/security/test_services_proxy.py, the sandboxes' side test_services_local.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from .test_devmode import Dev, _invoke

ROOT = Path(__file__).resolve().parents[3]
EXAMPLE = ROOT / "examples" / "auxiliary-service.yaml"


class Payments:
    """A real HTTP service on the host's loopback that records what reached it."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None, bytes]] = []
        payments = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                payments.seen.append((self.command, self.path, self.headers.get("Authorization"), body))
                answer = json.dumps({"id": f"ch_{len(payments.seen)}"}).encode()
                self.send_response(201)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def payments() -> Iterator[Payments]:
    service = Payments()
    yield service
    service.server.shutdown()
    service.server.server_close()


def _secret_text(value: str) -> str:
    return f"apiVersion: v1\nkind: Secret\nmetadata: {{name: payments-api}}\nstringData:\n  authorization: {value!r}\n"


def test_the_example_calls_its_service_with_the_secret_from_the_folder(tmp_path: Path, payments: Payments) -> None:
    text = EXAMPLE.read_text()
    assert "url: https://api.payments.example.com" in text
    function_and_policy, _, _secret = text.rpartition("---\napiVersion: v1\nkind: Secret")
    (tmp_path / "charge.yaml").write_text(
        function_and_policy.replace("https://api.payments.example.com", f"http://127.0.0.1:{payments.port}")
    )
    (tmp_path / "secret.yaml").write_text(_secret_text("Bearer first-key"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "ember.cli", "dev", str(tmp_path), "--port", "0", "--warm-pool", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    dev = Dev(proc)
    try:
        dev.url = dev.wait_for(r"activator on (http://127\.0\.0\.1:\d+)").group(1)
        dev.wait_for(r"Version 1 of default/charge: Ready")
        first = _invoke(dev.url, "charge", "--data", '{"amount": 5}')
        assert first.returncode == 0, first.stderr
        assert json.loads(first.stdout) == {"status": 201, "charge": {"id": "ch_1"}}
        assert payments.seen == [("POST", "/v1/charges", "Bearer first-key", b'{"amount": 5}')]

        (tmp_path / "secret.yaml").write_text(_secret_text("Bearer rotated-key"))
        rotated = None
        for _ in range(60):  # the folder is watched: the edit is seen within a poll interval
            second = _invoke(dev.url, "charge", "--data", '{"amount": 6}')
            assert second.returncode == 0, second.stderr
            rotated = payments.seen[-1][2]
            if rotated == "Bearer rotated-key":
                break
            threading.Event().wait(0.5)
        assert rotated == "Bearer rotated-key"

        (tmp_path / "secret.yaml").write_text(
            "apiVersion: v1\nkind: Secret\nmetadata: {name: payments-api}\ndata: {authorization: '%%%'}\n"
        )
        dev.wait_for(r"error: .*secret\.yaml.*data\.authorization")
        dev.wait_for(r"secret\.yaml: keeping its previous definitions")
        kept = _invoke(dev.url, "charge", "--data", '{"amount": 7}')
        assert json.loads(kept.stdout)["status"] == 201
        assert payments.seen[-1][2] == "Bearer rotated-key"
        assert "%%%" not in "".join(dev.lines), "an error never prints a Secret's value"
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
