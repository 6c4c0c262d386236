"""API Gateway HTTP API payload format 2.0: a request as the event, the function's result as the reply.

Pure mapping, no aiohttp: `request_event` builds the event a handler written for API Gateway or
a Lambda function URL reads (`rawPath`, `headers` lower-cased with repeated values joined by
commas, `cookies` taken out of the `cookie` header, `queryStringParameters` joined likewise,
`pathParameters`, `requestContext`, `body` base64-encoded unless it is text); `reply_of` maps
what the function returned as API Gateway does: a dict with `statusCode` is the response
(`headers`, `multiValueHeaders`, `cookies` as `Set-Cookie`, `body`, `isBase64Encoded`); any
other JSON value is a 200 `application/json` whose body is that value (a string as it is).
A result API Gateway could not map is `BadResponse` (502).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl

_TEXT_TYPES = ("text/", "application/json", "application/xml", "application/javascript", "+json", "+xml")
_FORM = "application/x-www-form-urlencoded"
# Hop-by-hop and framing headers are the activator's to set, never the function's.
_NOT_FROM_FUNCTION = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive", "upgrade", "te"})
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


class BadResponse(Exception):
    """The function returned something API Gateway would not map to a response."""


@dataclass(frozen=True, slots=True)
class HttpRequest:
    """What the gateway knows of one request (the path already split from its query string)."""

    method: str
    raw_path: str
    raw_query: str
    headers: Iterable[tuple[str, str]]
    body: bytes
    source_ip: str
    request_id: str
    time_s: float


@dataclass(frozen=True, slots=True)
class HttpReply:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


def _is_text(content_type: str) -> bool:
    value = content_type.split(";", 1)[0].strip().lower()
    return value == _FORM or any(value.startswith(t) if t.endswith("/") else t in value for t in _TEXT_TYPES)


def _clf_time(t: float) -> str:
    """`02/Dec/2026:19:03:58 +0000`, API Gateway's `requestContext.time`."""
    g = time.gmtime(t)
    return f"{g.tm_mday:02d}/{_MONTHS[g.tm_mon - 1]}/{g.tm_year}:{g.tm_hour:02d}:{g.tm_min:02d}:{g.tm_sec:02d} +0000"


def request_event(
    request: HttpRequest,
    *,
    route_key: str,
    path_parameters: Mapping[str, str],
    account_id: str,
    stage: str = "$default",
    authorizer: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The 2.0 event of `request` matched on `route_key` (`$default` for a function URL)."""
    headers: dict[str, str] = {}
    cookies: list[str] = []
    for name, value in request.headers:
        lower = name.lower()
        if lower == "cookie":
            cookies.extend(c.strip() for c in value.split(";") if c.strip())
            continue
        headers[lower] = f"{headers[lower]},{value}" if lower in headers else value
    query: dict[str, str] = {}
    for key, value in parse_qsl(request.raw_query, keep_blank_values=True):
        query[key] = f"{query[key]},{value}" if key in query else value
    host = headers.get("host", "")
    domain = host.rsplit(":", 1)[0] if not host.startswith("[") else host.split("]", 1)[0] + "]"
    context: dict[str, Any] = {
        "accountId": account_id,
        "apiId": "ember",
        "domainName": domain,
        "domainPrefix": domain.split(".", 1)[0],
        "http": {
            "method": request.method,
            "path": request.raw_path,
            "protocol": "HTTP/1.1",
            "sourceIp": request.source_ip,
            "userAgent": headers.get("user-agent", ""),
        },
        "requestId": request.request_id,
        "routeKey": route_key,
        "stage": stage,
        "time": _clf_time(request.time_s),
        "timeEpoch": int(request.time_s * 1000),
    }
    if authorizer is not None:
        context["authorizer"] = authorizer
    event: dict[str, Any] = {
        "version": "2.0",
        "routeKey": route_key,
        "rawPath": request.raw_path,
        "rawQueryString": request.raw_query,
    }
    if cookies:
        event["cookies"] = cookies
    event["headers"] = headers
    if query:
        event["queryStringParameters"] = query
    if path_parameters:
        event["pathParameters"] = dict(path_parameters)
    event["requestContext"] = context
    if request.body:
        text = _is_text(headers.get("content-type", ""))
        if text:
            try:
                event["body"] = request.body.decode()
            except UnicodeDecodeError:
                text = False
        if not text:
            event["body"] = base64.b64encode(request.body).decode()
        event["isBase64Encoded"] = not text
    else:
        event["isBase64Encoded"] = False
    return event


def reply_of(result: bytes) -> HttpReply:
    """The HTTP reply for what the function returned (its JSON result); BadResponse when unmappable."""
    try:
        value = json.loads(result)
    except ValueError as err:
        raise BadResponse(f"the function's result is not JSON: {err}") from None
    if not isinstance(value, dict) or "statusCode" not in value:
        text = value if isinstance(value, str) else json.dumps(value)
        return HttpReply(200, [("Content-Type", "application/json")], text.encode())
    status = value["statusCode"]
    if isinstance(status, str) and status.isdigit():
        status = int(status)
    if not isinstance(status, int) or isinstance(status, bool) or not 100 <= status <= 599:
        raise BadResponse(f"statusCode must be an integer from 100 to 599, not {value['statusCode']!r}")
    out: list[tuple[str, str]] = []
    single = {} if value.get("headers") is None else value["headers"]
    multi = {} if value.get("multiValueHeaders") is None else value["multiValueHeaders"]
    if not isinstance(single, dict) or not isinstance(multi, dict):
        raise BadResponse("headers and multiValueHeaders must be objects")
    for name, raw in single.items():
        out.append((_header_name(name), _header_value(name, raw)))
    for name, values in multi.items():
        if not isinstance(values, list):
            raise BadResponse(f"multiValueHeaders[{name!r}] must be a list")
        out.extend((_header_name(name), _header_value(name, v)) for v in values)
    cookies = [] if value.get("cookies") is None else value["cookies"]
    if not isinstance(cookies, list):
        raise BadResponse("cookies must be a list of strings")
    out.extend(("Set-Cookie", _header_value("cookies", c)) for c in cookies)
    out = [(n, v) for n, v in out if n.lower() not in _NOT_FROM_FUNCTION]
    raw_body = value.get("body")
    body: bytes
    if raw_body is None:
        body = b""
    elif isinstance(raw_body, str):
        if value.get("isBase64Encoded") is True:
            try:
                body = base64.b64decode(raw_body, validate=True)
            except binascii.Error:
                raise BadResponse("isBase64Encoded is true but body is not base64") from None
        else:
            body = raw_body.encode()
    else:
        body = json.dumps(raw_body).encode()  # API Gateway sends a non-string body as its JSON text
    if not any(n.lower() == "content-type" for n, _ in out) and body:
        out.append(("Content-Type", "application/json"))
    return HttpReply(status, out, body)


def _header_name(name: object) -> str:
    if not isinstance(name, str) or not name or any(c in name for c in ' \t\r\n:()<>@,;\\"/[]?={}'):
        raise BadResponse(f"header name {name!r} is not a valid token")
    return name


def _header_value(name: object, value: object) -> str:
    if isinstance(value, bool):
        value = "true" if value else "false"
    if isinstance(value, int | float):
        value = str(value)
    if not isinstance(value, str):
        raise BadResponse(f"header {name!r}: value must be a string, not {type(value).__name__}")
    if "\r" in value or "\n" in value or "\0" in value:
        raise BadResponse(f"header {name!r}: value holds a line break")
    return value
