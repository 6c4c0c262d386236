"""Both key-value stores against their real backends: a SQLite file, and a real `redis-server`.

The same behaviour of each: get / put / delete, compare_and_set on canonical JSON (and on an
absent key), the expiry rules of runtime-images/CONTRACT.md, incr on integers only, scopes kept
apart, and no update lost under concurrent incr and read / compare_and_set / retry loops; for
Redis also across two stores (two activator replicas) on one server, and a Redis that is down
failing clearly without its password. The HTTP checks are tests/unit/state.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from tests.local.sources.brokers import RedisServer, free_port, redis_server

from ember.state.http import MAX_VALUE_BYTES, canonical
from ember.state.redis import RedisKeyValueStore
from ember.state.sqlite import SWEEP_EVERY_S, SqliteKeyValueStore
from ember.state.store import KeyValueStore, NotAnInteger, StateError, StoreUnavailable

pytestmark = pytest.mark.timeout(60)

SCOPE = "team-a/counter"


def enc(value: object) -> bytes:
    """A value as the handler hands it to a store."""
    return canonical(value, "value", MAX_VALUE_BYTES)


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    with redis_server(tmp_path / "redis") as server:
        yield server


Opener = Callable[[], Awaitable[KeyValueStore]]


@pytest_asyncio.fixture(params=["sqlite", "redis"])
async def opener(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Opener]:
    """Opens stores over one backend: for Redis each is a replica of its own; SQLite belongs to
    one process, so its opener gives that one store every time."""
    opened: list[KeyValueStore] = []

    async def new() -> KeyValueStore:
        if request.param == "sqlite" and opened:
            return opened[0]
        if request.param == "redis":
            server: RedisServer = request.getfixturevalue("redis")
            store: KeyValueStore = RedisKeyValueStore(server.url)
        else:
            store = SqliteKeyValueStore(tmp_path / "state" / "state.db")
        await store.start()
        opened.append(store)
        return store

    yield new
    for store in opened:
        await store.close()


@pytest_asyncio.fixture
async def store(opener: Opener) -> KeyValueStore:
    return await opener()


async def test_put_get_delete(store: KeyValueStore) -> None:
    assert await store.get(SCOPE, "k") is None
    await store.put(SCOPE, "k", enc({"a": [1, "é"]}), None)
    assert json.loads(await store.get(SCOPE, "k") or b"") == {"a": [1, "é"]}
    await store.put(SCOPE, "k", enc(2), None)
    assert await store.get(SCOPE, "k") == b"2"
    assert await store.delete(SCOPE, "k") is True
    assert await store.delete(SCOPE, "k") is False
    assert await store.get(SCOPE, "k") is None
    await store.put(SCOPE, "🔑 with spaces: and {braces}", enc("x"), None)
    assert await store.get(SCOPE, "🔑 with spaces: and {braces}") == b'"x"'


async def test_compare_and_set_compares_json_values(store: KeyValueStore) -> None:
    await store.put(SCOPE, "k", enc({"a": 1, "b": 2}), None)
    assert await store.compare_and_set(SCOPE, "k", enc({"b": 2, "a": 1}), enc("new"), None) == (True, b'"new"')
    assert await store.compare_and_set(SCOPE, "k", enc({"b": 2, "a": 1}), enc("newer"), None) == (False, b'"new"')
    assert await store.get(SCOPE, "k") == b'"new"'


async def test_compare_and_set_with_no_expected_value_needs_an_absent_key(store: KeyValueStore) -> None:
    assert await store.compare_and_set(SCOPE, "k", None, enc(1), None) == (True, b"1")
    assert await store.compare_and_set(SCOPE, "k", None, enc(2), None) == (False, b"1")
    assert await store.compare_and_set(SCOPE, "gone", enc(1), enc(2), None) == (False, None)


async def test_expiry_follows_the_contract(store: KeyValueStore) -> None:
    """put and a successful compare_and_set replace the expiry; incr with a ttl sets it again,
    without one keeps it; an expired key is absent for every operation."""
    await store.put(SCOPE, "put-ttl", enc(1), 1)
    await store.put(SCOPE, "put-again", enc(1), 1)
    await store.put(SCOPE, "put-again", enc(2), None)  # never expires now
    assert await store.incr(SCOPE, "incr-ttl", 1, 1) == 1
    await store.put(SCOPE, "incr-keeps", enc(5), 1)
    assert await store.incr(SCOPE, "incr-keeps", 1, None) == 6  # keeps the 1 s
    await store.put(SCOPE, "incr-resets", enc(5), 1)
    assert await store.incr(SCOPE, "incr-resets", 1, 3600) == 6
    assert await store.incr(SCOPE, "incr-none", 1, None) == 1
    assert await store.compare_and_set(SCOPE, "cas-ttl", None, enc("a"), 1) == (True, b'"a"')
    await store.put(SCOPE, "cas-clears", enc("a"), 1)
    assert (await store.compare_and_set(SCOPE, "cas-clears", enc("a"), enc("b"), None))[0]
    await store.put(SCOPE, "cas-failed", enc("a"), 1)
    assert not (await store.compare_and_set(SCOPE, "cas-failed", enc("x"), enc("b"), None))[0]
    for key in ["incr-later", "delete-later", "cas-later", "cas-absent-later"]:
        await store.put(SCOPE, key, enc(7), 1)
    await asyncio.sleep(1.2)
    kept = ["put-ttl", "put-again", "incr-ttl", "incr-keeps", "incr-resets", "incr-none", "cas-ttl", "cas-clears"]
    live = {key: await store.get(SCOPE, key) for key in [*kept, "cas-failed"]}
    assert live == {
        "put-ttl": None,
        "put-again": b"2",
        "incr-ttl": None,
        "incr-keeps": None,
        "incr-resets": b"6",
        "incr-none": b"1",
        "cas-ttl": None,
        "cas-clears": b'"b"',
        "cas-failed": None,
    }
    assert await store.incr(SCOPE, "incr-later", 1, None) == 1  # from 0, and with no expiry
    assert await store.delete(SCOPE, "delete-later") is False
    assert await store.compare_and_set(SCOPE, "cas-later", enc(7), enc(8), None) == (False, None)
    assert await store.compare_and_set(SCOPE, "cas-absent-later", None, enc(8), None) == (True, b"8")


async def test_incr_counts_from_zero_and_refuses_what_is_not_an_integer(store: KeyValueStore) -> None:
    assert await store.incr(SCOPE, "n", 1, None) == 1
    assert await store.incr(SCOPE, "n", -3, None) == -2
    assert await store.get(SCOPE, "n") == b"-2"
    await store.put(SCOPE, "big", enc(2**62), None)
    assert await store.incr(SCOPE, "big", 2**53, None) == 2**62 + 2**53  # exact beyond a double
    assert await store.incr(SCOPE, "big", 1, None) == 2**62 + 2**53 + 1
    for value in ["5", 1.5, 1.0, {"n": 1}, [1], True, 2**63]:
        await store.put(SCOPE, "k", enc(value), None)
        with pytest.raises(NotAnInteger, match=r"^state key 'k': its value is not an integer"):
            await store.incr(SCOPE, "k", 1, None)
        assert await store.get(SCOPE, "k") == enc(value)
    await store.put(SCOPE, "max", enc(2**63 - 1), None)
    with pytest.raises(NotAnInteger, match=r"^state key 'max': incr by 1 leaves the 64-bit integers$"):
        await store.incr(SCOPE, "max", 1, None)
    await store.put(SCOPE, "min", enc(-(2**63)), None)
    assert await store.incr(SCOPE, "min", 0, None) == -(2**63)


async def test_scopes_never_meet(store: KeyValueStore) -> None:
    await store.put("team-a/f", "k", enc("a"), None)
    await store.put("team-b/f", "k", enc("b"), None)
    await store.incr("team-a/g", "n", 5, None)
    assert await store.get("team-a/f", "k") == b'"a"'
    assert await store.get("team-b/f", "k") == b'"b"'
    assert await store.get("team-a/g", "k") is None
    assert await store.incr("team-b/g", "n", 1, None) == 1
    assert await store.delete("team-b/f", "k") is True
    assert await store.get("team-a/f", "k") == b'"a"'


async def test_a_thousand_concurrent_incrs_lose_none(store: KeyValueStore) -> None:
    results = await asyncio.gather(*(store.incr(SCOPE, "n", 1, None) for _ in range(1000)))
    assert sorted(results) == list(range(1, 1001))
    assert await store.get(SCOPE, "n") == b"1000"


async def _cas_increments(store: KeyValueStore, times: int) -> int:
    """Adds 1 `times` times by read / compare_and_set / retry; how many retries it took."""
    retries = 0
    for _ in range(times):
        current = await store.get(SCOPE, "c")
        while True:
            new = enc(0 if current is None else json.loads(current) + 1)
            await asyncio.sleep(0)  # let the others run between the read and the swap (SQLite never waits)
            swapped, current = await store.compare_and_set(SCOPE, "c", current, new, None)
            if swapped:
                break
            retries += 1
    return retries


async def test_compare_and_set_loops_under_contention_lose_no_update(store: KeyValueStore) -> None:
    await store.put(SCOPE, "c", enc(0), None)
    retries = await asyncio.gather(*(_cas_increments(store, 25) for _ in range(20)))
    assert await store.get(SCOPE, "c") == b"500"
    assert sum(retries) > 0  # they did contend


async def test_two_redis_stores_are_linearizable_on_one_key(redis: RedisServer) -> None:
    """Two activator replicas: each its own client, both at once on the same keys."""
    replicas = [RedisKeyValueStore(redis.url), RedisKeyValueStore(redis.url)]
    for replica in replicas:
        await replica.start()
    try:
        counts = await asyncio.gather(*(replicas[i % 2].incr(SCOPE, "n", 1, None) for i in range(1000)))
        assert sorted(counts) == list(range(1, 1001))
        await replicas[0].put(SCOPE, "c", enc(0), None)
        retries = await asyncio.gather(*(_cas_increments(replicas[i % 2], 25) for i in range(20)))
        assert await replicas[1].get(SCOPE, "c") == b"500"
        assert sum(retries) > 0  # the replicas did contend
        winners = await asyncio.gather(
            *(replicas[i % 2].compare_and_set(SCOPE, "once", None, enc(i), None) for i in range(50))
        )
        assert sum(swapped for swapped, _ in winners) == 1
        assert len({now for _, now in winners}) == 1  # every loser saw the winner's value
    finally:
        for replica in replicas:
            await replica.close()


async def test_a_redis_that_is_down_fails_naming_it_without_its_password(tmp_path: Path) -> None:
    down = RedisServer(free_port(), tmp_path / "down", password="s3cret-pw")
    store = RedisKeyValueStore(down.url)
    await store.start()
    try:
        for op in [
            store.get(SCOPE, "k"),
            store.put(SCOPE, "k", b"1", None),
            store.incr(SCOPE, "k", 1, None),
            store.compare_and_set(SCOPE, "k", None, b"1", 5),
        ]:
            with pytest.raises(StoreUnavailable) as caught:
                await op
            message = str(caught.value)
            assert f"the state store redis redis://:***@127.0.0.1:{down.port}/0 is not reachable" in message
            assert "may not have been applied" in message
            assert "s3cret-pw" not in message
    finally:
        await store.close()


async def test_a_bad_redis_url_is_refused_at_start() -> None:
    with pytest.raises(StateError, match="cannot open the state store redis redis://h:port"):
        await RedisKeyValueStore("redis://h:port/0").start()


async def test_sqlite_keeps_values_and_expiries_across_a_reopen(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    first = SqliteKeyValueStore(path)
    await first.start()
    await first.put(SCOPE, "kept", enc("v"), None)
    await first.put(SCOPE, "expiring", enc("v"), 3600)
    await first.close()
    later = SqliteKeyValueStore(path, clock=lambda: time.time() + 3601)
    await later.start()
    try:
        assert await later.get(SCOPE, "kept") == b'"v"'
        assert await later.get(SCOPE, "expiring") is None
    finally:
        await later.close()


async def test_sqlite_belongs_to_one_process(tmp_path: Path) -> None:
    path = tmp_path / "state.db"
    first = SqliteKeyValueStore(path)
    await first.start()
    try:
        with pytest.raises(StateError, match=f"the state store {path} is in use by another process"):
            await SqliteKeyValueStore(path).start()
    finally:
        await first.close()


async def test_sqlite_sweeps_expired_rows_a_batch_at_a_time(tmp_path: Path) -> None:
    now = [1_000_000.0]
    store = SqliteKeyValueStore(tmp_path / "state.db", clock=lambda: now[0])
    await store.start()
    try:
        for i in range(1200):
            await store.put(SCOPE, f"k{i}", b"1", 10)
        await store.put(SCOPE, "forever", b"1", None)
        now[0] += SWEEP_EVERY_S + 11
        rows = sqlite3.connect(tmp_path / "state.db")
        counted = []
        for _ in range(4):
            await store.put(SCOPE, "w", b"1", None)  # writes sweep (500 rows each while they find a full batch)
            counted.append(rows.execute("SELECT count(*) FROM kv").fetchone()[0])
        rows.close()
        assert counted == [702, 202, 2, 2]
        assert await store.get(SCOPE, "forever") == b"1"
    finally:
        await store.close()
