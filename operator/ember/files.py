"""Manifests read from files and CRDs written to them: the file I/O around the (pure) API models.

`ember validate`, `ember dev` and `ember crds` use it; parsing and rendering stay in `ember.api`.
"""

from __future__ import annotations

from pathlib import Path

from ember.api import crd
from ember.api.common import Resource
from ember.api.manifests import ManifestError, Problem, parse_manifests
from ember.api.secrets import LocalSecret, parse_secrets

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


def manifest_files(path: Path) -> list[Path]:
    """The manifest files at path: the file itself, or every YAML/JSON file below a directory."""
    if path.is_dir():
        return sorted(p for p in path.rglob("*") if p.suffix in MANIFEST_SUFFIXES and p.is_file())
    return [path]


def load_manifests(path: Path | str) -> list[Resource]:
    """Every Ember resource in a file or directory; ManifestError lists all problems at once.

    Files under a directory that hold no Ember resource (other apiVersions) are skipped, so
    Ember manifests can live beside other Kubernetes objects.
    """
    return [resource for _, resource in load_sourced_manifests(path)]


def load_sourced_manifests(path: Path | str) -> list[tuple[str, Resource]]:
    """`load_manifests`, each resource with where it came from (`file`, or `file#n` in a multi-document file)."""
    root = Path(path)
    if not root.exists():
        raise ManifestError([Problem(str(root), "", "no such file or directory")])
    texts: list[tuple[str, str]] = []
    problems: list[Problem] = []
    for file in manifest_files(root):
        try:
            texts.append((str(file), file.read_text()))
        except (OSError, UnicodeDecodeError) as err:
            problems.append(Problem(str(file), "", f"cannot be read: {err}"))
    try:
        resources = parse_manifests(texts, only_ember=root.is_dir())
    except ManifestError as err:
        problems.extend(err.problems)
        resources = []
    if problems:
        raise ManifestError(problems)
    return resources


def load_secrets(path: Path | str) -> list[tuple[str, LocalSecret]]:
    """Every `v1` Secret in a manifest file (local mode's credentials); ManifestError lists all problems."""
    file = Path(path)
    try:
        text = file.read_text()
    except (OSError, UnicodeDecodeError) as err:
        raise ManifestError([Problem(str(file), "", f"cannot be read: {err}")]) from err
    return parse_secrets([(str(file), text)])


def write_crds(directory: Path) -> list[Path]:
    """Write every CRD into directory; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for model in crd.RESOURCES:
        path = directory / crd.file_name(model)
        path.write_text(crd.render(model))
        written.append(path)
    return written
