"""SecurityPolicy egress → NetworkPolicy: default deny, CIDR allow-list, host rules reported (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from ember.api.security_policy import Egress
from ember.resources.network_policy import function_network_policy, pool_network_policy
from ember.resources.pool import AGENT_PORT, SERVICES_PORT, ActivatorPeer


@pytest.mark.parametrize(
    ("egress", "rules", "hosts"),
    [
        pytest.param({}, [], (), id="default-deny"),
        pytest.param({"mode": "allowList", "allow": []}, [], (), id="empty-allow-list-denies"),
        pytest.param(
            {"mode": "allowList", "allow": [{"cidr": "10.0.0.0/8", "ports": [443, 8443]}]},
            [
                {
                    "to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
                    "ports": [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 8443}],
                }
            ],
            (),
            id="cidr-with-ports",
        ),
        pytest.param(
            {"mode": "allowList", "allow": [{"cidr": "10.96.0.10/32", "ports": [53]}]},
            [
                {
                    "to": [{"ipBlock": {"cidr": "10.96.0.10/32"}}],
                    "ports": [{"protocol": "TCP", "port": 53}, {"protocol": "UDP", "port": 53}],
                }
            ],
            (),
            id="port-53-is-dns-over-udp-too",
        ),
        pytest.param(
            {"mode": "allowList", "allow": [{"cidr": "192.168.1.0/24"}]},
            [{"to": [{"ipBlock": {"cidr": "192.168.1.0/24"}}]}],
            (),
            id="cidr-all-ports",
        ),
        pytest.param(
            {"mode": "allowList", "allow": [{"host": "api.example.com"}, {"cidr": "10.1.0.0/16", "ports": [80]}]},
            [{"to": [{"ipBlock": {"cidr": "10.1.0.0/16"}}], "ports": [{"protocol": "TCP", "port": 80}]}],
            ("api.example.com",),
            id="host-rules-reported-not-allowed",
        ),
    ],
)
def test_egress(egress: dict[str, Any], rules: list[dict[str, Any]], hosts: tuple[str, ...]) -> None:
    plan = function_network_policy(
        function_name="hello", namespace="ns1", function_uid="u1", egress=Egress.model_validate(egress)
    )
    spec = plan.network_policy["spec"]
    assert spec["policyTypes"] == ["Egress"]
    assert spec["egress"] == rules
    assert spec["podSelector"] == {
        "matchLabels": {"ember.run/function": "hello"},
        "matchExpressions": [{"key": "ember.run/portion", "operator": "DoesNotExist"}],  # not its portions' pods
    }
    assert plan.unenforced_hosts == hosts
    assert plan.network_policy["metadata"]["ownerReferences"][0]["uid"] == "u1"


def test_pool_network_policy_selects_the_pool_and_is_owned_by_its_deployment() -> None:
    egress = Egress.model_validate({"mode": "allowList", "allow": [{"cidr": "10.0.0.0/8"}]})
    plan = pool_network_policy(pool_id="abc", namespace="ns1", owner_uid="d-uid", egress=egress)
    body = plan.network_policy
    assert body["metadata"]["name"] == "ember-pool-abc"
    assert body["spec"]["podSelector"] == {"matchLabels": {"ember.run/pool": "abc"}}
    assert body["spec"]["egress"] == [{"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}]}]
    (owner,) = body["metadata"]["ownerReferences"]
    assert (owner["apiVersion"], owner["kind"], owner["uid"]) == ("apps/v1", "Deployment", "d-uid")


def test_a_pools_agents_take_connections_from_the_activators_only() -> None:
    activators = ActivatorPeer(namespace="edge", pod_labels=(("app.kubernetes.io/name", "ember-activator"),))
    plan = pool_network_policy(pool_id="abc", namespace="ns1", owner_uid="d", egress=Egress(), activators=activators)
    spec = plan.network_policy["spec"]
    assert spec["policyTypes"] == ["Ingress", "Egress"]  # ingress-isolated: everything else is refused
    assert spec["ingress"] == [
        {
            "from": [
                {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "edge"}},
                    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "ember-activator"}},
                }
            ],
            "ports": [{"protocol": "TCP", "port": AGENT_PORT}],
        }
    ]
    assert spec["egress"] == []  # egress none: nothing, DNS included
    # without settings, the chart's default activators in ember-system
    default = pool_network_policy(pool_id="abc", namespace="ns1", owner_uid="d", egress=Egress())
    (rule,) = default.network_policy["spec"]["ingress"]
    assert rule["from"][0]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "ember-system"}}


def test_a_pool_with_auxiliary_services_may_reach_the_activators_services_proxy_only() -> None:
    activators = ActivatorPeer(namespace="edge", pod_labels=(("app.kubernetes.io/name", "ember-activator"),))
    plan = pool_network_policy(
        pool_id="abc", namespace="ns1", owner_uid="d", egress=Egress(), activators=activators, services=True
    )
    assert plan.network_policy["spec"]["egress"] == [
        {
            "to": [
                {
                    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "edge"}},
                    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "ember-activator"}},
                }
            ],
            "ports": [{"protocol": "TCP", "port": SERVICES_PORT}],
        }
    ]
