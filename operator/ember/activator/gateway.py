"""HTTP routes: the activator as an API gateway (`Function.spec.http`), on its public port.

Any request that is not the activator's own API comes here. `public_app` is the listener to
expose to the internet (the chart's Ingress and HTTPRoute point at it): it serves only routes
and function URLs, never the invoke API, the Lambda API or `/metrics`. In order:

1. the path is split into segments and each percent-decoded (malformed encoding is a 400);
2. the route table (`Registry.routes`, `ember.resources.routes`) finds the route for the Host,
   method and path, else 405 (with `Allow`) or 404;
3. a CORS preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) to a route of a
   Function with `http.cors` is answered here (204), without invoking it;
4. the route's JWT authorizer, if any, checks the token (401 / 403 without invoking);
5. the body is read within the limit (413), mapped to the event (`ember.activator.apigw`, or the
   body itself for `payloadFormat: raw`), and run as a sync invocation of the route's qualifier
   through the `Invoker`, like any other API;
6. the result becomes the HTTP reply as API Gateway maps it; a function error is a 502, a
   timeout 504, throttling 429 with `Retry-After`, an unmappable result 502. Route callers are
   not Lambda clients: no 200-with-error-header here. CORS headers are added for allowed origins.

Errors have API Gateway's body, `{"message": ...}`, and every reply carries `Apigw-Requestid`.
A Function's URL (`http.functionUrl`) is the same path with routeKey `$default`, for every path
under `/v1/namespaces/<namespace>/functions/<name>/url/`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from urllib.parse import unquote

from aiohttp import web

from ember.activator import keys
from ember.activator.apigw import BadResponse, HttpReply, HttpRequest, reply_of, request_event
from ember.activator.authorizer import Forbidden, JwtVerifier, Unauthorized
from ember.activator.edge import read_body, require_json
from ember.activator.errors import ActivatorError, BadRequest, CapacityTimeout, FunctionNotFound, Throttled
from ember.activator.invoke import new_request_id
from ember.api.http import Cors, HttpMethod, JwtAuthorizer
from ember.resources.routes import ANY, Match, MethodNotAllowed, Target, split_path

log = logging.getLogger(__name__)

VERIFIER = web.AppKey("jwt-verifier", JwtVerifier)
_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_TIMEOUTS = frozenset({"Sandbox.Timedout"})
REQUEST_ID = "Apigw-Requestid"


class _Refused(Exception):
    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}


def _decode(segment: str) -> str:
    if "%" not in segment:
        return segment
    if _BAD_PERCENT.search(segment):
        raise _Refused(400, f"malformed percent-encoding in path segment {segment[:64]!r}")
    try:
        return unquote(segment, errors="strict")
    except UnicodeDecodeError:
        raise _Refused(400, f"path segment {segment[:64]!r} is not UTF-8 once decoded") from None


def _host(request: web.Request) -> str | None:
    host = request.headers.get("Host")
    if not host:
        return None
    host = host.lower()
    return host.split("]", 1)[0] + "]" if host.startswith("[") else host.rsplit(":", 1)[0]


def _message(status: int, message: str, rid: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps({"message": message}),
        headers={"Content-Type": "application/json", REQUEST_ID: rid, **(headers or {})},
    )


def _allows(methods: list[HttpMethod], method: str) -> bool:
    return ANY in methods or method in methods


def _cors_headers(cors: Cors, origin: str | None) -> dict[str, str]:
    if origin is None or ("*" not in cors.allow_origins and origin not in cors.allow_origins):
        return {}
    out = {"Access-Control-Allow-Origin": origin if cors.allow_credentials or "*" not in cors.allow_origins else "*"}
    if out["Access-Control-Allow-Origin"] != "*":
        out["Vary"] = "Origin"
    if cors.allow_credentials:
        out["Access-Control-Allow-Credentials"] = "true"
    if cors.expose_headers:
        out["Access-Control-Expose-Headers"] = ",".join(cors.expose_headers)
    return out


def _preflight(cors: Cors, request: web.Request, rid: str) -> web.Response:
    """The answer to a preflight: the CORS headers when origin, method and headers are allowed, else none."""
    headers = _cors_headers(cors, request.headers.get("Origin"))
    method = request.headers.get("Access-Control-Request-Method", "").upper()
    listed = request.headers.get("Access-Control-Request-Headers", "")
    asked = [h.strip().lower() for h in listed.split(",") if h.strip()]
    allowed_headers = {h.lower() for h in cors.allow_headers}
    if headers and _allows(cors.allow_methods, method) and ("*" in allowed_headers or set(asked) <= allowed_headers):
        methods = "*" if ANY in cors.allow_methods else ",".join(cors.allow_methods)
        headers["Access-Control-Allow-Methods"] = methods
        if cors.allow_headers:
            headers["Access-Control-Allow-Headers"] = ",".join(cors.allow_headers)
        if cors.max_age:
            headers["Access-Control-Max-Age"] = str(cors.max_age)
    else:
        headers = {}
    return web.Response(status=204, headers={REQUEST_ID: rid, **headers})


async def route(request: web.Request) -> web.StreamResponse:
    """A request to one of the Functions' routes."""
    rid = new_request_id()
    try:
        raw_path = request.raw_path.partition("?")[0]
        segments = [_decode(s) for s in split_path(raw_path)]
        table = request.app[keys.REGISTRY].routes.table
        method = request.method.upper()
        preflight = method == "OPTIONS" and "Origin" in request.headers
        asked = request.headers.get("Access-Control-Request-Method", "").upper() if preflight else ""
        found = table.match(_host(request), asked or method, segments)
        if asked and found is not None:
            cors = found.target.cors if isinstance(found, Match) else found.cors
            if cors is not None:
                return _preflight(cors, request, rid)
            found = table.match(_host(request), method, segments)
        if found is None:
            allowed = await _own_methods(request)
            if allowed:  # the activator's own API, with another method: aiohttp's 405 would have said so
                raise _Refused(405, "Method Not Allowed", {"Allow": ", ".join(sorted(allowed))})
            raise _Refused(404, "Not Found")
        if isinstance(found, MethodNotAllowed):
            raise _Refused(405, "Method Not Allowed", {"Allow": ", ".join(found.allowed)})
        return await _invoke(request, found.target, found.target.route_key, found.path_parameters, raw_path, rid)
    except _Refused as err:
        return _message(err.status, err.message, rid, err.headers)


async def function_url(request: web.Request) -> web.StreamResponse:
    """A request under a Function's URL prefix: every path, routeKey `$default`."""
    rid = new_request_id()
    info = request.match_info
    namespace, name = info["namespace"], info["name"]
    try:
        fs = request.app[keys.REGISTRY].get(namespace, name)
        http = fs.spec.http if fs.spec is not None else None
        if http is None or http.function_url is None:
            raise _Refused(404, f"function {namespace}/{name} has no function URL (spec.http.functionUrl)")
    except FunctionNotFound as err:
        return _message(404, err.message, rid)
    except _Refused as err:
        return _message(err.status, err.message, rid)
    url = http.function_url
    target = Target(
        namespace=namespace,
        name=name,
        route_key="$default",
        params=(),
        greedy=False,
        qualifier=url.qualifier,
        payload_format="apigateway-v2",
        authorizer=http.authorizers[url.authorizer].jwt if url.authorizer else None,
        scopes=(),
        cors=http.cors,
    )
    try:
        raw_tail = request.raw_path.partition("?")[0].split("/url", 1)[1] or "/"
        for segment in split_path(raw_tail):
            _decode(segment)
        preflight = request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers
        if preflight and target.cors is not None:
            return _preflight(target.cors, request, rid)
        return await _invoke(request, target, "$default", {}, raw_tail, rid)
    except _Refused as err:
        return _message(err.status, err.message, rid, err.headers)


async def _invoke(
    request: web.Request, target: Target, route_key: str, params: dict[str, str], raw_path: str, rid: str
) -> web.StreamResponse:
    app = request.app
    origin = request.headers.get("Origin")
    cors = _cors_headers(target.cors, origin) if target.cors is not None else {}
    try:
        authorizer = await _authorize(request, target.namespace, target.authorizer, target.scopes)
        raw = target.payload_format == "raw"
        body = await read_body(request, app[keys.CONFIG].max_body_bytes, empty=b"{}" if raw else b"")
        if raw:
            require_json(body)
            event = body
        else:
            http_request = HttpRequest(
                method=request.method,
                raw_path=raw_path,
                raw_query=request.raw_path.partition("?")[2],
                headers=request.headers.items(),
                body=body,
                source_ip=request.remote or "",
                request_id=rid,
                time_s=time.time(),
            )
            event = json.dumps(
                request_event(
                    http_request,
                    route_key=route_key,
                    path_parameters=params,
                    account_id=target.namespace,
                    authorizer=authorizer,
                ),
                separators=(",", ":"),
            ).encode()
        invoker = app[keys.INVOKER]
        vs = invoker.resolve(target.namespace, target.name, target.qualifier)
        result = await invoker.invoke(vs, event, request_id=rid)
    except ActivatorError as err:
        return _error_reply(err, rid, cors)
    except _Refused as err:
        return _message(err.status, err.message, rid, {**cors, **err.headers})
    reply = result.reply
    if reply.function_error:
        kind = _error_type(reply.body)
        log.info("route function error route=%r function=%s error=%s", route_key, vs.fs.label, kind)
        status, message = (504, "Endpoint request timed out") if kind in _TIMEOUTS else (502, "Internal Server Error")
        return _message(status, message, rid, cors)
    if raw:
        mapped = HttpReply(200, [("Content-Type", "application/json")], reply.body)
    else:
        try:
            mapped = reply_of(reply.body)
        except BadResponse as err:
            log.info("route bad response route=%r function=%s: %s", route_key, vs.fs.label, err)
            return _message(502, "Internal Server Error", rid, cors)
    response = web.Response(status=mapped.status, body=mapped.body)
    for name, value in mapped.headers:
        response.headers.add(name, value)
    response.headers[REQUEST_ID] = rid
    for name, value in cors.items():
        response.headers[name] = value
    return response


async def _authorize(
    request: web.Request, namespace: str, authorizer: JwtAuthorizer | None, scopes: tuple[str, ...]
) -> dict[str, object] | None:
    if authorizer is None:
        return None
    try:
        return await request.app[VERIFIER].verify(namespace, authorizer, request.headers.get("Authorization"), scopes)
    except Unauthorized as err:
        log.info("route unauthorized function=%s: %s", namespace, err)
        raise _Refused(401, "Unauthorized", {"WWW-Authenticate": "Bearer"}) from None
    except Forbidden as err:
        raise _Refused(403, "Forbidden") from err


def _error_reply(err: ActivatorError, rid: str, cors: dict[str, str]) -> web.Response:
    if isinstance(err, Throttled):
        return _message(429, "Too Many Requests", rid, {**cors, "Retry-After": str(err.retry_after_s)})
    if isinstance(err, CapacityTimeout):
        return _message(504, "Endpoint request timed out", rid, cors)
    if isinstance(err, BadRequest) or err.status == 413:
        return _message(err.status, err.message, rid, cors)
    log.info("route failed status=%d error=%s: %s", err.status, err.error_type, err.message)
    return _message(502, "Internal Server Error" if err.status >= 500 else err.message, rid, cors)


async def _own_methods(request: web.Request) -> set[str]:
    """The methods the activator's own API serves at this path (the catch-all and function URLs aside)."""
    allowed: set[str] = set()
    for resource in request.app.router.resources():
        if resource.canonical.startswith(("/{tail", "/v1/namespaces/{namespace}/functions/{name}/url")):
            continue
        _, methods = await resource.resolve(request)
        allowed |= methods
    return allowed


def _error_type(body: bytes) -> str:
    try:
        parsed = json.loads(body)
    except ValueError:
        return ""
    return str(parsed.get("errorType", "")) if isinstance(parsed, dict) else ""


def public_app(app: web.Application) -> web.Application:
    """A listener of `app`'s routes and function URLs only, sharing its registry, invoker and lifecycle.

    Run it on its own port beside `app` (whose runner owns the background work): a path of
    the activator's own API is a plain 404 here.
    """
    public = web.Application(client_max_size=app[keys.CONFIG].max_body_bytes + 1)
    for key in app:
        public[key] = app[key]
    add_routes(public)
    return public


def add_routes(app: web.Application) -> None:
    """The function URLs, then every other path (added last: the activator's own API matches first)."""
    app.router.add_route("*", "/v1/namespaces/{namespace}/functions/{name}/url{tail:(/.*)?}", function_url)
    app.router.add_route("*", "/{tail:.*}", route)
