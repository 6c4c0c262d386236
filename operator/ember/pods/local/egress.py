"""A local sandbox's egress allow-list (SecurityPolicy `egress.mode: allowList`), as root.

Each such pod gets a network namespace of its own (`ip netns add`), joined to the host by a veth
pair with a /30 of `SUBNET` (the host's end `.1`, the sandbox's `.2`, the default route through
the host), and an iptables OUTPUT chain in that namespace that accepts loopback, replies to
connections already made, and each allowed `cidr` (all protocols, or TCP to its `ports`, and UDP
to port 53 when they list it: DNS, as in a cluster's NetworkPolicy), and
rejects everything else at once (a refused connection, not a hang). The sandbox runs in it
(`nsenter --net`, which changes nothing else: `ip netns exec` would remount /sys, where
runsc finds its cgroups): runsc with `--network=host` (gVisor's netstack is then the namespace's
kernel stack) or bwrap without a network namespace of its own. Code in the sandbox cannot change
those rules (no capability over a namespace the host's root owns), and sees the host's loopback,
the activator and other pods only if the allow-list names their addresses: the same rules a
NetworkPolicy gives a pod in a cluster, where `127.0.0.1` is the pod's own loopback too. Host
names (`host:`) are denied, as a NetworkPolicy cannot express them either (`ember dev` warns);
the namespace has no IPv6 route, so IPv6 destinations are unreachable.

Destinations off this host go through the host's routing: this turns on `net.ipv4.ip_forward`
and masquerades `SUBNET` (one iptables nat rule, left in place), as container runtimes do.
Removing the namespace (`remove`) removes its veth pair and rules with it.

Without root (no `ip netns`) the list cannot be enforced: a sandbox under it gets egress `none`
instead, a network of its own with loopback only (`ember.pods.local.sandbox.enforceable`: fail
closed, never the host's network); `problem()` says why, and `ember dev` says so at start.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import logging
import os
import shutil
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ember.api.security_policy import DNS_PORT
from ember.pods.base import AllowedNetwork

log = logging.getLogger(__name__)

SUBNET = ipaddress.IPv4Network("10.250.0.0/16")  # one /30 per pod: 16,384 pods at once
NETNS_DIR = Path("/run/netns")
_LOCK = threading.Lock()  # one allocation of a /30 at a time in this process


@dataclass(frozen=True, slots=True)
class PodNetwork:
    """A pod's network namespace and the /30 it holds."""

    name: str  # the namespace (/run/netns/<name>)
    index: int  # its /30 in SUBNET

    @property
    def path(self) -> Path:
        return NETNS_DIR / self.name

    @property
    def host_interface(self) -> str:
        return f"emb{self.index:x}h"  # at most 8 characters (interface names: 15)

    @property
    def host_address(self) -> str:
        return str(SUBNET.network_address + 4 * self.index + 1)

    @property
    def sandbox_address(self) -> str:
        return str(SUBNET.network_address + 4 * self.index + 2)


@functools.cache
def problem() -> str:
    """Why allow-lists cannot be enforced here, or ""."""
    if os.geteuid() != 0:
        return "not root: allow-lists cannot be enforced, so a sandbox under one gets no network (egress none)"
    missing = [tool for tool in ("ip", "iptables", "iptables-restore", "nsenter") if shutil.which(tool) is None]
    if missing:
        tools = ", ".join(missing)
        return f"{tools} not installed: allow-lists cannot be enforced, so a sandbox under one gets no network"
    return ""


def output_rules(allow: Sequence[AllowedNetwork]) -> list[list[str]]:
    """The iptables OUTPUT rules (arguments after `iptables -A OUTPUT`) for an allow-list: IPv4
    `cidr`s only (the namespace has no IPv6 route), everything not listed rejected."""
    rules = [["-o", "lo", "-j", "ACCEPT"], ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"]]
    for allowed in allow:
        network = ipaddress.ip_network(allowed.cidr, strict=False)
        if network.version != 4:
            continue
        if allowed.ports:
            ports = ",".join(str(p) for p in allowed.ports)
            rules.append(["-d", str(network), "-p", "tcp", "-m", "multiport", "--dports", ports, "-j", "ACCEPT"])
            if DNS_PORT in allowed.ports:
                rules.append(["-d", str(network), "-p", "udp", "--dport", str(DNS_PORT), "-j", "ACCEPT"])
        else:
            rules.append(["-d", str(network), "-j", "ACCEPT"])
    rules.append(["-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"])
    rules.append(["-j", "REJECT", "--reject-with", "icmp-port-unreachable"])
    return rules


def create(name: str, allow: Sequence[AllowedNetwork]) -> PodNetwork:
    """Make the namespace `name` with the allow-list's rules (see the module docstring): five
    commands, the rules loaded at once (`iptables-restore`)."""
    _run("ip", "netns", "add", name)
    try:
        network = _link(name)
        inside = (
            f"addr add {network.sandbox_address}/30 dev eth0\n"
            "link set lo up\nlink set eth0 up\n"
            f"route add default via {network.host_address}\n"
        )
        _run("ip", "-n", name, "-batch", "-", stdin=inside)
        rules = "".join("-A OUTPUT " + " ".join(rule) + "\n" for rule in output_rules(allow))
        table = f"*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n{rules}COMMIT\n"
        _run("nsenter", f"--net={network.path}", "--", "iptables-restore", "-w", stdin=table)
        _forward_off_host()
        return network
    except BaseException:
        remove(name)
        raise


def remove(name: str) -> None:
    """Remove the namespace `name` if it exists (its veth pair and rules go with it)."""
    if (NETNS_DIR / name).exists():
        done = subprocess.run(["ip", "netns", "del", name], capture_output=True, text=True, check=False)
        if done.returncode != 0:
            log.warning("network namespace %s not removed: %s", name, done.stderr.strip())


def sweep(picks: Callable[[str], bool]) -> None:
    """Remove every namespace whose name `picks` (those of pods gone without their release: a
    killed `ember dev`)."""
    with contextlib.suppress(FileNotFoundError):
        for name in os.listdir(NETNS_DIR):
            if picks(name):
                remove(name)


def _link(name: str) -> PodNetwork:
    """A free /30 and its veth pair, the sandbox's end (`eth0`) in the namespace. A /30 another
    `ember dev` holds has its interface name taken: the next one is tried."""
    with _LOCK:
        taken = {int(link[3:-1], 16) for link in os.listdir("/sys/class/net") if _is_ours(link)}
        for index in range(SUBNET.num_addresses // 4):
            if index in taken:
                continue
            network = PodNetwork(name, index)
            done = subprocess.run(
                ["ip", "link", "add", network.host_interface, "type", "veth", "peer", "name", "eth0", "netns", name],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                if "exists" in done.stderr:
                    continue
                raise OSError(f"ip link add {network.host_interface}: {done.stderr.strip()}")
            host = f"addr add {network.host_address}/30 dev {network.host_interface}\n"
            _run("ip", "-batch", "-", stdin=host + f"link set {network.host_interface} up\n")
            return network
    raise OSError(f"every /30 of {SUBNET} is in use")


def _is_ours(link: str) -> bool:
    if not (link.startswith("emb") and link.endswith("h")):
        return False
    with contextlib.suppress(ValueError):
        int(link[3:-1], 16)
        return True
    return False


def _forward_off_host() -> None:
    forwarding = Path("/proc/sys/net/ipv4/ip_forward")
    if forwarding.read_text().strip() != "1":
        forwarding.write_text("1")
    rule = ["-s", str(SUBNET), "!", "-d", str(SUBNET), "-j", "MASQUERADE"]
    if subprocess.run(["iptables", "-w", "-t", "nat", "-C", "POSTROUTING", *rule], capture_output=True).returncode:
        _run("iptables", "-w", "-t", "nat", "-A", "POSTROUTING", *rule)


def _run(*argv: str, stdin: str | None = None) -> None:
    done = subprocess.run(list(argv), input=stdin, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise OSError(f"{' '.join(argv)}: {done.stderr.strip() or f'exit {done.returncode}'}")
