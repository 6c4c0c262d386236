"""Fixtures of the `cluster` tier: one real single-node Kubernetes for the whole session.

The session reuses a healthy cluster started by `python -m tests.cluster up` (and leaves it running);
otherwise it builds what is missing, starts one, and tears it down at the end, stopping every process
it started by pid. Images are built with buildah and imported into containerd; pods must use
`imagePullPolicy: Never`.
"""

from __future__ import annotations

import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.apiserver import operator_harness as harness
from tests.cluster import images
from tests.cluster.build import ensure_kubernetes
from tests.cluster.cluster import Cluster, build_runtime_images
from tests.cluster.paths import PACKAGE_DIR
from tests.cluster.scenarios import ActivatorProcess

SMOKE_IMAGE = "localhost/ember-smoke:dev"


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """The session's cluster: reused if one is up; the last session using it stops it (not one kept by `up`)."""
    running = Cluster()
    running.acquire()
    try:
        yield running
    finally:
        running.release()


@pytest.fixture(scope="session")
def kubeconfig(cluster: Cluster) -> Path:
    """Path of the cluster's admin (system:masters) kubeconfig."""
    return cluster.kubeconfig


@pytest.fixture(scope="session")
def api_client(cluster: Cluster) -> Iterator[Any]:
    """A synchronous `kubernetes.client.ApiClient` for the cluster."""
    client = cluster.api_client()
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def smoke_image(cluster: Cluster) -> str:
    """The smoke tests' workload image (Debian + Python), imported into the node's containerd."""
    built = images.build_image(PACKAGE_DIR / "images" / "smoke", SMOKE_IMAGE)
    cluster.node.import_images([built])
    return SMOKE_IMAGE


@pytest.fixture(scope="session")
def runtime_images(cluster: Cluster) -> list[str]:
    """Ember's runtime images (`runtime-images/*/Dockerfile`), built and imported into the node."""
    built = build_runtime_images()
    cluster.node.import_images(built)
    return [image.tag for image in built]


@pytest.fixture
def namespace(api_client: Any) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (its pods with it)."""
    from kubernetes import client

    core = client.CoreV1Api(api_client)
    name = f"smoke-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    try:
        yield name
    finally:
        core.delete_namespace(name, grace_period_seconds=0)


class Kubectl:
    """`kubectl` (built with the cluster) against the session's cluster, for exec and logs."""

    def __init__(self, kubeconfig: Path) -> None:
        self.binary = ensure_kubernetes(("kubectl",))["kubectl"]
        self.kubeconfig = kubeconfig

    def __call__(self, *args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.binary), f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )


@pytest.fixture(scope="session")
def kubectl(kubeconfig: Path) -> Kubectl:
    return Kubectl(kubeconfig)


@pytest.fixture
def ember_ns(api_client: Any) -> Iterator[harness.Ember]:
    """Ember's CRDs applied and a namespace of this test's own, deleted afterwards."""
    harness.apply_crds(api_client)
    with harness.namespace(api_client) as ns:
        yield harness.Ember(api_client, ns)


@pytest.fixture
def pool_size() -> int:
    """Warm generic pods per pool of the `operator` fixture; a test module overrides it when it needs more."""
    return 2


@pytest.fixture
def operator(
    kubeconfig: Path, ember_ns: harness.Ember, runtime_images: list[str], tmp_path: Path, pool_size: int
) -> Iterator[harness.OperatorProcess]:
    """The operator as a host process watching the test's namespace, with the cluster's local images."""
    assert "localhost/ember-runtime-python3.12:dev" in runtime_images
    proc = harness.OperatorProcess(
        kubeconfig,
        ember_ns.ns,
        tmp_path / "operator.log",
        EMBER_IMAGE_REGISTRY="localhost",
        EMBER_IMAGE_TAG="dev",
        EMBER_IMAGE_PULL_POLICY="Never",
        EMBER_POOL_SIZE=str(pool_size),
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
        print(f"--- operator log ---\n{proc.log_tail()}")


@pytest.fixture
def activator_env() -> dict[str, str]:
    """Extra settings of the `activator` fixture's process; a test module overrides it when it needs some."""
    return {}


@pytest.fixture
def activator(
    kubeconfig: Path,
    ember_ns: harness.Ember,
    operator: harness.OperatorProcess,
    tmp_path: Path,
    activator_env: dict[str, str],
) -> Iterator[ActivatorProcess]:
    """The activator as a host process in Kubernetes mode, over the test's namespace (beside `operator`)."""
    proc = ActivatorProcess(kubeconfig, ember_ns.ns, tmp_path / "activator.log", env=activator_env)
    try:
        proc.start()
        yield proc
    finally:
        code = proc.stop()  # None when the test stopped it already
        print(f"--- activator log (exit {code}) ---\n{proc.log_tail()}")
