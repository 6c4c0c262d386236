"""Versions: each one's code ConfigMap, its CodeReady/Loaded/Ready (and PortionsLoaded) conditions, and its pod counts.

A Version is Ready when its code is stored *and* a pod has loaded it: the activators specialize
pods and label them with the Version, kubelets report them Ready, and this module counts them
(`report_version_pods`, on every such pod's event) into `status.readyPods`, marking the Version
`loaded` the first time so it stays Ready at zero pods. A Version that changes phase stores its
status first and then annotates its Function, whose reconcile reads that status.

Right-sizing (`ember.scaling.rightsize`): activators publish their advice on the Version's
`ember.run/sizing` annotation (rate-limited by them; an annotation change reconciles the
Version); this module merges it into `status.recommendation` (the largest size any activator saw
run out of memory is kept) and writes `status.resources`, the size its new pods get: the spec's,
or with `autoResize` the recommendation's, within the policy's `limits.maxMemoryMiB`. When that
size changes it stores the status, records a `Resized` Event and annotates the Function, whose
reconcile then makes the pool of the new size (`ember.controller.pools`).
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from typing import Any

from pydantic import ValidationError

from ember.api.common import ConditionStatus
from ember.api.function import FunctionSpec
from ember.api.version import ResourceRecommendation, Version, VersionResources, code_hash, version_name
from ember.controller.kube import Conflict, Kube, Obj
from ember.controller.settings import Settings
from ember.controller.status import Recorder, conditions_of, resource_of, status_changed, wire_conditions
from ember.resources import conditions as cond
from ember.resources import labels
from ember.resources.code import (
    CodeError,
    CodeFiles,
    code_configmap,
    code_configmap_name,
    code_configmap_problem,
    files_from_configmap,
    version_files,
)
from ember.resources.meta import pod_ready
from ember.scaling.rightsize import applied_resources, decode_report, merge_reports, parse_recommendation

log = logging.getLogger(__name__)

VERSION_TRANSITION_ANNOTATION = f"{labels.PREFIX}/last-version-transition"


async def _ensure_code(kube: Kube, version: Version) -> tuple[ConditionStatus, str, str]:
    spec: FunctionSpec = version.spec.function
    ns = version.metadata.namespace
    if spec.code.url is not None:
        return "True", cond.Reason.CODE_BY_URL, "Code is fetched by the agent from spec.code.url and checked."
    cm_name = code_configmap_name(version.metadata.name)
    stored = await kube.get_configmap(ns, cm_name)
    if stored is not None:
        problem = code_configmap_problem(version, stored)
        if problem is not None:
            return "False", cond.Reason.NOT_OWNED, problem
        return "True", cond.Reason.CODE_STORED, f"Code is stored in ConfigMap {cm_name}."
    referenced: CodeFiles | None = None
    try:
        if spec.code.config_map_ref is not None:
            ref = spec.code.config_map_ref
            source = await kube.get_configmap(ns, ref.name)
            if source is None:
                return "False", cond.Reason.CODE_MISSING, f"ConfigMap {ref.name!r} with the code does not exist."
            referenced = files_from_configmap(source, key=ref.key)
            if code_hash(spec, version.spec.policy, referenced.digest()) != version.spec.code_hash:
                return (
                    "False",
                    cond.Reason.VERSION_FAILED,
                    f"ConfigMap {ref.name!r} changed after this Version was made; its code is gone "
                    "(a newer Version has the new code).",
                )
        files = version_files(spec, referenced)
    except CodeError as err:
        return "False", cond.Reason.INVALID_SPEC, str(err)
    if files is None:
        return "True", cond.Reason.CODE_BY_URL, "Code is fetched by the agent."
    try:
        await kube.create_configmap(code_configmap(version, files))
    except CodeError as err:
        return "False", cond.Reason.INVALID_SPEC, str(err)
    except Conflict:
        # made meanwhile: by a previous run that stopped before writing the status, or by someone else
        stored = await kube.get_configmap(ns, cm_name)
        if stored is None:
            return "Unknown", cond.Reason.RECONCILING, f"ConfigMap {cm_name} vanished while it was made; retrying."
        problem = code_configmap_problem(version, stored)
        if problem is not None:
            return "False", cond.Reason.NOT_OWNED, problem
    return "True", cond.Reason.CODE_STORED, f"Code is stored in ConfigMap {cm_name}."


async def reconcile_version(
    kube: Kube, settings: Settings, body: Obj, *, now: dt.datetime, record: Recorder
) -> dict[str, Any]:
    """Converge one Version: its code ConfigMap and conditions; returns its new status (a patch)."""
    generation = body.get("metadata", {}).get("generation")
    old_status = body.get("status") or {}
    old_conditions = conditions_of(old_status)
    try:
        version = Version.model_validate(resource_of(body))
    except ValidationError as err:
        conditions = cond.mark_false(
            old_conditions, cond.READY, cond.Reason.INVALID_SPEC, f"Invalid spec: {err}", generation=generation, now=now
        )
        return {"observedGeneration": generation, "conditions": wire_conditions(conditions), "phase": "Failed"}

    ns = version.metadata.namespace
    code_status, code_reason, code_message = await _ensure_code(kube, version)
    conditions = cond.set_condition(
        old_conditions,
        type_=cond.CODE_READY,
        status=code_status,
        reason=code_reason,
        message=code_message,
        generation=generation,
        now=now,
    )
    annotations = version.metadata.annotations or {}
    # Counted here for Loaded only: `status.readyPods` has one writer, report_version_pods (a count
    # returned from here would land after the handler and could overwrite a newer one).
    ready_pods = await _count_ready_pods(kube, ns, version.spec.function_name, version.spec.number)
    loaded_status, loaded_reason, loaded_message = cond.version_loaded(
        code_hash=version.spec.code_hash,
        loaded_mark=annotations.get(labels.LOADED_ANNOTATION),
        load_error=_load_error(annotations.get(labels.LOAD_ERROR_ANNOTATION)),
        ready_pods=ready_pods,
    )
    conditions = cond.set_condition(
        conditions,
        type_=cond.LOADED,
        status=loaded_status,
        reason=loaded_reason,
        message=loaded_message,
        generation=generation,
        now=now,
    )
    portions = [portion.name for portion in version.spec.function.portions]
    if portions:
        portions_status, portions_reason, portions_message = cond.portions_loaded(
            code_hash=version.spec.code_hash,
            portions=portions,
            loaded_marks=_per_portion(annotations, labels.PORTION_LOADED_PREFIX),
            load_errors={
                portion: error
                for portion, mark in _per_portion(annotations, labels.PORTION_LOAD_ERROR_PREFIX).items()
                if (error := _load_error(mark)) is not None
            },
        )
        conditions = cond.set_condition(
            conditions,
            type_=cond.PORTIONS_LOADED,
            status=portions_status,
            reason=portions_reason,
            message=portions_message,
            generation=generation,
            now=now,
        )
        portions_changed = status_changed(old_conditions, conditions, cond.PORTIONS_LOADED)
        if portions_changed is not None and portions_changed.status == "False":
            record(body, type="Warning", reason=portions_changed.reason, message=portions_changed.message)
    conditions = cond.with_ready(conditions, cond.VERSION_DEPENDENTS, generation=generation, now=now)
    if code_status == "False" and code_reason in cond.PERMANENT_REASONS:
        conditions = cond.mark_false(conditions, cond.READY, code_reason, code_message, generation=generation, now=now)
    phase = cond.version_phase(conditions)
    recommendation, resources = _sizing(version, annotations.get(labels.SIZING_ANNOTATION), old_status)
    changed = status_changed(old_conditions, conditions, cond.READY)
    if changed is not None and changed.status != "Unknown":
        record(
            body,
            type="Normal" if changed.status == "True" else "Warning",
            reason=changed.reason,
            message=changed.message,
        )
    status: dict[str, Any] = {
        "observedGeneration": generation,
        "conditions": wire_conditions(conditions),
        "phase": phase,
        "resources": resources.to_wire(),
    }
    if recommendation is not None:
        status["recommendation"] = recommendation.to_wire()
    resized = _stored_memory(old_status) not in (None, resources.memory_mib)
    if resized:
        record(
            body,
            type="Normal",
            reason="Resized",
            message=f"New pods get {resources.memory_mib} MiB ({resources.reason}).",
        )
    if old_status.get("phase") != phase or resized:
        # The Function's reconcile reads this status: it must be stored before the Function is nudged
        # (kopf writes the returned status only after the handler, which would race the nudge).
        await kube.patch_custom_status("versions", ns, version.metadata.name, status)
        await kube.annotate_custom(
            "functions",
            ns,
            version.spec.function_name,
            {VERSION_TRANSITION_ANNOTATION: f"{version.spec.number}:{phase}:{resources.memory_mib}Mi"},
        )
    return status


def _sizing(
    version: Version, report: str | None, old_status: dict[str, Any]
) -> tuple[ResourceRecommendation | None, VersionResources]:
    """The Version's right-sizing advice (an activator's report on `labels.SIZING_ANNOTATION`, merged
    with what is stored: `merge_reports`) and the size its new pods get (`applied_resources`).

    A report that cannot be read is ignored (logged): the stored advice stays."""
    max_memory = version.spec.policy.limits.max_memory_mib
    stored = parse_recommendation(old_status.get("recommendation"))
    reported = decode_report(report)
    if report and reported is None:
        log.warning(
            "version=%s/%s: annotation %s is not a recommendation; ignored",
            version.metadata.namespace,
            version.metadata.name,
            labels.SIZING_ANNOTATION,
        )
    advice = stored if reported is None else merge_reports(stored, reported, max_memory_mib=max_memory)
    return advice, applied_resources(version.spec.function.resources, max_memory_mib=max_memory, advice=advice)


def _stored_memory(status: dict[str, Any]) -> int | None:
    """`status.resources.memoryMiB` as stored, None when absent or unreadable."""
    resources = status.get("resources")
    memory = resources.get("memoryMiB") if isinstance(resources, dict) else None
    return memory if isinstance(memory, int) and not isinstance(memory, bool) else None


def _load_error(raw: str | None) -> dict[str, Any] | None:
    """The activator's load-error mark (`labels.LOAD_ERROR_ANNOTATION`), or None when absent or unreadable."""
    if not raw:
        return None
    try:
        parsed = json.loads(raw)
    except ValueError:
        return {"codeHash": None, "message": raw}
    return parsed if isinstance(parsed, dict) else None


def _per_portion(annotations: dict[str, str], prefix: str) -> dict[str, str]:
    """The annotations under `prefix` (`labels.PORTION_LOADED_PREFIX`, `PORTION_LOAD_ERROR_PREFIX`), by portion."""
    return {key.removeprefix(prefix): value for key, value in annotations.items() if key.startswith(prefix)}


async def _ready_portions(kube: Kube, namespace: str, function: str, number: int) -> set[str]:
    """The portions of a Version with a specialized, ready pod (`labels.PORTION` names the portion)."""
    selector = (
        f"{labels.FUNCTION}={function},{labels.VERSION}={number},{labels.STATE}={labels.STATE_SPECIALIZED},"
        f"{labels.PORTION}"
    )
    pods = await kube.list_pods(namespace, label_selector=selector)
    return {pod["metadata"]["labels"][labels.PORTION] for pod in pods if pod_ready(pod)}


async def _count_ready_pods(kube: Kube, namespace: str, function: str, number: int) -> int:
    """A Version's specialized pods that are ready (activators specialize them, kubelets report Ready);
    its portions' pods are not (`labels.PORTION`)."""
    selector = (
        f"{labels.FUNCTION}={function},{labels.VERSION}={number},{labels.STATE}={labels.STATE_SPECIALIZED},"
        f"!{labels.PORTION}"
    )
    return sum(1 for pod in await kube.list_pods(namespace, label_selector=selector) if pod_ready(pod))


async def report_version_pods(kube: Kube, namespace: str, function: str, version_label: str) -> int | None:
    """Count a Version's specialized, ready pods into its `status.readyPods` (written only on change).

    Called on every event of a pod labelled with a Function and Version (activators claim, specialize
    and delete them). Returns the count, or None when the label names no Version."""
    try:
        number = int(version_label)
    except ValueError:
        number = 0
    if number < 1:
        log.warning("pod labelled %s=%r in %s: not a Version number; ignored", labels.VERSION, version_label, namespace)
        return None
    name = version_name(function, number)
    version = await kube.get_custom("versions", namespace, name)
    if version is None:
        return None
    ready = await _count_ready_pods(kube, namespace, function, number)
    if (version.get("status") or {}).get("readyPods", 0) != ready:
        await kube.patch_custom_status("versions", namespace, name, {"readyPods": ready})
    code_hash_ = (version.get("spec") or {}).get("codeHash")
    annotations = version.get("metadata", {}).get("annotations") or {}
    if ready > 0 and code_hash_ and annotations.get(labels.LOADED_ANNOTATION) != code_hash_:
        # The lasting evidence that the code loads; the annotation makes kopf reconcile the Version.
        await kube.annotate_custom("versions", namespace, name, {labels.LOADED_ANNOTATION: code_hash_})
    if code_hash_ and ((version.get("spec") or {}).get("function") or {}).get("portions"):
        marks = {
            labels.PORTION_LOADED_PREFIX + portion: code_hash_
            for portion in await _ready_portions(kube, namespace, function, number)
            if annotations.get(labels.PORTION_LOADED_PREFIX + portion) != code_hash_
        }
        if marks:  # the same evidence per portion (PortionsLoaded)
            await kube.annotate_custom("versions", namespace, name, marks)
    return ready
