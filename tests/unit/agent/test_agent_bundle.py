"""The one-file build of the Python agent (runtime-images/python/bundle.py): it is made from the
package, deterministically, and refuses a package it would change the meaning of.  That the build
runs as the agent is the local tier's (tests/local/agent runs it as a real process)."""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

_PY = Path(__file__).resolve().parents[3] / "runtime-images" / "python"
_spec = importlib.util.spec_from_file_location("ember_agent_bundle_under_test", _PY / "bundle.py")
assert _spec is not None
assert _spec.loader is not None
bundle = importlib.util.module_from_spec(_spec)
sys.modules["ember_agent_bundle_under_test"] = bundle
_spec.loader.exec_module(bundle)


def _top_level_names(source: str) -> set[str]:
    names = set()
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {n.id for t in node.targets for n in ast.walk(t) if isinstance(n, ast.Name)}
    return names


def test_the_build_holds_every_module_and_imports_nothing_of_the_package():
    text = bundle.render()
    modules = sorted(p.stem for p in (_PY / "ember_agent").glob("*.py") if p.stem != "__init__")
    assert (
        sorted(
            line.removeprefix("# ember_agent/").removesuffix(".py")
            for line in text.splitlines()
            if line.startswith("# ember_agent/")
        )
        == modules
    )
    tree = ast.parse(text)
    assert not [n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.level]
    assert {"main", "RUNTIME", "json_loads", "parse_head", "_worker_main"} <= _top_level_names(text)
    assert bundle.render() == text


def test_the_build_writes_the_entry_script_beside_the_module(tmp_path):
    agent = Path(bundle.build(str(tmp_path / "out")))
    assert agent == tmp_path / "out" / "agent.py"
    assert agent.read_text() == (_PY / "agent.py").read_text()
    assert (tmp_path / "out" / "ember_agent.py").read_text() == bundle.render()


def test_cached_build_is_keyed_by_the_sources_and_drops_day_old_others(tmp_path):
    day_old, recent = tmp_path / "ember-agent-0123456789abcdef", tmp_path / "ember-agent-fedcba9876543210"
    day_old.mkdir()
    recent.mkdir()  # an agent about to start may still need it
    os.utime(day_old, (time.time() - 90000, time.time() - 90000))
    first = Path(bundle.cached_build(str(tmp_path)))
    assert first.parent == tmp_path / f"ember-agent-{bundle.source_digest()}"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([first.parent.name, recent.name])
    assert (first.parent / "__pycache__" / f"ember_agent.{sys.implementation.cache_tag}.pyc").is_file()
    assert bundle.cached_build(str(tmp_path)) == str(first)


def _package_copy(tmp_path: Path) -> Path:
    pkg = tmp_path / "ember_agent"
    shutil.copytree(_PY / "ember_agent", pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return pkg


def test_a_name_defined_in_two_modules_is_refused(tmp_path):
    pkg = _package_copy(tmp_path)
    with (pkg / "server.py").open("a") as f:
        f.write("\n\ndef json_loads(data):\n    return data\n")
    with pytest.raises(
        bundle.BundleError, match=re.escape("'json_loads' is defined in both json_codec.py and server.py")
    ):
        bundle.render(str(pkg))


def test_an_import_from_the_wrong_module_is_refused(tmp_path):
    pkg = _package_copy(tmp_path)
    text = (pkg / "lifecycle.py").read_text()
    right = "from .config import MAX_SOCKET_PATH_BYTES, _env_int"
    assert right in text, "lifecycle.py no longer imports _env_int from .config: update this test"
    (pkg / "lifecycle.py").write_text(
        text.replace(right, "from .config import MAX_SOCKET_PATH_BYTES\nfrom .state import _env_int")
    )
    with pytest.raises(bundle.BundleError, match=re.escape("imports '_env_int' from .state, which does not define it")):
        bundle.render(str(pkg))


def test_an_absolute_import_of_the_package_is_refused(tmp_path):
    pkg = _package_copy(tmp_path)
    with (pkg / "server.py").open("a") as f:
        f.write("\n\nimport ember_agent.config\n")
    with pytest.raises(bundle.BundleError, match="import the package's modules relatively"):
        bundle.render(str(pkg))
