"""Benchmark of freezing idle pods and of key-value state (issue #15), in local mode.

    python bench/freeze_state.py            # about a minute and a half
    python bench/freeze_state.py --quick    # fewer samples

A real activator (in this process) over real sandboxed agents (the best sandbox on this machine:
gVisor's runsc here), reached over HTTP on loopback as a user would.

1. Thaw + invoke. A hello function with `freeze: {enabled: true, idleSeconds: 1}`: each sample waits
   until its one pod is frozen, then times one invocation from the client (the thaw, a new
   connection to the agent, the invocation). Baselines in the same run: the same invocation on a
   warm pod of a function that does not freeze, and a cold start (the Version's first pod, claimed
   from the warm pool and specialized). Targets: thaw + invoke p50 <= 5 ms, p99 <= 20 ms.
2. `context.state` inside the sandbox: a function times N calls of each operation in a loop
   (`time.perf_counter` around each) and returns the latencies: the code's view, through the agent's
   relay and the services proxy to the SQLite store. Baseline in the same run: the same store
   operation called directly in the activator's process (what the channel adds is the difference).
   Target: `get` p50 <= 1 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402

from ember.activator import keys  # noqa: E402
from ember.activator.app import make_app  # noqa: E402
from ember.activator.config import ActivatorConfig  # noqa: E402
from ember.activator.registry import Registry  # noqa: E402
from ember.api.function import Function  # noqa: E402
from ember.pods.local import LocalPodSource, detect_sandbox  # noqa: E402
from ember.state.sqlite import SqliteKeyValueStore  # noqa: E402

HELLO = "def handler(event, context):\n    return {'hello': 'world'}\n"

STATE_LOOP = """
import time

def handler(event, context):
    s = context.state
    n = event["n"]
    s.put("k", {"v": "x" * 100})
    out = {}
    for name, call in (
        ("get", lambda: s.get("k")),
        ("put", lambda: s.put("k", {"v": "x" * 100})),
        ("incr", lambda: s.incr("c")),
    ):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            call()
            times.append((time.perf_counter() - t) * 1000)
        out[name] = times
    return out
"""

CONFIG = ActivatorConfig(stable_window_s=2.0, panic_window_s=0.5, tick_s=0.05, warm_pool_size=1)


def _function(name: str, code: str, **spec: object) -> Function:
    body = {"runtime": "python3.11", "handler": "main.handler", "code": {"inline": code}, "timeoutSeconds": 60, **spec}
    return Function.model_validate({"metadata": {"name": name}, "spec": body})


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _row(name: str, values: list[float], target: str = "") -> str:
    return f"{name:<34} {len(values):>5} {statistics.median(values):>9.2f} {_pct(values, 0.99):>9.2f} {target:>18}"


async def _post(http: aiohttp.ClientSession, url: str, event: object) -> tuple[float, dict[str, object]]:
    started = time.perf_counter()
    async with http.post(url, data=json.dumps(event).encode()) as response:
        body = await response.read()
        elapsed = (time.perf_counter() - started) * 1000
        if response.status != 200 or "X-Ember-Function-Error" in response.headers:
            raise RuntimeError(f"{url}: {response.status} {body[:300]!r}")
    return elapsed, json.loads(body)


async def _wait_frozen(registry: Registry, name: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        pods = [p for vs in registry.all_versions() if vs.fs.name == name for p in vs.serving]
        if pods and all(p.frozen for p in pods) and not any(p.gate.locked() for p in pods):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"{name} was not frozen within 30 s")
        await asyncio.sleep(0.01)


async def _run(samples: int, state_ops: int) -> list[str]:
    source = LocalPodSource()
    app = make_app(source, CONFIG)
    runner = web.AppRunner(app, access_log=None)
    rows: list[str] = []
    try:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        base = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/namespaces/default/functions"
        registry: Registry = app[keys.REGISTRY]
        async with aiohttp.ClientSession() as http:
            cold: list[float] = []
            for i in range(min(samples, 10)):
                registry.apply(_function(f"cold{i}", HELLO))
                await asyncio.sleep(0.5)  # the warm pool refills between cold starts
                cold.append((await _post(http, f"{base}/cold{i}/invoke", {}))[0])
                registry.remove("default", f"cold{i}")
            registry.apply(_function("warm", HELLO))
            await _post(http, f"{base}/warm/invoke", {})
            warm = [(await _post(http, f"{base}/warm/invoke", {}))[0] for _ in range(samples * 5)]
            registry.apply(_function("frozen", HELLO, freeze={"enabled": True, "idleSeconds": 1}))
            await _post(http, f"{base}/frozen/invoke", {})
            thawed: list[float] = []
            for _ in range(samples):
                await _wait_frozen(registry, "frozen")
                thawed.append((await _post(http, f"{base}/frozen/invoke", {}))[0])
            rows.append(_row("cold start + invoke (baseline)", cold))
            rows.append(_row("warm invoke (baseline)", warm))
            rows.append(_row("thaw + invoke", thawed, "p50<=5 p99<=20"))

            registry.apply(_function("state", STATE_LOOP, state={"keyValue": True}))
            await _post(http, f"{base}/state/invoke", {"n": 20})  # the pod, its connections, warm
            _, inside = await _post(http, f"{base}/state/invoke", {"n": state_ops})
        direct = await _direct_store(state_ops)
        for op in ("get", "put", "incr"):
            values = inside[op]
            assert isinstance(values, list)
            rows.append(_row(f"state.{op} in the sandbox", values, "p50<=1" if op == "get" else ""))
            rows.append(_row(f"store {op}, in-process (baseline)", direct[op]))
    finally:
        await runner.cleanup()
        await source.close()
    return rows


async def _direct_store(n: int) -> dict[str, list[float]]:
    with tempfile.TemporaryDirectory() as folder:
        store = SqliteKeyValueStore(Path(folder) / "state.db")
        await store.start()
        value = json.dumps({"v": "x" * 100}, separators=(",", ":")).encode()
        await store.put("default/state", "k", value, None)
        out: dict[str, list[float]] = {}
        calls = {
            "get": lambda: store.get("default/state", "k"),
            "put": lambda: store.put("default/state", "k", value, None),
            "incr": lambda: store.incr("default/state", "c", 1, None),
        }
        for name, call in calls.items():
            times = []
            for _ in range(n):
                t = time.perf_counter()
                await call()
                times.append((time.perf_counter() - t) * 1000)
            out[name] = times
        await store.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    args = parser.parse_args()
    samples, state_ops = (10, 200) if args.quick else (40, 1000)
    sandbox = detect_sandbox()
    print(f"freeze / thaw and key-value state, local mode, sandbox {sandbox.kind.value} ({sandbox.note or 'ok'})")
    rows = asyncio.run(_run(samples, state_ops))
    print(f"{'':<34} {'n':>5} {'p50 ms':>9} {'p99 ms':>9} {'target':>18}")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
