"""Function → Version planning and building (pure). Creating them on a real API server: tests/apiserver."""

from __future__ import annotations

from typing import Any

import pytest

from ember.api.function import Function
from ember.api.security_policy import DEFAULT_POLICY
from ember.api.version import Version, code_hash
from ember.resources.meta import MissingUid
from ember.resources.version import build_version, plan_version
from tests.unit.resources.conftest import function_body

H1 = "sha256:" + "1" * 64
H2 = "sha256:" + "2" * 64


def _version(number: int, hash_: str) -> Version:
    fn = Function.model_validate(function_body())
    return Version.model_validate(build_version(fn, number=number, code_hash=hash_, policy=DEFAULT_POLICY))


@pytest.mark.parametrize(
    ("existing", "desired", "last_number", "create", "latest_after"),
    [
        pytest.param([], H1, None, 1, 1, id="first-version"),
        pytest.param([(1, H1)], H1, 1, None, 1, id="same-content-no-new-version"),
        pytest.param([(1, H1)], H2, 1, 2, 2, id="changed-content-new-version"),
        pytest.param([(1, H1), (2, H2)], H1, 2, 3, 3, id="revert-to-old-content-mints-new"),
        pytest.param([(3, H1), (1, H2)], H1, 3, None, 3, id="order-does-not-matter"),
        pytest.param([(2, H1)], H2, 5, 6, 6, id="numbers-never-reused-after-manual-delete"),
        pytest.param([], H1, 4, 5, 5, id="all-deleted-continues-numbering"),
    ],
)
def test_plan_version(
    existing: list[tuple[int, str]], desired: str, last_number: int | None, create: int | None, latest_after: int
) -> None:
    plan = plan_version([_version(n, h) for n, h in existing], desired, last_number=last_number)
    assert plan.create == create
    assert plan.latest_after == latest_after


def test_build_version_is_owned_labelled_and_valid(make_function: Any) -> None:
    fn = make_function(name="hello")
    digest = code_hash(fn.spec, DEFAULT_POLICY)
    body = build_version(fn, number=3, code_hash=digest, policy=DEFAULT_POLICY)
    assert body["metadata"]["name"] == "hello-v3"
    assert body["metadata"]["namespace"] == "ns1"
    assert body["metadata"]["labels"]["ember.run/function"] == "hello"
    assert body["metadata"]["labels"]["ember.run/version"] == "3"
    (owner,) = body["metadata"]["ownerReferences"]
    assert owner == {
        "apiVersion": "ember.run/v1alpha1",
        "kind": "Function",
        "name": "hello",
        "uid": "uid-1",
        "controller": True,
        "blockOwnerDeletion": True,
    }
    assert body["spec"]["codeHash"] == digest
    assert body["spec"]["function"]["handler"] == "main.handler"


@pytest.mark.parametrize(
    ("uid", "number", "hash_", "error"),
    [
        pytest.param(None, 1, H1, MissingUid, id="unsaved-function-has-no-uid"),
        pytest.param("u", 0, H1, ValueError, id="number-zero"),
        pytest.param("u", 1, "md5:abc", ValueError, id="bad-hash-format"),
    ],
)
def test_build_version_rejects_bad_input(uid: str | None, number: int, hash_: str, error: type[Exception]) -> None:
    fn = Function.model_validate(function_body(uid=uid))
    with pytest.raises(error):
        build_version(fn, number=number, code_hash=hash_, policy=DEFAULT_POLICY)
