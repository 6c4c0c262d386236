"""AWS Lambda's Invoke API, so Lambda clients (boto3, the AWS CLI, SDKs) work unchanged.

`POST /2015-03-31/functions/{FunctionName}/invocations[?Qualifier=Q]`

FunctionName maps to an Ember function like this (namespace defaults to the activator's
default namespace, `default`):

| FunctionName | namespace | name | qualifier |
|---|---|---|---|
| `hello` | default | hello | `Qualifier` |
| `hello:live` | default | hello | `live` |
| `team-a/hello` (sent as `team-a%2Fhello`) | team-a | hello | `Qualifier` |
| `arn:aws:lambda:us-east-1:team-a:function:hello[:3]` | team-a (the account field) | hello | `3` |

A qualifier in the name and a different `Qualifier` parameter is a 400, as in Lambda.
Headers: `X-Amz-Invocation-Type` RequestResponse (200) / Event (202) / DryRun (204);
`X-Amz-Log-Type: Tail` → `X-Amz-Log-Result`; replies carry `X-Amz-Executed-Version`,
`X-Amz-Function-Error` and `x-amzn-RequestId`. Errors carry `x-amzn-ErrorType` and Lambda's
body `{"Type": "User", "message": ...}` (429 adds `Retry-After` and `retryAfterSeconds`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from urllib.parse import unquote

from aiohttp import web

from ember.activator import keys
from ember.activator.dispatch import LAMBDA_INVOCATION_TYPES, LOG_TAIL, SYNC, HeaderNames, dispatch
from ember.activator.edge import choice
from ember.activator.errors import ActivatorError, BadRequest, Throttled
from ember.activator.invoke import Result, new_request_id
from ember.activator.version_state import VersionState

_NAME = r"[a-z0-9](?:[-a-z0-9]{0,38}[a-z0-9])?"
_QUALIFIER = r"(?:\$LATEST|[0-9]+|[a-z][a-z0-9-]{0,62})"
_ARN = re.compile(
    rf"^arn:[a-z-]+:lambda:[a-z0-9-]*:(?P<ns>{_NAME}):function:(?P<name>{_NAME})(?::(?P<q>{_QUALIFIER}))?$"
)
_PLAIN = re.compile(rf"^(?:(?P<ns>{_NAME})/)?(?P<name>{_NAME})(?::(?P<q>{_QUALIFIER}))?$")
HEADERS = HeaderNames(
    request_id="x-amzn-RequestId",
    executed_version="X-Amz-Executed-Version",
    function_error="X-Amz-Function-Error",
    log_result="X-Amz-Log-Result",
)


@dataclass(frozen=True, slots=True)
class Target:
    namespace: str
    name: str
    qualifier: str | None


def parse_function_name(raw: str, qualifier: str | None, default_namespace: str) -> Target:
    """FunctionName (+ Qualifier parameter) → namespace, name, qualifier; BadRequest when malformed."""
    value = unquote(raw)
    match = _ARN.match(value) or _PLAIN.match(value)
    if match is None:
        raise BadRequest(
            f"FunctionName {value!r} is not NAME, NAMESPACE/NAME or arn:aws:lambda:REGION:NAMESPACE:function:NAME,"
            " each optionally followed by :QUALIFIER"
        )
    if qualifier is not None and not re.fullmatch(_QUALIFIER, qualifier):
        raise BadRequest(f"Qualifier {qualifier!r} must be $LATEST, a Version number or an alias name")
    derived = match.group("q")
    if derived is not None and qualifier is not None and derived != qualifier:
        raise BadRequest(
            f"the qualifier in FunctionName ({derived}) does not match the Qualifier parameter ({qualifier})"
        )
    return Target(match.group("ns") or default_namespace, match.group("name"), derived or qualifier)


def lambda_error(err: ActivatorError, rid: str) -> web.Response:
    body: dict[str, object] = {"Type": "User", "message": err.message}
    headers = {"x-amzn-ErrorType": err.error_type, HEADERS.request_id: rid, "Content-Type": "application/json"}
    if isinstance(err, Throttled):
        headers["Retry-After"] = str(err.retry_after_s)
        body["retryAfterSeconds"] = str(err.retry_after_s)
        body["Reason"] = "ConcurrentInvocationLimitExceeded"
    if err.status >= 500:
        body["Type"] = "Service"
    return web.Response(status=err.status, text=json.dumps(body), headers=headers)


class _Replies:
    """Lambda's replies: `X-Amz-*` and `x-amzn-RequestId` headers; async and dry-run have no body."""

    def ran(self, result: Result) -> web.Response:
        return web.Response(status=200, body=result.reply.body, headers=HEADERS.sync(result))

    def queued(self, vs: VersionState, request_id: str) -> web.Response:
        return web.Response(status=202, headers={HEADERS.request_id: request_id, HEADERS.executed_version: vs.label})

    def checked(self, vs: VersionState, request_id: str) -> web.Response:
        return web.Response(status=204, headers={HEADERS.request_id: request_id, HEADERS.executed_version: vs.label})


REPLIES = _Replies()


async def invoke(request: web.Request) -> web.Response:
    rid = new_request_id()
    try:
        headers = request.headers
        kind = choice(headers.get("X-Amz-Invocation-Type"), "X-Amz-Invocation-Type", LAMBDA_INVOCATION_TYPES, SYNC)
        log_tail = choice(headers.get("X-Amz-Log-Type"), "X-Amz-Log-Type", LOG_TAIL, False)
        target = parse_function_name(
            request.match_info["function_name"],
            request.query.get("Qualifier"),
            request.app[keys.CONFIG].default_namespace,
        )
        return await dispatch(
            request,
            REPLIES,
            kind,
            namespace=target.namespace,
            name=target.name,
            qualifier=target.qualifier,
            request_id=rid,
            log_tail=log_tail,
        )
    except ActivatorError as err:
        return lambda_error(err, rid)


def add_routes(app: web.Application) -> None:
    app.router.add_post("/2015-03-31/functions/{function_name:.+}/invocations", invoke)
