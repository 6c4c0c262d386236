"""Writing one message to a broker: the stream destinations of asynchronous invocations
(`spec.async.onSuccess` / `onFailure` with `stream`).

`Publishers` keeps one connection per broker URL and writes a record as a message whose `body`
is the record's JSON, so an event source of another Function reads it as it reads any message.
Each message carries the record's id (the same when a crash makes Ember send it again): the
`ember.id` field of a Redis stream entry, and JetStream's `Nats-Msg-Id` header, with which the
stream itself drops a repeat inside its duplicate window. Every error is a StoreError naming the
broker, the stream and what went wrong, never the password.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Literal

import nats
from nats.errors import Error as NatsError
from nats.js.errors import NoStreamResponseError
from redis.exceptions import RedisError

from ember.sources.redis_streams import client as redis_client
from ember.sources.store import StoreError, redacted

Kind = Literal["redis-stream", "nats-jetstream"]


class Publishers:
    """Connections to the destination brokers, opened on first use and kept."""

    def __init__(self) -> None:
        self._redis: dict[str, Any] = {}
        self._nats: dict[str, Any] = {}
        self._lock = asyncio.Lock()

    async def publish(self, kind: Kind, url: str, stream: str, body: bytes, message_id: str) -> None:
        what = "redis stream" if kind == "redis-stream" else "NATS JetStream subject"
        where = f"{what} {stream!r} at {redacted(url)}"
        try:
            if kind == "redis-stream":
                await (await self._redis_for(url)).xadd(stream, {"body": body, "ember.id": message_id})
            else:
                js = await self._nats_for(url)
                await js.publish(stream, body, headers={"Nats-Msg-Id": message_id}, timeout=5.0)
        except ValueError as err:  # a URL the client cannot read
            raise StoreError(f"{where}: {err}") from None
        except NoStreamResponseError:
            raise StoreError(f"{where}: no JetStream stream holds this subject") from None
        except (RedisError, NatsError, OSError) as err:
            raise StoreError(f"{where}: {err!r}") from None

    async def _redis_for(self, url: str) -> Any:
        if url not in self._redis:
            self._redis[url] = redis_client(url)
        return self._redis[url]

    async def _nats_for(self, url: str) -> Any:
        async with self._lock:  # one connection per URL, even when two records go out at once
            if url not in self._nats:
                nc = await nats.connect(url, connect_timeout=5, max_reconnect_attempts=-1, name="ember-destinations")
                self._nats[url] = nc
            return self._nats[url].jetstream()

    async def close(self) -> None:
        for r in self._redis.values():
            with contextlib.suppress(RedisError, OSError):
                await r.aclose()
        for nc in self._nats.values():
            with contextlib.suppress(NatsError, OSError):
                await nc.close()
        self._redis.clear()
        self._nats.clear()
