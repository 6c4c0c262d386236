"""Benchmark of HTTP routes: matching a request to a route, against aiohttp's own router, and what
a routed request costs over a plain invocation in local mode, measured in the same run.

    python bench/routes.py            # about a minute
    python bench/routes.py --quick    # fewer samples

1. Matching (in this process, no I/O): a namespace's route table (`ember.resources.routes`) with
   10 and with 10,000 routes, spread over Functions of up to 50 routes each, like an API with many
   resources: `/svc<f>/res<r>/{id}`, `/svc<f>/res<r>/{id}/items`, one greedy `/svc<f>/files/{path+}`
   per Function and a few host-bound routes. Requests are drawn from the routes (parameters
   filled, some misses), and the same requests go to aiohttp's `UrlDispatcher` holding the same
   routes (`{path+}` as `{path:.*}`), resolved over a mocked request: aiohttp's own router is
   the baseline a gateway built on aiohttp would otherwise use. Rows: p50/p99 of one match in µs,
   and one path matched over and over (the walk's own cost, its nodes in the CPU's caches: it
   does not grow with the table; random paths over a large table pay cache misses).
2. End to end: `ember dev` (its own process, the best sandbox this machine has: gVisor here)
   serves one Function both as a route `GET /items/{id}` (payload 2.0 event and reply mapping)
   and through the invoke API; this process sends each sequentially over one keep-alive
   connection. Rows: p50/p99 in ms and what the route adds (p50 difference).
"""

from __future__ import annotations

import argparse
import asyncio
import http.client
import os
import random
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))

from aiohttp import web  # noqa: E402
from aiohttp.test_utils import make_mocked_request  # noqa: E402

from ember.api.http import Http  # noqa: E402
from ember.resources.routes import RouteTable, compile_routes, function_routes, split_path  # noqa: E402

PER_FUNCTION = 50


def route_specs(total: int) -> list[tuple[str, list[dict[str, object]]]]:
    """(Function name, its routes) for `total` routes."""
    functions: list[tuple[str, list[dict[str, object]]]] = []
    left = total
    f = 0
    while left > 0:
        routes: list[dict[str, object]] = [{"path": f"/svc{f}/files/{{path+}}", "methods": ["GET"]}]
        if f % 10 == 0:
            routes.append({"path": f"/svc{f}/admin", "methods": ["GET"], "host": "admin.example.com"})
        r = 0
        while len(routes) < min(PER_FUNCTION, left):
            routes.append({"path": f"/svc{f}/res{r}/{{id}}", "methods": ["GET", "PUT"]})
            if len(routes) < min(PER_FUNCTION, left):
                routes.append({"path": f"/svc{f}/res{r}/{{id}}/items", "methods": ["GET"]})
            r += 1
        routes = routes[: min(PER_FUNCTION, left)]
        functions.append((f"fn{f}", routes))
        left -= len(routes)
        f += 1
    return functions


def requests_for(functions: list[tuple[str, list[dict[str, object]]]], n: int, rng: random.Random) -> list[str]:
    """Paths to match: mostly routes with their parameters filled, one in ten a miss."""
    flat = [route["path"] for _, routes in functions for route in routes if "host" not in route]
    paths = []
    for i in range(n):
        if i % 10 == 9:
            paths.append(f"/svc{rng.randrange(10**6)}/nothing/here")
            continue
        template = str(rng.choice(flat))
        path = template.replace("{id}", str(rng.randrange(10**6))).replace("{path+}", "docs/2026/report.pdf")
        paths.append(path)
    return paths


def ember_table(functions: list[tuple[str, list[dict[str, object]]]]) -> RouteTable:
    compiled = compile_routes(
        function_routes("default", name, Http.model_validate({"routes": routes})) for name, routes in functions
    )
    assert not compiled.refused, compiled.refused
    return compiled.table


def aiohttp_router(functions: list[tuple[str, list[dict[str, object]]]]) -> web.UrlDispatcher:
    app = web.Application()

    async def handler(request: web.Request) -> web.Response:
        return web.Response()

    for _, routes in functions:
        for route in routes:
            path = str(route["path"]).replace("{path+}", "{path:.*}")
            for method in route["methods"]:  # type: ignore[attr-defined]
                app.router.add_route(method, path, handler)
    app.freeze()
    return app.router


def time_matches(paths: list[str], table: RouteTable, router: web.UrlDispatcher) -> tuple[list[float], list[float]]:
    ours: list[float] = []
    theirs: list[float] = []
    requests = [make_mocked_request("GET", path) for path in paths]

    async def resolve_all() -> None:
        for request in requests:
            start = time.perf_counter()
            await router.resolve(request)
            theirs.append(time.perf_counter() - start)

    for path in paths:
        start = time.perf_counter()
        table.match("api.example.com", "GET", split_path(path))
        ours.append(time.perf_counter() - start)
    asyncio.run(resolve_all())
    return ours, theirs


def check_agreement(paths: list[str], table: RouteTable, router: web.UrlDispatcher) -> None:
    """Both routers find a route for the same paths (else the comparison would be unfair)."""

    async def found(path: str) -> bool:
        info = await router.resolve(make_mocked_request("GET", path))
        return info.http_exception is None

    for path in paths[:200]:
        ours = table.match("api.example.com", "GET", split_path(path)) is not None
        if ours != asyncio.run(found(path)):
            raise RuntimeError(f"the routers disagree on {path}")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


HANDLER = """
def handler(event, context):
    if "rawPath" in event:
        return {"statusCode": 200, "body": event["pathParameters"]["id"]}
    return event
"""


def measure(port: int, method: str, path: str, body: bytes | None, n: int) -> list[float]:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    out: list[float] = []
    for i in range(n + n // 10):  # the first tenth warms the path up
        start = time.perf_counter()
        connection.request(method, path, body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        data = response.read()
        took = time.perf_counter() - start
        if response.status != 200 or response.getheader("X-Ember-Function-Error"):
            raise RuntimeError(f"{method} {path}: {response.status} {data[:300]!r}")
        if i >= n // 10:
            out.append(took)
    connection.close()
    return out


def end_to_end(n: int) -> tuple[str, dict[str, list[float]]]:
    code = textwrap.indent(HANDLER, "      ")
    manifest = (
        "apiVersion: ember.run/v1alpha1\nkind: Function\nmetadata: {name: shop}\nspec:\n"
        "  runtime: python3.12\n  handler: main.handler\n"
        "  http: {routes: [{path: '/items/{id}', methods: [GET]}]}\n"
        f"  code:\n    inline: |\n{code}"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT / "operator")}
    with tempfile.TemporaryDirectory(prefix="ember-bench-routes-") as folder:
        Path(folder, "shop.yaml").write_text(manifest)
        dev = subprocess.Popen(
            [sys.executable, "-m", "ember.cli", "dev", folder, "--port", "0", "--no-watch"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        try:
            assert dev.stdout is not None
            sandbox, port = "", 0
            for line in dev.stdout:
                if "sandbox:" in line:
                    sandbox = line.split("sandbox:", 1)[1].strip()
                if "route GET" in line:
                    port = int(line.split("http://127.0.0.1:", 1)[1].split("/", 1)[0])
                    break
            if not port:
                raise RuntimeError("ember dev printed no route")
            samples: dict[str, list[float]] = {"invoke": [], "route": []}
            for _ in range(3):  # interleaved rounds: a noisy moment hits both alike
                samples["invoke"] += measure(
                    port, "POST", "/v1/namespaces/default/functions/shop/invoke", b'{"id": "42"}', n // 3
                )
                samples["route"] += measure(port, "GET", "/items/42", None, n // 3)
        finally:
            dev.send_signal(2)
            try:
                dev.wait(timeout=30)
            except subprocess.TimeoutExpired:
                dev.kill()
    return sandbox, samples


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer samples")
    args = parser.parse_args()
    rng = random.Random(7)
    matches = 2_000 if args.quick else 20_000
    print(f"route matching, {matches} requests drawn from the routes (one in ten a miss), one match each")
    print(f"{'routes':>7} {'matcher':<28} {'p50 µs':>8} {'p99 µs':>8} {'vs aiohttp (p50)':>17}")
    for total in (10, 10_000):
        functions = route_specs(total)
        table, router = ember_table(functions), aiohttp_router(functions)
        paths = requests_for(functions, matches, rng)
        check_agreement(paths, table, router)
        ours, theirs = time_matches(paths, table, router)
        hot, _ = time_matches([paths[0]] * len(paths), table, router)  # cache-hot: the walk's own cost
        ratio = statistics.median(ours) / statistics.median(theirs)
        rows = (
            ("ember RouteTable", ours, f"{ratio:.2f}x"),
            ("ember, one path repeated", hot, ""),
            ("aiohttp UrlDispatcher", theirs, ""),
        )
        for label, values, vs in rows:
            print(f"{total:>7} {label:<28} {pct(values, 50) * 1e6:>8.2f} {pct(values, 99) * 1e6:>8.2f} {vs:>17}")
    n = 150 if args.quick else 600
    sandbox, samples = end_to_end(n)
    base = statistics.median(samples["invoke"])
    print()
    where = sandbox or "sandbox unknown"
    print(f"routed request vs invoke API in local mode ({where}), {n} sequential keep-alive calls")
    print(f"{'request':<48} {'p50 ms':>8} {'p99 ms':>8} {'adds (p50) ms':>14}")
    rows = (
        ("POST .../functions/shop/invoke (baseline)", "invoke"),
        ("GET /items/42 (route, payload 2.0 mapping)", "route"),
    )
    for label, key in rows:
        values = samples[key]
        added = statistics.median(values) - base
        print(f"{label:<48} {pct(values, 50) * 1000:>8.2f} {pct(values, 99) * 1000:>8.2f} {added * 1000:>14.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
