"""The key-value store of a cluster: Redis, shared by every activator replica.

A key is the Redis string `ember:state:{<scope>}:<key>` (the scope, "<namespace>/<function>", in a
hash tag: one Function's keys share a slot of a Redis Cluster), holding the canonical JSON of
the value, with Redis's own expiry (`SET … EX`, `EXPIRE`). `get`, `put` and `delete` are one
command each; `incr` and `compare_and_set` are Lua scripts (`EVALSHA`), so each is one atomic
step on the server: every operation on a key is linearizable across replicas.

`incr` is `INCRBY` inside its script: `INCRBY` accepts exactly the canonical JSON integers
within 64 bits (no sign `+`, no leading zero, no `-0`, no fraction), which is the check `incr`
needs, and the script turns its refusal into one Ember recognises (`NotAnInteger`). Its `EXPIRE`
comes in the same step, so a `put` between the two cannot lose its expiry.

At most `MAX_IN_FLIGHT` commands are in flight per store: the client's connection pool (100)
refuses a command beyond its size rather than waiting, and a burst of a thousand `incr`s should
queue here, not fail.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

import redis.asyncio as aioredis
from redis.commands.core import AsyncScript
from redis.exceptions import RedisError, ResponseError

from ember.sources.redis_streams import client
from ember.sources.store import redacted
from ember.state.store import StateError, StoreUnavailable, not_an_integer, overflows

T = TypeVar("T")

MAX_IN_FLIGHT = 64
_NOT_AN_INTEGER = "EMBER_NOT_AN_INTEGER"

# KEYS[1] the key; ARGV[1] by, ARGV[2] ttl seconds or ''. Answers the sum as the string Redis holds:
# a Lua number is a double, exact only within 2^53.
_INCR = f"""
local n = redis.pcall('INCRBY', KEYS[1], ARGV[1])
if type(n) == 'table' and n.err then return redis.error_reply('{_NOT_AN_INTEGER} ' .. n.err) end
if ARGV[2] ~= '' then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return redis.call('GET', KEYS[1])
"""

# KEYS[1] the key; ARGV[1] '1' if there is an expected value, ARGV[2] it, ARGV[3] the new value,
# ARGV[4] ttl seconds or ''. Answers {1} when it swapped, else {0, the value now (nil if none)}.
_COMPARE_AND_SET = """
local now = redis.call('GET', KEYS[1])
local holds
if ARGV[1] == '1' then holds = (now == ARGV[2]) else holds = (now == false) end
if not holds then return {0, now} end
if ARGV[4] ~= '' then
  redis.call('SET', KEYS[1], ARGV[3], 'EX', ARGV[4])
else
  redis.call('SET', KEYS[1], ARGV[3])
end
return {1}
"""


class RedisKeyValueStore:
    """`KeyValueStore` on Redis (see the module docstring for the keys and scripts)."""

    def __init__(self, url: str) -> None:
        self.description = f"redis {redacted(url)}"
        self._url = url
        self._redis: aioredis.Redis | None = None
        self._incr: AsyncScript
        self._compare_and_set: AsyncScript
        self._in_flight = asyncio.Semaphore(MAX_IN_FLIGHT)

    async def start(self) -> None:
        """Make the client; a Redis not up yet is no error here (operations fail until it answers)."""
        try:
            self._redis = client(self._url)
        except ValueError as err:
            raise StateError(f"cannot open the state store {self.description}: {err}") from None
        self._incr = self._redis.register_script(_INCR)
        self._compare_and_set = self._redis.register_script(_COMPARE_AND_SET)

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    @staticmethod
    def _name(scope: str, key: str) -> str:
        # A brace in the scope would move the hash tag; Kubernetes names have none.
        if "{" in scope or "}" in scope:
            raise ValueError(f"state scope {scope!r} has a brace")
        return f"ember:state:{{{scope}}}:{key}"

    async def _call(self, op: str, command: Callable[[aioredis.Redis], Awaitable[T]]) -> T:
        """Run one command; every failure is StoreUnavailable but `incr`'s refusal (a ResponseError)."""
        redis = self._redis
        if redis is None:
            raise StoreUnavailable(f"the state store {self.description} is not open")
        try:
            async with self._in_flight:
                return await command(redis)
        except ResponseError as err:  # Redis answered: out of memory, a read-only replica, ...
            if str(err).startswith(_NOT_AN_INTEGER):
                raise
            raise StoreUnavailable(f"the state store {self.description} refused the {op}: {err}") from None
        except RedisError as err:
            raise StoreUnavailable(
                f"the state store {self.description} is not reachable ({err}); the {op} may not have been applied"
            ) from None

    async def get(self, scope: str, key: str) -> bytes | None:
        name = self._name(scope, key)
        # bytes: the client does not decode (`ember.sources.redis_streams.client`)
        return cast("bytes | None", await self._call("get", lambda r: r.get(name)))

    async def put(self, scope: str, key: str, value: bytes, ttl_s: int | None) -> None:
        name = self._name(scope, key)
        await self._call("put", lambda r: r.set(name, value, ex=ttl_s))

    async def delete(self, scope: str, key: str) -> bool:
        name = self._name(scope, key)
        removed: int = await self._call("delete", lambda r: r.delete(name))
        return removed > 0

    async def incr(self, scope: str, key: str, by: int, ttl_s: int | None) -> int:
        keys, args = [self._name(scope, key)], [by, "" if ttl_s is None else ttl_s]
        try:
            number: bytes = await self._call("incr", lambda r: self._incr(keys=keys, args=args, client=r))
        except ResponseError as err:
            raise (overflows(key, by) if "overflow" in str(err) else not_an_integer(key)) from None
        return int(number)

    async def compare_and_set(
        self, scope: str, key: str, expected: bytes | None, value: bytes, ttl_s: int | None
    ) -> tuple[bool, bytes | None]:
        keys = [self._name(scope, key)]
        args = [b"0" if expected is None else b"1", expected or b"", value, "" if ttl_s is None else ttl_s]
        answer: list[Any] = await self._call(
            "compare_and_set", lambda r: self._compare_and_set(keys=keys, args=args, client=r)
        )
        if answer[0] == 1:
            return True, value
        current: bytes | None = answer[1]
        return False, current
