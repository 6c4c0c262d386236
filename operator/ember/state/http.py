"""One key-value state operation over HTTP: the request checked, the store called, the answer made.

The services proxy (`ember.pods.services`) has checked the pod's token and that its Function has
`state.keyValue`, and passes the Function's scope; `handle` does the rest of
runtime-images/CONTRACT.md "Key-value state": the body (one JSON object, at most
`max_value_bytes * 2 + 4096` bytes, enough for `compare_and_set`'s two values, refused with 413
before more is read), each member checked against what the op takes, the value encoded
canonically (so the stores compare and return bytes), and the store's errors mapped to their
status: `NotAnInteger` 409, `StoreUnavailable` 503. Each refusal is `{"errorType",
"errorMessage"}` with a message naming the member and what is allowed.

JSON that is not JSON elsewhere is refused too: `NaN`, `Infinity`, a number beyond a double, a
string with a lone surrogate (not UTF-8), nesting too deep for the parser.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from ember.state.redis import RedisKeyValueStore
from ember.state.sqlite import SqliteKeyValueStore
from ember.state.store import KeyValueStore, NotAnInteger, StateError, StoreUnavailable, shown

log = logging.getLogger(__name__)

MAX_VALUE_BYTES = 256 * 1024
MAX_KEY_BYTES = 512
MAX_TTL_S = 365 * 24 * 3600
MAX_BY = 2**53  # what a JavaScript number holds exactly

_JSON = {"Content-Type": "application/json"}
_OPS = "get, put, delete, incr, compare_and_set"


class _Refused(Exception):
    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status, self.error_type, self.message = status, error_type, message


def _invalid(message: str) -> _Refused:
    return _Refused(400, "InvalidStateRequest", message)


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is beyond a double")
    return number


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


# Built once: json.loads and json.dumps with options build a new decoder or encoder per call.
_DECODER = json.JSONDecoder(parse_float=_finite, parse_constant=_no_constant)
_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def _kind(value: object) -> str:
    """A JSON value's kind, for messages."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    if isinstance(value, int | float):
        return f"a number ({value})"
    if isinstance(value, str):
        return "a string"
    return "an array" if isinstance(value, list) else "an object"


def canonical(value: object, member: str, max_value_bytes: int) -> bytes:
    """The canonical encoding of a member's value (sorted keys, no spaces, UTF-8)."""
    try:
        encoded = _ENCODER.encode(value).encode()
    except UnicodeEncodeError:
        raise _invalid(f"state {member}: a string in it has a lone surrogate (not UTF-8)") from None
    except RecursionError:
        raise _invalid(f"state {member}: nested too deeply") from None
    if len(encoded) > max_value_bytes:
        raise _Refused(413, "ValueTooLarge", f"state {member}: {len(encoded)} bytes encoded; at most {max_value_bytes}")
    return encoded


async def _body(request: web.BaseRequest, limit: int) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > limit:
        raise _Refused(413, "ValueTooLarge", f"state request: {request.content_length} bytes; at most {limit}")
    body = bytearray()
    while chunk := await request.content.read(limit + 1 - len(body)):
        body += chunk
        if len(body) > limit:
            raise _Refused(413, "ValueTooLarge", f"state request: over {limit} bytes; at most {limit}")
    try:
        doc = _DECODER.decode(body.decode())
    except UnicodeDecodeError:
        raise _invalid("state request: the body is not UTF-8") from None
    except RecursionError:
        raise _invalid("state request: nested too deeply") from None
    except ValueError as err:
        raise _invalid(f"state request: not JSON ({err})") from None
    if not isinstance(doc, dict):
        raise _invalid(f"state request: {_kind(doc)}, not a JSON object")
    return doc


def _key(doc: dict[str, Any]) -> str:
    if "key" not in doc:
        raise _invalid("state key: missing")
    key = doc["key"]
    if not isinstance(key, str):
        raise _invalid(f"state key: {_kind(key)}, not a string")
    try:
        size = len(key.encode())
    except UnicodeEncodeError:
        raise _invalid("state key: has a lone surrogate (not UTF-8)") from None
    if size == 0:
        raise _invalid(f"state key: empty; 1 to {MAX_KEY_BYTES} bytes")
    if size > MAX_KEY_BYTES:
        raise _invalid(f"state key: {size} bytes; at most {MAX_KEY_BYTES}")
    return key


def _integer(doc: dict[str, Any], member: str, low: int, high: int, allowed: str) -> int | None:
    value = doc.get(member)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(f"state {member}: {_kind(value)}, not an integer; {allowed}")
    if not low <= value <= high:
        raise _invalid(f"state {member}: {value}; {allowed}")
    return value


def _ttl(doc: dict[str, Any]) -> int | None:
    return _integer(doc, "ttl", 1, MAX_TTL_S, f"whole seconds from 1 to {MAX_TTL_S}")


def _value(doc: dict[str, Any], max_value_bytes: int) -> bytes:
    if "value" not in doc:
        raise _invalid("state value: missing")
    if doc["value"] is None:
        raise _invalid("state value: null; a value is any JSON but null (delete removes a key)")
    return canonical(doc["value"], "value", max_value_bytes)


def _found(value: bytes | None) -> bytes:
    return b"null" if value is None else value


async def _get(store: KeyValueStore, scope: str, key: str, doc: dict[str, Any], limit: int) -> bytes:
    value = await store.get(scope, key)
    return b'{"found":false,"value":null}' if value is None else b'{"found":true,"value":' + value + b"}"


async def _put(store: KeyValueStore, scope: str, key: str, doc: dict[str, Any], limit: int) -> bytes:
    value, ttl_s = _value(doc, limit), _ttl(doc)
    await store.put(scope, key, value, ttl_s)
    return b"{}"


async def _delete(store: KeyValueStore, scope: str, key: str, doc: dict[str, Any], limit: int) -> bytes:
    return b'{"deleted":true}' if await store.delete(scope, key) else b'{"deleted":false}'


async def _incr(store: KeyValueStore, scope: str, key: str, doc: dict[str, Any], limit: int) -> bytes:
    by = _integer(doc, "by", -MAX_BY, MAX_BY, f"an integer within ±{MAX_BY} (2^53)")
    ttl_s = _ttl(doc)
    number = await store.incr(scope, key, 1 if by is None else by, ttl_s)
    return b'{"value":%d}' % number


async def _compare_and_set(store: KeyValueStore, scope: str, key: str, doc: dict[str, Any], limit: int) -> bytes:
    if "expected" not in doc:
        raise _invalid("state expected: missing; null for a key that must not exist")
    expected = None if doc["expected"] is None else canonical(doc["expected"], "expected", limit)
    value, ttl_s = _value(doc, limit), _ttl(doc)
    swapped, now = await store.compare_and_set(scope, key, expected, value, ttl_s)
    return b'{"swapped":%s,"value":%s}' % (b"true" if swapped else b"false", _found(now))


_Op = Callable[[KeyValueStore, str, str, dict[str, Any], int], Awaitable[bytes]]
# Each op, the members its body may have, and what does it.
_OPERATIONS: dict[str, tuple[frozenset[str], _Op]] = {
    "get": (frozenset({"op", "key"}), _get),
    "put": (frozenset({"op", "key", "value", "ttl"}), _put),
    "delete": (frozenset({"op", "key"}), _delete),
    "incr": (frozenset({"op", "key", "by", "ttl"}), _incr),
    "compare_and_set": (frozenset({"op", "key", "expected", "value", "ttl"}), _compare_and_set),
}


def _refusal(status: int, error_type: str, message: str) -> web.Response:
    return web.json_response({"errorType": error_type, "errorMessage": message}, status=status)


async def handle(
    store: KeyValueStore, scope: str, request: web.BaseRequest, max_value_bytes: int = MAX_VALUE_BYTES
) -> web.Response:
    """Serve one operation on the key-value state of `scope` ("<namespace>/<function>")."""
    if request.method != "POST":
        return _refusal(405, "InvalidStateRequest", f"state request: {request.method}; operations are POST")
    try:
        doc = await _body(request, max_value_bytes * 2 + 4096)
        op = doc.get("op")
        if op is None:
            raise _invalid(f"state request: no op; one of {_OPS}")
        if not isinstance(op, str):
            raise _invalid(f"state request: op is {_kind(op)}, not a string; one of {_OPS}")
        if op not in _OPERATIONS:
            raise _invalid(f"state request: op {shown(op)} is unknown; one of {_OPS}")
        members, run = _OPERATIONS[op]
        unknown = sorted(doc.keys() - members)
        if unknown:
            raise _invalid(
                f"state request: {op} takes no {', '.join(map(shown, unknown))}; it takes {', '.join(sorted(members))}"
            )
        answer = await run(store, scope, _key(doc), doc, max_value_bytes)
    except _Refused as refused:
        return _refusal(refused.status, refused.error_type, refused.message)
    except NotAnInteger as err:
        return _refusal(409, "NotAnInteger", str(err))
    except StoreUnavailable as err:
        log.warning("state store unavailable scope=%s: %s", scope, err)
        return _refusal(503, "StateUnavailable", str(err))
    return web.Response(body=answer, headers=_JSON)


def open_store(value: str) -> KeyValueStore:
    """The store a setting names: a `redis://` or `rediss://` URL, or the path of a SQLite file."""
    if value.startswith(("redis://", "rediss://")):
        return RedisKeyValueStore(value)
    if not value or "://" in value:
        raise StateError(f"state store {value!r}: neither a redis:// or rediss:// URL nor a file path")
    return SqliteKeyValueStore(Path(value))
