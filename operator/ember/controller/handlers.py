"""kopf handlers: wire Function, Version and SecurityPolicy events to the reconcilers. Nothing else.

Every handler of a kind calls the same reconciler (create, update, resume and a resync timer),
so what happens never depends on which event arrived. kopf's own bookkeeping goes into
annotations under `kopf.ember.run/` rather than status (the CRDs' status schemas do not keep
unknown fields), and that prefix differs from `ember.run/` on purpose: kopf ignores changes to
annotations under its storage prefix, and `ember.run/*` annotations are how one object asks
another's handler to run again.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

import kopf

from ember.api.common import GROUP, VERSION
from ember.controller import reconcile
from ember.controller.kube import Kube, KubeError, Obj, connect
from ember.controller.settings import Settings

log = logging.getLogger(__name__)
KOPF_PREFIX = "kopf.ember.run"
RETRY_DELAY_S = 2.0

Reconciler = Callable[..., Awaitable[dict[str, Any]]]


def record_event(obj: Mapping[str, Any], *, type: reconcile.EventType, reason: str, message: str) -> None:
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
        # kopf's own readers (no client library): in-cluster token first, then KUBECONFIG.
        info: kopf.ConnectionInfo | None = kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(
            **kwargs
        )
        return info

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
            "operator started keep_versions=%d resync_s=%s namespaces=%s",
            config.keep_versions,
            config.resync_seconds,
            ",".join(config.namespaces) or "*",
        )

    @kopf.on.cleanup(registry=registry)
    async def cleanup(memo: Any, **_: Any) -> None:
        kube: Kube | None = getattr(memo, "kube", None)
        if kube is not None:
            await kube.close()

    for plural, reconciler in (
        ("functions", reconcile.reconcile_function),
        ("versions", reconcile.reconcile_version),
        ("securitypolicies", reconcile.reconcile_security_policy),
    ):
        _register_kind(registry, config, plural, reconciler)

    @kopf.on.delete(GROUP, VERSION, "securitypolicies", registry=registry, optional=True)
    async def policy_deleted(body: Any, memo: Any, **_: Any) -> None:
        meta = body.get("metadata", {})
        try:
            await reconcile.notify_functions(memo.kube, config, meta["namespace"], meta["name"], "deleted")
        except KubeError as err:
            log.warning("policy=%s/%s deleted, functions not notified: %s", meta["namespace"], meta["name"], err)


def _register_kind(registry: kopf.OperatorRegistry, config: Settings, plural: str, reconciler: Reconciler) -> None:
    async def changed(body: Any, patch: Any, memo: Any, **_: Any) -> None:
        await _run(reconciler, config, memo, body, patch)

    async def resync(body: Any, patch: Any, memo: Any, **_: Any) -> None:
        await _run(reconciler, config, memo, body, patch)

    for decorator in (kopf.on.resume, kopf.on.create, kopf.on.update):
        decorator(GROUP, VERSION, plural, registry=registry, id=f"{plural}-reconcile")(changed)
    kopf.timer(
        GROUP,
        VERSION,
        plural,
        registry=registry,
        id=f"{plural}-resync",
        interval=config.resync_seconds,
        initial_delay=config.resync_seconds,
    )(resync)
