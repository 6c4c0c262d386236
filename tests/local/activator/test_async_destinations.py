"""Stream destinations of asynchronous invocations, on a real redis-server, a real nats-server
with JetStream, a real activator and real sandboxed agents.

`onSuccess` to a Redis stream: each record is one entry (`body` the destination record's JSON,
`ember.id` its id) that another Function's event source then reads. `onFailure` to a JetStream
subject: the record of an event that exhausted its retries, with `Nats-Msg-Id`, so a record sent
again after a crash is stored once. A broker that cannot be reached drops the record after the
retry window, the event still finishes (its function runs once) and the drop is counted.
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
import redis.asyncio as aioredis
from tests.local.activator.helpers import function, run_activator
from tests.local.activator.test_async_invocations import FAILING, OK, _enqueue, _settled
from tests.local.sources.brokers import NatsServer, RedisServer, free_port, nats_server, redis_server

from ember.activator import async_invoke
from ember.activator.async_invoke import destination_id
from ember.pods.services import CredentialUnavailable
from ember.sources.publish import Publishers
from ember.sources.store import StoreError

pytestmark = [pytest.mark.timeout(240)]

COLLECT = "def handler(event, context):\n    return {'records': len(event['Records'])}\n"


@pytest.fixture
def brokers(tmp_path: Path) -> Iterator[tuple[RedisServer, NatsServer]]:
    with redis_server(tmp_path / "redis") as r, nats_server(tmp_path / "nats") as n:
        yield r, n


@pytest_asyncio.fixture
async def js(brokers: tuple[RedisServer, NatsServer]) -> AsyncIterator[Any]:
    nc = await nats.connect(brokers[1].url)
    context = nc.jetstream()
    await context.add_stream(name="FAILURES", subjects=["failures.>"])
    yield context
    await nc.close()


def _secrets(redis_url: str, nats_url: str) -> Any:
    urls = {"results": redis_url, "bus": nats_url}

    async def read(namespace: str, name: str, key: str) -> str:
        if namespace == "default" and key == "url" and name in urls:
            return urls[name]
        raise CredentialUnavailable(f"no Secret {namespace}/{name} key {key}")

    return read


def _to(kind: str, stream: str, secret: str) -> dict[str, Any]:
    return {"stream": stream, "type": kind, "connectionSecretRef": {"name": secret}}


async def test_records_go_to_a_redis_stream_and_a_jetstream_subject(
    brokers: tuple[RedisServer, NatsServer], js: Any
) -> None:
    r, n = brokers
    async with run_activator(credentials=_secrets(r.url, n.url)) as act:
        act.registry.apply(function("ok", OK, **{"async": {"onSuccess": _to("redis-stream", "results", "results")}}))
        on_failure = _to("nats-jetstream", "failures.flaky", "bus")
        act.registry.apply(function("flaky", FAILING, **{"async": {"maxRetries": 1, "onFailure": on_failure}}))
        source = {"name": "results", "type": "redis-stream", "connectionSecretRef": {"name": "results"}}
        source |= {"stream": "results", "batchSize": 10}
        act.registry.apply(function("collector", COLLECT, eventSources=[source]))
        ok_ids = [(await _enqueue(act, "ok", {"n": i}))[1]["requestId"] for i in range(3)]
        _, failing = await _enqueue(act, "flaky", {"n": 7})
        for rid in ok_ids:
            assert (await _settled(act, rid))["state"] == "succeeded"
        failed = await _settled(act, failing["requestId"])
        assert (failed["state"], failed["condition"], failed["attempts"]) == ("failed", "RetriesExhausted", 2)

        reader = aioredis.Redis.from_url(r.url)
        entries = await reader.xrange("results")
        await reader.aclose()
        by_id = {fields[b"ember.id"].decode(): json.loads(fields[b"body"]) for _, fields in entries}
        assert set(by_id) == {destination_id(rid, "onSuccess") for rid in ok_ids}
        record = by_id[destination_id(ok_ids[2], "onSuccess")]
        assert record["requestContext"]["condition"] == "Success"
        assert (record["requestPayload"], record["responsePayload"]) == ({"n": 2}, {"doubled": 4})

        sub = await js.pull_subscribe("failures.flaky", durable="test", stream="FAILURES")
        [message] = await sub.fetch(batch=1, timeout=10)
        assert message.headers["Nats-Msg-Id"] == destination_id(failing["requestId"], "onFailure")
        record = json.loads(message.data)
        assert record["requestContext"]["condition"] == "RetriesExhausted"
        assert record["requestContext"]["approximateInvokeCount"] == 2
        assert record["responsePayload"]["errorMessage"] == "always 7"

        # the Redis stream feeds another Function: the records arrive as an event source's messages
        deadline = time.monotonic() + 60
        while await act.metric("ember_event_source_messages_total", function="default/collector", outcome="acked") < 3:
            assert time.monotonic() < deadline, "the collector did not get the three records"
            await asyncio.sleep(0.1)
        assert await act.metric("ember_async_destination_records_total", function="default/ok", outcome="sent") == 3
        assert await act.metric("ember_async_destination_records_total", outcome="failed") == 0


async def test_a_record_sent_again_is_stored_once_by_jetstream(
    brokers: tuple[RedisServer, NatsServer], js: Any
) -> None:
    publishers = Publishers()
    try:
        for _ in range(3):  # as after a crash between the send and the event's ack
            await publishers.publish("nats-jetstream", brokers[1].url, "failures.x", b'{"a": 1}', "record-1")
        await publishers.publish("nats-jetstream", brokers[1].url, "failures.x", b'{"a": 2}', "record-2")
    finally:
        await publishers.close()
    info = await js.stream_info("FAILURES")
    assert info.state.messages == 2


async def test_bad_destinations_raise_errors_naming_the_stream_and_broker(
    brokers: tuple[RedisServer, NatsServer], js: Any
) -> None:
    publishers = Publishers()
    try:
        with pytest.raises(StoreError, match=r"'nowhere\.x'.*no JetStream stream holds this subject"):
            await publishers.publish("nats-jetstream", brokers[1].url, "nowhere.x", b"{}", "id-1")
        dead = f"redis://:secret@127.0.0.1:{free_port()}/0"
        with pytest.raises(StoreError, match=r"redis stream 'results' at redis://:\*\*\*@127\.0\.0\.1"):
            await publishers.publish("redis-stream", dead, "results", b"{}", "id-2")
        with pytest.raises(StoreError, match="results"):
            await publishers.publish("redis-stream", "http://not-redis", "results", b"{}", "id-3")
    finally:
        await publishers.close()


async def test_an_unreachable_broker_drops_the_record_and_the_event_still_finishes(
    brokers: tuple[RedisServer, NatsServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(async_invoke, "DESTINATION_RETRY_S", 1.5)
    dead = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    async with run_activator(credentials=_secrets(dead, brokers[1].url)) as act:
        act.registry.apply(function("ok", OK, **{"async": {"onSuccess": _to("redis-stream", "results", "results")}}))
        _, body = await _enqueue(act, "ok", {"n": 5})
        done = await _settled(act, body["requestId"])
        assert (done["state"], done["attempts"], done["result"]) == ("succeeded", 1, {"doubled": 10})
        assert await act.metric("ember_async_destination_records_total", function="default/ok", outcome="failed") == 1
        await asyncio.sleep(0.5)
        assert await act.metric("ember_invocations_total", function="default/ok") == 1  # not run again for it
