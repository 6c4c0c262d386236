"""The event store's interface and records: what an asynchronous invocation is while it waits.

An `Event` is stored by `put` before the API answers 202 (durably: a process killed after the
202 loses nothing), handed to one worker at a time by `lease` (a lease runs out unless its
holder `extend`s it, so the events of a worker that died are leased again: at least once),
and leaves the queue by `ack` (done, for good or ill), `retry_later` (back in the queue, due at
`not_before`, with its counters) or `dead_letter` (kept aside with the reason). `park` sets
leased events aside, leased by nobody, until `unpark` lets some of one Function's go again: the
worker parks what its Function has no room for, so a Function at its `maxScale` waits in the
store and the others' events run past it. Each step
writes the event's `Status`, which `status` reads from any replica for `GET
/v1/invocations/{id}` while it is kept (`STATUS_TTL_S`). An idempotency key makes a repeated
`put` within `IDEMPOTENCY_WINDOW_S` store nothing and return the first event's id.

Events name their Function and qualifier, not a Version: the worker resolves them when they
run. Times are wall-clock seconds (`time.time()`): they outlive the process.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit, urlunsplit

STATUS_TTL_S = 24 * 3600.0  # a status is kept this long after its last change
IDEMPOTENCY_WINDOW_S = 6 * 3600.0  # Lambda's longest event age: a retried enqueue within it is a no-op


def redacted(url: str) -> str:
    """The URL without its password, for messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


# Every Redis client: a command that gets no answer fails (and its connection is dropped) rather
# than hanging its caller; blocking reads block for far less than this.
SOCKET_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 5.0


class StoreError(Exception):
    """The store cannot be reached or refused a write; the message names the store."""


class State(enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    RETRYING = "retrying"
    SUCCEEDED = "succeeded"
    FAILED = "failed"


@dataclass(slots=True)
class Event:
    """One asynchronous invocation waiting in (or leased from) the store."""

    id: str
    namespace: str
    function: str
    qualifier: str | None
    body: bytes
    enqueued_at: float
    attempts: int = 0  # times it was started (Lambda's approximateInvokeCount)
    retries: int = 0  # retries after a function error (at most spec.async.maxRetries)
    not_before: float = 0.0  # due time; 0 is at once
    receipt: str = ""  # the store's handle of this delivery (a stream entry id); not part of the event

    @property
    def label(self) -> str:
        """Its Function as namespace/name."""
        return f"{self.namespace}/{self.function}"

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "namespace": self.namespace,
            "function": self.function,
            "qualifier": self.qualifier,
            "enqueuedAt": self.enqueued_at,
            "attempts": self.attempts,
            "retries": self.retries,
            "notBefore": self.not_before,
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any], body: bytes, receipt: str = "") -> Event:
        return cls(
            id=str(doc["id"]),
            namespace=str(doc["namespace"]),
            function=str(doc["function"]),
            qualifier=doc.get("qualifier"),
            body=body,
            enqueued_at=float(doc["enqueuedAt"]),
            attempts=int(doc.get("attempts", 0)),
            retries=int(doc.get("retries", 0)),
            not_before=float(doc.get("notBefore", 0.0)),
            receipt=receipt,
        )


@dataclass(slots=True)
class Status:
    """Where an asynchronous invocation is, as `GET /v1/invocations/{id}` reports it."""

    id: str
    state: State
    function: str  # namespace/name
    enqueued_at: float
    updated_at: float
    version: int | None = None  # the Version of the last attempt
    attempts: int = 0
    next_attempt_at: float | None = None
    function_error: str | None = None
    condition: str | None = None  # why it failed for good: RetriesExhausted, EventAgeExceeded, ...
    result: Any = field(default=None)  # the response payload, or the error's message

    def to_json(self) -> dict[str, Any]:
        return {
            "requestId": self.id,
            "state": self.state.value,
            "function": self.function,
            "version": self.version,
            "attempts": self.attempts,
            "enqueuedAt": self.enqueued_at,
            "updatedAt": self.updated_at,
            "nextAttemptAt": self.next_attempt_at,
            "functionError": self.function_error,
            "condition": self.condition,
            "result": self.result,
        }

    def dumps(self) -> str:
        return json.dumps(self.to_json(), separators=(",", ":"))

    @classmethod
    def loads(cls, text: str | bytes) -> Status:
        doc = json.loads(text)
        return cls(
            id=doc["requestId"],
            state=State(doc["state"]),
            function=doc["function"],
            enqueued_at=doc["enqueuedAt"],
            updated_at=doc["updatedAt"],
            version=doc.get("version"),
            attempts=doc.get("attempts", 0),
            next_attempt_at=doc.get("nextAttemptAt"),
            function_error=doc.get("functionError"),
            condition=doc.get("condition"),
            result=doc.get("result"),
        )


def queued_status(event: Event) -> Status:
    return Status(event.id, State.QUEUED, event.label, event.enqueued_at, event.enqueued_at)


class EventStore(Protocol):
    """Durable queue of asynchronous invocations; every method may raise StoreError."""

    description: str  # for messages and the banner: "sqlite .ember/async.db", "redis redis:6379/0"

    async def start(self) -> None:
        """Open the store (create its tables, groups)."""
        ...

    async def close(self) -> None: ...

    async def put(self, event: Event, idempotency_key: str | None = None) -> str:
        """Store the event, queued; returns its id, or an earlier event's id when the key was used
        within the window (then nothing is stored). Returns only once the event is durable."""
        ...

    async def lease(self, holder: str, count: int, lease_s: float) -> list[Event]:
        """Up to `count` due events nobody holds (or whose holder's lease ran out), now held by
        `holder` for `lease_s`; the worker marks them running. Every holder of a store leases
        for the same `lease_s` (Redis tells an expired lease by the entry's idle time)."""
        ...

    async def extend(self, holder: str, events: Sequence[Event], lease_s: float) -> None:
        """Keep holding these events for another `lease_s`."""
        ...

    async def mark(self, status: Status) -> None:
        """Write a status without moving the event (e.g. running, with its Version)."""
        ...

    async def ack(self, event: Event, status: Status) -> None:
        """The event is done (succeeded, or failed for good): remove it, keep its status."""
        ...

    async def retry_later(self, event: Event, status: Status) -> None:
        """Put the event back, due at `event.not_before`, with its counters; nobody holds it."""
        ...

    async def dead_letter(self, event: Event, status: Status) -> None:
        """Remove the event from the queue into the dead letters (kept with its status)."""
        ...

    async def park(self, events: Sequence[Event]) -> None:
        """Set these leased events aside: nobody holds them and `lease` skips them until
        `unpark`; their status is left as it is. A store may set aside the other due events of
        the same Functions that nobody holds as well (they wait for the same room): SQLite
        does, in one statement, so a backlog is set aside at once rather than a lease at a time."""
        ...

    async def unpark(self, function: str, count: int) -> int:
        """Let up to `count` parked events of `function` (namespace/name) be leased again, first
        parked first; returns how many."""
        ...

    async def parked(self) -> dict[str, int]:
        """Functions (namespace/name) with parked events, and how many each."""
        ...

    async def status(self, event_id: str) -> Status | None:
        """The last status of the event, None when unknown (or no longer kept)."""
        ...

    async def depth(self) -> int:
        """Events waiting (parked too) or running (not counting dead letters)."""
        ...
