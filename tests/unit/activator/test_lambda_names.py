"""FunctionName forms of the Lambda API and header checks; the real boto3 client is in tests/local/activator."""

from __future__ import annotations

import pytest

from ember.activator.edge import choice, request_id
from ember.activator.errors import BadRequest
from ember.activator.lambda_api import Target, parse_function_name


@pytest.mark.parametrize(
    ("raw", "qualifier", "expected"),
    [
        pytest.param("hello", None, Target("default", "hello", None), id="name"),
        pytest.param("hello", "3", Target("default", "hello", "3"), id="name-with-param"),
        pytest.param("hello:live", None, Target("default", "hello", "live"), id="name-colon-alias"),
        pytest.param("team-a%2Fhello", None, Target("team-a", "hello", None), id="ns-slash-name-encoded"),
        pytest.param("team-a/hello:$LATEST", None, Target("team-a", "hello", "$LATEST"), id="ns-slash-latest"),
        pytest.param(
            "arn%3Aaws%3Alambda%3Aus-east-1%3Ateam-a%3Afunction%3Ahello%3A2",
            "2",
            Target("team-a", "hello", "2"),
            id="arn-with-qualifier",
        ),
        pytest.param("arn:aws:lambda:eu-west-1:prod:function:api", None, Target("prod", "api", None), id="arn"),
    ],
)
def test_function_name_forms(raw: str, qualifier: str | None, expected: Target) -> None:
    assert parse_function_name(raw, qualifier, "default") == expected


@pytest.mark.parametrize(
    ("raw", "qualifier", "message"),
    [
        pytest.param("Hello", None, "is not NAME", id="uppercase"),
        pytest.param("a/b/c", None, "is not NAME", id="two-slashes"),
        pytest.param("hello:live", "v2", "does not match", id="qualifier-mismatch"),
        pytest.param("hello", "bad qualifier!", "Qualifier", id="bad-qualifier"),
        pytest.param("arn:aws:s3:::bucket", None, "is not NAME", id="not-lambda-arn"),
        pytest.param("x" * 100, None, "is not NAME", id="too-long"),
    ],
)
def test_bad_function_names_are_400(raw: str, qualifier: str | None, message: str) -> None:
    with pytest.raises(BadRequest, match=message) as info:
        parse_function_name(raw, qualifier, "default")
    assert info.value.status == 400


def test_header_choices_and_request_ids() -> None:
    allowed = {"event": "async", "dryrun": "dry-run"}
    assert choice("Event", "X-Amz-Invocation-Type", allowed, "sync") == "async"
    assert choice(None, "X-Amz-Invocation-Type", allowed, "sync") == "sync"
    with pytest.raises(BadRequest, match="X-Amz-Invocation-Type: 'Later' is not one of dryrun, event"):
        choice("Later", "X-Amz-Invocation-Type", allowed, "sync")
    assert request_id("abc-1", "X-Ember-Request-Id", "gen") == "abc-1"
    assert request_id(None, "X-Ember-Request-Id", "gen") == "gen"
    with pytest.raises(BadRequest, match="X-Ember-Request-Id"):
        request_id("bad id with spaces", "X-Ember-Request-Id", "gen")


def test_generated_request_ids_are_unique_v4_uuids() -> None:
    import uuid

    from ember.activator.invoke import new_request_id

    ids = {new_request_id() for _ in range(2000)}
    assert len(ids) == 2000
    for rid in list(ids)[:200]:
        parsed = uuid.UUID(rid)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, rid)
        assert request_id(rid, "X-Ember-Request-Id", "x") == rid
