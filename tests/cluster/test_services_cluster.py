"""Cluster tier (#11, item 3): auxiliary services from gVisor pods, credentials from a real Secret.

The operator and the activator run as host processes (as in test_agent_restart_cluster.py); the
activator's services proxy listens on the node address its pods reach (`EMBER_SERVICES_ADDRESS`,
a pod's own IP in the chart), and a real HTTP service runs on the host's loopback, reachable
only by the activator. A function in a gVisor pool pod calls the service through
`EMBER_SERVICE_PAYMENTS_URL`, tries what its policy does not allow, and hunts for the
credential in its environment and every file it can read; a second function calls with
another pod's leaked URL after that pod is gone. The test cluster enforces NetworkPolicy; the
activator being a host process, `host_activator_services_port` stands in for the pool policy's
rule to the activator pods' services port.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import subprocess
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.apiserver.operator_harness import Ember, eventually
from tests.cluster.controlplane import free_port
from tests.cluster.node import NODE_IP
from tests.cluster.scenarios import ActivatorProcess
from tests.cluster.test_agent_restart_cluster import _call, _create_ready, _function

SECRET = "Bearer cluster-services-credential-51c2"

CALLER = r"""
import json, os, urllib.error, urllib.request

def call(method, url, headers=None):
    body = b"{}" if method == "POST" else None
    request = urllib.request.Request(url, method=method, headers=headers or {}, data=body)
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return [r.status, r.read().decode()]
    except urllib.error.HTTPError as e:
        return [e.code, e.read().decode()]
    except OSError as e:
        return [0, repr(e)]

NEEDLE = "cluster-services-" "credential"  # split: this file itself must not match

def hunt():
    found = [k for k, v in os.environ.items() if NEEDLE in v]
    paths = [f"/proc/{p}/{n}" for p in os.listdir("/proc") if p.isdigit() for n in ("environ", "cmdline")]
    for folder, dirs, files in os.walk("/"):
        if folder in ("/proc", "/sys", "/usr", "/dev"):
            dirs[:] = []
            continue
        paths += [os.path.join(folder, name) for name in files]
    for path in paths:
        try:
            with open(path, "rb") as f:
                if NEEDLE.encode() in f.read(1 << 20):
                    found.append(path)
        except OSError:
            pass
    return found

def handler(event, context):
    base = os.environ["EMBER_SERVICE_PAYMENTS_URL"]
    if event.get("url"):
        return {"calls": [call("GET", event["url"])]}
    calls = [call(m, base + p, h) for m, p, h in event["calls"]]
    return {"base": base, "calls": calls, "found": hunt()}
"""


class Payments:
    """The service: a real HTTP server on the host's loopback recording who called and how."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str | None]] = []

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append((request.method, request.raw_path, request.headers.get("Authorization")))
        return web.json_response({"charged": request.raw_path})

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[int]:
        """Serve on a port of the host's loopback, for the block; yields the port."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, "127.0.0.1", 0).start()
            yield int(runner.addresses[0][1])
        finally:
            await runner.cleanup()


@pytest.fixture
def host_activator_services_port(ember_ns: Ember) -> int:
    """A fixed services port for the host-process activator, and a NetworkPolicy that opens it to the pods.

    A pool whose policy needs the activators' services port (services, portion calls, key-value
    state) may reach it on the activator pods (`ActivatorPeer.services_egress_rule`); no pod selector
    matches a host process, and the cluster enforces NetworkPolicy, so this policy stands in for that
    rule: every pool pod of the test's namespace may reach that one port of the node address.
    """
    port = free_port()
    rule = {"to": [{"ipBlock": {"cidr": f"{NODE_IP}/32"}}], "ports": [{"protocol": "TCP", "port": port}]}
    selector = {"matchExpressions": [{"key": "ember.run/pool", "operator": "Exists"}]}
    body = {
        "metadata": {"name": "tests-host-activator-services"},
        "spec": {"podSelector": selector, "policyTypes": ["Egress"], "egress": [rule]},
    }
    ember_ns.net.create_namespaced_network_policy(ember_ns.ns, body)
    return port


@pytest.fixture
def activator_env(host_activator_services_port: int) -> dict[str, str]:
    return {"EMBER_SERVICES_ADDRESS": NODE_IP, "EMBER_SERVICES_PORT": str(host_activator_services_port)}


@pytest.fixture
def payments_secret(ember_ns: Ember) -> None:
    value = base64.b64encode(f"{SECRET}\n".encode()).decode()  # as --from-file leaves it
    ember_ns.core.create_namespaced_secret(ember_ns.ns, {"metadata": {"name": "payments"}, "data": {"token": value}})


async def test_a_gvisor_function_calls_its_service_through_the_activator_and_never_sees_the_credential(
    ember_ns: Ember, payments_secret: None, activator: ActivatorProcess
) -> None:
    ember = ember_ns
    payments = Payments()
    async with payments.serving() as port:
        used, replay = await _calls_and_replay(ember, activator, port)
    assert [c[0] for c in used["calls"]] == [200, 200, 403, 405], used
    assert used["base"].startswith(f"http://{NODE_IP}:")
    assert used["found"] == []
    assert [c[0] for c in replay["calls"]] == [401], replay
    assert payments.seen == [("GET", "/api/v1/charges/7?x=1", SECRET), ("POST", "/api/v1/charges", SECRET)]


async def _calls_and_replay(ember: Ember, activator: ActivatorProcess, port: int) -> tuple[Any, Any]:
    service = {
        "name": "payments",
        "url": f"http://127.0.0.1:{port}/api",
        "credentialsSecretRef": {"name": "payments", "key": "token"},
        "methods": ["GET", "POST"],
        "pathPrefixes": ["/v1/charges"],
    }
    ember.create(
        "securitypolicies", {"kind": "SecurityPolicy", "metadata": {"name": "pay"}, "spec": {"services": [service]}}
    )
    more: dict[str, Any] = {"securityPolicyRef": {"name": "pay"}, "timeoutSeconds": 60}
    _create_ready(ember, _function("caller", CALLER, **more))
    calls = [
        ["GET", "/v1/charges/7?x=1", {}],
        ["POST", "/v1/charges", {"Authorization": "Bearer forged"}],
        ["GET", "/v1/refunds", {}],
        ["DELETE", "/v1/charges/7", {}],
    ]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as http:
        status, text = await _call(http, activator.url, ember.ns, "caller", {"calls": calls})
        assert status == 200, text
        used = json.loads(text)
        # a pod gone takes its grant with it: its URL, leaked to a new pod, opens nothing
        (pod,) = ember.core.list_namespaced_pod(ember.ns, label_selector="ember.run/function=caller").items
        ember.core.delete_namespaced_pod(pod.metadata.name, ember.ns, grace_period_seconds=0)
        eventually(
            lambda: all(
                p.metadata.name != pod.metadata.name
                for p in ember.core.list_namespaced_pod(ember.ns, label_selector="ember.run/function").items
            ),
            timeout_s=60,
            what="the caller's pod gone",
        )
        leaked = used["base"] + "/v1/charges/8"
        refused: list[str] = []
        for _ in range(3):
            status, text = await _call(http, activator.url, ember.ns, "caller", {"url": leaked})
            assert status == 200, text
            replay = json.loads(text)
            if replay["calls"][0][0] != 0:
                return used, replay
            # Once in CI the new pod's first connection to the node was refused (an ICMP reject, at once)
            # though the policies allowed it; not reproduced since. Its rules then, for the record.
            refused.append(f"{replay}\n{_kube_router_rules(ember)}")
            await asyncio.sleep(1)
        raise AssertionError("the replay never reached the services proxy:\n" + "\n".join(refused))


def _kube_router_rules(ember: Ember) -> str:
    """The filter-table rules naming the caller pods' addresses."""
    pods = ember.core.list_namespaced_pod(ember.ns, label_selector="ember.run/function=caller").items
    addresses = [p.status.pod_ip for p in pods if p.status.pod_ip]
    rules = subprocess.run(["iptables-save", "-t", "filter"], capture_output=True, text=True, check=False).stdout
    return "\n".join(line for line in rules.splitlines() if any(f"{a}/32" in line for a in addresses))
