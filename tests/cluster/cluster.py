"""One single-node cluster: bring it up, find it again, tear it down.

`up()` is idempotent: if the state directory already holds a healthy cluster (started by
`python -m tests.cluster up` or an earlier session) it is reused; otherwise whatever is left there is
torn down and a fresh cluster is started. `cluster.json` in the state directory records the ports, so
any process can find and stop the cluster by its recorded pids.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import images, procs
from .build import ensure_gvisor, ensure_kube_router, ensure_kubernetes
from .controlplane import ControlPlane, Ports, free_port
from .node import NODE_IP, NODE_NAME, POD_CIDR, Node
from .paths import REPO_ROOT, StateLayout, cluster_state_dir
from .services import ServiceNetwork, ServicePorts

# Every long-running process of a cluster, by the name its pid file and log carry.
PROCESSES = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "containerd",
    "kubelet",
    "kube-proxy",
    "coredns",
    "kube-router",
)
RUNTIME_CLASS = {
    "apiVersion": "node.k8s.io/v1",
    "kind": "RuntimeClass",
    "metadata": {"name": "gvisor"},
    "handler": "runsc",
}


@dataclass(frozen=True, kw_only=True)
class ClusterPorts:
    control_plane: Ports
    kubelet: int
    kubelet_healthz: int
    kube_router_healthz: int
    services: ServicePorts

    @classmethod
    def free(cls) -> ClusterPorts:
        return cls(
            control_plane=Ports.free(),
            kubelet=free_port(),
            kubelet_healthz=free_port(),
            kube_router_healthz=free_port(),
            services=ServicePorts.free(),
        )

    @classmethod
    def load(cls, path: Path) -> ClusterPorts:
        raw = json.loads(path.read_text())
        return cls(
            control_plane=Ports(**raw["control_plane"]),
            kubelet=raw["kubelet"],
            kubelet_healthz=raw["kubelet_healthz"],
            # A record from before kube-proxy and CoreDNS, or kube-router: such a cluster is never healthy (a
            # process is missing), so any ports do.
            kube_router_healthz=raw.get("kube_router_healthz") or free_port(),
            services=ServicePorts(**raw["services"]) if "services" in raw else ServicePorts.free(),
        )


class Cluster:
    """The cluster kept in `root` (default: the cluster state directory)."""

    def __init__(self, root: Path | None = None) -> None:
        self.state = StateLayout(root=root or cluster_state_dir())
        self._record = self.state.root / "cluster.json"
        self._wire(ClusterPorts.load(self._record) if self._record.exists() else ClusterPorts.free())

    def _wire(self, ports: ClusterPorts) -> None:
        self.ports = ports
        self.control_plane = ControlPlane(
            state=self.state, ports=ports.control_plane, with_controllers=True, address=NODE_IP
        )
        self.services = ServiceNetwork(
            state=self.state,
            control_plane=self.control_plane,
            ports=ports.services,
            node_ip=NODE_IP,
            node_name=NODE_NAME,
            pod_cidr=POD_CIDR,
        )
        self.node = Node(
            state=self.state,
            control_plane=self.control_plane,
            kubelet_port=ports.kubelet,
            kubelet_healthz_port=ports.kubelet_healthz,
            kube_router_healthz_port=ports.kube_router_healthz,
        )

    @property
    def kubeconfig(self) -> Path:
        return self.state.admin_kubeconfig

    # -- API helpers --------------------------------------------------------------------------------------
    def api_client(self) -> Any:
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig))

    def _node_ready(self, api: Any) -> bool:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        try:
            node = client.CoreV1Api(api).read_node(NODE_NAME)
        except (ApiException, OSError):
            return False
        return any(c.type == "Ready" and c.status == "True" for c in node.status.conditions or [])

    def _default_service_account(self, api: Any) -> bool:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        try:
            client.CoreV1Api(api).read_namespaced_service_account("default", "default")
        except ApiException:
            return False
        return True

    def _ensure_runtime_class(self, api: Any) -> None:
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        try:
            client.NodeV1Api(api).create_runtime_class(RUNTIME_CLASS)
        except ApiException as err:
            if err.status != 409:
                raise

    # -- lifecycle ----------------------------------------------------------------------------------------
    def healthy(self) -> bool:
        if not self._record.exists() or not all(procs.running(self.state, n) for n in PROCESSES):
            return False
        if not self.kubeconfig.exists():
            return False
        self.control_plane._prepare_pki()
        if not self.control_plane.apiserver_ready() or not self.services.healthy():
            return False
        if not self.node.network_policy_enforced():
            return False
        api = self.api_client()
        try:
            return self._node_ready(api)
        finally:
            api.close()

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialize up/down/lease changes between processes sharing this state directory."""
        self.state.root.mkdir(parents=True, exist_ok=True)
        with (self.state.root.parent / f".{self.state.root.name}.lock").open("w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield

    def _leases(self) -> Path:
        return self.state.root.parent / f".{self.state.root.name}.users"

    def acquire(self) -> None:
        """Use the cluster from this process: start it unless healthy, and record a lease by pid."""
        with self.locked():
            self.up()
            self._leases().mkdir(exist_ok=True)
            (self._leases() / str(os.getpid())).touch()

    def release(self) -> None:
        """Drop this process's lease; the last user stops the cluster unless `python -m tests.cluster up` owns it."""
        with self.locked():
            (self._leases() / str(os.getpid())).unlink(missing_ok=True)
            others = [p for p in self._leases().glob("*") if p.name.isdigit() and procs.pid_alive(int(p.name))]
            if not others and not (self.state.root / "kept-by-cli").exists():
                self.down()

    def up(self) -> bool:
        """Start the cluster unless a healthy one is running; return True if this call started it."""
        if self.healthy():
            return False
        self.down()
        (self.state.root / "kept-by-cli").unlink(missing_ok=True)
        self._wire(ClusterPorts.free())  # recorded ports may have been taken since
        ensure_kubernetes()
        ensure_gvisor()
        ensure_kube_router()
        started = time.monotonic()
        # Every `up` starts from an empty etcd and node state; only certificates and caches are kept.
        for stale in (self.state.etcd_data, self.node.kubelet_dir, self.node.containerd_state, self.node.runsc_root):
            shutil.rmtree(stale, ignore_errors=True)
        self.state.root.mkdir(parents=True, exist_ok=True)
        self._record.write_text(json.dumps(asdict(self.ports), indent=2))
        try:
            self.node.ensure_bridge()  # the API server listens on the node IP, the bridge's address
            self.control_plane.start()
            self.services.start()
            self.node.start()
            api = self.api_client()
            try:
                procs.wait_for("node ember-node Ready", lambda: self._node_ready(api), timeout_s=120, interval_s=0.5)
                self.node.start_network_policy()  # reads the Node, so once it is registered
                procs.wait_for("the default ServiceAccount", lambda: self._default_service_account(api), timeout_s=60)
                self._ensure_runtime_class(api)
            finally:
                api.close()
            self.services.wait_ready()
        except BaseException:
            self.down()
            raise
        print(f"tests.cluster: up in {time.monotonic() - started:.1f} s; KUBECONFIG={self.kubeconfig}", flush=True)
        return True

    def _delete_all_pods(self) -> None:
        """Delete every pod through the API so the kubelet stops sandboxes and releases their networks."""
        if not (procs.running(self.state, "kube-apiserver") and procs.running(self.state, "kubelet")):
            return
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        with contextlib.suppress(Exception):
            self.control_plane._prepare_pki()
        if not self.kubeconfig.exists() or not self.control_plane.apiserver_ready():
            return
        api = self.api_client()
        try:
            core = client.CoreV1Api(api)
            for pod in core.list_pod_for_all_namespaces().items:
                with contextlib.suppress(ApiException):
                    core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, grace_period_seconds=1)
            with contextlib.suppress(procs.ClusterError):
                procs.wait_for(
                    "all pods to be gone", lambda: not core.list_pod_for_all_namespaces().items, timeout_s=60
                )
        finally:
            api.close()

    def down(self) -> None:
        """Stop everything this cluster started (by recorded pid) and release its mounts and network."""
        # Controllers first, so nothing recreates the pods being deleted.
        procs.stop(self.state, "kube-controller-manager")
        procs.stop(self.state, "kube-scheduler")
        self._delete_all_pods()
        self.services.stop()
        self.node.stop()
        self.control_plane.stop()

    def status(self) -> dict[str, object]:
        report: dict[str, object] = {
            n: procs.recorded_pid(self.state, n) if procs.running(self.state, n) else None for n in PROCESSES
        }
        report["healthy"] = self.healthy()
        report["kubeconfig"] = str(self.kubeconfig)
        return report


def runtime_image_dirs() -> list[Path]:
    """Ember's runtime images: every `runtime-images/<name>/Dockerfile`."""
    return sorted(p.parent for p in (REPO_ROOT / "runtime-images").glob("*/Dockerfile"))


def runtime_image_tag(directory: Path) -> str:
    return f"localhost/ember-runtime-{directory.name}:dev"


def build_runtime_images() -> list[images.BuiltImage]:
    return [
        images.build_image(d, runtime_image_tag(d), context=REPO_ROOT / "runtime-images", dockerfile=d / "Dockerfile")
        for d in runtime_image_dirs()
    ]
