"""What each invocation type does (sync, async = Lambda's Event, dry-run), once for every API.

An API handler parses its own request (its header names and values, its way of naming a
function) into an `InvocationType` and a target, calls `dispatch`, and maps any
`ActivatorError` to its own error reply. Between the two, in this order:

1. the body is read within the configured limit (so an oversized body is a 413 whatever the
   type, even for a function that does not exist);
2. the function and qualifier resolve to the Version that serves (404 / 502 otherwise);
3. dry-run stops there: the function can serve, nothing runs, nothing is counted;
   async checks that the body is JSON (no agent will before the 202) and stores it durably
   (`X-Ember-Idempotency-Key`: the same key again within the window is the same event, and the
   reply names the first one's request id; 503 when the store is unreachable); sync runs it on
   a pod through the `Invoker`.

The reply for each outcome is shaped by the API's `Replies`, one instance per API built at
import: the dispatch itself allocates nothing per request. What the agent reports about a sync
run (function error, log tail, duration) becomes headers in one place, `HeaderNames.sync`, under
each API's own names.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Protocol

from aiohttp import web

from ember.activator import keys
from ember.activator.edge import idempotency_key, read_body, require_json
from ember.activator.invoke import Result
from ember.activator.version_state import VersionState


class InvocationType(enum.Enum):
    SYNC = "sync"
    ASYNC = "async"
    DRY_RUN = "dry-run"


# The members again as module globals, for the hot path: `InvocationType.SYNC` is a class
# attribute lookup through the Enum metaclass, ~0.3 µs on Python 3.11, twice per request.
SYNC, ASYNC, DRY_RUN = InvocationType.SYNC, InvocationType.ASYNC, InvocationType.DRY_RUN


# Lambda's names of the invocation types and log types (header values, case-insensitive); the
# Ember API accepts these and a few of its own.
LAMBDA_INVOCATION_TYPES = {"requestresponse": SYNC, "event": ASYNC, "dryrun": DRY_RUN}
LOG_TAIL = {"none": False, "tail": True}
IDEMPOTENCY_HEADER = "X-Ember-Idempotency-Key"


class Replies(Protocol):
    """How one API answers each invocation type once it succeeded (errors it maps itself)."""

    def ran(self, result: Result) -> web.Response:
        """Sync: the agent's reply (200, also for a function error)."""
        ...

    def queued(self, vs: VersionState, request_id: str) -> web.Response:
        """Async: accepted (202)."""
        ...

    def checked(self, vs: VersionState, request_id: str) -> web.Response:
        """Dry-run: the function can serve (204)."""
        ...


@dataclass(frozen=True, slots=True)
class HeaderNames:
    """One API's names for what a sync reply says besides its body; None: the API does not say it."""

    request_id: str
    executed_version: str
    function_error: str
    log_result: str
    duration_ms: str | None = None

    def sync(self, result: Result) -> dict[str, str]:
        """The headers of a sync reply: JSON, which request and Version, and what the agent reported."""
        reply = result.reply
        out = {
            "Content-Type": "application/json",
            self.request_id: result.request_id,
            self.executed_version: result.version.label,
        }
        if reply.function_error:
            out[self.function_error] = reply.function_error
        if reply.log_result:
            out[self.log_result] = reply.log_result
        if reply.duration_ms and self.duration_ms:
            out[self.duration_ms] = reply.duration_ms
        return out


async def dispatch(
    request: web.Request,
    replies: Replies,
    kind: InvocationType,
    *,
    namespace: str,
    name: str,
    qualifier: str | None,
    request_id: str,
    log_tail: bool,
) -> web.Response:
    """Run one parsed request as its invocation type; raises ActivatorError for the API to map."""
    app = request.app
    body = await read_body(request, app[keys.CONFIG].max_body_bytes)
    invoker = app[keys.INVOKER]
    vs = invoker.resolve(namespace, name, qualifier)
    if kind is SYNC:
        return replies.ran(await invoker.invoke(vs, body, request_id=request_id, log_tail=log_tail))
    if kind is ASYNC:
        require_json(body)
        key = idempotency_key(request.headers.get(IDEMPOTENCY_HEADER))
        stored = await app[keys.ASYNC].submit(vs, qualifier, body, request_id, key)
        return replies.queued(vs, stored)
    return replies.checked(vs, request_id)
