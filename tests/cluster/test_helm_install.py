"""Cluster tier: Ember installed with `helm install`, running as pods, used as a user would.

The operator and activator images are built offline (a wheelhouse made on this machine) from
Dockerfile.operator and Dockerfile.activator and imported into the node. The chart installs into a
namespace of this module's own, with two activator replicas behind the activator Service and the
operator watching only that namespace (other tests run their own operators elsewhere). Pods reach
the API server through the `kubernetes` Service and each other through Services and cluster DNS
(kube-proxy and CoreDNS of the test cluster).

Then, as a user would: the pods run with restricted security on the chart's ServiceAccounts;
`helm test` deploys a hello Function and invokes it by the activator's DNS name from a pod; a
Function applied with the API is invoked through the activator Service (Ember API and boto3) in a
gVisor pod, edited under load with no failed request, and deleted with everything it owned; both
activator replicas served; `helm uninstall` stops every Ember pod.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from kubernetes import client

from tests.apiserver.operator_harness import Ember, apply_crds, condition, eventually
from tests.cluster import images
from tests.cluster.cluster import Cluster
from tests.cluster.node import POD_CIDR
from tests.cluster.scenarios import code, invoke_via_boto3, roll_under_load

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "ember"
OPERATOR_IMAGE = "localhost/ember-operator:dev"
ACTIVATOR_IMAGE = "localhost/ember-activator:dev"
REDIS_IMAGE = "localhost/ember-redis:dev"  # tests/cluster/images/redis: Debian's redis-server
RELEASE = "ember"
PIP_WHEEL = (sys.executable, "-m", "pip", "wheel", "-q")


def image_context(dest: Path) -> Path:
    """Build context of Ember's images: sources, Dockerfiles and a wheelhouse (the build is offline)."""
    for name in ("pyproject.toml", "Dockerfile.operator", "Dockerfile.activator"):
        shutil.copy(REPO / name, dest)
    shutil.copytree(
        REPO / "operator" / "ember", dest / "operator" / "ember", ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
    deps = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, tomllib; print('\\n'.join(tomllib.load(open(sys.argv[1], 'rb'))['project']['dependencies']))",
            str(REPO / "pyproject.toml"),
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    (dest / "requirements.txt").write_text(deps)
    subprocess.run(
        [*PIP_WHEEL, "--wheel-dir", str(dest / "wheels"), "-r", str(dest / "requirements.txt")],
        check=True,
        timeout=900,
    )
    return dest


@pytest.fixture(scope="module")
def ember_images(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    context = image_context(tmp_path_factory.mktemp("image-context"))
    built = [
        images.build_image(context, tag, dockerfile=context / f"Dockerfile.{component}", context=context)
        for component, tag in (("operator", OPERATOR_IMAGE), ("activator", ACTIVATOR_IMAGE))
    ]
    built.append(images.build_image(REPO / "tests" / "cluster" / "images" / "redis", REDIS_IMAGE))
    cluster.node.import_images(built)
    return [b.tag for b in built]


@pytest.fixture(scope="module")
def helm() -> str:
    out = subprocess.run(
        ["bash", str(REPO / "charts" / "build-helm.sh")], capture_output=True, text=True, timeout=1800, check=True
    )
    return out.stdout.strip().splitlines()[-1]


class Helm:
    """The real `helm` binary against the session's cluster, in the release's namespace."""

    def __init__(self, binary: str, kubeconfig: Path, namespace: str, home: Path) -> None:
        self.binary = binary
        self.namespace = namespace
        self.env = {"KUBECONFIG": str(kubeconfig), "PATH": "/usr/bin:/bin", "HOME": str(home)}

    def __call__(self, *args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.binary, *args, "-n", self.namespace],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout_s,
            check=False,
        )


def _available(apps: client.AppsV1Api, namespace: str, name: str, replicas: int) -> bool:
    status = apps.read_namespaced_deployment(name, namespace).status
    return (status.available_replicas or 0) >= replicas


@pytest.fixture(scope="module")
def release(
    helm: str,
    kubeconfig: Path,
    api_client: Any,
    ember_images: list[str],
    runtime_images: list[str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Helm]:
    """`helm install` into a fresh namespace; uninstalled (and the namespace deleted) afterwards."""
    core, apps = client.CoreV1Api(api_client), client.AppsV1Api(api_client)
    apply_crds(api_client)  # the chart's copy is the same (a unit test checks): helm keeps CRDs that exist
    ns = f"ember-helm-{uuid.uuid4().hex[:6]}"
    core.create_namespace({"metadata": {"name": ns}})
    run = Helm(helm, kubeconfig, ns, tmp_path_factory.mktemp("helm-home"))
    values = {
        "image.registry": "localhost",
        "image.tag": "dev",
        "image.pullPolicy": "Never",
        "activator.replicas": "2",
        "runtimes.poolSize": "2",
        "operator.watchNamespaces[0]": ns,
        "operator.logLevel": "DEBUG",
        "asyncStore.redis.image": REDIS_IMAGE,
    }
    sets = [arg for key, value in values.items() for arg in ("--set", f"{key}={value}")]
    try:
        out = run("install", RELEASE, str(CHART), *sets)
        assert out.returncode == 0, out.stdout + out.stderr
        assert f"helm test {RELEASE} -n {ns}" in out.stdout  # NOTES.txt
        assert f"/v1/namespaces/{ns}/functions/hello/invoke" in out.stdout  # the activator's namespace
        for name, replicas in ((f"{RELEASE}-operator", 1), (f"{RELEASE}-activator", 2), (f"{RELEASE}-redis", 1)):
            eventually(
                lambda name=name, replicas=replicas: _available(apps, ns, name, replicas),
                timeout_s=240,
                what=f"{name} available",
            )
        yield run
    finally:
        for pod in core.list_namespaced_pod(ns, label_selector="app.kubernetes.io/instance=ember").items:
            log = core.read_namespaced_pod_log(pod.metadata.name, ns, tail_lines=40)
            print(f"--- {pod.metadata.name} ---\n{log}")
        out = run("uninstall", RELEASE, "--wait", "--timeout", "3m")
        print(out.stdout + out.stderr)
        core.delete_namespace(ns)
        eventually(
            lambda: ns not in {n.metadata.name for n in core.list_namespace().items},
            timeout_s=180,
            what=f"{ns} deleted",
        )


def _pods(core: client.CoreV1Api, ns: str, component: str) -> list[Any]:
    return list(core.list_namespaced_pod(ns, label_selector=f"app.kubernetes.io/name=ember-{component}").items)


def test_operator_and_activator_pods_run_restricted_on_the_charts_accounts(release: Helm, api_client: Any) -> None:
    core = client.CoreV1Api(api_client)
    for component, image, replicas in (("operator", OPERATOR_IMAGE, 1), ("activator", ACTIVATOR_IMAGE, 2)):
        pods = _pods(core, release.namespace, component)
        assert len(pods) == replicas, [p.metadata.name for p in pods]
        for pod in pods:
            container = pod.spec.containers[0]
            assert container.image == image
            assert pod.spec.service_account_name == f"{RELEASE}-{component}"
            assert pod.spec.security_context.run_as_non_root is True
            assert container.security_context.read_only_root_filesystem is True
            assert container.security_context.capabilities.drop == ["ALL"]
            assert pod.status.container_statuses[0].restart_count == 0, pod.metadata.name
    (operator,) = _pods(core, release.namespace, "operator")
    log = eventually(
        lambda: (
            (text := core.read_namespaced_pod_log(operator.metadata.name, release.namespace))
            and "operator started" in text
            and text
        ),
        timeout_s=60,
        what="the operator's start-up log line",
    )
    assert "keep_versions=3" in log, log[-2000:]


def test_helm_test_invokes_hello_through_the_activator_service(release: Helm) -> None:
    # The invoke pod exits 0 only on {"hello": "helm"} from the activator's DNS name; helm reports each
    # hook's phase. (No --logs: helm would ask for logs of the Function hook too, which is no pod.)
    out = release("test", RELEASE, "--timeout", "5m", timeout_s=360)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"TEST SUITE:     {RELEASE}-test-invoke" in out.stdout, out.stdout
    assert "Phase:          Succeeded" in out.stdout, out.stdout


async def test_function_lifecycle_through_the_in_cluster_activator(release: Helm, api_client: Any) -> None:
    core = client.CoreV1Api(api_client)
    ember = Ember(api_client, release.namespace)
    service = core.read_namespaced_service(f"{RELEASE}-activator", release.namespace)
    url = f"http://{service.spec.cluster_ip}:{service.spec.ports[0].port}"

    ember.create(
        "functions",
        {
            "kind": "Function",
            "metadata": {"name": "hello"},
            "spec": {
                "runtime": "python3.12",
                "handler": "main.handler",
                "code": {"inline": code(1)},
                "concurrency": 8,
            },
        },
    )
    fn = eventually(
        lambda: (f := ember.get("functions", "hello")) and condition(f, "Ready").get("status") == "True" and f,
        timeout_s=120,
        what="Function Ready",
    )
    assert fn["status"]["url"].startswith(f"http://{RELEASE}-activator.{release.namespace}.svc")

    # Fresh connections (the Service balances per connection): both replicas take some.
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True), timeout=aiohttp.ClientTimeout(total=120)
    ) as http:
        for _ in range(24):
            async with http.post(
                f"{url}/v1/namespaces/{release.namespace}/functions/hello/invoke", data=json.dumps({"name": "svc"})
            ) as rsp:
                assert rsp.status == 200, await rsp.text()
                assert await rsp.json() == {"version": 1, "hello": "svc"}
    served = {}
    for pod in _pods(core, release.namespace, "activator"):
        metrics = await _metrics(f"http://{pod.status.pod_ip}:8080/metrics")
        served[pod.metadata.name] = sum(
            float(line.rsplit(" ", 1)[1])
            for line in metrics.splitlines()
            if line.startswith("ember_invocations_total{") and 'function="' in line
        )
    assert len(served) == 2, served
    assert all(n > 0 for n in served.values()), served

    # The function's pods run in gVisor (the pool's RuntimeClass), claimed by the activator pods.
    pods = core.list_namespaced_pod(release.namespace, label_selector="ember.run/function=hello").items
    assert pods
    assert all(p.spec.runtime_class_name == "gvisor" for p in pods)
    holders = {p.metadata.labels.get("ember.run/claimed-by") for p in pods}

    # The in-cluster operator counts the specialized, ready ones into the Version's status. The
    # activators may claim or retire a pod meanwhile: compare with the pods as they are at each look.
    def counted() -> bool:
        now = core.list_namespaced_pod(
            release.namespace, label_selector="ember.run/function=hello,ember.run/version=1"
        ).items
        ready = [p for p in now if p.metadata.labels.get("ember.run/state") == "specialized" and _ready(p)]
        status = (ember.get("versions", "hello-v1") or {}).get("status", {})
        seen = sorted((p.metadata.name, p.metadata.labels.get("ember.run/state"), _ready(p)) for p in now)
        assert ready, seen
        assert status.get("readyPods") == len(ready), (status.get("readyPods"), seen)
        return True

    eventually(counted, timeout_s=30, what="hello-v1 status.readyPods == its specialized ready pods")
    assert holders <= set(served), (holders, served)

    await invoke_via_boto3(url, f"{release.namespace}/hello", expect_version="1")
    await roll_under_load(ember, url, "hello")

    ember.custom.delete_namespaced_custom_object("ember.run", "v1alpha1", release.namespace, "functions", "hello")
    eventually(
        lambda: (
            not ember.versions("hello")
            and not core.list_namespaced_pod(release.namespace, label_selector="ember.run/function=hello").items
            and not [c for c in ember.configmap_names() if "hello" in c]
        ),
        timeout_s=120,
        what="Versions, pods and ConfigMaps of hello collected",
    )


def _ready(pod: Any) -> bool:
    return any(c.type == "Ready" and c.status == "True" for c in pod.status.conditions or [])


async def _metrics(url: str) -> str:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http, http.get(url) as rsp:
        assert rsp.status == 200
        return await rsp.text()


ROUTED = """
import json

def handler(event, context):
    claims = (event["requestContext"].get("authorizer") or {}).get("jwt", {}).get("claims", {})
    return {"statusCode": 200, "headers": {"content-type": "application/json"},
            "body": json.dumps({"who": "WHO", "name": event["pathParameters"]["name"], "sub": claims.get("sub")})}
"""


def _routed(name: str, routes: list[dict[str, Any]], **http: Any) -> dict[str, Any]:
    spec = {"runtime": "python3.12", "handler": "main.handler", "code": {"inline": ROUTED.replace("WHO", name)}}
    return {"kind": "Function", "metadata": {"name": name}, "spec": {**spec, "http": {"routes": routes, **http}}}


def _routes_accepted(ember: Ember, name: str, status: str) -> dict[str, Any] | None:
    fn = ember.get("functions", name)
    return fn if condition(fn, "RoutesAccepted").get("status") == status else None


async def _route(url: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True), timeout=aiohttp.ClientTimeout(total=120)
        ) as http,
        http.get(f"{url}{path}", headers=headers or {}) as rsp,
    ):
        body = await rsp.read()
        return rsp.status, json.loads(body) if body else None


async def test_http_routes_through_the_activator_service(release: Helm, api_client: Any) -> None:
    """Routes served by both in-cluster activators on the Service's public port `gateway` (which
    serves nothing of the activator's own API), a JWT checked against a Secret's JWKS (the
    activator's RBAC reads it), a conflict told on the later Function, and its route handed over
    when the earlier one is deleted."""
    core = client.CoreV1Api(api_client)
    ember = Ember(api_client, release.namespace)
    service = core.read_namespaced_service(f"{RELEASE}-activator", release.namespace)
    ports = {p.name: p.port for p in service.spec.ports}
    url = f"http://{service.spec.cluster_ip}:{ports['gateway']}"
    key = ec.generate_private_key(ec.SECP256R1())
    jwks = {"keys": [{**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(key.public_key())), "kid": "k"}]}
    core.create_namespaced_secret(
        release.namespace, {"metadata": {"name": "issuer-keys"}, "stringData": {"jwks.json": json.dumps(jwks)}}
    )
    authorizer = {
        "jwt": {
            "issuer": "https://issuer.test",
            "audiences": ["shop"],
            "jwksSecretRef": {"name": "issuer-keys", "key": "jwks.json"},
        }
    }
    greet = {"path": "/greet/{name}", "methods": ["GET"]}
    ember.create(
        "functions",
        _routed("greeter", [greet, {"path": "/me/{name}", "authorizer": "issuer"}], authorizers={"issuer": authorizer}),
    )
    first = eventually(lambda: _routes_accepted(ember, "greeter", "True"), timeout_s=60, what="greeter's routes")
    assert first["status"]["routes"] == ["GET /greet/{name}", "ANY /me/{name}"]
    await asyncio.sleep(1.1)  # creationTimestamp has whole seconds: a tie goes by name, and "copycat" would win it
    ember.create("functions", _routed("copycat", [greet]))
    refused = eventually(lambda: _routes_accepted(ember, "copycat", "False"), timeout_s=60, what="copycat refused")
    assert condition(refused, "RoutesAccepted")["reason"] == "RouteConflict"
    assert f"Function {release.namespace}/greeter" in condition(refused, "RoutesAccepted")["message"]

    for _ in range(8):  # fresh connections: both replicas (each with its own table) answer alike
        status, body = await _route(url, "/greet/ada")
        assert (status, body) == (200, {"who": "greeter", "name": "ada", "sub": None}), body
    assert (await _route(url, "/me/ada"))[0] == 401
    for own in ("/metrics", "/healthz", f"/v1/namespaces/{release.namespace}/functions/greeter/invoke"):
        assert await _route(url, own) == (404, {"message": "Not Found"}), own
    token = jwt.encode(
        {"iss": "https://issuer.test", "aud": "shop", "sub": "u1", "exp": int(time.time()) + 300},
        key,
        algorithm="ES256",
        headers={"kid": "k"},
    )
    status, body = await _route(url, "/me/ada", {"Authorization": f"Bearer {token}"})
    assert (status, body) == (200, {"who": "greeter", "name": "ada", "sub": "u1"}), body

    ember.custom.delete_namespaced_custom_object("ember.run", "v1alpha1", release.namespace, "functions", "greeter")
    eventually(
        lambda: _routes_accepted(ember, "copycat", "True"),
        timeout_s=60,
        what="copycat's route accepted once greeter is gone",
    )
    deadline = time.monotonic() + 120
    while True:
        status, body = await _route(url, "/greet/bo")
        if status == 200 and body["who"] == "copycat":
            break
        assert time.monotonic() < deadline, (status, body)
        await asyncio.sleep(0.5)
    ember.custom.delete_namespaced_custom_object("ember.run", "v1alpha1", release.namespace, "functions", "copycat")
    core.delete_namespaced_secret("issuer-keys", release.namespace)


SLOW = "import time\n\ndef handler(event, context):\n    time.sleep(0.05)\n    return {'n': event['n']}\n"
EVENTS = 1000


async def _async_status(http: aiohttp.ClientSession, url: str, rid: str) -> dict[str, Any]:
    async with http.get(f"{url}/v1/invocations/{rid}") as rsp:
        return dict(await rsp.json()) if rsp.status == 200 else {"state": f"http {rsp.status}"}


async def _async_status_via_service(http: aiohttp.ClientSession, url: str, rid: str) -> dict[str, Any]:
    """As `_async_status`, through the Service: until the killed replica leaves its endpoints, a
    connection may be refused (then: not known yet, ask again)."""
    try:
        return await _async_status(http, url, rid)
    except aiohttp.ClientConnectionError as err:
        return {"state": f"unreachable: {err}"}


async def test_async_invocations_survive_an_activator_killed_mid_backlog(release: Helm, api_client: Any) -> None:
    """1,000 events accepted by either replica wait in the chart's Redis (most parked: maxScale 2
    gives each replica room for one at a time); one replica is deleted with no grace while it
    holds some: the other (and its replacement) run every one, and either replica reports every
    status."""
    core = client.CoreV1Api(api_client)
    ember = Ember(api_client, release.namespace)
    service = core.read_namespaced_service(f"{RELEASE}-activator", release.namespace)
    url = f"http://{service.spec.cluster_ip}:{service.spec.ports[0].port}"
    spec = {"runtime": "python3.12", "handler": "main.handler", "code": {"inline": SLOW}, "scaling": {"maxScale": 2}}
    ember.create("functions", {"kind": "Function", "metadata": {"name": "backlog"}, "spec": spec})
    eventually(
        lambda: (f := ember.get("functions", "backlog")) and condition(f, "Ready").get("status") == "True",
        timeout_s=120,
        what="backlog Ready",
    )
    invoke = f"{url}/v1/namespaces/{release.namespace}/functions/backlog/invoke"
    async with (
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(force_close=True), timeout=aiohttp.ClientTimeout(total=60)
        ) as fresh,  # a connection per request: the Service spreads them over both replicas
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http,
    ):
        ids: list[str] = [""] * EVENTS

        async def enqueue(first: int) -> None:
            for n in range(first, EVENTS, 8):
                async with fresh.post(invoke, json={"n": n}, headers={"X-Ember-Invocation-Type": "async"}) as rsp:
                    assert rsp.status == 202, await rsp.text()
                    ids[n] = (await rsp.json())["requestId"]

        await asyncio.gather(*(enqueue(i) for i in range(8)))
        await asyncio.sleep(2)  # both replicas are running some and hold more
        # the kill comes mid-backlog (events run in no set order: ask a sample, not the last one sent)
        sample = [(await _async_status(http, url, rid))["state"] for rid in ids[::20]]
        assert any(state in ("queued", "running") for state in sample), sample
        victim = _pods(core, release.namespace, "activator")[0]
        core.delete_namespaced_pod(victim.metadata.name, release.namespace, grace_period_seconds=0)
        deadline = time.monotonic() + 300
        done: dict[str, dict[str, Any]] = {}
        while len(done) < len(ids):
            left = [r for r in ids if r not in done]
            assert time.monotonic() < deadline, f"{len(left)} events did not run, e.g. {left[0]}"
            statuses = await asyncio.gather(*(_async_status_via_service(http, url, r) for r in left[:200]))
            for rid, status in zip(left[:200], statuses, strict=True):
                if status["state"] == "succeeded":
                    done[rid] = status
            await asyncio.sleep(1)
        assert [done[rid]["result"] for rid in ids] == [{"n": n} for n in range(EVENTS)]
        live = [p for p in _pods(core, release.namespace, "activator") if p.status.pod_ip and _ready(p)]
        for pod in live:  # every replica answers for every event, the replacement included
            for rid in ids[:5] + ids[-5:]:
                assert (await _async_status(http, f"http://{pod.status.pod_ip}:8080", rid))["state"] == "succeeded"
    ember.custom.delete_namespaced_custom_object("ember.run", "v1alpha1", release.namespace, "functions", "backlog")


def test_the_async_store_refuses_anyone_without_its_password(release: Helm, api_client: Any) -> None:
    """The chart's Redis holds every queued event: it answers nothing before AUTH with the
    Secret's password (and its NetworkPolicy admits only the activators: the next test)."""
    import socket

    core = client.CoreV1Api(api_client)
    (pod,) = _pods(core, release.namespace, "redis")

    def ask(*commands: bytes) -> bytes:
        with socket.create_connection((pod.status.pod_ip, 6379), timeout=10) as conn:
            conn.sendall(b"".join(commands))
            time.sleep(0.3)
            return conn.recv(4096)

    assert ask(b"PING\r\n").startswith(b"-NOAUTH")
    assert ask(b"XLEN ember:{" + release.namespace.encode() + b"}:async:stream\r\n").startswith(b"-NOAUTH")
    assert ask(b"AUTH guess\r\n").startswith(b"-WRONGPASS")
    password = base64.b64decode(core.read_namespaced_secret(f"{RELEASE}-redis", release.namespace).data["password"])
    assert ask(b"AUTH " + password + b"\r\n", b"PING\r\n") == b"+OK\r\n+PONG\r\n"


REDIS_PROBE = r"""
import socket, time

def attempt(host, port, send):
    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=3) as s:
            s.settimeout(3)
            s.sendall(send)
            return {"open": True, "got": s.recv(64).decode(errors="replace")}
    except OSError as e:
        return {"open": False, "error": repr(e), "s": round(time.monotonic() - started, 2)}

def handler(event, context):
    return {name: attempt(host, port, send.encode()) for name, (host, port, send) in event.items()}
"""


async def test_a_function_pod_cannot_reach_the_async_store(release: Helm, api_client: Any) -> None:
    """The chart's Redis admits only the activator pods: a function whose policy lets it reach the
    whole pod network (the activators answer it, the positive control) gets no connection to it."""
    core = client.CoreV1Api(api_client)
    ember = Ember(api_client, release.namespace)
    (redis_pod,) = _pods(core, release.namespace, "redis")
    activator_ip = _pods(core, release.namespace, "activator")[0].status.pod_ip
    service = core.read_namespaced_service(f"{RELEASE}-activator", release.namespace)
    url = f"http://{service.spec.cluster_ip}:{service.spec.ports[0].port}"
    policy = {"egress": {"mode": "allowList", "allow": [{"cidr": POD_CIDR}]}}
    ember.create("securitypolicies", {"kind": "SecurityPolicy", "metadata": {"name": "podnet"}, "spec": policy})
    spec = {
        "runtime": "python3.12",
        "handler": "main.handler",
        "code": {"inline": REDIS_PROBE},
        "securityPolicyRef": {"name": "podnet"},
        "timeoutSeconds": 30,
    }
    ember.create("functions", {"kind": "Function", "metadata": {"name": "redis-prober"}, "spec": spec})
    eventually(
        lambda: condition(ember.get("functions", "redis-prober") or {}, "Ready").get("status") == "True",
        timeout_s=120,
        what="Function redis-prober Ready",
    )
    event = {
        "activator": [activator_ip, 8080, "GET /healthz HTTP/1.0\r\n\r\n"],
        "redis": [redis_pod.status.pod_ip, 6379, "PING\r\n"],
    }
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http,
        http.post(f"{url}/v1/namespaces/{release.namespace}/functions/redis-prober/invoke", json=event) as rsp,
    ):
        text = await rsp.text()
    assert rsp.status == 200, text
    seen = json.loads(text)
    assert seen["activator"]["open"] is True, seen
    assert seen["activator"]["got"].startswith("HTTP/1."), seen
    assert seen["redis"]["open"] is False, seen  # no -NOAUTH either: no connection at all
    ember.custom.delete_namespaced_custom_object(
        "ember.run", "v1alpha1", release.namespace, "functions", "redis-prober"
    )


CONSUMER = """
import json

def handler(event, context):
    bad = [r["messageId"] for r in event["Records"] if json.loads(r["body"]).get("bad")]
    return {"batchItemFailures": [{"itemIdentifier": i} for i in bad]}
"""


async def test_an_event_source_drains_a_redis_stream_through_both_replicas(release: Helm, api_client: Any) -> None:
    """A Function consuming a stream of the chart's Redis (its URL in a Secret of the user's, read by
    the activators' RBAC): both replicas join the group, every good message is acked, the bad ones
    end in the dead-letter stream after their retries."""
    import redis.asyncio as aioredis

    core = client.CoreV1Api(api_client)
    ember = Ember(api_client, release.namespace)
    (pod,) = _pods(core, release.namespace, "redis")
    chart = core.read_namespaced_secret(f"{RELEASE}-redis", release.namespace).data
    password = base64.b64decode(chart["password"]).decode()
    core.create_namespaced_secret(
        release.namespace,
        {"metadata": {"name": "orders-queue"}, "stringData": {"url": base64.b64decode(chart["url"]).decode()}},
    )
    producer = aioredis.Redis(host=pod.status.pod_ip, port=6379, password=password)
    try:
        for n in range(40):
            await producer.xadd("orders", {"body": json.dumps({"n": n, "bad": n % 10 == 0})})
        source = {
            "name": "orders",
            "type": "redis-stream",
            "connectionSecretRef": {"name": "orders-queue"},
            "stream": "orders",
            "batchSize": 4,
            "maxRetries": 1,
            "deadLetterStream": "orders-dead",
        }
        spec = {"runtime": "python3.12", "handler": "main.handler", "code": {"inline": CONSUMER}}
        ember.create(
            "functions",
            {"kind": "Function", "metadata": {"name": "orders"}, "spec": {**spec, "eventSources": [source]}},
        )
        deadline = time.monotonic() + 180
        while True:
            groups = await producer.xinfo_groups("orders")
            dead = await producer.xlen("orders-dead")
            if groups and int(groups[0]["pending"]) == 0 and int(groups[0]["lag"] or 0) == 0 and dead == 4:
                break
            assert time.monotonic() < deadline, (groups, dead)
            await asyncio.sleep(1)
        consumers = await producer.xinfo_consumers("orders", f"ember-{release.namespace}-orders")
        assert len(consumers) == 2, consumers  # each activator replica is a consumer of the group
        reasons = {f[b"ember.reason"] for _, f in await producer.xrange("orders-dead")}
        assert reasons == {b"retries exhausted after 2 attempts (listed in batchItemFailures)"}
    finally:
        await producer.aclose()
        ember.custom.delete_namespaced_custom_object("ember.run", "v1alpha1", release.namespace, "functions", "orders")
        core.delete_namespaced_secret("orders-queue", release.namespace)


def test_zz_helm_uninstall_stops_every_ember_pod(release: Helm, api_client: Any) -> None:
    """Last in the module (by name): uninstall, then nothing of Ember's runs in the namespace."""
    core = client.CoreV1Api(api_client)
    out = release("uninstall", RELEASE, "--wait", "--timeout", "3m", timeout_s=240)
    assert out.returncode == 0, out.stdout + out.stderr
    eventually(
        lambda: (
            not [
                p.metadata.name
                for p in core.list_namespaced_pod(release.namespace).items
                if p.metadata.labels and p.metadata.labels.get("app.kubernetes.io/instance") == RELEASE
            ]
        ),
        timeout_s=120,
        what="operator and activator pods gone",
    )
