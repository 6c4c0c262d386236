"""Probes and metrics: `/healthz` (the process serves), `/readyz` (started, not shutting down), `/metrics`."""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from ember.activator import keys


async def healthz(request: web.Request) -> web.Response:
    del request
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[keys.STATE]
    functions = {}
    for fs in request.app[keys.REGISTRY].functions():
        functions[fs.label] = {
            str(n): {"phase": v.phase.value, "readyPods": v.ready_pods, "message": v.message}
            for n, v in fs.versions.items()
        }
    ready = bool(state.get("started")) and not state.get("closing")
    return web.json_response({"ready": ready, "functions": functions}, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    data = generate_latest(request.app[keys.METRICS].registry)
    return web.Response(body=data, headers={"Content-Type": CONTENT_TYPE_LATEST})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
