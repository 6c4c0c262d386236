"""The invocation types' shared dispatch, through both the Ember and the Lambda API, over real sockets.

Covers the bad input the dispatch answers the same way whichever API parsed the request: an
unknown invocation type (400), a dry-run or an async invocation of a missing function (404),
an async invocation whose body is over the limit (413, even for a missing function, and
nothing queued). The good paths are in test_invoke.py (Ember) and test_lambda_boto3.py (boto3);
boto3 checks the invocation type itself, so the Lambda API is spoken to as raw HTTP here.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import AsyncIterator

import pytest

from ember.activator import keys

from .helpers import FAST, Activator, function, run_activator

LIMIT = 1024
HELLO = """
    def handler(event, context):
        return {"hello": "world"}
"""


@dataclasses.dataclass(frozen=True)
class Api:
    """How a test names a function and an invocation type in one API, and reads its error type."""

    path: str
    type_header: str
    types: dict[str, str]

    def url(self, act: Activator, name: str) -> str:
        return act.url + self.path.format(name=name)


EMBER = Api(
    "/v1/namespaces/default/functions/{name}/invoke",
    "X-Ember-Invocation-Type",
    {"async": "async", "dry-run": "dry-run"},
)
LAMBDA = Api(
    "/2015-03-31/functions/{name}/invocations",
    "X-Amz-Invocation-Type",
    {"async": "Event", "dry-run": "DryRun"},
)
APIS = [pytest.param(EMBER, id="ember"), pytest.param(LAMBDA, id="lambda")]


@pytest.fixture
async def small_limit() -> AsyncIterator[Activator]:
    async with run_activator(dataclasses.replace(FAST, max_body_bytes=LIMIT)) as act:
        act.registry.apply(function("hello", HELLO))
        yield act


async def _post(act: Activator, api: Api, name: str, kind: str | None, body: bytes) -> tuple[int, str, str]:
    """Status, error type and error message of one invocation (the two APIs put them in different places)."""
    headers = {api.type_header: kind} if kind is not None else {}
    async with act.http.post(api.url(act, name), data=body, headers=headers) as response:
        raw = await response.read()
        error = json.loads(raw) if raw else {}
        if api is LAMBDA:
            return response.status, response.headers.get("x-amzn-ErrorType", ""), error.get("message", "")
        return response.status, error.get("errorType", ""), error.get("errorMessage", "")


@pytest.mark.parametrize("api", APIS)
async def test_unknown_invocation_type_is_400_naming_the_header(small_limit: Activator, api: Api) -> None:
    status, error_type, message = await _post(small_limit, api, "hello", "Later", b"{}")
    assert (status, error_type) == (400, "InvalidParameterValueException")
    assert f"header {api.type_header}: 'Later' is not one of" in message


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("kind", ["dry-run", "async"])
async def test_dry_run_or_async_of_a_missing_function_is_404(small_limit: Activator, api: Api, kind: str) -> None:
    status, error_type, message = await _post(small_limit, api, "missing", api.types[kind], b"{}")
    assert (status, error_type) == (404, "ResourceNotFoundException")
    assert "function default/missing not found" in message
    assert await small_limit.app[keys.ASYNC].store.depth() == 0


@pytest.mark.parametrize("api", APIS)
@pytest.mark.parametrize("name", ["hello", "missing"])
async def test_async_with_a_body_over_the_limit_is_413_and_not_queued(
    small_limit: Activator, api: Api, name: str
) -> None:
    body = json.dumps({"pad": "x" * LIMIT}).encode()
    status, error_type, message = await _post(small_limit, api, name, api.types["async"], body)
    assert (status, error_type) == (413, "RequestTooLargeException")
    assert f"the limit is {LIMIT}" in message
    assert await small_limit.app[keys.ASYNC].store.depth() == 0


@pytest.mark.parametrize("api", APIS)
async def test_dry_run_answers_204_and_runs_nothing(small_limit: Activator, api: Api) -> None:
    async with small_limit.http.post(
        api.url(small_limit, "hello"), data=b"{}", headers={api.type_header: api.types["dry-run"]}
    ) as response:
        assert response.status == 204
        executed = response.headers.get("X-Ember-Executed-Version") or response.headers.get("X-Amz-Executed-Version")
    assert executed == "1"
    assert await small_limit.metric("ember_invocations_total", function="default/hello") == 0
