"""The operator against a real kube-apiserver keeps `RoutesAccepted` true to what the namespace's
activator serves: the later of two Functions claiming one route is refused, told who holds it,
and given the route as soon as the holder is deleted (a Function has no finalizer: the operator
learns of the deletion from the watch's DELETED event). The table itself is the unit tier's
(tests/unit/resources/test_routes.py); serving the routes, the local and cluster tiers'.
"""

from __future__ import annotations

import time
from typing import Any

from tests.apiserver.operator_harness import (  # the fixtures are used by name
    Ember,
    OperatorProcess,
    condition,
    crds,
    ember,
    eventually,
    hello_function,
    ns,
    operator,
)

__all__ = ["crds", "ember", "ns", "operator"]


def _routes(ember: Ember, name: str, status: str) -> dict[str, Any] | None:
    fn = ember.get("functions", name)
    return fn if condition(fn, "RoutesAccepted").get("status") == status else None


def test_a_refused_route_passes_on_when_its_holder_is_deleted(ember: Ember, operator: OperatorProcess) -> None:
    route = {"routes": [{"path": "/orders/{id}", "methods": ["GET"]}]}
    ember.create("functions", hello_function("first", http=route))
    eventually(lambda: _routes(ember, "first", "True"), what="first's routes accepted")
    ember.create("functions", hello_function("second", http=route))
    refused = eventually(lambda: _routes(ember, "second", "False"), what="second refused the route")
    found = condition(refused, "RoutesAccepted")
    assert found["reason"] == "RouteConflict"
    assert f"Function {ember.ns}/first" in found["message"]
    for _ in range(3):  # each hand-over, however the deletion and the reconcile interleave
        ember.custom.delete_namespaced_custom_object("ember.run", "v1alpha1", ember.ns, "functions", "first")
        accepted = eventually(lambda: _routes(ember, "second", "True"), timeout_s=30, what="second given the route")
        assert accepted["status"]["routes"] == ["GET /orders/{id}"]
        time.sleep(1.1)  # creationTimestamp has whole seconds: a tie goes by name, and "first" would win it
        ember.create("functions", hello_function("first", http=route))
        again = eventually(lambda: _routes(ember, "first", "False"), timeout_s=30, what="first, now later, refused")
        assert "Function " + ember.ns + "/second" in condition(again, "RoutesAccepted")["message"]
        ember.custom.delete_namespaced_custom_object("ember.run", "v1alpha1", ember.ns, "functions", "second")
        eventually(lambda: _routes(ember, "first", "True"), timeout_s=30, what="first given the route back")
        time.sleep(1.1)
        ember.create("functions", hello_function("second", http=route))
        eventually(lambda: _routes(ember, "second", "False"), timeout_s=30, what="second refused again")
