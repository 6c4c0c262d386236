"""Cluster tier (#11): a function's pod cannot drive another function's agent over the pod network.

The operator and the activator run as host processes (as in test_activator_kubernetes.py); two
Functions in the test's namespace: a victim, and an attacker whose handler is told the victim
pod's IP and agent port (read from the API) and tries `GET /healthz`, `POST /v1/invoke` and
`POST /v1/specialize` on it, without a token and with one of its own. Each attempt must be either
stopped by the network (the pool's ingress NetworkPolicy) or refused by the agent (401), and
/healthz may say liveness only; never an answer of the victim's code. The test cluster enforces
NetworkPolicy (tests/cluster/node.py), so here the network stops them first; the agent's token,
which holds where no CNI enforces NetworkPolicy, is the local tier's version of the attack (pool
poisoning included), tests/local/security/test_hostile_agent_auth.py.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from tests.apiserver.operator_harness import Ember, condition, eventually
from tests.cluster.scenarios import ActivatorProcess

VICTIM = "def handler(event, context):\n    return {'who': 'victim'}\n"
ATTACKER = r"""
import http.client, json, secrets

def call(ip, port, method, path, token):
    conn = http.client.HTTPConnection(ip, port, timeout=5)
    headers = {"Authorization": "Bearer " + token} if token else {}
    spec = {"handler": "main.handler", "code": {"inline": "x"}}
    body = json.dumps(spec).encode() if path.endswith("specialize") else b"{}"
    try:
        conn.request(method, path, body=None if method == "GET" else body, headers=headers)
        r = conn.getresponse()
        return {"path": path, "status": r.status, "body": r.read().decode(errors="replace")}
    except OSError as e:
        return {"path": path, "error": repr(e)}
    finally:
        conn.close()

def handler(event, context):
    out = []
    for token in (None, secrets.token_urlsafe(32)):
        for method, path in (("GET", "/healthz"), ("POST", "/v1/invoke"), ("POST", "/v1/specialize")):
            out.append(call(event["ip"], event["port"], method, path, token))
    return out
"""


def _function(name: str, code: str) -> dict[str, Any]:
    spec = {"runtime": "python3.12", "handler": "main.handler", "code": {"inline": code}}
    return {"kind": "Function", "metadata": {"name": name}, "spec": spec}


async def _invoke(http: aiohttp.ClientSession, url: str, ns: str, name: str, event: object) -> Any:
    async with http.post(f"{url}/v1/namespaces/{ns}/functions/{name}/invoke", data=json.dumps(event)) as rsp:
        text = await rsp.text()
        assert rsp.status == 200, text
        assert "X-Ember-Function-Error" not in rsp.headers, text
        return json.loads(text)


async def test_a_pod_cannot_invoke_or_specialize_another_functions_agent(
    ember_ns: Ember, activator: ActivatorProcess
) -> None:
    ember = ember_ns
    for name, code in (("victim", VICTIM), ("attacker", ATTACKER)):
        ember.create("functions", _function(name, code))
        eventually(
            lambda n=name: condition(ember.get("functions", n), "Ready").get("status") == "True",
            timeout_s=60,
            what=f"Function {name} Ready",
        )
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        assert await _invoke(http, activator.url, ember.ns, "victim", {}) == {"who": "victim"}
        (pod,) = ember.core.list_namespaced_pod(ember.ns, label_selector="ember.run/function=victim").items
        target = {"ip": pod.status.pod_ip, "port": 8080}  # ember.resources.pool.AGENT_PORT
        seen = await _invoke(http, activator.url, ember.ns, "attacker", target)
        assert await _invoke(http, activator.url, ember.ns, "victim", {}) == {"who": "victim"}
    print(json.dumps(seen, indent=1))
    assert len(seen) == 6, seen
    for attempt in seen:
        if "error" in attempt:
            continue  # the network stopped it
        if attempt["path"] == "/healthz":
            assert attempt["status"] == 200, attempt
            assert set(json.loads(attempt["body"])) == {"state", "runtime"}, attempt
        else:
            assert attempt["status"] == 401, attempt
        assert "victim" not in attempt["body"], attempt
