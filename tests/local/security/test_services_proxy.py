"""The services proxy (`ember.pods.services`) over real sockets: a pod's Unix socket in, a real
HTTP service on loopback out. What a call may do, and that the credential goes only where the
policy says; the sandboxes around it are tests/local/security/test_services_local.py."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from ember.pods.base import PodId, ServiceRoute
from ember.pods.services import CredentialUnavailable, ServiceProxy, path_problem

SECRET = "Bearer s3cr3t-credential-value"
POD = PodId("pod-1")


@dataclass
class Upstream:
    """A real HTTP service on the host's loopback that records what reached it."""

    url: str
    seen: list[dict[str, Any]] = field(default_factory=list)


async def _upstream_app(seen: list[dict[str, Any]], redirect_to: str = "") -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        seen.append(
            {
                "method": request.method,
                "path_qs": request.raw_path,
                "headers": dict(request.headers),
                "auth": request.headers.getall("Authorization", []),
                "bytes": len(body),
            }
        )
        if request.path.endswith("/redirect"):
            raise web.HTTPFound(redirect_to)
        if request.path.endswith("/echo"):
            return web.Response(body=body, content_type="application/octet-stream")
        response = web.json_response({"path": request.raw_path}, status=201 if request.method == "POST" else 200)
        response.headers.add("Set-Cookie", "a=1")
        response.headers.add("Set-Cookie", "b=2")
        return response

    app = web.Application(client_max_size=64 << 20)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    async with _serve(await _upstream_app(seen := [])) as url:
        yield Upstream(url, seen)


class _serve:
    def __init__(self, app: web.Application) -> None:
        self.runner = web.AppRunner(app, access_log=None)

    async def __aenter__(self) -> str:
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        return f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def __aexit__(self, *exc: object) -> None:
        await self.runner.cleanup()


async def _secrets(namespace: str, name: str, key: str) -> str:
    if (namespace, name, key) == ("team-a", "payments", "token"):
        return SECRET
    if (namespace, name, key) == ("team-a", "from-file", "token"):
        return SECRET + "\n"  # kubectl create secret --from-file keeps the file's newline
    if (namespace, name, key) == ("team-a", "two-lines", "token"):
        return "Bearer a\r\nX-Injected: 1"
    raise CredentialUnavailable(f"no Secret {namespace}/{name} key {key!r}")


@dataclass
class Pod:
    """One pod's side of the proxy: its socket, its token, a client over the socket."""

    http: aiohttp.ClientSession
    token: str
    proxy: ServiceProxy

    async def call(self, method: str, path: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
        async with self.http.request(method, f"http://pod{path}", allow_redirects=False, **kw) as r:
            return r.status, dict(r.headers), await r.read()


def _payments(url: str, **kw: Any) -> ServiceRoute:
    defaults: dict[str, Any] = {"secret_name": "payments", "secret_key": "token"}
    return ServiceRoute(name="payments", url=f"{url}/api", **{**defaults, **kw})


@pytest.fixture
async def pod(tmp_path: Path, upstream: Upstream) -> AsyncIterator[Pod]:
    proxy = ServiceProxy(_secrets)
    socket_path = tmp_path / "services.sock"
    await proxy.open_pod(POD, socket_path)
    services = [
        _payments(upstream.url, methods=("GET", "POST", "HEAD"), path_prefixes=("/v1/charges", "/files/")),
        ServiceRoute(name="open", url=upstream.url),  # no credential, any method and path
        ServiceRoute(name="missing", url=upstream.url, secret_name="nope", secret_key="k"),
    ]
    token = proxy.grant(POD, "team-a", services)
    connector = aiohttp.UnixConnector(path=str(socket_path))
    async with aiohttp.ClientSession(connector=connector) as http:
        yield Pod(http, token, proxy)
    await proxy.close()


async def test_an_allowed_call_carries_the_credential_and_what_the_code_sent(pod: Pod, upstream: Upstream) -> None:
    status, _headers, body = await pod.call(
        "GET", f"/{pod.token}/payments/v1/charges/7?b=2&a=%20x&a=y", headers={"X-Request": "r1"}
    )
    assert status == 200, body
    assert json.loads(body) == {"path": "/api/v1/charges/7?b=2&a=%20x&a=y"}  # path and query exactly as sent
    [seen] = upstream.seen
    assert seen["auth"] == [SECRET]
    assert seen["headers"]["X-Request"] == "r1"
    assert seen["headers"]["Host"] == upstream.url.removeprefix("http://")  # the service's, not the pod's


async def test_the_code_cannot_choose_or_see_the_credential(pod: Pod, upstream: Upstream) -> None:
    status, headers, body = await pod.call(
        "POST", f"/{pod.token}/payments/v1/charges", headers={"authorization": "Bearer forged"}, data=b"{}"
    )
    assert status == 201, body
    assert upstream.seen[0]["auth"] == [SECRET]  # the forged value was dropped, not added to
    assert SECRET not in json.dumps(headers)
    assert SECRET.encode() not in body


async def test_a_service_without_a_credential_gets_none_and_any_path(pod: Pod, upstream: Upstream) -> None:
    status, _, _ = await pod.call("DELETE", f"/{pod.token}/open/anything/at/all", headers={"Authorization": "mine"})
    assert status == 200
    assert upstream.seen[0]["auth"] == []  # the code's own header is never sent on: the header is the proxy's


@pytest.mark.parametrize(
    ("method", "path", "status", "error"),
    [
        ("GET", "/{token}/payments/v1/refunds", 403, "PathNotAllowed"),
        ("GET", "/{token}/payments/v1/chargesX", 403, "PathNotAllowed"),  # prefixes match whole segments
        ("GET", "/{token}/payments/v1/charges/../../admin", 403, "PathNotAllowed"),
        ("GET", "/{token}/payments/v1/charges/%2e%2e/%2E%2E/admin", 403, "PathNotAllowed"),
        ("GET", "/{token}/payments/v1/charges%2f..%2fadmin", 403, "PathNotAllowed"),
        ("GET", "/{token}/payments", 403, "PathNotAllowed"),  # the base itself is outside /v1/charges
        ("DELETE", "/{token}/payments/v1/charges/7", 405, "MethodNotAllowed"),
        ("GET", "/{token}/payroll/v1/charges", 404, "UnknownService"),
        ("GET", "/{token}/missing/x", 503, "CredentialUnavailable"),
        ("GET", "/wrong-token/payments/v1/charges", 401, "Unauthorized"),
        ("GET", "/payments/v1/charges", 401, "Unauthorized"),
        ("GET", "/", 401, "Unauthorized"),
    ],
)
async def test_a_refused_call_never_reaches_the_service(
    pod: Pod, upstream: Upstream, method: str, path: str, status: int, error: str
) -> None:
    got, headers, body = await pod.call(method, path.format(token=pod.token))
    assert (got, json.loads(body)["errorType"]) == (status, error), body
    assert upstream.seen == []
    if status == 405:
        assert headers["Allow"] == "GET, POST, HEAD"
    if status == 503:  # names the Secret it could not read, never a value
        assert "nope" in json.loads(body)["errorMessage"]


async def test_a_redirect_is_handed_back_not_followed(tmp_path: Path) -> None:
    """Following it would send the credential to wherever the service (or whoever answers for it) points."""
    elsewhere: list[dict[str, Any]] = []
    redirecting: list[dict[str, Any]] = []
    other_app = await _upstream_app(elsewhere)
    async with _serve(other_app) as other, _serve(await _upstream_app(redirecting, f"{other}/api/x")) as service:
        proxy = ServiceProxy(_secrets)
        path = tmp_path / "s.sock"
        await proxy.open_pod(POD, path)
        token = proxy.grant(POD, "team-a", [_payments(service)])
        url = f"http://pod/{token}/payments/redirect"
        try:
            async with (
                aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as http,
                http.get(url, allow_redirects=False) as response,
            ):
                status, location = response.status, response.headers["Location"]
        finally:
            await proxy.close()
    assert (status, location) == (302, f"{other}/api/x")
    assert [r["auth"] for r in redirecting] == [[SECRET]]
    assert elsewhere == []


async def test_bodies_stream_both_ways_intact(pod: Pod, upstream: Upstream) -> None:
    blob = bytes(range(256)) * (12 << 12)  # 12 MiB
    status, _headers, body = await pod.call("POST", f"/{pod.token}/payments/files/echo", data=blob)
    assert status == 200
    assert body == blob
    assert upstream.seen[0]["bytes"] == len(blob)


async def test_repeated_response_headers_survive(pod: Pod) -> None:
    async with pod.http.get(f"http://pod/{pod.token}/open/x") as response:
        assert response.headers.getall("Set-Cookie") == ["a=1", "b=2"]


async def test_a_service_that_is_down_is_a_clear_502(tmp_path: Path) -> None:
    proxy = ServiceProxy(_secrets)
    path = tmp_path / "s.sock"
    await proxy.open_pod(POD, path)
    token = proxy.grant(POD, "team-a", [ServiceRoute(name="gone", url="http://127.0.0.1:9")])
    try:
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as http,
            http.get(f"http://pod/{token}/gone/x") as response,
        ):
            body = await response.json()
    finally:
        await proxy.close()
    assert response.status == 502
    assert body["errorType"] == "ServiceUnavailable"
    assert "127.0.0.1:9" in body["errorMessage"]


async def test_a_pod_without_a_grant_and_a_closed_pod_are_refused(tmp_path: Path, upstream: Upstream) -> None:
    proxy = ServiceProxy(_secrets)
    path = tmp_path / "s.sock"
    await proxy.open_pod(POD, path)
    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as http:
        async with http.get("http://pod/any/open/x") as response:
            assert response.status == 401  # opened at start, granted only at specialize
        token = proxy.grant(POD, "team-a", [ServiceRoute(name="open", url=upstream.url)])
        async with http.get(f"http://pod/{token}/open/x") as response:
            assert response.status == 200
        await proxy.close_pod(POD)
        with pytest.raises(aiohttp.ClientConnectionError):
            async with http.get(f"http://pod/{token}/open/x", headers={"Connection": "close"}):
                pass
    await proxy.close()
    assert len(upstream.seen) == 1


@pytest.mark.parametrize(
    ("path", "prefixes", "allowed"),
    [
        ("/v1/charges", ("/v1/charges",), True),
        ("/v1/charges/", ("/v1/charges",), True),
        ("/v1/charges/7", ("/v1/charges",), True),
        ("/v1/charges7", ("/v1/charges",), False),
        ("/files/a", ("/files/",), True),
        ("/files", ("/files/",), False),
        ("", ("/",), True),
        ("", (), True),
        ("/a/./b", (), False),
        ("/a/%2E/b", (), False),
        ("/a%5cb", (), False),
        ("/a\\b", (), False),
        ("/v1/%63harges", ("/v1/charges",), True),  # compared decoded, as the service reads it
    ],
)
def test_path_rules(path: str, prefixes: tuple[str, ...], allowed: bool) -> None:
    assert (path_problem(path, prefixes) == "") is allowed


async def test_a_token_opens_only_its_own_pods_socket(tmp_path: Path, upstream: Upstream) -> None:
    proxy = ServiceProxy(_secrets)
    await proxy.open_pod(PodId("a"), tmp_path / "a.sock")
    await proxy.open_pod(PodId("b"), tmp_path / "b.sock")
    token_a = proxy.grant(PodId("a"), "team-a", [ServiceRoute(name="open", url=upstream.url)])
    proxy.grant(PodId("b"), "team-a", [ServiceRoute(name="open", url=upstream.url)])
    try:
        async with (
            aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(tmp_path / "b.sock"))) as http,
            http.get(f"http://pod/{token_a}/open/x") as response,
        ):
            assert response.status == 401
    finally:
        await proxy.close()
    assert upstream.seen == []


async def test_one_tcp_listener_serves_every_granted_pod_by_its_token(upstream: Upstream) -> None:
    """A cluster's activator: pods reach it over the pod network, the token names the pod (and
    its namespace's credentials); a revoked token, or one granted again, opens nothing."""
    proxy = ServiceProxy(_secrets)
    port = await proxy.serve_tcp("127.0.0.1", 0)
    token_a = proxy.grant(PodId("a"), "team-a", [_payments(upstream.url)])
    token_b = proxy.grant(PodId("b"), "team-b", [_payments(upstream.url)])
    base = f"http://127.0.0.1:{port}"
    statuses = []
    try:
        async with aiohttp.ClientSession() as http:
            for token in (token_a, token_b):
                async with http.get(f"{base}/{token}/payments/v1") as response:
                    statuses.append(response.status)
            proxy.revoke(PodId("a"))
            renewed = proxy.grant(PodId("b"), "team-a", [_payments(upstream.url)])
            for token in (token_a, token_b, renewed):
                async with http.get(f"{base}/{token}/payments/v1") as response:
                    statuses.append(response.status)
    finally:
        await proxy.close()
    # team-b has no such Secret: 503; then a revoked and a replaced token: 401
    assert statuses == [200, 503, 401, 401, 200]
    assert [seen["auth"] for seen in upstream.seen] == [[SECRET], [SECRET]]


async def test_a_credential_is_sent_as_one_line_or_not_at_all(tmp_path: Path, upstream: Upstream) -> None:
    proxy = ServiceProxy(_secrets)
    path = tmp_path / "s.sock"
    await proxy.open_pod(POD, path)
    token = proxy.grant(
        POD,
        "team-a",
        [
            ServiceRoute(name="file", url=upstream.url, secret_name="from-file", secret_key="token"),
            ServiceRoute(name="split", url=upstream.url, secret_name="two-lines", secret_key="token"),
        ],
    )
    statuses = []
    try:
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(path))) as http:
            for name in ("file", "split"):
                async with http.get(f"http://pod/{token}/{name}/x") as response:
                    statuses.append((response.status, (await response.json()).get("errorMessage")))
    finally:
        await proxy.close()
    assert statuses == [
        (200, None),
        (503, "split: Secret team-a/two-lines key 'token' is not one line of text"),
    ]
    assert [seen["auth"] for seen in upstream.seen] == [[SECRET]]


async def test_portion_calls_go_to_the_portal_only_with_the_pods_token(pod: Pod, upstream: Upstream) -> None:
    """`<token>/_portions/<name>` is the activator's (`ember.activator.portions`), never a service."""
    status, _, body = await pod.call("POST", f"/{pod.token}/_portions/parse", data=b"{}")
    assert (status, json.loads(body)["errorMessage"]) == (404, "portion calls are not served here")
    seen: list[tuple[str, str, bytes]] = []

    async def portal(who: PodId, name: str, request: web.BaseRequest) -> web.StreamResponse:
        seen.append((who, name, await request.read()))
        return web.json_response({"ran": name})

    pod.proxy.portal = portal
    status, _, body = await pod.call("POST", f"/{pod.token}/_portions/parse", data=b'{"raw": 1}')
    assert (status, json.loads(body)) == (200, {"ran": "parse"})
    status, _, _ = await pod.call("POST", "/not-the-token/_portions/parse", data=b"{}")
    assert status == 401
    assert seen == [(POD, "parse", b'{"raw": 1}')]
    assert upstream.seen == []
