"""Portions in local sandboxes (issue #11, item 4): one Function's code split into parts that run in
sandbox pools of their own, under their own SecurityPolicy, calling each other only through Ember.

A real activator over the real `LocalPodSource`, in each isolating sandbox this machine has, a
real HTTP payments service on the host's loopback, and a shop whose handler (trusted, no
network) hands hostile input to an untrusted parser with no network and no way to call anything,
then asks a trusted charge portion, the only part holding the payments service, to charge. The
parts try what they must not: call an undeclared portion, one that does not exist, reuse a call
token after its invocation ended, find a way out from the parser. A bounded background load on
another function sees no error meanwhile. The call rule itself is tests/unit/resources/test_portions.py.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from tests.local.activator.helpers import run_activator
from tests.local.security.test_sandbox_local import ISOLATED, _use, background_load
from tests.local.security.test_services_local import (  # noqa: F401 (upstream: a fixture)
    SECRET,
    Upstream,
    _credentials,
    _result,
    upstream,
)

from ember.api.function import Function
from ember.api.security_policy import SecurityPolicySpec
from ember.pods.local import SandboxChoice

SHOP = """
import json, os, urllib.error, urllib.request

def _try(context, name, event):
    try:
        return {"ok": context.invoke_portion(name, event)}
    except Exception as e:
        kind = getattr(e, "error_type", type(e).__name__)
        return {"error": kind, "message": str(e), "status": getattr(e, "status", None)}

def handler(event, context):
    if event.get("stale"):  # a call token kept from an earlier invocation
        with open("/tmp/token") as f:
            old = f.read()
        request = urllib.request.Request(
            os.environ["EMBER_PORTIONS_URL"] + "/parse", data=b"{}", method="POST",
            headers={"X-Ember-Call-Token": old})
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                return {"status": r.status}
        except urllib.error.HTTPError as e:
            return {"status": e.code, "body": json.loads(e.read())}
    with open("/tmp/token", "w") as f:
        f.write(context._call_token)
    parsed = _try(context, "parse", {"raw": event["raw"]})
    if "error" in parsed:
        return {"parsed": parsed}
    charged = _try(context, "charge", parsed["ok"])
    return {
        "parsed": parsed,
        "charged": charged,
        "nosuch": _try(context, "nosuch", {}),
        "services": sorted(k for k in os.environ if k.startswith("EMBER_SERVICE")),
    }

def parse(event, context):
    # hostile input lands here: whatever it makes this code do, it reaches nothing
    if event["raw"] == "explode":
        raise ValueError("cannot parse 'explode'")
    attempts = {
        "charge": _try(context, "charge", {"amount": 1000000}),
        "env": sorted(k for k in os.environ if k.startswith(("EMBER_PORTIONS", "EMBER_SERVICE"))),
    }
    try:
        urllib.request.urlopen("http://127.0.0.1:%d/" % event.get("port", 1), timeout=3)
        attempts["network"] = "reached"
    except OSError as e:
        attempts["network"] = type(e).__name__
    amount = int(event["raw"].split("=")[1])
    return {"amount": amount, "attempts": attempts}

def charge(event, context):
    url = os.environ["EMBER_SERVICE_PAYMENTS_URL"] + "/v1/charges"
    request = urllib.request.Request(url, data=json.dumps({"amount": event["amount"]}).encode(), method="POST")
    with urllib.request.urlopen(request, timeout=10) as r:
        paid = json.loads(r.read())
    return {
        "paid": paid,
        "parse": _try(context, "parse", {"raw": "a=1"}),  # lower in trust, but not declared
        "audit": _try(context, "audit", {"amount": event["amount"]}),
    }

def audit(event, context):
    return {"audited": event["amount"]}
"""

NODE_SHOP = """
exports.handler = async (event, context) => {
  const doubled = await context.invokePortion('double', { n: event.n });
  let missing;
  try { await context.invoke_portion('nosuch', {}); } catch (e) {
    missing = { name: e.name, errorType: e.errorType, status: e.status };
  }
  let failed;
  try { await context.invokePortion('double', { n: 'x' }); } catch (e) {
    failed = { errorType: e.errorType, message: e.errorMessage };
  }
  return { doubled, missing, failed };
};
exports.double = async (event) => {
  if (typeof event.n !== 'number') throw new TypeError('n must be a number');
  return { n: event.n * 2 };
};
"""

SLOW = """
import time

def handler(event, context):
    started = time.monotonic()
    try:
        context.invoke_portion("slow", {})
        outcome = "returned"
    except Exception as e:
        outcome = e.error_type
    return {"outcome": outcome, "took": time.monotonic() - started, "left_ms": context.get_remaining_time_in_millis()}

def slow(event, context):
    time.sleep(60)
"""


def _policy(**spec: Any) -> SecurityPolicySpec:
    return SecurityPolicySpec.model_validate(spec)


def _shop(port: int) -> tuple[Function, SecurityPolicySpec, dict[str, SecurityPolicySpec]]:
    portions = [
        {"name": "parse", "handler": "main.parse", "securityPolicyRef": {"name": "parser"}},
        {"name": "charge", "handler": "main.charge", "securityPolicyRef": {"name": "payments"}, "calls": ["audit"]},
        {"name": "audit", "handler": "main.audit", "securityPolicyRef": {"name": "orchestrator"}},
    ]
    spec = {
        "runtime": "python3.11",
        "handler": "main.handler",
        "code": {"inline": SHOP},
        "timeoutSeconds": 60,
        "portions": portions,
    }
    fn = Function.model_validate({"metadata": {"name": "shop"}, "spec": spec})
    service = {
        "name": "payments",
        "url": f"http://127.0.0.1:{port}/api",
        "credentialsSecretRef": {"name": "payments", "key": "token"},
        "methods": ["POST"],
        "pathPrefixes": ["/v1/charges"],
    }
    orchestrator = _policy(trustLevel="trusted")
    policies = {
        "parse": _policy(trustLevel="untrusted"),
        "charge": _policy(trustLevel="trusted", services=[service]),
        "audit": orchestrator,
    }
    return fn, orchestrator, policies


@pytest.mark.parametrize("choice", ISOLATED)
async def test_portions_call_only_what_they_declare_at_their_trust_level(
    choice: SandboxChoice,
    monkeypatch: pytest.MonkeyPatch,
    upstream: Upstream,  # noqa: F811
) -> None:
    _use(choice, monkeypatch)
    async with run_activator(credentials=_credentials) as act, background_load(act) as errors:
        fn, policy, portions = _shop(upstream.port)
        act.registry.apply(fn, policy=policy, portion_policies=portions)
        shop = await _result(act, "shop", {"raw": "amount=42", "port": upstream.port})
        stale = await _result(act, "shop", {"stale": True})
        exploded = await _result(act, "shop", {"raw": "explode"})
        # every part in a pod of its own pool
        pools = {p.pool for p in act.source.pods().values()}
    assert errors == []
    parsed = shop["parsed"]["ok"]
    assert parsed["amount"] == 42
    # the parser: no channel to Ember at all (its pool calls nothing), no network
    assert parsed["attempts"]["charge"]["error"] == "PortionsUnavailable", parsed
    assert parsed["attempts"]["env"] == [], parsed
    assert parsed["attempts"]["network"] != "reached", parsed
    charged = shop["charged"]["ok"]
    assert json.loads(charged["paid"]["body"]) == {"amount": 42}
    assert charged["audit"] == {"ok": {"audited": 42}}
    assert charged["parse"]["error"] == "CallNotDeclared", charged
    assert charged["parse"]["status"] == 403
    assert "may call: audit" in charged["parse"]["message"]
    assert shop["nosuch"]["error"] == "PortionNotFound"
    assert shop["nosuch"]["status"] == 404
    # the handler holds no service: only the charge portion's pods have it
    assert shop["services"] == []
    assert [(c["method"], c["path"], c["auth"]) for c in upstream.seen] == [("POST", "/api/v1/charges", SECRET)]
    # a call token is good for its own invocation only
    assert stale["status"] == 401, stale
    assert stale["body"]["errorType"] == "Unauthorized"
    # a portion's error comes back to the caller as an error, not a result
    assert exploded["parsed"]["error"] == "ValueError", exploded
    assert "cannot parse 'explode'" in exploded["parsed"]["message"]
    assert len({p for p in pools if p.runtime == "python3.11"}) >= 4  # shop, parse, charge, audit (+ bystander)


@pytest.mark.parametrize("choice", ISOLATED[:1])
async def test_node_code_calls_its_portions(choice: SandboxChoice, monkeypatch: pytest.MonkeyPatch) -> None:
    _use(choice, monkeypatch)
    spec = {
        "runtime": "nodejs20",
        "handler": "index.handler",
        "code": {"inline": NODE_SHOP},
        "portions": [{"name": "double", "handler": "index.double", "securityPolicyRef": {"name": "untrusted"}}],
    }
    fn = Function.model_validate({"metadata": {"name": "node-shop"}, "spec": spec})
    async with run_activator() as act:
        act.registry.apply(fn, policy=_policy(), portion_policies={"double": _policy()})
        reply = await _result(act, "node-shop", {"n": 21})
    assert reply["doubled"] == {"n": 42}
    assert reply["missing"] == {"name": "PortionError", "errorType": "PortionNotFound", "status": 404}
    assert reply["failed"] == {"errorType": "TypeError", "message": "n must be a number"}


@pytest.mark.parametrize("choice", ISOLATED[:1])
async def test_a_portion_runs_only_for_the_time_its_caller_has_left(
    choice: SandboxChoice, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The portion's own timeout is the Function's (6 s): called at once, it gets what the caller
    has left less a margin, so its timeout comes back to the caller as an error while the caller
    still runs (without that, the caller itself would run out of time first)."""
    _use(choice, monkeypatch)
    spec = {
        "runtime": "python3.11",
        "handler": "main.handler",
        "code": {"inline": SLOW},
        "timeoutSeconds": 6,
        "portions": [{"name": "slow", "handler": "main.slow", "securityPolicyRef": {"name": "untrusted"}}],
    }
    fn = Function.model_validate({"metadata": {"name": "impatient"}, "spec": spec})
    async with run_activator() as act:
        act.registry.apply(fn, policy=_policy(), portion_policies={"slow": _policy()})
        reply = await _result(act, "impatient", {})
    assert reply["outcome"] == "Sandbox.Timedout", reply
    assert 4.5 < reply["took"] < 5.9, reply
    assert reply["left_ms"] > 100, reply


BROKEN = """
import time

def handler(event, context):
    started = time.monotonic()
    try:
        return {"ok": context.invoke_portion("parse", {})}
    except Exception as e:
        return {"error": e.error_type, "message": str(e), "took": time.monotonic() - started}
"""


@pytest.mark.parametrize("choice", ISOLATED[:1])
async def test_a_portion_that_cannot_load_fails_every_call_at_once(
    choice: SandboxChoice, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The parser's handler does not exist. The call made while it loads and every later one (the
    portion has failed by then) get its load error at once, not the queue timeout (30 s)."""
    _use(choice, monkeypatch)
    spec = {
        "runtime": "python3.11",
        "handler": "main.handler",
        "code": {"inline": BROKEN},
        "timeoutSeconds": 60,
        "portions": [{"name": "parse", "handler": "main.nothere", "securityPolicyRef": {"name": "untrusted"}}],
    }
    fn = Function.model_validate({"metadata": {"name": "broken"}, "spec": spec})
    async with run_activator() as act:
        act.registry.apply(fn, policy=_policy(), portion_policies={"parse": _policy()})
        replies = [await _result(act, "broken", {}) for _ in range(3)]
    for reply in replies:
        assert reply["error"] == "ResourceNotReadyException", replies
        assert "nothere" in reply["message"], replies
        assert reply["took"] < 10, replies
