"""The node: containerd (CRI, runc and gVisor), the CNI bridge, the kubelet, and NetworkPolicy enforcement.

containerd runs on a private socket with its state under the cluster directory and its root (images,
snapshots) under the cache, so imported images survive `down`/`up`. Pod networking is the CNI bridge
`ember0` with host-local addresses from 10.244.0.0/20: the bridge owns only that subnet (no masquerade,
no default route), so the machine's own networking is untouched. Pods (and the host) route the service
CIDR into the bridge, where kube-proxy's rules take it (see `services`); pods resolve names through the
cluster DNS Service (`services.DNS_SERVICE_IP`, domain `cluster.local`).

gVisor: the RuntimeClass `gvisor` selects containerd's runtime `runsc`, served by gVisor's own
`containerd-shim-runsc-v1` (see `build.ensure_gvisor` for which commit and why) running the current
`runsc` on the systrap platform. containerd's runc shim with `BinaryName` set to runsc was tried and does
not work: the sandbox starts, but the runc shim tracks the app container by the sandbox's pid and never
reports it started.

NetworkPolicy: the bridge plugin enforces none, so kube-router's network policy controller runs beside
the kubelet as a host process (`--run-firewall` only: no routing, no service proxy, no CNI), as k3s embeds
it with flannel's bridge. It programs the filter table (`KUBE-ROUTER-INPUT/FORWARD/OUTPUT`, a
`KUBE-POD-FW-*` chain per pod, a `KUBE-NWPLCY-*` chain and `KUBE-SRC-*`/`KUBE-DST-*` ipsets per policy).
Bridged traffic passes it (`bridge-nf-call-iptables`, `physdev`), and so do a pod's connections to the node
address (the API server, CoreDNS, host processes), after kube-proxy's DNAT: a policy sees a Service's
endpoint, never its ClusterIP. Connections from the node itself to a pod (`--src-type LOCAL`) are always
admitted: the kubelet's probes, and the tests' host-process activators. Not covered: a pod before the API
shows its IP and the controller has synced (its first moments, before any code is handed to it).
`--netpol-default-deny` would close that, but it rejects every address of the node's pod CIDR that is no
pod's, and the node address is one. Its `--cleanup-config` also flushes every IPVS service on the machine,
so `stop()` removes kube-router's chains and ipsets itself, by their prefixes.

`stop()` tears down in an order that leaves nothing behind: pods deleted through the API (the kubelet
stops their sandboxes and CNI), kubelet stopped, leftover tasks killed through containerd, containerd
stopped, then any process still in the kubelet's pod cgroups or still naming this cluster's directories
is killed by pid, mounts under the cluster directories are unmounted, the bridge is deleted and
kube-router's rules are removed (it is stopped first, so nothing rewrites them meanwhile).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import string
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import images, pki, procs
from .build import ensure_gvisor, ensure_kube_router
from .controlplane import CLUSTER_DOMAIN, SERVICE_CIDR, ControlPlane, kube_binary
from .paths import PAUSE_IMAGE, TEMPLATES_DIR, StateLayout, cache_root
from .services import DNS_SERVICE_IP

NODE_NAME = "ember-node"
POD_CIDR = "10.244.0.0/16"
# Room for every pod a whole test run creates (a /24 wrapped around within one), so host-local's
# round-robin never hands out an address twice in a run: kube-router keeps a pod's firewall chain
# until the pod is finished or gone (cloudnativelabs/kube-router#1056), so a new pod given the address
# of a pod still terminating would be held to that pod's policy as well as its own.
POD_SUBNET = "10.244.0.0/20"
BRIDGE = "ember0"
BRIDGE_MAC = "02:65:6d:62:65:72"  # fixed, locally administered ("ember")
# The kubelet refuses a loopback node IP, so the node's address is the pod bridge's gateway: it exists only
# on this machine, and the CNI bridge plugin adopts the bridge and address as its own.
NODE_IP = "10.244.0.1"
CNI_BIN_DIR = Path("/usr/lib/cni")
KUBELET = pki.ClientIdentity(name="kubelet", user=f"system:node:{NODE_NAME}", groups=("system:nodes",))
KUBE_ROUTER = pki.ClientIdentity(name="kube-router", user="system:kube-router")
_KUBE_ROUTER_ROLE = "tests.cluster:kube-router"
# What the network policy controller reads: its informers list and watch all of these (kube-router's own
# RBAC for the firewall-only DaemonSet, minus the writes only its router and proxy make).
KUBE_ROUTER_RBAC: list[dict[str, Any]] = [
    {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRole",
        "metadata": {"name": _KUBE_ROUTER_ROLE},
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["pods", "namespaces", "nodes", "services", "endpoints"],
                "verbs": ["get", "list", "watch"],
            },
            {"apiGroups": ["discovery.k8s.io"], "resources": ["endpointslices"], "verbs": ["get", "list", "watch"]},
            {"apiGroups": ["networking.k8s.io"], "resources": ["networkpolicies"], "verbs": ["get", "list", "watch"]},
        ],
    },
    {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": _KUBE_ROUTER_ROLE},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": _KUBE_ROUTER_ROLE},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": KUBE_ROUTER.user}],
    },
]
# kube-router's filter-table chains and ipsets, by prefix: what `stop()` removes and nothing else.
KUBE_ROUTER_CHAIN_PREFIXES = ("KUBE-ROUTER-", "KUBE-POD-FW-", "KUBE-NWPLCY-")
KUBE_ROUTER_IPSET_PREFIXES = ("KUBE-SRC-", "KUBE-DST-", "kube-router-", "inet6:KUBE-SRC-", "inet6:KUBE-DST-")


def _render(template: str, **values: object) -> str:
    return string.Template((TEMPLATES_DIR / template).read_text()).substitute({k: str(v) for k, v in values.items()})


@dataclass
class Node:
    """containerd + kubelet for one cluster, registered with `control_plane` as node `ember-node`."""

    state: StateLayout
    control_plane: ControlPlane
    kubelet_port: int
    kubelet_healthz_port: int
    kube_router_healthz_port: int

    @property
    def containerd_socket(self) -> Path:
        return self.state.root / "containerd" / "containerd.sock"

    @property
    def containerd_state(self) -> Path:
        return self.state.root / "containerd" / "state"

    @property
    def containerd_root(self) -> Path:
        return cache_root() / "containerd-root"

    @property
    def kubelet_dir(self) -> Path:
        return self.state.root / "kubelet"

    @property
    def runsc_root(self) -> Path:
        return self.state.root / "runsc"

    @property
    def cni_conf_dir(self) -> Path:
        return self.state.root / "cni" / "net.d"

    @property
    def ipam_dir(self) -> Path:
        return self.state.root / "cni" / "ipam"

    # -- configuration ------------------------------------------------------------------------------------
    def _runsc_runtime_toml(self, runsc: Path) -> str:
        config = self.state.root / "runsc.toml"
        config.write_text(
            f'binary_name = "{runsc}"\nroot = "{self.runsc_root}"\n\n[runsc_config]\n  platform = "systrap"\n'
        )
        section = 'plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runsc'
        return (
            f"    [{section}]\n"
            '      runtime_type = "io.containerd.runsc.v1"\n'
            f"      [{section}.options]\n"
            '        TypeUrl = "io.containerd.runsc.v1.options"\n'
            f'        ConfigPath = "{config}"\n'
        )

    def _write_configs(self) -> None:
        gvisor = ensure_gvisor()
        for directory in (self.containerd_state, self.containerd_root, self.kubelet_dir, self.cni_conf_dir):
            directory.mkdir(parents=True, exist_ok=True)
        self.runsc_root.mkdir(parents=True, exist_ok=True)
        toml = _render(
            "containerd.toml",
            root=self.containerd_root,
            state=self.containerd_state,
            socket=self.containerd_socket,
            pause_image=PAUSE_IMAGE,
            runsc_runtime=self._runsc_runtime_toml(gvisor["runsc"]),
            cni_bin_dir=CNI_BIN_DIR,
            cni_conf_dir=self.cni_conf_dir,
        )
        (self.state.root / "containerd.toml").write_text(toml)
        (self.cni_conf_dir / "10-ember.conflist").write_text(
            _render(
                "cni.conflist",
                bridge=BRIDGE,
                ipam_dir=self.ipam_dir,
                pod_subnet=POD_SUBNET,
                pod_cidr=POD_CIDR,
                service_cidr=SERVICE_CIDR,
            )
        )
        (self.state.root / "kubelet.yaml").write_text(
            _render(
                "kubelet.yaml",
                address=NODE_IP,
                port=self.kubelet_port,
                healthz_port=self.kubelet_healthz_port,
                client_ca=self.control_plane.ca.cert,
                containerd_socket=self.containerd_socket,
                root_dir=self.kubelet_dir,
                cluster_dns=DNS_SERVICE_IP,
                cluster_domain=CLUSTER_DOMAIN,
            )
        )
        self.control_plane.write_client_kubeconfig(KUBELET, self.state.root / "kubelet.kubeconfig")

    # -- processes ----------------------------------------------------------------------------------------
    def _ctr(self, *args: str | Path, timeout_s: float = 60) -> str:
        return procs.run(["ctr", "--address", self.containerd_socket, "-n", "k8s.io", *args], timeout_s=timeout_s)

    def _containerd_ready(self) -> bool:
        try:
            self._ctr("version", timeout_s=5)
        except (procs.ClusterError, subprocess.TimeoutExpired):
            return False
        return True

    def start_containerd(self) -> None:
        shim_dir = ensure_gvisor()["containerd-shim-runsc-v1"].parent
        env = {"PATH": f"{shim_dir}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"}
        proc = procs.start(
            self.state, "containerd", ["containerd", "--config", self.state.root / "containerd.toml"], env=env
        )
        procs.wait_for("containerd", self._containerd_ready, timeout_s=30, proc=proc, interval_s=0.2)

    def import_images(self, extra: list[images.BuiltImage] | None = None) -> None:
        for image in [images.ensure_pause_image(), *(extra or [])]:
            images.import_image(image, containerd_socket=self.containerd_socket, containerd_root=self.containerd_root)

    def _kubelet_healthy(self) -> bool:
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.kubelet_healthz_port}/healthz", timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def start_kubelet(self) -> None:
        proc = procs.start(
            self.state,
            "kubelet",
            [
                kube_binary("kubelet"),
                f"--config={self.state.root / 'kubelet.yaml'}",
                f"--kubeconfig={self.state.root / 'kubelet.kubeconfig'}",
                f"--root-dir={self.kubelet_dir}",
                f"--cert-dir={self.kubelet_dir / 'pki'}",
                f"--hostname-override={NODE_NAME}",
                f"--node-ip={NODE_IP}",
                "--v=1",
            ],
        )
        procs.wait_for("kubelet /healthz", self._kubelet_healthy, timeout_s=60, proc=proc, interval_s=0.2)

    # -- NetworkPolicy ------------------------------------------------------------------------------------
    def _create_kube_router_rbac(self) -> None:
        from kubernetes import client, config
        from kubernetes.client.rest import ApiException

        api = config.new_client_from_config(config_file=str(self.control_plane.kubeconfig))
        try:
            rbac = client.RbacAuthorizationV1Api(api)
            role, binding = KUBE_ROUTER_RBAC
            for create, body in ((rbac.create_cluster_role, role), (rbac.create_cluster_role_binding, binding)):
                try:
                    create(body)
                except ApiException as err:
                    if err.status != 409:
                        raise procs.ClusterError(f"creating {body['metadata']['name']} failed: {err.body}") from err
        finally:
            api.close()

    def _kube_router_healthy(self) -> bool:
        import urllib.error
        import urllib.request

        try:
            url = f"http://127.0.0.1:{self.kube_router_healthz_port}/healthz"
            with urllib.request.urlopen(url, timeout=2) as r:
                return bool(r.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def network_policy_enforced(self) -> bool:
        """kube-router runs, answers its health check, and its chains are hooked into the filter table."""
        if not procs.running(self.state, "kube-router") or not self._kube_router_healthy():
            return False
        try:
            rules = procs.run(["iptables-save", "-t", "filter"], timeout_s=10)
        except (procs.ClusterError, subprocess.TimeoutExpired):
            return False
        hooked = all(f"-A {builtin} " in rules and f"-j KUBE-ROUTER-{builtin}" in rules for builtin in _BUILTINS)
        return hooked and ":KUBE-NWPLCY-DEFAULT " in rules

    def start_network_policy(self) -> None:
        """Start kube-router's network policy controller (after the node is registered: it reads the Node)."""
        binary = ensure_kube_router()
        self._create_kube_router_rbac()
        kubeconfig = self.control_plane.write_client_kubeconfig(KUBE_ROUTER, self.state.root / "kube-router.kubeconfig")
        proc = procs.start(
            self.state,
            "kube-router",
            [
                binary,
                "--run-firewall=true",
                "--run-router=false",
                "--run-service-proxy=false",
                "--enable-cni=false",
                "--enable-ipv6=false",
                f"--kubeconfig={kubeconfig}",
                f"--hostname-override={NODE_NAME}",
                # Traffic to ClusterIPs is left to kube-proxy (a policy sees the endpoint after its DNAT).
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--health-addr=127.0.0.1",
                f"--health-port={self.kube_router_healthz_port}",
                "--metrics-port=0",
                "--v=1",
            ],
        )
        procs.wait_for(
            "kube-router's network policy chains", self.network_policy_enforced, timeout_s=60, proc=proc, interval_s=0.3
        )

    def ensure_bridge(self) -> None:
        """The bridge with the node IP (the API server listens there, so this comes first) and its routes."""
        links = subprocess.run(["ip", "-o", "link", "show", BRIDGE], capture_output=True, check=False)
        if links.returncode != 0:
            procs.run(["ip", "link", "add", BRIDGE, "type", "bridge"])
        address = f"{NODE_IP}/{POD_SUBNET.split('/')[1]}"
        addresses = procs.run(["ip", "-o", "-4", "addr", "show", "dev", BRIDGE])
        if f" {address} " not in addresses:
            procs.run(["ip", "addr", "flush", "dev", BRIDGE])  # a bridge left with an older subnet
            procs.run(["ip", "addr", "add", address, "dev", BRIDGE])
        # A bridge takes the lowest MAC of its ports unless its own is set: as pods came and went it changed,
        # and pods that had cached the node address's old MAC lost every connection to the node (the API
        # server, CoreDNS, the tests' activators) until their ARP entry expired, about 30 s.
        procs.run(["ip", "link", "set", BRIDGE, "address", BRIDGE_MAC])
        procs.run(["ip", "link", "set", BRIDGE, "up"])
        # Service IPs the host connects to go into the bridge, never out of the machine's default route,
        # whether or not kube-proxy has rules for them yet (the route goes with the bridge).
        procs.run(["ip", "route", "replace", SERVICE_CIDR, "dev", BRIDGE, "src", NODE_IP])
        # Replies from one pod to another that reached it through a Service IP are bridged, not routed: they
        # must pass iptables so conntrack undoes the Service DNAT. (Both settings are per network namespace.)
        for sysctl in ("net/bridge/bridge-nf-call-iptables", "net/ipv4/ip_forward"):
            path = Path("/proc/sys") / sysctl
            if not path.exists():
                raise procs.ClusterError(f"{path} is missing: is the br_netfilter module loaded?")
            if path.read_text().strip() != "1":
                path.write_text("1\n")

    def start(self) -> None:
        self.ensure_bridge()
        self._write_configs()
        self.start_containerd()
        self.import_images()
        self.start_kubelet()

    # -- teardown -----------------------------------------------------------------------------------------
    def _kill_leftover_tasks(self) -> None:
        if not self._containerd_ready():
            return
        for task in self._ctr("tasks", "list", "-q").split():
            with contextlib.suppress(procs.ClusterError, subprocess.TimeoutExpired):
                self._ctr("tasks", "kill", "-s", "SIGKILL", task, timeout_s=10)
        time.sleep(0.5)
        for task in self._ctr("tasks", "list", "-q").split():
            with contextlib.suppress(procs.ClusterError, subprocess.TimeoutExpired):
                self._ctr("tasks", "delete", "-f", task, timeout_s=20)
        for container in self._ctr("containers", "list", "-q").split():
            with contextlib.suppress(procs.ClusterError, subprocess.TimeoutExpired):
                self._ctr("containers", "delete", container, timeout_s=20)

    def _leftover_pids(self) -> set[int]:
        """Processes this node left: in the kubelet's pod cgroups, or naming this node's directories."""
        markers = [str(self.containerd_socket), str(self.runsc_root), str(self.containerd_state)]
        found: set[int] = set()
        for cgroup_procs in Path("/sys/fs/cgroup").glob("*/kubepods*/**/cgroup.procs"):
            with contextlib.suppress(OSError, ValueError):
                found.update(int(line) for line in cgroup_procs.read_text().split())
        for proc_dir in Path("/proc").iterdir():
            if not proc_dir.name.isdigit():
                continue
            with contextlib.suppress(OSError):
                cmdline = (proc_dir / "cmdline").read_bytes().decode(errors="replace")
                if any(marker in cmdline for marker in markers):
                    found.add(int(proc_dir.name))
        found.discard(os.getpid())
        return found

    def _kill_leftovers(self) -> None:
        for _ in range(5):
            pids = self._leftover_pids()
            if not pids:
                return
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            time.sleep(0.3)
        raise procs.ClusterError(f"processes left after teardown could not be killed: {sorted(self._leftover_pids())}")

    def _unmount_all(self) -> None:
        roots = (str(self.state.root) + "/", str(self.containerd_root) + "/")
        for _ in range(3):
            mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
            ours = [m for m in mounts if m.startswith(roots)]
            if not ours:
                return
            for mount in sorted(ours, key=len, reverse=True):
                subprocess.run(["umount", "-l", mount], capture_output=True, check=False)

    def _remove_pod_cgroups(self) -> None:
        # Bottom-up; a directory the kernel or the kubelet removed meanwhile is simply skipped.
        for hierarchy in Path("/sys/fs/cgroup").iterdir():
            for top in hierarchy.glob("kubepods*"):
                for dirpath, _, _ in os.walk(top, topdown=False, onerror=lambda _err: None):
                    with contextlib.suppress(OSError):
                        os.rmdir(dirpath)

    def stop(self) -> None:
        procs.stop(self.state, "kube-router")
        procs.stop(self.state, "kubelet", grace_s=15)
        if procs.running(self.state, "containerd"):
            with contextlib.suppress(procs.ClusterError, subprocess.TimeoutExpired):
                self._kill_leftover_tasks()
        procs.stop(self.state, "containerd", grace_s=15)
        self._kill_leftovers()
        self._unmount_all()
        self._remove_pod_cgroups()
        subprocess.run(["ip", "link", "delete", BRIDGE], capture_output=True, check=False)
        shutil.rmtree(self.ipam_dir, ignore_errors=True)
        remove_kube_router_rules()


_BUILTINS = ("INPUT", "FORWARD", "OUTPUT")


def _kube_router_chain(name: str) -> bool:
    return name.startswith(KUBE_ROUTER_CHAIN_PREFIXES)


def remove_kube_router_rules() -> None:
    """Delete kube-router's jumps from the built-in filter chains, then its chains, then its ipsets.

    Rule by rule (`iptables -D` with the saved rule's own arguments), never a table restore, so rules other
    programs wrote meanwhile are left as they are. A machine without `iptables-save` or `ipset` has nothing
    of kube-router's to remove.
    """
    if shutil.which("iptables-save") is None:
        return
    saved = procs.run(["iptables-save", "-t", "filter"], timeout_s=30).splitlines()
    for line in saved:
        parts = shlex.split(line)
        jumps_to_ours = "-j" in parts and _kube_router_chain(parts[parts.index("-j") + 1])
        if len(parts) >= 2 and parts[0] == "-A" and parts[1] in _BUILTINS and jumps_to_ours:
            procs.run(["iptables", "-t", "filter", "-D", *parts[1:]], timeout_s=30)
    chains = [line[1:].split()[0] for line in saved if line.startswith(":") and _kube_router_chain(line[1:])]
    for flag in ("-F", "-X"):  # all flushed before any is deleted: they jump to one another
        for chain in chains:
            procs.run(["iptables", "-t", "filter", flag, chain], timeout_s=30)
    for name in _kube_router_ipsets():
        procs.run(["ipset", "destroy", name], timeout_s=30)


def _kube_router_ipsets() -> list[str]:
    if shutil.which("ipset") is None:
        return []
    names = procs.run(["ipset", "list", "-n"], timeout_s=30).split()
    return [name for name in names if name.startswith(KUBE_ROUTER_IPSET_PREFIXES)]


def kube_router_leftovers() -> list[str]:
    """kube-router's chains and ipsets still present (empty after `remove_kube_router_rules`)."""
    saved = procs.run(["iptables-save", "-t", "filter"], timeout_s=30).splitlines()
    chains = [line[1:].split()[0] for line in saved if line.startswith(":") and _kube_router_chain(line[1:])]
    return chains + _kube_router_ipsets()
