"""The key-value store's interface: what `context.state` needs of SQLite (local mode) or Redis.

Values cross this interface as bytes, already in the canonical JSON encoding (`ember.state.http`
makes it): sorted keys, no spaces, UTF-8. So "compared as JSON" (runtime-images/CONTRACT.md) is a
comparison of bytes, in Python as in a Lua script, and what `get` returns goes into the answer as
it is. `incr` adds to a JSON integer within 64 bits (exactly the strings Redis's `INCRBY`
accepts) and stores the sum the same way.

Expiry, the same in both stores: `put` and a successful `compare_and_set` replace the value and
its expiry (`ttl_s` seconds from now, or never without it); `incr` with `ttl_s` sets the expiry
again, without it keeps the key's. A key past its expiry is absent for every operation (an
`incr` of it starts from 0 with no expiry, a `delete` of it answers False).
"""

from __future__ import annotations

import re
from typing import Protocol

INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
_INTEGER = re.compile(rb"-?(?:0|[1-9][0-9]*)")


class StateError(Exception):
    """A key-value operation failed; the message says why, naming the key or the store."""


class NotAnInteger(StateError):
    """`incr` of a key whose value is not a JSON integer within 64 bits, or a sum outside them."""


class StoreUnavailable(StateError):
    """The store cannot be reached or failed; the message names it and says the operation may
    not have been applied."""


class KeyValueStore(Protocol):
    """Keys of one `scope` ("<namespace>/<function>") never meet another scope's. Every operation
    on one key is linearizable."""

    description: str  # names the store in messages ("sqlite <path>", "redis <url without password>")

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def get(self, scope: str, key: str) -> bytes | None:
        """The value, or None for a key that is absent (or expired)."""
        ...

    async def put(self, scope: str, key: str, value: bytes, ttl_s: int | None) -> None: ...

    async def delete(self, scope: str, key: str) -> bool:
        """Whether the key was there."""
        ...

    async def incr(self, scope: str, key: str, by: int, ttl_s: int | None) -> int:
        """The value after adding `by` (a missing key counts as 0). NotAnInteger."""
        ...

    async def compare_and_set(
        self, scope: str, key: str, expected: bytes | None, value: bytes, ttl_s: int | None
    ) -> tuple[bool, bytes | None]:
        """Set `value` if the key holds `expected` (None: if it is absent); whether it swapped,
        and the value now."""
        ...


def shown(key: str) -> str:
    """The key for a message: quoted, and cut short (a key may be 512 bytes)."""
    return repr(key if len(key) <= 64 else key[:64] + "…")


def not_an_integer(key: str) -> NotAnInteger:
    return NotAnInteger(f"state key {shown(key)}: its value is not an integer (incr adds to a JSON integer)")


def overflows(key: str, by: int) -> NotAnInteger:
    return NotAnInteger(f"state key {shown(key)}: incr by {by} leaves the 64-bit integers")


def as_integer(key: str, value: bytes) -> int:
    """The stored value as an integer, as Redis's `INCRBY` reads it. NotAnInteger."""
    if _INTEGER.fullmatch(value) is None:
        raise not_an_integer(key)
    number = int(value)
    if not INT64_MIN <= number <= INT64_MAX:
        raise not_an_integer(key)
    return number
