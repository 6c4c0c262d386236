"""Auxiliary services in local sandboxes (issue #11, item 3): function code calls a service of its
policy through `EMBER_SERVICE_<NAME>_URL`, and Ember adds the credential the code never sees.

A real activator over the real `LocalPodSource`, in each isolating sandbox this machine has, a
real HTTP service on the host's loopback, and functions that use the service as allowed, try
what is not allowed, and hunt for the credential (environment, every process's environment and
command line, every file they can read). A bounded background load on another function sees
no error meanwhile. The proxy's rules over plain sockets are test_services_proxy.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web
from tests.local.activator.helpers import Activator, run_activator
from tests.local.security.test_sandbox_local import ISOLATED, _use, background_load

from ember.api.function import Function
from ember.api.security_policy import SecurityPolicySpec
from ember.pods.local import SandboxChoice
from ember.pods.local.process import ProcessState
from ember.pods.services import CredentialUnavailable

SECRET = "Bearer local-services-credential-7f3a9"

CALLER = """
import json, os, socket, stat, sys, urllib.error, urllib.request

SECRET_PART = "local-services-" "credential"  # split: this file itself must not match

def call(method, url, body=None, headers=None):
    request = urllib.request.Request(url, method=method, data=body, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return [r.status, r.read().decode()]
    except urllib.error.HTTPError as e:
        return [e.code, e.read().decode()]
    except OSError as e:
        return [0, repr(e)]

# read-only trees of the sandbox's runtime (the Python and system installs): nothing Ember writes
RUNTIME_TREES = (sys.base_prefix, sys.prefix, "/usr", "/lib", "/lib64", "/bin", "/sbin", "/sys", "/dev", "/proc/sys")

def hunt():
    found = [k for k, v in os.environ.items() if SECRET_PART in v]
    for root in ("/proc", "/"):
        for folder, dirs, files in os.walk(root):
            if folder.startswith(RUNTIME_TREES) or (root == "/" and folder == "/proc"):
                dirs[:] = []
                continue
            for name in files:
                path = os.path.join(folder, name)
                try:
                    if not stat.S_ISREG(os.lstat(path).st_mode) or path == "/proc/kmsg":
                        continue  # a FIFO, device or /proc/<pid>/fd link to a pipe would block
                    with open(path, "rb") as f:
                        if SECRET_PART.encode() in f.read(1 << 20):
                            found.append(path)
                except OSError:
                    pass
    return found

def handler(event, context):
    base = os.environ.get("EMBER_SERVICE_PAYMENTS_URL")
    if event.get("hunt"):
        return {"found": hunt()}
    if "direct" in event:
        try:
            socket.create_connection(("127.0.0.1", event["direct"]), timeout=3).close()
            return {"direct": "connected"}
        except OSError as e:
            return {"direct": repr(e)}
    if "relay" in event:  # another pod's relay port, without its token
        return {"calls": [call("GET", f"http://127.0.0.1:{event['relay']}{path}") for path in event["paths"]]}
    calls = [call(m, base + p, None if b is None else b.encode(), h) for m, p, b, h in event["calls"]]
    return {"base": base, "calls": calls}
"""

NODE_CALLER = """
exports.handler = async () => {
  const base = process.env.EMBER_SERVICE_PAYMENTS_URL;
  const response = await fetch(base + '/v1/charges/n1', { method: 'POST', body: '{"amount": 5}' });
  return { status: response.status, body: await response.text() };
};
"""


class Upstream:
    """The payments service: a real HTTP server on the host's loopback that records every call."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []
        self.port = 0

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.text()
        self.seen.append(
            {"method": request.method, "path": request.raw_path, "auth": request.headers.get("Authorization")}
        )
        return web.json_response({"charged": request.raw_path, "body": body})


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    service = Upstream()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", service.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    service.port = runner.addresses[0][1]
    yield service
    await runner.cleanup()


async def _credentials(namespace: str, name: str, key: str) -> str:
    if (namespace, name, key) == ("default", "payments", "token"):
        return SECRET
    raise CredentialUnavailable(f"no Secret {namespace}/{name}")


def _policy(port: int, *, egress: dict[str, Any] | None = None, secret: str = "payments") -> SecurityPolicySpec:
    service = {
        "name": "payments",
        "url": f"http://127.0.0.1:{port}/api",
        "credentialsSecretRef": {"name": secret, "key": "token"},
        "methods": ["GET", "POST"],
        "pathPrefixes": ["/v1/charges"],
    }
    return SecurityPolicySpec.model_validate({"services": [service], "egress": egress or {"mode": "none"}})


def _function(name: str, code: str, runtime: str = "python3.11") -> Function:
    handler = "main.handler" if runtime.startswith("python") else "index.handler"
    spec = {"runtime": runtime, "handler": handler, "code": {"inline": code}, "timeoutSeconds": 60}
    return Function.model_validate({"metadata": {"name": name}, "spec": spec})


async def _result(act: Activator, name: str, event: object) -> dict[str, Any]:
    async with act.http.post(act.invoke_url(name), data=json.dumps(event).encode()) as response:
        text = await response.text()
        assert response.status == 200, text
        assert "X-Ember-Function-Error" not in response.headers, text
        return dict(json.loads(text))


@pytest.mark.parametrize("choice", ISOLATED)
async def test_a_function_calls_its_service_with_a_credential_it_cannot_find(
    choice: SandboxChoice, monkeypatch: pytest.MonkeyPatch, upstream: Upstream
) -> None:
    _use(choice, monkeypatch)
    async with run_activator(credentials=_credentials) as act, background_load(act) as errors:
        act.registry.apply(_function("caller", CALLER), policy=_policy(upstream.port))
        calls = [
            ["GET", "/v1/charges/7?expand=a&expand=b", None, {}],
            ["POST", "/v1/charges", '{"amount": 3}', {"Authorization": "Bearer forged"}],
            ["GET", "/v1/refunds", None, {}],
            ["GET", "/v1/charges/../../admin", None, {}],
            ["DELETE", "/v1/charges/7", None, {}],
        ]
        used = await _result(act, "caller", {"calls": calls})
        hunted = await _result(act, "caller", {"hunt": True})
        direct = await _result(act, "caller", {"direct": upstream.port})
        act.registry.apply(_function("node-caller", NODE_CALLER, "nodejs20"), policy=_policy(upstream.port))
        node = await _result(act, "node-caller", {})
    assert errors == []
    statuses = [status for status, _ in used["calls"]]
    assert statuses == [200, 200, 403, 403, 405], used
    assert json.loads(used["calls"][0][1])["charged"] == "/api/v1/charges/7?expand=a&expand=b"
    assert json.loads(used["calls"][1][1])["body"] == '{"amount": 3}'
    assert "PathNotAllowed" in used["calls"][2][1]
    assert "/v1/charges" in used["calls"][2][1]
    assert node["status"] == 200, node
    # only the allowed calls reached the service, each with the credential (not the forged one)
    assert [(c["method"], c["path"], c["auth"]) for c in upstream.seen] == [
        ("GET", "/api/v1/charges/7?expand=a&expand=b", SECRET),
        ("POST", "/api/v1/charges", SECRET),
        ("POST", "/api/v1/charges/n1", SECRET),
    ]
    assert hunted == {"found": []}
    assert used["base"].startswith("http://127.0.0.1:")
    assert "/payments" in used["base"]
    assert direct["direct"] != "connected", direct  # egress none: the service only through Ember


@pytest.mark.parametrize("choice", ISOLATED)
async def test_another_pod_cannot_reach_a_relay_even_when_its_allow_list_names_loopback(
    choice: SandboxChoice, monkeypatch: pytest.MonkeyPatch, upstream: Upstream
) -> None:
    """A pod's relay listens on its own network namespace's loopback: another pod whose
    allow-list names 127.0.0.1 reaches its own loopback, not the victim's (and had it reached
    it, the proxy would refuse it without the victim's token: test_services_proxy.py)."""
    _use(choice, monkeypatch)
    host_net = {"mode": "allowList", "allow": [{"cidr": "127.0.0.1/32"}]}
    async with run_activator(credentials=_credentials) as act:
        act.registry.apply(_function("victim", CALLER), policy=_policy(upstream.port, egress=host_net))
        await _result(act, "victim", {"calls": [["GET", "/v1/charges/1", None, {}]]})
        pods = act.source.pods().values()  # the victim's only (a cold start may have made two)
        victim = next(p for p in pods if p.services_port is not None and p.state is ProcessState.SPECIALIZED)
        attacker_policy = SecurityPolicySpec.model_validate({"egress": host_net})
        act.registry.apply(_function("attacker", CALLER), policy=attacker_policy)
        paths = ["/payments/v1/charges/2", "/AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA/payments/v1/charges/2", "/"]
        attack = await _result(act, "attacker", {"relay": victim.services_port, "paths": paths})
    assert [status for status, _ in attack["calls"]] == [0, 0, 0], attack
    assert all("Connection refused" in error for _, error in attack["calls"]), attack
    assert len(upstream.seen) == 1  # the victim's own call only


@pytest.mark.parametrize("choice", ISOLATED[:1])
async def test_a_credential_that_cannot_be_read_is_a_clear_error(
    choice: SandboxChoice, monkeypatch: pytest.MonkeyPatch, upstream: Upstream
) -> None:
    _use(choice, monkeypatch)
    async with run_activator(credentials=_credentials) as act:
        act.registry.apply(_function("caller", CALLER), policy=_policy(upstream.port, secret="missing"))
        used = await _result(act, "caller", {"calls": [["GET", "/v1/charges", None, {}]]})
    [[status, body]] = used["calls"]
    assert status == 503
    assert json.loads(body) == {
        "errorType": "CredentialUnavailable",
        "errorMessage": "payments: no Secret default/missing",
    }
    assert upstream.seen == []
