"""Two activators sharing one Redis store, as a cluster's replicas do: a real redis-server, two
real activators (each with its own Redis client and holder name), real sandboxed agents.

Events accepted by either run once in all (the stream's consumer group hands each to one
holder), both replicas take a share, and either answers every event's status.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.local.activator.helpers import function, run_activator
from tests.local.activator.test_async_invocations import OK, _enqueue, _status
from tests.local.sources.brokers import RedisServer, redis_server

from ember.sources.redis_streams import RedisStore

pytestmark = [pytest.mark.timeout(240)]

EVENTS = 200


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis") as server:
        yield server


async def test_two_activators_sharing_redis_run_each_event_once_and_both_report_it(redis: RedisServer) -> None:
    async with (
        run_activator(store=RedisStore(redis.url, "default"), holder="a") as a,
        run_activator(store=RedisStore(redis.url, "default"), holder="b") as b,
    ):
        for act in (a, b):
            act.registry.apply(function("ok", OK))
        ids = [(await _enqueue((a, b)[n % 2], "ok", {"n": n}))[1]["requestId"] for n in range(EVENTS)]
        deadline = time.monotonic() + 120
        done: dict[str, dict[str, object]] = {}
        while len(done) < EVENTS:
            assert time.monotonic() < deadline, f"{EVENTS - len(done)} events did not run"
            for rid in [r for r in ids if r not in done]:
                code, body = await _status(a.url, a.http, rid)
                if code == 200 and body["state"] == "succeeded":
                    done[rid] = body
            await asyncio.sleep(0.1)
        assert [done[rid]["result"] for rid in ids] == [{"doubled": 2 * n} for n in range(EVENTS)]
        runs = [await x.metric("ember_invocations_total", function="default/ok") for x in (a, b)]
        assert sum(runs) == EVENTS, runs  # once each: no lease ran out, nothing ran twice
        assert min(runs) > 0, runs  # both replicas took a share
        for rid in ids[:10]:
            code, body = await _status(b.url, b.http, rid)
            assert (code, body["state"]) == (200, "succeeded")
