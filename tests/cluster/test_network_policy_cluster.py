"""Cluster tier (#11): Ember's NetworkPolicies, enforced by the cluster's policy controller, hold
against hostile functions in gVisor pods.

The test cluster enforces NetworkPolicy with kube-router's controller (tests/cluster/node.py); the
operator and the activator run as host processes (as in test_agent_auth_cluster.py), so the
activator reaches agents from the node's own address, which the controller always admits (as it
does the kubelet's probes). The test starts two TCP servers on the node address. Four Functions:

- `bystander`, the victim: invoked all along by a bounded background load that must see no error;
- `hostile`, egress `none`: tries the victim's agent by pod IP, both servers, the API server (by
  its Service and by its address), the cloud metadata address (a third server of the test's, on
  169.254.169.254 added to the node's loopback) and DNS (UDP and TCP);
- `listed`, an allow-list of one port of the node address and DNS (port 53, where the cluster's
  resolver answers: a policy sees the DNS Service's endpoint, not its ClusterIP): reaches that port
  and DNS over UDP and TCP, nothing else;
- `wide`, an allow-list of the whole pod network (the node address is in it): reaches both servers
  and DNS, so pod networking and the probes themselves work, but not the victim's agent, whose
  pool admits only the activators on the agent's port, nor the metadata address.

Before any negative check, the positive controls: the activator invokes the victim, the test
connects to the victim's agent from the node, and every server answers the node. Each probe is a
real connection with a short timeout from inside the function, and the servers record whom they
accepted, so a refusal cannot be mistaken for a server that is down. Without a policy controller
(the bridge plugin alone) every probe gets through and the test fails.

Not covered: ports 30000-32767 of the node address, which the controller opens to every pod
(NodePort semantics, `--service-node-port-range`); the servers' ports are outside that range.
What the objects say is tests/apiserver/test_operator_functions.py; the agent's token, which
holds without any policy, is test_agent_auth_cluster.py (in this cluster the network stops those
attempts first) and the local tier.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest

from ember.resources.pool import AGENT_PORT
from tests.apiserver.operator_harness import Ember
from tests.cluster.cluster import Cluster
from tests.cluster.controlplane import KUBERNETES_SERVICE_IP
from tests.cluster.node import NODE_IP, POD_CIDR
from tests.cluster.scenarios import ActivatorProcess
from tests.cluster.services import DNS_SERVICE_IP
from tests.cluster.test_agent_restart_cluster import BYSTANDER, _bystander_load, _call, _create_ready, _function

PROBE = r"""
import random, socket, struct, time

def connect(host, port, send):
    started = time.monotonic()
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            s.settimeout(2)
            if send:
                s.sendall(send.encode())
            try:
                got = s.recv(200).decode(errors="replace")
            except socket.timeout:
                got = ""
            return {"open": True, "got": got}
    except OSError as e:
        return {"open": False, "error": repr(e), "s": round(time.monotonic() - started, 2)}

def dns(server, kind, name="kubernetes.default.svc.cluster.local"):
    query = struct.pack(">HHHHHH", random.randrange(1 << 16), 0x0100, 1, 0, 0, 0)
    query += b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0" + struct.pack(">HH", 1, 1)
    started = time.monotonic()
    try:
        if kind == "dns-udp":
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.settimeout(2)
                s.sendto(query, (server, 53))
                reply = s.recv(512)
        else:
            with socket.create_connection((server, 53), timeout=2) as s:
                s.settimeout(2)
                s.sendall(struct.pack(">H", len(query)) + query)
                reply = s.recv(2 + 512)[2:]
        return {"open": True, "answers": struct.unpack(">H", reply[6:8])[0]}
    except OSError as e:
        return {"open": False, "error": repr(e), "s": round(time.monotonic() - started, 2)}

def handler(event, context):
    out = {}
    for name, kind, host, port, send in event["probes"]:
        out[name] = connect(host, port, send) if kind == "connect" else dns(host, kind)
    return out
"""
BANNER = "ember-netpol-server"
METADATA = "169.254.169.254"  # the cloud metadata address (EC2, GCE, Azure)
# A probe's connect fails at once when refused; 2 s per probe is the most one may take.
PROBE_TIMEOUT_S = 2.0


@dataclass
class NodeServer:
    """A TCP server on the node address that greets with a banner and records its peers."""

    host: str = NODE_IP
    port: int = 0
    peers: list[str] = field(default_factory=list)

    async def _greet(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peers.append(writer.get_extra_info("peername")[0])
        writer.write(f"{BANNER} {self.port}\n".encode())
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[NodeServer]:
        server = await asyncio.start_server(self._greet, self.host, 0)
        self.port = server.sockets[0].getsockname()[1]
        async with server:
            yield self


def _policy(name: str, allow: list[dict[str, Any]]) -> dict[str, Any]:
    spec = {"egress": {"mode": "allowList", "allow": allow}}
    return {"kind": "SecurityPolicy", "metadata": {"name": name}, "spec": spec}


def _prober(name: str, policy: str | None) -> dict[str, Any]:
    more: dict[str, Any] = {"timeoutSeconds": 60}
    if policy:
        more["securityPolicyRef"] = {"name": policy}
    return _function(name, PROBE, **more)


def _pod_ip(ember: Ember, function: str) -> str:
    (pod,) = ember.core.list_namespaced_pod(ember.ns, label_selector=f"ember.run/function={function}").items
    ip: str = pod.status.pod_ip
    return ip


def _host_connects(ip: str, port: int) -> str:
    """From the node: connect, send a request, return the first line of the answer."""
    with socket.create_connection((ip, port), timeout=5) as sock:
        sock.settimeout(5)
        sock.sendall(f"GET /healthz HTTP/1.0\r\nHost: {ip}\r\n\r\n".encode())
        return sock.recv(200).decode(errors="replace").splitlines()[0]


async def _probe(http: aiohttp.ClientSession, url: str, ns: str, name: str, probes: list[list[Any]]) -> Any:
    started = time.monotonic()
    status, text = await _call(http, url, ns, name, {"probes": probes})
    assert status == 200, text
    seen = json.loads(text)
    print(f"{name} ({time.monotonic() - started:.1f} s): {json.dumps(seen, indent=1)}")
    return seen


def _blocked(result: dict[str, Any]) -> bool:
    """Refused or timed out, within the probe's timeout (plus slack for a loaded node)."""
    return result["open"] is False and result["s"] <= PROBE_TIMEOUT_S + 1.0


@pytest.fixture
def metadata_address() -> Iterator[str]:
    """The cloud metadata address, on the node's loopback for the test (a server of the test's own
    listens there: no cloud is reached)."""
    subprocess.run(["ip", "addr", "add", f"{METADATA}/32", "dev", "lo"], check=True)
    try:
        yield METADATA
    finally:
        subprocess.run(["ip", "addr", "del", f"{METADATA}/32", "dev", "lo"], check=False)


async def test_network_policies_hold_against_hostile_functions(
    ember_ns: Ember, activator: ActivatorProcess, cluster: Cluster, metadata_address: str
) -> None:
    ember = ember_ns
    apiserver_port = cluster.ports.control_plane.apiserver
    ember.create("securitypolicies", _policy("wide", [{"cidr": POD_CIDR}]))
    async with (
        NodeServer().serving() as listed_server,
        NodeServer().serving() as unlisted_server,
        NodeServer(METADATA).serving() as metadata_server,
    ):
        listed_rule = {"cidr": f"{NODE_IP}/32", "ports": [listed_server.port, 53]}
        ember.create("securitypolicies", _policy("listed", [listed_rule]))
        _create_ready(
            ember,
            _function("bystander", BYSTANDER),
            _prober("hostile", None),
            _prober("listed", "listed"),
            _prober("wide", "wide"),
        )
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as http:
            url, ns = activator.url, ember.ns
            # positive controls: the activator reaches the victim's agent, so does the node, and the
            # servers answer the node
            assert await _call(http, url, ns, "bystander", {"n": 0}) == (200, '{"n":0}')
            victim = _pod_ip(ember, "bystander")
            status_line = await asyncio.to_thread(_host_connects, victim, AGENT_PORT)
            assert status_line.split()[1:2] == ["200"], status_line
            for server in (listed_server, unlisted_server, metadata_server):
                got = await asyncio.to_thread(_host_connects, server.host, server.port)
                assert got == f"{BANNER} {server.port}", got
                assert len(server.peers) == 1, server.peers  # the node
                server.peers.clear()

            agent = ["agent", "connect", victim, AGENT_PORT, "GET /healthz HTTP/1.0\r\n\r\n"]
            listed = ["listed", "connect", NODE_IP, listed_server.port, ""]
            unlisted = ["unlisted", "connect", NODE_IP, unlisted_server.port, ""]
            api_service = ["api-service", "connect", KUBERNETES_SERVICE_IP, 443, ""]
            api_node = ["api-node", "connect", NODE_IP, apiserver_port, ""]
            metadata = ["metadata", "connect", METADATA, metadata_server.port, ""]
            dns_udp = ["dns-udp", "dns-udp", DNS_SERVICE_IP, 53, ""]
            dns_tcp = ["dns-tcp", "dns-tcp", DNS_SERVICE_IP, 53, ""]
            every = [agent, listed, unlisted, api_service, api_node, metadata, dns_udp, dns_tcp]
            async with _bystander_load(http, url, ns) as load:
                wide = await _probe(http, url, ns, "wide", [agent, listed, unlisted, metadata, dns_udp, dns_tcp])
                hostile = await _probe(http, url, ns, "hostile", every)
                allowed = await _probe(http, url, ns, "listed", every)
                await asyncio.sleep(1.0)  # the load keeps going a moment after the last attack
            assert await _call(http, url, ns, "bystander", {"n": -1}) == (200, '{"n":-1}')
    print(f"background load: {load.calls} calls, {len(load.errors)} errors")

    # `wide` may go anywhere in the pod network: pod-to-node networking and DNS work from a pod, and
    # the probes see a server's banner when they get through ...
    assert wide["listed"] == {"open": True, "got": f"{BANNER} {listed_server.port}\n"}, wide
    assert wide["unlisted"] == {"open": True, "got": f"{BANNER} {unlisted_server.port}\n"}, wide
    assert wide["dns-udp"] == {"open": True, "answers": 1}, wide
    assert wide["dns-tcp"] == {"open": True, "answers": 1}, wide
    # ... but not the victim's agent: its pool admits only the activators, on the agent's port;
    # nor the metadata address, which is not in the pod network
    assert _blocked(wide["agent"]), wide
    assert _blocked(wide["metadata"]), wide
    # egress `none`: nothing at all, DNS included
    assert {name for name, result in hostile.items() if not _blocked(result)} == set(), hostile
    # the allow-list: its port of the node address and DNS (53 lets UDP through too), nothing else
    assert allowed["listed"] == {"open": True, "got": f"{BANNER} {listed_server.port}\n"}, allowed
    assert allowed["dns-udp"] == {"open": True, "answers": 1}, allowed
    assert allowed["dns-tcp"] == {"open": True, "answers": 1}, allowed
    let_through = {"listed", "dns-udp", "dns-tcp"}
    leaked = {name for name, result in allowed.items() if name not in let_through and not _blocked(result)}
    assert leaked == set(), allowed
    # what the servers saw: `wide` on both, `listed` on its port, `hostile` never
    pods = {name: _pod_ip(ember, name) for name in ("hostile", "listed", "wide")}
    assert listed_server.peers == [pods["wide"], pods["listed"]], (listed_server.peers, pods)
    assert unlisted_server.peers == [pods["wide"]], (unlisted_server.peers, pods)
    assert metadata_server.peers == [], metadata_server.peers
    assert load.calls >= 20, load
    assert load.errors == [], load.errors
