"""The key-value state handler (`ember.state.http.handle`) over a real aiohttp server on loopback:
every refusal of runtime-images/CONTRACT.md "Key-value state", with its status, type and
message, and the shape of each answer, over the SQLite store in a temporary folder.

What the stores do with what passes (expiry, atomicity, both stores alike) is
tests/local/state/test_stores.py; the token and `StateNotEnabled` checks are the services
proxy's (tests/local/security).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from ember.state.http import MAX_VALUE_BYTES, handle, open_store
from ember.state.redis import RedisKeyValueStore
from ember.state.sqlite import SqliteKeyValueStore
from ember.state.store import StateError

SCOPE = "team-a/counter"
LIMIT = MAX_VALUE_BYTES * 2 + 4096


@dataclass
class Answer:
    status: int
    doc: Any


@dataclass
class Client:
    session: aiohttp.ClientSession
    url: str

    async def raw(self, body: bytes, *, method: str = "POST", chunked: bool = False) -> Answer:
        data: Any = body
        if chunked:

            async def chunks() -> AsyncIterator[bytes]:
                for i in range(0, len(body), 65536):
                    yield body[i : i + 65536]

            data = chunks()
        async with self.session.request(method, self.url, data=data) as reply:
            return Answer(reply.status, await reply.json(content_type=None))

    async def op(self, doc: object) -> Answer:
        return await self.raw(json.dumps(doc).encode())


@contextlib.asynccontextmanager
async def serving(store: SqliteKeyValueStore) -> AsyncIterator[str]:
    async def route(request: web.Request) -> web.StreamResponse:
        return await handle(store, SCOPE, request)

    app = web.Application()
    app.router.add_route("*", "/state", route)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/state"
    finally:
        await runner.cleanup()


@pytest_asyncio.fixture
async def store(tmp_path: Path) -> AsyncIterator[SqliteKeyValueStore]:
    opened = SqliteKeyValueStore(tmp_path / "state.db")
    await opened.start()
    yield opened
    await opened.close()


@pytest_asyncio.fixture
async def client(store: SqliteKeyValueStore) -> AsyncIterator[Client]:
    async with serving(store) as url, aiohttp.ClientSession() as session:
        yield Client(session, url)


def refused(status: int, message: str, error_type: str = "InvalidStateRequest") -> Answer:
    return Answer(status, {"errorType": error_type, "errorMessage": message})


async def test_each_op_answers_as_the_contract_says(client: Client) -> None:
    assert await client.op({"op": "get", "key": "k"}) == Answer(200, {"found": False, "value": None})
    assert await client.op({"op": "put", "key": "k", "value": {"b": [1, "é"], "a": 2}}) == Answer(200, {})
    assert await client.op({"op": "get", "key": "k"}) == Answer(200, {"found": True, "value": {"a": 2, "b": [1, "é"]}})
    assert await client.op({"op": "incr", "key": "n"}) == Answer(200, {"value": 1})
    assert await client.op({"op": "incr", "key": "n", "by": -5, "ttl": 60}) == Answer(200, {"value": -4})
    assert await client.op({"op": "delete", "key": "n"}) == Answer(200, {"deleted": True})
    assert await client.op({"op": "delete", "key": "n"}) == Answer(200, {"deleted": False})


async def test_compare_and_set_compares_as_json_not_as_text(client: Client) -> None:
    await client.raw(b'{"op": "put", "key": "k", "value": {"a": 1, "b": 2}}')
    swap = b'{"op":"compare_and_set","key":"k","expected":{ "b" : 2 , "a" : 1 },"value":"new","ttl":null}'
    assert await client.raw(swap) == Answer(200, {"swapped": True, "value": "new"})
    assert await client.raw(swap) == Answer(200, {"swapped": False, "value": "new"})
    fresh = {"op": "compare_and_set", "key": "fresh", "expected": None, "value": 1}
    assert await client.op(fresh) == Answer(200, {"swapped": True, "value": 1})
    assert await client.op(fresh) == Answer(200, {"swapped": False, "value": 1})


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(b"{nope", "state request: not JSON (Expecting property name enclosed in double quotes", id="json"),
        pytest.param(b"", "state request: not JSON (Expecting value", id="empty"),
        pytest.param(b'["get", "k"]', "state request: an array, not a JSON object", id="array"),
        pytest.param(b'"get"', "state request: a string, not a JSON object", id="string"),
        pytest.param(b'{"op": "get", "key": "\xff"}', "state request: the body is not UTF-8", id="not-utf8"),
        pytest.param(b'{"op": "put", "key": "k", "value": NaN}', "state request: not JSON (NaN is not JSON)", id="nan"),
        pytest.param(
            b'{"op": "put", "key": "k", "value": -Infinity}',
            "state request: not JSON (-Infinity is not JSON)",
            id="inf",
        ),
        pytest.param(
            b'{"op": "put", "key": "k", "value": 1e400}',
            "state request: not JSON (1e400 is beyond a double)",
            id="1e400",
        ),
        pytest.param(
            b'{"op": "put", "key": "k", "value": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
            "state request: nested too deeply",
            id="deep",
        ),
    ],
)
async def test_a_body_that_is_not_a_json_object_is_refused(client: Client, body: bytes, message: str) -> None:
    answer = await client.raw(body)
    assert (answer.status, answer.doc["errorType"]) == (400, "InvalidStateRequest")
    assert answer.doc["errorMessage"].startswith(message), answer.doc["errorMessage"]


OPS = "one of get, put, delete, incr, compare_and_set"


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        pytest.param({"key": "k"}, f"state request: no op; {OPS}", id="no-op"),
        pytest.param({"op": None, "key": "k"}, f"state request: no op; {OPS}", id="null-op"),
        pytest.param({"op": "scan", "key": "k"}, f"state request: op 'scan' is unknown; {OPS}", id="unknown-op"),
        pytest.param({"op": 3, "key": "k"}, f"state request: op is a number (3), not a string; {OPS}", id="number-op"),
        pytest.param(
            {"op": "get", "key": "k", "default": 1},
            "state request: get takes no 'default'; it takes key, op",
            id="get-default",
        ),
        pytest.param(
            {"op": "put", "key": "k", "valeu": 1, "tll": 5},
            "state request: put takes no 'tll', 'valeu'; it takes key, op, ttl, value",
            id="put-typos",
        ),
        pytest.param(
            {"op": "delete", "key": "k", "ttl": 5},
            "state request: delete takes no 'ttl'; it takes key, op",
            id="delete-ttl",
        ),
        pytest.param(
            {"op": "incr", "key": "k", "value": 5},
            "state request: incr takes no 'value'; it takes by, key, op, ttl",
            id="incr-value",
        ),
        pytest.param({"op": "get"}, "state key: missing", id="no-key"),
        pytest.param({"op": "get", "key": None}, "state key: null, not a string", id="null-key"),
        pytest.param({"op": "get", "key": 7}, "state key: a number (7), not a string", id="number-key"),
        pytest.param({"op": "get", "key": ["k"]}, "state key: an array, not a string", id="array-key"),
        pytest.param({"op": "get", "key": ""}, "state key: empty; 1 to 512 bytes", id="empty-key"),
        pytest.param({"op": "get", "key": "é" * 300}, "state key: 600 bytes; at most 512", id="long-key"),
        pytest.param({"op": "get", "key": "\ud800"}, "state key: has a lone surrogate (not UTF-8)", id="surrogate-key"),
        pytest.param({"op": "put", "key": "k"}, "state value: missing", id="no-value"),
        pytest.param(
            {"op": "put", "key": "k", "value": None},
            "state value: null; a value is any JSON but null (delete removes a key)",
            id="null-value",
        ),
        pytest.param(
            {"op": "put", "key": "k", "value": {"a": ["\udc00"]}},
            "state value: a string in it has a lone surrogate (not UTF-8)",
            id="surrogate-value",
        ),
        pytest.param(
            {"op": "compare_and_set", "key": "k", "value": 1},
            "state expected: missing; null for a key that must not exist",
            id="no-expected",
        ),
        pytest.param(
            {"op": "compare_and_set", "key": "k", "expected": 1, "value": None},
            "state value: null; a value is any JSON but null (delete removes a key)",
            id="cas-null-value",
        ),
        pytest.param(
            {"op": "put", "key": "k", "value": 1, "ttl": 0},
            "state ttl: 0; whole seconds from 1 to 31536000",
            id="ttl-0",
        ),
        pytest.param(
            {"op": "put", "key": "k", "value": 1, "ttl": 31536001},
            "state ttl: 31536001; whole seconds from 1 to 31536000",
            id="ttl-long",
        ),
        pytest.param(
            {"op": "incr", "key": "k", "ttl": -1},
            "state ttl: -1; whole seconds from 1 to 31536000",
            id="ttl-negative",
        ),
        pytest.param(
            {"op": "put", "key": "k", "value": 1, "ttl": 1.5},
            "state ttl: a number (1.5), not an integer; whole seconds from 1 to 31536000",
            id="ttl-fraction",
        ),
        pytest.param(
            {"op": "put", "key": "k", "value": 1, "ttl": True},
            "state ttl: true, not an integer; whole seconds from 1 to 31536000",
            id="ttl-bool",
        ),
        pytest.param(
            {"op": "compare_and_set", "key": "k", "expected": None, "value": 1, "ttl": "60"},
            "state ttl: a string, not an integer; whole seconds from 1 to 31536000",
            id="ttl-string",
        ),
        pytest.param(
            {"op": "incr", "key": "k", "by": 2**53 + 1},
            "state by: 9007199254740993; an integer within ±9007199254740992 (2^53)",
            id="by-big",
        ),
        pytest.param(
            {"op": "incr", "key": "k", "by": -(2**53) - 1},
            "state by: -9007199254740993; an integer within ±9007199254740992 (2^53)",
            id="by-small",
        ),
        pytest.param(
            {"op": "incr", "key": "k", "by": False},
            "state by: false, not an integer; an integer within ±9007199254740992 (2^53)",
            id="by-bool",
        ),
        pytest.param(
            {"op": "incr", "key": "k", "by": 2.0},
            "state by: a number (2.0), not an integer; an integer within ±9007199254740992 (2^53)",
            id="by-float",
        ),
    ],
)
async def test_a_bad_member_is_refused_naming_it(client: Client, doc: dict[str, Any], message: str) -> None:
    assert await client.op(doc) == refused(400, message)


async def test_the_limits_themselves_are_allowed(client: Client) -> None:
    assert (await client.op({"op": "put", "key": "é" * 256, "value": 1, "ttl": 31536000})).status == 200
    assert (await client.op({"op": "incr", "key": "n", "by": 2**53})).doc == {"value": 2**53}
    assert (await client.op({"op": "incr", "key": "n", "by": -(2**53)})).doc == {"value": 0}
    assert (await client.op({"op": "put", "key": "k", "value": "x" * (MAX_VALUE_BYTES - 2), "ttl": None})).status == 200
    # Values sent with \u escapes count by their canonical (UTF-8) size, not by the bytes sent.
    assert (await client.raw(json.dumps({"op": "put", "key": "k", "value": "é" * 80_000}).encode())).status == 200


async def test_a_value_too_large_is_refused_with_its_size_and_the_limit(client: Client) -> None:
    too_big = "x" * (MAX_VALUE_BYTES - 1)  # 2 bytes of quotes: one over
    assert await client.op({"op": "put", "key": "k", "value": too_big}) == refused(
        413, "state value: 262145 bytes encoded; at most 262144", "ValueTooLarge"
    )
    assert await client.op({"op": "compare_and_set", "key": "k", "expected": too_big, "value": 1}) == refused(
        413, "state expected: 262145 bytes encoded; at most 262144", "ValueTooLarge"
    )
    assert await client.op({"op": "get", "key": "k"}) == Answer(200, {"found": False, "value": None})


async def test_a_body_too_large_is_refused_before_it_is_read(client: Client) -> None:
    body = json.dumps({"op": "put", "key": "k", "value": "x" * LIMIT}).encode()
    assert await client.raw(body) == refused(413, f"state request: {len(body)} bytes; at most {LIMIT}", "ValueTooLarge")
    assert await client.raw(body, chunked=True) == refused(
        413, f"state request: over {LIMIT} bytes; at most {LIMIT}", "ValueTooLarge"
    )


async def test_only_post_is_an_operation(client: Client) -> None:
    assert await client.raw(b"", method="GET") == refused(405, "state request: GET; operations are POST")


async def test_incr_of_a_value_that_is_not_an_integer_is_409(client: Client) -> None:
    for value in ["5", 1.5, 1.0, {"n": 1}, True]:
        await client.op({"op": "put", "key": "k", "value": value})
        assert await client.op({"op": "incr", "key": "k"}) == refused(
            409, "state key 'k': its value is not an integer (incr adds to a JSON integer)", "NotAnInteger"
        ), value
    await client.op({"op": "put", "key": "k", "value": 2**63 - 1})
    assert await client.op({"op": "incr", "key": "k", "by": 1}) == refused(
        409, "state key 'k': incr by 1 leaves the 64-bit integers", "NotAnInteger"
    )


async def test_a_store_that_fails_is_503(client: Client, store: SqliteKeyValueStore) -> None:
    await store.close()
    assert await client.op({"op": "get", "key": "k"}) == refused(
        503, f"the state store sqlite {store.path} is not open", "StateUnavailable"
    )
    assert await client.op({"op": "put", "key": "k", "value": 1}) == refused(
        503, f"the state store sqlite {store.path} is not open", "StateUnavailable"
    )


def test_open_store_picks_redis_for_a_url_and_sqlite_for_a_path(tmp_path: Path) -> None:
    assert isinstance(open_store("redis://:pw@redis:6379/0"), RedisKeyValueStore)
    assert isinstance(open_store("rediss://redis:6380/0"), RedisKeyValueStore)
    assert open_store("redis://:pw@redis:6379/0").description == "redis redis://:***@redis:6379/0"
    sqlite = open_store(str(tmp_path / "state.db"))
    assert isinstance(sqlite, SqliteKeyValueStore)
    assert sqlite.path == tmp_path / "state.db"
    for bad in ["", "http://redis:6379"]:
        with pytest.raises(StateError, match="neither a redis:// or rediss:// URL nor a file path"):
            open_store(bad)
