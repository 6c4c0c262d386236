"""Status conditions: reasons, `mark_*` helpers, `Ready` derived from the others, phase derived from them.

As in Knative's `*_lifecycle.go`: the conditions are the truth, keyed by type and written on the
first visit (as Unknown if nothing is known yet); `Ready` is computed from the conditions it
depends on, and `phase` (for `kubectl get`) is computed from the conditions, never stored apart.
A condition keeps its `lastTransitionTime` while its status does not change.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any, Final

from ember.api.common import Condition, ConditionStatus
from ember.api.version import Phase

READY: Final = "Ready"
VERSION_READY: Final = "VersionReady"
POLICY_RESOLVED: Final = "PolicyResolved"
CODE_READY: Final = "CodeReady"
EGRESS_ENFORCED: Final = "EgressEnforced"
LOADED: Final = "Loaded"
# Whether the namespace's activator serves all of the Function's HTTP routes (ember.controller.routes);
# only on Functions with spec.http, and not part of Ready: the Function is still invoked by its API.
ROUTES_ACCEPTED: Final = "RoutesAccepted"
# Whether every portion of a Version (spec.portions) has loaded its code (portions_loaded); only on
# Versions with portions, and not part of Ready: the Version's handler serves without them, and a
# call to a portion that failed fails with that portion's error.
PORTIONS_LOADED: Final = "PortionsLoaded"
# Fields the spec sets that have no effect yet (ember.api.unsupported). Informational: never part of Ready.
UNSUPPORTED: Final = "Unsupported"

# Conditions each kind's Ready is derived from.
FUNCTION_DEPENDENTS: Final = (POLICY_RESOLVED, VERSION_READY)
# A Version is ready when its code is stored and a pod has loaded it (an activator specialized one):
# one meaning of Ready for retention, `readyVersion` and `kubectl get versions`. Whether its pods
# can run now (policy, RuntimeClass) is live state and belongs to the Function's PolicyResolved.
VERSION_DEPENDENTS: Final = (CODE_READY, LOADED)


class Reason:
    """CamelCase reasons, for machines; the message beside each is for people."""

    RECONCILING: Final = "Reconciling"
    READY: Final = "Ready"
    INVALID_SPEC: Final = "InvalidSpec"
    POLICY_MISSING: Final = "SecurityPolicyMissing"
    POLICY_INVALID: Final = "SecurityPolicyInvalid"
    RUNTIME_CLASS_MISSING: Final = "RuntimeClassMissing"
    EXCEEDS_LIMITS: Final = "ExceedsPolicyLimits"
    PORTIONS_REFUSED: Final = "PortionPoliciesRefused"
    RESOLVED: Final = "Resolved"
    CODE_STORED: Final = "CodeStored"
    CODE_BY_URL: Final = "CodeByUrl"
    CODE_MISSING: Final = "CodeMissing"
    VERSION_LOADING: Final = "VersionLoading"
    VERSION_FAILED: Final = "VersionFailed"
    HOSTS_NOT_ENFORCEABLE: Final = "HostRulesNotEnforceable"
    ENFORCED: Final = "Enforced"
    NOT_OWNED: Final = "NotOwned"
    LOADED: Final = "Loaded"
    NOT_LOADED: Final = "NotLoadedYet"
    LOAD_FAILED: Final = "LoadFailed"
    PORTION_LOAD_FAILED: Final = "PortionLoadFailed"
    FIELDS_NOT_IMPLEMENTED: Final = "FieldsNotImplemented"
    ALL_SUPPORTED: Final = "AllSupported"
    ROUTES_SERVED: Final = "RoutesServed"
    ROUTE_CONFLICT: Final = "RouteConflict"


# Reasons that no retry fixes: the spec (or what it points to) must change.
PERMANENT_REASONS: Final = frozenset({Reason.INVALID_SPEC, Reason.VERSION_FAILED, Reason.NOT_OWNED, Reason.LOAD_FAILED})


def find(conditions: Sequence[Condition], type_: str) -> Condition | None:
    """The condition of a type, if present."""
    return next((c for c in conditions if c.type == type_), None)


def is_true(conditions: Sequence[Condition], type_: str) -> bool:
    """Whether the condition of a type is present and True."""
    found = find(conditions, type_)
    return found is not None and found.status == "True"


def set_condition(
    conditions: Sequence[Condition],
    *,
    type_: str,
    status: ConditionStatus,
    reason: str,
    message: str,
    generation: int | None,
    now: dt.datetime,
) -> list[Condition]:
    """The conditions with one of them set; its transition time moves only when its status does."""
    old = find(conditions, type_)
    transition = old.last_transition_time if old is not None and old.status == status else now
    new = Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=transition,
        observed_generation=generation,
    )
    out = [c for c in conditions if c.type != type_]
    out.append(new)
    return sorted(out, key=lambda c: (c.type != READY, c.type))


def mark_true(
    conditions: Sequence[Condition], type_: str, reason: str, message: str, *, generation: int | None, now: dt.datetime
) -> list[Condition]:
    """Set a condition True."""
    return set_condition(
        conditions, type_=type_, status="True", reason=reason, message=message, generation=generation, now=now
    )


def mark_false(
    conditions: Sequence[Condition], type_: str, reason: str, message: str, *, generation: int | None, now: dt.datetime
) -> list[Condition]:
    """Set a condition False."""
    return set_condition(
        conditions, type_=type_, status="False", reason=reason, message=message, generation=generation, now=now
    )


def mark_unknown(
    conditions: Sequence[Condition], type_: str, reason: str, message: str, *, generation: int | None, now: dt.datetime
) -> list[Condition]:
    """Set a condition Unknown."""
    return set_condition(
        conditions, type_=type_, status="Unknown", reason=reason, message=message, generation=generation, now=now
    )


def with_ready(
    conditions: Sequence[Condition], dependents: Sequence[str], *, generation: int | None, now: dt.datetime
) -> list[Condition]:
    """The conditions with `Ready` derived: False if any dependent is False, Unknown if any is missing
    or Unknown, else True. The first non-True dependent gives Ready its reason and message."""
    worst: Condition | None = None
    for type_ in dependents:
        found = find(conditions, type_)
        if found is None:
            found = Condition(
                type=type_, status="Unknown", reason=Reason.RECONCILING, message=f"{type_} is not known yet."
            )
        if found.status == "False":
            worst = found
            break
        if found.status == "Unknown" and worst is None:
            worst = found
    if worst is None:
        return mark_true(conditions, READY, Reason.READY, "All conditions are met.", generation=generation, now=now)
    return set_condition(
        conditions,
        type_=READY,
        status=worst.status,
        reason=worst.reason,
        message=worst.message,
        generation=generation,
        now=now,
    )


def is_ready(conditions: Sequence[Condition], *, generation: int | None, observed_generation: int | None) -> bool:
    """Ready is True *and* computed from the current generation (a stale True is not ready)."""
    return is_true(conditions, READY) and generation == observed_generation


def version_phase(conditions: Sequence[Condition]) -> Phase:
    """Phase of a Version, for `kubectl get versions`, from its conditions."""
    ready = find(conditions, READY)
    if ready is not None and ready.status == "True":
        return "Ready"
    if ready is not None and ready.status == "False" and ready.reason in PERMANENT_REASONS:
        return "Failed"
    if is_true(conditions, CODE_READY):
        return "Loading"
    return "Pending"


def portions_loaded(
    *,
    code_hash: str,
    portions: Sequence[str],
    loaded_marks: Mapping[str, str],
    load_errors: Mapping[str, Mapping[str, Any]],
) -> tuple[ConditionStatus, str, str]:
    """A Version's PortionsLoaded condition (status, reason, message) from the evidence per portion:
    its `loaded` mark (a pod of it was ready) wins over a reported load error, as in `version_loaded`;
    either counts only for the Version's code hash. False names every portion that failed and why."""
    loaded = [p for p in portions if loaded_marks.get(p) == code_hash]
    failed = {
        p: str(error.get("message") or "no message")
        for p in portions
        if p not in loaded and (error := load_errors.get(p)) is not None and error.get("codeHash") == code_hash
    }
    if failed:
        text = "; ".join(f"portion {p} failed to load: {message}" for p, message in failed.items())
        return "False", Reason.PORTION_LOAD_FAILED, f"{text}. Calls to it fail with that error."
    if len(loaded) == len(portions):
        return "True", Reason.LOADED, f"Every portion has loaded: {', '.join(portions)}."
    waiting = ", ".join(p for p in portions if p not in loaded)
    return "Unknown", Reason.NOT_LOADED, f"Not loaded by a pod yet: {waiting}."


def version_loaded(
    *, code_hash: str, loaded_mark: str | None, load_error: Mapping[str, Any] | None, ready_pods: int
) -> tuple[ConditionStatus, str, str]:
    """The Version's Loaded condition from the evidence on it (status, reason, message).

    A pod that loaded the code (a ready specialized pod now, or the operator's `loaded` mark that
    outlives it when the Version scales to zero) wins over a reported load error: a Version whose
    code loaded once is not failed. A load error counts only for this Version's code hash."""
    if ready_pods > 0 or loaded_mark == code_hash:
        return "True", Reason.LOADED, f"Loaded by a pod ({ready_pods} ready now)."
    if load_error is not None and load_error.get("codeHash") == code_hash:
        return "False", Reason.LOAD_FAILED, f"The code failed to load: {load_error.get('message') or 'no message'}"
    return "Unknown", Reason.NOT_LOADED, "No pod has loaded the code yet (an activator loads a new Version at once)."
