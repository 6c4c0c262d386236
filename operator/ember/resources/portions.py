"""Portions: parts of one Function's code that run in sandbox pools of their own, each under its
own SecurityPolicy, and call each other only through Ember; pure (no I/O).

`spec.portions` names handlers of the Function's code (an untrusted parser with no network, a
trusted part that may call the payments service). Each portion runs as the Function does
(same code, environment, memory and timeout) but with its own handler and policy
(`portion_spec`), in pods of its own pool. Code calls a portion with
`context.invoke_portion(name, event)`; the activator lets the call through only when

- it is declared (`callees`): the Function's own handler (`MAIN`) may call every portion, a
  portion only those in its `calls` (acyclic, `FunctionSpec._portion_calls`), and
- it does not go up in trust (`trust_violations`): a caller invokes only portions at its own
  `trustLevel` or below (Biba's invocation property: untrusted < standard < trusted), so code
  that handles hostile input can never drive a part that holds more. Results come back as
  values, which the caller treats as input of the callee's level.

Both modes refuse a Function whose declared calls break the trust order (no Version is made,
as for a Function over its policy's limits), and the activator checks every call again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from ember.api.function import FunctionSpec, Portion
from ember.api.security_policy import SecurityPolicySpec
from ember.resources.policy import choose_policy, limit_violations

MAIN = ""  # the Function's own handler, as a caller
TRUST_RANK: Mapping[str, int] = {"untrusted": 0, "standard": 1, "trusted": 2}


def portion_spec(spec: FunctionSpec, portion: Portion) -> FunctionSpec:
    """What one portion runs: the Function's code and settings with the portion's handler and
    policy; nothing that reaches it from outside (traffic, aliases, routes, triggers), and no
    pods kept when unused (it scales with the calls it gets)."""
    return spec.model_copy(
        update={
            "handler": portion.handler,
            "security_policy_ref": portion.security_policy_ref,
            "portions": [],
            "traffic": [],
            "aliases": {},
            "http": None,
            "event_sources": [],
            "scaling": spec.scaling.model_copy(update={"min_scale": 0, "predictive": False}),
        }
    )


def callees(spec: FunctionSpec, caller: str) -> tuple[str, ...]:
    """The portions `caller` (a portion's name, or `MAIN`) is declared to call."""
    if caller == MAIN:
        return tuple(p.name for p in spec.portions)
    return next((tuple(p.calls) for p in spec.portions if p.name == caller), ())


def may_call(caller_level: str, callee_level: str) -> bool:
    """Whether a caller at `caller_level` may invoke a portion at `callee_level` (not up)."""
    return TRUST_RANK[callee_level] <= TRUST_RANK[caller_level]


@dataclass(frozen=True, slots=True)
class PortionPolicies:
    """Each portion's policy, or what is wrong with them (one sentence per problem)."""

    policies: dict[str, SecurityPolicySpec] = field(default_factory=dict)
    names: dict[str, str | None] = field(default_factory=dict)  # the SecurityPolicy objects' names
    problems: list[str] = field(default_factory=list)


def resolve_portions(
    spec: FunctionSpec,
    *,
    namespace: str,
    main_policy: SecurityPolicySpec,
    main_policy_name: str | None,
    lookup: Callable[[str], SecurityPolicySpec | None],
) -> PortionPolicies:
    """Every portion's SecurityPolicy (`lookup` finds one by name in the namespace), checked
    against the portion's limits and the trust order of the declared calls."""
    out = PortionPolicies()
    for i, portion in enumerate(spec.portions):
        ref = portion.security_policy_ref
        choice = choose_policy(namespace=namespace, ref=ref, default_name=ref.name, found=lookup(ref.name))
        if choice.spec is None:
            out.problems.append(
                f"spec.portions[{i}].securityPolicyRef: SecurityPolicy {ref.name!r} "
                f"(portion {portion.name!r}) does not exist in namespace {namespace!r}"
            )
            continue
        out.policies[portion.name] = choice.spec
        out.names[portion.name] = choice.name
        for problem in limit_violations(portion_spec(spec, portion), choice.spec, policy_name=choice.name):
            out.problems.append(f"portion {portion.name!r}: {problem}")
    if not out.problems:
        out.problems.extend(trust_violations(spec, main_policy, main_policy_name, out.policies, out.names))
    return out


def trust_violations(
    spec: FunctionSpec,
    main_policy: SecurityPolicySpec,
    main_policy_name: str | None,
    policies: Mapping[str, SecurityPolicySpec],
    names: Mapping[str, str | None],
) -> list[str]:
    """Each declared call that goes up in trust, one sentence each."""

    def level(caller: str) -> tuple[str, str]:
        policy, name = (main_policy, main_policy_name) if caller == MAIN else (policies[caller], names.get(caller))
        return policy.trust_level, f"SecurityPolicy {name!r}" if name else "the built-in default policy"

    problems: list[str] = []
    for caller in (MAIN, *(p.name for p in spec.portions)):
        caller_level, caller_policy = level(caller)
        for callee in callees(spec, caller):
            callee_level, callee_policy = level(callee)
            if not may_call(caller_level, callee_level):
                who = "the Function's handler" if caller == MAIN else f"portion {caller!r}"
                problems.append(
                    f"{who} ({caller_level}, {caller_policy}) may not call portion {callee!r} "
                    f"({callee_level}, {callee_policy}): a call goes only to portions at the caller's "
                    "trustLevel or below"
                )
    return problems
