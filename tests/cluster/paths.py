"""Pinned versions and the on-disk layout of caches and cluster state."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

KUBERNETES_VERSION = "1.34.12"
# gVisor's `go` branch as a Go pseudo-version (the proxy serves only exact versions of it).
GVISOR_VERSION = "v0.0.0-20260905035102-160fafc42237"
DEBIAN_SUITE = "bookworm"
PAUSE_IMAGE = "registry.k8s.io/pause:3.10.1"
BASE_IMAGE = "localhost/ember-base:bookworm"

PACKAGE_DIR = Path(__file__).resolve().parent
REPO_ROOT = PACKAGE_DIR.parent.parent
TEMPLATES_DIR = PACKAGE_DIR / "templates"


def cache_root() -> Path:
    """Where built binaries, root filesystems and images are kept between runs (`EMBER_CACHE_DIR`)."""
    return Path(os.environ.get("EMBER_CACHE_DIR", Path.home() / ".cache" / "ember"))


def kube_bin_dir() -> Path:
    return cache_root() / f"k8s-v{KUBERNETES_VERSION}"


def gvisor_bin_dir() -> Path:
    return cache_root() / f"gvisor-{GVISOR_VERSION}"


def build_dir() -> Path:
    return cache_root() / "build"


@dataclass(frozen=True, kw_only=True)
class StateLayout:
    """The directories of one running cluster (or one bare API server), all under `root`."""

    root: Path

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def pids(self) -> Path:
        return self.root / "pids"

    @property
    def etcd_data(self) -> Path:
        return self.root / "etcd"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.root / "admin.kubeconfig"


def cluster_state_dir() -> Path:
    """The state of the cluster `python -m tests.cluster up` keeps running (`EMBER_CLUSTER_DIR`)."""
    return Path(os.environ.get("EMBER_CLUSTER_DIR", "/var/tmp/ember-cluster"))
