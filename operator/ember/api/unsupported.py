"""Spec fields Ember accepts but does not act on yet: the one list every surface reports from.

Issue #10, item 6 ("no silent fields"): a field that validates and then does nothing is a
defect unless the user is told. The operator turns this list into a Function's or
SecurityPolicy's `Unsupported` condition and a Warning Event; `ember validate` and `ember dev`
print it. When a capability lands, delete its entry here; tests/unit/api/test_unsupported.py
then asks for its fields to be classified as implemented (every leaf field of the models must be
in one list or the other, so a new field cannot slip in silently either).

Each entry is a field path as the manifest spells it, a predicate for "the manifest sets it",
and the modes where it has no effect. Most entries do nothing anywhere, and are reported when
set to something other than the default (a user who writes the default gets what the default
promises). Some work in a cluster but not in local mode (README, Local mode): local pods get the
sandbox this machine offers, not the policy's, and an allow-list's host names are denied there
with nothing else to say so (a cluster reports them in a condition).

Pure: no I/O; the callers decide where the words go.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from pydantic import BaseModel

from ember.api.function import FunctionSpec, StateVolume
from ember.api.security_policy import Limits, SecurityPolicySpec


class Mode(enum.Enum):
    """Where a spec is served: by the operator and activators in a cluster, or by `ember dev`."""

    CLUSTER = "cluster"
    LOCAL = "local"


EVERYWHERE: Final = frozenset(Mode)
LOCAL_ONLY: Final = frozenset({Mode.LOCAL})
CLUSTER_ONLY: Final = frozenset({Mode.CLUSTER})

SpecT = TypeVar("SpecT", FunctionSpec, SecurityPolicySpec)


@dataclass(frozen=True, slots=True)
class Gap(Generic[SpecT]):
    """One accepted field without effect: its path, when a spec sets it, and where it does nothing."""

    path: str
    is_set: Callable[[SpecT], bool]
    modes: frozenset[Mode] = EVERYWHERE


def _written(model: BaseModel | None, field: str) -> bool:
    """The manifest wrote the field (even with its default value)."""
    return model is not None and field in model.model_fields_set


_LIMITS = Limits()


def _volume(spec: FunctionSpec) -> StateVolume | None:
    return spec.state.volume if spec.state is not None else None


FUNCTION_GAPS: Final[tuple[Gap[FunctionSpec], ...]] = (
    # Local mode: the volume is a folder on this machine (pods/local/sandbox.py), bounded by its disk,
    # not by sizeMiB, and no StorageClass is involved. A cluster: the PersistentVolumeClaim's.
    Gap("spec.state.volume.sizeMiB", lambda s: _written(_volume(s), "size_mib"), LOCAL_ONLY),
    Gap(
        "spec.state.volume.storageClassName",
        lambda s: (v := _volume(s)) is not None and v.storage_class_name is not None,
        LOCAL_ONLY,
    ),
)

POLICY_GAPS: Final[tuple[Gap[SecurityPolicySpec], ...]] = (
    # The agent's RLIMIT_NPROC, where the pod's uid has a kernel of its own: gVisor or Kata pods in
    # a cluster (resources/pool.py pids_limit) and runsc locally. A cluster's `none` pods share the
    # node's kernel, where the rlimit would count every container of that uid (and the kubelet's
    # podPidsLimit is per node). Local bwrap: its pids cgroup as root (bwrap_cgroups); without
    # root none, and `ember dev`'s banner says so.
    Gap("spec.limits.pids", lambda s: s.limits.pids != _LIMITS.pids and s.sandbox == "none", CLUSTER_ONLY),
    # Local mode: the sandbox is whatever this machine offers (pods/local/sandbox.py detect_sandbox).
    Gap("spec.sandbox", lambda s: s.sandbox != "gvisor", LOCAL_ONLY),
    Gap("spec.runtimeClassName", lambda s: s.runtime_class_name is not None, LOCAL_ONLY),
    # Local mode: each sandbox has a network namespace of its own whose rules allow the listed
    # cidrs (pods/local/egress.py); host names stay denied, as in a cluster (where the
    # EgressEnforced condition says so), and here this is how the user is told.
    Gap("spec.egress.allow[].host", lambda s: any(rule.host is not None for rule in s.egress.allow), LOCAL_ONLY),
    # Local mode: a sandbox's root is always read-only (pods/local/sandbox.py); writes go to /tmp.
    Gap("spec.filesystem.readOnlyRoot", lambda s: not s.filesystem.read_only_root, LOCAL_ONLY),
)


def _paths(gaps: Sequence[Gap[SpecT]], spec: SpecT, mode: Mode) -> tuple[str, ...]:
    return tuple(gap.path for gap in gaps if mode in gap.modes and gap.is_set(spec))


def unsupported_function_fields(spec: FunctionSpec, mode: Mode = Mode.CLUSTER) -> tuple[str, ...]:
    """Paths of the fields this Function spec sets that have no effect in `mode`, in list order."""
    return _paths(FUNCTION_GAPS, spec, mode)


def unsupported_policy_fields(spec: SecurityPolicySpec, mode: Mode = Mode.CLUSTER) -> tuple[str, ...]:
    """Paths of the fields this SecurityPolicy spec sets that have no effect in `mode`, in list order."""
    return _paths(POLICY_GAPS, spec, mode)


def unsupported_fields(spec: FunctionSpec | SecurityPolicySpec, mode: Mode = Mode.CLUSTER) -> tuple[str, ...]:
    """`unsupported_function_fields` or `unsupported_policy_fields`, by the spec's type."""
    if isinstance(spec, FunctionSpec):
        return unsupported_function_fields(spec, mode)
    return unsupported_policy_fields(spec, mode)


def _agreeing(fields: Sequence[str]) -> tuple[str, str, str]:
    """The fields joined, and the verb and pronoun that agree with their number."""
    if len(fields) == 1:
        return fields[0], "is", "it has"
    return ", ".join(fields), "are", "they have"


def not_implemented_message(fields: Sequence[str]) -> str:
    """The sentence for fields without effect in a cluster: the `Unsupported` condition's message."""
    joined, verb, pronoun = _agreeing(fields)
    return f"{joined} {verb} accepted but not implemented yet; {pronoun} no effect"


def local_message(fields: Sequence[str]) -> str:
    """The sentence for fields that work in a cluster but have no effect in local mode."""
    joined, verb, pronoun = _agreeing(fields)
    return f"{joined} {verb} accepted but not implemented in local mode (ember dev); {pronoun} no effect there"


def cluster_message(fields: Sequence[str]) -> str:
    """The sentence for fields that work in local mode but have no effect in a cluster."""
    joined, verb, pronoun = _agreeing(fields)
    return f"{joined} {verb} accepted but not implemented in a cluster yet; {pronoun} no effect there"


def unsupported_warning(spec: FunctionSpec | SecurityPolicySpec) -> str | None:
    """One line for `ember validate` and `ember dev`: the fields without effect anywhere, then those
    without effect in a cluster only, then in local mode only; None when every field the spec sets
    does something."""
    in_cluster = unsupported_fields(spec, Mode.CLUSTER)
    in_local = unsupported_fields(spec, Mode.LOCAL)
    everywhere = [path for path in in_cluster if path in in_local]
    cluster = [path for path in in_cluster if path not in in_local]
    local = [path for path in in_local if path not in in_cluster]
    parts = [not_implemented_message(everywhere)] if everywhere else []
    if cluster:
        parts.append(cluster_message(cluster))
    if local:
        parts.append(local_message(local))
    return "; ".join(parts) or None
