"""Pool key → generic pool Deployment: restricted security, RuntimeClass, labels, probes (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from ember.api.security_policy import SecurityPolicySpec
from ember.resources.pool import PoolSpec, cpu_millicores, pool_deployment, pool_id

GVISOR = SecurityPolicySpec()


def _pool(policy: SecurityPolicySpec = GVISOR, **kw: Any) -> PoolSpec:
    args: dict[str, Any] = {
        "namespace": "ns1",
        "runtime": "python3.12",
        "memory_mib": 256,
        "policy": policy,
        "policy_hash": "p" * 64,
        "image": "registry.example/ember-python3.12:1",
        "replicas": 2,
    }
    args.update(kw)
    return PoolSpec(**args)


def test_pool_pods_run_restricted() -> None:
    pod = pool_deployment(_pool())["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    ctx = container["securityContext"]
    assert ctx["runAsNonRoot"] is True
    assert ctx["readOnlyRootFilesystem"] is True
    assert ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": "agent"}
    assert {m["mountPath"] for m in container["volumeMounts"]} == {"/tmp", "/var/ember/code"}
    assert all("emptyDir" in v for v in pod["volumes"])
    assert container["image"] == "registry.example/ember-python3.12:1"


@pytest.mark.parametrize(
    ("policy", "runtime_class"),
    [
        pytest.param(SecurityPolicySpec(sandbox="gvisor"), "gvisor", id="gvisor"),
        pytest.param(SecurityPolicySpec(sandbox="kata"), "kata", id="kata"),
        pytest.param(SecurityPolicySpec(sandbox="none", allow_unsandboxed=True), None, id="none-uses-default"),
        pytest.param(SecurityPolicySpec(sandbox="gvisor", runtime_class_name="gvisor-x"), "gvisor-x", id="override"),
    ],
)
def test_runtime_class_comes_from_policy(policy: SecurityPolicySpec, runtime_class: str | None) -> None:
    pod = pool_deployment(_pool(policy))["spec"]["template"]["spec"]
    assert pod.get("runtimeClassName") == runtime_class


@pytest.mark.parametrize(
    ("policy", "limit"),
    [
        pytest.param(SecurityPolicySpec(), "256", id="gvisor-default"),
        pytest.param(SecurityPolicySpec.model_validate({"limits": {"pids": 64}}), "64", id="gvisor"),
        pytest.param(SecurityPolicySpec.model_validate({"sandbox": "kata", "limits": {"pids": 64}}), "64", id="kata"),
        pytest.param(
            SecurityPolicySpec.model_validate({"sandbox": "none", "allowUnsandboxed": True, "limits": {"pids": 64}}),
            None,
            id="none-shares-the-node-kernel",
        ),
    ],
)
def test_the_pids_limit_is_the_agents_where_the_pod_has_a_kernel_of_its_own(
    policy: SecurityPolicySpec, limit: str | None
) -> None:
    (container,) = pool_deployment(_pool(policy))["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env.get("EMBER_AGENT_PIDS_LIMIT") == limit


def test_selector_labels_generic_pods_of_the_pool() -> None:
    spec = _pool()
    body = pool_deployment(spec)
    selector = body["spec"]["selector"]["matchLabels"]
    assert selector == {"ember.run/pool": spec.id, "ember.run/state": "generic"}
    pod_labels = body["spec"]["template"]["metadata"]["labels"]
    assert selector.items() <= pod_labels.items()
    assert body["metadata"]["name"] == f"ember-pool-{spec.id}"
    assert body["spec"]["replicas"] == 2


@pytest.mark.parametrize(
    ("change", "same"),
    [
        pytest.param({}, True, id="equal-keys"),
        pytest.param({"runtime": "nodejs20"}, False, id="runtime"),
        pytest.param({"sandbox": "kata"}, False, id="sandbox"),
        pytest.param({"memory_mib": 512}, False, id="memory"),
        pytest.param({"policy_hash": "q"}, False, id="policy"),
    ],
)
def test_pool_id_changes_with_every_part_of_the_key(change: dict[str, Any], same: bool) -> None:
    key: dict[str, Any] = {"runtime": "python3.12", "sandbox": "gvisor", "memory_mib": 128, "policy_hash": "p"}
    assert (pool_id(**key) == pool_id(**{**key, **change})) is same


def test_tmp_size_and_writable_root_follow_policy() -> None:
    policy = SecurityPolicySpec.model_validate({"filesystem": {"readOnlyRoot": False, "tmpSizeMiB": 32}})
    pod = pool_deployment(_pool(policy))["spec"]["template"]["spec"]
    assert pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"] is False
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "32Mi"}} in pod["volumes"]


@pytest.mark.parametrize(
    ("memory", "cpu"),
    [pytest.param(64, 50, id="floor"), pytest.param(1769, 1000, id="one-cpu"), pytest.param(3538, 2000, id="two")],
)
def test_cpu_follows_memory(memory: int, cpu: int) -> None:
    assert cpu_millicores(memory) == cpu


def test_negative_replicas_rejected() -> None:
    with pytest.raises(ValueError, match="replicas must not be negative"):
        pool_deployment(_pool(replicas=-1))


@pytest.mark.parametrize(
    ("memory", "request_m", "limit_m"),
    [pytest.param(128, 72, 1000, id="share-bursts-to-one-cpu"), pytest.param(3538, 2000, 2000, id="share-above-burst")],
)
def test_cpu_request_is_the_share_and_the_limit_allows_a_burst(memory: int, request_m: int, limit_m: int) -> None:
    pool = _pool(SecurityPolicySpec(), memory_mib=memory)
    (container,) = pool_deployment(pool)["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["requests"] == {"memory": f"{memory}Mi", "cpu": f"{request_m}m"}
    assert container["resources"]["limits"] == {"memory": f"{memory}Mi", "cpu": f"{limit_m}m"}


def test_no_burst_puts_the_cpu_limit_at_the_share() -> None:
    (container,) = pool_deployment(_pool(SecurityPolicySpec(), memory_mib=128, cpu_burst_millicores=0))["spec"][
        "template"
    ]["spec"]["containers"]
    assert container["resources"]["limits"]["cpu"] == container["resources"]["requests"]["cpu"] == "72m"


def test_a_cpu_bound_of_its_own_is_request_and_limit_in_a_pool_of_its_own() -> None:
    (container,) = pool_deployment(_pool(cpu_millicores=250))["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["requests"]["cpu"] == "250m"
    assert container["resources"]["limits"]["cpu"] == "250m"
    assert _pool(cpu_millicores=250).id != _pool().id
    assert _pool(cpu_millicores=250).id != _pool(cpu_millicores=500).id
    assert _pool().id == pool_id(runtime="python3.12", sandbox="gvisor", memory_mib=256, policy_hash="p" * 64)
