"""Helpers of the activator's local tier: a real activator on a real port over real agent processes.

The pod source is `LocalPodSource` with the best sandbox on this machine (gVisor's runsc when
installed). Every agent process is stopped by pid when a test ends, pass or fail, and the test
fails if one is left running.
"""

from __future__ import annotations

import contextlib
import os
import textwrap
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from ember.activator import keys
from ember.activator.app import make_app
from ember.activator.config import ActivatorConfig
from ember.activator.registry import Registry
from ember.api.function import Function
from ember.pods.local import LocalPodSource
from ember.pods.services import Credentials, no_credentials
from ember.sources.store import EventStore
from ember.state.store import KeyValueStore

# Small windows so scaling happens within a test's time.
FAST = ActivatorConfig(
    stable_window_s=2.0,
    panic_window_s=0.5,
    tick_s=0.1,
    queue_timeout_s=30.0,
    warm_pool_size=2,
    async_workers=4,
    async_retry_base_s=0.2,
)


def function(name: str, code: str, **spec: Any) -> Function:
    """A Python Function with inline code (module main, handler `handler`)."""
    body = {
        "runtime": "python3.11",
        "handler": "main.handler",
        "code": {"inline": textwrap.dedent(code)},
        **spec,
    }
    return Function.model_validate({"metadata": {"name": name}, "spec": body})


@dataclass
class Activator:
    """A running activator and what the tests need to reach into it."""

    url: str
    app: web.Application
    source: LocalPodSource
    http: aiohttp.ClientSession

    @property
    def registry(self) -> Registry:
        return self.app[keys.REGISTRY]

    def invoke_url(self, name: str, namespace: str = "default") -> str:
        return f"{self.url}/v1/namespaces/{namespace}/functions/{name}/invoke"

    async def metric(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples that match the labels, read from /metrics."""
        async with self.http.get(f"{self.url}/metrics") as response:
            text = await response.text()
        total = 0.0
        for line in text.splitlines():
            if not line.startswith(name + "{") and not line.startswith(name + " "):
                continue
            if all(f'{k}="{v}"' in line for k, v in labels.items()):
                total += float(line.rsplit(" ", 1)[1])
        return total


@contextlib.asynccontextmanager
async def run_activator(
    config: ActivatorConfig = FAST,
    *,
    credentials: Credentials = no_credentials,
    store: EventStore | None = None,
    state: KeyValueStore | None = None,
    holder: str = "activator",
    source: LocalPodSource | None = None,
) -> AsyncIterator[Activator]:
    """Start source + activator on 127.0.0.1:0; always stop both, and every agent by pid.
    `credentials` serves Secrets: auxiliary services' (`ember.pods.services`), routes' JWKS;
    `store` keeps the asynchronous invocations and `state` the key-value state (temporary SQLite
    files when None); `source` is the pod source (the best sandbox here when None)."""
    source = source or LocalPodSource(credentials=credentials)
    app = make_app(source, config, credentials=credentials, store=store, state=state, holder=holder)
    runner = web.AppRunner(app, access_log=None)
    started: list[int] = []
    try:
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as http:
            yield Activator(f"http://127.0.0.1:{port}", app, source, http)
    finally:
        started = source.running_pids()
        await runner.cleanup()
        await source.close()
        leftover = [pid for pid in started if _alive(pid)]
        for pid in leftover:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        assert not leftover, f"agent processes still running after close: {leftover}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not running; waitpid reaps it if it is ours
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    return True
