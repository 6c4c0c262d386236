"""Which SecurityPolicy a Function runs under: one rule, used by the operator and by local mode.

The Function's `securityPolicyRef` if it has one (missing is an error: the Function does not
run), else the namespace's SecurityPolicy named `default_name` (the operator's setting,
`default` in local mode) when there is one, else the built-in default (`DEFAULT_POLICY`:
gVisor, no egress). The callers look the named object up (the API server, the manifest files)
and hand over what they found; this module does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from ember.api.function import FunctionSpec, ObjectRef
from ember.api.security_policy import DEFAULT_POLICY, SecurityPolicySpec

DEFAULT_POLICY_NAME = "default"  # the operator's EMBER_DEFAULT_POLICY default; local mode always uses it


@dataclass(frozen=True, slots=True)
class PolicyChoice:
    """The policy a Function runs under, or why it has none."""

    name: str | None  # the SecurityPolicy object's name; None for the built-in default
    spec: SecurityPolicySpec | None  # None when the referenced policy is missing
    problem: str = ""


def policy_name_for(ref: ObjectRef | None, default_name: str) -> str:
    """The SecurityPolicy object to look up for a Function."""
    return ref.name if ref is not None else default_name


def choose_policy(
    *, namespace: str, ref: ObjectRef | None, default_name: str, found: SecurityPolicySpec | None
) -> PolicyChoice:
    """The Function's policy, given what the lookup of `policy_name_for(ref, default_name)` found."""
    name = policy_name_for(ref, default_name)
    if found is not None:
        return PolicyChoice(name, found)
    if ref is not None:
        return PolicyChoice(
            name,
            None,
            f"SecurityPolicy {name!r} (spec.securityPolicyRef) does not exist in namespace {namespace!r}.",
        )
    return PolicyChoice(None, DEFAULT_POLICY)


def limit_violations(spec: FunctionSpec, policy: SecurityPolicySpec, *, policy_name: str | None) -> list[str]:
    """What a Function asks for beyond its policy's `limits`, one sentence each (empty: within them).

    A Function over its limits is refused in both modes: no Version is made of it, and the
    Version that serves keeps serving."""
    which = f"SecurityPolicy {policy_name!r}" if policy_name else "the built-in default policy"
    limits = policy.limits
    problems: list[str] = []
    if spec.resources.memory_mib > limits.max_memory_mib:
        problems.append(
            f"spec.resources.memoryMiB ({spec.resources.memory_mib}) exceeds limits.maxMemoryMiB "
            f"({limits.max_memory_mib}) of {which}"
        )
    if spec.timeout_seconds > limits.max_timeout_seconds:
        problems.append(
            f"spec.timeoutSeconds ({spec.timeout_seconds}) exceeds limits.maxTimeoutSeconds "
            f"({limits.max_timeout_seconds}) of {which}"
        )
    return problems
