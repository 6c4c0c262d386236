"""Parsing Ember manifests (YAML text), with one clear error per problem. No file I/O: `ember.files` reads them.

Used by `ember validate`, by local mode (`ember dev`) and by tests. Each problem names the
file, the document, the field path in the manifest's own (camelCase) spelling, and what is
allowed there, so a user can fix every mistake after one run. A valid manifest that sets fields
Ember does not implement yet gets a warning naming them (`unsupported_fields_warning`), not an error.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from ember.api.common import API_VERSION, Resource
from ember.api.function import Function
from ember.api.security_policy import SecurityPolicy
from ember.api.unsupported import unsupported_warning
from ember.api.version import Version

KINDS: dict[str, type[Resource]] = {m.KIND: m for m in (Function, Version, SecurityPolicy)}


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing wrong with one manifest."""

    source: str
    field: str
    message: str

    def __str__(self) -> str:
        if not self.field or self.message.startswith(self.field):
            return f"{self.source}: {self.message}"
        return f"{self.source}: {self.field}: {self.message}"


class ManifestError(ValueError):
    """Manifests that cannot be used; `problems` lists every problem found."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


def _field_path(loc: Iterable[int | str]) -> str:
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}" if path else str(part)
    return path


def _model_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel] | None:
    """The model class that owns the field at loc, for listing allowed field names."""
    current: Any = model
    for part in loc:
        if isinstance(part, int) or not (isinstance(current, type) and issubclass(current, BaseModel)):
            continue
        by_alias = {f.alias or name: f for name, f in current.model_fields.items()}
        field = by_alias.get(part) or current.model_fields.get(part)
        if field is None:
            return None
        current = _inner_model(field.annotation)
    return current if isinstance(current, type) and issubclass(current, BaseModel) else None


def _inner_model(annotation: Any) -> Any:
    """The model an annotation holds: itself, or inside `X | None`, `list[X]`, `dict[str, X]`."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        nested = _inner_model(arg)
        if nested is not None:
            return nested
    return None


def _problems_from(err: ValidationError, model: type[BaseModel], source: str) -> list[Problem]:
    problems = []
    for item in err.errors(include_url=False):
        loc = tuple(item["loc"])
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            owner = _model_at(model, loc[:-1])
            if owner is not None:
                allowed = ", ".join(sorted(f.alias or n for n, f in owner.model_fields.items()))
                message = f"unknown field (allowed here: {allowed})"
            else:
                message = "unknown field"
        elif item["type"] == "missing":
            message = "required field is missing"
        elif item["type"] == "string_pattern_mismatch":
            message = f"{item['input']!r} does not match {item['ctx']['pattern']}"
        problems.append(Problem(source, _field_path(loc), message))
    return problems


def parse_resource(document: Any, source: str = "<manifest>") -> Resource:
    """One manifest document → its resource model, or ManifestError naming every problem."""
    if not isinstance(document, dict):
        raise ManifestError([Problem(source, "", f"expected a mapping, got {type(document).__name__}")])
    api_version = document.get("apiVersion")
    if api_version != API_VERSION:
        raise ManifestError([Problem(source, "apiVersion", f"must be {API_VERSION} (got {api_version!r})")])
    kind = document.get("kind")
    model = KINDS.get(kind) if isinstance(kind, str) else None
    if model is None:
        allowed = ", ".join(KINDS)
        raise ManifestError([Problem(source, "kind", f"must be one of {allowed} (got {kind!r})")])
    try:
        return model.model_validate(document)
    except ValidationError as err:
        raise ManifestError(_problems_from(err, model, source)) from err


def parse_documents(text: str, source: str) -> list[tuple[str, Any]]:
    """The YAML documents of one manifest text, each with where it came from (`source`, or `source#n`)."""
    try:
        loaded = list(yaml.safe_load_all(text))
    except yaml.YAMLError as err:
        raise ManifestError([Problem(source, "", f"not valid YAML: {err}")]) from err
    documents = [d for d in loaded if d is not None]
    return [((f"{source}#{i + 1}" if len(documents) > 1 else source), d) for i, d in enumerate(documents)]


def is_secret(document: Any) -> bool:
    """A Kubernetes `v1` Secret (`ember.api.secrets`), which may sit beside Ember manifests."""
    return isinstance(document, dict) and document.get("apiVersion") == "v1" and document.get("kind") == "Secret"


def parse_manifests(texts: Iterable[tuple[str, str]], *, only_ember: bool) -> list[tuple[str, Resource]]:
    """Every Ember resource in (source, text) pairs; ManifestError lists all problems at once.

    With `only_ember`, documents of other apiVersions are skipped (Ember manifests may live
    beside other Kubernetes objects); a resource defined twice is a problem at the second place.
    """
    resources: list[tuple[str, Resource]] = []
    problems: list[Problem] = []
    seen: dict[tuple[str, str, str], str] = {}
    for file_source, text in texts:
        try:
            documents = parse_documents(text, file_source)
        except ManifestError as err:
            problems.extend(err.problems)
            continue
        for source, document in documents:
            if is_secret(document):
                continue  # local mode's credentials: ember.api.secrets reads them
            if (
                only_ember
                and isinstance(document, dict)
                and not str(document.get("apiVersion", "")).startswith("ember.run/")
            ):
                continue
            try:
                resource = parse_resource(document, source)
            except ManifestError as err:
                problems.extend(err.problems)
                continue
            key = (type(resource).__name__, *resource.key)
            if key in seen:
                problems.append(
                    Problem(source, "metadata.name", f"{key[0]} {key[1]}/{key[2]} is also defined in {seen[key]}")
                )
                continue
            seen[key] = source
            resources.append((source, resource))
    if problems:
        raise ManifestError(problems)
    return resources


def unsupported_fields_warning(source: str, resource: Resource) -> Problem | None:
    """A warning naming the fields a Function or SecurityPolicy sets that have no effect yet
    (ember.api.unsupported: anywhere, then in local mode only); None when there are none."""
    if not isinstance(resource, Function | SecurityPolicy):
        return None  # a Version's spec is the operator's copy of its Function's
    text = unsupported_warning(resource.spec)
    if text is None:
        return None
    return Problem(source, "", f"{resource.KIND} {resource.metadata.namespace}/{resource.metadata.name}: {text}")
