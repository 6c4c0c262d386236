"""API models: wire round trips, content hashes of Versions, policy helpers."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from ember.api import Function, SecurityPolicy, Version, code_hash
from ember.api.security_policy import DEFAULT_POLICY, SecurityPolicySpec
from ember.api.version import version_name
from ember.files import load_manifests

ROOT = Path(__file__).parents[3]


def _hello() -> Function:
    (fn,) = load_manifests(ROOT / "examples" / "hello-python.yaml")
    assert isinstance(fn, Function)
    return fn


def test_wire_round_trip_is_lossless() -> None:
    fn = _hello()
    again = Function.model_validate(fn.to_wire())
    assert again == fn
    wire = fn.to_wire()
    assert wire["spec"]["timeoutSeconds"] == 3
    assert "async" in wire["spec"]
    assert "status" not in wire


def test_code_hash_is_stable_and_content_addressed() -> None:
    spec = _hello().spec
    assert code_hash(spec, DEFAULT_POLICY) == code_hash(spec.model_copy(), DEFAULT_POLICY)
    assert code_hash(spec, DEFAULT_POLICY).startswith("sha256:")
    changed_code = spec.model_copy(update={"code": spec.code.model_copy(update={"inline": "x = 1"})})
    assert code_hash(changed_code, DEFAULT_POLICY) != code_hash(spec, DEFAULT_POLICY)
    changed_env = spec.model_copy(update={"env": {"A": "1"}})
    assert code_hash(changed_env, DEFAULT_POLICY) != code_hash(spec, DEFAULT_POLICY)


def test_scaling_and_traffic_do_not_change_the_hash() -> None:
    spec = _hello().spec
    rescaled = spec.model_copy(update={"scaling": spec.scaling.model_copy(update={"max_scale": 99})})
    assert code_hash(rescaled, DEFAULT_POLICY) == code_hash(spec, DEFAULT_POLICY)


def test_the_effective_policy_is_part_of_the_hash() -> None:
    # A policy edit is a new Version in both modes: the operator and local mode hash it alike.
    spec = _hello().spec
    kata = SecurityPolicySpec(sandbox="kata")
    assert code_hash(spec, kata) != code_hash(spec, DEFAULT_POLICY)
    assert code_hash(spec, kata) == code_hash(spec, SecurityPolicySpec.model_validate(kata.to_wire()))


def test_referenced_code_digest_is_part_of_the_hash() -> None:
    spec = _hello().spec
    assert code_hash(spec, DEFAULT_POLICY, "sha256:aa") != code_hash(spec, DEFAULT_POLICY, "sha256:bb")


def test_version_holds_a_frozen_copy() -> None:
    fn = _hello()
    version = Version.model_validate(
        {
            "metadata": {"name": version_name("hello-python", 1)},
            "spec": {
                "functionName": "hello-python",
                "number": 1,
                "codeHash": code_hash(fn.spec, DEFAULT_POLICY),
                "function": fn.spec.to_wire(),
                "policy": DEFAULT_POLICY.to_wire(),
            },
        }
    )
    assert version.spec.function == fn.spec
    assert version.spec.policy == DEFAULT_POLICY
    with pytest.raises(ValidationError):
        version.spec.number = 2  # type: ignore[misc]


def test_policy_runtime_class_override() -> None:
    policy = SecurityPolicy.model_validate(
        {"metadata": {"name": "p"}, "spec": {"sandbox": "kata", "runtimeClassName": "kata-qemu"}}
    )
    assert policy.spec.runtime_class == "kata-qemu"
    unsandboxed = SecurityPolicy.model_validate(
        {"metadata": {"name": "p"}, "spec": {"sandbox": "none", "allowUnsandboxed": True}}
    )
    assert unsandboxed.spec.runtime_class is None
