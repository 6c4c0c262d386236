"""kopf handlers: wire Function, Version and SecurityPolicy events to the reconcilers. Nothing else.

Every handler of a kind calls the same reconciler (create, update, resume), so what happens never
depends on which event arrived; changes elsewhere (a code ConfigMap, a RuntimeClass, a deleted
pool, a volume's claim) annotate the Functions they affect, which is an update. kopf's own
bookkeeping goes into annotations under `kopf.ember.run/` rather than status (the CRDs' status
schemas do not keep unknown fields), and that prefix differs from `ember.run/` on purpose: kopf
ignores changes to annotations under its storage prefix, and `ember.run/*` annotations are how
one object asks another's handler to run again.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import datetime as dt
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

import kopf

from ember.api.common import GROUP, VERSION
from ember.controller import pool_size, routes
from ember.controller.function import reconcile_function
from ember.controller.kube import Kube, KubeError, Obj, connect
from ember.controller.policy import notify_functions, reconcile_security_policy
from ember.controller.settings import Settings
from ember.controller.status import EventType
from ember.controller.version import reconcile_version, report_version_pods
from ember.resources import labels
from ember.resources.state_volume import COMPONENT as STATE_CLAIM_COMPONENT

log = logging.getLogger(__name__)
KOPF_PREFIX = "kopf.ember.run"
RETRY_DELAY_S = 2.0
NUDGE_ANNOTATION = labels.NUDGE_ANNOTATION
ROUTE_NUDGE_AGAIN_S = 2.0  # a deleted Function's route peers are asked again after this

Reconciler = Callable[..., Awaitable[dict[str, Any]]]


def record_event(obj: Mapping[str, Any], *, type: EventType, reason: str, message: str) -> None:
    """A Kubernetes Event on the object (posted by kopf in the background)."""
    kopf.event(kopf.Body(cast(Any, dict(obj))), type=type, reason=reason, message=message)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


async def _run(reconciler: Reconciler, config: Settings, memo: Any, body: Any, patch: Any) -> None:
    kube: Kube = memo.kube
    plain: Obj = {
        "apiVersion": body.get("apiVersion"),
        "kind": body.get("kind"),
        "metadata": dict(body.get("metadata", {})),
        "spec": dict(body.get("spec") or {}),
        "status": dict(body.get("status") or {}),
    }
    try:
        status = await reconciler(kube, config, plain, now=_now(), record=record_event)
    except KubeError as err:
        raise kopf.TemporaryError(str(err), delay=RETRY_DELAY_S) from err
    for key, value in status.items():
        patch.status[key] = value


def register(registry: kopf.OperatorRegistry, config: Settings) -> None:
    """Register Ember's handlers on a kopf registry."""

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
        # kopf's own readers (no client library): in-cluster token first, then KUBECONFIG. In a
        # pod, the API server's address is taken from the environment as client-go does, so the
        # operator needs no cluster DNS (kopf's default is https://kubernetes.default.svc).
        info: kopf.ConnectionInfo | None = kopf.login_with_service_account(**kwargs)
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT")
        if info is not None and host and port:
            server = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
            info = dataclasses.replace(info, server=server)
        return info or kopf.login_with_kubeconfig(**kwargs)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PREFIX)
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix=KOPF_PREFIX, key="last-handled-configuration"
        )
        settings.persistence.finalizer = f"{KOPF_PREFIX}/finalizer"
        settings.posting.level = logging.WARNING
        settings.watching.server_timeout = 60
        memo.kube = Kube(await connect())
        log.info(
            "operator started keep_versions=%d namespaces=%s",
            config.keep_versions,
            ",".join(config.namespaces) or "*",
        )

    @kopf.on.cleanup(registry=registry)
    async def cleanup(memo: Any, **_: Any) -> None:
        kube: Kube | None = getattr(memo, "kube", None)
        if kube is not None:
            await kube.close()

    for plural, reconciler in (
        ("functions", reconcile_function),
        ("versions", reconcile_version),
        ("securitypolicies", reconcile_security_policy),
    ):
        _register_kind(registry, config, plural, reconciler)
    _register_nudges(registry)
    _register_pod_counts(registry)
    _register_pool_sizes(registry, config)

    # Raw watch events, not on.delete: Functions and SecurityPolicies carry no finalizer (see
    # _register_nudges), so a deletion may leave no deleting object for a deletion handler to see,
    # while the DELETED event always comes (with the object's last state).
    @kopf.on.event(GROUP, VERSION, "functions", registry=registry)
    async def function_deleted(event: Any, body: Any, memo: Any, **_: Any) -> None:
        if event.get("type") != "DELETED":
            return
        meta = body.get("metadata", {})
        if not (body.get("spec") or {}).get("http"):
            return
        # Twice: a nudge that lands while the peer's own reconcile runs has been seen lost (once in
        # CI: the peer never reconciled again); the second asks only peers still refused, after
        # that reconcile has ended.
        for delay in (0.0, ROUTE_NUDGE_AGAIN_S):
            await asyncio.sleep(delay)
            try:
                await routes.function_deleted(memo.kube, meta["namespace"], meta["name"], _now().isoformat())
            except KubeError as err:
                log.warning(
                    "function=%s/%s deleted, route peers not notified: %s", meta["namespace"], meta["name"], err
                )

    @kopf.on.event(GROUP, VERSION, "securitypolicies", registry=registry)
    async def policy_deleted(event: Any, body: Any, memo: Any, **_: Any) -> None:
        if event.get("type") != "DELETED":
            return
        meta = body.get("metadata", {})
        try:
            await notify_functions(memo.kube, config, meta["namespace"], meta["name"], "deleted")
        except KubeError as err:
            log.warning("policy=%s/%s deleted, functions not notified: %s", meta["namespace"], meta["name"], err)


def _register_kind(registry: kopf.OperatorRegistry, config: Settings, plural: str, reconciler: Reconciler) -> None:
    async def changed(body: Any, patch: Any, memo: Any, **_: Any) -> None:
        await _run(reconciler, config, memo, body, patch)

    for decorator in (kopf.on.resume, kopf.on.create, kopf.on.update):
        decorator(GROUP, VERSION, plural, registry=registry, id=f"{plural}-reconcile")(changed)


def _register_nudges(registry: kopf.OperatorRegistry) -> None:
    """Changes outside a Function that change its desired state annotate it, so that it reconciles.

    Deliberately no kopf timers: kopf puts a finalizer on every object a timer serves, and a
    finalizer would leave Functions undeletable whenever the operator is not running.
    """

    @kopf.index(GROUP, VERSION, "functions", registry=registry, id="functions_by_configmap")
    def functions_by_configmap(
        namespace: str | None, name: str, spec: Any, **_: Any
    ) -> dict[tuple[str | None, str], str] | None:
        ref = ((spec or {}).get("code") or {}).get("configMapRef")
        return {(namespace, ref["name"]): name} if ref else None

    @kopf.index(GROUP, VERSION, "functions", registry=registry, id="functions_by_namespace")
    def functions_by_namespace(namespace: str | None, name: str, **_: Any) -> dict[str | None, str]:
        return {namespace: name}

    @kopf.on.event("", "v1", "configmaps", registry=registry, labels={labels.MANAGED_BY: kopf.ABSENT})
    async def code_configmap_changed(
        *, type: str, namespace: str | None, name: str, body: Any, memo: Any, **kwargs: Any
    ) -> None:
        if not type or namespace is None:
            return  # the initial listing: every Function is reconciled on resume anyway
        token = f"configmap/{name}@{body.get('metadata', {}).get('resourceVersion', type)}"
        for function in kwargs["functions_by_configmap"].get((namespace, name), []):
            await _nudge(memo, namespace, function, token)

    @kopf.on.event("node.k8s.io", "v1", "runtimeclasses", registry=registry)
    async def runtime_class_changed(*, type: str, name: str, memo: Any, **kwargs: Any) -> None:
        if not type:
            return
        for namespace, functions in list(kwargs["functions_by_namespace"].items()):
            for function in functions:
                await _nudge(memo, namespace, function, f"runtimeclass/{name}:{type}")

    pool_labels = {labels.COMPONENT: "pool", labels.MANAGED_BY: labels.MANAGER}

    @kopf.on.event("apps", "v1", "deployments", registry=registry, labels=pool_labels)
    async def pool_deleted(type: str, namespace: str | None, name: str, body: Any, memo: Any, **_: Any) -> None:
        if type != "DELETED" or namespace is None:
            return
        for owner in body.get("metadata", {}).get("ownerReferences") or []:
            if owner.get("kind") == "Function":
                await _nudge(memo, namespace, owner["name"], f"pool/{name}:deleted")

    state_labels = {labels.COMPONENT: STATE_CLAIM_COMPONENT, labels.MANAGED_BY: labels.MANAGER}

    @kopf.on.event("", "v1", "persistentvolumeclaims", registry=registry, labels=state_labels)
    async def state_claim_changed(type: str, namespace: str | None, name: str, body: Any, memo: Any, **_: Any) -> None:
        # A Function's claim bound, grew, was lost or deleted: its StateVolumeReady follows. The
        # token names the claim's state, so a status write that changes nothing nudges no one twice.
        if not type or namespace is None:
            return
        status = body.get("status") or {}
        capacity = (status.get("capacity") or {}).get("storage")
        state = "deleted" if type == "DELETED" else f"{status.get('phase')}/{capacity}"
        for owner in body.get("metadata", {}).get("ownerReferences") or []:
            if owner.get("kind") == "Function":
                await _nudge(memo, namespace, owner["name"], f"pvc/{name}:{state}")


COUNT_ATTEMPTS = 4  # a Version's pod count, on an API error: 0.5, 1, 2 s apart


def _register_pod_counts(registry: kopf.OperatorRegistry) -> None:
    """Pods of a Version (claimed and specialized by activators) are counted into its status.readyPods.

    kopf runs the handlers of different pods concurrently; one lock per Version orders the counts,
    so an older count never lands after a newer one."""
    locks: collections.defaultdict[tuple[str, str, str], asyncio.Lock] = collections.defaultdict(asyncio.Lock)

    @kopf.on.event(
        "", "v1", "pods", registry=registry, labels={labels.FUNCTION: kopf.PRESENT, labels.VERSION: kopf.PRESENT}
    )
    async def version_pod_changed(*, namespace: str | None, body: Any, memo: Any, **_: Any) -> None:
        pod_labels = body.get("metadata", {}).get("labels") or {}
        if namespace is None:
            return
        function, version = pod_labels[labels.FUNCTION], pod_labels[labels.VERSION]
        # kopf never retries an event handler, and the next pod event may be long in coming: a
        # failed count is retried here, so a transient API error does not leave readyPods stale.
        for attempt in range(COUNT_ATTEMPTS):
            try:
                async with locks[(namespace, function, version)]:
                    await report_version_pods(memo.kube, namespace, function, version)
                return
            except KubeError as err:
                log.warning(
                    "pod=%s/%s: Version pods not counted (attempt %d of %d): %s",
                    namespace,
                    body["metadata"].get("name"),
                    attempt + 1,
                    COUNT_ATTEMPTS,
                    err,
                )
                if attempt + 1 < COUNT_ATTEMPTS:
                    await asyncio.sleep(0.5 * 2**attempt)


def _register_pool_sizes(registry: kopf.OperatorRegistry, config: Settings) -> None:
    """Pool size is the operator's: every activator Lease event resizes the namespace's pools
    (`ember.controller.pool_size`). One lock per namespace: a resize computed from an older listing
    never lands after a newer one."""
    locks: collections.defaultdict[str, asyncio.Lock] = collections.defaultdict(asyncio.Lock)
    lease_labels = {labels.COMPONENT: "activator", labels.MANAGED_BY: labels.MANAGER}

    @kopf.on.event("coordination.k8s.io", "v1", "leases", registry=registry, labels=lease_labels)
    async def activator_lease_changed(*, namespace: str | None, memo: Any, **_: Any) -> None:
        if namespace is None:
            return
        try:
            async with locks[namespace]:
                await pool_size.reconcile_pool_sizes(memo.kube, config, namespace, now=_now())
        except KubeError as err:
            log.warning("namespace=%s pools not resized: %s", namespace, err)


async def _nudge(memo: Any, namespace: str, function: str, token: str) -> None:
    try:
        await memo.kube.annotate_custom("functions", namespace, function, {NUDGE_ANNOTATION: token})
    except KubeError as err:
        log.warning("function=%s/%s not nudged (%s): %s", namespace, function, token, err)
