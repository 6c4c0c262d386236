"""Benchmark of `spec.state.volume` in local mode: does a Function with a volume start as fast as one
without? Its pods come from warm pools of its own, prewarmed like any other, so the target is a cold
start within 2x of the same Function without a volume.

    python bench/volume.py            # about a minute
    python bench/volume.py --quick    # fewer runs

A real activator (in this process) over real sandboxed agents (the best sandbox on this machine:
gVisor's runsc here) and a volumes folder of its own. Two Functions alike but for the volume: each
invocation appends a line to a file, on the volume (`/mnt/state`) or in /tmp. Runs alternate
between the two so that drifting machine load hits both alike; medians and p90.

1. Version change: the Function serves, its pool holds a warm pod; an edit of its `env` makes a new
   Version; time from the edit to the first reply that the new Version executed (invocations back
   to back meanwhile, each served by the old one).
2. Cold claim: the Function scaled to zero (keepAliveSeconds 0) and its pool warm again; one
   invocation, which claims a warm pod, specializes it and runs.
3. Empty pool, for the sandbox's own cost of the mount: the pod source alone, no warm pod; start a
   sandbox + specialize + first invocation (what prewarming keeps off rows 1 and 2).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))

import aiohttp  # noqa: E402
from aiohttp import web  # noqa: E402

from ember.activator import keys  # noqa: E402
from ember.activator.app import make_app  # noqa: E402
from ember.activator.config import ActivatorConfig  # noqa: E402
from ember.activator.registry import Registry  # noqa: E402
from ember.api.function import Function  # noqa: E402
from ember.pods.base import VersionKey  # noqa: E402
from ember.pods.local import LocalPodSource, agent_session  # noqa: E402
from ember.pods.payload import pool_key, specialize_request  # noqa: E402

APPEND = """
import os

PATH = os.environ["NOTES"]

def handler(event, context):
    with open(PATH, "a") as f:
        f.write("x\\n")
    return {"version": context.function_version}
"""
CONFIG = ActivatorConfig(stable_window_s=2.0, panic_window_s=0.5, tick_s=0.1, warm_pool_size=1)
KINDS = ("without volume", "with volume")
AGENT_INVOKE = "http://agent/v1/invoke"


def _function(name: str, *, volume: bool, edition: int, keep_alive_s: int = 300) -> Function:
    spec: dict[str, Any] = {
        "runtime": "python3.11",
        "handler": "main.handler",
        "code": {"inline": textwrap.dedent(APPEND)},
        "env": {"NOTES": "/mnt/state/notes" if volume else "/tmp/notes", "EDITION": str(edition)},
        "scaling": {"maxScale": 1, "keepAliveSeconds": keep_alive_s},
    }
    if volume:
        spec["state"] = {"volume": {"mountPath": "/mnt/state", "sizeMiB": 64}}
    return Function.model_validate({"metadata": {"name": name}, "spec": spec})


async def _until(predicate: Any, what: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout_s} s waiting for {what}")
        await asyncio.sleep(0.02)


def _warm(source: LocalPodSource, registry: Registry, name: str) -> bool:
    fs = registry.get("default", name)
    pool = fs.versions[max(fs.versions)].pool
    return source.warm_pods().get(pool, 0) >= 1


async def _invoke(http: aiohttp.ClientSession, url: str) -> str:
    async with http.post(url, data=b"{}") as response:
        body = await response.read()
        if response.status != 200 or "X-Ember-Function-Error" in response.headers:
            raise SystemExit(f"{url}: {response.status} {body[:200]!r}")
        return response.headers["X-Ember-Executed-Version"]


async def _through_activator(runs: int, volumes: Path) -> tuple[str, dict[str, list[float]], dict[str, list[float]]]:
    """Rows 1 and 2: seconds per run, per kind."""
    source = LocalPodSource(volumes=volumes)
    app = make_app(source, CONFIG)
    runner = web.AppRunner(app, access_log=None)
    changes: dict[str, list[float]] = {kind: [] for kind in KINDS}
    claims: dict[str, list[float]] = {kind: [] for kind in KINDS}
    try:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        base = f"http://127.0.0.1:{runner.addresses[0][1]}/v1/namespaces/default/functions"
        registry = app[keys.REGISTRY]
        async with aiohttp.ClientSession() as http:
            names = {KINDS[0]: "plain", KINDS[1]: "stateful"}
            for kind, name in names.items():
                registry.apply(_function(name, volume=kind == KINDS[1], edition=0))
                await _until(lambda name=name: _warm(source, registry, name), f"{name}'s warm pool")
                await _invoke(http, f"{base}/{name}/invoke")
            for run in range(1, runs + 1):
                for kind, name in names.items():
                    url = f"{base}/{name}/invoke"
                    await _until(lambda name=name: _warm(source, registry, name), f"{name}'s warm pool")
                    await asyncio.sleep(0.3)  # the last refill settled: a quiet machine
                    started = time.perf_counter()
                    registry.apply(_function(name, volume=kind == KINDS[1], edition=run))
                    while await _invoke(http, url) != str(run + 1):
                        pass
                    changes[kind].append(time.perf_counter() - started)
            # row 2: scale to zero, then one invocation
            for kind, name in names.items():
                registry.apply(_function(name, volume=kind == KINDS[1], edition=runs + 1, keep_alive_s=0))
                while await _invoke(http, f"{base}/{name}/invoke") != str(runs + 2):
                    pass
            for _ in range(runs):
                for kind, name in names.items():
                    fs = registry.get("default", name)
                    key = fs.versions[max(fs.versions)].key
                    await _until(lambda key=key: not source.endpoints(key), f"{name} scaled to zero")
                    await _until(lambda name=name: _warm(source, registry, name), f"{name}'s warm pool")
                    await asyncio.sleep(0.3)
                    started = time.perf_counter()
                    await _invoke(http, f"{base}/{name}/invoke")
                    claims[kind].append(time.perf_counter() - started)
    finally:
        await runner.cleanup()
        await source.close()
    return source.sandbox.note, changes, claims


async def _empty_pool(runs: int, volumes: Path) -> dict[str, list[float]]:
    """Row 3: start a sandbox + specialize + first invocation, on the pod source alone."""
    source = LocalPodSource(volumes=volumes)
    out: dict[str, list[float]] = {kind: [] for kind in KINDS}
    try:
        for run in range(runs):
            for kind in KINDS:
                fn = _function("empty", volume=kind == KINDS[1], edition=run)
                pool = pool_key(fn.spec, None, namespace="default", function="empty")
                key = VersionKey("default", "empty", run + 1)
                request = specialize_request(key, fn.spec, "sha256:" + f"{run:064x}")
                started = time.perf_counter()
                handle = await source.specialize(await source.claim(pool), request)
                auth = {"Authorization": handle.authorization}
                async with (
                    agent_session(handle.address) as http,
                    http.post(AGENT_INVOKE, data=b"{}", headers=auth) as r,
                ):
                    if r.status != 200:
                        raise SystemExit(f"empty pool: {r.status} {await r.text()}")
                    await r.read()
                out[kind].append(time.perf_counter() - started)
                await source.release(handle)
                await source.ensure_pool(pool, 0)  # no refill: every run starts from an empty pool
    finally:
        await source.close()
    return out


def _p(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer runs")
    args = parser.parse_args()
    runs = 5 if args.quick else 15
    with tempfile.TemporaryDirectory(prefix="ember-bench-volume-") as tmp:
        note, changes, claims = asyncio.run(_through_activator(runs, Path(tmp) / "volumes"))
        empty = asyncio.run(_empty_pool(runs, Path(tmp) / "volumes"))
    print(f"cold starts with and without spec.state.volume, local mode, sandbox {note}, {runs} runs each")
    heads = ("", "without p50 ms", "p90", "with volume p50 ms", "p90", "ratio p50")
    widths = (40, 14, 7, 18, 7, 9)
    print(" ".join(f"{h:>{w}}" if i else f"{h:<{w}}" for i, (h, w) in enumerate(zip(heads, widths, strict=True))))
    for label, row in (
        ("Version change -> new Version serving", changes),
        ("cold claim from the warm pool", claims),
        ("empty pool: start + specialize + invoke", empty),
    ):
        plain, volume = row[KINDS[0]], row[KINDS[1]]
        p50, v50 = statistics.median(plain) * 1000, statistics.median(volume) * 1000
        print(
            f"{label:<40} {p50:>14.1f} {_p(plain, 0.9) * 1000:>7.1f} {v50:>18.1f} "
            f"{_p(volume, 0.9) * 1000:>7.1f} {v50 / p50:>8.2f}x"
        )
    worst = max(statistics.median(row[KINDS[1]]) / statistics.median(row[KINDS[0]]) for row in (changes, claims))
    verdict = "met" if worst <= 2 else "NOT met"
    print(f"target: a prewarmed cold start with a volume within 2x of one without: {verdict} (worst {worst:.2f}x)")
    print(f"(python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
