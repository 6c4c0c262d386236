"""Which Versions of a Function stay: every one traffic or an alias references, plus the last N."""

from __future__ import annotations

from collections.abc import Iterable

from ember.api.function import FunctionSpec


def referenced_versions(spec: FunctionSpec, *, ready_version: int | None) -> frozenset[int]:
    """Version numbers the spec routes to: traffic, aliases, and the ready one `latest` resolves to."""
    numbers = {t.version for t in spec.traffic if t.version is not None}
    for alias in spec.aliases.values():
        numbers.add(alias.version)
        if alias.additional_version is not None:
            numbers.add(alias.additional_version)
    follows_latest = not spec.traffic or any(t.latest for t in spec.traffic)
    if follows_latest and ready_version is not None:
        numbers.add(ready_version)
    return frozenset(numbers)


def versions_to_delete(
    spec: FunctionSpec, existing: Iterable[int], *, keep_last: int, ready_version: int | None
) -> list[int]:
    """Existing Version numbers to delete, oldest first. The newest is always kept."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be at least 1 (got {keep_last}): the newest Version is always kept")
    numbers = sorted(set(existing))
    keep = set(numbers[-keep_last:]) | referenced_versions(spec, ready_version=ready_version)
    return [n for n in numbers if n not in keep]
