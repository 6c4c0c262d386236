"""Asynchronous invocations (Lambda's `Event` type): durable, retried as Lambda retries, and
sent on to their destinations.

`dispatch` resolves the function first (a 404 is immediate), then `submit` stores the event in
the `EventStore` (`ember.sources`) and the API answers 202 only once it is durable. The event
names its Function and qualifier, not a Version: it is resolved again when it runs.

The worker loop leases due events while it has free slots (`ActivatorConfig.async_workers`)
and runs each in a task of its own, but never more of one Function at once than it can run
(`VersionState.capacity`: its share of `maxScale` times `concurrency`): those it has no room for
are parked in the store, and let go again (`unpark`) as its runs finish. So a slow Function at
its `maxScale` holds only its own share of the workers, its backlog waits in the store, and
the other Functions' events run past it. A second loop extends the leases of the running ones, so
a worker that dies (SIGKILL, a lost node) lets its events go when their lease runs out and
another worker, or the restarted one, runs them: at least once. One event, `_run`:

- the Function is looked up now: deleted → failed (`FunctionNotFound`), dead-lettered;
- older than its `spec.async.maxEventAgeSeconds` → failed (`EventAgeExceeded`) → `onFailure`;
- throttled, no pod in time, a Version not ready, a pod lost (system errors) → again after
  1 s, doubling up to 5 min, while the event is young enough;
- a function error → again `spec.async.maxRetries` times (0-2), after `retry_base_s`, then twice
  that (Lambda: 1 min then 2 min), then failed (`RetriesExhausted`) → `onFailure`;
- success → `onSuccess`.

A destination Function (same namespace) gets Lambda's destination record as an asynchronous
invocation of its own (`record`), stored with the event's outcome, so neither is lost. A stream
destination (a Redis stream or a NATS JetStream subject, `ember.sources.publish`) gets it as a
message, tried for up to `DESTINATION_RETRY_S` while the event keeps its lease; a broker still
unreachable then drops the record (counted, logged), as Lambda drops a record it cannot deliver,
and the event finishes: its function is not run again for its destination's sake. Every step
writes the event's status, which `GET /v1/invocations/{id}` reads from the store: on every
replica, after restarts.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from ember.activator.errors import ActivatorError, FunctionNotFound, StoreUnavailable
from ember.activator.invoke import Invoker, Result
from ember.activator.metrics import Metrics
from ember.activator.version_state import VersionState
from ember.api.function import Destination
from ember.pods.services import Credentials, CredentialUnavailable, no_credentials
from ember.sources.publish import Publishers
from ember.sources.store import Event, EventStore, State, Status, StoreError

log = logging.getLogger(__name__)

SYSTEM_RETRY_FIRST_S = 1.0
SYSTEM_RETRY_MAX_S = 300.0
DESTINATION_RETRY_S = 60.0
UNPARK_EVERY_S = 0.5  # how often to look for parked events of other replicas' making


class AsyncInvocations:
    """Stores submitted events and runs them from the store."""

    def __init__(
        self,
        invoker: Invoker,
        store: EventStore,
        metrics: Metrics,
        *,
        workers: int,
        holder: str,
        credentials: Credentials = no_credentials,
        lease_s: float = 30.0,
        retry_base_s: float = 60.0,
        poll_s: float = 0.05,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self._metrics = metrics
        self._invoker = invoker
        self._workers = workers
        self._holder = holder
        self._credentials = credentials
        self._publishers = Publishers()
        self._lease_s = lease_s
        self._retry_base_s = retry_base_s
        self._poll_s = poll_s
        self._clock = clock
        self._running: dict[str, tuple[Event, asyncio.Task[None]]] = {}
        self._per_function: collections.Counter[str] = collections.Counter()  # running events by namespace/name
        self._parked: dict[str, int] = {}  # as the store said last
        self._unpark_at = 0.0
        self._freed = asyncio.Event()
        self._submitted = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    async def submit(
        self, vs: VersionState, qualifier: str | None, body: bytes, request_id: str, idempotency_key: str | None
    ) -> str:
        """Store one event (durably) and return its id: an earlier one's for a repeated idempotency key."""
        fs = vs.fs
        key = f"{fs.namespace}/{fs.name}/{idempotency_key}" if idempotency_key else None
        event = Event(request_id, fs.namespace, fs.name, qualifier, body, self._clock())
        try:
            stored = await self.store.put(event, key)
        except StoreError as err:
            raise StoreUnavailable(f"the asynchronous invocation was not accepted: {err}") from None
        self._submitted.set()
        return stored

    async def status(self, event_id: str) -> Status | None:
        try:
            return await self.store.status(event_id)
        except StoreError as err:
            raise StoreUnavailable(str(err)) from None

    async def start(self) -> None:
        await self.store.start()
        self._tasks = [
            asyncio.create_task(self._lease_loop(), name="ember-async-lease"),
            asyncio.create_task(self._renew_loop(), name="ember-async-renew"),
        ]

    async def close(self, drain_s: float = 10.0) -> None:
        """Stop leasing; let running events finish for up to `drain_s`, then cancel the rest and
        hand them back to the store at once (another worker need not wait for their leases)."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        running = dict(self._running)
        if running:
            await asyncio.wait([task for _, task in running.values()], timeout=drain_s)
        for event_id, (event, task) in running.items():
            if task.done():
                continue
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            event.not_before = self._clock()
            with contextlib.suppress(StoreError):
                await self.store.retry_later(event, self._status(event, State.QUEUED))
            log.info("asynchronous invocation %s handed back to the store at shutdown", event_id)
        await self._publishers.close()
        await self.store.close()

    async def _lease_loop(self) -> None:
        while True:
            free = self._workers - len(self._running)
            if free <= 0:
                self._freed.clear()
                await self._freed.wait()
                continue
            try:
                await self._unpark()
                events = await self.store.lease(self._holder, free, self._lease_s)
                aside: list[Event] = []
                for event in events:
                    if event.id in self._running:  # a lease of ours taken over by ourselves: already running
                        continue
                    room = self._capacity(event.namespace, event.function, event.qualifier)
                    if self._per_function[event.label] >= room:
                        aside.append(event)
                        continue
                    self._per_function[event.label] += 1
                    task = asyncio.create_task(self._run_one(event), name=f"ember-async-{event.id}")
                    self._running[event.id] = (event, task)
                if aside:
                    await self.store.park(aside)
                    self._unpark_at = 0.0  # a run may have ended meanwhile: look again at once
            except StoreError as err:
                log.warning("cannot lease asynchronous invocations: %s", err)
                await asyncio.sleep(1.0)
                continue
            if not events:  # (all parked: look again at once, more may be behind them)
                self._submitted.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._submitted.wait(), self._poll_s)

    def _capacity(self, namespace: str, name: str, qualifier: str | None = None) -> int:
        """How many of a Function's events this replica may run at once; unbounded when it cannot
        be resolved now (`_run` then fails or retries them as it should)."""
        try:
            vs = self._invoker.registry.route(namespace, name, qualifier)
        except ActivatorError:
            return self._workers
        return vs.capacity(max(1, self._invoker.registry.replicas()))

    async def _unpark(self) -> None:
        """Let parked events go again, as many per Function as it has room for here."""
        now = time.monotonic()
        if now < self._unpark_at:
            return
        self._unpark_at = now + UNPARK_EVERY_S
        parked = await self.store.parked()
        for label in self._parked.keys() - parked.keys():
            self._metrics.async_parked.labels(label).set(0)
        for label, count in parked.items():
            self._metrics.async_parked.labels(label).set(count)
        self._parked = parked
        for label, count in self._parked.items():
            namespace, _, name = label.partition("/")
            room = self._capacity(namespace, name) - self._per_function[label]
            if room > 0:
                await self.store.unpark(label, min(room, count))

    async def _renew_loop(self) -> None:
        while True:
            await asyncio.sleep(self._lease_s / 3)
            try:
                await self.store.extend(self._holder, [event for event, _ in self._running.values()], self._lease_s)
                self._metrics.async_depth.set(await self.store.depth())
            except StoreError as err:
                log.warning("cannot extend the leases of running asynchronous invocations: %s", err)

    def _count(self, event: Event, outcome: str) -> None:
        self._metrics.async_events.labels(event.label, outcome).inc()

    async def _run_one(self, event: Event) -> None:
        try:
            await self._run(event)
        except StoreError as err:  # the outcome is not written: the lease runs out, the event runs again
            log.warning("asynchronous invocation %s: the store failed: %s", event.id, err)
        except Exception:
            log.exception("asynchronous invocation crashed request_id=%s", event.id)
        finally:
            self._running.pop(event.id, None)
            self._per_function[event.label] -= 1
            if self._per_function[event.label] <= 0:
                del self._per_function[event.label]
            if event.label in self._parked:
                self._unpark_at = 0.0
            self._freed.set()

    def _status(self, event: Event, state: State, **fields: Any) -> Status:
        return Status(
            event.id,
            state,
            event.label,
            event.enqueued_at,
            self._clock(),
            attempts=event.attempts,
            **fields,
        )

    async def _run(self, event: Event) -> None:
        now = self._clock()
        try:
            fs = self._invoker.registry.get(event.namespace, event.function)
        except FunctionNotFound as err:
            await self.store.dead_letter(event, self._status(event, State.FAILED, condition="FunctionNotFound",
                                                             result=err.message))  # fmt: skip
            self._count(event, "failed")
            return
        config = fs.spec.async_ if fs.spec is not None else None
        max_age = config.max_event_age_seconds if config else 21600
        if now - event.enqueued_at > max_age:
            await self._fail(event, None, "EventAgeExceeded", None, f"the event is older than {max_age} s")
            return
        try:
            vs = self._invoker.resolve(event.namespace, event.function, event.qualifier)
        except FunctionNotFound as err:  # the qualifier is gone (an alias deleted, a Version removed)
            await self.store.dead_letter(event, self._status(event, State.FAILED, condition="FunctionNotFound",
                                                             result=err.message))  # fmt: skip
            self._count(event, "failed")
            return
        except ActivatorError as err:  # not ready: a system error
            await self._system_retry(event, None, max_age, err)
            return
        event.attempts += 1
        if event.attempts == 1:
            self._metrics.async_delay.labels(fs.label).observe(max(0.0, now - event.enqueued_at))
        await self.store.mark(self._status(event, State.RUNNING, version=vs.key.number))
        try:
            result = await self._invoker.invoke(vs, event.body, request_id=event.id)
        except ActivatorError as err:
            await self._system_retry(event, vs, max_age, err)
            return
        error = result.reply.function_error
        payload = _json_or_text(result.reply.body)
        if not error:
            if config and config.on_success:  # sent first: a crash before the ack sends it again, under the same id
                await self._send(config.on_success, "onSuccess", event, vs, "Success", result, payload)
            done = self._status(event, State.SUCCEEDED, version=vs.key.number, result=payload)
            await self.store.ack(event, done)
            self._count(event, "succeeded")
            log.info("async invocation done request_id=%s function=%s attempts=%d", event.id, fs.label, event.attempts)
            return
        max_retries = config.max_retries if config else 2
        if event.retries >= max_retries:
            await self._fail(event, vs, "RetriesExhausted", result, payload)
            return
        event.retries += 1
        event.not_before = self._clock() + self._retry_base_s * event.retries
        if event.not_before - event.enqueued_at > max_age:
            await self._fail(event, vs, "EventAgeExceeded", result, payload)
            return
        retrying = self._status(event, State.RETRYING, version=vs.key.number, next_attempt_at=event.not_before,
                                function_error=error, result=payload)  # fmt: skip
        await self.store.retry_later(event, retrying)
        self._count(event, "retried")

    async def _system_retry(self, event: Event, vs: VersionState | None, max_age: float, err: ActivatorError) -> None:
        system_tries = max(event.attempts - event.retries, 1)
        delay = min(SYSTEM_RETRY_FIRST_S * 2 ** (system_tries - 1), SYSTEM_RETRY_MAX_S)
        event.not_before = self._clock() + delay
        if event.not_before - event.enqueued_at > max_age:
            await self._fail(event, vs, "EventAgeExceeded", None, f"{err.error_type}: {err.message}")
            return
        version = vs.key.number if vs else None
        retrying = self._status(event, State.RETRYING, version=version, next_attempt_at=event.not_before,
                                function_error=err.error_type, result=err.message)  # fmt: skip
        await self.store.retry_later(event, retrying)
        self._count(event, "retried")

    async def _fail(
        self, event: Event, vs: VersionState | None, condition: str, result: Result | None, payload: Any
    ) -> None:
        fs = self._invoker.registry.get(event.namespace, event.function)
        on_failure = fs.spec.async_.on_failure if fs.spec is not None else None
        if on_failure:  # sent first: a crash before the dead letter sends it again, under the same id
            await self._send(on_failure, "onFailure", event, vs, condition, result, payload)
        error = result.reply.function_error if result else None
        failed = self._status(event, State.FAILED, version=vs.key.number if vs else None, function_error=error,
                              condition=condition, result=payload)  # fmt: skip
        await self.store.dead_letter(event, failed)
        self._count(event, "failed")
        log.info("async invocation failed request_id=%s function=%s/%s condition=%s attempts=%d",
                 event.id, event.namespace, event.function, condition, event.attempts)  # fmt: skip

    async def _send(
        self,
        destination: Destination,
        kind: str,
        event: Event,
        vs: VersionState | None,
        condition: str,
        result: Result | None,
        payload: Any,
    ) -> None:
        """The destination record to a Function, as an asynchronous invocation of it (a StoreError
        propagates: the event is not finished, its lease runs out, it runs and sends again), or to
        a stream (see the module docstring)."""
        body = json.dumps(record(event, vs, condition, result, payload)).encode()
        record_id = destination_id(event.id, kind)
        label = event.label
        if destination.function is not None:
            target = Event(record_id, event.namespace, destination.function, None, body, self._clock())
            await self.store.put(target)
            self._submitted.set()
            self._metrics.async_destinations.labels(label, kind, "sent").inc()
            return
        ref, stream, broker = destination.connection_secret_ref, destination.stream, destination.type
        if ref is None or stream is None or broker is None:  # Destination's validator refuses this
            raise ValueError(f"destination {destination} is neither a Function nor a whole stream")
        deadline = time.monotonic() + DESTINATION_RETRY_S
        delay = 0.5
        while True:
            try:
                url = await self._credentials(event.namespace, ref.name, ref.key or "url")
                await self._publishers.publish(broker, url.strip(), stream, body, record_id)
                self._metrics.async_destinations.labels(label, kind, "sent").inc()
                return
            except (CredentialUnavailable, StoreError) as err:
                if time.monotonic() + delay > deadline:
                    self._metrics.async_destinations.labels(label, kind, "failed").inc()
                    log.error("asynchronous invocation %s: its %s record is dropped after %.0f s: %s",
                              event.id, kind, DESTINATION_RETRY_S, err)  # fmt: skip
                    return
                log.warning("asynchronous invocation %s: %s record not sent yet: %s", event.id, kind, err)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 8.0)


def destination_id(event_id: str, kind: str) -> str:
    """The request id of the record an event sends to its `onSuccess` or `onFailure`: the same
    every time (a record sent twice after a crash is stored once)."""
    return str(uuid.uuid5(uuid.NAMESPACE_URL, f"ember:{kind}:{event_id}"))


def arn(namespace: str, function: str, qualifier: str | None = None) -> str:
    """Lambda's ARN of a Function: the namespace is the account field (as the Lambda API reads it)."""
    base = f"arn:aws:lambda:us-east-1:{namespace}:function:{function}"
    return f"{base}:{qualifier}" if qualifier else base


def record(
    event: Event, vs: VersionState | None, condition: str, result: Result | None, payload: Any
) -> dict[str, Any]:
    """Lambda's destination record for one finished asynchronous invocation."""
    out: dict[str, Any] = {
        "version": "1.0",
        "timestamp": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "requestContext": {
            "requestId": event.id,
            "functionArn": arn(event.namespace, event.function, vs.label if vs else event.qualifier),
            "condition": condition,
            "approximateInvokeCount": event.attempts,
        },
        "requestPayload": _json_or_text(event.body),
    }
    if result is not None:
        context: dict[str, Any] = {"statusCode": 200, "executedVersion": result.version.label}
        if result.reply.function_error:
            context["functionError"] = result.reply.function_error
        out["responseContext"] = context
        out["responsePayload"] = payload
    return out


def _json_or_text(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return body.decode(errors="replace")
