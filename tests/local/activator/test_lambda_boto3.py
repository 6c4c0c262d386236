"""The Lambda Invoke API through the real boto3 client, unchanged, pointed at a real activator.

boto3 is synchronous, so its calls run in a thread while the activator serves on the test's loop.
"""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import boto3
import botocore.config
import botocore.exceptions
import pytest

from ember.activator.version_state import Phase

from .helpers import Activator, function, run_activator

CODE = """
def handler(event, context):
    print("log line from", context.function_name)
    if event.get("fail"):
        raise RuntimeError("asked to fail")
    return {"got": event, "version": context.function_version}
"""


@pytest.fixture
async def lambda_env() -> AsyncIterator[tuple[Activator, Any]]:
    async with run_activator() as act:
        act.registry.apply(function("hello", CODE, aliases={"live": {"version": 1}}))
        client = boto3.client(
            "lambda",
            endpoint_url=act.url,
            region_name="us-east-1",
            aws_access_key_id="ember",
            aws_secret_access_key="ember",
            config=botocore.config.Config(retries={"max_attempts": 1, "mode": "standard"}, read_timeout=30),
        )
        yield act, client


async def _call(client: Any, **kwargs: Any) -> dict[str, Any]:
    def run() -> dict[str, Any]:
        result = dict(client.invoke(**kwargs))
        if "Payload" in result:
            result["Payload"] = result["Payload"].read()
        return result

    return await asyncio.to_thread(run)


async def test_request_response(lambda_env: tuple[Activator, Any]) -> None:
    _, client = lambda_env
    result = await _call(client, FunctionName="hello", Payload=json.dumps({"a": 1}))
    assert result["StatusCode"] == 200
    assert json.loads(result["Payload"]) == {"got": {"a": 1}, "version": "1"}
    assert result["ExecutedVersion"] == "1"
    assert "FunctionError" not in result


async def test_event_and_dry_run(lambda_env: tuple[Activator, Any]) -> None:
    act, client = lambda_env
    event = await _call(client, FunctionName="hello", InvocationType="Event", Payload=b'{"later": true}')
    assert event["StatusCode"] == 202
    dry = await _call(client, FunctionName="hello", InvocationType="DryRun")
    assert dry["StatusCode"] == 204
    for _ in range(200):
        if await act.metric("ember_invocations_total", function="default/hello", outcome="success") >= 1:
            break
        await asyncio.sleep(0.05)
    assert await act.metric("ember_invocations_total", function="default/hello", outcome="success") == 1


async def test_qualifiers_and_name_forms(lambda_env: tuple[Activator, Any]) -> None:
    act, client = lambda_env
    act.registry.apply(function("hello", CODE.replace('"got"', '"v2"'), aliases={"live": {"version": 1}}))
    fs = act.registry.get("default", "hello")
    for _ in range(600):
        if fs.versions[2].phase is Phase.READY:
            break
        await asyncio.sleep(0.05)
    cases = [
        ({"FunctionName": "hello", "Qualifier": "live"}, "1"),
        ({"FunctionName": "hello", "Qualifier": "1"}, "1"),
        ({"FunctionName": "hello:2"}, "2"),
        ({"FunctionName": "hello", "Qualifier": "$LATEST"}, "2"),
        ({"FunctionName": "default/hello"}, "2"),
        ({"FunctionName": "arn:aws:lambda:us-east-1:default:function:hello:live"}, "1"),
    ]
    for kwargs, version in cases:
        result = await _call(client, Payload=b"{}", **kwargs)
        assert (result["StatusCode"], result["ExecutedVersion"]) == (200, version), kwargs


async def test_log_tail_and_function_error(lambda_env: tuple[Activator, Any]) -> None:
    _, client = lambda_env
    result = await _call(client, FunctionName="hello", Payload=b'{"fail": true}', LogType="Tail")
    assert result["StatusCode"] == 200
    assert result["FunctionError"] == "Handled"
    error = json.loads(result["Payload"])
    assert (error["errorType"], error["errorMessage"]) == ("RuntimeError", "asked to fail")
    log = base64.b64decode(result["LogResult"]).decode()
    assert "log line from hello" in log
    assert len(base64.b64decode(result["LogResult"])) <= 4096


async def test_lambda_errors(lambda_env: tuple[Activator, Any]) -> None:
    _, client = lambda_env
    with pytest.raises(client.exceptions.ResourceNotFoundException):
        await _call(client, FunctionName="missing", Payload=b"{}")
    with pytest.raises(client.exceptions.ResourceNotFoundException):
        await _call(client, FunctionName="hello", Qualifier="nope", Payload=b"{}")
    with pytest.raises(client.exceptions.InvalidRequestContentException):
        await _call(client, FunctionName="hello", Payload=b"{not json")
    with pytest.raises(botocore.exceptions.ClientError) as info:
        await _call(client, FunctionName="hello:live", Qualifier="1", Payload=b"{}")
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400


async def test_throttling_is_too_many_requests() -> None:
    from .helpers import FAST

    config = FAST.__class__(**{**{f: getattr(FAST, f) for f in FAST.__dataclass_fields__}, "queue_depth": 0})
    async with run_activator(config) as act:
        # The first call holds the only slot for 3 s: long enough for the second boto3 call
        # (a thread, a connection) to arrive while it is held, even on a loaded machine.
        slow = "import time\ndef handler(event, context):\n    time.sleep(3.0)\n    return 1\n"
        act.registry.apply(function("busy", slow, timeoutSeconds=10, scaling={"maxScale": 1}))
        client = boto3.client(
            "lambda",
            endpoint_url=act.url,
            region_name="us-east-1",
            aws_access_key_id="ember",
            aws_secret_access_key="ember",
            config=botocore.config.Config(retries={"max_attempts": 1, "mode": "standard"}),
        )
        version = act.registry.get("default", "busy").versions[1]
        for _ in range(600):  # with no queue, even a cold start is throttled: wait for the pod
            if version.phase is Phase.READY:
                break
            await asyncio.sleep(0.05)
        warm = await _call(client, FunctionName="busy", Payload=b"{}")
        assert warm["StatusCode"] == 200
        first = asyncio.create_task(_call(client, FunctionName="busy", Payload=b"{}"))
        for _ in range(1000):  # until the first invocation holds the only slot (boto3 runs in a thread)
            if version.throttler.in_flight == 1:
                break
            await asyncio.sleep(0.01)
        assert version.throttler.in_flight == 1, "the first invocation never took the slot"
        with pytest.raises(client.exceptions.TooManyRequestsException) as info:
            await _call(client, FunctionName="busy", Payload=b"{}")
        assert info.value.response["ResponseMetadata"]["HTTPHeaders"]["retry-after"] == "1"
        assert (await first)["StatusCode"] == 200
