"""A Function's volume: its PersistentVolumeClaim exists as `spec.state.volume` asks, as far as a
claim can change, and the Function's `StateVolumeReady` condition says how it is.

The claim is made before the pools whose pods mount it (`pools`), so that they find it. It is
changed only as Kubernetes allows (`ember.resources.state_volume.claim_update`): a bound claim
grows when more is asked (the StorageClass must allow expansion, else the condition says the
resize was refused); a smaller size or another StorageClass is not applied and the condition
says so (False, with a Warning Event). A claim that is not bound yet is `Unknown, ClaimPending`:
the Function's warm pods stay Pending until it binds, and the claim's watch (`handlers`) runs the
Function again when its phase changes.

A spec that drops its volume keeps the claim, and the files on it, until the Function is deleted
(garbage collection takes it then): a Version that still serves may mount it, and a volume is
data a spec edit should not destroy. The condition goes; a Normal Event says the claim is kept.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence

from ember.api.common import Condition
from ember.api.function import Function
from ember.controller.children import Child, Outcome, not_ours
from ember.controller.kube import Kube, KubeError, Obj
from ember.controller.status import Recorder, status_changed
from ember.resources import conditions as cond
from ember.resources.meta import owner_reference
from ember.resources.state_volume import (
    STATE_VOLUME_READY,
    ClaimUpdate,
    claim_condition,
    claim_update,
    state_claim,
    state_claim_name,
)

KIND = "PersistentVolumeClaim"


async def ensure_state_claim(
    kube: Kube,
    fn: Function,
    conditions: Sequence[Condition],
    body: Obj,
    record: Recorder,
    *,
    generation: int | None,
    now: dt.datetime,
) -> tuple[list[Condition], list[Child]]:
    """The Function's claim as its spec asks (see the module docstring): the conditions with
    `StateVolumeReady` set (or dropped, without a volume), and the claim when it exists but is
    not Ember's (`children.Outcome.NOT_OWNED`), left untouched."""
    volume = fn.spec.state.volume if fn.spec.state is not None else None
    ns, name = fn.metadata.namespace, fn.metadata.name
    before = cond.find(conditions, STATE_VOLUME_READY)
    if volume is None:
        if before is not None:
            record(
                body,
                type="Normal",
                reason="StateVolumeKept",
                message=f"spec.state.volume was removed; PersistentVolumeClaim {state_claim_name(name)} and its "
                "files are kept until the Function is deleted (delete the claim to free them sooner).",
            )
        return [c for c in conditions if c.type != STATE_VOLUME_READY], []
    desired = state_claim(volume, namespace=ns, function=name, function_uid=fn.metadata.uid)
    claim_name = desired["metadata"]["name"]
    actual = await kube.get_persistent_volume_claim(ns, claim_name)
    resize_error = ""
    if actual is None:
        await kube.create_persistent_volume_claim(desired)
        record(
            body,
            type="Normal",
            reason="StateVolumeCreated",
            message=f"Created PersistentVolumeClaim {claim_name} ({volume.size_mib}Mi, ReadWriteMany"
            + (f", StorageClass {volume.storage_class_name}" if volume.storage_class_name else "")
            + ") for spec.state.volume.",
        )
        actual = await kube.get_persistent_volume_claim(ns, claim_name) or desired
        update = ClaimUpdate(storage=None, problems=())
    else:
        problem = not_ours(KIND, actual, controller=("ember.run", "Function", name))
        if problem is not None:
            out = cond.mark_false(
                conditions, STATE_VOLUME_READY, cond.Reason.NOT_OWNED, problem, generation=generation, now=now
            )
            uid = (actual.get("metadata") or {}).get("uid")
            return out, [Child(KIND, claim_name, Outcome.NOT_OWNED, uid, problem)]
        update = claim_update(actual, volume)
        bound = (actual.get("status") or {}).get("phase") == "Bound"
        patch: Obj = {}
        if update.storage is not None and bound:  # an unbound claim's request cannot change
            patch["spec"] = {"resources": {"requests": {"storage": update.storage}}}
        owners = (actual.get("metadata") or {}).get("ownerReferences") or []
        if not any(o.get("uid") == fn.metadata.uid for o in owners):  # a predecessor's: adopted
            patch["metadata"] = {"ownerReferences": [owner_reference(kind="Function", name=name, uid=fn.metadata.uid)]}
        if patch:
            try:
                await kube.patch_persistent_volume_claim(ns, claim_name, patch)
            except KubeError as err:
                if err.status not in (403, 422):  # refused (no expansion in its class): say so, else retry
                    raise
                resize_error = str(err)
    status, reason, message = claim_condition(actual, update, mount_path=volume.mount_path, resize_error=resize_error)
    out = cond.set_condition(
        conditions,
        type_=STATE_VOLUME_READY,
        status=status,
        reason=reason,
        message=message,
        generation=generation,
        now=now,
    )
    # an Event when it turns True or False, and when the problem it names changes
    changed = status_changed(conditions, out, STATE_VOLUME_READY) is not None
    if status != "Unknown" and (changed or (status == "False" and before is not None and before.message != message)):
        record(body, type="Normal" if status == "True" else "Warning", reason=reason, message=message)
    return out, []
