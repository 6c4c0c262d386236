"""Cluster tier (#11, item 4): portions in gVisor pods of their own pools, calling each other
through the activator only.

The operator and the activator run as host processes (as in test_services_cluster.py); the
activator's services proxy, which also takes portion calls, listens on the node address its
pods reach. A shop's handler (trusted) hands input to an untrusted parser, then has a trusted
charge portion, the only part holding the payments service (a real HTTP server on the host's
loopback), charge it. The parts try what they must not: the parser calls charge, charge calls
the parser (neither declares calls: they have no call token, no URL), the handler reuses a call
token after its invocation ended. The Version's pods and its portions' pods stay apart: the operator made
a pool for each part, and the Version counts only its own pods as ready. The test cluster enforces
NetworkPolicy; the services port of the host-process activator is opened to the pods as in
test_services_cluster.py.
"""

from __future__ import annotations

import json
from typing import Any

import aiohttp
import pytest

from tests.apiserver.operator_harness import Ember, condition, eventually
from tests.cluster.scenarios import ActivatorProcess
from tests.cluster.test_agent_restart_cluster import _call, _create_ready, _function
from tests.cluster.test_services_cluster import (  # noqa: F401 (fixtures)
    SECRET,
    Payments,
    activator_env,
    host_activator_services_port,
    payments_secret,
)

SHOP = r"""
import json, os, urllib.error, urllib.request

def _try(context, name, event):
    try:
        return {"ok": context.invoke_portion(name, event)}
    except Exception as e:
        return {"error": getattr(e, "error_type", type(e).__name__), "status": getattr(e, "status", None)}

def handler(event, context):
    if event.get("stale"):
        with open("/tmp/token") as f:
            old = f.read()
        request = urllib.request.Request(os.environ["EMBER_PORTIONS_URL"] + "/parse", data=b"{}", method="POST",
                                         headers={"X-Ember-Call-Token": old})
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return {"status": r.status}
        except urllib.error.HTTPError as e:
            return {"status": e.code, "body": json.loads(e.read())}
    with open("/tmp/token", "w") as f:
        f.write(context._call_token)
    parsed = _try(context, "parse", {"raw": event["raw"]})
    return {"parsed": parsed, "charged": _try(context, "charge", parsed.get("ok", {})),
            "services": sorted(k for k in os.environ if k.startswith("EMBER_SERVICE"))}

def parse(event, context):
    return {"amount": int(event["raw"].split("=")[1]), "charge": _try(context, "charge", {"amount": 10**6}),
            "env": sorted(k for k in os.environ if k.startswith(("EMBER_PORTIONS", "EMBER_SERVICE")))}

def charge(event, context):
    request = urllib.request.Request(os.environ["EMBER_SERVICE_PAYMENTS_URL"] + "/v1/charges",
                                     data=json.dumps({"amount": event["amount"]}).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10) as r:
        paid = json.loads(r.read())
    return {"paid": paid, "parse": _try(context, "parse", {"raw": "a=1"})}
"""


def _policy(ember: Ember, name: str, spec: dict[str, Any]) -> None:
    ember.create("securitypolicies", {"kind": "SecurityPolicy", "metadata": {"name": name}, "spec": spec})


@pytest.mark.usefixtures("payments_secret")
async def test_portions_run_in_pools_of_their_own_and_call_only_what_they_declare(
    ember_ns: Ember, activator: ActivatorProcess
) -> None:
    ember = ember_ns
    payments = Payments()
    async with payments.serving() as port:
        shop, stale = await _shop_calls(ember, activator, port)
    parsed = shop["parsed"]["ok"]
    assert parsed["amount"] == 42
    assert parsed["charge"]["error"] == "PortionsUnavailable", parsed  # the parser has no channel
    assert parsed["env"] == []
    charged = shop["charged"]["ok"]
    assert charged["paid"] == {"charged": "/api/v1/charges"}
    assert charged["parse"] == {"error": "PortionsUnavailable", "status": None}  # it declares no calls
    assert shop["services"] == []  # only the charge portion holds the service
    assert payments.seen == [("POST", "/api/v1/charges", SECRET)]
    assert stale["status"] == 401, stale
    # each part in pods of its own pool, labelled as the Version's portion
    pods = ember.core.list_namespaced_pod(ember.ns, label_selector="ember.run/function=shop").items
    parts = sorted((p.metadata.labels.get("ember.run/portion", ""), p.metadata.labels["ember.run/pool"]) for p in pods)
    assert {part for part, _ in parts} == {"", "parse", "charge"}, parts
    assert len({pool for _, pool in parts}) == 3, parts
    eventually(
        lambda: (ember.get("versions", "shop-v1").get("status") or {}).get("readyPods") == 1,
        timeout_s=30,
        what="the Version counting its own pod only",
    )
    eventually(
        lambda: condition(ember.get("versions", "shop-v1"), "PortionsLoaded").get("status") == "True",
        timeout_s=30,
        what="PortionsLoaded=True once a pod of each portion loaded",
    )


async def _shop_calls(ember: Ember, activator: ActivatorProcess, port: int) -> tuple[Any, Any]:
    """The shop and its policies made, Ready; one order, then a kept call token tried."""
    service = {
        "name": "payments",
        "url": f"http://127.0.0.1:{port}/api",
        "credentialsSecretRef": {"name": "payments", "key": "token"},
        "methods": ["POST"],
    }
    _policy(ember, "shop", {"trustLevel": "trusted"})
    _policy(ember, "parser", {"trustLevel": "untrusted"})
    _policy(ember, "pay", {"trustLevel": "trusted", "services": [service]})
    portions = [
        {"name": "parse", "handler": "main.parse", "securityPolicyRef": {"name": "parser"}},
        {"name": "charge", "handler": "main.charge", "securityPolicyRef": {"name": "pay"}},
    ]
    more: dict[str, Any] = {"securityPolicyRef": {"name": "shop"}, "timeoutSeconds": 60, "portions": portions}
    _create_ready(ember, _function("shop", SHOP, **more))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as http:
        status, text = await _call(http, activator.url, ember.ns, "shop", {"raw": "amount=42"})
        assert status == 200, text
        shop = json.loads(text)
        status, text = await _call(http, activator.url, ember.ns, "shop", {"stale": True})
        assert status == 200, text
        return shop, json.loads(text)


BROKEN = r"""
def handler(event, context):
    try:
        return {"ok": context.invoke_portion("parse", {})}
    except Exception as e:
        return {"error": getattr(e, "error_type", type(e).__name__), "message": str(e)}
"""


async def test_a_portion_that_cannot_load_shows_on_its_version_and_the_handler_keeps_serving(
    ember_ns: Ember, activator: ActivatorProcess
) -> None:
    """The parser's handler does not exist: calls to it fail with the load error, the Version says
    `PortionsLoaded=False` naming the portion and why (a Warning Event), and stays Ready."""
    ember = ember_ns
    _policy(ember, "shop", {"trustLevel": "trusted"})
    _policy(ember, "parser", {"trustLevel": "untrusted"})
    portions = [{"name": "parse", "handler": "main.nothere", "securityPolicyRef": {"name": "parser"}}]
    more: dict[str, Any] = {"securityPolicyRef": {"name": "shop"}, "portions": portions, "timeoutSeconds": 60}
    _create_ready(ember, _function("broken", BROKEN, **more))
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as http:
        status, text = await _call(http, activator.url, ember.ns, "broken", {})
    assert status == 200, text
    assert "nothere" in json.loads(text)["message"], text
    eventually(
        lambda: condition(ember.get("versions", "broken-v1"), "PortionsLoaded").get("reason") == "PortionLoadFailed",
        timeout_s=60,
        what="PortionsLoaded=False on the Version",
    )
    failed = condition(ember.get("versions", "broken-v1"), "PortionsLoaded")
    assert failed["status"] == "False", failed
    assert "portion parse failed to load" in failed["message"], failed
    assert "nothere" in failed["message"], failed
    assert condition(ember.get("versions", "broken-v1"), "Ready")["status"] == "True"
    events = ember.core.list_namespaced_event(ember.ns, field_selector="involvedObject.name=broken-v1").items
    assert any(e.reason == "PortionLoadFailed" and e.type == "Warning" for e in events), events
