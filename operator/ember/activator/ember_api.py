"""Ember's invoke API: `POST /v1/namespaces/{ns}/functions/{name}/invoke`.

- qualifier: `?qualifier=` (a Version number, an alias or `latest`), unqualified when absent;
- `X-Ember-Invocation-Type`: `sync` (default, 200), `async` (202 + request id), `dry-run` (204);
- `X-Ember-Log-Type: Tail` adds `X-Ember-Log-Result` (base64 of the last 4 KB of logs);
- replies carry `X-Ember-Executed-Version`, `X-Ember-Request-Id`, and a failed function
  `X-Ember-Function-Error: Handled|Unhandled` with status 200 and Lambda's error body;
- errors are `{"errorType", "errorMessage"}` with 400, 404, 413, 429 (+ `Retry-After`), 502, 504.

`GET /v1/namespaces/{ns}/functions/{name}/versions` lists the Function's Versions as this activator
holds them: number, phase, ready pods, the size their new pods get (`resources`: memory, CPU and
why) and right-sizing's advice (`recommendation`, `ember.activator.sizing`), as a cluster shows
them in the Version's status. `ember dev` prints their changes too.

`GET /v1/invocations/{id}` reports an asynchronous invocation (from the event store: any replica
answers, restarts included): queued, running, retrying (with `nextAttemptAt`), succeeded (with
the response) or failed (with the error and its `condition`).
"""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from ember.activator import keys
from ember.activator.dispatch import ASYNC, DRY_RUN, LAMBDA_INVOCATION_TYPES, LOG_TAIL, SYNC, HeaderNames, dispatch
from ember.activator.edge import choice, request_id
from ember.activator.errors import ActivatorError, FunctionNotFound, Throttled
from ember.activator.invoke import Result, new_request_id
from ember.activator.version_state import VersionState

INVOCATION_TYPES = {
    **LAMBDA_INVOCATION_TYPES,
    "sync": SYNC,
    "async": ASYNC,
    "dry-run": DRY_RUN,
}
HEADERS = HeaderNames(
    request_id="X-Ember-Request-Id",
    executed_version="X-Ember-Executed-Version",
    function_error="X-Ember-Function-Error",
    log_result="X-Ember-Log-Result",
    duration_ms="X-Ember-Duration-Ms",
)


def error_response(err: ActivatorError, rid: str | None = None) -> web.Response:
    headers = {"Content-Type": "application/json"}
    if rid:
        headers[HEADERS.request_id] = rid
    if isinstance(err, Throttled):
        headers["Retry-After"] = str(err.retry_after_s)
    body = json.dumps({"errorType": err.error_type, "errorMessage": err.message})
    return web.Response(status=err.status, text=body, headers=headers)


class _Replies:
    """The Ember API's replies: `X-Ember-*` headers; a sync reply's body is the agent's, as is."""

    def ran(self, result: Result) -> web.Response:
        return web.Response(status=200, body=result.reply.body, headers=HEADERS.sync(result))

    def queued(self, vs: VersionState, request_id: str) -> web.Response:
        return web.Response(
            status=202,
            text=json.dumps({"requestId": request_id, "version": vs.key.number}),
            headers={
                "Content-Type": "application/json",
                HEADERS.request_id: request_id,
                HEADERS.executed_version: vs.label,
            },
        )

    def checked(self, vs: VersionState, request_id: str) -> web.Response:
        return web.Response(status=204, headers={HEADERS.request_id: request_id, HEADERS.executed_version: vs.label})


REPLIES = _Replies()


async def invoke(request: web.Request) -> web.Response:
    rid: str | None = None
    try:
        headers = request.headers
        rid = request_id(headers.get("X-Ember-Request-Id"), "X-Ember-Request-Id", new_request_id())
        kind = choice(headers.get("X-Ember-Invocation-Type"), "X-Ember-Invocation-Type", INVOCATION_TYPES, SYNC)
        log_tail = choice(headers.get("X-Ember-Log-Type"), "X-Ember-Log-Type", LOG_TAIL, False)
        info = request.match_info
        return await dispatch(
            request,
            REPLIES,
            kind,
            namespace=info["namespace"],
            name=info["name"],
            qualifier=request.query.get("qualifier"),
            request_id=rid,
            log_tail=log_tail,
        )
    except ActivatorError as err:
        return error_response(err, rid)


async def invocation_status(request: web.Request) -> web.Response:
    rid = request.match_info["request_id"]
    try:
        status = await request.app[keys.ASYNC].status(rid)
    except ActivatorError as err:
        return error_response(err, rid)
    if status is None:
        return error_response(FunctionNotFound(f"no asynchronous invocation {rid} is known"))
    return web.json_response(status.to_json())


def version_view(vs: VersionState) -> dict[str, Any]:
    """One Version as `GET .../versions` shows it: its phase, pods and size (right-sizing)."""
    advice = vs.sizer.current if vs.sizer is not None else None
    return {
        "number": vs.key.number,
        "phase": vs.phase.value,
        "readyPods": vs.ready_pods,
        "resources": vs.resources.to_wire(),
        "recommendation": advice.to_wire() if advice is not None else None,
    }


async def versions(request: web.Request) -> web.Response:
    info = request.match_info
    try:
        fs = request.app[keys.REGISTRY].get(info["namespace"], info["name"])
    except ActivatorError as err:
        return error_response(err)
    views = [version_view(vs) for _, vs in sorted(fs.versions.items())]
    return web.json_response({"function": fs.label, "versions": views})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/namespaces/{namespace}/functions/{name}/invoke", invoke)
    app.router.add_get("/v1/namespaces/{namespace}/functions/{name}/versions", versions)
    app.router.add_get("/v1/invocations/{request_id}", invocation_status)
