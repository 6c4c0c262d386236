"""A Redis Stream read through a consumer group: the broker side of a `redis-stream` event source.

Each activator is one consumer of the source's group (its holder name), so the replicas share
the stream's messages and none gets one another holds. A message read stays pending until it is
acked; one whose consumer died, or that failed, is taken again by `XAUTOCLAIM` once it has been
idle for the visibility timeout (longer than the function's timeout, so a running batch is never
taken from under its invocation). `retry_in` makes a failed message reclaimable sooner, after a
delay, by claiming it back with an idle time just short of the visibility timeout. The broker,
not the activator, holds the backlog: nothing is read that cannot start.

`take` returns each message with its delivery count (`XPENDING`), which decides when it has been
tried `maxRetries` times and goes to the dead-letter stream (`dead_letter`: `XADD` of its fields
and the reason, then `XACK`, in one `MULTI`). Messages are never deleted from the user's stream
(other groups may read it); acked ones stay until the stream is trimmed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from ember.sources.queue import Message
from ember.sources.redis_streams import client, text
from ember.sources.store import StoreError, redacted


class StreamConsumer:
    """One consumer of a group on one stream; every method may raise StoreError (naming the stream)."""

    def __init__(
        self, url: str, stream: str, group: str, consumer: str, *, visibility_s: float, block_ms: int = 200
    ) -> None:
        self.description = f"redis stream {stream!r} at {redacted(url)}"
        self._url = url
        self.stream = stream
        self.group = group
        self._consumer = consumer
        self._visibility_ms = int(visibility_s * 1000)
        self._block_ms = block_ms
        self._cursor = "0-0"
        self._redis: aioredis.Redis | None = None

    def _r(self) -> aioredis.Redis:
        if self._redis is None:
            raise StoreError(f"{self.description} is not open")
        return self._redis

    async def start(self) -> None:
        """Connect and make sure the group exists (reading the stream from its start)."""
        try:
            self._redis = client(self._url)
        except ValueError as err:
            raise StoreError(f"{self.description}: {err}") from None
        try:
            await self._redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as err:
            if "BUSYGROUP" not in str(err):
                raise StoreError(f"{self.description}: {err}") from None
        except RedisError as err:
            raise StoreError(f"{self.description} is not reachable: {err}") from None

    async def close(self) -> None:
        if self._redis is not None:
            await self._redis.aclose()
            self._redis = None

    async def take(self, count: int, window_s: float = 0.0) -> list[Message]:
        """Up to `count` messages: first those others left idle past the visibility timeout, then
        new ones (waiting up to the block time for the first, and up to `window_s` more to fill
        the batch once one came)."""
        r = self._r()
        try:
            claimed: Any = await r.xautoclaim(
                self.stream, self.group, self._consumer, self._visibility_ms, start_id=self._cursor, count=count
            )
            self._cursor = text(claimed[0])
            entries = [(i, f) for i, f in claimed[1] if f]
            if len(entries) < count:  # new ones, waiting up to the block time for the first
                entries += await self._read(count - len(entries), self._block_ms)
            deadline = time.monotonic() + window_s
            while window_s > 0 and entries and len(entries) < count:  # the batch window: fill it
                left_ms = int((deadline - time.monotonic()) * 1000)
                got = await self._read(count - len(entries), left_ms) if left_ms > 0 else []
                if not got:
                    break
                entries += got
            if not entries:
                return []
            ids = [text(i) for i, _ in entries]
            pending: Any = await r.xpending_range(self.stream, self.group, min=min(ids, key=_order),
                                                  max=max(ids, key=_order), count=max(len(ids) * 4, 100),
                                                  consumername=self._consumer)  # fmt: skip
        except ResponseError as err:
            if "NOGROUP" in str(err):  # the stream or group was deleted: make them again, read from the start
                await self.start()
            raise StoreError(f"{self.description}: {err}") from None
        except RedisError as err:
            raise StoreError(f"{self.description}: {err}") from None
        counts = {text(p["message_id"]): int(p["times_delivered"]) for p in pending}
        return [
            Message(text(i), {text(k): bytes(v) for k, v in f.items()}, counts.get(text(i), 1), _order(text(i))[0])
            for i, f in entries
        ]

    async def _read(self, count: int, block_ms: int) -> list[tuple[Any, Any]]:
        read: Any = await self._r().xreadgroup(
            self.group, self._consumer, {self.stream: ">"}, count=count, block=max(block_ms, 1)
        )
        return [(i, f) for _, stream_entries in read or [] for i, f in stream_entries if f]

    async def ack(self, ids: Sequence[str]) -> None:
        if not ids:
            return
        try:
            await self._r().xack(self.stream, self.group, *ids)
        except RedisError as err:
            raise StoreError(f"{self.description}: {err}") from None

    async def retry_in(self, ids: Sequence[str], delay_s: float) -> None:
        """Make these messages reclaimable after `delay_s` (instead of the whole visibility timeout)."""
        if not ids:
            return
        idle = max(0, self._visibility_ms - int(delay_s * 1000))
        try:
            await self._r().xclaim(self.stream, self.group, self._consumer, 0, list(ids), idle=idle, justid=True)
        except RedisError as err:
            raise StoreError(f"{self.description}: {err}") from None

    async def dead_letter(self, message: Message, dead_stream: str | None, reason: str) -> None:
        """Ack the message; first copy it with the reason to `dead_stream`, when there is one."""
        try:
            async with self._r().pipeline(transaction=True) as pipe:
                if dead_stream:
                    fields: dict[Any, Any] = dict(message.fields)
                    fields |= {
                        "ember.reason": reason,
                        "ember.stream": self.stream,
                        "ember.id": message.id,
                        "ember.deliveries": str(message.deliveries),
                    }
                    pipe.xadd(dead_stream, fields)
                pipe.xack(self.stream, self.group, message.id)
                await pipe.execute()
        except RedisError as err:
            raise StoreError(f"{self.description}: {err}") from None

    async def backlog(self) -> int:
        """Messages of the group not yet acked: never read (lag) and pending."""
        try:
            groups: Any = await self._r().xinfo_groups(self.stream)
        except RedisError as err:
            raise StoreError(f"{self.description}: {err}") from None
        for group in groups:
            if text(group["name"]) == self.group:
                return int(group.get("lag") or 0) + int(group.get("pending") or 0)
        return 0


def _order(entry_id: str) -> tuple[int, int]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)
