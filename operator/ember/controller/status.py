"""Status plumbing every reconciler shares: stored conditions in and out, Events on transitions.

Conditions are parsed from what is stored (an unreadable one is dropped, not fatal), changed
through `ember.resources.conditions`, and written back in their wire form. An Event is recorded
when a condition's status changes, never on a run that changes nothing, so `kubectl describe`
shows transitions and a level-based reconciler can run as often as it likes.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

from pydantic import ValidationError

from ember.api.common import Condition
from ember.api.unsupported import not_implemented_message
from ember.controller.kube import Obj
from ember.resources import conditions as cond

EventType = Literal["Normal", "Warning"]


class Recorder(Protocol):
    """Records a Kubernetes Event about an object (kopf.event in the operator)."""

    def __call__(self, obj: Mapping[str, Any], *, type: EventType, reason: str, message: str) -> None: ...


def conditions_of(status: Mapping[str, Any] | None) -> list[Condition]:
    """The conditions of a stored status; unreadable entries are skipped."""
    out: list[Condition] = []
    for raw in (status or {}).get("conditions", []) or []:
        try:
            out.append(Condition.model_validate(raw))
        except ValidationError:
            continue
    return out


def wire_conditions(conditions: Sequence[Condition]) -> list[dict[str, Any]]:
    """Conditions as the API stores them (camelCase, no nulls)."""
    return [c.model_dump(by_alias=True, exclude_none=True, mode="json") for c in conditions]


def resource_of(body: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a stored object the models parse (status is read separately)."""
    return {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in body}


def status_changed(old: Sequence[Condition], new: Sequence[Condition], type_: str) -> Condition | None:
    """The new condition of a type when its status changed (or it is new), else None."""
    before, after = cond.find(old, type_), cond.find(new, type_)
    if after is not None and (before is None or before.status != after.status):
        return after
    return None


def mark_unsupported(
    conditions: Sequence[Condition],
    fields: Sequence[str],
    body: Obj,
    record: Recorder,
    *,
    generation: int | None,
    now: dt.datetime,
) -> list[Condition]:
    """`Unsupported`: the fields the spec sets that have no effect yet (issue #10: no silent fields).

    Informational, never part of Ready. A Warning Event when it turns True or names other fields,
    a Normal one when the last such field is gone; none while nothing changes."""
    old = cond.find(conditions, cond.UNSUPPORTED)
    if not fields:
        if old is not None and old.status == "True":
            record(body, type="Normal", reason=cond.Reason.ALL_SUPPORTED, message="Every field set is implemented.")
        return cond.mark_false(
            conditions,
            cond.UNSUPPORTED,
            cond.Reason.ALL_SUPPORTED,
            "Every field set is implemented.",
            generation=generation,
            now=now,
        )
    message = not_implemented_message(fields) + "."
    if old is None or old.status != "True" or old.message != message:
        record(body, type="Warning", reason=cond.Reason.FIELDS_NOT_IMPLEMENTED, message=message)
    return cond.mark_true(
        conditions, cond.UNSUPPORTED, cond.Reason.FIELDS_NOT_IMPLEMENTED, message, generation=generation, now=now
    )
