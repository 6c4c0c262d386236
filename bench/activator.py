"""Benchmark of the data plane: activator overhead and throughput, and cold starts in gVisor.

One command, one table, every baseline measured in the same run:

    python bench/activator.py            # about 2 minutes
    python bench/activator.py --quick    # fewer samples

Rows:
- warm invoke latency p50/p99, sequential: through the activator (`ember dev` as a separate
  process) vs straight to a runtime agent of the same kind (the activator's overhead is the
  difference);
- throughput: requests/s and requests per activator CPU-second, through the activator vs a
  plain aiohttp proxy (one `ClientSession`) in front of the same kind of agent. The load
  generator is a separate process speaking raw HTTP/1.1 over keep-alive connections so that it
  costs little; CPU is read from /proc/<pid>/stat (user + system of the server process only,
  not of its agents). Requests per CPU-second is a per-core capacity only when the server's
  core is saturated: below that, each event-loop wake-up serves fewer requests and costs more
  CPU per request (measured on 2 cores: ~3,400 at 1 connection, ~4,900 at 32, against the same
  backend). So the row shows how busy the server was, and says when the backend (an agent in
  gVisor, slower still under ptrace) or other load on the machine, not the server, set the
  rate;
- cold start p50/p99 inside the sandbox: from a warm generic pool (claim + specialize + first
  hello) and from an empty pool (start agent + specialize + hello), next to bare
  `runsc do /bin/true` and `runsc do python3 -c pass`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))

from ember.pods.base import PoolKey, VersionKey  # noqa: E402
from ember.pods.local import LocalPodSource, Sandbox, agent_session, detect_sandbox  # noqa: E402
from ember.pods.payload import specialize_request  # noqa: E402

RUNTIME = "python3.11"
HELLO = "def handler(event, context):\n    return {'hello': event.get('name', 'world')}\n"
EVENT = b'{"name":"bench"}'
AGENT_AUTH_ENV = "EMBER_BENCH_AGENT_AUTH"  # the direct agent's Authorization value, for the subprocesses
# The data-path function serves 32 concurrent invocations from one pod: its workers need the
# memory (a runsc sandbox is bounded as a whole by it, as a pod is in a cluster).
MEMORY_MIB = 1024
FUNCTION_YAML = f"""
apiVersion: ember.run/v1alpha1
kind: Function
metadata:
  name: bench
spec:
  runtime: {RUNTIME}
  handler: main.handler
  concurrency: {{concurrency}}
  resources: {{{{memoryMiB: {MEMORY_MIB}}}}}
  code:
    inline: |
      def handler(event, context):
          return {{{{'hello': event.get('name', 'world')}}}}
  scaling:
    minScale: {{pods}}
    maxScale: {{pods}}
    keepAliveSeconds: 600
"""
ACTIVATOR_PATH = "/v1/namespaces/default/functions/bench/invoke"
AGENT_INVOKE = "http://agent/v1/invoke"  # a local pod's agent, over its socket (`agent_session`)


# ---------------------------------------------------------------------------------------------
# load generator: raw HTTP/1.1 over keep-alive connections, in its own process


class _Conn(asyncio.Protocol):
    def __init__(self, gen: _LoadGen) -> None:
        self.gen = gen
        self.buf = b""
        self.sent = 0.0
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.send()

    def send(self) -> None:
        assert self.transport is not None
        if time.perf_counter() >= self.gen.deadline or self.gen.remaining == 0:
            self.transport.close()
            self.gen.closed()
            return
        self.gen.remaining -= 1
        self.sent = time.perf_counter()
        self.transport.write(self.gen.request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while True:
            head_end = self.buf.find(b"\r\n\r\n")
            if head_end < 0:
                return
            head = self.buf[:head_end]
            match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            length = int(match.group(1)) if match else 0
            if len(self.buf) < head_end + 4 + length:
                return
            status = int(head[9:12])
            self.buf = self.buf[head_end + 4 + length :]
            self.gen.done(status, time.perf_counter() - self.sent)
            self.send()

    def connection_lost(self, exc: Exception | None) -> None:
        self.gen.closed()


class _LoadGen:
    def __init__(self, address: str, path: str, seconds: float, count: int) -> None:
        auth = f"Authorization: {os.environ[AGENT_AUTH_ENV]}\r\n" if path == "/v1/invoke" else ""
        host = "agent" if address.startswith("unix:") else address
        self.request = (
            f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n{auth}"
            f"Content-Length: {len(EVENT)}\r\n\r\n"
        ).encode() + EVENT
        self.deadline = time.perf_counter() + seconds
        self.remaining = count if count > 0 else -1
        self.latencies: list[float] = []
        self.errors = 0
        self.open = 0
        self.finished = asyncio.get_running_loop().create_future()

    def done(self, status: int, latency: float) -> None:
        if status == 200:
            self.latencies.append(latency)
        else:
            self.errors += 1

    def closed(self) -> None:
        self.open -= 1
        if self.open <= 0 and not self.finished.done():
            self.finished.set_result(None)


async def _loadgen(address: str, path: str, seconds: float, concurrency: int, count: int) -> dict[str, Any]:
    """Load on `address`: host:port, or unix:<path> (a local pod's agent)."""
    gen = _LoadGen(address, path, seconds, count)
    loop = asyncio.get_running_loop()
    gen.open = concurrency
    started = time.perf_counter()
    for _ in range(concurrency):
        if address.startswith("unix:"):
            await loop.create_unix_connection(lambda: _Conn(gen), address[len("unix:") :])
        else:
            host, port = address.rsplit(":", 1)
            await loop.create_connection(lambda: _Conn(gen), host, int(port))
    await gen.finished
    elapsed = time.perf_counter() - started
    return {"ok": len(gen.latencies), "errors": gen.errors, "elapsed": elapsed, "latencies": gen.latencies}


def run_loadgen(address: str, path: str, *, seconds: float, concurrency: int, count: int = 0) -> dict[str, Any]:
    """Run the load generator in a separate process; its result as a dict."""
    out = subprocess.run(
        [sys.executable, __file__, "_loadgen", address, path, str(seconds), str(concurrency), str(count)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return dict(json.loads(out))


# ---------------------------------------------------------------------------------------------
# a plain aiohttp proxy, the baseline of the activator's throughput


async def _proxy(port: int, backend: str) -> None:
    from aiohttp import ClientSession, TCPConnector, UnixConnector, web

    if backend.startswith("unix:"):  # a local pod's agent
        session = ClientSession(connector=UnixConnector(path=backend[len("unix:") :], limit=0))
        url = "http://agent/v1/invoke"
    else:
        session = ClientSession(connector=TCPConnector(limit=0))
        url = f"http://{backend}/v1/invoke"
    headers = {"Content-Type": "application/json", "Authorization": os.environ[AGENT_AUTH_ENV]}

    async def forward(request: web.Request) -> web.Response:
        body = await request.read()
        async with session.post(url, data=body, headers=headers) as r:
            return web.Response(status=r.status, body=await r.read(), content_type="application/json")

    app = web.Application()
    app.router.add_post("/v1/invoke", forward)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    print("PROXY_READY", flush=True)
    await asyncio.Event().wait()


# ---------------------------------------------------------------------------------------------
# helpers


def cpu_seconds(pid: int) -> float:
    """User + system CPU of one process (not its children)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


@dataclass
class Row:
    what: str
    value: str
    baseline: str
    target: str


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def start_agent(source: LocalPodSource, concurrency: int) -> str:
    """A specialized agent of the bench function, for direct calls (with the token the pod source
    bound, in the environment for the load generator and the proxy: never in their command line)."""
    pool = PoolKey(RUNTIME, "gvisor", MEMORY_MIB, "bench")
    handle = await source.claim(pool)
    from ember.api.function import Function

    fn = Function.model_validate(
        {
            "metadata": {"name": "bench"},
            "spec": {
                "runtime": RUNTIME,
                "handler": "main.handler",
                "code": {"inline": HELLO},
                "concurrency": concurrency,
            },
        }
    )
    request = specialize_request(VersionKey("default", "bench", 1), fn.spec, "sha256:" + "0" * 64)
    handle = await source.specialize(handle, request)
    os.environ[AGENT_AUTH_ENV] = handle.authorization
    return handle.address


def start_dev(directory: Path, port: int, env: dict[str, str]) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "ember.cli", "dev", str(directory), "--port", str(port), "--no-watch"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "Ready" in line:
            return proc
    raise RuntimeError("ember dev exited before the bench function was ready")


def stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(2)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def timed_runs(command: list[str], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True, cwd="/tmp")
        out.append(time.perf_counter() - t)
    return out


@dataclass
class ColdStarts:
    """Seconds per sample: total, and its parts."""

    total: list[float]
    claim: list[float]
    specialize: list[float]
    first_invoke: list[float]


async def cold_starts(source: LocalPodSource, pool: PoolKey, runs: int, *, warm: bool) -> ColdStarts:
    """claim + specialize + first invocation, from a warm pool (`warm`) or an empty one."""
    from ember.api.function import Function

    fn = Function.model_validate(
        {
            "metadata": {"name": "cold"},
            "spec": {"runtime": RUNTIME, "handler": "main.handler", "code": {"inline": HELLO}},
        }
    )
    request = specialize_request(VersionKey("default", "cold", 1), fn.spec, "sha256:" + "1" * 64)
    out = ColdStarts([], [], [], [])
    await source.ensure_pool(pool, 1 if warm else 0)
    for _ in range(runs):
        if warm:
            while not source.warm_pods().get(pool):  # noqa: ASYNC110 - polling the source is the point
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.2)  # let the previous refill settle: measure a quiet claim
        t0 = time.perf_counter()
        handle = await source.claim(pool)
        t1 = time.perf_counter()
        handle = await source.specialize(handle, request)
        t2 = time.perf_counter()
        auth = {"Authorization": handle.authorization}
        async with agent_session(handle.address) as http, http.post(AGENT_INVOKE, data=EVENT, headers=auth) as r:
            assert r.status == 200, await r.text()
            await r.read()
        t3 = time.perf_counter()
        await source.release(handle)
        out.total.append(t3 - t0)
        out.claim.append(t1 - t0)
        out.specialize.append(t2 - t1)
        out.first_invoke.append(t3 - t2)
    await source.ensure_pool(pool, 0)
    return out


@dataclass
class DataPath:
    """Warm latency (seconds) and throughput through the activator and its baselines, one sandbox."""

    via: list[float]
    direct: list[float]
    rate_via: float
    errors_via: int
    per_cpu_via: float
    rate_direct: float
    rate_proxy: float
    per_cpu_proxy: float
    busy_via: float  # fraction of a core the activator used during the throughput runs
    busy_proxy: float


async def data_path(sandbox: str, *, n_lat: int, seconds: float, conc: int, rounds: int) -> DataPath:
    """`ember dev` (a separate process), a direct agent and a plain aiohttp proxy in front of it,
    all with EMBER_SANDBOX=sandbox; runs alternate between them so that drifting machine load
    hits each alike, and medians are reported."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "operator"), "EMBER_SANDBOX": sandbox}
    os.environ["EMBER_SANDBOX"] = sandbox
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / "bench.yaml").write_text(FUNCTION_YAML.format(concurrency=conc, pods=1))
        source = LocalPodSource()
        dev = proxy = None
        try:
            direct = await start_agent(source, conc)
            env[AGENT_AUTH_ENV] = os.environ[AGENT_AUTH_ENV]
            port, pport = free_port(), free_port()
            dev = start_dev(directory, port, env)
            proxy = subprocess.Popen(  # noqa: ASYNC220 - the bench runs one step at a time on purpose
                [sys.executable, __file__, "_proxy", str(pport), direct], stdout=subprocess.PIPE, text=True, env=env
            )
            assert proxy.stdout is not None
            proxy.stdout.readline()
            via, proxied = f"127.0.0.1:{port}", f"127.0.0.1:{pport}"
            for address, path in ((direct, "/v1/invoke"), (via, ACTIVATOR_PATH), (proxied, "/v1/invoke")):
                run_loadgen(address, path, seconds=60, concurrency=1, count=200)
                run_loadgen(address, path, seconds=2, concurrency=conc)  # agents fork their workers lazily
            d: list[float] = []
            a: list[float] = []
            # the overhead is a difference of two latencies: measure them in short alternating
            # slices, so that load drifting on the machine (2 cores, shared) hits both alike
            slices = max(10, rounds * 10)
            for _ in range(slices):
                d += run_loadgen(direct, "/v1/invoke", seconds=120, concurrency=1, count=n_lat // slices)["latencies"]
                a += run_loadgen(via, ACTIVATOR_PATH, seconds=120, concurrency=1, count=n_lat // slices)["latencies"]
            rates: dict[str, list[float]] = {
                key: [] for key in ("via", "direct", "proxy", "via_cpu", "proxy_cpu", "via_busy", "proxy_busy")
            }
            errors = 0
            for _ in range(rounds):
                cpu0 = cpu_seconds(dev.pid)
                t = run_loadgen(via, ACTIVATOR_PATH, seconds=seconds, concurrency=conc)
                cpu = max(cpu_seconds(dev.pid) - cpu0, 1e-9)
                rates["via_cpu"].append(t["ok"] / cpu)
                rates["via_busy"].append(cpu / t["elapsed"])
                rates["via"].append(t["ok"] / t["elapsed"])
                errors += t["errors"]
                t = run_loadgen(direct, "/v1/invoke", seconds=seconds, concurrency=conc)
                rates["direct"].append(t["ok"] / t["elapsed"])
                cpu0 = cpu_seconds(proxy.pid)
                t = run_loadgen(proxied, "/v1/invoke", seconds=seconds, concurrency=conc)
                cpu = max(cpu_seconds(proxy.pid) - cpu0, 1e-9)
                rates["proxy_cpu"].append(t["ok"] / cpu)
                rates["proxy_busy"].append(cpu / t["elapsed"])
                rates["proxy"].append(t["ok"] / t["elapsed"])
        finally:
            if dev is not None:
                stop(dev)
            if proxy is not None:
                proxy.kill()
                proxy.wait()
            await source.close()
            os.environ.pop("EMBER_SANDBOX", None)
    med = {k: statistics.median(v) for k, v in rates.items()}
    return DataPath(
        via=a,
        direct=d,
        rate_via=med["via"],
        errors_via=errors,
        per_cpu_via=med["via_cpu"],
        rate_direct=med["direct"],
        rate_proxy=med["proxy"],
        per_cpu_proxy=med["proxy_cpu"],
        busy_via=med["via_busy"],
        busy_proxy=med["proxy_busy"],
    )


COLD_YAML = f"""
apiVersion: ember.run/v1alpha1
kind: Function
metadata:
  name: cold
spec:
  runtime: {RUNTIME}
  handler: main.handler
  code:
    inline: |
      def handler(event, context):
          return {{'hello': event.get('name', 'world')}}
  scaling:
    keepAliveSeconds: 0
"""


def _metric(text: str, name: str, *labels: str) -> float:
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and all(label in line for label in labels)
    )


def activator_cold_starts(runs: int) -> list[float]:
    """User-visible cold starts: invoke through `ember dev` a function scaled to zero, warm pool ready."""
    import urllib.request

    env = {**os.environ, "PYTHONPATH": str(ROOT / "operator")}
    out: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "cold.yaml").write_text(COLD_YAML)
        port = free_port()
        dev = start_dev(Path(tmp), port, env)
        base = f"http://127.0.0.1:{port}"
        try:
            for _ in range(runs):
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:
                    with urllib.request.urlopen(f"{base}/metrics") as r:
                        text = r.read().decode()
                    ready = _metric(text, "ember_pods", 'function="default/cold"', 'state="ready"')
                    warm = _metric(text, "ember_pool_pods")
                    if ready == 0 and warm >= 1:
                        break
                    time.sleep(0.05)
                time.sleep(0.3)  # a quiet pool, not one still starting its refill
                request = urllib.request.Request(
                    f"{base}/v1/namespaces/default/functions/cold/invoke", data=EVENT, method="POST"
                )
                t = time.perf_counter()
                with urllib.request.urlopen(request) as r:
                    r.read()
                out.append(time.perf_counter() - t)
        finally:
            stop(dev)
    return out


def ms(values: Sequence[float], q: float) -> str:
    return f"{pct(values, q) * 1000:.2f}"


def data_rows(label: str, m: DataPath, conc: int) -> list[Row]:
    over50 = (pct(m.via, 50) - pct(m.direct, 50)) * 1000
    over99 = (pct(m.via, 99) - pct(m.direct, 99)) * 1000
    return [
        Row(f"[{label}] warm invoke p50 / p99 (ms)", f"{ms(m.via, 50)} / {ms(m.via, 99)}",
            f"direct to agent {ms(m.direct, 50)} / {ms(m.direct, 99)}", ""),
        Row(f"[{label}] activator overhead p50 / p99 (ms)", f"{over50:.2f} / {over99:.2f}", "", "<= 1 / <= 3"),
        Row(f"[{label}] throughput, {conc} connections (req/s, median)", f"{m.rate_via:.0f} ({m.errors_via} errors)",
            f"direct {m.rate_direct:.0f}; aiohttp proxy {m.rate_proxy:.0f}", ""),
        Row(f"[{label}] requests per activator CPU-second (median)",
            f"{m.per_cpu_via:.0f} ({m.busy_via:.0%} of a core busy{_unsaturated(m.busy_via)})",
            f"aiohttp proxy {m.per_cpu_proxy:.0f} ({m.busy_proxy:.0%} busy{_unsaturated(m.busy_proxy)})", ">= 4000"),
    ]  # fmt: skip


SATURATED = 0.9  # busy fraction of a core above which requests per CPU-second is a per-core capacity


def _unsaturated(busy: float) -> str:
    return "" if busy >= SATURATED else ": not saturated, not a per-core figure"


async def main(args: argparse.Namespace) -> int:
    sandbox = detect_sandbox()
    print(f"sandbox: {sandbox.note}; runtime {RUNTIME}; cores: {os.cpu_count()}", flush=True)
    print(f"load average before: {os.getloadavg()[0]:.2f} (other work on this machine skews every number)", flush=True)
    n_lat = 300 if args.quick else 2000
    seconds = 3.0 if args.quick else 5.0
    rounds = 1 if args.quick else 3
    conc = 32
    rows: list[Row] = []
    if sandbox.kind is not Sandbox.NONE:
        measured = await data_path(sandbox.kind.value, n_lat=n_lat, seconds=seconds, conc=conc, rounds=rounds)
        rows += data_rows(sandbox.kind.value, measured, conc)
    measured = await data_path("none", n_lat=n_lat, seconds=seconds, conc=conc, rounds=rounds)
    rows += data_rows("unsandboxed", measured, conc)

    source = LocalPodSource()
    try:
        warm = await cold_starts(source, PoolKey(RUNTIME, "gvisor", 128, "warm"), 10 if args.quick else 40, warm=True)
        empty = await cold_starts(source, PoolKey(RUNTIME, "gvisor", 128, "empty"), 3 if args.quick else 8, warm=False)
    finally:
        await source.close()
    label = sandbox.kind.value
    through = activator_cold_starts(8 if args.quick else 30)
    rows.append(
        Row(
            f"[{label}] cold invoke via activator, warm pool p50 / p99 (ms)",
            f"{ms(through, 50)} / {ms(through, 99)}",
            "scaled to zero; request to reply",
            "<= 20 / <= 60",
        )
    )
    for name, c in (("warm pool", warm), ("empty pool", empty)):
        rows.append(
            Row(
                f"[{label}] cold start, {name} p50 / p99 (ms)",
                f"{ms(c.total, 50)} / {ms(c.total, 99)}",
                f"p50 parts: claim {ms(c.claim, 50)}, specialize {ms(c.specialize, 50)},"
                f" first invoke {ms(c.first_invoke, 50)}",
                "<= 20 / <= 60" if name == "warm pool" else "<= 1.2x runsc do python3 -c pass",
            )
        )
    if sandbox.kind is Sandbox.RUNSC:
        assert sandbox.binary is not None
        runsc = [sandbox.binary, "--rootless", "--network=host", *os.environ.get("EMBER_RUNSC_FLAGS", "").split(), "do"]
        true_runs = timed_runs([*runsc, "/bin/true"], 5 if args.quick else 10)
        py_runs = timed_runs([*runsc, sys.executable, "-c", "pass"], 3 if args.quick else 8)
        py50 = statistics.median(py_runs)
        rows.append(
            Row(
                "[runsc] bare runsc do p50 (ms)",
                f"empty pool / python3 -c pass = {pct(empty.total, 50) / py50:.2f}x",
                f"runsc do python3 -c pass {py50 * 1000:.0f};"
                f" runsc do /bin/true {statistics.median(true_runs) * 1000:.0f}",
                "<= 1.2x",
            )
        )

    width = max(len(r.what) for r in rows)
    vwidth = max(len(r.value) for r in rows)
    bwidth = max(len(r.baseline) for r in rows)
    print(f"\n{'measure':<{width}}  {'Ember':<{vwidth}}  {'baseline (same run)':<{bwidth}}  target")
    for r in rows:
        print(f"{r.what:<{width}}  {r.value:<{vwidth}}  {r.baseline:<{bwidth}}  {r.target}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_loadgen":
        address, path, seconds, concurrency, count = sys.argv[2:7]
        result = asyncio.run(_loadgen(address, path, float(seconds), int(concurrency), int(count)))
        print(json.dumps(result))
        sys.exit(0)
    if len(sys.argv) > 1 and sys.argv[1] == "_proxy":
        asyncio.run(_proxy(int(sys.argv[2]), sys.argv[3]))
        sys.exit(0)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples (a smoke run)")
    sys.exit(asyncio.run(main(parser.parse_args())))
