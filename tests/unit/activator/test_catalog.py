"""The catalog's pure parts: what the registry should hold for stored Functions and Versions.

`plan` is checked on raw API objects (dicts as the API server returns them, with server-only
metadata), `apply_plan` on a real `Registry`: Versions come from the operator, never minted here.
"""

from __future__ import annotations

from typing import Any

import pytest

from ember.activator.catalog import Plan, apply_plan, plan
from ember.activator.config import ActivatorConfig
from ember.activator.errors import FunctionNotFound
from ember.activator.metrics import Metrics
from ember.activator.registry import Registry, cluster_specialize_request
from ember.activator.version_state import Phase
from ember.api.function import Function, FunctionSpec
from ember.api.security_policy import DEFAULT_POLICY, SecurityPolicySpec, policy_hash
from ember.api.version import code_hash
from ember.pods.base import VersionKey
from ember.pods.payload import PayloadError

NS = "team"
SPEC: dict[str, Any] = {"runtime": "python3.12", "handler": "main.handler", "code": {"inline": "def handler(e, c): 1"}}


def _function(name: str = "hello", uid: str = "uid-f", **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "ember.run/v1alpha1",
        "kind": "Function",
        "metadata": {
            "name": name,
            "namespace": NS,
            "uid": uid,
            "resourceVersion": "7",
            "generation": 2,
            "creationTimestamp": "2026-01-01T00:00:00Z",
            "managedFields": [{"manager": "kubectl"}],
        },
        "spec": {**SPEC, **spec},
        "status": {"latestVersion": 1},
    }


def _version(
    number: int, fn: str = "hello", owner_uid: str = "uid-f", policy: dict[str, Any] | None = None, **spec: Any
) -> dict[str, Any]:
    fspec = {**SPEC, **spec}
    frozen = SecurityPolicySpec.model_validate(policy or {})
    return {
        "apiVersion": "ember.run/v1alpha1",
        "kind": "Version",
        "metadata": {
            "name": f"{fn}-v{number}",
            "namespace": NS,
            "uid": f"uid-v{number}",
            "ownerReferences": [{"kind": "Function", "name": fn, "uid": owner_uid, "controller": True}],
        },
        "spec": {
            "functionName": fn,
            "number": number,
            "codeHash": code_hash(FunctionSpec.model_validate(fspec), frozen),
            "function": fspec,
            "policy": frozen.to_wire(),
        },
        "status": {"phase": "Ready"},
    }


def _keyed(*objs: dict[str, Any]) -> dict[tuple[str, str], dict[str, Any]]:
    return {(o["metadata"]["namespace"], o["metadata"]["name"]): o for o in objs}


def test_plan_pairs_versions_with_their_function_in_number_order() -> None:
    out = plan(_keyed(_function()), _keyed(_version(2, code={"inline": "x = 2"}), _version(1)))
    fp = out.functions[(NS, "hello")]
    assert [v.number for v in fp.versions] == [1, 2]
    assert fp.versions[1].version.spec.function.code.inline == "x = 2"
    assert out.problems == ()
    # The Version was made under the built-in default policy: its pool is keyed by it.
    assert fp.versions[0].pool.policy_hash == policy_hash(DEFAULT_POLICY)
    assert fp.versions[0].pool.runtime == "python3.12"


def test_plan_ignores_versions_of_other_or_earlier_functions() -> None:
    versions = _keyed(
        _version(1),
        _version(2, owner_uid="uid-of-a-deleted-hello"),  # leftover of an earlier Function of the name
        _version(1, fn="gone"),  # its Function was deleted; garbage collection follows
    )
    out = plan(_keyed(_function()), versions)
    assert list(out.functions) == [(NS, "hello")]
    assert [v.number for v in out.functions[(NS, "hello")].versions] == [1]


def test_plan_reports_invalid_objects_and_skips_them() -> None:
    bad_fn = _function("broken")
    bad_fn["spec"]["runtime"] = "cobol"
    bad_version = _version(1)
    bad_version["spec"]["codeHash"] = "md5:nope"
    no_policy = _version(2)
    del no_policy["spec"]["policy"]  # made before Versions froze their policy: refused, not guessed
    out = plan(_keyed(_function(), bad_fn), _keyed(bad_version, no_policy))
    assert list(out.functions) == [(NS, "hello")]
    assert out.functions[(NS, "hello")].versions == ()
    assert len(out.problems) == 3
    assert any(p.startswith(f"functions {NS}/broken: invalid") for p in out.problems)
    assert any(p.startswith(f"versions {NS}/hello-v1: invalid") for p in out.problems)
    assert any(p.startswith(f"versions {NS}/hello-v2: invalid") for p in out.problems)


def test_each_version_claims_from_the_pool_of_the_policy_it_was_made_under() -> None:
    # A policy edit reaches the activator as a new Version; the old one keeps its own pool.
    versions = _keyed(_version(1), _version(2, policy={"sandbox": "kata"}))
    out = plan(_keyed(_function()), versions)
    old, new = out.functions[(NS, "hello")].versions
    assert old.pool.policy_hash == policy_hash(DEFAULT_POLICY)
    assert (new.pool.sandbox, new.pool.policy_hash) == ("kata", policy_hash(SecurityPolicySpec(sandbox="kata")))
    assert old.code_hash != new.code_hash, "the policy is part of the content hash"


@pytest.fixture
def registry() -> Registry:
    return Registry(ActivatorConfig(), Metrics())


def test_apply_plan_takes_versions_from_the_api_and_never_mints(registry: Registry) -> None:
    functions = _keyed(_function())
    changes = apply_plan(registry, plan(functions, _keyed(_version(1))))
    assert changes == [f"Version 1 of {NS}/hello: loading"]
    fs = registry.get(NS, "hello")
    assert list(fs.versions) == [1]
    # The same picture again (a re-list, a status-only event) changes nothing.
    assert apply_plan(registry, plan(functions, _keyed(_version(1)))) == []
    # An edited Function alone makes no Version: only the operator's Version object does.
    edited = _keyed(_function(code={"inline": "x = 2"}))
    assert apply_plan(registry, plan(edited, _keyed(_version(1)))) == []
    assert list(fs.versions) == [1]
    versions = _keyed(_version(1), _version(2, code={"inline": "x = 2"}))
    assert apply_plan(registry, plan(edited, versions)) == [f"Version 2 of {NS}/hello: loading"]
    assert fs.latest_number == 2
    assert fs.versions[2].phase is Phase.LOADING
    assert fs.latest() == 2  # nothing Ready yet: the newest loading one


def test_apply_plan_keeps_traffic_where_it_is_until_the_new_version_is_ready(registry: Registry) -> None:
    apply_plan(registry, plan(_keyed(_function()), _keyed(_version(1))))
    fs = registry.get(NS, "hello")
    fs.versions[1].mark_ready()
    versions = _keyed(_version(1), _version(2, code={"inline": "x = 2"}))
    apply_plan(registry, plan(_keyed(_function(code={"inline": "x = 2"})), versions))
    assert registry.route(NS, "hello", None).key.number == 1
    fs.versions[2].mark_ready()
    assert registry.route(NS, "hello", None).key.number == 2


def test_apply_plan_follows_traffic_aliases_and_removal(registry: Registry) -> None:
    versions = _keyed(_version(1), _version(2, code={"inline": "x = 2"}))
    fn = _function(code={"inline": "x = 2"}, aliases={"live": {"version": 1}}, scaling={"maxScale": 3})
    apply_plan(registry, plan(_keyed(fn), versions))
    fs = registry.get(NS, "hello")
    assert fs.aliases["live"].version == 1
    assert fs.versions[1].autoscaler.params.max_scale == 3
    assert apply_plan(registry, Plan()) == [f"function {NS}/hello removed"]
    with pytest.raises(FunctionNotFound):
        registry.get(NS, "hello")


def test_versions_arriving_out_of_order_do_not_move_latest_back(registry: Registry) -> None:
    fn = _keyed(_function())
    apply_plan(registry, plan(fn, _keyed(_version(3))))
    apply_plan(registry, plan(fn, _keyed(_version(3), _version(1))))
    assert registry.get(NS, "hello").latest_number == 3


def test_apply_version_rejects_bad_input(registry: Registry) -> None:
    spec = FunctionSpec.model_validate(SPEC)
    pool = plan(_keyed(_function()), _keyed(_version(1))).functions[(NS, "hello")].versions[0].pool
    with pytest.raises(FunctionNotFound, match=f"{NS}/hello is not followed"):
        registry.apply_version(NS, "hello", 1, code_hash(spec, DEFAULT_POLICY), spec, pool)
    registry.follow(Function.model_validate({"metadata": {"name": "hello", "namespace": NS}, "spec": SPEC}))
    with pytest.raises(ValueError, match="number must be at least 1"):
        registry.apply_version(NS, "hello", 0, code_hash(spec, DEFAULT_POLICY), spec, pool)


def test_configmap_code_is_left_to_the_pod_source() -> None:
    spec = FunctionSpec.model_validate({**SPEC, "code": {"configMapRef": {"name": "src", "key": "main.py"}}})
    request = cluster_specialize_request(VersionKey(NS, "hello", 4), spec, code_hash(spec, DEFAULT_POLICY))
    assert request.payload["code"] is None
    assert request.payload["function"] == {"namespace": NS, "name": "hello", "version": 4}
    assert request.payload["handler"] == "main.handler"
    inline = cluster_specialize_request(VersionKey(NS, "hello", 1), FunctionSpec.model_validate(SPEC), "sha256:x")
    assert inline.payload["code"] == {"inline": SPEC["code"]["inline"]}


def test_path_code_fails_the_version_in_a_cluster(registry: Registry) -> None:
    path_spec = {**SPEC, "code": {"path": "./src"}}
    apply_plan(registry, plan(_keyed(_function(**path_spec)), _keyed(_version(1, **path_spec))))
    vs = registry.get(NS, "hello").versions[1]
    assert vs.phase is Phase.FAILED
    assert "spec.code.path is only available in local mode" in vs.message
    with pytest.raises(PayloadError):
        cluster_specialize_request(VersionKey(NS, "hello", 1), FunctionSpec.model_validate(path_spec), "sha256:x")


def test_versions_the_operator_deleted_are_forgotten_once_unreferenced_and_idle(registry: Registry) -> None:
    v2 = {"code": {"inline": "x = 2"}}
    fn = _keyed(_function(**v2))
    apply_plan(registry, plan(fn, _keyed(_version(1), _version(2, **v2))))
    fs = registry.get(NS, "hello")
    fs.versions[2].mark_ready()
    fs.versions[1].pod_starting()  # still getting a pod: kept until it has none
    assert apply_plan(registry, plan(fn, _keyed(_version(2, **v2)))) == []
    assert set(fs.versions) == {1, 2}
    fs.versions[1].pod_start_cancelled()
    changes = apply_plan(registry, plan(fn, _keyed(_version(2, **v2))))
    assert changes == [f"Version 1 of {NS}/hello: deleted by the operator, forgotten"]
    assert set(fs.versions) == {2}
    with pytest.raises(FunctionNotFound, match="has no Version 1"):
        registry.route(NS, "hello", "1")
    # The Version "latest" serves is never forgotten, even if its object is briefly missing from a list.
    assert apply_plan(registry, plan(fn, {})) == []
    assert set(fs.versions) == {2}


def test_a_missing_policy_forgets_no_version(registry: Registry) -> None:
    apply_plan(registry, plan(_keyed(_function()), _keyed(_version(1))))
    fn = _keyed(_function(securityPolicyRef={"name": "tight"}))
    assert apply_plan(registry, plan(fn, _keyed(_version(1)))) == []
    assert set(registry.get(NS, "hello").versions) == {1}


def test_a_versions_size_follows_the_recommendation_the_operator_stored(registry: Registry) -> None:
    functions = _keyed(_function())
    sized = _version(1, resources={"memoryMiB": 1024, "autoResize": True})
    apply_plan(registry, plan(functions, _keyed(sized)))
    vs = registry.get(NS, "hello").versions[1]
    assert vs.pool.memory_mib == 1024
    sized["status"]["recommendation"] = {"memoryMiB": 256, "outOfMemoryAtMiB": 128, "reason": "measured"}
    changes = apply_plan(registry, plan(functions, _keyed(sized)))
    assert changes == [f"Version 1 of {NS}/hello: new pods get 256 MiB"]
    assert vs.pool.memory_mib == 256
    assert vs.resources.reason == "autoResize: measured"
    sized["status"]["recommendation"] = {"memoryMiB": "garbled"}  # unreadable: as if none were stored
    assert apply_plan(registry, plan(functions, _keyed(sized))) == [f"Version 1 of {NS}/hello: new pods get 1024 MiB"]
