"""Benchmark of auxiliary services: what a call from function code pays for going through
Ember's services proxy (`ember.pods.services`) and its agent's relay, against calling the
service directly and against a plain aiohttp reverse proxy, all measured in the same run.

    python bench/services.py            # about a minute
    python bench/services.py --quick    # fewer samples

Every server is a process of its own: the service (aiohttp, answers a 64-byte body), a plain
aiohttp reverse proxy (one `ClientSession`, forwards and streams back, checks nothing: the
floor for any proxy written on aiohttp), the services proxy (a pod's Unix socket, token,
method and path checks, the credential header set) and real Python and Node agents relaying
their loopback port to that socket (`EMBER_AGENT_SERVICES_SOCKET`). The client is this process,
sequential `http.client` GETs, in two ways: one keep-alive connection for all requests (a pooled
HTTP client) and a new connection per request (what `urllib` and `fetch` without an agent do).
Latency p50/p99 in microseconds, and the p50 ratio to the direct call. Natively, not in gVisor:
the sandbox's network costs are bench/activator.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))

from ember.pods.base import PodId, ServiceRoute  # noqa: E402
from ember.pods.services import ServiceProxy  # noqa: E402

PATH = "/v1/charges/ch_1?expand=customer"
BODY = b"x" * 64
CREDENTIAL = "Bearer bench-credential"


# -- the servers (each run as `python bench/services.py --serve <kind> ...`)


async def _serve_service(port_file: str) -> None:
    from aiohttp import web

    async def answer(request: web.Request) -> web.Response:
        return web.Response(body=BODY, content_type="application/octet-stream")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    await asyncio.to_thread(Path(port_file).write_text, str(runner.addresses[0][1]))
    await asyncio.Event().wait()


async def _serve_plain_proxy(port_file: str, service_port: str) -> None:
    import aiohttp
    from aiohttp import web

    session = aiohttp.ClientSession(auto_decompress=False)

    async def forward(request: web.Request) -> web.StreamResponse:
        url = f"http://127.0.0.1:{service_port}{request.raw_path}"
        async with session.request(request.method, url, headers=request.headers, allow_redirects=False) as up:
            response = web.StreamResponse(status=up.status)
            response.content_length = up.content_length
            await response.prepare(request)
            async for chunk in up.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    await asyncio.to_thread(Path(port_file).write_text, str(runner.addresses[0][1]))
    await asyncio.Event().wait()


async def _serve_services_proxy(token_file: str, socket_path: str, service_port: str) -> None:
    async def credentials(namespace: str, name: str, key: str) -> str:
        return CREDENTIAL

    proxy = ServiceProxy(credentials)
    pod = PodId("bench-pod")
    await proxy.open_pod(pod, Path(socket_path))
    route = ServiceRoute(
        name="payments",
        url=f"http://127.0.0.1:{service_port}",
        secret_name="payments-api",
        secret_key="authorization",
        methods=("GET", "POST"),
        path_prefixes=("/v1/charges",),
    )
    await asyncio.to_thread(Path(token_file).write_text, proxy.grant(pod, "default", [route]))
    await asyncio.Event().wait()


# -- the client


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str) -> None:
        super().__init__("localhost", timeout=30)
        self.unix_path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(30)
        self.sock.connect(self.unix_path)


def _tcp(port: int | str) -> Callable[[], http.client.HTTPConnection]:
    return lambda: http.client.HTTPConnection("127.0.0.1", int(port), timeout=30)


def _measure(connect: Callable[[], http.client.HTTPConnection], path: str, n: int, keep_alive: bool) -> list[float]:
    """-> n latencies (s) of sequential GETs of `path`, after 50 warm-up requests."""
    conn = connect()
    times: list[float] = []
    for i in range(n + 50):
        if not keep_alive:
            conn = connect()
        start = time.perf_counter()
        conn.request("GET", path, headers={} if keep_alive else {"Connection": "close"})
        response = conn.getresponse()
        body = response.read()
        elapsed = time.perf_counter() - start
        if response.status != 200 or body != BODY:
            raise RuntimeError(f"GET {path}: {response.status} {body[:200]!r}")
        if not keep_alive:
            conn.close()
        if i >= 50:
            times.append(elapsed)
    conn.close()
    return times


def _wait_file(path: Path, proc: subprocess.Popen[bytes], what: str) -> str:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if path.exists() and path.read_text():
            return path.read_text()
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        time.sleep(0.02)
    raise RuntimeError(f"{what} did not start")


def _start_server(tmp: Path, kind: str, *args: str) -> tuple[subprocess.Popen[bytes], str]:
    out = tmp / f"{kind}.out"
    proc = subprocess.Popen([sys.executable, __file__, "--serve", kind, str(out), *args])
    return proc, _wait_file(out, proc, kind)


def _start_agent(command: list[str], socket_path: str, tmp: Path) -> tuple[subprocess.Popen[bytes], int]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "TMPDIR": str(tmp),
        "EMBER_AGENT_HOST": "127.0.0.1",
        "EMBER_AGENT_PORT": "0",
        "EMBER_AGENT_SERVICES_SOCKET": socket_path,
    }
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, cwd=tmp)
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    fields = dict(f.split("=", 1) for f in line.split()[1:])
    if "services" not in fields:
        proc.kill()
        raise RuntimeError(f"{command[0]} agent printed {line!r}")
    return proc, int(fields["services"])


def _python_agent() -> list[str]:
    bundle = ROOT / "runtime-images" / "python" / "bundle.py"
    built = subprocess.run([sys.executable, "-S", "-E", str(bundle), "--cached"], capture_output=True, text=True)
    return [sys.executable, "-S", "-E", built.stdout.strip()]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="300 samples per row instead of 2,000")
    parser.add_argument("--serve", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        kind, *rest = args.serve
        serve = {"service": _serve_service, "plain": _serve_plain_proxy, "proxy": _serve_services_proxy}[kind]
        asyncio.run(serve(*rest))
        return 0
    n = 300 if args.quick else 2000
    procs: list[subprocess.Popen[bytes]] = []
    with tempfile.TemporaryDirectory(prefix="ember-bench-services-") as tmp_name:
        tmp = Path(tmp_name)
        try:
            service, service_port = _start_server(tmp, "service")
            plain, plain_port = _start_server(tmp, "plain", service_port)
            sock = str(tmp / "services.sock")
            proxy, token = _start_server(tmp, "proxy", sock, service_port)
            procs += [service, plain, proxy]
            python_agent, python_relay = _start_agent(_python_agent(), sock, tmp)
            procs.append(python_agent)
            paths: list[tuple[str, Callable[[], http.client.HTTPConnection], str]] = [
                ("direct to the service", _tcp(service_port), PATH),
                ("plain aiohttp proxy (baseline)", _tcp(plain_port), PATH),
                ("services proxy, its Unix socket", lambda: _UnixConnection(sock), f"/{token}/payments{PATH}"),
                (
                    "services proxy via Python agent relay",
                    _tcp(python_relay),
                    f"/{token}/payments{PATH}",
                ),
            ]
            node = shutil.which("node")
            if node:
                node_agent, node_relay = _start_agent([node, str(ROOT / "runtime-images/nodejs/agent.js")], sock, tmp)
                procs.append(node_agent)
                paths.append(
                    (
                        "services proxy via Node agent relay",
                        _tcp(node_relay),
                        f"/{token}/payments{PATH}",
                    )
                )
            rows = []
            for keep_alive in (True, False):
                base_p50 = None
                for label, connect, path in paths:
                    times = sorted(_measure(connect, path, n, keep_alive))
                    p50 = statistics.median(times)
                    p99 = times[int(len(times) * 0.99) - 1]
                    base_p50 = base_p50 or p50
                    how = "keep-alive" if keep_alive else "new conn."
                    rows.append((how, label, p50 * 1e6, p99 * 1e6, p50 / base_p50))
        finally:
            for proc in procs:
                proc.kill()
                proc.wait()
    python = sys.version.split()[0]
    print(f"auxiliary service calls, sequential GETs, {n} per row (python {python}, {os.cpu_count()} cores)")
    print(f"{'connection':<11} {'path':<40} {'p50 us':>8} {'p99 us':>8} {'p50 / direct':>12}")
    for how, label, p50, p99, ratio in rows:
        print(f"{how:<11} {label:<40} {p50:>8.0f} {p99:>8.0f} {ratio:>12.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
