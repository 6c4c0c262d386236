"""The operator against a real kube-apiserver: Function → Versions, code ConfigMaps, pools, conditions.

Runs `python -m ember.operator_main` as a subprocess (kopf, kubernetes_asyncio) against the
session's etcd + kube-apiserver. No kube-controller-manager runs in this tier, so nothing is
garbage-collected by owner references and Deployments get no pods: these tests check what the
operator itself creates, keeps and deletes; pods, GC and invocation are the cluster tier's. A
Version is Ready only once a pod has loaded it: `Ember.serve` writes the specialized, ready pod an
activator and a kubelet would leave (or the load-error mark an activator writes, through the real
`KubernetesPodSource.report_load_failure`).
"""

from __future__ import annotations

from typing import Any

from kubernetes import client
from tests.apiserver.operator_harness import (  # the fixtures are used by name
    Ember,
    OperatorProcess,
    condition,
    crds,
    ember,
    eventually,
    hello_function,
    ns,
    operator,
    ready_function,
)

__all__ = ["crds", "ember", "ns", "operator"]


def _with_condition(ember: Ember, name: str, type_: str, status: str) -> dict[str, Any] | None:
    fn = ember.get("functions", name)
    return fn if condition(fn, type_).get("status") == status else None


def test_function_gets_a_version_code_configmap_pool_and_ready_conditions(
    ember: Ember, operator: OperatorProcess
) -> None:
    ember.create("functions", hello_function())
    version = eventually(lambda: ember.get("versions", "hello-v1"), what="Version 1")
    assert condition(version, "Loaded").get("status") in (None, "Unknown"), "not Ready before a pod loaded it"
    assert condition(ember.get("functions", "hello"), "Ready").get("status") != "True"
    ember.serve("hello", 1)
    fn = eventually(lambda: ready_function(ember, "hello"), what="Function hello Ready")
    status = fn["status"]
    assert (status["latestVersion"], status["readyVersion"]) == (1, 1)
    assert status["url"] == f"http://activator.test:8080/v1/namespaces/{ember.ns}/functions/hello/invoke"
    assert not fn["metadata"].get("finalizers"), "no finalizers: Functions stay deletable without the operator"
    assert not ember.get("versions", "hello-v1")["metadata"].get("finalizers")
    for type_ in ("Ready", "VersionReady", "PolicyResolved", "EgressEnforced"):
        assert condition(fn, type_)["status"] == "True", type_
        assert condition(fn, type_)["observedGeneration"] == fn["metadata"]["generation"]

    version = ember.get("versions", "hello-v1")
    assert version is not None
    assert version["metadata"]["labels"]["ember.run/function"] == "hello"
    assert version["metadata"]["labels"]["ember.run/version"] == "1"
    (owner,) = version["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("Function", fn["metadata"]["uid"], True)
    assert version["status"]["phase"] == "Ready"
    assert condition(version, "CodeReady")["reason"] == "CodeStored"
    assert condition(version, "Loaded")["reason"] == "Loaded"
    assert version["metadata"]["annotations"]["ember.run/loaded"] == version["spec"]["codeHash"]
    assert version["spec"]["policy"]["sandbox"] == "gvisor", "the built-in default policy is frozen into it"

    cm = ember.core.read_namespaced_config_map("hello-v1-code", ember.ns)
    assert cm.immutable is True
    assert cm.data == {"main.py": "def handler(event, context):\n    return 'hi'\n"}
    assert cm.metadata.owner_references[0].uid == version["metadata"]["uid"]

    (pool,) = ember.pools().values()
    pod = pool.spec.template.spec
    assert pod.runtime_class_name == "gvisor"
    assert pod.automount_service_account_token is False
    assert pod.containers[0].security_context.read_only_root_filesystem is True
    assert pod.containers[0].security_context.capabilities.drop == ["ALL"]
    assert pool.metadata.owner_references[0].uid == fn["metadata"]["uid"]

    netpol = ember.net.read_namespaced_network_policy("ember-fn-hello", ember.ns)
    assert netpol.spec.policy_types == ["Egress"]
    assert not netpol.spec.egress
    pool_netpol = ember.net.read_namespaced_network_policy(pool.metadata.name, ember.ns)
    assert pool_netpol.spec.pod_selector.match_labels == {"ember.run/pool": pool.metadata.labels["ember.run/pool"]}
    assert pool_netpol.metadata.owner_references[0].uid == pool.metadata.uid
    # the pool's agents take connections from the activator pods only, on the agent's port
    assert pool_netpol.spec.policy_types == ["Ingress", "Egress"]
    (ingress,) = pool_netpol.spec.ingress
    (peer,) = ingress._from
    assert peer.namespace_selector.match_labels == {"kubernetes.io/metadata.name": "ember-system"}
    assert peer.pod_selector.match_labels == {"app.kubernetes.io/name": "ember-activator"}
    assert [(p.protocol, p.port) for p in ingress.ports] == [("TCP", 8080)]
    assert not pool_netpol.spec.egress

    reasons = eventually(
        lambda: (
            {e.reason for e in ember.events("hello")} >= {"VersionCreated", "PoolCreated"}
            and {e.reason for e in ember.events("hello")}
        ),
        what="VersionCreated and PoolCreated events",
    )
    assert "VersionCreated" in reasons


def test_versions_follow_code_and_config_changes_not_scaling_or_metadata(
    ember: Ember, operator: OperatorProcess
) -> None:
    ember.create("functions", hello_function())
    ember.serve("hello", 1)
    eventually(lambda: ready_function(ember, "hello"), what="hello Ready")

    scaled = ember.patch("functions", "hello", {"spec": {"scaling": {"maxScale": 3, "minScale": 1}}})
    labelled = ember.patch("functions", "hello", {"metadata": {"labels": {"team": "a"}}})
    assert labelled["metadata"]["generation"] == scaled["metadata"]["generation"]
    eventually(
        lambda: ready_function(ember, "hello", generation=scaled["metadata"]["generation"]), what="scaled observed"
    )
    assert set(ember.versions("hello")) == {1}

    ember.patch("functions", "hello", {"spec": {"env": {"GREETING": "hey"}}})
    eventually(lambda: set(ember.versions("hello")) == {1, 2}, what="Version 2 after an env change")
    ember.patch("functions", "hello", {"spec": {"code": {"inline": "def handler(e, c):\n    return 2\n"}}})
    eventually(lambda: 3 in ember.versions("hello"), what="Version 3 after a code change")
    ember.serve("hello", 3)
    fn = eventually(
        lambda: (f := ready_function(ember, "hello")) and f["status"]["latestVersion"] == 3 and f,
        what="Version 3 ready",
    )
    assert fn["status"]["readyVersion"] == 3
    assert ember.get("versions", "hello-v3")["spec"]["function"]["env"] == {"GREETING": "hey"}


def test_retention_keeps_referenced_and_last_n_and_collects_the_rest(ember: Ember, operator: OperatorProcess) -> None:
    ember.create("functions", hello_function())
    ember.serve("hello", 1)
    eventually(lambda: ready_function(ember, "hello"), what="hello Ready")
    ember.patch("functions", "hello", {"spec": {"traffic": [{"version": 1, "percent": 100}]}})
    for n in range(2, 5):
        ember.patch("functions", "hello", {"spec": {"code": {"inline": f"def handler(e, c):\n    return {n}\n"}}})
        eventually(lambda n=n: n in ember.versions("hello"), what=f"Version {n}")
    # keep_versions=2: 3 and 4 are the last two; 1 is pinned by traffic; 2 goes.
    eventually(lambda: set(ember.versions("hello")) == {1, 3, 4}, what="Versions {1, 3, 4} kept")
    eventually(lambda: "hello-v2-code" not in ember.configmap_names(), what="code of Version 2 deleted")
    assert {"hello-v1-code", "hello-v3-code", "hello-v4-code"} <= ember.configmap_names()

    # Version 1 is also the only one loaded so far (the ready one): it stays until another is.
    ember.patch("functions", "hello", {"spec": {"traffic": None, "aliases": {"stable": {"version": 3}}}})
    eventually(lambda: ember.get("functions", "hello")["status"].get("readyVersion") == 1, what="v1 the ready one")
    assert 1 in ember.versions("hello")
    ember.serve("hello", 4)
    eventually(lambda: set(ember.versions("hello")) == {3, 4}, what="unpinned Version 1 collected")
    assert any(e.reason == "VersionDeleted" for e in ember.events("hello"))


def test_missing_policy_then_created_resolves(ember: Ember, operator: OperatorProcess) -> None:
    ember.create("functions", hello_function(securityPolicyRef={"name": "strict"}))
    fn = eventually(
        lambda: (
            (f := ember.get("functions", "hello")) and condition(f, "PolicyResolved").get("status") == "False" and f
        ),
        what="PolicyResolved False",
    )
    assert condition(fn, "PolicyResolved")["reason"] == "SecurityPolicyMissing"
    assert "'strict'" in condition(fn, "PolicyResolved")["message"]
    assert condition(fn, "Ready")["status"] == "False"
    assert ember.pools() == {}
    assert fn["status"].get("latestVersion") is None, "a Version freezes its policy: none until it exists"
    assert ember.versions("hello") == {}

    ember.create("securitypolicies", {"kind": "SecurityPolicy", "metadata": {"name": "strict"}, "spec": {}})
    eventually(lambda: 1 in ember.versions("hello"), what="Version 1 once the policy exists")
    assert ember.versions("hello")[1]["spec"]["policyName"] == "strict"
    ember.serve("hello", 1)
    eventually(lambda: ready_function(ember, "hello"), what="hello Ready once the policy exists")
    assert len(ember.pools()) == 1


def test_missing_runtime_class_is_a_clear_condition_not_stuck_pods(
    ember: Ember, operator: OperatorProcess, crds: Any
) -> None:
    runtime_class = f"kata-{ember.ns}"
    spec = {"sandbox": "kata", "runtimeClassName": runtime_class}
    ember.create("securitypolicies", {"kind": "SecurityPolicy", "metadata": {"name": "kata"}, "spec": spec})
    ember.create("functions", hello_function(securityPolicyRef={"name": "kata"}))
    fn = eventually(
        lambda: (
            (f := ember.get("functions", "hello")) and condition(f, "PolicyResolved").get("status") == "False" and f
        ),
        what="PolicyResolved False",
    )
    assert condition(fn, "PolicyResolved")["reason"] == "RuntimeClassMissing"
    assert f"RuntimeClass '{runtime_class}'" in condition(fn, "PolicyResolved")["message"]
    assert ember.pools() == {}
    policy = eventually(
        lambda: (p := ember.get("securitypolicies", "kata")) and p.get("status", {}).get("policyHash") and p,
        what="SecurityPolicy status",
    )
    assert condition(policy, "Ready")["reason"] == "RuntimeClassMissing"

    # Installing the sandbox later is enough: the RuntimeClass appearing re-reconciles the Function.
    node = client.NodeV1Api(crds)
    node.create_runtime_class({"metadata": {"name": runtime_class}, "handler": "kata"})
    try:
        eventually(lambda: ember.pools(), what="the pool once the RuntimeClass exists")
        ember.serve("hello", 1)
        eventually(lambda: ready_function(ember, "hello"), what="Ready once the RuntimeClass exists")
        assert ember.pools()[next(iter(ember.pools()))].spec.template.spec.runtime_class_name == runtime_class
    finally:
        node.delete_runtime_class(runtime_class)


def test_policy_edit_is_a_new_version_and_the_old_pool_goes_once_it_is_ready(
    ember: Ember, operator: OperatorProcess
) -> None:
    ember.create("securitypolicies", {"kind": "SecurityPolicy", "metadata": {"name": "p"}, "spec": {}})
    ember.create("functions", hello_function(securityPolicyRef={"name": "p"}))
    ember.serve("hello", 1)
    eventually(lambda: ready_function(ember, "hello"), what="hello Ready")
    (old_pool,) = ember.pools()

    ember.patch(
        "securitypolicies",
        "p",
        {
            "spec": {
                "egress": {
                    "mode": "allowList",
                    "allow": [{"cidr": "10.0.0.0/8", "ports": [443]}, {"host": "api.example.com"}],
                }
            }
        },
    )
    v2 = eventually(lambda: ember.versions("hello").get(2), what="Version 2 for the policy edit")
    assert v2["spec"]["policy"]["egress"]["mode"] == "allowList"
    assert ember.versions("hello")[1]["spec"]["policy"]["egress"]["mode"] == "none", "Version 1 keeps its policy"
    eventually(lambda: set(ember.pools()) - {old_pool}, what="a new pool for the new policy hash")
    assert old_pool in ember.pools(), "Version 1 serves, from its own pool, while Version 2 loads"
    # The status is written after the reconcile that made the pool: poll for it.
    eventually(
        lambda: ((ember.get("functions", "hello") or {}).get("status") or {}).get("latestVersion") == 2,
        what="latestVersion 2",
    )
    assert ember.get("functions", "hello")["status"]["readyVersion"] == 1

    ember.serve("hello", 2)
    eventually(lambda: old_pool not in ember.pools(), what="the old pool deleted once Version 2 is ready")
    # the operator deletes the pool's NetworkPolicy right after the pool (its pods go first)
    eventually(
        lambda: old_pool not in {n.metadata.name for n in ember.net.list_namespaced_network_policy(ember.ns).items},
        what="the old pool's NetworkPolicy deleted with it",
    )
    policies = {n.metadata.name for n in ember.net.list_namespaced_network_policy(ember.ns).items}
    (new_pool,) = ember.pools()
    assert new_pool in policies
    fn = eventually(
        lambda: (
            (f := ember.get("functions", "hello")) and condition(f, "EgressEnforced").get("status") == "False" and f
        ),
        what="EgressEnforced False for host rules",
    )
    assert "api.example.com" in condition(fn, "EgressEnforced")["message"]
    netpol = ember.net.read_namespaced_network_policy("ember-fn-hello", ember.ns)
    (rule,) = netpol.spec.egress
    assert rule.to[0].ip_block.cidr == "10.0.0.0/8"
    assert rule.ports[0].port == 443


def test_configmap_code_is_snapshotted_and_a_change_makes_a_version(ember: Ember, operator: OperatorProcess) -> None:
    ember.core.create_namespaced_config_map(
        ember.ns, {"metadata": {"name": "src"}, "data": {"main.py": "def handler(e, c):\n    return 1\n"}}
    )
    ember.create("functions", hello_function(code={"configMapRef": {"name": "src"}}))
    ember.serve("hello", 1)
    eventually(lambda: ready_function(ember, "hello"), what="hello Ready")
    snap = ember.core.read_namespaced_config_map("hello-v1-code", ember.ns)
    assert snap.data == {"main.py": "def handler(e, c):\n    return 1\n"}

    ember.core.patch_namespaced_config_map("src", ember.ns, {"data": {"main.py": "def handler(e, c):\n    return 2\n"}})
    eventually(lambda: 2 in ember.versions("hello"), what="Version 2 after the ConfigMap changed")
    eventually(lambda: "hello-v2-code" in ember.configmap_names(), what="snapshot of Version 2")
    assert ember.core.read_namespaced_config_map("hello-v1-code", ember.ns).data == snap.data
    assert ember.core.read_namespaced_config_map("hello-v2-code", ember.ns).data["main.py"].endswith("return 2\n")


def test_missing_code_configmap_is_reported(ember: Ember, operator: OperatorProcess) -> None:
    ember.create("functions", hello_function(code={"configMapRef": {"name": "nope"}}))
    fn = eventually(
        lambda: _with_condition(ember, "hello", "VersionReady", "False"),
        what="VersionReady False",
    )
    assert condition(fn, "VersionReady")["reason"] == "CodeMissing"
    assert "'nope'" in condition(fn, "VersionReady")["message"]
    assert ember.versions("hello") == {}


def _ready_pods(ember: Ember, version: str) -> int | None:
    status = (ember.get("versions", version) or {}).get("status") or {}
    return status.get("readyPods")


def test_version_status_counts_its_ready_specialized_pods(ember: Ember, operator: OperatorProcess) -> None:
    ember.create("functions", hello_function())
    eventually(lambda: ember.get("versions", "hello-v1"), what="Version 1")
    # What activators make: specialized pods of Version 1, one not ready yet, one only claimed.
    ember.version_pod("hello-a", function="hello", version="1", state="specialized", ready=True)
    ember.version_pod("hello-b", function="hello", version="1", state="specialized", ready=False)
    ember.version_pod("hello-c", function="hello", version="1", state="claimed", ready=True)
    # Bad labels from elsewhere are ignored, not fatal: no such Version, and no Version number at all.
    ember.version_pod("hello-x", function="hello", version="7", state="specialized", ready=True)
    ember.version_pod("hello-y", function="hello", version="one", state="specialized", ready=True)
    eventually(lambda: _ready_pods(ember, "hello-v1") == 1, what="readyPods 1")

    ember.core.patch_namespaced_pod_status(
        "hello-b", ember.ns, {"status": {"conditions": [{"type": "Ready", "status": "True"}]}}
    )
    eventually(lambda: _ready_pods(ember, "hello-v1") == 2, what="readyPods 2 once hello-b is ready")
    # Unscheduled pods go at once with no grace period (no kubelet in this tier).
    ember.core.delete_namespaced_pod("hello-a", ember.ns, grace_period_seconds=0)
    ember.core.delete_namespaced_pod("hello-b", ember.ns, grace_period_seconds=0)
    eventually(lambda: _ready_pods(ember, "hello-v1") == 0, what="readyPods 0 after the pods are deleted")
    # Loaded once is loaded: a Version scaled to zero stays Ready (the operator's loaded mark).
    assert ember.get("versions", "hello-v1")["status"]["phase"] == "Ready"
    assert ready_function(ember, "hello") is not None
    assert "not a Version number" in operator.log_tail(200)
    assert operator.alive()
