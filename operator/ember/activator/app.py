"""The activator's aiohttp application: an app factory that wires the parts, and their lifecycle.

`make_app` builds everything from a `PodSource` and an `ActivatorConfig`; functions are
given to `app[keys.REGISTRY].apply(...)` before or while it runs. The parts depend one way:
the scaler reads the registry, the invoker routes through it, and both the registry's
throttlers and the invoker wake the scaling loop through one `Wakeup` made first. The
asynchronous invocations (over their `EventStore`) and the event-source pollers invoke through
the invoker too. The cleanup context owns the background work and stops it in order: readiness
off, scaling loop cancelled, event-source pollers stopped, async workers drained (their events
handed back to the store), every pod released, then the agent client closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from aiohttp import web

from ember.activator import ember_api, gateway, health, keys, lambda_api
from ember.activator.agent_client import AgentClient
from ember.activator.async_invoke import AsyncInvocations
from ember.activator.authorizer import JwtVerifier
from ember.activator.config import ActivatorConfig
from ember.activator.event_sources import EventSources
from ember.activator.freezer import Freezer
from ember.activator.invoke import Invoker
from ember.activator.metrics import Metrics
from ember.activator.portions import PortionPortal
from ember.activator.registry import Registry
from ember.activator.scaler import Scaler
from ember.activator.sizing import Sizing
from ember.activator.wake import Wakeup
from ember.pods.base import PodSource
from ember.pods.services import Credentials, no_credentials
from ember.sources.sqlite import SqliteStore
from ember.sources.store import EventStore
from ember.state.http import handle as handle_state
from ember.state.sqlite import SqliteKeyValueStore
from ember.state.store import KeyValueStore


def make_app(
    source: PodSource,
    config: ActivatorConfig | None = None,
    *,
    replicas: Callable[[], int] = lambda: 1,
    credentials: Credentials = no_credentials,
    store: EventStore | None = None,
    state: KeyValueStore | None = None,
    holder: str = "activator",
) -> web.Application:
    """A ready-to-run activator over `source`; the caller owns (and closes) the source.

    `credentials` reads Secrets' keys (the JWKS of routes' JWT authorizers). `store` keeps the
    asynchronous invocations (the app opens and closes it); without one they go to a SQLite file
    in a temporary folder removed at cleanup: durable for the process's life only. `holder`
    names this activator's leases in the store (unique among the replicas sharing it). `state`
    keeps the Functions' key-value state (`ember.state`; opened and closed by the app); without
    one it goes to a SQLite file in that temporary folder.

    `replicas` counts the live activators sharing the Functions (this one included): each keeps a
    Version within its share of `minScale` and `maxScale` (see `ember.activator.scaler`).
    """
    config = config or ActivatorConfig()
    metrics = Metrics()
    wakeup = Wakeup()
    registry = Registry(config, metrics, wake=wakeup, replicas=replicas)
    client = AgentClient()
    freezer = Freezer(client, metrics)
    scaler = Scaler(registry, source, config, metrics, client, replicas=replicas, wakeup=wakeup, freezer=freezer)
    invoker = Invoker(registry, client, wakeup, freezer)
    sizing = Sizing(registry, source, config)
    source.route_calls(PortionPortal(invoker, config.max_body_bytes))
    scratch = tempfile.TemporaryDirectory(prefix="ember-activator-") if store is None or state is None else None
    if scratch is not None:
        store = store or SqliteStore(Path(scratch.name) / "async.db")
        state = state or SqliteKeyValueStore(Path(scratch.name) / "state.db")
    assert store is not None
    assert state is not None
    kv = state
    source.route_state(functools.partial(handle_state, kv))
    async_invocations = AsyncInvocations(
        invoker,
        store,
        metrics,
        workers=config.async_workers,
        holder=holder,
        credentials=credentials,
        lease_s=config.async_lease_s,
        retry_base_s=config.async_retry_base_s,
    )
    event_sources = EventSources(
        registry, invoker, credentials, metrics, holder=holder, max_body_bytes=config.max_body_bytes
    )
    metrics.watch_state(
        registry.gauges,
        lambda: {str(k): v for k, v in source.warm_pods().items()},
        lambda: source.discarded_bound,
    )

    app = web.Application(client_max_size=config.max_body_bytes + 1)
    app[keys.CONFIG] = config
    app[keys.REGISTRY] = registry
    app[keys.INVOKER] = invoker
    app[keys.SCALER] = scaler
    app[keys.SIZING] = sizing
    app[keys.ASYNC] = async_invocations
    app[keys.EVENT_SOURCES] = event_sources
    app[keys.METRICS] = metrics
    app[keys.SOURCE] = source
    app[keys.STATE] = {"started": False, "closing": False}
    ember_api.add_routes(app)
    lambda_api.add_routes(app)
    health.add_routes(app)
    app[gateway.VERIFIER] = JwtVerifier(credentials)
    gateway.add_routes(app)  # last: every path the activator's own API does not take

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await client.start()
        await kv.start()
        await async_invocations.start()
        await event_sources.start()
        loop_task = asyncio.create_task(scaler.run(), name="ember-scaler")
        sizing_task = asyncio.create_task(sizing.run(), name="ember-sizing")
        app[keys.STATE]["started"] = True
        try:
            yield
        finally:
            app[keys.STATE]["closing"] = True
            for task in (sizing_task, loop_task):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await event_sources.close()
            await async_invocations.close()
            await scaler.close()
            await client.close()
            await kv.close()
            if scratch is not None:
                scratch.cleanup()

    app.cleanup_ctx.append(lifecycle)
    return app
