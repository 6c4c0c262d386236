"""The rules a local sandbox's network namespace gets from its policy's allow-list (pure), the
allow-list as the pool key carries it, and which leftover namespaces a new source removes.
Enforcement itself, in real namespaces with real sandboxes, is
tests/local/security/test_sandbox_policy.py."""

from __future__ import annotations

import os

from ember.api.function import FunctionSpec
from ember.api.security_policy import SecurityPolicySpec
from ember.pods.base import AllowedNetwork
from ember.pods.local.egress import SUBNET, PodNetwork, output_rules
from ember.pods.local.source import _of_a_dead_process
from ember.pods.payload import pool_key

OPENING = [["-o", "lo", "-j", "ACCEPT"], ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"]]
CLOSING = [
    ["-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"],
    ["-j", "REJECT", "--reject-with", "icmp-port-unreachable"],
]


def test_an_empty_list_allows_loopback_and_replies_only() -> None:
    assert output_rules([]) == [*OPENING, *CLOSING]


def test_each_cidr_is_allowed_whole_or_to_its_tcp_ports_and_ipv6_is_left_out() -> None:
    rules = output_rules(
        [
            AllowedNetwork("10.1.2.3/32"),
            AllowedNetwork("192.168.7.9/24", (443, 8443)),  # host bits: the network is meant
            AllowedNetwork("2001:db8::/32", (443,)),  # no IPv6 route in the namespace
            AllowedNetwork("10.0.0.53/32", (53,)),  # DNS: over UDP too
        ]
    )
    assert rules == [
        *OPENING,
        ["-d", "10.1.2.3/32", "-j", "ACCEPT"],
        ["-d", "192.168.7.0/24", "-p", "tcp", "-m", "multiport", "--dports", "443,8443", "-j", "ACCEPT"],
        ["-d", "10.0.0.53/32", "-p", "tcp", "-m", "multiport", "--dports", "53", "-j", "ACCEPT"],
        ["-d", "10.0.0.53/32", "-p", "udp", "--dport", "53", "-j", "ACCEPT"],
        *CLOSING,
    ]


def test_the_pool_key_carries_the_cidrs_not_the_host_names() -> None:
    spec = FunctionSpec.model_validate({"runtime": "python3.12", "handler": "main.handler", "code": {"inline": "x"}})
    policy = SecurityPolicySpec.model_validate(
        {
            "egress": {
                "mode": "allowList",
                "allow": [{"cidr": "10.0.0.0/8", "ports": [443]}, {"host": "api.example.com"}, {"cidr": "1.2.3.4/32"}],
            }
        }
    )
    isolation = pool_key(spec, policy).isolation
    assert isolation.network
    assert isolation.allow == (AllowedNetwork("10.0.0.0/8", (443,)), AllowedNetwork("1.2.3.4/32"))
    assert pool_key(spec, None).isolation.allow == ()


def test_each_pod_holds_a_slash_30_of_the_subnet() -> None:
    first, last = PodNetwork("a", 0), PodNetwork("b", SUBNET.num_addresses // 4 - 1)
    assert (first.host_address, first.sandbox_address, first.host_interface) == ("10.250.0.1", "10.250.0.2", "emb0h")
    assert (last.host_address, last.sandbox_address) == ("10.250.255.253", "10.250.255.254")
    assert len(last.host_interface) <= 15


def test_only_namespaces_of_processes_that_are_gone_are_swept() -> None:
    gone = 2**22 + 12345  # above any pid_max: no such process
    assert _of_a_dead_process(f"ember-local-{gone}-7-0a1b2c3d")
    assert not _of_a_dead_process(f"ember-local-{os.getpid()}-7-0a1b2c3d")  # alive
    assert not _of_a_dead_process(f"ember-local-{gone}-7")  # not a pod's place name
    assert not _of_a_dead_process("cni-1234")  # someone else's
