"""A NATS JetStream subject read through a durable pull consumer: the broker side of a
`nats-jetstream` event source.

The source's `stream` is the subject to consume; the JetStream stream holding it is looked up
(`find_stream_name_by_subject`). Every activator fetches from one durable consumer (the source's
group name), so JetStream shares the messages out among the replicas. The consumer acks
explicitly with an ack wait of the visibility timeout (longer than the function's timeout): a
message whose activator died is delivered again when it runs out. `retry_in` is a `nak` with a
delay, `dead_letter` publishes the message to the dead-letter subject (with the reason in
headers) and `term`s it, so it is never delivered again. Delivery counts and times come from
each message's JetStream metadata.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

import nats
from nats.errors import Error as NatsError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import NotFoundError

from ember.sources.queue import Message
from ember.sources.store import StoreError, redacted


class JetStreamConsumer:
    """One fetcher of a durable pull consumer; every method may raise StoreError (naming the subject)."""

    def __init__(
        self, url: str, subject: str, group: str, consumer: str, *, visibility_s: float, block_ms: int = 200
    ) -> None:
        self.description = f"NATS JetStream subject {subject!r} at {redacted(url)}"
        self._url = url
        self._subject = subject
        self._durable = group.replace(".", "-")  # a durable name has no dots
        self._visibility_s = visibility_s
        self._block_s = block_ms / 1000
        self._nc: Any = None
        self._js: Any = None
        self._sub: Any = None
        self._held: dict[str, Any] = {}  # message id -> the delivered message, until acked / nak'ed / term'ed

    async def start(self) -> None:
        try:
            self._nc = await nats.connect(self._url, connect_timeout=5, max_reconnect_attempts=-1, name="ember")
            self._js = self._nc.jetstream()
            stream = await self._js.find_stream_name_by_subject(self._subject)
            config = ConsumerConfig(
                durable_name=self._durable,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self._visibility_s,
                max_deliver=-1,
                filter_subject=self._subject,
            )
            self._sub = await self._js.pull_subscribe(
                self._subject, durable=self._durable, stream=stream, config=config
            )
        except NotFoundError:
            await self.close()
            raise StoreError(f"{self.description}: no JetStream stream holds this subject") from None
        except (NatsError, OSError) as err:
            await self.close()
            raise StoreError(f"{self.description} is not reachable: {err!r}") from None

    async def close(self) -> None:
        if self._nc is not None:
            with contextlib.suppress(NatsError, OSError):
                await self._nc.close()
            self._nc = self._js = self._sub = None

    def _message(self, msg: Any) -> Message:
        meta = msg.metadata
        message_id = str(meta.sequence.stream)
        self._held[message_id] = msg
        fields = {"body": bytes(msg.data)}
        for key, value in (msg.headers or {}).items():
            if key not in ("body", "data"):
                fields[key] = str(value).encode()
        sent = meta.timestamp.timestamp() if meta.timestamp else time.time()
        return Message(message_id, fields, int(meta.num_delivered), int(sent * 1000))

    async def take(self, count: int, window_s: float = 0.0) -> list[Message]:
        if self._sub is None:
            raise StoreError(f"{self.description} is not open")
        out: list[Message] = []
        deadline = time.monotonic() + window_s
        wait = self._block_s
        try:
            while len(out) < count:
                try:
                    got = await self._sub.fetch(batch=count - len(out), timeout=max(wait, 0.001))
                except (NatsTimeout, TimeoutError):  # fetch raises either when nothing came
                    got = []
                out += [self._message(m) for m in got]
                wait = deadline - time.monotonic()
                if not got or window_s <= 0 or wait <= 0:
                    break
        except (NatsError, OSError) as err:
            raise StoreError(f"{self.description}: {err!r}") from None
        return out

    async def _each(self, ids: Sequence[str], action: str, **kw: Any) -> None:
        try:
            for message_id in ids:
                msg = self._held.pop(message_id, None)
                if msg is not None:
                    await getattr(msg, action)(**kw)
        except (NatsError, OSError) as err:
            raise StoreError(f"{self.description}: {err!r}") from None

    async def ack(self, ids: Sequence[str]) -> None:
        await self._each(ids, "ack")

    async def retry_in(self, ids: Sequence[str], delay_s: float) -> None:
        await self._each(ids, "nak", delay=delay_s)

    async def dead_letter(self, message: Message, dead_stream: str | None, reason: str) -> None:
        try:
            if dead_stream:
                headers = {k: v.decode(errors="replace") for k, v in message.fields.items() if k != "body"}
                headers |= {
                    "Ember-Reason": reason,
                    "Ember-Subject": self._subject,
                    "Ember-Id": message.id,
                    "Ember-Deliveries": str(message.deliveries),
                }
                await self._js.publish(dead_stream, message.fields.get("body", b""), headers=headers)
        except (NatsError, OSError) as err:
            raise StoreError(f"{self.description}: dead letter to {dead_stream!r}: {err!r}") from None
        await self._each([message.id], "term")

    async def backlog(self) -> int:
        if self._sub is None:
            raise StoreError(f"{self.description} is not open")
        try:
            info = await self._sub.consumer_info()
        except (NatsError, OSError) as err:
            raise StoreError(f"{self.description}: {err!r}") from None
        return int(info.num_pending or 0) + int(info.num_ack_pending or 0)
