"""The activator end to end over real sandboxed agent processes and real sockets.

Covers: load at concurrency 50, a rolling edit under load with zero failures, overload (429,
no 5xx), scale to zero and back, a failed Version leaving traffic in place, a dead pod, async
invocation, and bad input at the HTTP edge. boto3 is in test_lambda_boto3.py; latency and
throughput targets are measured by bench/activator.py, not here.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import signal
import time
from typing import Any

import aiohttp

from ember.activator.version_state import Phase
from ember.pods.local.process import ProcessState

from .helpers import FAST, Activator, function, run_activator

HELLO = """
    def handler(event, context):
        return {"hello": event.get("name", "world"), "version": context.function_version}
"""


# four workers per pod: memoryMiB bounds a pod as a whole (its workers and gVisor's own memory)
ROLL: dict[str, Any] = {"concurrency": 4, "scaling": {"maxScale": 6}, "resources": {"memoryMiB": 256}}


async def _wait_for(predicate, timeout_s: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out after {timeout_s} s waiting for {what}"
        await asyncio.sleep(0.05)


async def _invoke(act: Activator, name: str, event: object, **headers: str) -> tuple[int, dict[str, str], bytes]:
    async with act.http.post(act.invoke_url(name), data=json.dumps(event).encode(), headers=headers) as response:
        return response.status, dict(response.headers), await response.read()


async def test_thousand_invocations_at_concurrency_50_all_succeed(activator: Activator) -> None:
    # memoryMiB bounds a pod as a whole (its 10 concurrent workers and gVisor's own memory)
    activator.registry.apply(
        function("load", HELLO, concurrency=10, scaling={"maxScale": 5}, resources={"memoryMiB": 512})
    )
    gate = asyncio.Semaphore(50)
    statuses: collections.Counter[int] = collections.Counter()
    bodies_ok = 0

    async def one(i: int) -> None:
        nonlocal bodies_ok
        async with gate:
            status, headers, body = await _invoke(activator, "load", {"name": f"n{i}"})
        statuses[status] += 1
        if status == 200 and json.loads(body) == {"hello": f"n{i}", "version": "1"}:
            assert "X-Ember-Function-Error" not in headers
            bodies_ok += 1

    await asyncio.gather(*(one(i) for i in range(1000)))
    assert statuses == {200: 1000}
    assert bodies_ok == 1000
    assert await activator.metric("ember_invocations_total", function="default/load", outcome="success") == 1000
    pods = activator.source.endpoints(activator.registry.get("default", "load").versions[1].key)
    assert 1 <= len(pods) <= 5


async def test_edit_during_steady_load_rolls_to_new_version_with_zero_failures(activator: Activator) -> None:
    activator.registry.apply(function("roll", HELLO, **ROLL))
    versions_seen: collections.Counter[str] = collections.Counter()
    failures: list[str] = []
    stop = asyncio.Event()

    async def client() -> None:
        while not stop.is_set():
            status, headers, body = await _invoke(activator, "roll", {"name": "r"})
            if status != 200 or "X-Ember-Function-Error" in headers:
                failures.append(f"{status} {body[:200]!r}")
            else:
                versions_seen[json.loads(body)["version"]] += 1

    clients = [asyncio.create_task(client()) for _ in range(10)]
    await _wait_for(lambda: versions_seen["1"] >= 100, 60, "100 invocations of Version 1")
    edited = HELLO.replace('"hello"', '"hi"')
    new = activator.registry.apply(function("roll", edited, **ROLL))
    assert new is not None
    assert new.key.number == 2
    await _wait_for(lambda: versions_seen["2"] >= 100, 60, "100 invocations of Version 2")
    stop.set()
    await asyncio.gather(*clients)
    assert failures == []
    old = activator.registry.get("default", "roll").versions[1]
    await _wait_for(lambda: not old.serving and not old.draining, 10, "Version 1 to drain")
    status, headers, body = await _invoke(activator, "roll", {})
    assert (status, headers["X-Ember-Executed-Version"], json.loads(body)["version"]) == (200, "2", "2")


async def test_overload_beyond_capacity_and_queue_gives_429_not_5xx() -> None:
    config = FAST.__class__(**{**_fields(FAST), "queue_depth": 3})
    async with run_activator(config) as act:
        slow = "import time\ndef handler(event, context):\n    time.sleep(0.3)\n    return 1\n"
        act.registry.apply(function("slow", slow, concurrency=2, scaling={"maxScale": 1}))
        status, _, _ = await _invoke(act, "slow", {})  # warm it: one pod, 2 slots
        assert status == 200
        results = await asyncio.gather(*(_invoke(act, "slow", {}) for _ in range(30)))
        codes = collections.Counter(status for status, _, _ in results)
        assert codes[200] >= 5  # 2 running + 3 queued at least
        assert codes[429] >= 20
        assert set(codes) <= {200, 429}
        throttled = next(r for r in results if r[0] == 429)
        assert throttled[1]["Retry-After"] == "1"
        assert json.loads(throttled[2])["errorType"] == "TooManyRequestsException"
        assert len(act.source.endpoints(act.registry.get("default", "slow").versions[1].key)) == 1


async def test_idle_function_scales_to_zero_and_back(activator: Activator) -> None:
    activator.registry.apply(function("idle", HELLO, scaling={"keepAliveSeconds": 1}))
    status, _, _ = await _invoke(activator, "idle", {})
    assert status == 200
    version = activator.registry.get("default", "idle").versions[1]
    await _wait_for(lambda: not activator.source.endpoints(version.key), 15, "scale to zero")
    assert await activator.metric("ember_pods", function="default/idle", state="ready") == 0
    status, _, body = await _invoke(activator, "idle", {"name": "back"})
    assert (status, json.loads(body)["hello"]) == (200, "back")
    # one in flight at 70 % target utilization of concurrency 1 asks for up to 2 pods
    assert 1 <= len(activator.source.endpoints(version.key)) <= 2
    assert await activator.metric("ember_cold_starts_total", function="default/idle") >= 2


async def test_failed_version_leaves_traffic_on_the_old_one(activator: Activator) -> None:
    activator.registry.apply(function("stay", HELLO))
    status, _, _ = await _invoke(activator, "stay", {})
    assert status == 200
    broken = activator.registry.apply(function("stay", "import no_such_module\ndef handler(e, c):\n    return 1\n"))
    assert broken is not None
    await _wait_for(lambda: broken.phase is Phase.FAILED, 30, "Version 2 to fail")
    assert "no_such_module" in broken.message
    status, headers, body = await _invoke(activator, "stay", {"name": "still"})
    assert (status, headers["X-Ember-Executed-Version"], json.loads(body)["hello"]) == (200, "1", "still")
    async with activator.http.get(f"{activator.url}/readyz") as response:
        ready = await response.json()
    assert ready["functions"]["default/stay"]["2"]["phase"] == "Failed"
    status, _, body = await _invoke_qualified(activator, "stay", "2")
    assert status == 502
    assert json.loads(body)["errorType"] == "ResourceNotReadyException"


async def _invoke_qualified(act: Activator, name: str, qualifier: str) -> tuple[int, dict[str, str], bytes]:
    url = act.invoke_url(name) + f"?qualifier={qualifier}"
    async with act.http.post(url, data=b"{}") as response:
        return response.status, dict(response.headers), await response.read()


async def test_aliases_and_version_numbers_route(activator: Activator) -> None:
    activator.registry.apply(function("aliased", HELLO))
    await _invoke(activator, "aliased", {})
    activator.registry.apply(function("aliased", HELLO.replace('"hello"', '"v2"'), aliases={"stable": {"version": 1}}))
    fs = activator.registry.get("default", "aliased")
    await _wait_for(lambda: fs.versions[2].phase is Phase.READY, 30, "Version 2 ready")
    status, headers, _ = await _invoke_qualified(activator, "aliased", "stable")
    assert (status, headers["X-Ember-Executed-Version"]) == (200, "1")
    status, headers, _ = await _invoke_qualified(activator, "aliased", "2")
    assert (status, headers["X-Ember-Executed-Version"]) == (200, "2")
    status, headers, _ = await _invoke(activator, "aliased", {})
    assert (status, headers["X-Ember-Executed-Version"]) == (200, "2")


async def test_dead_pod_is_replaced_and_invocations_keep_working(activator: Activator) -> None:
    activator.registry.apply(function("fragile", HELLO))
    status, _, _ = await _invoke(activator, "fragile", {})
    assert status == 200
    version = activator.registry.get("default", "fragile").versions[1]
    # Usually one pod; the autoscaler may have started a second (1 in flight over a target of 0.7 per pod).
    pod = activator.source.endpoints(version.key)[0]
    os.kill(activator.source.pods()[pod.id].pid, signal.SIGKILL)
    await _wait_for(lambda: pod not in activator.source.endpoints(version.key), 10, "the dead pod to be noticed")
    status, _, body = await _invoke(activator, "fragile", {"name": "again"})
    assert (status, json.loads(body)["hello"]) == (200, "again")
    replacements = activator.source.endpoints(version.key)
    assert replacements
    assert pod.id not in {p.id for p in replacements}


async def test_dead_warm_pod_is_replaced_in_the_pool(activator: Activator) -> None:
    activator.registry.apply(function("pooled", HELLO))
    await _invoke(activator, "pooled", {})
    pool = activator.registry.get("default", "pooled").versions[1].pool
    await _wait_for(lambda: activator.source.warm_pods().get(pool, 0) == 2, 30, "a full warm pool")
    victim = next(p for p in activator.source.pods().values() if p.pool == pool and p.state is ProcessState.WARM)
    os.kill(victim.pid, signal.SIGKILL)
    await _wait_for(lambda: victim.id not in activator.source.pods(), 10, "the dead warm pod to be noticed")
    await _wait_for(lambda: activator.source.warm_pods().get(pool, 0) == 2, 30, "the pool to refill")


async def test_async_invocation_runs_and_reports(activator: Activator) -> None:
    activator.registry.apply(function("later", HELLO))
    status, headers, body = await _invoke(activator, "later", {"name": "a"}, **{"X-Ember-Invocation-Type": "async"})
    assert status == 202
    request_id = json.loads(body)["requestId"]
    assert headers["X-Ember-Request-Id"] == request_id

    async def state() -> dict[str, object]:
        async with activator.http.get(f"{activator.url}/v1/invocations/{request_id}") as response:
            return dict(await response.json())

    deadline = time.monotonic() + 30
    outcome = await state()
    while outcome["state"] in ("queued", "running") and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        outcome = await state()
    assert outcome["state"] == "succeeded"
    assert outcome["result"] == {"hello": "a", "version": "1"}


async def test_dry_run_checks_without_running(activator: Activator) -> None:
    activator.registry.apply(function("dry", HELLO))
    status, headers, body = await _invoke(activator, "dry", {}, **{"X-Ember-Invocation-Type": "dry-run"})
    assert (status, body, headers["X-Ember-Executed-Version"]) == (204, b"", "1")
    assert await activator.metric("ember_invocations_total", function="default/dry") == 0


async def test_function_error_is_200_with_header(activator: Activator) -> None:
    activator.registry.apply(function("oops", "def handler(e, c):\n    raise ValueError('bad value')\n"))
    status, headers, body = await _invoke(activator, "oops", {})
    assert status == 200
    assert headers["X-Ember-Function-Error"] == "Handled"
    error = json.loads(body)
    assert (error["errorType"], error["errorMessage"]) == ("ValueError", "bad value")


async def test_bad_input_at_the_edge(activator: Activator) -> None:
    activator.registry.apply(function("edge", HELLO))
    url = activator.invoke_url("edge")
    cases: list[tuple[str, dict[str, str], bytes, int, str]] = [
        ("bad json", {}, b"{not json", 400, "InvalidRequestContentException"),
        ("bad invocation type", {"X-Ember-Invocation-Type": "later"}, b"{}", 400, "InvalidParameterValueException"),
        ("bad log type", {"X-Ember-Log-Type": "Everything"}, b"{}", 400, "InvalidParameterValueException"),
        ("bad request id", {"X-Ember-Request-Id": "has spaces"}, b"{}", 400, "InvalidParameterValueException"),
        ("async bad json", {"X-Ember-Invocation-Type": "async"}, b"[1,", 400, "InvalidRequestContentException"),
        ("oversize", {}, b'"' + b"x" * (6 * 1024 * 1024 + 10) + b'"', 413, "RequestTooLargeException"),
    ]
    for what, headers, body, want_status, want_type in cases:
        async with activator.http.post(url, data=body, headers=headers) as response:
            got = (response.status, (await response.json())["errorType"])
        assert got == (want_status, want_type), what
    for path, want in [
        ("/v1/namespaces/default/functions/missing/invoke", "function default/missing not found"),
        ("/v1/namespaces/other/functions/edge/invoke", "function other/edge not found"),
        ("/v1/namespaces/default/functions/edge/invoke?qualifier=7", "has no Version 7"),
        ("/v1/namespaces/default/functions/edge/invoke?qualifier=nope", "has no alias or Version 'nope'"),
    ]:
        async with activator.http.post(activator.url + path, data=b"{}") as response:
            error = await response.json()
        assert response.status == 404, path
        assert want in error["errorMessage"]
    async with activator.http.get(url) as response:
        assert response.status == 405


async def test_probes_and_metrics(activator: Activator) -> None:
    activator.registry.apply(function("probe", HELLO))
    await _invoke(activator, "probe", {})
    async with activator.http.get(f"{activator.url}/healthz") as response:
        assert response.status == 200
    async with activator.http.get(f"{activator.url}/readyz") as response:
        assert response.status == 200
        assert (await response.json())["functions"]["default/probe"]["1"]["phase"] == "Ready"
    async with activator.http.get(f"{activator.url}/metrics") as response:
        text = await response.text()
    for name in (
        "ember_invocations_total",
        "ember_invocation_duration_seconds_bucket",
        "ember_cold_starts_total",
        "ember_in_flight",
        "ember_queue_depth",
        "ember_pods",
        "ember_pool_pods",
    ):
        assert name in text, name
    assert (
        await activator.metric("ember_cold_starts_total", kind="pool_hit")
        + await activator.metric("ember_cold_starts_total", kind="pool_miss")
        >= 1
    )


def _fields(config: object) -> dict[str, object]:
    import dataclasses

    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}  # type: ignore[arg-type]


async def test_client_disconnect_does_not_leak_slots(activator: Activator) -> None:
    slow = "import time\ndef handler(event, context):\n    time.sleep(0.5)\n    return 1\n"
    activator.registry.apply(function("gone", slow, concurrency=1, scaling={"maxScale": 1}))
    await _invoke(activator, "gone", {})
    timeout = aiohttp.ClientTimeout(total=0.1)
    for _ in range(3):
        try:
            async with activator.http.post(activator.invoke_url("gone"), data=b"{}", timeout=timeout) as response:
                await response.read()
        except TimeoutError:
            pass
    version = activator.registry.get("default", "gone").versions[1]
    await _wait_for(lambda: version.throttler.in_flight == 0 and version.throttler.queued == 0, 10, "slots back")
    status, _, _ = await _invoke(activator, "gone", {})
    assert status == 200


async def test_async_invocation_retries_a_failing_function(activator: Activator) -> None:
    failing = "def handler(event, context):\n    raise RuntimeError('always')\n"
    activator.registry.apply(function("retry", failing, **{"async": {"maxRetries": 1}}))
    status, _, body = await _invoke(activator, "retry", {}, **{"X-Ember-Invocation-Type": "async"})
    assert status == 202
    request_id = json.loads(body)["requestId"]
    deadline = time.monotonic() + 30
    outcome: dict[str, object] = {"state": "queued"}
    while time.monotonic() < deadline:
        async with activator.http.get(f"{activator.url}/v1/invocations/{request_id}") as response:
            outcome = dict(await response.json())
        if outcome["state"] == "failed" and outcome["attempts"] == 2:
            break
        await asyncio.sleep(0.05)
    assert (outcome["state"], outcome["attempts"], outcome["functionError"]) == ("failed", 2, "Handled")
    assert await activator.metric("ember_invocations_total", function="default/retry", outcome="function_error") == 2
    async with activator.http.get(f"{activator.url}/v1/invocations/no-such-id") as response:
        assert response.status == 404
