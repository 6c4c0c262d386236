"""etcd, kube-apiserver, kube-controller-manager and kube-scheduler as local processes.

`ControlPlane` owns one state directory: certificates, kubeconfigs, etcd data, logs and pid files. The
same class serves the `apiserver` tier (etcd + API server only, on free ports, in a temporary directory)
and the `cluster` tier (everything, under the cluster state directory). Health is checked the way
kubeadm does: etcd's `/health`, then the API server's `/readyz`, then each controller's `/healthz`.

The API server serves on `address`: loopback for the `apiserver` tier; for the `cluster` tier the node IP
(the pod bridge's address), so pods reach it through the `kubernetes` Service, whose endpoints the API
server publishes as `address:port` (a loopback address is never published: pods cannot reach it).
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import socket
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from . import pki, procs
from .paths import StateLayout, kube_bin_dir

SERVICE_CIDR = "10.96.0.0/16"
KUBERNETES_SERVICE_IP = "10.96.0.1"
CLUSTER_DOMAIN = "cluster.local"
ADMIN = pki.ClientIdentity(name="admin", user="ember-admin", groups=("system:masters",))
CONTROLLER_MANAGER = pki.ClientIdentity(name="controller-manager", user="system:kube-controller-manager")
SCHEDULER = pki.ClientIdentity(name="scheduler", user="system:kube-scheduler")
APISERVER_KUBELET_CLIENT = pki.ClientIdentity(
    name="apiserver-kubelet-client", user="kube-apiserver-kubelet-client", groups=("system:masters",)
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass(frozen=True, kw_only=True)
class Ports:
    etcd_client: int
    etcd_peer: int
    apiserver: int
    controller_manager: int
    scheduler: int

    @classmethod
    def free(cls) -> Ports:
        return cls(
            etcd_client=free_port(),
            etcd_peer=free_port(),
            apiserver=free_port(),
            controller_manager=free_port(),
            scheduler=free_port(),
        )


def etcd_binary() -> Path:
    """The etcd the API server runs on: Debian's etcd-server (3.4), checked by the smoke tests."""
    found = shutil.which("etcd") or "/usr/bin/etcd"
    if not Path(found).exists():
        raise procs.ClusterError("etcd not found: install Debian's etcd-server (tests/cluster/install-deps.sh)")
    return Path(found)


def kube_binary(name: str) -> Path:
    path = kube_bin_dir() / name
    if not path.exists():
        raise procs.ClusterError(f"{path} is missing: run `python -m tests.cluster build` first")
    return path


@dataclass
class ControlPlane:
    """The control plane of one test cluster. Call `start()`, then `stop()` (also after a failure)."""

    state: StateLayout
    ports: Ports
    with_controllers: bool = True
    # Where the API server listens and what it advertises; must be a local address when `start()` runs.
    address: str = "127.0.0.1"
    started: list[procs.Proc] = field(default_factory=list)

    @property
    def server(self) -> str:
        return f"https://{self.address}:{self.ports.apiserver}"

    @property
    def _loopback(self) -> bool:
        return ipaddress.ip_address(self.address).is_loopback

    @property
    def kubeconfig(self) -> Path:
        return self.state.admin_kubeconfig

    # -- certificates -------------------------------------------------------------------------------------
    def _prepare_pki(self) -> None:
        pki_dir = self.state.pki
        self.ca = pki.ensure_ca(pki_dir)
        self.serving = pki.ensure_serving_cert(
            self.ca,
            pki_dir,
            "apiserver",
            dns_names=(
                "localhost",
                "kubernetes",
                "kubernetes.default",
                "kubernetes.default.svc",
                f"kubernetes.default.svc.{CLUSTER_DOMAIN}",
            ),
            ips=tuple(dict.fromkeys(("127.0.0.1", KUBERNETES_SERVICE_IP, self.address))),
        )
        self.sa = pki.ensure_service_account_keys(pki_dir)
        self.kubelet_client = pki.ensure_client_cert(self.ca, pki_dir, APISERVER_KUBELET_CLIENT)
        for identity in (ADMIN, CONTROLLER_MANAGER, SCHEDULER):
            cert = pki.ensure_client_cert(self.ca, pki_dir, identity)
            path = self.state.root / f"{identity.name}.kubeconfig"
            pki.write_kubeconfig(path, server=self.server, ca=self.ca, client=cert, user=identity.user)

    def write_client_kubeconfig(self, identity: pki.ClientIdentity, path: Path) -> Path:
        cert = pki.ensure_client_cert(self.ca, self.state.pki, identity)
        return pki.write_kubeconfig(path, server=self.server, ca=self.ca, client=cert, user=identity.user)

    # -- health -------------------------------------------------------------------------------------------
    def _ssl_context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.ca.cert))
        admin = self.state.pki / f"{ADMIN.name}"
        ctx.load_cert_chain(f"{admin}.crt", f"{admin}.key")
        return ctx

    def _https_ok(self, url: str, *, verify: bool = True) -> bool:
        ctx = self._ssl_context() if verify else ssl._create_unverified_context()
        try:
            with urllib.request.urlopen(url, context=ctx, timeout=2) as response:
                return bool(response.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _etcd_healthy(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.ports.etcd_client}/health"
            with urllib.request.urlopen(url, timeout=2) as response:
                return bool(json.load(response).get("health") == "true")
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def apiserver_ready(self) -> bool:
        return self._https_ok(f"{self.server}/readyz")

    # -- processes ----------------------------------------------------------------------------------------
    def _start(self, name: str, argv: list[str | Path]) -> procs.Proc:
        proc = procs.start(self.state, name, argv)
        self.started.append(proc)
        return proc

    def start_etcd(self) -> None:
        client = f"http://127.0.0.1:{self.ports.etcd_client}"
        peer = f"http://127.0.0.1:{self.ports.etcd_peer}"
        proc = self._start(
            "etcd",
            [
                etcd_binary(),
                "--name=ember",
                f"--data-dir={self.state.etcd_data}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=ember={peer}",
                "--initial-cluster-state=new",
                "--log-level=warn",
                "--logger=zap",
                "--quota-backend-bytes=2147483648",
            ],
        )
        procs.wait_for("etcd /health", self._etcd_healthy, timeout_s=30, proc=proc)

    def start_apiserver(self) -> None:
        p = self.state.pki
        proc = self._start(
            "kube-apiserver",
            [
                kube_binary("kube-apiserver"),
                f"--etcd-servers=http://127.0.0.1:{self.ports.etcd_client}",
                f"--bind-address={self.address}",
                f"--advertise-address={self.address}",
                # The `kubernetes` Service's endpoint: pods reach no loopback address (and the Endpoints API
                # rejects one), so the apiserver tier publishes none; the cluster tier publishes the node IP.
                f"--endpoint-reconciler-type={'none' if self._loopback else 'lease'}",
                f"--secure-port={self.ports.apiserver}",
                f"--tls-cert-file={self.serving.cert}",
                f"--tls-private-key-file={self.serving.key}",
                f"--client-ca-file={self.ca.cert}",
                f"--kubelet-client-certificate={self.kubelet_client.cert}",
                f"--kubelet-client-key={self.kubelet_client.key}",
                "--kubelet-preferred-address-types=InternalIP,Hostname",
                f"--service-account-issuer=https://kubernetes.default.svc.{CLUSTER_DOMAIN}",
                f"--service-account-key-file={self.sa.cert}",
                f"--service-account-signing-key-file={self.sa.key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=Node,RBAC",
                "--enable-admission-plugins=NodeRestriction",
                "--allow-privileged=true",
                "--profiling=false",
                f"--cert-dir={p}",
                "--v=1",
            ],
        )
        procs.wait_for("kube-apiserver /readyz", self.apiserver_ready, timeout_s=90, proc=proc)

    def start_controller_manager(self) -> None:
        p = self.state.pki
        kubeconfig = self.state.root / f"{CONTROLLER_MANAGER.name}.kubeconfig"
        proc = self._start(
            "kube-controller-manager",
            [
                kube_binary("kube-controller-manager"),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.ports.controller_manager}",
                f"--cert-dir={p / 'controller-manager-serving'}",
                f"--service-account-private-key-file={self.sa.key}",
                f"--root-ca-file={self.ca.cert}",
                f"--cluster-signing-cert-file={self.ca.cert}",
                f"--cluster-signing-key-file={self.ca.key}",
                "--use-service-account-credentials=true",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--leader-elect=false",
                "--profiling=false",
                "--v=1",
            ],
        )
        url = f"https://127.0.0.1:{self.ports.controller_manager}/healthz"
        procs.wait_for(
            "kube-controller-manager /healthz", lambda: self._https_ok(url, verify=False), timeout_s=60, proc=proc
        )

    def start_scheduler(self) -> None:
        kubeconfig = self.state.root / f"{SCHEDULER.name}.kubeconfig"
        proc = self._start(
            "kube-scheduler",
            [
                kube_binary("kube-scheduler"),
                f"--kubeconfig={kubeconfig}",
                f"--authentication-kubeconfig={kubeconfig}",
                f"--authorization-kubeconfig={kubeconfig}",
                "--bind-address=127.0.0.1",
                f"--secure-port={self.ports.scheduler}",
                f"--cert-dir={self.state.pki / 'scheduler-serving'}",
                "--leader-elect=false",
                "--profiling=false",
                "--v=1",
            ],
        )
        url = f"https://127.0.0.1:{self.ports.scheduler}/healthz"
        procs.wait_for("kube-scheduler /healthz", lambda: self._https_ok(url, verify=False), timeout_s=60, proc=proc)

    def start(self) -> None:
        """Start etcd and the API server (and the controllers if `with_controllers`); wait for each."""
        self.state.root.mkdir(parents=True, exist_ok=True)
        self._prepare_pki()
        try:
            self.start_etcd()
            self.start_apiserver()
            if self.with_controllers:
                self.start_controller_manager()
                self.start_scheduler()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every process this control plane started, newest first, by pid."""
        for name in ("kube-scheduler", "kube-controller-manager", "kube-apiserver", "etcd"):
            procs.stop(self.state, name)
        self.started.clear()
