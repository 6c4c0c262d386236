"""`helm install` of charts/ember into a real kube-apiserver, and the operator running on the chart's RBAC.

A real helm (charts/build-helm.sh) installs the chart; the API server validates every object. Then
the operator runs with a token of the chart's operator ServiceAccount (TokenRequest API), so a
missing permission in the ClusterRole fails the Function reconcile here; likewise the Kubernetes
pod source runs on the activator ServiceAccount's token (claim, specialize, release). No kubelet runs in this
tier: the chart's Deployments get no pods; `helm test` and invocation are the cluster tier's.
"""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from kubernetes import client
from kubernetes_asyncio import client as aclient
from kubernetes_asyncio import config as aconfig
from tests.apiserver.operator_harness import (
    ROOT,
    Ember,
    OperatorProcess,
    condition,
    crds,
    ember,
    eventually,
    hello_function,
    ns,
    ready_function,
)
from tests.apiserver.test_pods_kubernetes import World, agents

from ember.pods.kubernetes import KubernetesPodSource
from ember.pods.payload import specialize_request

__all__ = ["agents", "crds", "ember", "ns"]
CHART = ROOT / "charts" / "ember"


@pytest.fixture(scope="module")
def helm() -> str:
    out = subprocess.run(
        ["bash", str(ROOT / "charts" / "build-helm.sh")], capture_output=True, text=True, timeout=1800, check=True
    )
    return out.stdout.strip().splitlines()[-1]


OPTIONS = ["--set", "runtimeClasses.kata.create=true", "--set", "operator.keepVersions=2"]


def _helm_env(kubeconfig: Path, home: Path) -> dict[str, str]:
    env = {"KUBECONFIG": str(kubeconfig), "HELM_CACHE_HOME": str(home), "PATH": "/usr/bin:/bin"}
    return env | {"HELM_CONFIG_HOME": str(home), "HELM_DATA_HOME": str(home)}


@pytest.fixture
def release(helm: str, kubeconfig: Path, crds: client.ApiClient, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """The chart installed as release `ember-<rand>` into its own namespace; uninstalled afterwards."""
    name = f"e{uuid.uuid4().hex[:6]}"
    namespace = f"ember-{name}"
    env = _helm_env(kubeconfig, tmp_path / "helm")
    install = subprocess.run(
        [helm, "install", name, str(CHART), "--namespace", namespace, "--create-namespace", *OPTIONS],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert install.returncode == 0, install.stdout + install.stderr
    try:
        yield name, namespace
    finally:
        subprocess.run([helm, "uninstall", name, "--namespace", namespace], capture_output=True, env=env, timeout=120)
        client.CoreV1Api(crds).delete_namespace(namespace)


def test_helm_install_creates_the_release_objects(release: tuple[str, str], crds: client.ApiClient) -> None:
    name, namespace = release
    apps = client.AppsV1Api(crds)
    deployments = {d.metadata.name for d in apps.list_namespaced_deployment(namespace).items}
    assert deployments == {f"{name}-ember-operator", f"{name}-ember-activator", f"{name}-ember-redis"}
    service = client.CoreV1Api(crds).read_namespaced_service(f"{name}-ember-activator", namespace)
    assert service.spec.ports[0].port == 8080
    kata = client.NodeV1Api(crds).read_runtime_class("kata")
    assert kata.handler == "kata"
    ext = client.ApiextensionsV1Api(crds)
    for path in sorted((CHART / "crds").glob("*.yaml")):
        shipped = yaml.safe_load(path.read_text())
        stored = ext.read_custom_resource_definition(shipped["metadata"]["name"])
        assert stored.spec.group == "ember.run"


def test_helm_upgrade_keeps_the_redis_password(
    release: tuple[str, str], crds: client.ApiClient, helm: str, kubeconfig: Path, tmp_path: Path
) -> None:
    """The chart's Redis password is random once: an upgrade that made a new one would lock the
    activators out of the Redis still running with the old one."""
    name, namespace = release
    core = client.CoreV1Api(crds)
    before = core.read_namespaced_secret(f"{name}-ember-redis", namespace).data
    upgrade = subprocess.run(
        [helm, "upgrade", name, str(CHART), "--namespace", namespace, *OPTIONS],
        capture_output=True,
        text=True,
        env=_helm_env(kubeconfig, tmp_path / "helm"),
        timeout=120,
    )
    assert upgrade.returncode == 0, upgrade.stdout + upgrade.stderr
    after = core.read_namespaced_secret(f"{name}-ember-redis", namespace).data
    assert after == before
    assert set(after) == {"password", "url"}


def _token_kubeconfig(api: client.ApiClient, kubeconfig: Path, namespace: str, account: str, out: Path) -> Path:
    request = client.CoreV1Api(api).create_namespaced_service_account_token(
        account, namespace, {"spec": {"expirationSeconds": 3600}}
    )
    admin = yaml.safe_load(kubeconfig.read_text())
    cluster = admin["clusters"][0]["cluster"]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": cluster}],
        "users": [{"name": account, "user": {"token": request.status.token}}],
        "contexts": [{"name": "c", "context": {"cluster": "c", "user": account}}],
        "current-context": "c",
    }
    out.write_text(yaml.safe_dump(config))
    return out


def test_operator_works_with_exactly_the_charts_rbac(
    release: tuple[str, str], crds: client.ApiClient, kubeconfig: Path, ember: Ember, tmp_path: Path
) -> None:
    name, namespace = release
    token_config = _token_kubeconfig(
        crds, kubeconfig, namespace, f"{name}-ember-operator", tmp_path / "operator.kubeconfig"
    )
    operator = OperatorProcess(token_config, ember.ns, tmp_path / "operator.log")
    operator.start()
    try:
        ember.create("functions", hello_function())
        ember.serve("hello", 1)
        eventually(lambda: ready_function(ember, "hello"), what="hello Ready under the chart's RBAC")
        ember.patch("functions", "hello", {"spec": {"code": {"inline": "def handler(e, c):\n    return 2\n"}}})
        ember.patch("functions", "hello", {"spec": {"code": {"inline": "def handler(e, c):\n    return 3\n"}}})
        eventually(lambda: 3 in ember.versions("hello"), what="Version 3")
        ember.serve("hello", 3)  # Version 1, the loaded one, stays until a newer one is loaded
        eventually(lambda: set(ember.versions("hello")) == {2, 3}, what="Versions created and collected")
        assert len(ember.pools()) == 1
        fn = ember.get("functions", "hello")
        assert condition(fn, "EgressEnforced")["status"] == "True"
        assert any(e.reason == "VersionCreated" for e in ember.events("hello")), "events need RBAC too"
        assert "Forbidden" not in operator.log.read_text()
    finally:
        operator.stop()
        print(operator.log_tail())


@pytest.mark.parametrize(
    ("verb", "group", "resource"),
    [
        pytest.param("get", "", "secrets", id="no-secrets"),
        pytest.param("create", "", "pods", id="no-pod-create"),
        pytest.param("delete", "ember.run", "functions", id="no-function-delete"),
        pytest.param("create", "rbac.authorization.k8s.io", "roles", id="no-rbac"),
    ],
)
def test_operator_rbac_is_least_privilege(
    release: tuple[str, str], crds: client.ApiClient, verb: str, group: str, resource: str
) -> None:
    name, namespace = release
    review = client.AuthorizationV1Api(crds).create_subject_access_review(
        {
            "spec": {
                "user": f"system:serviceaccount:{namespace}:{name}-ember-operator",
                "resourceAttributes": {"verb": verb, "group": group, "resource": resource, "namespace": "default"},
            }
        }
    )
    assert review.status.allowed is False


def test_helm_test_hooks_are_accepted_by_the_api_server(helm: str, ember: Ember) -> None:
    only = ["--show-only", "templates/tests/hello-function.yaml", "--set", f"helmTest.namespace={ember.ns}"]
    out = subprocess.run(
        [helm, "template", "t", str(CHART), "--kube-version", "1.34.0", "--namespace", ember.ns, *only],
        capture_output=True,
        text=True,
        check=True,
    )
    function = yaml.safe_load(out.stdout)
    stored = ember.custom.create_namespaced_custom_object(
        "ember.run", "v1alpha1", ember.ns, "functions", function, dry_run="All"
    )
    assert stored["metadata"]["name"] == "t-ember-hello-test"


async def test_activator_pod_source_works_with_exactly_the_charts_rbac(
    release: tuple[str, str], crds: client.ApiClient, kubeconfig: Path, ember: Ember, agents: int, tmp_path: Path
) -> None:
    name, namespace = release
    token_config = _token_kubeconfig(
        crds, kubeconfig, namespace, f"{name}-ember-activator", tmp_path / "activator.kubeconfig"
    )
    world = World(ember)
    world.add_generic_pods()
    configuration = aclient.Configuration()
    await aconfig.load_kube_config(config_file=str(token_config), client_configuration=configuration)
    async with aclient.ApiClient(configuration) as api:
        source = KubernetesPodSource(api, namespace=ember.ns, holder="activator-rbac", agent_port=agents)
        try:
            await source.start()
            handle = await source.claim(world.pool)
            handle = await source.specialize(handle, specialize_request(world.key, world.fn.spec, world.hash))
            assert handle.version == world.key
            # The relabel (labels, owner reference) runs in the background; the chart must allow it too.
            await asyncio.wait_for(asyncio.gather(*source._background), timeout=10)
            pod = ember.core.read_namespaced_pod(handle.id, ember.ns)
            assert pod.metadata.labels["ember.run/state"] == "specialized"
            assert pod.metadata.owner_references[0].kind == "Version"
            await source.release(handle)
            await source.renew_lease()  # publishes the claim as pool demand, under the chart's RBAC
        finally:
            await source.close()
    assert handle.id not in {p.metadata.name for p in ember.core.list_namespaced_pod(ember.ns).items}
