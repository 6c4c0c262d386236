"""Cluster tier: `helm install` of charts/ember with the operator image built from Dockerfile.operator.

The image is built offline (a wheelhouse made on this machine), the chart installs, and the
operator pod starts on the chart's ServiceAccount with restricted pod security (uid 65532,
read-only root) and stays alive (kopf's liveness endpoint).

Not covered here, and why: this test cluster's API server listens on 127.0.0.1 only and pods have
no route beyond the pod network (no kube-proxy, no DNS), so a pod cannot reach the API server:
the in-cluster operator cannot reconcile, and the activator Service does not route. The same
operator code reconciling on this cluster (as a host process) is test_operator_pods.py. The
activator has no Kubernetes entry point yet, so `helm test` (which invokes through it) is not run.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client

from tests.apiserver.operator_harness import eventually
from tests.cluster import images
from tests.cluster.cluster import Cluster

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "ember"
OPERATOR_IMAGE = "localhost/ember-operator:dev"


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
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--wheel-dir",
            str(dest / "wheels"),
            "-r",
            str(dest / "requirements.txt"),
        ],
        check=True,
        timeout=900,
    )
    return dest


@pytest.fixture(scope="module")
def operator_image(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> str:
    context = image_context(tmp_path_factory.mktemp("image-context"))
    built = images.build_image(context, OPERATOR_IMAGE, dockerfile=context / "Dockerfile.operator", context=context)
    cluster.node.import_images([built])
    return OPERATOR_IMAGE


@pytest.fixture(scope="module")
def helm() -> str:
    out = subprocess.run(
        ["bash", str(REPO / "charts" / "build-helm.sh")], capture_output=True, text=True, timeout=1800, check=True
    )
    return out.stdout.strip().splitlines()[-1]


@pytest.fixture
def release(
    helm: str, kubeconfig: Path, api_client: Any, operator_image: str, runtime_images: list[str], tmp_path: Path
) -> Iterator[str]:
    env = {"KUBECONFIG": str(kubeconfig), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    values = ["--set", "image.registry=localhost", "--set", "image.tag=dev", "--set", "image.pullPolicy=Never"]
    values += ["--set", "activator.replicas=1", "--set", "runtimes.poolSize=2"]
    out = subprocess.run(
        [helm, "install", "ember", str(CHART), "-n", "ember-system", "--create-namespace", *values],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    try:
        yield "ember-system"
    finally:
        subprocess.run([helm, "uninstall", "ember", "-n", "ember-system"], capture_output=True, env=env, timeout=300)
        client.CoreV1Api(api_client).delete_namespace("ember-system")
        eventually(
            lambda: (
                "ember-system" not in {n.metadata.name for n in client.CoreV1Api(api_client).list_namespace().items}
            ),
            timeout_s=120,
            what="ember-system deleted",
        )


def _available(apps: client.AppsV1Api, namespace: str, name: str) -> bool:
    status = apps.read_namespaced_deployment(name, namespace).status
    return bool(status.available_replicas)


def test_helm_install_runs_the_operator_image_with_restricted_security(
    release: str, api_client: Any, kubeconfig: Path
) -> None:
    apps = client.AppsV1Api(api_client)
    eventually(lambda: _available(apps, release, "ember-operator"), timeout_s=180, what="operator available")
    core = client.CoreV1Api(api_client)
    (pod,) = core.list_namespaced_pod(release, label_selector="app.kubernetes.io/name=ember-operator").items
    container = pod.spec.containers[0]
    assert container.image == OPERATOR_IMAGE
    assert pod.spec.service_account_name == "ember-operator"
    assert pod.spec.security_context.run_as_non_root is True
    assert container.security_context.read_only_root_filesystem is True
    assert container.security_context.capabilities.drop == ["ALL"]
    log = eventually(
        lambda: (
            (text := core.read_namespaced_pod_log(pod.metadata.name, release)) and "operator started" in text and text
        ),
        timeout_s=60,
        what="the operator's start-up log line",
    )
    assert "keep_versions=3" in log
    restarts = core.read_namespaced_pod(pod.metadata.name, release).status.container_statuses[0].restart_count
    assert restarts == 0
