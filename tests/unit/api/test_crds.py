"""Generated CRDs: crds/ matches the models byte for byte and the schemas are structural."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ember.api import crd
from ember.cli import main

ROOT = Path(__file__).parents[3]


@pytest.mark.parametrize("model", crd.RESOURCES, ids=lambda m: m.KIND)
def test_crds_directory_matches_the_models(model: type[crd.Resource]) -> None:
    committed = (ROOT / "crds" / crd.file_name(model)).read_text()
    assert committed == crd.render(model), "crds/ is stale: run `ember crds`"


def test_ember_crds_reproduces_the_directory(tmp_path: Path) -> None:
    assert main(["crds", "--output", str(tmp_path)]) == 0
    for model in crd.RESOURCES:
        assert (tmp_path / crd.file_name(model)).read_bytes() == (ROOT / "crds" / crd.file_name(model)).read_bytes()
    assert main(["crds", "--check", "--output", str(tmp_path)]) == 0
    (tmp_path / crd.file_name(crd.RESOURCES[0])).write_text("stale")
    assert main(["crds", "--check", "--output", str(tmp_path)]) == 1


def _nodes(schema: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(schema, dict):
        yield path, schema
        for name, sub in schema.get("properties", {}).items():
            yield from _nodes(sub, f"{path}.{name}")
        if isinstance(schema.get("items"), dict):
            yield from _nodes(schema["items"], f"{path}[]")
        if isinstance(schema.get("additionalProperties"), dict):
            yield from _nodes(schema["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize("model", crd.RESOURCES, ids=lambda m: m.KIND)
def test_schema_is_structural_and_described(model: type[crd.Resource]) -> None:
    schema = crd.crd_for(model)["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _nodes(schema["properties"]["spec"], "spec"):
        assert not {"$ref", "anyOf", "title"} & node.keys(), path
        assert "type" in node, f"{path} has no type"
        assert node.get("additionalProperties") is not False, path
        if path.count(".") >= 1 and not path.endswith(("[]", "{}")):
            assert node.get("description"), f"{path} has no description"


def _rules(model: type[crd.Resource]) -> list[str]:
    def walk(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            for rule in node.get("x-kubernetes-validations", []):
                yield rule["rule"]
            for value in node.values():
                yield from walk(value)
        elif isinstance(node, list):
            for value in node:
                yield from walk(value)

    return list(walk(crd.crd_for(model)))


def test_cross_field_rules_are_cel() -> None:
    function_rules = "\n".join(_rules(crd.RESOURCES[0]))
    assert "self.minScale <= self.maxScale" in function_rules
    assert ".sum() == 100" in function_rules
    assert "has(self.inline), has(self.configMapRef), has(self.url)" in function_rules
    policy_rules = "\n".join(_rules(crd.RESOURCES[2]))
    assert "allowUnsandboxed" in policy_rules
    version_rules = "\n".join(_rules(crd.RESOURCES[1]))
    assert "self == oldSelf" in version_rules


def test_printer_columns() -> None:
    columns = {
        model.KIND: [c["name"] for c in crd.crd_for(model)["spec"]["versions"][0]["additionalPrinterColumns"]]
        for model in crd.RESOURCES
    }
    assert columns["Function"][:5] == ["Latest", "Ready", "URL", "Routes", "Age"]
    assert columns["Version"][:4] == ["Function", "Number", "Phase", "Ready"]
    assert columns["SecurityPolicy"][:2] == ["Sandbox", "Egress"]
