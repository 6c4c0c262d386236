"""Kubernetes `v1` Secret manifests as local mode reads them: the credentials of auxiliary services.

`ember dev` serves the Secrets found among the manifests of its directory (SecurityPolicy
`spec.services[].credentialsSecretRef` names one key of one); a cluster's Secrets are the API
server's. Values come from `data` (base64) and `stringData` (text, which wins on a repeated key),
as the API server merges them. A value is never part of an error message or a repr.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ember.api.manifests import ManifestError, Problem, is_secret, parse_documents

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_KEY = re.compile(r"^[-._a-zA-Z0-9]{1,253}$")


@dataclass(frozen=True, slots=True)
class LocalSecret:
    """One Secret: its namespace, name and decoded values."""

    namespace: str
    name: str
    data: Mapping[str, str] = field(repr=False)


def parse_secret(document: dict[str, Any], source: str) -> LocalSecret:
    """A `v1` Secret document → LocalSecret, or ManifestError naming every problem (never a value)."""
    problems: list[Problem] = []
    metadata = document.get("metadata")
    if not isinstance(metadata, dict):
        metadata = {}
        problems.append(Problem(source, "metadata", "required field is missing"))
    name, namespace = metadata.get("name"), metadata.get("namespace", "default")
    for what, value in (("metadata.name", name), ("metadata.namespace", namespace)):
        if not isinstance(value, str) or not _NAME.match(value):
            problems.append(Problem(source, what, f"must be a DNS subdomain name (got {value!r})"))
    values: dict[str, str] = {}
    for member, decode in (("data", _base64_text), ("stringData", _text)):
        raw = document.get(member) or {}
        if not isinstance(raw, dict):
            problems.append(Problem(source, member, f"must be a mapping of keys to values (got {type(raw).__name__})"))
            continue
        for key, value in raw.items():
            if not isinstance(key, str) or not _KEY.match(key):
                problems.append(Problem(source, f"{member}.{key}", "keys may hold only letters, digits, -, _ and ."))
                continue
            decoded = decode(value)
            if decoded is None:
                what = "base64 of UTF-8 text" if member == "data" else "a string"
                problems.append(Problem(source, f"{member}.{key}", f"must be {what}"))
                continue
            values[key] = decoded
    if problems:
        raise ManifestError(problems)
    return LocalSecret(str(namespace), str(name), values)


def parse_secrets(texts: Iterable[tuple[str, str]]) -> list[tuple[str, LocalSecret]]:
    """Every `v1` Secret in (source, text) pairs (other documents are skipped); ManifestError
    lists all problems at once, a Secret defined twice included."""
    found: list[tuple[str, LocalSecret]] = []
    problems: list[Problem] = []
    seen: dict[tuple[str, str], str] = {}
    for file_source, text in texts:
        try:
            documents = parse_documents(text, file_source)
        except ManifestError as err:
            problems.extend(err.problems)
            continue
        for source, document in documents:
            if not is_secret(document):
                continue
            try:
                secret = parse_secret(document, source)
            except ManifestError as err:
                problems.extend(err.problems)
                continue
            key = (secret.namespace, secret.name)
            if key in seen:
                problems.append(
                    Problem(source, "metadata.name", f"Secret {key[0]}/{key[1]} is also defined in {seen[key]}")
                )
                continue
            seen[key] = source
            found.append((source, secret))
    if problems:
        raise ManifestError(problems)
    return found


def _base64_text(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        return base64.b64decode(value, validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        return None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None
