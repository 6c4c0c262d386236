"""Pinned versions and the on-disk layout of caches and cluster state."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

KUBERNETES_VERSION = "1.34.12"
# gVisor's `go` branch as Go pseudo-versions (the proxy serves only exact versions of it). runsc is current
# (systrap platform); the containerd shim comes from the newest commit still on containerd 1.x's shim
# library, because later shims answer `start` with JSON bootstrap parameters containerd 1.6 cannot read.
GVISOR_VERSION = "v0.0.0-20260905035102-160fafc42237"
GVISOR_SHIM_VERSION = "v0.0.0-20240916094835-a174eb65023f"
# CoreDNS, the cluster's DNS (a release of `github.com/coredns/coredns`, built with only the plugins it uses).
COREDNS_VERSION = "v1.14.7"
# kube-router, for its network policy controller only (see `node`): the newest release the Go module proxy
# serves. Of the v2 tags it serves v2.1.0 and v2.10.0 only (v2.11.1 lists, but its .mod and .zip are
# refused); v2.1.0 has a `--cleanup-config` that cleans nothing and fixed flaws (IPv6 policy, ipsets).
# What v2.11 adds over v2.10.0 in the policy controller is in its nftables mode, which is not used here.
KUBE_ROUTER_VERSION = "v2.10.0"
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


def gvisor_shim_dir() -> Path:
    """The shim's own directory: containerd finds `containerd-shim-runsc-v1` on its PATH."""
    return cache_root() / f"gvisor-shim-{GVISOR_SHIM_VERSION}-eperm-oom"


def coredns_bin_dir(plugin_set: str) -> Path:
    """Where the CoreDNS build with the plugin set named `plugin_set` (a digest of its plugin list) is kept."""
    return cache_root() / f"coredns-{COREDNS_VERSION}-{plugin_set}"


def kube_router_bin_dir() -> Path:
    return cache_root() / f"kube-router-{KUBE_ROUTER_VERSION}"


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
