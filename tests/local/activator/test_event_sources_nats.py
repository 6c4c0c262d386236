"""NATS JetStream event sources end to end: a real nats-server with JetStream, a real activator,
real sandboxed agents. The poller is the one Redis Streams sources use
(tests/local/activator/test_event_sources.py tests rate matching with it); here the broker side:
a durable pull consumer shared by two activators (each message run once), partial batch failure
(nak with a delay, then the dead-letter subject with the reason in headers, `term`ed), and a
poison message dead-lettered at once; nats-server SIGKILLed and restarted mid-stream loses nothing.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
import pytest_asyncio
from tests.local.activator.helpers import Activator, function, run_activator
from tests.local.activator.test_event_sources import PARTIAL
from tests.local.sources.brokers import NatsServer, nats_server

from ember.pods.services import CredentialUnavailable

pytestmark = [pytest.mark.timeout(240)]


@pytest.fixture
def server(tmp_path: Path) -> Iterator[NatsServer]:
    with nats_server(tmp_path / "nats") as running:
        yield running


@pytest_asyncio.fixture
async def js(server: NatsServer) -> AsyncIterator[Any]:
    nc = await nats.connect(server.url)
    context = nc.jetstream()
    await context.add_stream(name="ORDERS", subjects=["orders.new"])
    await context.add_stream(name="DEAD", subjects=["orders.dead"])
    yield context
    await nc.close()


def _secrets(server: NatsServer) -> Any:
    async def read(namespace: str, name: str, key: str) -> str:
        if (namespace, name, key) == ("default", "bus", "url"):
            return server.url
        raise CredentialUnavailable(f"no Secret {namespace}/{name} key {key}")

    return read


SOURCE = {
    "name": "orders",
    "type": "nats-jetstream",
    "connectionSecretRef": {"name": "bus"},
    "stream": "orders.new",
    "deadLetterStream": "orders.dead",
}


async def _acked(acts: list[Activator], want: float, timeout_s: float = 120) -> list[float]:
    deadline = time.monotonic() + timeout_s
    while True:
        counts = [await a.metric("ember_event_source_messages_total", outcome="acked") for a in acts]
        if sum(counts) >= want:
            return counts
        assert time.monotonic() < deadline, counts
        await asyncio.sleep(0.1)


async def _dead(js: Any, count: int) -> list[Any]:
    sub = await js.pull_subscribe("orders.dead", durable="test-reader", stream="DEAD")
    out: list[Any] = []
    deadline = time.monotonic() + 60
    while len(out) < count and time.monotonic() < deadline:
        try:
            out += await sub.fetch(batch=count - len(out), timeout=1)
        except TimeoutError:  # nats.errors.TimeoutError, or a plain one from deeper in fetch
            continue
    return out


async def test_partial_failures_and_poison_end_in_the_dead_letter_subject(server: NatsServer, js: Any) -> None:
    for n in range(9):
        await js.publish("orders.new", json.dumps({"n": n, "failTimes": 99 if n % 3 == 0 else 0}).encode())
    await js.publish("orders.new", b"{not json", headers={"trace": "t-1"})
    async with run_activator(credentials=_secrets(server)) as act:
        source = {**SOURCE, "batchSize": 3, "maxRetries": 1}
        act.registry.apply(function("worker", PARTIAL, eventSources=[source]))
        await _acked([act], 6)
        dead = await _dead(js, 4)
        reasons = sorted(m.headers["Ember-Reason"] for m in dead)
        assert (
            reasons == ["body is not JSON"] + ["retries exhausted after 2 attempts (listed in batchItemFailures)"] * 3
        )
        poison = next(m for m in dead if m.headers["Ember-Reason"] == "body is not JSON")
        assert (poison.data, poison.headers["trace"], poison.headers["Ember-Subject"]) == (
            b"{not json",
            "t-1",
            "orders.new",
        )
        failed = sorted(json.loads(m.data)["n"] for m in dead if m is not poison)
        assert failed == [0, 3, 6]
        await asyncio.sleep(1.5)  # nothing comes back: acked, and term'ed dead letters
        assert await act.metric("ember_event_source_messages_total", outcome="acked") == 6
        assert await act.metric("ember_event_source_messages_total", outcome="retried") == 3
        info = await js.consumer_info("ORDERS", "ember-default-worker")
        assert (info.num_pending, info.num_ack_pending) == (0, 0)


async def test_two_activators_share_the_durable_consumer_and_run_each_message_once(server: NatsServer, js: Any) -> None:
    for n in range(150):
        await js.publish("orders.new", json.dumps({"n": n}).encode())
    async with (
        run_activator(credentials=_secrets(server), holder="a") as a,
        run_activator(credentials=_secrets(server), holder="b") as b,
    ):
        for act in (a, b):
            act.registry.apply(function("worker", PARTIAL, eventSources=[{**SOURCE, "batchSize": 5}]))
        await _acked([a, b], 150)
        await asyncio.sleep(1.0)
        counts = [await x.metric("ember_event_source_messages_total", outcome="acked") for x in (a, b)]
        assert sum(counts) == 150, counts
        assert min(counts) > 0, counts


async def test_nats_killed_and_restarted_mid_stream_loses_nothing(server: NatsServer, js: Any) -> None:
    for n in range(60):
        await js.publish("orders.new", json.dumps({"n": n, "sleep": 0.2}).encode())
    async with run_activator(credentials=_secrets(server)) as act:
        act.registry.apply(function("worker", PARTIAL, eventSources=[{**SOURCE, "batchSize": 2}]))
        await _acked([act], 1)
        server.kill()  # SIGKILL mid-stream: JetStream's file store keeps what it acknowledged to publishers
        assert await act.metric("ember_event_source_messages_total", outcome="acked") < 60  # mid-stream indeed
        await asyncio.sleep(1.5)
        server.start()  # same port, same store directory
        again = await nats.connect(server.url)
        try:
            context = again.jetstream()
            for n in range(60, 80):
                await context.publish("orders.new", json.dumps({"n": n}).encode())
            deadline = time.monotonic() + 120
            while True:
                info = await context.consumer_info("ORDERS", "ember-default-worker")
                if info.num_pending == 0 and info.num_ack_pending == 0:
                    break
                assert time.monotonic() < deadline, f"not drained after the restart: {info}"
                await asyncio.sleep(0.2)
            assert (await context.stream_info("ORDERS")).state.messages == 80  # nothing published is gone
            # every message ran: its ack is what the consumer's floor counts (no gaps below it)
            assert info.ack_floor.stream_seq == 80
        finally:
            await again.close()
        # at least once: an ack lost in the kill runs its message again
        assert await act.metric("ember_event_source_messages_total", outcome="acked") >= 80
        assert await act.metric("ember_event_source_messages_total", outcome="dead_lettered") == 0
