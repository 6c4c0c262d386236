"""Benchmark of portion calls: what `context.invoke_portion` costs a function, in local mode, in
the best sandbox this machine has (gVisor here), against the two paths it is made of, measured
in the same run.

    python bench/portions.py            # about a minute
    python bench/portions.py --quick    # fewer samples

`ember dev` (a process of its own) serves three functions from one temporary folder, and this
process invokes each sequentially over one keep-alive connection:

- `plain`: the handler returns its event (the invoke path: activator -> agent in its sandbox);
- `service`: the handler GETs an auxiliary service (a tiny aiohttp server, its own process)
  through its agent's relay and the services proxy on a kept-alive connection: the channel a
  portion call also takes;
- `portion`: the handler calls its portion `echo` (same code, its own pool) and returns the
  result: the channel, then a second invoke through the activator to another sandbox.

Rows: latency p50/p99 in ms, and what one call adds to a plain invocation (p50 difference); a
portion call's extra cost should be about the channel's plus one invocation's.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CODE = """
import http.client, os, urllib.parse

KEPT = []  # one kept-alive connection, as invoke_portion keeps one

def plain(event, context):
    return event

def service(event, context):
    if not KEPT:
        url = urllib.parse.urlsplit(os.environ["EMBER_SERVICE_ECHO_URL"])
        KEPT.append((http.client.HTTPConnection(url.hostname, url.port, timeout=10), url.path))
    connection, base = KEPT[0]
    connection.request("GET", base + "/ping")
    return {"service": connection.getresponse().read().decode()}

def portion(event, context):
    return context.invoke_portion("echo", event)
"""


def manifests(service_port: int) -> str:
    code = textwrap.indent(CODE, "      ")
    functions = []
    for name, extra in (
        ("plain", ""),
        ("service", "  securityPolicyRef: {name: with-service}\n"),
        ("portion", "  portions: [{name: echo, handler: main.plain, securityPolicyRef: {name: plain}}]\n"),
    ):
        functions.append(
            f"apiVersion: ember.run/v1alpha1\nkind: Function\nmetadata: {{name: {name}}}\nspec:\n"
            f"  runtime: python3.12\n  handler: main.{name}\n{extra}  code:\n    inline: |\n{code}"
        )
    policies = f"""\
apiVersion: ember.run/v1alpha1
kind: SecurityPolicy
metadata: {{name: plain}}
spec: {{egress: {{mode: none}}}}
---
apiVersion: ember.run/v1alpha1
kind: SecurityPolicy
metadata: {{name: with-service}}
spec:
  egress: {{mode: none}}
  services: [{{name: echo, url: "http://127.0.0.1:{service_port}"}}]
"""
    return "\n---\n".join([*functions, policies])


SERVICE = """
import sys
from aiohttp import web

async def ping(request):
    return web.Response(text="pong")

app = web.Application()
app.router.add_get("/ping", ping)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(port: int, timeout_s: float = 30) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port}")


def measure(port: int, name: str, n: int) -> list[float]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    path = f"/v1/namespaces/default/functions/{name}/invoke"
    body = json.dumps({"n": 1}).encode()
    out: list[float] = []
    for i in range(n + n // 10):  # the first tenth warms the path up
        start = time.perf_counter()
        connection.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
        took = time.perf_counter() - start
        if response.status != 200 or response.getheader("X-Ember-Function-Error"):
            raise RuntimeError(f"{name}: {response.status} {data[:300]!r}")
        if i >= n // 10:
            out.append(took)
    connection.close()
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    args = parser.parse_args()
    n = 100 if args.quick else 500
    service_port, dev_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "operator")}
    with tempfile.TemporaryDirectory(prefix="ember-bench-portions-") as folder:
        Path(folder, "bench.yaml").write_text(manifests(service_port))
        service = subprocess.Popen([sys.executable, "-c", SERVICE, str(service_port)], env=env)
        dev = subprocess.Popen(
            [sys.executable, "-m", "ember.cli", "dev", folder, "--port", str(dev_port), "--no-watch"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        try:
            wait_for_port(service_port)
            assert dev.stdout is not None
            sandbox = ""
            for line in dev.stdout:
                if "sandbox:" in line:
                    sandbox = line.split("sandbox:", 1)[1].strip()
                    break
            wait_for_port(dev_port)
            # three rounds, interleaved, so that a noisy moment hits every path alike
            samples: dict[str, list[float]] = {"plain": [], "service": [], "portion": []}
            for _ in range(3):
                for name in samples:
                    samples[name] += measure(dev_port, name, n // 3)
        finally:
            dev.send_signal(2)
            try:
                dev.wait(timeout=30)
            except subprocess.TimeoutExpired:
                dev.kill()
            service.terminate()
            service.wait()
    base = statistics.median(samples["plain"])
    print(f"portion calls in local mode ({sandbox or 'sandbox unknown'}), {n} sequential keep-alive invocations each")
    print(f"{'invocation':<42} {'p50 ms':>8} {'p99 ms':>8} {'adds (p50) ms':>14}")
    rows = (
        ("plain: returns its event (baseline)", "plain"),
        ("service: one call through the channel", "service"),
        ("portion: one invoke_portion", "portion"),
    )
    for label, name in rows:
        values = samples[name]
        added = statistics.median(values) - base
        print(f"{label:<42} {pct(values, 50) * 1000:>8.2f} {pct(values, 99) * 1000:>8.2f} {added * 1000:>14.2f}")
    channel = statistics.median(samples["service"]) - base
    call = statistics.median(samples["portion"]) - base
    print(f"a portion call adds {call * 1000:.2f} ms: the channel's round trip ({channel * 1000:.2f} ms) and "
          f"{(call - channel) * 1000:.2f} ms for the second invocation (a whole plain one, client included: "
          f"{base * 1000:.2f} ms)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
