"""The two APIs' vocabularies over the one dispatch: invocation-type names and a sync reply's headers.

The dispatch itself (body limit, resolution, each type's outcome) runs over real sockets in
tests/local/activator/test_dispatch.py.
"""

from __future__ import annotations

import pytest

from ember.activator import ember_api, lambda_api
from ember.activator.agent_client import AgentReply
from ember.activator.config import ActivatorConfig
from ember.activator.dispatch import LAMBDA_INVOCATION_TYPES, HeaderNames, InvocationType
from ember.activator.invoke import Result
from ember.activator.metrics import Metrics
from ember.activator.registry import Registry
from ember.api.function import Function


def test_each_api_names_every_invocation_type() -> None:
    assert set(ember_api.INVOCATION_TYPES.values()) == set(InvocationType)
    assert set(LAMBDA_INVOCATION_TYPES.values()) == set(InvocationType)


def test_the_ember_api_also_accepts_lambdas_names() -> None:
    assert ember_api.INVOCATION_TYPES.items() >= LAMBDA_INVOCATION_TYPES.items()


def _result(**reply: str | None) -> Result:
    registry = Registry(ActivatorConfig(), Metrics())
    fn = Function.model_validate(
        {
            "metadata": {"name": "f"},
            "spec": {"runtime": "python3.12", "handler": "main.handler", "code": {"inline": "x = 1"}},
        }
    )
    vs = registry.apply(fn)
    assert vs is not None
    fields = {"function_error": None, "log_result": None, "duration_ms": None, **reply}
    return Result(vs, AgentReply(status=200, body=b"{}", max_rss_kib=None, **fields), "rid-1")


@pytest.mark.parametrize(
    ("names", "expected"),
    [
        pytest.param(
            ember_api.HEADERS,
            {
                "X-Ember-Request-Id": "rid-1",
                "X-Ember-Executed-Version": "1",
                "X-Ember-Function-Error": "Unhandled",
                "X-Ember-Log-Result": "bG9n",
                "X-Ember-Duration-Ms": "3",
            },
            id="ember",
        ),
        pytest.param(
            lambda_api.HEADERS,
            {
                "x-amzn-RequestId": "rid-1",
                "X-Amz-Executed-Version": "1",
                "X-Amz-Function-Error": "Unhandled",
                "X-Amz-Log-Result": "bG9n",
            },
            id="lambda-has-no-duration-header",
        ),
    ],
)
def test_a_sync_reply_says_what_the_agent_reported_in_the_apis_own_headers(
    names: HeaderNames, expected: dict[str, str]
) -> None:
    result = _result(function_error="Unhandled", log_result="bG9n", duration_ms="3")
    assert names.sync(result) == {"Content-Type": "application/json", **expected}


def test_a_sync_reply_without_error_or_logs_has_no_such_headers() -> None:
    assert set(lambda_api.HEADERS.sync(_result())) == {"Content-Type", "x-amzn-RequestId", "X-Amz-Executed-Version"}
