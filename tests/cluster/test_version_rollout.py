"""Cluster tier: Versions roll out on the real node without ever losing the one that serves.

The operator and an activator (`python -m ember.activator_main`) run as host processes against the
real cluster, function pods are gVisor pods, and the operator keeps the last 2 Versions (the
`operator` fixture's `EMBER_KEEP_VERSIONS`) plus the ready one. Three edits in a row whose code
fails to import, made while two clients keep invoking Version 1: each bad Version is reported by the
activator (its pod refused the code) and ends `Ready=False, reason=LoadFailed` with the import error
in its message; `readyVersion` stays 1, Version 1 is never deleted (retention deletes the oldest bad
one instead) and every invocation succeeds on Version 1. A SecurityPolicy edit under load (four
clients) is a new Version, loaded in pods of a new pool built from the edited policy; traffic moves
to it with no failed request, and the old pool goes once the new Version is ready.
The operator's side alone (conditions, retention, pools) is tests/apiserver; the same roll-outs in
local mode are tests/local/activator/test_policy_rollout.py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp

from tests.apiserver.operator_harness import Ember, condition, eventually
from tests.cluster.scenarios import ActivatorProcess, Result, code, edit_under_load, invoke

SPEC: dict[str, Any] = {
    "runtime": "python3.12",
    "handler": "main.handler",
    "code": {"inline": code(1)},
    "concurrency": 8,  # one pod takes every client: no test waits on a pool refill mid-load
}
POLICY = "tight"
BAD_MODULES = ("ember_missing_one", "ember_missing_two", "ember_missing_three")


def _ready_generic(ember: Ember) -> int:
    pods = ember.core.list_namespaced_pod(ember.ns, label_selector="ember.run/state=generic")
    return sum(
        1
        for p in pods.items
        if p.metadata.deletion_timestamp is None
        and any(c.type == "Ready" and c.status == "True" for c in (p.status.conditions or []))
    )


def _function_ready(ember: Ember, name: str) -> bool:
    return condition(ember.get("functions", name), "Ready").get("status") == "True"


async def _serve_version_1(ember: Ember, url: str, spec: dict[str, Any]) -> None:
    """Create `hello`, wait until Version 1 is Ready (a pod loaded it) and answers."""
    ember.create("functions", {"kind": "Function", "metadata": {"name": "hello"}, "spec": spec})
    await asyncio.to_thread(eventually, lambda: _function_ready(ember, "hello"), timeout_s=180, what="Function Ready")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as http:
        status, version, error, body = await invoke(http, url, ember.ns, "hello")
    assert (status, version, error) == (200, "1", ""), body
    assert body == {"version": 1, "hello": "ember"}


async def _keep_invoking(url: str, ns: str, stop: asyncio.Event, clients: int) -> list[list[Result]]:
    """`clients` callers invoking `hello` one call after another until `stop`; each one's results."""
    streams: list[list[Result]] = [[] for _ in range(clients)]

    async def client(results: list[Result]) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as http:
            while not stop.is_set():
                results.append(await invoke(http, url, ns, "hello"))
                await asyncio.sleep(0.05)

    await asyncio.gather(*(client(results) for results in streams))
    return streams


async def _watch(ember: Ember, stop: asyncio.Event) -> list[tuple[frozenset[int], Any]]:
    """Until `stop`, every 0.3 s: the Version numbers of `hello` that exist, and its `readyVersion`."""
    seen: list[tuple[frozenset[int], Any]] = []
    while not stop.is_set():
        numbers = frozenset(await asyncio.to_thread(ember.versions, "hello"))
        fn = await asyncio.to_thread(ember.get, "functions", "hello")
        seen.append((numbers, ((fn or {}).get("status") or {}).get("readyVersion")))
        await asyncio.sleep(0.3)
    return seen


def _ready_and_latest(ember: Ember) -> tuple[Any, Any]:
    status = (ember.get("functions", "hello") or {}).get("status") or {}
    return status.get("readyVersion"), status.get("latestVersion")


def _load_failed(ember: Ember, number: int) -> dict[str, Any] | None:
    """Version `number`'s Ready condition once it is False (None before)."""
    ready = condition(ember.get("versions", f"hello-v{number}"), "Ready")
    return ready if ready.get("status") == "False" else None


async def test_three_bad_edits_in_a_row_never_delete_the_serving_version(
    ember_ns: Ember, activator: ActivatorProcess
) -> None:
    ember = ember_ns
    await _serve_version_1(ember, activator.url, SPEC)

    stop = asyncio.Event()
    load = asyncio.create_task(_keep_invoking(activator.url, ember.ns, stop, clients=2))
    watch = asyncio.create_task(_watch(ember, stop))
    try:
        for number, module in enumerate(BAD_MODULES, start=2):
            started = time.monotonic()
            bad = f"import {module}\n\n{code(number)}"
            await asyncio.to_thread(ember.patch, "functions", "hello", {"spec": {"code": {"inline": bad}}})
            ready = await asyncio.to_thread(
                eventually, lambda n=number: _load_failed(ember, n), timeout_s=150, what=f"hello-v{number} Ready=False"
            )
            assert ready["reason"] == "LoadFailed", ready
            assert "Runtime.ImportModuleError" in ready["message"], ready
            assert f"No module named '{module}'" in ready["message"], ready
            print(f"Version {number} LoadFailed {time.monotonic() - started:.1f} s after its edit")
        # Retention: the last 2 (3 and 4) and the ready one (1) stay; 2 goes.
        await asyncio.to_thread(
            eventually,
            lambda: set(ember.versions("hello")) == {1, 3, 4} and ember.versions("hello"),
            timeout_s=60,
            what="Versions 1, 3 and 4 (Version 2 deleted)",
        )
        await asyncio.sleep(2.0)  # it keeps serving after the third
    finally:
        stop.set()
        streams = await load
        seen = await watch

    results = [r for stream in streams for r in stream]
    print(f"{len(results)} calls during three bad edits; {len(seen)} looks at the Versions")
    failed = [r for r in results if r[0] != 200 or r[2]]
    assert failed == [], f"{len(failed)} of {len(results)} failed, e.g. {failed[:3]}"
    assert {r[1] for r in results} == {"1"}
    assert all(r[3] == {"version": 1, "hello": "ember"} for r in results)
    assert all(stream for stream in streams)
    assert [numbers for numbers, _ in seen if 1 not in numbers] == [], "Version 1 was deleted"
    assert {ready for _, ready in seen} == {1}, "readyVersion left Version 1"
    eventually(lambda: _ready_and_latest(ember) == (1, 4), timeout_s=15, what="readyVersion 1, latestVersion 4")
    assert condition(ember.get("versions", "hello-v1"), "Ready").get("status") == "True"
    for number in (3, 4):  # the bad ones that remain stay failed
        assert (_load_failed(ember, number) or {}).get("reason") == "LoadFailed", number


def _tmp_size_limit(pod: Any) -> str:
    (tmp,) = [v for v in pod.spec.volumes if v.name == "tmp"]
    return str(tmp.empty_dir.size_limit)


def _version_pods(ember: Ember, number: int) -> list[Any]:
    selector = f"ember.run/function=hello,ember.run/version={number}"
    pods = ember.core.list_namespaced_pod(ember.ns, label_selector=selector).items
    return [p for p in pods if p.metadata.deletion_timestamp is None]


async def test_security_policy_edit_under_load_rolls_to_a_new_version_with_no_failed_request(
    ember_ns: Ember, activator: ActivatorProcess
) -> None:
    ember = ember_ns
    ember.create(
        "securitypolicies",
        {"kind": "SecurityPolicy", "metadata": {"name": POLICY}, "spec": {"filesystem": {"tmpSizeMiB": 16}}},
    )
    await _serve_version_1(ember, activator.url, {**SPEC, "securityPolicyRef": {"name": POLICY}})
    assert {_tmp_size_limit(p) for p in _version_pods(ember, 1)} == {"16Mi"}
    (old_pool,) = ember.pools()
    # The pool refilled after the claim: Version 1 serves from it while Version 2's pool starts.
    await asyncio.to_thread(eventually, lambda: _ready_generic(ember) == 2, timeout_s=120, what="pool refilled to 2")

    started = time.monotonic()
    streams = await edit_under_load(
        activator.url,
        ember.ns,
        "hello",
        lambda: ember.patch("securitypolicies", POLICY, {"spec": {"filesystem": {"tmpSizeMiB": 32}}}),
        old="1",
        new="2",
    )
    results = [r for stream in streams for r in stream]
    print(f"{len(results)} calls; edit to every client on Version 2: {time.monotonic() - started:.1f} s")
    assert all(r[3] == {"version": 1, "hello": "ember"} for r in results)  # the same code, in a new Version

    # Version 2 froze the edited policy, runs in pods of a pool built from it, and the operator
    # marks it Ready once it counts one (shortly after the activator routes to it).
    version = await asyncio.to_thread(
        eventually,
        lambda: (v := ember.get("versions", "hello-v2")) and condition(v, "Ready").get("status") == "True" and v,
        timeout_s=30,
        what="hello-v2 Ready",
    )
    assert version["spec"]["policy"]["filesystem"]["tmpSizeMiB"] == 32
    pods = _version_pods(ember, 2)
    assert pods
    assert {_tmp_size_limit(p) for p in pods} == {"32Mi"}
    assert {p.spec.runtime_class_name for p in pods} == {"gvisor"}
    # Version 1's pool goes once Version 2 is ready; Version 2's stays.
    await asyncio.to_thread(
        eventually,
        lambda: set(ember.pools()) and old_pool not in ember.pools(),
        timeout_s=60,
        what=f"the old pool {old_pool} deleted",
    )
    # kopf writes a reconcile's status after its actions (the pool deleted): it may trail them a little.
    await asyncio.to_thread(
        eventually,
        lambda: _ready_and_latest(ember) == (2, 2),
        timeout_s=15,
        what="readyVersion 2, latestVersion 2",
    )
