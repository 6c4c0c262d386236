"""SecurityPolicy egress → a NetworkPolicy: deny by default, allow the listed networks and ports;
and a pool's pods take connections only from the activators, on the agent's port.

A NetworkPolicy matches addresses, not names, so `host` rules cannot be enforced by it; they
are denied like everything else and reported back (the controller turns them into an
`EgressEnforced=False` condition and a Warning event) rather than silently allowed. Ports are
TCP, and port 53 UDP too (`DNS_PORT`): DNS is allowed only where a rule lists its resolver.

Ingress (issue #11: only the activator can reach an agent): the pool's NetworkPolicy makes its
pods ingress-isolated, with one allowed peer, the activator pods (`ActivatorPeer`, from the
operator's settings), on `AGENT_PORT`. Other functions' pods, and anything else in the cluster,
cannot open a connection to an agent, whatever their own egress allows. This holds where the
cluster's CNI enforces NetworkPolicy (README, Threat model); the agent's token holds everywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ember.api.security_policy import DNS_PORT, Egress
from ember.resources import labels
from ember.resources.meta import managed_labels, owner_reference
from ember.resources.pool import ActivatorPeer


@dataclass(frozen=True, slots=True)
class EgressPlan:
    """The NetworkPolicy, and the host rules it could not express."""

    network_policy: dict[str, Any]
    unenforced_hosts: tuple[str, ...]


def egress_rules(egress: Egress) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    """NetworkPolicy egress rules for the allow-list, and the host names left out."""
    rules: list[dict[str, Any]] = []
    hosts: list[str] = []
    if egress.mode == "none":
        return rules, ()
    for allowed in egress.allow:
        if allowed.host is not None:
            hosts.append(allowed.host)
            continue
        rule: dict[str, Any] = {"to": [{"ipBlock": {"cidr": allowed.cidr}}]}
        if allowed.ports:
            rule["ports"] = [{"protocol": "TCP", "port": port} for port in allowed.ports]
            if DNS_PORT in allowed.ports:
                rule["ports"].append({"protocol": "UDP", "port": DNS_PORT})
        rules.append(rule)
    return rules, tuple(hosts)


def pool_network_policy(
    *,
    pool_id: str,
    namespace: str,
    owner_uid: str | None,
    egress: Egress,
    activators: ActivatorPeer | None = None,
    services: bool = False,
) -> EgressPlan:
    """The NetworkPolicy of a pool's pods, owned by the pool's Deployment: their egress (and, when
    their policy lists auxiliary `services`, the activators' services proxy), and ingress from
    `activators` only.

    Pods of a pool share one policy (its hash is in the pool key), so its rules hold from the
    moment a pod starts - before it is claimed, labelled with a Function and handed code.
    """
    peer = activators if activators is not None else ActivatorPeer()
    rules, hosts = egress_rules(egress)
    if services:
        rules.append(peer.services_egress_rule())
    body: dict[str, Any] = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": f"ember-pool-{pool_id}",
            "namespace": namespace,
            "labels": managed_labels(**{labels.POOL: pool_id, labels.COMPONENT: "pool"}),
            "ownerReferences": [
                owner_reference(kind="Deployment", name=f"ember-pool-{pool_id}", uid=owner_uid, api_version="apps/v1")
            ],
        },
        "spec": {
            "podSelector": {"matchLabels": {labels.POOL: pool_id}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [peer.ingress_rule()],
            "egress": rules,
        },
    }
    return EgressPlan(network_policy=body, unenforced_hosts=hosts)


def function_network_policy_name(function_name: str) -> str:
    """Name of a Function's NetworkPolicy."""
    return f"ember-fn-{function_name}"


def function_network_policy(
    *, function_name: str, namespace: str, function_uid: str | None, egress: Egress
) -> EgressPlan:
    """The NetworkPolicy limiting the egress of every pod of one Function, owned by it; not of its
    portions' pods (`labels.PORTION`), whose egress is their own policy's, in their pool's."""
    rules, hosts = egress_rules(egress)
    selector: Mapping[str, str] = {labels.FUNCTION: function_name}
    not_portions = [{"key": labels.PORTION, "operator": "DoesNotExist"}]
    body: dict[str, Any] = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": function_network_policy_name(function_name),
            "namespace": namespace,
            "labels": managed_labels(**{labels.FUNCTION: function_name}),
            "ownerReferences": [owner_reference(kind="Function", name=function_name, uid=function_uid)],
        },
        "spec": {
            "podSelector": {"matchLabels": dict(selector), "matchExpressions": not_portions},
            "policyTypes": ["Egress"],
            "egress": rules,
        },
    }
    return EgressPlan(network_policy=body, unenforced_hosts=hosts)
