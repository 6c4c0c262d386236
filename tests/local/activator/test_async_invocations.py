"""Asynchronous invocations with Lambda's semantics, on real sandboxed agents and real stores.

A function that always fails is tried exactly 1 + maxRetries times, then its event goes to
`onFailure` as Lambda's destination record (read back as the payload the destination Function
was invoked with); a success goes to `onSuccess`; an event older than `maxEventAgeSeconds` is
never run and goes to `onFailure` as EventAgeExceeded; an idempotency key makes a repeated
enqueue a no-op; bad keys are 400s. The SIGKILL of `ember dev` with 1,000 accepted events is
tests/local/activator/test_async_durable.py; two replicas sharing the Redis store,
tests/cluster/test_helm_install.py (and the store's contract, tests/local/sources/).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from tests.local.activator.helpers import Activator, function, run_activator

from ember.activator import keys
from ember.activator.async_invoke import destination_id
from ember.sources.store import Event

pytestmark = [pytest.mark.timeout(240), pytest.mark.asyncio(loop_scope="module")]

SINK = "def handler(event, context):\n    return event\n"
FAILING = "def handler(event, context):\n    raise RuntimeError('always ' + str(event.get('n')))\n"
OK = "def handler(event, context):\n    return {'doubled': event['n'] * 2}\n"
SLOW = "import time\n\ndef handler(event, context):\n    time.sleep(0.5)\n    return event\n"


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def act() -> AsyncIterator[Activator]:
    async with run_activator() as activator:
        registry = activator.registry
        registry.apply(function("sink", SINK))
        registry.apply(function("flaky", FAILING, **{"async": {"maxRetries": 2, "onFailure": {"function": "sink"}}}))
        registry.apply(function("ok", OK, **{"async": {"onSuccess": {"function": "sink"}}}))
        registry.apply(function("slow", SLOW, scaling={"maxScale": 1}))
        registry.apply(function("aged", OK, **{"async": {"maxEventAgeSeconds": 60, "onFailure": {"function": "sink"}}}))
        yield activator


async def _enqueue(act: Activator, name: str, payload: Any, **headers: str) -> tuple[int, dict[str, Any]]:
    async with act.http.post(
        act.invoke_url(name), json=payload, headers={"X-Ember-Invocation-Type": "async", **headers}
    ) as response:
        return response.status, await response.json()


async def _status(url: str, http: Any, request_id: str) -> tuple[int, dict[str, Any]]:
    async with http.get(f"{url}/v1/invocations/{request_id}") as response:
        return response.status, await response.json()


async def _settled(act: Activator, request_id: str, timeout_s: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        code, body = await _status(act.url, act.http, request_id)
        if code == 200 and body["state"] in ("succeeded", "failed"):
            return body
        assert time.monotonic() < deadline, (code, body)
        await asyncio.sleep(0.05)


async def test_a_failing_function_is_retried_max_retries_times_then_sent_to_on_failure(act: Activator) -> None:
    code, body = await _enqueue(act, "flaky", {"n": 7})
    assert code == 202
    rid = body["requestId"]
    failed = await _settled(act, rid)
    assert (failed["state"], failed["attempts"], failed["condition"]) == ("failed", 3, "RetriesExhausted")
    assert failed["result"]["errorType"] == "RuntimeError"
    assert await act.metric("ember_invocations_total", function="default/flaky", outcome="function_error") == 3
    assert await act.metric("ember_async_events_total", function="default/flaky", outcome="retried") == 2
    assert await act.metric("ember_async_events_total", function="default/flaky", outcome="failed") == 1
    assert await act.metric("ember_async_delay_seconds_count", function="default/flaky") == 1
    delivered = await _settled(act, destination_id(rid, "onFailure"))
    assert delivered["state"] == "succeeded"
    record = delivered["result"]  # what the sink was invoked with
    assert record["version"] == "1.0"
    assert record["requestContext"] == {
        "requestId": rid,
        "functionArn": "arn:aws:lambda:us-east-1:default:function:flaky:1",
        "condition": "RetriesExhausted",
        "approximateInvokeCount": 3,
    }
    assert record["requestPayload"] == {"n": 7}
    assert record["responseContext"]["functionError"] in ("Handled", "Unhandled")
    assert record["responseContext"]["executedVersion"] == "1"
    assert record["responsePayload"]["errorMessage"] == "always 7"
    dead = await act.app[keys.ASYNC].store.dead_letters()  # type: ignore[attr-defined]
    assert [(e.id, s.condition) for e, s in dead if e.id == rid] == [(rid, "RetriesExhausted")]


async def test_a_success_goes_to_on_success(act: Activator) -> None:
    _, body = await _enqueue(act, "ok", {"n": 21})
    done = await _settled(act, body["requestId"])
    assert (done["state"], done["result"], done["attempts"], done["version"]) == ("succeeded", {"doubled": 42}, 1, 1)
    record = (await _settled(act, destination_id(body["requestId"], "onSuccess")))["result"]
    assert record["requestContext"]["condition"] == "Success"
    assert (record["requestPayload"], record["responsePayload"]) == ({"n": 21}, {"doubled": 42})
    assert "functionError" not in record["responseContext"]


async def test_an_event_older_than_max_event_age_is_not_run(act: Activator) -> None:
    before = await act.metric("ember_invocations_total", function="default/aged")
    old = Event("aged-event-1", "default", "aged", None, b'{"n": 1}', time.time() - 61)
    await act.app[keys.ASYNC].store.put(old)  # as if it had waited 61 s in the store
    failed = await _settled(act, old.id)
    assert (failed["state"], failed["condition"], failed["attempts"]) == ("failed", "EventAgeExceeded", 0)
    record = (await _settled(act, destination_id(old.id, "onFailure")))["result"]
    assert record["requestContext"]["condition"] == "EventAgeExceeded"
    assert "responseContext" not in record  # never invoked
    assert await act.metric("ember_invocations_total", function="default/aged") == before


async def test_an_idempotency_key_makes_a_repeated_enqueue_a_no_op(act: Activator) -> None:
    before = await act.metric("ember_invocations_total", function="default/ok")
    replies = await asyncio.gather(
        *(_enqueue(act, "ok", {"n": 1}, **{"X-Ember-Idempotency-Key": "order-1234"}) for _ in range(5))
    )
    ids = {body["requestId"] for code, body in replies if code == 202}
    assert len(ids) == 1, replies
    await _settled(act, ids.pop())
    await asyncio.sleep(0.3)
    assert await act.metric("ember_invocations_total", function="default/ok") == before + 1
    _, other = await _enqueue(act, "ok", {"n": 1}, **{"X-Ember-Idempotency-Key": "order-1235"})
    assert (await _settled(act, other["requestId"]))["state"] == "succeeded"


@pytest.mark.parametrize("key", ["has space", "", "x" * 257, "tab\there", "é"])
async def test_a_bad_idempotency_key_is_a_400_naming_the_header(act: Activator, key: str) -> None:
    code, body = await _enqueue(act, "ok", {"n": 1}, **{"X-Ember-Idempotency-Key": key})
    assert code == 400, body
    assert "X-Ember-Idempotency-Key" in body["errorMessage"]


async def test_a_slow_function_at_max_scale_holds_one_worker_and_the_others_run_past_its_backlog(
    act: Activator,
) -> None:
    """4 workers; `slow` (maxScale 1, concurrency 1, 0.5 s) gets 20 events, then `ok` 3: without
    parking, the workers would all wait on slow's one pod and ok's events behind them ~9 s."""
    slow = [(await _enqueue(act, "slow", {"n": i}))[1]["requestId"] for i in range(20)]
    await asyncio.sleep(0.3)  # the workers have leased slow's events by now
    ok = [(await _enqueue(act, "ok", {"n": i}))[1]["requestId"] for i in range(3)]
    assert (await act.app[keys.ASYNC].store.parked()).get("default/slow", 0) >= 1  # waiting in the store
    await asyncio.sleep(0.6)  # the worker reads the parked counts every UNPARK_EVERY_S at most
    assert await act.metric("ember_async_parked", function="default/slow") >= 1
    for rid in ok:
        assert (await _settled(act, rid))["state"] == "succeeded"
    states = [(await _status(act.url, act.http, rid))[1]["state"] for rid in slow]
    assert states.count("succeeded") <= 12, states  # ok's events ran past slow's backlog (a cold start of ok's)
    for rid in slow:
        done = await _settled(act, rid)
        assert (done["state"], done["attempts"]) == ("succeeded", 1)  # never throttled: one attempt each
    assert await act.app[keys.ASYNC].store.parked() == {}
    await asyncio.sleep(0.6)
    assert await act.metric("ember_async_parked", function="default/slow") == 0


async def test_unknown_invocations_are_404(act: Activator) -> None:
    code, body = await _status(act.url, act.http, "no-such-event")
    assert (code, body["errorType"]) == (404, "ResourceNotFoundException")
