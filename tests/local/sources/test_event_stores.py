"""Both event stores against their real backends: a SQLite file, and a real `redis-server`.

The same contract for each: put is durable and idempotent, lease hands an event to one holder,
an expired lease is taken over (a dead worker's events run again), retry_later parks an event
until it is due, ack and dead_letter remove it and keep the status; a store reopened (SQLite) or
a server killed with SIGKILL and restarted (Redis) still has every event it acknowledged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from tests.local.sources.brokers import RedisServer, free_port, redis_server

from ember.sources.redis_streams import RedisStore
from ember.sources.sqlite import SqliteStore
from ember.sources.store import Event, EventStore, State, Status, StoreError, redacted

pytestmark = pytest.mark.timeout(120)


def _event(i: int, **kw: object) -> Event:
    return Event(f"id-{i}", "default", "fn", None, b'{"n": %d}' % i, time.time(), **kw)  # type: ignore[arg-type]


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis") as server:
        yield server


@pytest.fixture(params=["sqlite", "redis"])
def kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


Opener = Callable[[], Awaitable[EventStore]]


@pytest_asyncio.fixture
async def opener(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Opener]:
    """Opens stores over one backend: for Redis each is a replica of its own; SQLite belongs to one
    process, so its opener gives that one store every time."""
    opened: list[EventStore] = []

    async def new() -> EventStore:
        if kind == "sqlite" and opened:
            return opened[0]
        if kind == "redis":
            server: RedisServer = request.getfixturevalue("redis")
            store: EventStore = RedisStore(server.url, "default", block_ms=10)
        else:
            store = SqliteStore(tmp_path / "state" / "async.db")
        await store.start()
        opened.append(store)
        return store

    yield new
    for store in opened:
        await store.close()


async def _lease_all(store: EventStore, holder: str, lease_s: float = 30.0, want: int = 1) -> list[Event]:
    out: list[Event] = []
    deadline = time.monotonic() + 10
    while len(out) < want and time.monotonic() < deadline:
        out += await store.lease(holder, 100, lease_s)
        if len(out) < want:
            await asyncio.sleep(0.02)
    return out


async def test_put_lease_ack_keeps_the_status(opener: Opener) -> None:
    store = await opener()
    assert await store.put(_event(1)) == "id-1"
    assert (await store.status("id-1")).state is State.QUEUED  # type: ignore[union-attr]
    assert await store.depth() == 1
    (event,) = await _lease_all(store, "a")
    assert (event.id, event.body, event.namespace, event.function) == ("id-1", b'{"n": 1}', "default", "fn")
    assert await store.lease("b", 10, 30.0) == []  # held by a
    done = Status("id-1", State.SUCCEEDED, "default/fn", event.enqueued_at, time.time(), version=3, result={"ok": 1})
    await store.ack(event, done)
    assert await store.depth() == 0
    status = await store.status("id-1")
    assert status is not None
    assert (status.state, status.version, status.result) == (State.SUCCEEDED, 3, {"ok": 1})
    assert await store.status("never") is None


async def test_idempotency_key_and_request_id_store_an_event_once(opener: Opener) -> None:
    store = await opener()
    first = await asyncio.gather(*(store.put(_event(i), idempotency_key="order-7") for i in range(5)))
    assert len(set(first)) == 1, first  # concurrent puts with one key: one event, every caller told its id
    assert await store.put(_event(9), idempotency_key="order-7") == first[0]
    assert await store.put(_event(9), idempotency_key="order-8") == "id-9"
    assert await store.put(_event(9)) == "id-9"  # the same request id again: the same event
    assert await store.depth() == 2


async def test_an_expired_lease_is_taken_over(opener: Opener) -> None:
    store, other = await opener(), await opener()
    await store.put(_event(1))
    (held,) = await _lease_all(store, "dead-worker", lease_s=0.3)
    await asyncio.sleep(0.5)  # the holder died: no extend
    (taken,) = await _lease_all(other, "live-worker", lease_s=0.3)  # every holder leases for as long
    assert taken.id == held.id


async def test_extend_keeps_the_lease(opener: Opener) -> None:
    store = await opener()
    await store.put(_event(1))
    (held,) = await _lease_all(store, "a", lease_s=0.4)
    for _ in range(4):
        await asyncio.sleep(0.2)
        await store.extend("a", [held], 0.4)
    assert await store.lease("b", 10, 0.4) == []


async def test_retry_later_parks_the_event_until_due(opener: Opener) -> None:
    store = await opener()
    await store.put(_event(1))
    (event,) = await _lease_all(store, "a")
    event.attempts, event.retries, event.not_before = 1, 1, time.time() + 0.5
    retrying = Status("id-1", State.RETRYING, "default/fn", event.enqueued_at, time.time(), attempts=1)
    await store.retry_later(event, retrying)
    assert await store.lease("a", 10, 30.0) == []
    assert (await store.status("id-1")).state is State.RETRYING  # type: ignore[union-attr]
    assert await store.depth() == 1
    await asyncio.sleep(0.6)
    (again,) = await _lease_all(store, "b")
    assert (again.id, again.attempts, again.retries, again.body) == ("id-1", 1, 1, b'{"n": 1}')


async def test_parked_events_wait_until_unparked_first_parked_first(opener: Opener) -> None:
    store, other = await opener(), await opener()
    for i in range(5):
        await store.put(_event(i))
    await store.put(Event("other-1", "default", "other", None, b"{}", time.time()))
    leased = await _lease_all(store, "a", want=6)
    slow = sorted((e for e in leased if e.function == "fn"), key=lambda e: e.id)
    await store.park(slow)
    assert await store.parked() == {"default/fn": 5}
    assert await store.depth() == 6  # parked events still count
    await asyncio.sleep(0.1)
    # parked: leased by nobody, not even once the lease time is over (as it is for other-1)
    assert [e.id for e in await other.lease("b", 10, 0.05)] in ([], ["other-1"])
    assert (await store.status("id-0")).state is State.QUEUED  # type: ignore[union-attr]
    assert await other.unpark("default/fn", 2) == 2
    assert sorted(e.id for e in await _lease_all(other, "b", want=2)) == ["id-0", "id-1"]
    assert await store.parked() == {"default/fn": 3}
    assert await store.unpark("default/fn", 10) == 3
    assert await store.parked() == {}
    assert await store.unpark("default/fn", 10) == 0
    assert sorted(e.id for e in await _lease_all(store, "c", want=3)) == ["id-2", "id-3", "id-4"]


async def test_sqlite_parks_the_rest_of_a_functions_backlog_at_once(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "async.db")
    await store.start()
    try:
        for i in range(5):
            await store.put(_event(i))
        await store.put(Event("other-1", "default", "other", None, b"{}", time.time()))
        first, running = sorted(
            (e for e in await store.lease("a", 10, 30.0) if e.function == "fn"), key=lambda e: e.id
        )[:2]
        await store.park([first])  # id-1 stays held by a; id-2..4 are leased too, so only the held ones stay out
        assert await store.parked() == {"default/fn": 1}
        await store.put(_event(7))
        await store.put(_event(8))
        await store.park([running])  # the due ones nobody holds go with it: id-7 and id-8
        assert await store.parked() == {"default/fn": 4}
        assert [e.id for e in await store.lease("b", 10, 30.0)] == []  # other-1 is held by a, fn's are parked
    finally:
        await store.close()


async def test_dead_letters_keep_event_and_reason(opener: Opener) -> None:
    store = await opener()
    await store.put(_event(1))
    (event,) = await _lease_all(store, "a")
    failed = Status("id-1", State.FAILED, "default/fn", event.enqueued_at, time.time(), condition="RetriesExhausted")
    await store.dead_letter(event, failed)
    assert await store.depth() == 0
    ((dead, why),) = await store.dead_letters()  # type: ignore[attr-defined]
    assert (dead.id, dead.body, why.condition) == ("id-1", b'{"n": 1}', "RetriesExhausted")


async def test_many_concurrent_puts_are_each_stored_once_and_leased_once(opener: Opener) -> None:
    a, b = await opener(), await opener()
    ids = await asyncio.gather(*(a.put(_event(i)) for i in range(500)))
    assert sorted(ids) == sorted(f"id-{i}" for i in range(500))
    seen: list[str] = []
    while len(seen) < 500:
        for store, holder in ((a, "a"), (b, "b")):
            for event in await store.lease(holder, 37, 30.0):
                seen.append(event.id)
                await store.ack(event, Status(event.id, State.SUCCEEDED, "default/fn", 0.0, time.time()))
    assert sorted(seen) == sorted(ids)  # none twice, none lost


async def test_sqlite_survives_a_reopen_and_frees_a_dead_processes_leases(tmp_path: Path) -> None:
    path = tmp_path / "async.db"
    store = SqliteStore(path)
    await store.start()
    await asyncio.gather(*(store.put(_event(i)) for i in range(50)))
    await store.lease("old-process", 10, 3600.0)  # held "forever" by a process that is about to go
    await store.close()
    reopened = SqliteStore(path)
    await reopened.start()
    try:
        assert len(await reopened.lease("new-process", 100, 30.0)) == 50
    finally:
        await reopened.close()


async def test_sqlite_refuses_a_second_process_on_the_same_file(tmp_path: Path) -> None:
    first = SqliteStore(tmp_path / "async.db")
    await first.start()
    try:
        with pytest.raises(StoreError, match=r"in use by another process .*--state-dir"):
            await SqliteStore(tmp_path / "async.db").start()
    finally:
        await first.close()


async def test_sqlite_names_a_folder_it_cannot_create(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StoreError, match=r"cannot open the event store .*file/async.db"):
        await SqliteStore(tmp_path / "file" / "async.db").start()


async def test_redis_keeps_every_acknowledged_put_through_a_sigkill(redis: RedisServer) -> None:
    store = RedisStore(redis.url, "default", block_ms=10)
    await store.start()
    try:
        await asyncio.gather(*(store.put(_event(i)) for i in range(300)))
        redis.kill()  # SIGKILL right after the replies: appendfsync always wrote them first
        with pytest.raises(StoreError, match=r"redis redis://127\.0\.0\.1"):
            await store.put(_event(999))
        redis.start()
        events = await _lease_all(store, "a", want=300)
        assert sorted(e.id for e in events) == sorted(f"id-{i}" for i in range(300))
    finally:
        await store.close()


async def test_redis_not_up_yet_fails_puts_clearly_and_works_once_it_is(tmp_path: Path) -> None:
    """A fresh install starts the activators and Redis together: the store opens anyway, puts
    fail naming the store (without its password), and everything works once Redis answers."""
    server = RedisServer(free_port(), tmp_path / "late", password="secret")
    store = RedisStore(server.url, "default", block_ms=10)
    await store.start()
    try:
        with pytest.raises(StoreError, match=r"redis redis://:\*\*\*@127\.0\.0\.1:\d+/0") as caught:
            await store.put(_event(1))
        assert "secret" not in str(caught.value)
        with pytest.raises(StoreError, match="not reachable"):
            await store.lease("a", 1, 30.0)
        server.start()
        assert await store.put(_event(1)) == "id-1"
        assert [e.id for e in await _lease_all(store, "a")] == ["id-1"]
    finally:
        await store.close()
        server.kill()
    assert "secret" not in redacted("redis://u:secret@h:1/0")


async def test_a_bad_redis_url_is_refused_at_start() -> None:
    with pytest.raises(StoreError, match="cannot open the event store redis redis://h:port"):
        await RedisStore("redis://h:port/0", "default").start()
