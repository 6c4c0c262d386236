"""API Gateway HTTP API 2.0 mapping, pure parts: the event of a request and the reply of a result.
The same through real sockets and a real sandbox is tests/local/activator/test_http_routes.py."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from ember.activator.apigw import BadResponse, HttpRequest, reply_of, request_event


def _request(**kw: Any) -> HttpRequest:
    base: dict[str, Any] = {
        "method": "GET",
        "raw_path": "/users/42",
        "raw_query": "",
        "headers": [("Host", "api.example.com:8080"), ("User-Agent", "curl/8")],
        "body": b"",
        "source_ip": "10.0.0.9",
        "request_id": "rid-1",
        "time_s": 1_764_793_438.25,
    }
    return HttpRequest(**{**base, **kw})


def test_the_event_has_api_gateways_shape() -> None:
    event = request_event(
        _request(
            raw_query="a=1&a=2&b=&c=x%20y",
            headers=[
                ("Host", "api.example.com:8080"),
                ("User-Agent", "curl/8"),
                ("X-Multi", "one"),
                ("x-multi", "two"),
                ("Cookie", "s=1; theme=dark"),
            ],
        ),
        route_key="GET /users/{id}",
        path_parameters={"id": "42"},
        account_id="team-a",
    )
    assert event == {
        "version": "2.0",
        "routeKey": "GET /users/{id}",
        "rawPath": "/users/42",
        "rawQueryString": "a=1&a=2&b=&c=x%20y",
        "cookies": ["s=1", "theme=dark"],
        "headers": {"host": "api.example.com:8080", "user-agent": "curl/8", "x-multi": "one,two"},
        "queryStringParameters": {"a": "1,2", "b": "", "c": "x y"},
        "pathParameters": {"id": "42"},
        "requestContext": {
            "accountId": "team-a",
            "apiId": "ember",
            "domainName": "api.example.com",
            "domainPrefix": "api",
            "http": {
                "method": "GET",
                "path": "/users/42",
                "protocol": "HTTP/1.1",
                "sourceIp": "10.0.0.9",
                "userAgent": "curl/8",
            },
            "requestId": "rid-1",
            "routeKey": "GET /users/{id}",
            "stage": "$default",
            "time": "03/Dec/2025:20:23:58 +0000",
            "timeEpoch": 1_764_793_438_250,
        },
        "isBase64Encoded": False,
    }


def test_text_bodies_stay_text_and_binary_bodies_are_base64() -> None:
    text = request_event(
        _request(method="POST", body=b'{"a": 1}', headers=[("Content-Type", "application/json")]),
        route_key="POST /x",
        path_parameters={},
        account_id="d",
    )
    assert (text["body"], text["isBase64Encoded"]) == ('{"a": 1}', False)
    raw = bytes(range(256))
    binary = request_event(
        _request(method="POST", body=raw, headers=[("Content-Type", "application/octet-stream")]),
        route_key="POST /x",
        path_parameters={},
        account_id="d",
    )
    assert binary["isBase64Encoded"] is True
    assert base64.b64decode(binary["body"]) == raw
    # a body claimed as text that is not UTF-8 is sent as base64, not mangled
    liar = request_event(
        _request(method="POST", body=b"\xff\xfe", headers=[("Content-Type", "text/plain")]),
        route_key="POST /x",
        path_parameters={},
        account_id="d",
    )
    assert (liar["body"], liar["isBase64Encoded"]) == (base64.b64encode(b"\xff\xfe").decode(), True)


def test_no_query_no_params_no_body_leave_their_keys_out() -> None:
    event = request_event(_request(), route_key="$default", path_parameters={}, account_id="d")
    assert "queryStringParameters" not in event
    assert "pathParameters" not in event
    assert "body" not in event
    assert "cookies" not in event


def test_a_status_code_reply_is_the_response() -> None:
    result = {
        "statusCode": 201,
        "headers": {"content-type": "text/plain", "x-n": 3},
        "multiValueHeaders": {"x-many": ["a", "b"]},
        "cookies": ["a=1; Path=/", "b=2"],
        "body": "made",
    }
    reply = reply_of(json.dumps(result).encode())
    assert reply.status == 201
    assert reply.body == b"made"
    assert reply.headers == [
        ("content-type", "text/plain"),
        ("x-n", "3"),
        ("x-many", "a"),
        ("x-many", "b"),
        ("Set-Cookie", "a=1; Path=/"),
        ("Set-Cookie", "b=2"),
    ]


def test_base64_reply_bodies_are_decoded() -> None:
    raw = bytes(range(256))
    result = {"statusCode": 200, "body": base64.b64encode(raw).decode(), "isBase64Encoded": True}
    assert reply_of(json.dumps(result).encode()).body == raw


@pytest.mark.parametrize(
    ("value", "body"),
    [
        ({"greeting": "hi"}, b'{"greeting": "hi"}'),
        ("plain text", b"plain text"),
        ([1, 2], b"[1, 2]"),
        (None, b"null"),
        (7, b"7"),
    ],
)
def test_any_other_json_value_is_a_200_json_reply(value: object, body: bytes) -> None:
    reply = reply_of(json.dumps(value).encode())
    assert (reply.status, reply.headers, reply.body) == (200, [("Content-Type", "application/json")], body)


@pytest.mark.parametrize(
    ("result", "problem"),
    [
        ({"statusCode": "abc"}, "statusCode must be an integer"),
        ({"statusCode": 99}, "statusCode must be an integer"),
        ({"statusCode": True}, "statusCode must be an integer"),
        ({"statusCode": 200, "headers": []}, "headers and multiValueHeaders must be objects"),
        ({"statusCode": 200, "headers": {"x": "a\r\nSet-Cookie: evil=1"}}, "line break"),
        ({"statusCode": 200, "headers": {"bad name": "v"}}, "not a valid token"),
        ({"statusCode": 200, "headers": {"x": {"nested": 1}}}, "must be a string"),
        ({"statusCode": 200, "cookies": "a=1"}, "cookies must be a list"),
        ({"statusCode": 200, "body": "%%%", "isBase64Encoded": True}, "not base64"),
        ({"statusCode": 200, "multiValueHeaders": {"x": "a"}}, "must be a list"),
    ],
)
def test_results_api_gateway_could_not_map_are_refused(result: dict[str, Any], problem: str) -> None:
    with pytest.raises(BadResponse, match=problem):
        reply_of(json.dumps(result).encode())


def test_framing_headers_from_the_function_are_dropped() -> None:
    result = {"statusCode": 200, "headers": {"Content-Length": "999", "Transfer-Encoding": "chunked"}, "body": "x"}
    assert reply_of(json.dumps(result).encode()).headers == [("Content-Type", "application/json")]


def test_a_result_that_is_not_json_is_refused() -> None:
    with pytest.raises(BadResponse, match="not JSON"):
        reply_of(b"<html>")
