"""The chart's activator RBAC on Leases: exactly what the holder Lease and the sweep use, nothing more.

`helm install` of charts/ember into the real API server (fixtures of test_helm_chart), then
SubjectAccessReviews for the activator ServiceAccount. That the pod source runs on the chart's RBAC
end to end (Lease created on start, deleted on close) is test_helm_chart's pod-source test.
"""

from __future__ import annotations

import pytest
from kubernetes import client
from tests.apiserver.operator_harness import crds
from tests.apiserver.test_helm_chart import helm, release

__all__ = ["crds", "helm", "release"]


def _allowed(api: client.ApiClient, user: str, verb: str) -> bool:
    attributes = {"verb": verb, "group": "coordination.k8s.io", "resource": "leases", "namespace": "team"}
    review = client.AuthorizationV1Api(api).create_subject_access_review(
        {"spec": {"user": user, "resourceAttributes": attributes}}
    )
    return bool(review.status.allowed)


@pytest.mark.parametrize(
    ("verb", "allowed"),
    [
        pytest.param("get", True, id="get"),
        pytest.param("list", True, id="list-for-the-sweep"),
        pytest.param("create", True, id="create-own"),
        pytest.param("update", True, id="renew"),
        pytest.param("delete", True, id="delete-expired-and-own"),
        pytest.param("watch", False, id="no-watch"),
        pytest.param("patch", False, id="no-patch"),
        pytest.param("deletecollection", False, id="no-deletecollection"),
    ],
)
def test_activator_lease_verbs_are_least_privilege(
    release: tuple[str, str], crds: client.ApiClient, verb: str, allowed: bool
) -> None:
    name, namespace = release
    user = f"system:serviceaccount:{namespace}:{name}-ember-activator"
    assert _allowed(crds, user, verb) is allowed
