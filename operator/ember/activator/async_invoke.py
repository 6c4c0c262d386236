"""Asynchronous invocations (Lambda's `Event` type), held in memory in this version.

`dispatch` resolves the function and qualifier first (a 404 is immediate); `submit` queues
the event (bounded; a full queue throttles) for the API's 202. Workers run queued
events through the same `Invoker`, retrying a failed attempt up to the Function's
`spec.async.maxRetries` with backoff. The last outcomes are kept for `GET
/v1/invocations/{id}`. Durable queues come with the event-source work; a restart loses what
is queued here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from ember.activator.errors import ActivatorError, Throttled
from ember.activator.invoke import Invoker
from ember.activator.version_state import VersionState

log = logging.getLogger(__name__)

OUTCOMES_KEPT = 10_000


@dataclass(slots=True)
class _Event:
    version: VersionState
    body: bytes
    request_id: str
    attempts: int = 0


@dataclass(slots=True)
class Outcome:
    """Where an asynchronous invocation is: queued, running, succeeded or failed."""

    state: str
    function: str
    version: int
    attempts: int = 0
    function_error: str | None = None
    result: Any = field(default=None)

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "function": self.function,
            "version": self.version,
            "attempts": self.attempts,
            "functionError": self.function_error,
            "result": self.result,
        }


class AsyncInvocations:
    """The in-memory queue and its workers."""

    def __init__(self, invoker: Invoker, *, depth: int, workers: int) -> None:
        self._invoker = invoker
        self._queue: asyncio.Queue[_Event] = asyncio.Queue(maxsize=depth)
        self._workers = workers
        self._tasks: list[asyncio.Task[None]] = []
        self.outcomes: OrderedDict[str, Outcome] = OrderedDict()

    def submit(self, vs: VersionState, body: bytes, request_id: str) -> None:
        """Queue one event; Throttled when the queue is full."""
        try:
            self._queue.put_nowait(_Event(vs, body, request_id))
        except asyncio.QueueFull:
            raise Throttled(f"asynchronous invocation queue is full ({self._queue.maxsize} events)") from None
        self._remember(request_id, Outcome("queued", vs.fs.label, vs.key.number))

    def _remember(self, request_id: str, outcome: Outcome) -> None:
        self.outcomes[request_id] = outcome
        self.outcomes.move_to_end(request_id)
        while len(self.outcomes) > OUTCOMES_KEPT:
            self.outcomes.popitem(last=False)

    async def start(self) -> None:
        self._tasks = [asyncio.create_task(self._work(), name=f"ember-async-{i}") for i in range(self._workers)]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def _work(self) -> None:
        while True:
            event = await self._queue.get()
            try:
                await self._attempt(event)
            except Exception:
                log.exception("async invocation crashed request_id=%s", event.request_id)
            finally:
                self._queue.task_done()

    async def _attempt(self, event: _Event) -> None:
        vs = event.version
        max_retries = vs.spec.async_.max_retries
        while True:
            event.attempts += 1
            self._remember(event.request_id, Outcome("running", vs.fs.label, vs.key.number, event.attempts))
            try:
                result = await self._invoker.invoke(vs, event.body, request_id=event.request_id)
                failed = result.reply.function_error
                outcome = Outcome(
                    "failed" if failed else "succeeded",
                    vs.fs.label,
                    vs.key.number,
                    event.attempts,
                    failed,
                    _json_or_text(result.reply.body),
                )
            except ActivatorError as err:
                failed = err.error_type
                outcome = Outcome("failed", vs.fs.label, vs.key.number, event.attempts, err.error_type, err.message)
            self._remember(event.request_id, outcome)
            if not failed or event.attempts > max_retries:
                log.info(
                    "async invocation done request_id=%s function=%s state=%s attempts=%d",
                    event.request_id,
                    vs.fs.label,
                    outcome.state,
                    event.attempts,
                )
                return
            await asyncio.sleep(min(0.2 * 2**event.attempts, 5.0))


def _json_or_text(body: bytes) -> Any:
    try:
        return json.loads(body)
    except ValueError:
        return body.decode(errors="replace")
