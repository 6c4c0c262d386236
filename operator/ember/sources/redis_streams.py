"""The event store of a cluster: Redis Streams, shared by every activator replica of a namespace.

Keys, all under `ember:{<namespace>}:async` (one hash slot, so the scripts also run on a Redis
Cluster):

- `…:stream`, consumed by the group `activators`, one consumer per activator (its holder name):
  an event is one entry, fields `d` (the event as JSON) and `b` (the body). `lease` reads new
  entries (`XREADGROUP`, blocking up to `block_ms`) after taking over entries another consumer
  left pending longer than the lease (`XAUTOCLAIM`: a killed replica's events run again);
  `extend` resets the idle time of a holder's entries (`XCLAIM … JUSTID`). `ack` is
  `XACK` + `XDEL`, in one `MULTI` with the status.
- `…:delayed` (a sorted set by due time) and `…:parked` (their events): `retry_later` parks an
  event there and acks its entry in one `MULTI`; `lease` first moves the due ones back to the
  stream (a Lua script: atomic, so two replicas never move one twice).
- `…:waiting:<namespace>/<function>` (a list of event ids, their events in `…:parked` too) and
  `…:waiting` (the set of Functions with such a list): `park` moves leased events there (and
  acks their entries) in one `MULTI`; `unpark` moves the first n of a Function back to the
  stream (a Lua script).
- `…:status:<id>` (JSON, expiring after `STATUS_TTL_S`), `…:idem:<key>` (the event id, expiring
  after `IDEMPOTENCY_WINDOW_S`), `…:dead` (a stream of dead letters, capped).

`put` is one Lua script (the idempotency key, the status `SET NX`, the `XADD`); puts that arrive
while a batch is in flight go together in the next pipeline. The 202 follows Redis's reply,
which with `appendfsync always` (the chart's Redis) comes after the fsync.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from ember.sources.store import (
    CONNECT_TIMEOUT_S,
    IDEMPOTENCY_WINDOW_S,
    SOCKET_TIMEOUT_S,
    STATUS_TTL_S,
    Event,
    Status,
    StoreError,
    queued_status,
    redacted,
)

log = logging.getLogger(__name__)

GROUP = "activators"
MAX_BATCH = 500  # puts per pipeline at most
DEAD_LETTERS_KEPT = 100_000

_PUT = """
if KEYS[3] ~= '' then
  local earlier = redis.call('GET', KEYS[3])
  if earlier then return earlier end
end
if redis.call('SET', KEYS[1], ARGV[1], 'EX', ARGV[2], 'NX') then
  redis.call('XADD', KEYS[2], '*', 'd', ARGV[3], 'b', ARGV[4])
end
if KEYS[3] ~= '' then redis.call('SET', KEYS[3], ARGV[5], 'EX', ARGV[6]) end
return ARGV[5]
"""

_MOVE_DUE = """
local ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
for _, id in ipairs(ids) do
  local d = redis.call('HGET', KEYS[2], id .. ':d')
  local b = redis.call('HGET', KEYS[2], id .. ':b')
  if d and b then redis.call('XADD', KEYS[3], '*', 'd', d, 'b', b) end
  redis.call('HDEL', KEYS[2], id .. ':d', id .. ':b')
  redis.call('ZREM', KEYS[1], id)
end
return #ids
"""


_UNPARK = """
local ids = redis.call('LPOP', KEYS[1], tonumber(ARGV[1]))
if not ids then ids = {} end
for _, id in ipairs(ids) do
  local d = redis.call('HGET', KEYS[2], id .. ':d')
  local b = redis.call('HGET', KEYS[2], id .. ':b')
  if d and b then redis.call('XADD', KEYS[3], '*', 'd', d, 'b', b) end
  redis.call('HDEL', KEYS[2], id .. ':d', id .. ':b')
end
if redis.call('LLEN', KEYS[1]) == 0 then redis.call('SREM', KEYS[4], ARGV[2]) end
return #ids
"""


def client(url: str) -> aioredis.Redis:
    """A Redis client for Ember's use: bytes in and out, and a command with no answer fails
    (`SOCKET_TIMEOUT_S`) rather than hanging its caller. ValueError for a bad URL."""
    return aioredis.Redis.from_url(
        url,
        decode_responses=False,
        health_check_interval=30,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_connect_timeout=CONNECT_TIMEOUT_S,
    )


class RedisStore:
    """`EventStore` on Redis Streams (see the module docstring for the keys)."""

    def __init__(
        self, url: str, namespace: str, *, block_ms: int = 100, clock: Callable[[], float] = time.time
    ) -> None:
        self.description = f"redis {redacted(url)}"
        self._url = url
        self._clock = clock
        self._block_ms = block_ms
        prefix = f"ember:{{{namespace}}}:async"
        self._stream = f"{prefix}:stream"
        self._delayed = f"{prefix}:delayed"
        self._parked = f"{prefix}:parked"
        self._dead = f"{prefix}:dead"
        self._waiting = f"{prefix}:waiting"
        self._status_prefix = f"{prefix}:status:"
        self._idem_prefix = f"{prefix}:idem:"
        self._claim_cursor = "0-0"
        self._group_ready = False
        self._redis: aioredis.Redis | None = None
        self._pending: list[tuple[Event, str | None, asyncio.Future[str]]] = []
        self._flushing: asyncio.Task[None] | None = None

    def _r(self) -> aioredis.Redis:
        if self._redis is None:
            raise StoreError(f"the event store {self.description} is not open")
        return self._redis

    async def start(self) -> None:
        """Make the client; a Redis not up yet (a fresh install starts both at once) is no error:
        puts fail until it answers, and leasing creates the consumer group once it does."""
        try:
            self._redis = client(self._url)
        except ValueError as err:
            raise StoreError(f"cannot open the event store {self.description}: {err}") from None
        self._put = self._redis.register_script(_PUT)
        self._move_due = self._redis.register_script(_MOVE_DUE)
        self._unpark = self._redis.register_script(_UNPARK)
        try:
            await self._ensure_group()
        except StoreError as err:
            log.warning("%s; asynchronous invocations wait for it", err)

    async def _ensure_group(self) -> None:
        if self._group_ready:
            return
        try:
            await self._r().xgroup_create(self._stream, GROUP, id="0", mkstream=True)
        except ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise StoreError(f"{self.description}: {err}") from None
        except RedisError as err:
            raise StoreError(f"the event store {self.description} is not reachable: {err}") from None
        self._group_ready = True

    async def close(self) -> None:
        if self._flushing is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(self._flushing), 35.0)
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def put(self, event: Event, idempotency_key: str | None = None) -> str:
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending.append((event, idempotency_key, future))
        if self._flushing is None:
            self._flushing = asyncio.create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        """Puts waiting while a batch is in flight go together in the next pipeline (one round trip)."""
        try:
            while self._pending:
                batch, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
                try:
                    async with self._r().pipeline(transaction=False) as pipe:
                        for event, key, _ in batch:
                            await self._put(keys=self._put_keys(event, key), args=self._put_args(event), client=pipe)
                        found = await pipe.execute(raise_on_error=False)
                except Exception as err:  # every put of the batch fails alike; none may be left waiting
                    failure = err if isinstance(err, StoreError) else StoreError(f"{self.description}: {err!r}")
                    found = [failure] * len(batch)
                for (_, _, future), result in zip(batch, found, strict=True):
                    if future.done():
                        continue
                    if isinstance(result, Exception):
                        future.set_exception(
                            result if isinstance(result, StoreError) else StoreError(f"{self.description}: {result}")
                        )
                    else:
                        future.set_result(result.decode() if isinstance(result, bytes) else str(result))
        finally:
            self._flushing = None

    def _put_keys(self, event: Event, key: str | None) -> list[str]:
        return [self._status_prefix + event.id, self._stream, self._idem_prefix + key if key else ""]

    @staticmethod
    def _put_args(event: Event) -> list[Any]:
        return [
            queued_status(event).dumps(),
            int(STATUS_TTL_S),
            json.dumps(event.to_json()),
            event.body,
            event.id,
            int(IDEMPOTENCY_WINDOW_S),
        ]

    async def lease(self, holder: str, count: int, lease_s: float) -> list[Event]:
        r = self._r()
        await self._ensure_group()
        out: list[Event] = []
        try:
            await self._move_due(keys=[self._delayed, self._parked, self._stream], args=[self._clock(), 100])
            claimed = await r.xautoclaim(
                self._stream, GROUP, holder, min_idle_time=int(lease_s * 1000), start_id=self._claim_cursor, count=count
            )
            cursor, entries = claimed[0], claimed[1]
            self._claim_cursor = cursor.decode() if isinstance(cursor, bytes) else str(cursor)
            out += self._events(entries)
            if len(out) < count:
                read: Any = await r.xreadgroup(
                    GROUP, holder, {self._stream: ">"}, count=count - len(out), block=self._block_ms
                )
                for _, stream_entries in read or []:
                    out += self._events(stream_entries)
        except ResponseError as err:
            if "NOGROUP" in str(err):  # Redis lost its data (no persistence) or the key was deleted
                self._group_ready = False
            raise StoreError(f"{self.description}: {err}") from None
        except RedisError as err:
            raise StoreError(f"{self.description}: {err}") from None
        return out

    @staticmethod
    def _events(entries: Sequence[Any]) -> list[Event]:
        events = []
        for entry_id, fields in entries:
            if not fields:  # deleted while pending
                continue
            receipt = entry_id.decode() if isinstance(entry_id, bytes) else str(entry_id)
            events.append(Event.from_json(json.loads(fields[b"d"]), bytes(fields[b"b"]), receipt))
        return events

    async def extend(self, holder: str, events: Sequence[Event], lease_s: float) -> None:
        if not events:
            return
        try:
            await self._r().xclaim(
                self._stream, GROUP, holder, min_idle_time=0, message_ids=[e.receipt for e in events], justid=True
            )
        except RedisError as err:
            raise StoreError(f"{self.description}: {err}") from None

    async def mark(self, status: Status) -> None:
        try:
            await self._r().set(self._status_prefix + status.id, status.dumps(), ex=int(STATUS_TTL_S))
        except RedisError as err:
            raise StoreError(f"{self.description}: {err}") from None

    async def ack(self, event: Event, status: Status) -> None:
        await self._finish(event, status, dead=False)

    async def dead_letter(self, event: Event, status: Status) -> None:
        await self._finish(event, status, dead=True)

    async def _finish(self, event: Event, status: Status, *, dead: bool) -> None:
        try:
            async with self._r().pipeline(transaction=True) as pipe:
                if dead:
                    pipe.xadd(
                        self._dead,
                        {"d": json.dumps(event.to_json()), "b": event.body, "s": status.dumps()},
                        maxlen=DEAD_LETTERS_KEPT,
                        approximate=True,
                    )
                pipe.xack(self._stream, GROUP, event.receipt)
                pipe.xdel(self._stream, event.receipt)
                pipe.set(self._status_prefix + status.id, status.dumps(), ex=int(STATUS_TTL_S))
                await pipe.execute()
        except RedisError as err:
            raise StoreError(f"{self.description}: {err}") from None

    async def retry_later(self, event: Event, status: Status) -> None:
        try:
            async with self._r().pipeline(transaction=True) as pipe:
                pipe.hset(
                    self._parked, mapping={f"{event.id}:d": json.dumps(event.to_json()), f"{event.id}:b": event.body}
                )
                pipe.zadd(self._delayed, {event.id: event.not_before})
                pipe.xack(self._stream, GROUP, event.receipt)
                pipe.xdel(self._stream, event.receipt)
                pipe.set(self._status_prefix + status.id, status.dumps(), ex=int(STATUS_TTL_S))
                await pipe.execute()
        except RedisError as err:
            raise StoreError(f"{self.description}: {err}") from None

    async def park(self, events: Sequence[Event]) -> None:
        if not events:
            return
        try:
            async with self._r().pipeline(transaction=True) as pipe:
                for event in events:
                    pipe.hset(
                        self._parked,
                        mapping={f"{event.id}:d": json.dumps(event.to_json()), f"{event.id}:b": event.body},
                    )
                    pipe.rpush(f"{self._waiting}:{event.label}", event.id)
                    pipe.sadd(self._waiting, event.label)
                    pipe.xack(self._stream, GROUP, event.receipt)
                    pipe.xdel(self._stream, event.receipt)
                await pipe.execute()
        except RedisError as err:
            raise StoreError(f"{self.description}: {err}") from None

    async def unpark(self, function: str, count: int) -> int:
        keys = [f"{self._waiting}:{function}", self._parked, self._stream, self._waiting]
        try:
            return int(await self._unpark(keys=keys, args=[count, function]))
        except RedisError as err:
            raise StoreError(f"{self.description}: {err}") from None

    async def parked(self) -> dict[str, int]:
        try:
            functions = sorted(text(f) for f in await self._r().smembers(self._waiting))
            async with self._r().pipeline(transaction=False) as pipe:
                for function in functions:
                    pipe.llen(f"{self._waiting}:{function}")
                counts = await pipe.execute()
        except RedisError as err:
            raise StoreError(f"{self.description}: {err}") from None
        return {f: int(n) for f, n in zip(functions, counts, strict=True) if int(n) > 0}

    async def status(self, event_id: str) -> Status | None:
        try:
            raw = await self._r().get(self._status_prefix + event_id)
        except RedisError as err:
            raise StoreError(f"{self.description}: {err}") from None
        return Status.loads(raw) if raw else None

    async def depth(self) -> int:
        try:
            async with self._r().pipeline(transaction=False) as pipe:
                pipe.xlen(self._stream)
                pipe.hlen(self._parked)  # two fields per delayed or parked event
                waiting, aside = await pipe.execute()
        except RedisError as err:
            raise StoreError(f"{self.description}: {err}") from None
        return int(waiting) + int(aside) // 2

    async def dead_letters(self) -> list[tuple[Event, Status]]:
        """Every dead-lettered event with its status, oldest first (for tests and inspection)."""
        try:
            entries: Any = await self._r().xrange(self._dead)
        except RedisError as err:
            raise StoreError(f"{self.description}: {err}") from None
        return [(Event.from_json(json.loads(f[b"d"]), bytes(f[b"b"])), Status.loads(f[b"s"])) for _, f in entries]


def text(value: Any) -> str:
    """A Redis reply (bytes, as `client` returns them) as text."""
    return value.decode() if isinstance(value, bytes) else str(value)
