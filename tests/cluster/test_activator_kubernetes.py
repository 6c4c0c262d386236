"""Cluster tier: the activator in Kubernetes mode, end to end on the real node.

The operator and the activator (`python -m ember.activator_main`) run as host processes against
the real cluster, in a namespace of this test's own. A Function applied through the API server
becomes the operator's Version 1 and a gVisor warm pool; the activator follows the Function and
its Versions (it mints none), claims a warm pod and invokes it over the pod network, through the
Ember API and through boto3's Lambda client. The Function's code is then edited while four
clients keep invoking: the operator makes Version 2, the activator loads it, and traffic moves
to it with no failed request. SIGTERM then stops the activator cleanly and releases its pods.
"""

from __future__ import annotations

from typing import Any

import aiohttp

from tests.apiserver.operator_harness import Ember, condition, eventually
from tests.cluster.scenarios import ActivatorProcess, code, invoke, invoke_via_boto3, roll_under_load

SPEC: dict[str, Any] = {
    "runtime": "python3.12",
    "handler": "main.handler",
    "code": {"inline": code(1)},
    "concurrency": 8,  # one pod takes the four clients: the test does not wait on pool refills mid-load
}


def _ready_generic(ember: Ember) -> int:
    pods = ember.core.list_namespaced_pod(ember.ns, label_selector="ember.run/state=generic")
    return sum(
        1
        for p in pods.items
        if p.metadata.deletion_timestamp is None
        and any(c.type == "Ready" and c.status == "True" for c in (p.status.conditions or []))
    )


async def test_activator_follows_operator_versions_and_rolls_under_load(
    ember_ns: Ember, activator: ActivatorProcess
) -> None:
    ember = ember_ns
    ember.create("functions", {"kind": "Function", "metadata": {"name": "hello"}, "spec": SPEC})
    eventually(
        lambda: condition(ember.get("functions", "hello"), "Ready").get("status") == "True",
        timeout_s=60,
        what="Function Ready",
    )
    eventually(lambda: _ready_generic(ember) == 2, timeout_s=240, what="2 ready generic pods in gVisor")

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as http:
        # Ember API: the first call claims and specializes a warm pod with the operator's Version 1.
        status, version, error, body = await invoke(http, activator.url, ember.ns, "hello")
        assert (status, version, error) == (200, "1", ""), body
        assert body == {"version": 1, "hello": "ember"}
        async with http.get(f"{activator.url}/readyz") as rsp:
            ready = await rsp.json()
        # The activator minted nothing: it knows exactly the operator's Versions.
        assert set(ready["functions"][f"{ember.ns}/hello"]) == {"1"}
        assert set(ember.versions("hello")) == {1}
        async with http.post(f"{activator.url}/v1/namespaces/{ember.ns}/functions/nope/invoke", data="{}") as rsp:
            assert rsp.status == 404

    await invoke_via_boto3(activator.url, f"{ember.ns}/hello", expect_version="1")
    # The pool refilled after the claim: Version 2 will find a warm pod.
    eventually(lambda: _ready_generic(ember) == 2, timeout_s=240, what="pool refilled to 2")
    await roll_under_load(ember, activator.url, "hello")
    assert set(ember.versions("hello")) == {1, 2}

    # Graceful shutdown: SIGTERM drains, releases the activator's specialized pods and exits 0.
    assert ember.core.list_namespaced_pod(ember.ns, label_selector="ember.run/function=hello").items
    assert activator.stop() == 0
    eventually(
        lambda: not ember.core.list_namespaced_pod(ember.ns, label_selector="ember.run/function=hello").items,
        timeout_s=60,
        what="the activator's pods released",
    )
