"""Services and DNS for the test cluster: kube-proxy and CoreDNS as host processes next to the kubelet.

kube-proxy is built from the same Kubernetes release as the other binaries and programs iptables for every
Service. Pods route the service CIDR through the bridge (`templates/cni.conflist`), the host DNATs it to an
endpoint, and replies bridged between two pods pass iptables too (`bridge-nf-call-iptables`, set by
`Node.ensure_bridge`), so conntrack reverses the NAT. The `kubernetes` Service's endpoint is the API
server on the node IP.

DNS is CoreDNS (`build.ensure_coredns`) on the node IP, port 53, serving `cluster.local` from the API server
and nothing else. It is published the usual way, as Service `kube-system/kube-dns` with ClusterIP
`10.96.0.10`, here without a selector and with an EndpointSlice naming the node IP; the kubelet writes that
address into every pod's resolv.conf.

`stop()` stops both by pid and removes kube-proxy's iptables rules (`kube-proxy --cleanup`), so nothing
rewrites traffic to the service CIDR once the cluster is down.
"""

from __future__ import annotations

import string
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from . import pki, procs
from .build import ensure_coredns
from .controlplane import CLUSTER_DOMAIN, KUBERNETES_SERVICE_IP, ControlPlane, free_port, kube_binary
from .paths import TEMPLATES_DIR, StateLayout, kube_bin_dir

DNS_SERVICE_IP = "10.96.0.10"
KUBE_PROXY = pki.ClientIdentity(name="kube-proxy", user="system:kube-proxy")  # bound to system:node-proxier
COREDNS = pki.ClientIdentity(name="coredns", user="system:coredns")
NAMES = ("kube-proxy", "coredns")

COREDNS_RBAC: list[dict[str, Any]] = [
    {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": "system:coredns"},
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["endpoints", "services", "pods", "namespaces"],
                "verbs": ["list", "watch"],
            },
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["list", "watch"]},
        ],
    },
    {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": "system:coredns"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "system:coredns"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": COREDNS.user}],
    },
]


def _render(template: str, **values: object) -> str:
    return string.Template((TEMPLATES_DIR / template).read_text()).substitute({k: str(v) for k, v in values.items()})


def dns_service(node_ip: str, node_name: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """`kube-system/kube-dns` (no selector) and the EndpointSlice that points it at CoreDNS on the node."""
    labels = {"k8s-app": "kube-dns", "kubernetes.io/name": "CoreDNS"}
    ports = [("dns", "UDP"), ("dns-tcp", "TCP")]
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "kube-dns", "namespace": "kube-system", "labels": labels},
        "spec": {
            "clusterIP": DNS_SERVICE_IP,
            "ports": [{"name": n, "port": 53, "protocol": p, "targetPort": 53} for n, p in ports],
        },
    }
    slice_ = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "kube-dns-node",
            "namespace": "kube-system",
            "labels": labels
            | {
                "kubernetes.io/service-name": "kube-dns",
                # Not the EndpointSlice controller's name, so that controller leaves this slice alone.
                "endpointslice.kubernetes.io/managed-by": "tests.cluster",
            },
        },
        "addressType": "IPv4",
        "endpoints": [{"addresses": [node_ip], "conditions": {"ready": True}, "nodeName": node_name}],
        "ports": [{"name": n, "port": 53, "protocol": p} for n, p in ports],
    }
    return service, slice_


@dataclass(frozen=True, kw_only=True)
class ServicePorts:
    kube_proxy_healthz: int
    kube_proxy_metrics: int
    coredns_health: int
    coredns_ready: int

    @classmethod
    def free(cls) -> ServicePorts:
        return cls(
            kube_proxy_healthz=free_port(),
            kube_proxy_metrics=free_port(),
            coredns_health=free_port(),
            coredns_ready=free_port(),
        )


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


@dataclass
class ServiceNetwork:
    """kube-proxy and CoreDNS for one cluster. `start()` after the API server, `wait_ready()` later."""

    state: StateLayout
    control_plane: ControlPlane
    ports: ServicePorts
    node_ip: str
    node_name: str
    pod_cidr: str

    # -- API objects --------------------------------------------------------------------------------------
    def _create_objects(self) -> None:
        from kubernetes import client, config
        from kubernetes.client.rest import ApiException

        def create(call: Any, *args: Any) -> None:
            try:
                call(*args)
            except ApiException as err:
                if err.status != 409:
                    raise procs.ClusterError(f"creating {args[-1]['metadata']['name']} failed: {err.body}") from err

        api = config.new_client_from_config(config_file=str(self.control_plane.kubeconfig))
        try:
            core, rbac = client.CoreV1Api(api), client.RbacAuthorizationV1Api(api)
            role, binding = COREDNS_RBAC
            create(rbac.create_cluster_role, role)
            create(rbac.create_cluster_role_binding, binding)
            # The API server creates kube-system itself, but perhaps not yet.
            create(core.create_namespace, {"metadata": {"name": "kube-system"}})
            service, slice_ = dns_service(self.node_ip, self.node_name)
            create(core.create_namespaced_service, "kube-system", service)
            create(client.DiscoveryV1Api(api).create_namespaced_endpoint_slice, "kube-system", slice_)
        finally:
            api.close()

    # -- processes ----------------------------------------------------------------------------------------
    def _write_configs(self) -> None:
        root = self.state.root
        for identity in (KUBE_PROXY, COREDNS):
            self.control_plane.write_client_kubeconfig(identity, root / f"{identity.name}.kubeconfig")
        (root / "kube-proxy.yaml").write_text(
            _render(
                "kube-proxy.yaml",
                kubeconfig=root / f"{KUBE_PROXY.name}.kubeconfig",
                node_name=self.node_name,
                node_ip=self.node_ip,
                healthz_port=self.ports.kube_proxy_healthz,
                metrics_port=self.ports.kube_proxy_metrics,
                pod_cidr=self.pod_cidr,
            )
        )
        (root / "Corefile").write_text(
            _render(
                "Corefile",
                address=self.node_ip,
                health_port=self.ports.coredns_health,
                ready_port=self.ports.coredns_ready,
                cluster_domain=CLUSTER_DOMAIN,
                kubeconfig=root / f"{COREDNS.name}.kubeconfig",
            )
        )

    def start(self) -> None:
        """Create the DNS Service and CoreDNS's RBAC, then start kube-proxy and CoreDNS (without waiting)."""
        coredns = ensure_coredns()
        self._write_configs()
        self._create_objects()
        procs.start(self.state, "coredns", [coredns, "-conf", self.state.root / "Corefile"])
        procs.start(
            self.state,
            "kube-proxy",
            [kube_binary("kube-proxy"), f"--config={self.state.root / 'kube-proxy.yaml'}", "--v=1"],
        )

    def _rules_programmed(self) -> bool:
        """kube-proxy has written the `kubernetes` and `kube-dns` Services into iptables."""
        try:
            nat = procs.run(["iptables-save", "-t", "nat"], timeout_s=10)
        except (procs.ClusterError, subprocess.TimeoutExpired):
            return False
        return all(
            f'-d {ip}/32 -p {proto} -m comment --comment "{name} cluster IP"' in nat
            for ip, proto, name in (
                (KUBERNETES_SERVICE_IP, "tcp", "default/kubernetes:https"),
                (DNS_SERVICE_IP, "udp", "kube-system/kube-dns:dns"),
            )
        )

    def _proc(self, name: str) -> procs.Proc:
        pid = procs.recorded_pid(self.state, name) or -1
        return procs.Proc(name=name, pid=pid, log=self.state.logs / f"{name}.log")

    def wait_ready(self) -> None:
        procs.wait_for(
            "CoreDNS /ready",
            lambda: _http_ok(f"http://127.0.0.1:{self.ports.coredns_ready}/ready"),
            timeout_s=30,
            proc=self._proc("coredns"),
        )
        kube_proxy = self._proc("kube-proxy")
        procs.wait_for(
            "kube-proxy /healthz",
            lambda: _http_ok(f"http://127.0.0.1:{self.ports.kube_proxy_healthz}/healthz"),
            timeout_s=30,
            proc=kube_proxy,
        )
        procs.wait_for("kube-proxy's iptables rules", self._rules_programmed, timeout_s=30, proc=kube_proxy)

    def healthy(self) -> bool:
        return (
            all(procs.running(self.state, n) for n in NAMES)
            and _http_ok(f"http://127.0.0.1:{self.ports.coredns_ready}/ready")
            and _http_ok(f"http://127.0.0.1:{self.ports.kube_proxy_healthz}/healthz")
        )

    def stop(self) -> None:
        """Stop both by pid, then remove every rule kube-proxy wrote."""
        procs.stop(self.state, "kube-proxy")
        procs.stop(self.state, "coredns")
        binary = kube_bin_dir() / "kube-proxy"
        if not binary.exists():
            return
        # --cleanup also tries the ipvs and nftables modes and reports their absence; the iptables
        # cleanup is what matters, so its exit status is ignored and the log keeps the details.
        self.state.logs.mkdir(parents=True, exist_ok=True)
        with (self.state.logs / "kube-proxy-cleanup.log").open("a") as log:
            subprocess.run(
                [str(binary), "--cleanup", "--v=0"], stdout=log, stderr=subprocess.STDOUT, check=False, timeout=60
            )
