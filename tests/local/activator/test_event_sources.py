"""Redis Streams event sources end to end: a real redis-server, a real activator, real sandboxed agents.

Messages are added with a plain Redis client as a producer would; the Function sees SQS-shaped
`Records`. Checked: batches and partial batch failure (only the items named in
`batchItemFailures` come back, each up to maxRetries times, then to the dead-letter stream with
the reason); poison messages (no body, not JSON, over the size limit) dead-lettered without
stalling the source; rate matching (a slow Function with maxScale 2 never has more than 2
invocations running or queued while a backlog of 10,000 drains); two activators sharing the group run
each message once; Redis SIGKILLed and restarted mid-stream loses nothing; a disabled source
reads nothing.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from tests.local.activator.helpers import FAST, Activator, function, run_activator
from tests.local.sources.brokers import RedisServer, redis_server

from ember.pods.services import CredentialUnavailable

pytestmark = [pytest.mark.timeout(240)]

# Fails an item while its ApproximateReceiveCount is at most its "failTimes": the deliveries are
# then known in advance, and the test can tell a whole batch retried from only its failed items.
PARTIAL = """
import json, time

def handler(event, context):
    failures = []
    for record in event["Records"]:
        body = json.loads(record["body"])
        time.sleep(body.get("sleep", 0))
        if int(record["attributes"]["ApproximateReceiveCount"]) <= body.get("failTimes", 0):
            failures.append({"itemIdentifier": record["messageId"]})
    return {"batchItemFailures": failures}
"""


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis") as server:
        yield server


def _secrets(server: RedisServer) -> Callable[[str, str, str], Any]:
    async def read(namespace: str, name: str, key: str) -> str:
        if (namespace, name, key) == ("default", "queue", "url"):
            return server.url
        raise CredentialUnavailable(f"no Secret {namespace}/{name} key {key}")

    return read


def _source(**overrides: Any) -> dict[str, Any]:
    return {
        "name": "jobs",
        "type": "redis-stream",
        "connectionSecretRef": {"name": "queue"},
        "stream": "jobs",
        "deadLetterStream": "jobs-dead",
        **overrides,
    }


@pytest_asyncio.fixture
async def producer(redis: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis.url)
    yield client
    await client.aclose()


async def _until(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what} within {timeout_s} s"
        await asyncio.sleep(0.1)


async def _settled(act: Activator, producer: aioredis.Redis, total: int) -> None:
    """Every message acked or dead-lettered, nothing pending."""

    async def done() -> bool:
        counted = 0.0
        for outcome in ("acked", "dead_lettered", "dropped"):
            counted += await act.metric("ember_event_source_messages_total", outcome=outcome)
        groups = await producer.xinfo_groups("jobs")
        pending = sum(int(g["pending"]) + int(g.get("lag") or 0) for g in groups)
        return counted >= total and pending == 0

    await _until(done, 120, f"all {total} messages settled")


def _dead(entries: list[Any]) -> dict[str, dict[str, str]]:
    return {f[b"ember.id"].decode(): {k.decode(): v.decode(errors="replace") for k, v in f.items()} for _, f in entries}


async def test_partial_batch_failure_retries_only_the_failed_items(redis: RedisServer, producer: Any) -> None:
    ids = {}
    plan = {"ok": 0, "once": 1, "never": 99}
    for n in range(12):
        kind = list(plan)[n % 3]
        body = json.dumps({"n": n, "failTimes": plan[kind]})
        ids[n] = (await producer.xadd("jobs", {"body": body})).decode()
    source = _source(batchSize=6, batchWindowMs=200, maxRetries=2)
    async with run_activator(credentials=_secrets(redis)) as act:
        act.registry.apply(function("worker", PARTIAL, eventSources=[source]))
        await _settled(act, producer, 12)
        dead = _dead(await producer.xrange("jobs-dead"))
        never = {ids[n] for n in range(12) if n % 3 == 2}
        assert set(dead) == never
        for entry in dead.values():
            assert entry["ember.reason"] == "retries exhausted after 3 attempts (listed in batchItemFailures)"
            assert (entry["ember.deliveries"], entry["ember.stream"]) == ("3", "jobs")
            assert json.loads(entry["body"])["failTimes"] == 99  # the message itself is kept
        assert await act.metric("ember_event_source_messages_total", outcome="acked") == 8
        # once: 1 retry each (4); never: 2 retries each (8). A whole batch retried would count more.
        assert await act.metric("ember_event_source_messages_total", outcome="retried") == 12


async def test_poison_messages_are_dead_lettered_with_a_reason_and_do_not_stall(
    redis: RedisServer, producer: Any
) -> None:
    config = dataclasses.replace(FAST, max_body_bytes=1024)
    poison = {
        "no body": {"payload": "x"},
        "not json": {"body": "{not json"},
        "too big": {"body": json.dumps({"pad": "x" * 2048})},
    }
    ids = {why: (await producer.xadd("jobs", fields)).decode() for why, fields in poison.items()}
    good = [(await producer.xadd("jobs", {"body": json.dumps({"n": n})})).decode() for n in range(3)]
    async with run_activator(config, credentials=_secrets(redis)) as act:
        act.registry.apply(function("worker", PARTIAL, eventSources=[_source(batchSize=2)]))
        await _settled(act, producer, 6)
        dead = _dead(await producer.xrange("jobs-dead"))
        assert dead[ids["no body"]]["ember.reason"] == "no body field (fields: payload)"
        assert dead[ids["not json"]]["ember.reason"] == "body is not JSON"
        assert dead[ids["too big"]]["ember.reason"].endswith("bytes is over the limit of 1024")
        assert not set(good) & set(dead)
        assert await act.metric("ember_event_source_messages_total", outcome="acked") == 3


async def test_a_backlog_drains_at_the_rate_the_function_can_take(redis: RedisServer, producer: Any) -> None:
    """maxScale 2, concurrency 1: never more than 2 invocations running or queued on the Version,
    while 10,000 messages wait in Redis and drain (batches of 10, 10 ms each)."""
    total = 10_000
    async with producer.pipeline(transaction=False) as pipe:
        for n in range(total):
            pipe.xadd("jobs", {"body": json.dumps({"n": n, "sleep": 0.001})})
        await pipe.execute()
    async with run_activator(credentials=_secrets(redis)) as act:
        source = _source(batchSize=10)
        act.registry.apply(function("worker", PARTIAL, scaling={"maxScale": 2}, eventSources=[source]))
        most = 0
        deadline = time.monotonic() + 180
        while await act.metric("ember_event_source_messages_total", outcome="acked") < total:
            assert time.monotonic() < deadline, "the backlog did not drain"
            fs = act.registry.get("default", "worker")
            most = max(most, sum(vs.in_flight + vs.queued for vs in fs.versions.values()))
            await asyncio.sleep(0.005)
        assert 1 <= most <= 2, most
        groups = await producer.xinfo_groups("jobs")
        assert [(g["name"], int(g["pending"]), int(g["lag"])) for g in groups] == [(b"ember-default-worker", 0, 0)]


async def test_two_activators_share_the_group_and_run_each_message_once(redis: RedisServer, producer: Any) -> None:
    async with producer.pipeline(transaction=False) as pipe:
        for n in range(200):
            pipe.xadd("jobs", {"body": json.dumps({"n": n})})
        await pipe.execute()
    async with (
        run_activator(credentials=_secrets(redis), holder="a") as a,
        run_activator(credentials=_secrets(redis), holder="b") as b,
    ):
        for act in (a, b):
            act.registry.apply(function("worker", PARTIAL, eventSources=[_source(batchSize=5)]))

        async def all_acked() -> bool:
            counts = [await act.metric("ember_event_source_messages_total", outcome="acked") for act in (a, b)]
            return sum(counts) >= 200

        await _until(all_acked, 120, "200 messages acked")
        counts = [await act.metric("ember_event_source_messages_total", outcome="acked") for act in (a, b)]
        assert sum(counts) == 200, counts  # none twice
        assert min(counts) > 0, counts  # both consumers took a share
        consumers = await producer.xinfo_consumers("jobs", "ember-default-worker")
        assert sorted(c["name"] for c in consumers) == [b"a", b"b"]


async def test_redis_killed_and_restarted_mid_stream_loses_nothing(redis: RedisServer, producer: Any) -> None:
    for n in range(60):
        await producer.xadd("jobs", {"body": json.dumps({"n": n, "sleep": 0.05})})
    async with run_activator(credentials=_secrets(redis)) as act:
        act.registry.apply(function("worker", PARTIAL, eventSources=[_source(batchSize=2)]))
        await _until(
            lambda: act.metric("ember_event_source_messages_total", outcome="acked"), 60, "a first message acked"
        )
        redis.kill()  # SIGKILL mid-stream: what it answered is on its disk (appendfsync always)
        await asyncio.sleep(1.5)
        redis.start()
        async with aioredis.Redis.from_url(redis.url) as again:
            for n in range(60, 80):
                await again.xadd("jobs", {"body": json.dumps({"n": n})})

            async def drained() -> bool:
                groups = await again.xinfo_groups("jobs")
                return bool(groups) and int(groups[0]["pending"]) == 0 and int(groups[0]["lag"] or 0) == 0

            await _until(drained, 120, "the stream drained after the restart")
            assert await again.xlen("jobs") == 80  # nothing the producer was told was added is gone
        # at least once: an ack lost in the kill runs its message again
        assert await act.metric("ember_event_source_messages_total", outcome="acked") >= 80


async def test_a_disabled_source_reads_nothing(redis: RedisServer, producer: Any) -> None:
    await producer.xadd("jobs", {"body": "{}"})
    async with run_activator(credentials=_secrets(redis)) as act:
        act.registry.apply(function("worker", PARTIAL, eventSources=[_source(enabled=False)]))
        await asyncio.sleep(2.5)
        assert await act.metric("ember_event_source_messages_total") == 0
        assert await producer.exists("jobs") == 1
        assert await producer.xinfo_groups("jobs") == []  # never even joined
        act.registry.apply(function("worker", PARTIAL, eventSources=[_source(enabled=True)]))
        await _until(
            lambda: act.metric("ember_event_source_messages_total", outcome="acked"), 60, "the message once enabled"
        )


def test_ember_dev_consumes_a_stream_named_by_a_secret_manifest(redis: RedisServer, tmp_path: Path) -> None:
    """Local mode as a user runs it: the connection URL in a Secret manifest beside the Function."""
    import redis as sync_redis
    from tests.local.activator.test_devmode import dev_in

    code = "\n".join("      " + line for line in PARTIAL.strip().splitlines())
    (tmp_path / "worker.yaml").write_text(
        "apiVersion: ember.run/v1alpha1\nkind: Function\nmetadata: {name: worker}\nspec:\n"
        "  runtime: python3.12\n  handler: main.handler\n"
        "  eventSources: [{name: jobs, type: redis-stream, connectionSecretRef: {name: queue}, stream: jobs}]\n"
        f"  code:\n    inline: |\n{code}\n"
        f"---\napiVersion: v1\nkind: Secret\nmetadata: {{name: queue}}\nstringData: {{url: '{redis.url}'}}\n"
    )
    client = sync_redis.Redis.from_url(redis.url)
    for n in range(5):
        client.xadd("jobs", {"body": json.dumps({"n": n})})
    runs = dev_in(tmp_path)
    dev = next(runs)
    try:
        dev.wait_for(r"event source jobs: redis-stream jobs")
        deadline = time.monotonic() + 60
        while True:
            groups = client.xinfo_groups("jobs")
            if groups and int(groups[0]["pending"]) == 0 and int(groups[0]["lag"] or 0) == 0:
                break
            assert time.monotonic() < deadline, groups
            time.sleep(0.2)
        assert groups[0]["name"] == b"ember-default-worker"
    finally:
        runs.close()
        client.close()
