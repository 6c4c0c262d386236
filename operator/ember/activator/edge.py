"""Request parsing shared by the APIs: the body within its limit, and header values checked against what is allowed."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import TypeVar

from aiohttp import web

from ember.activator.errors import BadRequest, InvalidContent, PayloadTooLarge

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_IDEMPOTENCY_KEY = re.compile(r"^[\x21-\x7e]{1,256}$")  # printable ASCII, no spaces
EMPTY_EVENT = b"{}"
T = TypeVar("T")


async def read_body(request: web.Request, limit: int, *, empty: bytes = EMPTY_EVENT) -> bytes:
    """The request body (an empty body is `empty`, the event `{}`); PayloadTooLarge past `limit` bytes."""
    declared = request.content_length
    if declared is not None and declared > limit:
        raise PayloadTooLarge(f"request body is {declared} bytes; the limit is {limit}")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes") from None
    if len(body) > limit:
        raise PayloadTooLarge(f"request body is {len(body)} bytes; the limit is {limit}")
    return body or empty


def require_json(body: bytes) -> None:
    """InvalidContent unless the body parses as JSON (checked where no agent will, e.g. async)."""
    try:
        json.loads(body)
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidContent(f"could not parse the request body as JSON: {err}") from None


def choice(value: str | None, header: str, allowed: Mapping[str, T], default: T) -> T:
    """A header's value mapped through `allowed` (case-insensitive keys); BadRequest naming the choices."""
    if value is None or value == "":
        return default
    found = allowed.get(value.lower())
    if found is None:
        raise BadRequest(f"header {header}: {value!r} is not one of {', '.join(sorted(set(allowed)))}")
    return found


def idempotency_key(value: str | None, header: str = "X-Ember-Idempotency-Key") -> str | None:
    """A caller's idempotency key, checked; None when not sent."""
    if value is None:
        return None
    if not _IDEMPOTENCY_KEY.match(value):
        raise BadRequest(f"header {header}: must be 1-256 printable ASCII characters without spaces")
    return value


def request_id(value: str | None, header: str, generate: str) -> str:
    """A caller-chosen request id, checked, or the generated one."""
    if value is None:
        return generate
    if not _REQUEST_ID.match(value):
        raise BadRequest(f"header {header}: must be 1-128 characters of A-Z a-z 0-9 . _ : -")
    return value
