"""Ember's invoke API: `POST /v1/namespaces/{ns}/functions/{name}/invoke`.

- qualifier: `?qualifier=` (a Version number, an alias or `latest`), unqualified when absent;
- `X-Ember-Invocation-Type`: `sync` (default, 200), `async` (202 + request id), `dry-run` (204);
- `X-Ember-Log-Type: Tail` adds `X-Ember-Log-Result` (base64 of the last 4 KB of logs);
- replies carry `X-Ember-Executed-Version`, `X-Ember-Request-Id`, and a failed function
  `X-Ember-Function-Error: Handled|Unhandled` with status 200 and Lambda's error body;
- errors are `{"errorType", "errorMessage"}` with 400, 404, 413, 429 (+ `Retry-After`), 502, 504.

`GET /v1/invocations/{id}` reports an asynchronous invocation.
"""

from __future__ import annotations

import json

from aiohttp import web

from ember.activator import keys
from ember.activator.edge import choice, read_body, request_id, require_json
from ember.activator.errors import ActivatorError, FunctionNotFound, Throttled
from ember.activator.invoke import new_request_id

INVOCATION_TYPES = {
    "sync": "sync",
    "requestresponse": "sync",
    "async": "async",
    "event": "async",
    "dry-run": "dry-run",
    "dryrun": "dry-run",
}
LOG_TYPES = {"none": "none", "tail": "tail"}


def error_response(err: ActivatorError, rid: str | None = None) -> web.Response:
    headers = {"Content-Type": "application/json"}
    if rid:
        headers["X-Ember-Request-Id"] = rid
    if isinstance(err, Throttled):
        headers["Retry-After"] = str(err.retry_after_s)
    body = json.dumps({"errorType": err.error_type, "errorMessage": err.message})
    return web.Response(status=err.status, text=body, headers=headers)


async def invoke(request: web.Request) -> web.Response:
    invoker = request.app[keys.INVOKER]
    config = request.app[keys.CONFIG]
    rid: str | None = None
    try:
        headers = request.headers
        rid = request_id(headers.get("X-Ember-Request-Id"), "X-Ember-Request-Id", new_request_id())
        kind = choice(headers.get("X-Ember-Invocation-Type"), "X-Ember-Invocation-Type", INVOCATION_TYPES, "sync")
        log_tail = choice(headers.get("X-Ember-Log-Type"), "X-Ember-Log-Type", LOG_TYPES, "none") == "tail"
        body = await read_body(request, config.max_body_bytes)
        info = request.match_info
        vs = invoker.resolve(info["namespace"], info["name"], request.query.get("qualifier"))
        if kind == "dry-run":
            return web.Response(status=204, headers={"X-Ember-Executed-Version": vs.label, "X-Ember-Request-Id": rid})
        if kind == "async":
            require_json(body)
            request.app[keys.ASYNC].submit(vs, body, rid)
            return web.Response(
                status=202,
                text=json.dumps({"requestId": rid, "version": vs.key.number}),
                headers={
                    "Content-Type": "application/json",
                    "X-Ember-Request-Id": rid,
                    "X-Ember-Executed-Version": vs.label,
                },
            )
        result = await invoker.invoke(vs, body, request_id=rid, log_tail=log_tail)
    except ActivatorError as err:
        return error_response(err, rid)
    reply = result.reply
    out = {
        "Content-Type": "application/json",
        "X-Ember-Executed-Version": result.version.label,
        "X-Ember-Request-Id": rid,
    }
    if reply.function_error:
        out["X-Ember-Function-Error"] = reply.function_error
    if reply.log_result:
        out["X-Ember-Log-Result"] = reply.log_result
    if reply.duration_ms:
        out["X-Ember-Duration-Ms"] = reply.duration_ms
    return web.Response(status=200, body=reply.body, headers=out)


async def invocation_status(request: web.Request) -> web.Response:
    rid = request.match_info["request_id"]
    outcome = request.app[keys.ASYNC].outcomes.get(rid)
    if outcome is None:
        return error_response(FunctionNotFound(f"no asynchronous invocation {rid} is known"))
    return web.json_response(outcome.to_json())


def add_routes(app: web.Application) -> None:
    app.router.add_post("/v1/namespaces/{namespace}/functions/{name}/invoke", invoke)
    app.router.add_get("/v1/invocations/{request_id}", invocation_status)
