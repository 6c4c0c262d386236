"""The API server itself rejects invalid Ember resources with the CRDs' CEL messages (no operator runs).

Each bad body has a good twin that the same API server accepts, so a rule that rejects everything
would fail here too.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from kubernetes.client.exceptions import ApiException
from tests.apiserver.operator_harness import Ember, crds, ember, hello_function, ns

from ember.api.function import Function
from ember.api.security_policy import DEFAULT_POLICY
from ember.api.version import code_hash
from ember.resources.version import build_version

__all__ = ["crds", "ember", "ns"]

GOOD_FUNCTION = hello_function("fn")
GOOD_POLICY: dict[str, Any] = {"kind": "SecurityPolicy", "metadata": {"name": "pol"}, "spec": {"sandbox": "gvisor"}}


def _with(base: dict[str, Any], **spec: Any) -> dict[str, Any]:
    body = copy.deepcopy(base)
    body["spec"].update(spec)
    return body


def _portion(name: str, *calls: str) -> dict[str, Any]:
    return {"name": name, "handler": f"main.{name}", "securityPolicyRef": {"name": "p"}, "calls": list(calls)}


def _rejection(err: ApiException) -> str:
    assert err.status == 422, f"expected 422 Unprocessable Entity, got {err.status}"
    return str(json.loads(err.body)["message"])


@pytest.mark.parametrize(
    ("plural", "body", "message"),
    [
        pytest.param(
            "functions",
            _with(GOOD_FUNCTION, scaling={"minScale": 5, "maxScale": 3}),
            "spec.scaling.minScale must not exceed spec.scaling.maxScale",
            id="min-scale-above-max",
        ),
        pytest.param(
            "functions",
            _with(GOOD_FUNCTION, code={"inline": "x", "configMapRef": {"name": "c"}}),
            "spec.code must set exactly one of inline, configMapRef, url, path",
            id="two-code-sources",
        ),
        pytest.param(
            "functions",
            _with(GOOD_FUNCTION, code={"url": "https://example.invalid/c.zip"}),
            "spec.code.url requires spec.code.sha256",
            id="url-without-sha256",
        ),
        pytest.param(
            "functions",
            _with(GOOD_FUNCTION, traffic=[{"version": 1, "percent": 60}, {"latest": True, "percent": 30}]),
            "spec.traffic percents must sum to 100",
            id="traffic-sum-not-100",
        ),
        pytest.param(
            "functions",
            _with(GOOD_FUNCTION, traffic=[{"version": 1, "latest": True, "percent": 100}]),
            "each spec.traffic entry sets exactly one of version or latest: true",
            id="traffic-version-and-latest",
        ),
        pytest.param(
            "functions",
            _with(GOOD_FUNCTION, portions=[_portion("parse"), _portion("parse")]),
            "spec.portions: names must be unique",
            id="portion-twice",
        ),
        pytest.param(
            "functions",
            _with(GOOD_FUNCTION, portions=[_portion("parse", "pay")]),
            "spec.portions[].calls must name other portions of this Function",
            id="portion-calls-unknown",
        ),
        pytest.param(
            "functions",
            _with(GOOD_FUNCTION, portions=[_portion("parse", "parse")]),
            "spec.portions[].calls must name other portions of this Function",
            id="portion-calls-itself",
        ),
        pytest.param(
            "securitypolicies",
            _with(GOOD_POLICY, sandbox="none"),
            "spec.sandbox none requires spec.allowUnsandboxed: true",
            id="unsandboxed-not-allowed",
        ),
        pytest.param(
            "securitypolicies",
            _with(GOOD_POLICY, egress={"mode": "allowList", "allow": [{"cidr": "10.0.0.0/8", "host": "a.example"}]}),
            "an egress rule sets exactly one of cidr or host",
            id="egress-cidr-and-host",
        ),
        pytest.param(
            "securitypolicies",
            _with(GOOD_POLICY, egress={"mode": "none", "allow": [{"cidr": "10.0.0.0/8"}]}),
            "spec.egress.allow is only used with mode: allowList",
            id="allow-list-without-mode",
        ),
    ],
)
def test_invalid_resource_is_rejected_with_its_cel_message(
    ember: Ember, plural: str, body: dict[str, Any], message: str
) -> None:
    with pytest.raises(ApiException) as caught:
        ember.create(plural, copy.deepcopy(body))
    assert message in _rejection(caught.value)


@pytest.mark.parametrize(
    ("plural", "body"),
    [
        pytest.param("functions", GOOD_FUNCTION, id="function"),
        pytest.param(
            "functions",
            _with(GOOD_FUNCTION, traffic=[{"version": 1, "percent": 70}, {"latest": True, "percent": 30}]),
            id="function-split-traffic",
        ),
        pytest.param(
            "functions",
            _with(GOOD_FUNCTION, portions=[_portion("parse"), _portion("charge", "parse")]),
            id="function-with-portions",
        ),
        pytest.param("securitypolicies", _with(GOOD_POLICY, sandbox="none", allowUnsandboxed=True), id="policy"),
    ],
)
def test_valid_twin_is_accepted(ember: Ember, plural: str, body: dict[str, Any]) -> None:
    created = ember.create(plural, copy.deepcopy(body))
    assert created["metadata"]["uid"]


def test_version_spec_is_immutable(ember: Ember) -> None:
    fn = ember.create("functions", copy.deepcopy(GOOD_FUNCTION))
    model = Function.model_validate({k: fn[k] for k in ("apiVersion", "kind", "metadata", "spec")})
    version = ember.create(
        "versions",
        build_version(model, number=1, code_hash=code_hash(model.spec, DEFAULT_POLICY), policy=DEFAULT_POLICY),
    )
    with pytest.raises(ApiException) as caught:
        ember.patch("versions", version["metadata"]["name"], {"spec": {"number": 2}})
    assert "a Version's spec is immutable" in _rejection(caught.value)
    labelled = ember.patch("versions", version["metadata"]["name"], {"metadata": {"labels": {"x": "y"}}})
    assert labelled["metadata"]["labels"]["x"] == "y"
