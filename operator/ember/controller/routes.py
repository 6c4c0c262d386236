"""HTTP routes in a cluster: which of a Function's routes its namespace's activator serves.

The activator of a namespace serves the routes of all its Functions from one table
(`ember.resources.routes.compile_routes`), the older Function (creationTimestamp, then name)
keeping a route two of them claim. The operator builds the same table from the same Functions
so that `RoutesAccepted` tells the truth: True with the routes served, or False, `RouteConflict`,
naming each refused route and the Function that has it. A change of one Function's routes can
change another's outcome (a conflict appears, or goes with a deleted Function): the Functions
whose stored condition no longer matches are nudged to reconcile again, which converges since
each then finds its condition right.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from pydantic import ValidationError

from ember.api.function import Function
from ember.controller.kube import Kube, KubeError, Obj
from ember.controller.status import conditions_of, resource_of
from ember.resources import conditions as cond
from ember.resources import labels
from ember.resources.routes import Compiled, compile_routes, function_routes

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Routes:
    served: tuple[str, ...]  # route keys, e.g. "GET /users/{id}"
    refused: tuple[str, ...]  # one sentence each


def _order(fn: Function) -> tuple[str, str]:
    return (fn.metadata.creation_timestamp or "9999", fn.metadata.name)


def compile_namespace(functions: Sequence[Function]) -> Compiled:
    """The namespace's route table as its activator builds it (oldest Function first)."""
    return compile_routes(
        function_routes(fn.metadata.namespace, fn.metadata.name, fn.spec.http)
        for fn in sorted(functions, key=_order)
        if fn.spec.http is not None
    )


async def routes_of(kube: Kube, fn: Function, token: str) -> Routes:
    """`fn`'s routes as its namespace's activator serves them; peers whose outcome changed are nudged
    (with `token`, which must differ between runs for the nudge to be an update)."""
    ns = fn.metadata.namespace
    items = await kube.list_custom("functions", ns)
    peers: dict[str, tuple[Function, Obj]] = {}
    for item in items:
        name = item["metadata"]["name"]
        if name == fn.metadata.name or item["metadata"].get("deletionTimestamp"):
            continue  # a Function being deleted serves nothing (its activator dropped it)
        try:
            peers[name] = (Function.model_validate(resource_of(item)), item)
        except ValidationError:
            continue  # an invalid Function serves no routes (and is told so itself)
    compiled = compile_namespace([fn, *(p for p, _ in peers.values())])
    for name, (peer, item) in peers.items():
        stored = cond.find(conditions_of(item.get("status") or {}), cond.ROUTES_ACCEPTED)
        refused = (ns, name) in compiled.refused
        now_says = None if peer.spec.http is None else ("False" if refused else "True")
        if (stored.status if stored is not None else None) != now_says and now_says is not None:
            try:
                await kube.annotate_custom("functions", ns, name, {labels.NUDGE_ANNOTATION: f"routes-{token}"})
            except KubeError as err:
                log.warning("function=%s/%s not nudged after a route change: %s", ns, name, err)
    key = (ns, fn.metadata.name)
    return Routes(compiled.accepted.get(key, ()), compiled.refused.get(key, ()))


async def function_deleted(kube: Kube, namespace: str, name: str, token: str) -> None:
    """A Function with routes is gone: the Functions refused a route may have it now."""
    for item in await kube.list_custom("functions", namespace):
        peer = item["metadata"]["name"]
        stored = cond.find(conditions_of(item.get("status") or {}), cond.ROUTES_ACCEPTED)
        if stored is not None and stored.status == "False" and peer != name:
            try:
                await kube.annotate_custom("functions", namespace, peer, {labels.NUDGE_ANNOTATION: f"routes-{token}"})
            except KubeError as err:
                log.warning("function=%s/%s not nudged after %s was deleted: %s", namespace, peer, name, err)
