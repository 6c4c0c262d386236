"""Manifest loading: examples validate; each bad manifest fails naming its field and what is allowed.

Covers the pydantic side of validation. The same rules as CEL, enforced by a real API server,
are tested in tests/apiserver/ and tests/cluster/.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from ember.api import Function, SecurityPolicy
from ember.api.manifests import ManifestError, parse_resource
from ember.files import load_manifests

ROOT = Path(__file__).parents[3]
BAD = Path(__file__).parent / "bad"


def _expected(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    assert first.startswith("# expect: "), f"{path} must start with '# expect: <message>'"
    return first.removeprefix("# expect: ")


def test_every_example_validates() -> None:
    resources = load_manifests(ROOT / "examples")
    kinds = {(type(r).__name__, r.metadata.name) for r in resources}
    assert ("Function", "hello-python") in kinds
    assert ("Function", "hello-node") in kinds
    assert ("Function", "greeter") in kinds
    assert ("SecurityPolicy", "strict") in kinds


@pytest.mark.parametrize("path", sorted(BAD.glob("*.yaml")), ids=lambda p: p.stem)
def test_bad_manifest_names_its_field(path: Path) -> None:
    with pytest.raises(ManifestError) as caught:
        load_manifests(path)
    text = str(caught.value)
    assert _expected(path) in text
    assert all(str(path) in str(problem) for problem in caught.value.problems)


def test_every_problem_is_reported_at_once() -> None:
    document = {
        "apiVersion": "ember.run/v1alpha1",
        "kind": "Function",
        "metadata": {"name": "x"},
        "spec": {
            "runtime": "ruby",
            "handler": "main.handler",
            "code": {"inline": "x"},
            "timeoutSeconds": 0,
            "concurrency": "many",
            "colour": "blue",
        },
    }
    with pytest.raises(ManifestError) as caught:
        parse_resource(document, "f.yaml")
    fields = [p.field for p in caught.value.problems]
    assert fields == ["spec.runtime", "spec.timeoutSeconds", "spec.concurrency", "spec.colour"]


def test_unknown_fields_are_rejected_not_dropped() -> None:
    document = {
        "apiVersion": "ember.run/v1alpha1",
        "kind": "SecurityPolicy",
        "metadata": {"name": "p"},
        "spec": {"sandbox": "gvisor", "egres": {"mode": "none"}},
    }
    with pytest.raises(ManifestError, match=r"spec\.egres: unknown field \(allowed here: .*egress"):
        parse_resource(document)


def test_wrong_api_version_is_named() -> None:
    with pytest.raises(ManifestError, match=r"apiVersion: must be ember.run/v1alpha1 \(got 'v1'\)"):
        parse_resource({"apiVersion": "v1", "kind": "Function"})


def test_duplicate_names_in_a_directory_are_reported(tmp_path: Path) -> None:
    text = (ROOT / "examples" / "hello-python.yaml").read_text()
    (tmp_path / "a.yaml").write_text(text)
    (tmp_path / "b.yaml").write_text(text)
    with pytest.raises(ManifestError, match="is also defined in"):
        load_manifests(tmp_path)


def test_other_kubernetes_objects_beside_manifests_are_skipped(tmp_path: Path) -> None:
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n")
    (tmp_path / "fn.yaml").write_text((ROOT / "examples" / "hello-python.yaml").read_text())
    assert [r.metadata.name for r in load_manifests(tmp_path)] == ["hello-python"]


def test_missing_path_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="no such file or directory"):
        load_manifests(tmp_path / "nope")


def test_defaults_are_applied() -> None:
    (fn,) = load_manifests(ROOT / "examples" / "hello-python.yaml")
    assert isinstance(fn, Function)
    assert fn.spec.concurrency == 1
    assert fn.spec.resources.memory_mib == 128
    assert fn.spec.async_.max_retries == 2
    assert fn.metadata.namespace == "default"
    (policy,) = load_manifests(ROOT / "examples" / "strict-policy.yaml")
    assert isinstance(policy, SecurityPolicy)
    assert policy.spec.runtime_class == "gvisor"
