"""Cluster tier (#11, hostile suite): a function that kills its own agent, or allocates past its
memory in many processes, breaks only its own pod.

A pool pod's agent holds the code and the token of its one specialize in memory. When its
container restarts (a function killed it, as here; an OOM kill; a failed liveness probe) the
kubelet starts a fresh, generic agent in the same pod, which keeps its `specialized` labels and
turns Ready again. The activator takes the pod out of routing and deletes it, either when it
sees the pod not Ready while the agent is down, or (when it never does) when the restart count
moves past the one recorded at the claim (`ember.run/agent-restarts`; that path alone is
tests/apiserver/test_pods_kubernetes.py); the function's next invocation gets a fresh pod.
Another function, invoked all along, sees no error. The operator and the activator run as host
processes (as in test_agent_auth_cluster.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from tests.apiserver.operator_harness import Ember, condition, eventually
from tests.cluster.scenarios import ActivatorProcess

SUICIDAL = r"""
import os, signal

def handler(event, context):
    if event.get("kill"):
        os.kill(1, signal.SIGTERM)  # the agent is the container's init; it drains and exits
        return {"sent": True}
    return {"alive": True}
"""
GREEDY = r"""
import os, time

def handler(event, context):
    if not event.get("processes"):
        return {"alive": True}
    children = []
    for _ in range(event["processes"]):
        pid = os.fork()
        if pid == 0:
            block = bytearray(event["mib_each"] << 20)
            for i in range(0, len(block), 4096):
                block[i] = 1
            time.sleep(10)
            os._exit(0)
        children.append(pid)
    for pid in children:
        os.waitpid(pid, 0)
    return {"survived": True}
"""
BYSTANDER = "def handler(event, context):\n    return {'n': event.get('n')}\n"


def _function(name: str, code: str, **more: Any) -> dict[str, Any]:
    spec = {"runtime": "python3.12", "handler": "main.handler", "code": {"inline": code}, **more}
    return {"kind": "Function", "metadata": {"name": name}, "spec": spec}


def _create_ready(ember: Ember, *functions: dict[str, Any]) -> None:
    """Create the Functions, then wait until each is Ready."""
    for body in functions:
        ember.create("functions", body)
    for body in functions:
        name = body["metadata"]["name"]
        eventually(
            lambda n=name: condition(ember.get("functions", n), "Ready").get("status") == "True",
            timeout_s=60,
            what=f"Function {name} Ready",
        )


async def _call(http: aiohttp.ClientSession, url: str, ns: str, name: str, event: object) -> tuple[int, str]:
    async with http.post(f"{url}/v1/namespaces/{ns}/functions/{name}/invoke", data=json.dumps(event)) as rsp:
        text = await rsp.text()
        return (rsp.status if "X-Ember-Function-Error" not in rsp.headers else 599), text


@dataclass
class BystanderLoad:
    """What a background load on `bystander` saw: the calls it made and the failed ones."""

    calls: int = 0
    errors: list[str] = field(default_factory=list)


@contextlib.asynccontextmanager
async def _bystander_load(
    http: aiohttp.ClientSession, url: str, ns: str, *, max_calls: int = 3000
) -> AsyncIterator[BystanderLoad]:
    """Invoke `bystander` for the block, one call at a time every 0.1 s at most (bounded: at most
    `max_calls`), checking each answer."""
    load = BystanderLoad()
    done = asyncio.Event()

    async def loop() -> None:
        for n in range(1, max_calls + 1):
            if done.is_set():
                return
            try:
                status, text = await _call(http, url, ns, "bystander", {"n": n})
                if (status, text) != (200, json.dumps({"n": n}, separators=(",", ":"))):
                    load.errors.append(f"{n}: {status} {text}")
            except (aiohttp.ClientError, TimeoutError) as err:
                load.errors.append(f"{n}: {err!r}")
            load.calls = n
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), 0.1)

    task = asyncio.create_task(loop())
    try:
        yield load
    finally:
        done.set()
        await task


async def test_a_function_that_kills_its_agent_gets_a_fresh_pod_and_others_keep_serving(
    ember_ns: Ember, activator: ActivatorProcess
) -> None:
    ember = ember_ns
    _create_ready(ember, _function("suicidal", SUICIDAL), _function("bystander", BYSTANDER))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        url, ns = activator.url, ember.ns
        assert await _call(http, url, ns, "bystander", {"n": 0}) == (200, '{"n":0}')
        async with _bystander_load(http, url, ns) as load:
            assert await _call(http, url, ns, "suicidal", {}) == (200, '{"alive":true}')
            (pod,) = ember.core.list_namespaced_pod(ns, label_selector="ember.run/function=suicidal").items
            assert await _call(http, url, ns, "suicidal", {"kill": True}) == (200, '{"sent":true}')
            # the kubelet restarts the container: a generic agent, Ready again, in a pod still
            # labelled specialized (unless the activator deleted the pod first)
            eventually(lambda: _restarted_and_ready_or_gone(ember, pod.metadata.name), timeout_s=90, what="restart")
            # routed elsewhere: the restarted pod is out of routing and deleted, a fresh one answers
            replies = [await _call(http, url, ns, "suicidal", {}) for _ in range(5)]
            eventually(
                lambda: (
                    pod.metadata.name
                    not in {
                        p.metadata.name
                        for p in ember.core.list_namespaced_pod(ns, label_selector="ember.run/function=suicidal").items
                        if p.metadata.deletion_timestamp is None
                    }
                ),
                timeout_s=30,
                what=f"restarted pod {pod.metadata.name} deleted",
            )
    assert replies == [(200, '{"alive":true}')] * 5, replies
    assert load.errors == []
    assert load.calls > 0, load


def _restarted_and_ready_or_gone(ember: Ember, name: str) -> bool:
    found = ember.core.list_namespaced_pod(ember.ns, field_selector=f"metadata.name={name}").items
    if not found or found[0].metadata.deletion_timestamp is not None:
        return True
    status = found[0].status
    restarted = any(c.restart_count > 0 for c in status.container_statuses or [])
    ready = any(c.type == "Ready" and c.status == "True" for c in status.conditions or [])
    return restarted and ready


async def test_a_function_past_its_memory_in_many_processes_fails_alone_and_gets_a_fresh_pod(
    ember_ns: Ember, activator: ActivatorProcess
) -> None:
    """128 MiB for the whole pod (gVisor's kernel included, as the pod's cgroup counts it): four
    children of 100 MiB each cannot all fit, whatever one process may use."""
    ember = ember_ns
    _create_ready(ember, _function("greedy", GREEDY, resources={"memoryMiB": 128}), _function("bystander", BYSTANDER))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        url, ns = activator.url, ember.ns
        assert await _call(http, url, ns, "bystander", {"n": 0}) == (200, '{"n":0}')
        async with _bystander_load(http, url, ns) as load:
            assert await _call(http, url, ns, "greedy", {}) == (200, '{"alive":true}')
            (pod,) = ember.core.list_namespaced_pod(ns, label_selector="ember.run/function=greedy").items
            status, text = await _call(http, url, ns, "greedy", {"processes": 4, "mib_each": 100})
            eventually(lambda: _restarted_and_ready_or_gone(ember, pod.metadata.name), timeout_s=90, what="restart")
            replies = [await _call(http, url, ns, "greedy", {}) for _ in range(3)]
    assert status == 599, (status, text)  # the function's error (X-Ember-Function-Error), not a crash of Ember
    assert "survived" not in text, text
    assert replies == [(200, '{"alive":true}')] * 3, replies
    assert load.errors == []
    assert load.calls > 0, load
