"""Fixtures of the `apiserver` tier: a real etcd + kube-apiserver for the whole test session.

The API server is Kubernetes v1.34 built from the Go module proxy by `tests.cluster` (built here on
first use if `python -m tests.cluster build` has not run), on free loopback ports, with RBAC and
service-account keys. No controllers, scheduler or kubelet run in this tier: Deployments are stored but
never get pods; use the `cluster` tier for that. Every process is stopped by pid at the end.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.cluster.build import ensure_kubernetes
from tests.cluster.controlplane import ControlPlane, Ports
from tests.cluster.kube import apply_crds
from tests.cluster.paths import StateLayout


@pytest.fixture(scope="session")
def control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControlPlane]:
    """etcd + kube-apiserver, started once per session and stopped by pid afterwards."""
    ensure_kubernetes(("kube-apiserver",))
    plane = ControlPlane(
        state=StateLayout(root=tmp_path_factory.mktemp("apiserver")), ports=Ports.free(), with_controllers=False
    )
    plane.start()
    try:
        yield plane
    finally:
        plane.stop()


@pytest.fixture(scope="session")
def kubeconfig(control_plane: ControlPlane) -> Path:
    """Path of an admin (system:masters) kubeconfig for the session's API server."""
    return control_plane.kubeconfig


@pytest.fixture(scope="session")
def api_client(kubeconfig: Path) -> Iterator[object]:
    """A synchronous `kubernetes.client.ApiClient` for the session's API server (for test set-up)."""
    from kubernetes import config

    client = config.new_client_from_config(config_file=str(kubeconfig))
    try:
        yield client
    finally:
        client.close()


@pytest.fixture(scope="session")
def ember_crds(api_client: object) -> list[str]:
    """Ember's CRDs from `crds/*.yaml`, created (or replaced) and Established; returns their names."""
    return apply_crds(api_client)
