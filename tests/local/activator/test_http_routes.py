"""HTTP routes end to end: real HTTP requests to a real activator over real sandboxed agents.

One Function written for API Gateway (it reads `pathParameters`, returns `statusCode`/`body`)
behind many routes; the tests check what its handler saw and what the client got: parameters,
greedy paths, repeated query keys and headers, cookies both ways, binary bodies round-tripping
through base64, a plain dict, the raw format, errors (502), timeouts (504), CORS preflights, JWT
accepted / expired / wrong audience / missing scope, 404, 405, bad percent-encoding (400), an
oversized body (413), the function URL, and routes following Function changes. `ember dev` with
the example and a conflict is tests/local/activator/test_devmode_routes.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
import pytest
import pytest_asyncio
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from tests.local.activator.helpers import FAST, Activator, function, run_activator
from yarl import URL

from ember.activator import keys
from ember.activator.gateway import public_app
from ember.pods.services import CredentialUnavailable

# One activator and one sandbox for the module: every test reads the same Function.
pytestmark = [pytest.mark.local, pytest.mark.timeout(240), pytest.mark.asyncio(loop_scope="module")]

HANDLER = """
import json, time

def handler(event, context):
    if "rawPath" not in event:
        return {"raw": event}
    path = event["rawPath"]
    if path == "/plain":
        return {"plain": "dict", "id": event.get("pathParameters", {}).get("id")}
    if path == "/text":
        return "just text"
    if path.startswith("/binary"):
        return {"statusCode": 200, "headers": {"content-type": "application/octet-stream"},
                "isBase64Encoded": True, "body": event.get("body", "")}
    if path == "/boom":
        raise ValueError("internal detail the caller must not see")
    if path == "/slow":
        time.sleep(5)
    if path == "/cookies":
        return {"statusCode": 201, "cookies": ["a=1; Path=/", "b=2"], "multiValueHeaders": {"x-many": ["1", "2"]}}
    if path == "/inject":
        return {"statusCode": 200, "headers": {"x-evil": "a\\r\\nSet-Cookie: stolen=1"}}
    return {"statusCode": 200, "headers": {"content-type": "application/json"}, "body": json.dumps(event)}
"""

KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
JWKS = json.dumps({"keys": [{**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(KEY.public_key())), "kid": "k1"}]})
ISSUER = "https://issuer.test"


async def _secrets(namespace: str, name: str, key: str) -> str:
    if (namespace, name, key) == ("default", "issuer-keys", "jwks.json"):
        return JWKS
    raise CredentialUnavailable(f"no Secret {namespace}/{name} key {key}")


def _token(key: Any = KEY, kid: str = "k1", **claims: Any) -> str:
    body = {"iss": ISSUER, "aud": "orders", "sub": "user-7", "exp": int(time.time()) + 300, **claims}
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": kid})


HTTP: dict[str, Any] = {
    "routes": [
        {"path": "/items/{id}", "methods": ["GET", "PUT"]},
        {"path": "/files/{proxy+}"},
        {"path": "/plain", "methods": ["GET"]},
        {"path": "/text", "methods": ["GET"]},
        {"path": "/binary", "methods": ["POST"]},
        {"path": "/boom", "methods": ["GET"]},
        {"path": "/slow", "methods": ["GET"]},
        {"path": "/cookies", "methods": ["GET"]},
        {"path": "/inject", "methods": ["GET"]},
        {"path": "/raw", "methods": ["POST"], "payloadFormat": "raw"},
        {"path": "/private", "methods": ["GET"], "authorizer": "issuer"},
        {"path": "/admin", "methods": ["GET"], "authorizer": "issuer", "scopes": ["admin"]},
        {"path": "/v1/{proxy+}", "host": "api.example.test", "methods": ["GET"]},
    ],
    "functionUrl": {},
    "cors": {
        "allowOrigins": ["https://app.example.test"],
        "allowMethods": ["GET", "PUT"],
        "allowHeaders": ["content-type", "authorization"],
        "exposeHeaders": ["x-many"],
        "maxAge": 600,
    },
    "authorizers": {
        "issuer": {
            "jwt": {
                "issuer": ISSUER,
                "audiences": ["orders"],
                "jwksSecretRef": {"name": "issuer-keys", "key": "jwks.json"},
            }
        }
    },
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def api() -> AsyncIterator[Activator]:
    config = dataclasses.replace(FAST, max_body_bytes=64 * 1024, warm_pool_size=1)
    async with run_activator(config, credentials=_secrets) as act:
        vs = act.registry.apply(function("shop", HANDLER, http=HTTP, timeoutSeconds=1))
        assert vs is not None
        deadline = time.monotonic() + 90
        while vs.phase.value != "Ready":
            assert vs.phase.value != "Failed", vs.message
            assert time.monotonic() < deadline, "the Version did not become Ready"
            await asyncio.sleep(0.1)
        yield act


async def _get(act: Activator, path: str, method: str = "GET", **kw: Any) -> tuple[int, Any, bytes]:
    url = URL(f"{act.url}{path}", encoded=True)  # sent as written: bad encodings too
    async with act.http.request(method, url, **kw) as response:
        return response.status, response.headers, await response.read()


async def test_an_api_gateway_handler_sees_its_event(api: Activator) -> None:
    status, headers, body = await _get(
        api,
        "/items/42?tag=a&tag=b&q=x%20y",
        headers=[("X-Multi", "one"), ("X-Multi", "two"), ("Cookie", "session=s1; theme=dark")],
    )
    assert status == 200, body
    assert headers["Content-Type"] == "application/json"
    assert headers["Apigw-Requestid"]
    event = json.loads(body)
    assert event["version"] == "2.0"
    assert event["routeKey"] == "GET /items/{id}"
    assert event["rawPath"] == "/items/42"
    assert event["rawQueryString"] == "tag=a&tag=b&q=x%20y"
    assert event["pathParameters"] == {"id": "42"}
    assert event["queryStringParameters"] == {"tag": "a,b", "q": "x y"}
    assert event["headers"]["x-multi"] == "one,two"
    assert "cookie" not in event["headers"]
    assert event["cookies"] == ["session=s1", "theme=dark"]
    context = event["requestContext"]
    assert context["http"]["method"] == "GET"
    assert context["http"]["sourceIp"] == "127.0.0.1"
    assert context["requestId"] == headers["Apigw-Requestid"]
    assert context["routeKey"] == "GET /items/{id}"
    assert context["domainName"] == "127.0.0.1"
    assert abs(context["timeEpoch"] / 1000 - time.time()) < 30
    assert event["isBase64Encoded"] is False


async def test_greedy_and_percent_encoded_parameters(api: Activator) -> None:
    status, _, body = await _get(api, "/files/docs/a%20b/c%2Fd.txt")
    assert status == 200, body
    event = json.loads(body)
    assert event["pathParameters"] == {"proxy": "docs/a b/c/d.txt"}
    assert event["rawPath"] == "/files/docs/a%20b/c%2Fd.txt"
    assert event["routeKey"] == "ANY /files/{proxy+}"


async def test_a_binary_body_round_trips_through_base64(api: Activator) -> None:
    payload = bytes(range(256)) * 16
    status, headers, body = await _get(
        api, "/binary", "POST", data=payload, headers={"Content-Type": "application/octet-stream"}
    )
    assert (status, headers["Content-Type"]) == (200, "application/octet-stream")
    assert body == payload


async def test_plain_results_become_json_replies(api: Activator) -> None:
    assert (await _get(api, "/plain"))[::2] == (200, b'{"plain": "dict", "id": null}')
    status, headers, body = await _get(api, "/text")
    assert (status, headers["Content-Type"], body) == (200, "application/json", b"just text")


async def test_cookies_and_repeated_headers_go_back_to_the_client(api: Activator) -> None:
    status, headers, _ = await _get(api, "/cookies")
    assert status == 201
    assert headers.getall("Set-Cookie") == ["a=1; Path=/", "b=2"]
    assert headers.getall("x-many") == ["1", "2"]


async def test_the_raw_format_sends_the_body_as_the_event(api: Activator) -> None:
    status, _, body = await _get(api, "/raw", "POST", data=b'{"order": 7}')
    assert (status, json.loads(body)) == (200, {"raw": {"order": 7}})
    bad, _, message = await _get(api, "/raw", "POST", data=b"not json")
    assert bad == 400
    assert b"JSON" in message


async def test_function_errors_are_502_without_their_detail_and_timeouts_504(api: Activator) -> None:
    status, headers, body = await _get(api, "/boom")
    assert (status, json.loads(body)) == (502, {"message": "Internal Server Error"})
    assert "X-Amz-Function-Error" not in headers
    assert b"internal detail" not in body
    status, _, body = await _get(api, "/slow")
    assert (status, json.loads(body)) == (504, {"message": "Endpoint request timed out"})


async def test_a_header_injection_in_the_reply_is_a_502_not_a_split_response(api: Activator) -> None:
    status, headers, _ = await _get(api, "/inject")
    assert status == 502
    assert "stolen" not in str(headers)


async def test_unmatched_paths_methods_and_bad_paths(api: Activator) -> None:
    assert (await _get(api, "/nowhere"))[::2] == (404, b'{"message": "Not Found"}')
    status, headers, _ = await _get(api, "/items/1", "DELETE")
    assert (status, headers["Allow"]) == (405, "GET, PUT")
    status, _, body = await _get(api, "/items/%zz")
    assert status == 400
    assert b"percent-encoding" in body
    status, _, body = await _get(api, "/items/%ff%fe")
    assert status == 400
    assert b"UTF-8" in body
    status, _, _ = await _get(api, "/binary", "POST", data=b"x" * (64 * 1024 + 1))
    assert status == 413


async def test_host_routes_match_only_their_host(api: Activator) -> None:
    status, _, body = await _get(api, "/v1/things", headers={"Host": "api.example.test:8080"})
    assert (status, json.loads(body)["pathParameters"]) == (200, {"proxy": "things"})
    assert (await _get(api, "/v1/things"))[0] == 404


async def test_cors_preflight_is_answered_without_invoking(api: Activator) -> None:
    before = await api.metric("ember_invocations_total", function="default/shop")
    preflight = {
        "Origin": "https://app.example.test",
        "Access-Control-Request-Method": "PUT",
        "Access-Control-Request-Headers": "Content-Type",
    }
    status, headers, _ = await _get(api, "/items/1", "OPTIONS", headers=preflight)
    assert status == 204
    assert headers["Access-Control-Allow-Origin"] == "https://app.example.test"
    assert headers["Access-Control-Allow-Methods"] == "GET,PUT"
    assert headers["Access-Control-Allow-Headers"] == "content-type,authorization"
    assert headers["Access-Control-Max-Age"] == "600"
    evil, evil_headers, _ = await _get(
        api, "/items/1", "OPTIONS", headers={**preflight, "Origin": "https://evil.example.test"}
    )
    assert evil == 204
    assert "Access-Control-Allow-Origin" not in evil_headers
    assert await api.metric("ember_invocations_total", function="default/shop") == before
    status, headers, _ = await _get(api, "/items/1", headers={"Origin": "https://app.example.test"})
    assert status == 200
    assert headers["Access-Control-Allow-Origin"] == "https://app.example.test"
    assert headers["Access-Control-Expose-Headers"] == "x-many"


async def test_jwt_authorizer(api: Activator) -> None:
    before = await api.metric("ember_invocations_total", function="default/shop")
    refused = {
        "no token": {},
        "expired": {"Authorization": f"Bearer {_token(exp=int(time.time()) - 60)}"},
        "wrong audience": {"Authorization": f"Bearer {_token(aud='billing')}"},
        "wrong issuer": {"Authorization": f"Bearer {_token(iss='https://other.test')}"},
        "wrong key": {"Authorization": f"Bearer {_token(OTHER_KEY)}"},
        "unknown kid": {"Authorization": f"Bearer {_token(kid='k9')}"},
        "garbage": {"Authorization": "Bearer abc.def.ghi"},
        "alg none": {"Authorization": "Bearer " + jwt.encode({"iss": ISSUER, "aud": "orders"}, None, algorithm="none")},
    }
    for why, headers in refused.items():
        status, reply_headers, body = await _get(api, "/private", headers=headers)
        assert (status, json.loads(body)) == (401, {"message": "Unauthorized"}), why
        assert reply_headers["WWW-Authenticate"] == "Bearer"
    assert await api.metric("ember_invocations_total", function="default/shop") == before

    status, _, body = await _get(api, "/private", headers={"Authorization": f"Bearer {_token(scope='read')}"})
    assert status == 200
    claims = json.loads(body)["requestContext"]["authorizer"]["jwt"]
    assert claims["claims"]["sub"] == "user-7"
    assert claims["scopes"] == ["read"]
    assert (await _get(api, "/admin", headers={"Authorization": f"Bearer {_token(scope='read')}"}))[0] == 403
    assert (await _get(api, "/admin", headers={"Authorization": _token(scope="read admin")}))[0] == 200


async def test_the_function_url_serves_every_path(api: Activator) -> None:
    base = "/v1/namespaces/default/functions/shop/url"
    status, _, body = await _get(
        api, f"{base}/any/path?x=1", "PATCH", data=b'{"a": 1}', headers={"Content-Type": "application/json"}
    )
    assert status == 200, body
    event = json.loads(body)
    assert (event["routeKey"], event["rawPath"], event["body"]) == ("$default", "/any/path", '{"a": 1}')
    assert event["queryStringParameters"] == {"x": "1"}
    assert json.loads((await _get(api, base))[2])["rawPath"] == "/"
    missing, _, message = await _get(api, "/v1/namespaces/default/functions/nobody/url/x")
    assert missing == 404
    assert b"nobody" in message


async def test_the_public_listener_serves_routes_and_nothing_of_the_activators_own_api(api: Activator) -> None:
    runner = web.AppRunner(public_app(api.app), access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        public = dataclasses.replace(api, url=f"http://127.0.0.1:{runner.addresses[0][1]}")
        status, _, body = await _get(public, "/items/9")
        assert (status, json.loads(body)["pathParameters"]) == (200, {"id": "9"})
        assert (await _get(public, "/v1/namespaces/default/functions/shop/url/p"))[0] == 200
        own = [
            ("GET", "/metrics"),
            ("GET", "/healthz"),
            ("POST", "/v1/namespaces/default/functions/shop/invoke"),
            ("POST", "/2015-03-31/functions/shop/invocations"),
            ("GET", "/v1/invocations/abc"),
        ]
        for method, path in own:
            # the activator's own 404 (an unknown invocation id) is Ember's error body, not API Gateway's
            assert (await _get(api, path, method))[2] != b'{"message": "Not Found"}', f"{method} {path} is own API"
            status, headers, body = await _get(public, path, method)
            assert (status, json.loads(body)) == (404, {"message": "Not Found"}), f"{method} {path}"
            assert headers["Apigw-Requestid"]
    finally:
        await runner.cleanup()
    assert api.app[keys.STATE]["started"], "closing the public listener leaves the activator running"


async def test_routes_follow_function_changes(api: Activator) -> None:
    other = function("other", "def handler(event, context):\n    return {'other': True}\n", http={"routes": []})
    api.registry.follow(other)
    assert (await _get(api, "/other"))[0] == 404
    taken = function("other", "x = 1\n", http={"routes": [{"path": "/items/{id}", "methods": ["GET"]}]})
    api.registry.follow(taken)
    assert api.registry.routes.refused[("default", "other")] == (
        "route GET /items/{id} is already served by Function default/shop (GET /items/{id}); not served",
    )
    assert json.loads((await _get(api, "/items/5"))[2])["pathParameters"] == {"id": "5"}
    api.registry.remove("default", "other")
    assert ("default", "other") not in api.registry.routes.refused
