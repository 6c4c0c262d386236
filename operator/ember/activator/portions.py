"""Portion calls: the one way the code of a Function reaches its portions (`ember.resources.portions`).

When the invoker runs an invocation on a pod whose code may call portions (its Version's
`callees`), it opens a call token (`CallTokens.open`: 192 random bits naming that Version and
pod), sends it to the agent with the invocation (`X-Ember-Call-Token`, CONTRACT.md) and closes
it when the invocation ends: a token is good for one invocation, on one pod, for the calls its
portion declares. A portion called runs (and waits for a pod) at most for the time its caller
has left, less a margin for the caller to handle the reply. The code's
`context.invoke_portion(name, event)` comes in through the pod's channel to the services proxy
(`ember.pods.services`: `POST <EMBER_PORTIONS_URL>/<name>`, whose path holds the pod's own
token, with the call token in `X-Ember-Call-Token`); `PortionPortal` checks it and runs the
event on the portion through the invoker like any invocation (queue, scaling, pod retries),
with a token of its own when that portion calls others in turn.

What the code gets back: 200 with the portion's result (a function error as Lambda's error body
with `X-Ember-Function-Error`), else `{"errorType", "errorMessage"}` with 401 (no open call
token: the invocation ended, or the token is another pod's), 403 (a call its portion does not
declare, or one up in trust), 404 (no such portion), 504 (the caller's time is up), or what the
invoke API answers (400, 413, 429 with `Retry-After`, 502, 504); a portion out of time is its
`Sandbox.Timedout` function error.
"""

from __future__ import annotations

import json
import logging
import time
import uuid

from aiohttp import web

from ember.activator.errors import ActivatorError, PayloadTooLarge, Throttled
from ember.activator.invoke import Invoker
from ember.pods.base import PodId
from ember.resources.portions import MAIN, may_call

log = logging.getLogger(__name__)

CALL_TOKEN_HEADER = "X-Ember-Call-Token"


class PortionPortal:
    """Serves portion calls that pods make through the services proxy (see the module docstring)."""

    def __init__(self, invoker: Invoker, max_body_bytes: int) -> None:
        self._invoker = invoker
        self._max_body = max_body_bytes

    async def __call__(self, pod: PodId, name: str, request: web.BaseRequest) -> web.StreamResponse:
        token = request.headers.get(CALL_TOKEN_HEADER, "")
        call = self._invoker.tokens.get(token)
        if call is None or call.pod != pod:
            return _refuse(pod, 401, "Unauthorized", f"no open call: {CALL_TOKEN_HEADER} must be this invocation's")
        caller = call.caller
        who = "the function's handler" if caller.portion == MAIN else f"portion {caller.portion!r}"
        callee = caller.callees.get(name)
        if callee is None:
            if name in caller.family:
                declared = ", ".join(sorted(caller.callees)) or "none"
                message = f"{who} does not declare calls to portion {name!r} (it may call: {declared})"
                return _refuse(pod, 403, "CallNotDeclared", message)
            known = ", ".join(caller.family) or "none"
            return _refuse(pod, 404, "PortionNotFound", f"no portion {name!r} (portions: {known})")
        if not may_call(caller.trust_level, callee.trust_level):  # refused at load too; checked again here
            message = f"{who} ({caller.trust_level}) may not call portion {name!r} ({callee.trust_level})"
            return _refuse(pod, 403, "CallNotAllowed", message)
        if request.method != "POST":
            return _refuse(pod, 405, "MethodNotAllowed", "portions are called with POST", allow="POST")
        left_s = call.deadline - time.monotonic()
        if left_s <= 0:
            return _refuse(pod, 504, "CallerTimedOut", f"{who} has no time left to call portion {name!r}")
        try:
            body = await _read(request, self._max_body)
            # done before the caller's own time is up (with a tenth of it, at least 250 ms, left for
            # the caller to handle the reply), whatever the portion's timeout
            by = time.monotonic() + max(0.001, left_s - max(0.25, left_s / 10))
            result = await self._invoker.invoke(callee, body, request_id=str(uuid.uuid4()), by=by)
        except ActivatorError as err:
            response = _refuse(pod, err.status, err.error_type, err.message)
            if isinstance(err, Throttled):
                response.headers["Retry-After"] = str(err.retry_after_s)
            return response
        headers = {"Content-Type": "application/json", "X-Ember-Request-Id": result.request_id}
        if result.reply.function_error:
            headers["X-Ember-Function-Error"] = result.reply.function_error
        return web.Response(status=200, body=result.reply.body, headers=headers)


async def _read(request: web.BaseRequest, limit: int) -> bytes:
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"portion event is {request.content_length} bytes; the limit is {limit}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"portion event is larger than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks) or b"{}"


def _refuse(pod: str, status: int, error_type: str, message: str, allow: str | None = None) -> web.Response:
    log.info("portion call refused pod=%s status=%d %s: %s", pod, status, error_type, message)
    body = json.dumps({"errorType": error_type, "errorMessage": message})
    response = web.Response(status=status, text=body, content_type="application/json")
    if allow is not None:
        response.headers["Allow"] = allow
    return response
