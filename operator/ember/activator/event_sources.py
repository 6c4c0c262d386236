"""Event sources (`Function.spec.eventSources`): Redis Streams and NATS JetStream subjects polled
at the rate the Function can take.

`EventSources` keeps one `Poller` per enabled source of every Function the registry serves,
reconciled once a second (a source edited is restarted, one removed or disabled stopped). Each
activator replica runs its own pollers as consumers of the source's group, so the broker shares
the messages out and none runs twice at once.

Rate matching, a poller's loop: it reads only as many batches as can start now, the room
being the Function's share of `maxScale` (its `concurrency` per pod, the replicas' share as the
scaler computes it) less what is running and queued on the Version, bounded by the source's
`maxConcurrency`. A backlog thus becomes in-flight demand up to `maxScale` (the autoscaler adds
pods for it), and past that waits in the broker, never in the activator's memory.

One batch (`_deliver`): messages must carry a `body` (or `data`) field holding JSON within the
body limit; others are poison and go straight to the dead letters with the reason. A message
delivered more than `maxRetries` + 1 times goes there too. The rest become one invocation with
SQS's event shape (`Records[]` with `messageId`, `body`, `attributes.ApproximateReceiveCount`,
`SentTimestamp`, `messageAttributes`, `eventSource` `ember:redis-stream` or
`ember:nats-jetstream`). The broker is behind `ember.sources.queue.QueueConsumer`. A success acks the
batch except the items the function names in `batchItemFailures` (Lambda's partial batch
response); a function error, a timeout or throttling retries the whole batch. Retries wait 1 s,
doubling per delivery up to 60 s. Without `deadLetterStream`, dead letters are dropped (acked,
counted, logged), as Lambda drops records without an on-failure destination.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from dataclasses import dataclass
from typing import Any

from ember.activator.errors import ActivatorError
from ember.activator.invoke import Invoker, new_request_id
from ember.activator.metrics import Metrics
from ember.activator.registry import Registry
from ember.activator.version_state import VersionState
from ember.api.function import EventSource
from ember.pods.services import Credentials, CredentialUnavailable
from ember.sources.nats_source import JetStreamConsumer
from ember.sources.queue import Message, QueueConsumer
from ember.sources.redis_stream_source import StreamConsumer
from ember.sources.store import StoreError

log = logging.getLogger(__name__)

RECONCILE_S = 1.0
RETRY_FIRST_S = 1.0
RETRY_MAX_S = 60.0
BACKLOG_EVERY_S = 5.0


@dataclass(frozen=True, slots=True)
class SourceKey:
    namespace: str
    function: str
    source: str

    @property
    def label(self) -> str:
        return f"{self.namespace}/{self.function}"


class EventSources:
    """The pollers of this activator, one per enabled source."""

    def __init__(
        self,
        registry: Registry,
        invoker: Invoker,
        credentials: Credentials,
        metrics: Metrics,
        *,
        holder: str,
        max_body_bytes: int,
    ) -> None:
        self.registry = registry
        self.invoker = invoker
        self.credentials = credentials
        self.metrics = metrics
        self.holder = holder
        self.max_body_bytes = max_body_bytes
        self._pollers: dict[SourceKey, tuple[EventSource, asyncio.Task[None]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._reconcile_loop(), name="ember-event-sources")

    async def close(self) -> None:
        tasks = [t for t in (self._task,) if t] + [task for _, task in self._pollers.values()]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._pollers.clear()

    def desired(self) -> dict[SourceKey, EventSource]:
        out: dict[SourceKey, EventSource] = {}
        for fs in self.registry.functions():
            if fs.spec is None or fs.removed:
                continue
            for source in fs.spec.event_sources:
                if source.enabled:
                    out[SourceKey(fs.namespace, fs.name, source.name)] = source
        return out

    def reconcile(self) -> None:
        want = self.desired()
        for key, (source, task) in list(self._pollers.items()):
            if want.get(key) != source or task.done():
                task.cancel()
                del self._pollers[key]
        for key, source in want.items():
            if key not in self._pollers:
                poller = Poller(key, source, self)
                self._pollers[key] = (source, asyncio.create_task(poller.run(), name=f"ember-source-{key.source}"))

    async def _reconcile_loop(self) -> None:
        while True:
            self.reconcile()
            await asyncio.sleep(RECONCILE_S)


class Poller:
    """One source of one Function in this activator: read what fits, invoke, ack or retry."""

    def __init__(self, key: SourceKey, source: EventSource, owner: EventSources) -> None:
        self.key = key
        self.source = source
        self._owner = owner
        self._in_flight = 0  # batches dispatched and not finished
        self._invoking = 0  # of them, those inside the Invoker (counted by the Version's throttler)
        self._freed = asyncio.Event()
        self._tasks: set[asyncio.Task[None]] = set()
        self._count = {
            outcome: owner.metrics.source_messages.labels(key.label, key.source, outcome)
            for outcome in ("acked", "retried", "dead_lettered", "dropped")
        }
        self._delay = owner.metrics.source_delay.labels(key.label, key.source)
        self._backlog = owner.metrics.source_backlog.labels(key.label, key.source)

    async def run(self) -> None:
        consumer = None
        try:
            consumer = await self._connect()
            await self._poll(consumer)
        finally:
            for task in list(self._tasks):
                task.cancel()
            for task in list(self._tasks):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if consumer is not None:
                await consumer.close()

    async def _connect(self) -> QueueConsumer:
        ref = self.source.connection_secret_ref
        key = ref.key or "url"
        while True:
            try:
                url = await self._owner.credentials(self.key.namespace, ref.name, key)
                fs = self._owner.registry.get(self.key.namespace, self.key.function)
                timeout = fs.spec.timeout_seconds if fs.spec is not None else 900
                group = self.source.consumer_group or f"ember-{self.key.namespace}-{self.key.function}"
                kind = JetStreamConsumer if self.source.type == "nats-jetstream" else StreamConsumer
                consumer: QueueConsumer = kind(
                    url.strip(), self.source.stream, group, self._owner.holder, visibility_s=timeout + 10.0
                )
                await consumer.start()
                return consumer
            except (CredentialUnavailable, StoreError, ActivatorError) as err:
                log.warning("event source %s of %s cannot start: %s", self.key.source, self.key.label, err)
                await asyncio.sleep(5.0)

    def _room(self, vs: VersionState) -> int:
        """Invocations this source may start now (see the module docstring)."""
        capacity = vs.capacity(max(1, self._owner.registry.replicas()))
        # The Version counts what runs or waits for a slot; batches of ours not yet in its queue count too.
        room = capacity - vs.in_flight - vs.queued - (self._in_flight - self._invoking)
        if self.source.max_concurrency is not None:
            room = min(room, self.source.max_concurrency - self._in_flight)
        return max(0, room)

    async def _poll(self, consumer: QueueConsumer) -> None:
        loop = asyncio.get_running_loop()
        backlog_at = 0.0
        while True:
            try:
                if loop.time() >= backlog_at:
                    backlog_at = loop.time() + BACKLOG_EVERY_S
                    self._backlog.set(await consumer.backlog())
                try:
                    # not invoker.resolve: a poll is no request (an idle source must not keep pods up)
                    vs = self._owner.registry.route(self.key.namespace, self.key.function, None)
                except ActivatorError:  # not ready (yet): the messages wait in the broker
                    await asyncio.sleep(1.0)
                    continue
                room = self._room(vs)
                if room <= 0:
                    self._freed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._freed.wait(), 0.05)
                    continue
                batch = self.source.batch_size
                messages = await consumer.take(room * batch, self.source.batch_window_ms / 1000)
            except StoreError as err:
                log.warning("event source %s of %s: %s", self.key.source, self.key.label, err)
                await asyncio.sleep(1.0)
                continue
            for start in range(0, len(messages), batch):
                chunk = messages[start : start + batch]
                self._in_flight += 1
                task = asyncio.create_task(self._deliver(consumer, vs, chunk))
                self._tasks.add(task)
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._in_flight -= 1
        self._freed.set()
        if not task.cancelled() and task.exception() is not None:
            log.error("event source %s of %s: a batch crashed", self.key.source, self.key.label,
                      exc_info=task.exception())  # fmt: skip

    def _poison(self, message: Message) -> str | None:
        """Why the message cannot be delivered, or None."""
        body = message.fields.get("body", message.fields.get("data"))
        if body is None:
            return f"no body field (fields: {', '.join(sorted(message.fields)) or 'none'})"
        if len(body) > self._owner.max_body_bytes:
            return f"body of {len(body)} bytes is over the limit of {self._owner.max_body_bytes}"
        try:
            json.loads(body)
        except ValueError:
            return "body is not JSON"
        if message.deliveries > self.source.max_retries + 1:  # taken again after its holder died mid-retry
            return f"retries exhausted after {message.deliveries - 1} attempts"
        return None

    async def _bury(self, consumer: QueueConsumer, message: Message, reason: str) -> None:
        await consumer.dead_letter(message, self.source.dead_letter_stream, reason)
        self._count["dead_lettered" if self.source.dead_letter_stream else "dropped"].inc()
        log.warning("event source %s of %s: message %s dead-lettered: %s", self.key.source, self.key.label,
                    message.id, reason)  # fmt: skip

    def _record(self, message: Message) -> dict[str, Any]:
        body = message.fields.get("body", message.fields.get("data", b""))
        return {
            "messageId": message.id,
            "body": body.decode(),
            "attributes": {"ApproximateReceiveCount": str(message.deliveries), "SentTimestamp": str(message.sent_ms)},
            "messageAttributes": {
                k: v.decode(errors="replace") for k, v in message.fields.items() if k not in ("body", "data")
            },
            "eventSource": f"ember:{self.source.type}",
            "eventSourceARN": f"{self.source.type}:{self.source.stream}",
        }

    async def _deliver(self, consumer: QueueConsumer, vs: VersionState, messages: list[Message]) -> None:
        good: list[Message] = []
        for message in messages:
            reason = self._poison(message)
            if reason is None:
                good.append(message)
            else:
                await self._bury(consumer, message, reason)
        if not good:
            return
        vs.mark_requested(time.monotonic(), qualified=False)
        now_ms = time.time() * 1000  # stream ids carry wall-clock milliseconds
        for message in good:
            if message.deliveries == 1:
                self._delay.observe(max(0.0, (now_ms - message.sent_ms) / 1000))
        event = json.dumps({"Records": [self._record(m) for m in good]}).encode()
        self._invoking += 1  # no await before the Invoker takes a slot or joins the queue
        try:
            result = await self._owner.invoker.invoke(vs, event, request_id=new_request_id())
        except ActivatorError as err:
            await self._retry(consumer, good, f"{err.error_type}: {err.message}")
            return
        finally:
            self._invoking -= 1
        if result.reply.function_error:
            await self._retry(consumer, good, f"function error {result.reply.function_error}")
            return
        failed = _failures(result.reply.body, {m.id for m in good})
        if failed is None:  # a malformed batchItemFailures: Lambda retries the whole batch
            await self._retry(consumer, good, "malformed batchItemFailures in the response")
            return
        await consumer.ack([m.id for m in good if m.id not in failed])
        self._count["acked"].inc(len(good) - len(failed))
        if failed:
            await self._retry(consumer, [m for m in good if m.id in failed], "listed in batchItemFailures")

    async def _retry(self, consumer: QueueConsumer, messages: list[Message], why: str) -> None:
        """Again after a delay; those that had their last attempt go to the dead letters now."""
        last = self.source.max_retries + 1
        for message in [m for m in messages if m.deliveries >= last]:
            await self._bury(consumer, message, f"retries exhausted after {message.deliveries} attempts ({why})")
        messages = [m for m in messages if m.deliveries < last]
        if not messages:
            return
        delay = min(RETRY_FIRST_S * 2 ** (min(m.deliveries for m in messages) - 1), RETRY_MAX_S)
        await consumer.retry_in([m.id for m in messages], delay)
        self._count["retried"].inc(len(messages))
        log.info("event source %s of %s: %d message(s) again in %.0f s: %s", self.key.source, self.key.label,
                 len(messages), delay, why)  # fmt: skip


def _failures(body: bytes, ids: set[str]) -> set[str] | None:
    """The ids a partial batch response names; empty for any other success; None when malformed."""
    try:
        reply = json.loads(body)
    except ValueError:
        return set()
    if not isinstance(reply, dict) or "batchItemFailures" not in reply:
        return set()
    items = reply["batchItemFailures"]
    if items is None:
        return set()
    if not isinstance(items, list):
        return None
    out: set[str] = set()
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("itemIdentifier"), str):
            return None
        if item["itemIdentifier"] not in ids:
            return None
        out.add(item["itemIdentifier"])
    return out
