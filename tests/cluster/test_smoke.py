"""Smoke tests of the cluster tier itself: Ember's CRDs and CEL rules on the real API server, pods under
runc and under gVisor on the real node, pod-to-pod networking over the CNI bridge, and what pods need of a
real cluster: cluster DNS, ClusterIP Services (kube-proxy) and the API server through the `kubernetes`
Service with their service-account token.

What Ember does on the cluster (operator, activator, functions in pods) is tested elsewhere in this tier;
this module proves the tier is real, so that those tests can trust it.
"""

from __future__ import annotations

import copy
import http.server
import ipaddress
import json
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from tests.cluster.conftest import Kubectl
from tests.cluster.kube import apply_crds
from tests.cluster.node import NODE_IP, POD_SUBNET
from tests.cluster.paths import REPO_ROOT

HOST_KERNEL = Path("/proc/version").read_text().strip()


def _wait(what: str, check: Callable[[], bool], *, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def _pod(name: str, image: str, *, runtime_class: str | None = None) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "containers": [
            {
                "name": "main",
                "image": image,
                "imagePullPolicy": "Never",
                "command": ["python3", "-m", "http.server", "8080"],
                "ports": [{"containerPort": 8080}],
            }
        ],
        "terminationGracePeriodSeconds": 1,
    }
    if runtime_class:
        spec["runtimeClassName"] = runtime_class
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}}, "spec": spec}


def _running_pod(core: client.CoreV1Api, namespace: str, body: dict[str, Any]) -> client.V1Pod:
    name = body["metadata"]["name"]
    core.create_namespaced_pod(namespace, body)

    def running() -> bool:
        pod = core.read_namespaced_pod(name, namespace)
        if pod.status.phase in ("Failed", "Succeeded"):
            raise AssertionError(f"pod {namespace}/{name} ended: {pod.status}")
        return bool(pod.status.phase == "Running" and pod.status.pod_ip)

    _wait(f"pod {namespace}/{name} to run", running)
    return core.read_namespaced_pod(name, namespace)


def _exec(kubectl: Kubectl, namespace: str, pod: str, *command: str) -> str:
    result = kubectl("exec", "-n", namespace, pod, "--", *command)
    assert result.returncode == 0, f"exec {command} in {namespace}/{pod} failed: {result.stderr}"
    return result.stdout


# -- CRDs and CEL ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ember_crds(api_client: Any) -> list[str]:
    return apply_crds(api_client)


def _example_function() -> dict[str, Any]:
    return yaml.safe_load((REPO_ROOT / "examples" / "hello-python.yaml").read_text())


def test_crds_apply_and_a_valid_function_is_accepted(ember_crds: list[str], api_client: Any, namespace: str) -> None:
    assert "functions.ember.run" in ember_crds
    custom = client.CustomObjectsApi(api_client)
    created = custom.create_namespaced_custom_object(
        "ember.run", "v1alpha1", namespace, "functions", _example_function()
    )
    assert created["metadata"]["uid"]
    fetched = custom.get_namespaced_custom_object("ember.run", "v1alpha1", namespace, "functions", "hello-python")
    assert fetched["spec"]["runtime"] == "python3.12"


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        pytest.param(
            lambda spec: spec.update(scaling={"minScale": 5, "maxScale": 3}),
            "spec.scaling.minScale must not exceed spec.scaling.maxScale",
            id="min-scale-above-max-scale",
        ),
        pytest.param(
            lambda spec: spec["code"].update(configMapRef={"name": "also-this"}),
            "spec.code must set exactly one of inline, configMapRef, url, path",
            id="two-code-sources",
        ),
    ],
)
def test_api_server_rejects_an_invalid_function_with_the_cel_message(
    ember_crds: list[str], api_client: Any, namespace: str, mutate: Callable[[dict[str, Any]], None], message: str
) -> None:
    body = copy.deepcopy(_example_function())
    body["metadata"]["name"] = "invalid"
    mutate(body["spec"])
    custom = client.CustomObjectsApi(api_client)
    with pytest.raises(ApiException) as rejected:
        custom.create_namespaced_custom_object("ember.run", "v1alpha1", namespace, "functions", body)
    assert rejected.value.status == 422
    assert message in rejected.value.body
    with pytest.raises(ApiException) as missing:
        custom.get_namespaced_custom_object("ember.run", "v1alpha1", namespace, "functions", "invalid")
    assert missing.value.status == 404


# -- pods on the node ------------------------------------------------------------------------------------


def test_deployment_pods_run_under_runc(api_client: Any, smoke_image: str, namespace: str, kubectl: Kubectl) -> None:
    apps = client.AppsV1Api(api_client)
    core = client.CoreV1Api(api_client)
    template = _pod("web", smoke_image)
    apps.create_namespaced_deployment(
        namespace,
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "web"},
            "spec": {
                "replicas": 2,
                "selector": {"matchLabels": {"app": "web"}},
                "template": {"metadata": template["metadata"] | {"name": None}, "spec": template["spec"]},
            },
        },
    )

    def available() -> bool:
        status = apps.read_namespaced_deployment_status("web", namespace).status
        return bool(status.available_replicas == 2)

    _wait("deployment web to have 2 available replicas", available)
    pods = core.list_namespaced_pod(namespace, label_selector="app=web").items
    running = [p for p in pods if p.status.phase == "Running"]
    assert len(running) == 2
    for pod in running:
        # runc shares the host kernel: the pod sees this machine's /proc/version, and no gVisor boot log.
        assert _exec(kubectl, namespace, pod.metadata.name, "cat", "/proc/version").strip() == HOST_KERNEL
        assert pod.spec.runtime_class_name is None


def test_gvisor_pod_runs_in_gvisor(api_client: Any, smoke_image: str, namespace: str, kubectl: Kubectl) -> None:
    core = client.CoreV1Api(api_client)
    pod = _running_pod(core, namespace, _pod("sandboxed", smoke_image, runtime_class="gvisor"))
    assert pod.spec.runtime_class_name == "gvisor"
    assert "Starting gVisor..." in _exec(kubectl, namespace, "sandboxed", "dmesg")
    assert _exec(kubectl, namespace, "sandboxed", "cat", "/proc/version").strip() != HOST_KERNEL


_FETCH = "import sys, urllib.request; print(urllib.request.urlopen(sys.argv[1], timeout=10).status)"


@pytest.mark.parametrize(
    ("server_runtime", "client_runtime"),
    [pytest.param(None, "gvisor", id="gvisor-to-runc"), pytest.param("gvisor", None, id="runc-to-gvisor")],
)
def test_pod_reaches_another_pods_ip(
    api_client: Any,
    smoke_image: str,
    namespace: str,
    kubectl: Kubectl,
    server_runtime: str | None,
    client_runtime: str | None,
) -> None:
    core = client.CoreV1Api(api_client)
    server = _running_pod(core, namespace, _pod("server", smoke_image, runtime_class=server_runtime))
    _running_pod(core, namespace, _pod("client", smoke_image, runtime_class=client_runtime))
    url = f"http://{server.status.pod_ip}:8080/"
    assert ipaddress.ip_address(server.status.pod_ip) in ipaddress.ip_network(POD_SUBNET), server.status.pod_ip
    _wait(
        f"client to reach {url}",
        lambda: kubectl("exec", "-n", namespace, "client", "--", "python3", "-c", _FETCH, url).stdout.strip() == "200",
        timeout_s=30,
    )
    assert kubectl("logs", "-n", namespace, "server").stdout.count('"GET / HTTP/1.1" 200') >= 1


# A gVisor pod calls the node address (where the API server, CoreDNS and the tests' activators listen)
# in a loop and prints what it saw: calls, and the first errors.
_CALL_THE_NODE = """
import json, sys, time, urllib.request
url, seconds = sys.argv[1], float(sys.argv[2])
calls, errors = 0, []
end = time.monotonic() + seconds
while time.monotonic() < end:
    calls += 1
    try:
        urllib.request.urlopen(url, timeout=2).read()
    except OSError as e:
        errors.append(f"{time.strftime('%T')} {e!r}")
    time.sleep(0.05)
print(json.dumps({"calls": calls, "errors": errors[:5], "failed": len(errors)}))
"""


class _Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_pods_keep_reaching_the_node_while_other_pods_come_and_go(
    api_client: Any, smoke_image: str, namespace: str, kubectl: Kubectl
) -> None:
    """Every pod's veth joins the bridge; a bridge whose MAC was not set took the lowest of its ports',
    so it changed as pods came and went, and a pod lost the node for as long as its ARP entry for
    the node lived (about 30 s of calls timing out, before `ensure_bridge` set the MAC)."""
    core = client.CoreV1Api(api_client)
    server = http.server.ThreadingHTTPServer((NODE_IP, 0), _Ok)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://{NODE_IP}:{server.server_address[1]}/"
        caller = _pod("caller", smoke_image, runtime_class="gvisor")
        caller["spec"] |= {"restartPolicy": "Never"}
        caller["spec"]["containers"][0] |= {"command": ["python3", "-c", _CALL_THE_NODE, url, "30"], "ports": []}
        _running_pod(core, namespace, caller)
        for i in range(5):  # each a new port on the bridge, gone again
            _running_pod(core, namespace, _pod(f"passer-by-{i}", smoke_image))
            core.delete_namespaced_pod(f"passer-by-{i}", namespace, grace_period_seconds=0)
        _wait(
            "the caller to finish",
            lambda: core.read_namespaced_pod("caller", namespace).status.phase in ("Succeeded", "Failed"),
            timeout_s=90,
        )
        seen = json.loads(kubectl("logs", "-n", namespace, "caller").stdout)
    finally:
        server.shutdown()
    assert seen["calls"] > 100, seen
    assert seen["failed"] == 0, seen


def test_cluster_processes_are_ours(cluster: Any) -> None:
    """Every control-plane and node process is recorded by pid, so teardown can stop exactly those."""
    from tests.cluster import procs
    from tests.cluster.cluster import PROCESSES

    assert {"kube-proxy", "coredns"} <= set(PROCESSES)
    for name in PROCESSES:
        pid = procs.recorded_pid(cluster.state, name)
        assert pid is not None, f"{name} has no pid file"
        assert procs.pid_alive(pid), f"{name} (pid {pid}) is not running"
        assert os.path.basename(os.readlink(f"/proc/{pid}/exe")).startswith(name.split("-")[0])


# -- Services, DNS and the API server from pods ----------------------------------------------------------

RUNTIMES = [pytest.param(None, id="runc"), pytest.param("gvisor", id="gvisor")]

# Run in a pod: resolve the API server's Service name, then call it over HTTPS as the pod's service account
# (CA and token from the mounted service-account volume). /version is public; a SelfSubjectReview answers
# with the user the token authenticated as, so it proves the token was sent and accepted.
_API_PROBE = """
import json, os, socket, ssl, urllib.request
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
host = "kubernetes.default.svc.cluster.local"
ctx = ssl.create_default_context(cafile=sa + "/ca.crt")
token = open(sa + "/token").read().strip()
def call(method, path, body=None):
    data = json.dumps(body).encode() if body else None
    headers = {"Authorization": "Bearer " + token, "Content-Type": "application/json"}
    request = urllib.request.Request("https://" + host + path, data=data, method=method, headers=headers)
    with urllib.request.urlopen(request, context=ctx, timeout=10) as response:
        return json.load(response)
review = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
print(json.dumps({
    "address": socket.getaddrinfo(host, 443, socket.AF_INET, socket.SOCK_STREAM)[0][4][0],
    "env": os.environ.get("KUBERNETES_SERVICE_HOST"),
    "version": call("GET", "/version")["gitVersion"],
    "user": call("POST", "/apis/authentication.k8s.io/v1/selfsubjectreviews", review)["status"]["userInfo"]["username"],
    "resolv_conf": open("/etc/resolv.conf").read(),
}))
"""

# Run in a pod: the IPv4 address a name resolves to, or None if it does not resolve.
_RESOLVE = """
import json, socket, sys
try:
    print(json.dumps(socket.getaddrinfo(sys.argv[1], 80, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]))
except socket.gaierror:
    print(json.dumps(None))
"""


def _service_account_ready(core: client.CoreV1Api, namespace: str) -> None:
    def exists() -> bool:
        try:
            core.read_namespaced_service_account("default", namespace)
        except ApiException:
            return False
        return True

    _wait(f"service account {namespace}/default", exists, timeout_s=30)


def _json_exec(kubectl: Kubectl, namespace: str, pod: str, script: str, *args: str) -> Any:
    return json.loads(_exec(kubectl, namespace, pod, "python3", "-c", script, *args))


@pytest.mark.parametrize("runtime", RUNTIMES)
def test_pod_reaches_the_api_server_by_service_name_with_its_token(
    api_client: Any, smoke_image: str, namespace: str, kubectl: Kubectl, runtime: str | None
) -> None:
    core = client.CoreV1Api(api_client)
    _service_account_ready(core, namespace)
    _running_pod(core, namespace, _pod("api-client", smoke_image, runtime_class=runtime))
    seen = _json_exec(kubectl, namespace, "api-client", _API_PROBE)
    assert seen["address"] == seen["env"] == "10.96.0.1"
    assert seen["version"] == "v1.34.12"
    assert seen["user"] == f"system:serviceaccount:{namespace}:default"
    resolv_conf = seen["resolv_conf"].split("\n")
    assert "nameserver 10.96.0.10" in resolv_conf, resolv_conf
    assert f"search {namespace}.svc.cluster.local svc.cluster.local cluster.local" in resolv_conf, resolv_conf
    # The Service's endpoint is the API server on the node IP, not a loopback address.
    slices = client.DiscoveryV1Api(api_client).list_namespaced_endpoint_slice(
        "default", label_selector="kubernetes.io/service-name=kubernetes"
    )
    assert [a for s in slices.items for e in s.endpoints for a in e.addresses] == ["10.244.0.1"]


@pytest.mark.parametrize(
    ("server_runtime", "client_runtime"),
    [pytest.param(None, "gvisor", id="gvisor-to-runc"), pytest.param("gvisor", None, id="runc-to-gvisor")],
)
def test_pod_reaches_a_pod_through_a_cluster_ip_service_by_dns_name(
    api_client: Any,
    smoke_image: str,
    namespace: str,
    kubectl: Kubectl,
    server_runtime: str | None,
    client_runtime: str | None,
) -> None:
    core = client.CoreV1Api(api_client)
    _service_account_ready(core, namespace)
    service = core.create_namespaced_service(
        namespace,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web"},
            "spec": {"selector": {"app": "server"}, "ports": [{"port": 80, "targetPort": 8080}]},
        },
    )
    cluster_ip = service.spec.cluster_ip
    assert cluster_ip.startswith("10.96."), cluster_ip
    _running_pod(core, namespace, _pod("server", smoke_image, runtime_class=server_runtime))
    client_pod = _running_pod(core, namespace, _pod("client", smoke_image, runtime_class=client_runtime))

    fqdn = f"web.{namespace}.svc.cluster.local"
    for name in (fqdn, f"web.{namespace}.svc", "web"):  # the last two through the pod's search list
        assert _json_exec(kubectl, namespace, "client", _RESOLVE, name) == cluster_ip, name
    assert _json_exec(kubectl, namespace, "client", _RESOLVE, f"absent.{namespace}.svc.cluster.local") is None

    def fetch(pod: str, url: str) -> bool:
        result = kubectl("exec", "-n", namespace, pod, "--", "python3", "-c", _FETCH, url)
        return result.stdout.strip() == "200"

    # kube-proxy programs the Service once its endpoint is ready: retry briefly, then it must answer.
    _wait(f"client to reach http://{fqdn}/", lambda: fetch("client", f"http://{fqdn}/"), timeout_s=30)
    assert fetch("client", "http://web/")
    # The server sees the client's own pod IP: Service traffic between pods is not masqueraded, so the
    # reply is bridged straight back and must have passed conntrack to be un-NATed.
    log = kubectl("logs", "-n", namespace, "server").stdout
    from_client = [line for line in log.splitlines() if line.startswith(f"{client_pod.status.pod_ip} - - ")]
    assert any('"GET / HTTP/1.1" 200' in line for line in from_client), log
    # A pod reaching itself through its own Service (hairpin: kube-proxy masquerades that case).
    assert fetch("server", "http://web/"), "the server pod could not reach itself through its Service"
