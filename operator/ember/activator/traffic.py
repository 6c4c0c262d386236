"""Which Version serves an invocation: qualifiers, traffic splits and aliases; pure.

A qualifier is absent (unqualified traffic), `$LATEST`/`latest` (the newest Version that can
serve), a Version number, or an alias name. Unqualified traffic follows `spec.traffic` when
set (entries name a Version or "latest"), else goes to the latest. "Latest" is the newest
*ready* Version, so a Version still loading (or failed) takes no unqualified traffic; before
any Version was ever ready it is the newest one still loading, whose queue holds the first
requests while it cold-starts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ember.activator.errors import FunctionNotFound, NotReady

LATEST_QUALIFIERS = frozenset({"$LATEST", "latest"})


@dataclass(frozen=True, slots=True)
class Split:
    """A share of traffic: Version number (None = latest) and weight in percent."""

    version: int | None
    weight: int


@dataclass(frozen=True, slots=True)
class AliasTarget:
    """An alias: its Version, and optionally a second one taking `additional_weight` percent."""

    version: int
    additional_version: int | None = None
    additional_weight: int = 0


@dataclass(frozen=True, slots=True)
class Targets:
    """Resolved candidates with cumulative weights out of 100."""

    versions: tuple[int, ...]
    cumulative: tuple[float, ...]

    def pick(self, draw: float) -> int:
        """The Version for a uniform draw in [0, 100)."""
        for version, bound in zip(self.versions, self.cumulative, strict=True):
            if draw < bound:
                return version
        return self.versions[-1]


def latest_serving(ready: Sequence[int], loading: Sequence[int], function: str) -> int:
    """The Version "latest" means now: newest ready, else (never ready) newest loading."""
    if ready:
        return max(ready)
    if loading:
        return max(loading)
    raise NotReady(f"function {function} has no Version that can serve (the latest failed to load)")


def resolve(
    qualifier: str | None,
    *,
    function: str,
    known: Mapping[int, bool],
    latest: int,
    traffic: Sequence[Split],
    aliases: Mapping[str, AliasTarget],
) -> Targets:
    """Candidates for a qualifier. `known` maps each Version number to whether it exists to be invoked."""
    if qualifier is None or qualifier == "":
        if not traffic:
            return Targets((latest,), (100.0,))
        return _weighted([(s.version if s.version is not None else latest, s.weight) for s in traffic], function)
    if qualifier in LATEST_QUALIFIERS:
        return Targets((latest,), (100.0,))
    if qualifier.isdigit():
        number = int(qualifier)
        if not known.get(number, False):
            raise FunctionNotFound(f"function {function} has no Version {number}")
        return Targets((number,), (100.0,))
    alias = aliases.get(qualifier)
    if alias is None:
        raise FunctionNotFound(f"function {function} has no alias or Version {qualifier!r}")
    if alias.additional_version is None or alias.additional_weight == 0:
        return _weighted([(alias.version, 100)], function)
    return _weighted(
        [(alias.version, 100 - alias.additional_weight), (alias.additional_version, alias.additional_weight)],
        function,
    )


def _weighted(pairs: Sequence[tuple[int, int]], function: str) -> Targets:
    merged: dict[int, int] = {}
    for version, weight in pairs:
        merged[version] = merged.get(version, 0) + weight
    items = [(v, w) for v, w in merged.items() if w > 0]
    if not items:
        raise NotReady(f"function {function}: every traffic target has weight 0")
    total = sum(w for _, w in items)
    cumulative: list[float] = []
    running = 0
    for _, weight in items:
        running += weight
        cumulative.append(running * 100 / total)
    return Targets(tuple(v for v, _ in items), tuple(cumulative))
