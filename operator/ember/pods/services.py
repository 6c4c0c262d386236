"""The services proxy: function code calls its policy's auxiliary services through it, and it adds
the credentials the code never sees.

A SecurityPolicy's `spec.services` lists HTTP services with a credential from a Secret and the
methods and paths allowed. Function code calls `EMBER_SERVICE_<NAME>_URL` (announced in its
environment at specialize); this proxy, outside the sandbox, checks the call, sets the
credential header (replacing any value the code sent) and forwards it to the service.

A pod is granted its services at specialize (`grant`), for the namespace of the Version it
loads, with a fresh token that is part of the announced URL, and loses them when it goes
(`revoke`). Where the calls come in:
- local mode (`ember.pods.local`): each pod has a Unix socket of its own (`open_pod`), which its
  sandbox sees; the pod's agent relays TCP connections from loopback inside the sandbox to it
  (runtime-images/CONTRACT.md, `EMBER_AGENT_SERVICES_SOCKET`). A token opens only its own pod's
  socket; a sandbox sharing the host's network could reach another pod's relay, never its token.
- a cluster (`ember.activator_main`): the activator that specialized the pod listens on its pod
  address (`serve_tcp`); the pool's NetworkPolicy lets pods reach that port of the activators
  only (`ember.resources.network_policy`), and the token names the pod. The credentials are
  read from the API server (`ember.pods.kubernetes.secrets`), in the namespace it serves.

What is refused, before anything is sent (a JSON `{"errorType", "errorMessage"}` body naming the
reason): no or a wrong token (401), a service the policy does not list (404), a method it does
not allow (405 with `Allow`), a path outside its `pathPrefixes`, or with `.`/`..` segments or
encoded `/` (403), a credential that cannot be read (503). Calls to the pod's portions
(`<token>/_portions/<name>`) go to the activator's `portal`, which checks them itself; key-value
state operations (`<token>/_state`, `ember.state`) go to its `state` handler with the scope of the
pod's Function (404 `StateNotEnabled` when the Function has no `state.keyValue`). Redirects are passed back to the
code, never followed (a redirect would carry the credential to another host). The credential is
never logged.
"""

from __future__ import annotations

import functools
import logging
import os
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

import aiohttp
from aiohttp import web
from multidict import CIMultiDict
from yarl import URL

from ember.pods.base import PodId, Portal, ServiceRoute, StateHandler

log = logging.getLogger(__name__)

# (namespace, Secret name, key) -> the credential; raises CredentialUnavailable
Credentials = Callable[[str, str, str], Awaitable[str]]
PORTIONS = "_portions"  # the path segment of portion calls (never a service's name: not a DNS label)
STATE = "_state"  # the path segment of key-value state operations (`ember.state`)

# Not forwarded either way (RFC 9110 section 7.6.1), and Host (the service's own is sent)
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
        "Host",
    )
)
UPSTREAM_TIMEOUT = aiohttp.ClientTimeout(total=900, sock_connect=10)  # 900 s: the longest function timeout


class CredentialUnavailable(Exception):
    """A service's credential cannot be read (no such Secret or key); the message says which."""


async def no_credentials(namespace: str, name: str, key: str) -> str:
    raise CredentialUnavailable(f"no Secrets are known here (Secret {namespace}/{name}, key {key!r})")


@dataclass(frozen=True, slots=True)
class Grant:
    """What one specialized pod may call: its Version's namespace, its policy's services, and its
    Function's key-value state (`state_scope`, None without `state.keyValue`)."""

    pod: PodId
    namespace: str
    services: dict[str, ServiceRoute]
    state_scope: str | None = None


class ServiceProxy:
    """Serves pods' service calls; see the module docstring.

    Local mode: one Unix socket per pod (`open_pod`), a token valid on its own pod's socket only.
    A cluster: one TCP listener for every pod this activator specialized (`serve_tcp`), the
    token alone naming the pod."""

    def __init__(self, credentials: Credentials = no_credentials) -> None:
        self._credentials = credentials
        self._grants: dict[str, Grant] = {}  # by token
        self._tokens: dict[PodId, str] = {}
        self._runners: dict[PodId | None, web.ServerRunner] = {}  # None: the TCP listener
        self._session: aiohttp.ClientSession | None = None
        self.portal: Portal | None = None  # where portion calls go (`ember.activator.portions`)
        self.state: StateHandler | None = None  # where key-value state operations go (`ember.state`)

    async def open_pod(self, pod: PodId, path: Path) -> None:
        """Listen on `path` for `pod`'s calls (refused until `grant`). The socket is world-writable
        (sandbox users are other uids): keep it in a folder only that pod's sandbox sees."""
        runner = await self._runner(pod)
        try:
            await web.UnixSite(runner, str(path)).start()
            os.chmod(path, 0o666)
        except BaseException:
            await runner.cleanup()
            raise
        self._runners[pod] = runner

    async def serve_tcp(self, host: str, port: int) -> int:
        """Listen on host:port for the calls of every granted pod; returns the port."""
        runner = await self._runner(None)
        try:
            await web.TCPSite(runner, host, port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runners[None] = runner
        return int(runner.addresses[0][1])

    def grant(
        self, pod: PodId, namespace: str, services: Sequence[ServiceRoute], *, state_scope: str | None = None
    ) -> str:
        """Let `pod` call `services` with the credentials of `namespace`, and use the key-value state
        of `state_scope`; returns its fresh token (a pod granted again loses its previous one)."""
        self.revoke(pod)
        token = secrets.token_urlsafe(24)
        self._grants[token] = Grant(pod, namespace, {s.name: s for s in services}, state_scope)
        self._tokens[pod] = token
        return token

    def revoke(self, pod: PodId) -> None:
        """`pod` may call nothing any more."""
        token = self._tokens.pop(pod, None)
        if token is not None:
            self._grants.pop(token, None)

    @staticmethod
    def announce(
        base: str, token: str, services: Sequence[ServiceRoute], *, calls: bool = False, state: bool = False
    ) -> dict[str, str]:
        """The environment that tells function code where each service is: `base` (the pod's
        relay on its loopback, or this activator's listener), its token, the service's name;
        with `calls`, where its portions are (`EMBER_PORTIONS_URL`); with `state`, where its
        Function's key-value state is (`EMBER_STATE_URL`)."""
        out = {s.env_name: f"{base}/{token}/{s.name}" for s in services}
        if calls:
            out["EMBER_PORTIONS_URL"] = f"{base}/{token}/{PORTIONS}"
        if state:
            out["EMBER_STATE_URL"] = f"{base}/{token}/{STATE}"
        return out

    async def close_pod(self, pod: PodId) -> None:
        """Revoke `pod`'s grant and stop listening for it (calls in flight are cut)."""
        self.revoke(pod)
        runner = self._runners.pop(pod, None)
        if runner is not None:
            await runner.cleanup()

    async def close(self) -> None:
        for runner in self._runners.values():
            await runner.cleanup()
        self._runners.clear()
        self._grants.clear()
        self._tokens.clear()
        if self._session is not None:
            await self._session.close()

    async def _runner(self, pod: PodId | None) -> web.ServerRunner:
        server = web.Server(functools.partial(self._handle, pod), access_log=None)
        runner = web.ServerRunner(server, access_log=None, handle_signals=False)
        await runner.setup()
        return runner

    # -- one call

    async def _handle(self, listener: PodId | None, request: web.BaseRequest) -> web.StreamResponse:
        raw, _, query = request.raw_path.partition("?")
        token, _, rest = raw.lstrip("/").partition("/")
        # 192 random bits; a dict lookup leaks no usable timing (str hashes are salted per process)
        grant = self._grants.get(token)
        if grant is None or listener not in (None, grant.pod):
            where = listener or request.remote or "?"
            return _refuse(where, 401, "Unauthorized", "no valid token in the path (use EMBER_SERVICE_<NAME>_URL)")
        pod = grant.pod
        name, slash, tail = rest.partition("/")
        path = slash + tail
        if name == PORTIONS:
            if self.portal is None:
                return _refuse(pod, 404, "PortionNotFound", "portion calls are not served here")
            return await self.portal(pod, tail, request)
        if name == STATE and not path:
            if grant.state_scope is None:
                return _refuse(
                    pod, 404, "StateNotEnabled", "this Function has no key-value state (spec.state.keyValue)"
                )
            if self.state is None:
                return _refuse(pod, 503, "StateUnavailable", "key-value state is not served here")
            return await self.state(grant.state_scope, request)
        service = grant.services.get(name)
        if service is None:
            known = ", ".join(sorted(grant.services)) or "none"
            return _refuse(pod, 404, "UnknownService", f"no service {name!r} in this policy (services: {known})")
        if service.methods and request.method not in service.methods:
            allowed = ", ".join(service.methods)
            message = f"{request.method} is not allowed for {name} (allowed: {allowed})"
            return _refuse(pod, 405, "MethodNotAllowed", message, allow=allowed)
        problem = path_problem(path, service.path_prefixes)
        if problem:
            return _refuse(pod, 403, "PathNotAllowed", f"{name}: {problem}")
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP)
        headers.popall(service.header, None)  # the code never chooses the credential
        if service.secret_name is not None and service.secret_key is not None:
            try:
                # the value as the Secret holds it, less surrounding whitespace (a file's newline)
                credential = (await self._credentials(grant.namespace, service.secret_name, service.secret_key)).strip()
            except CredentialUnavailable as err:
                return _refuse(pod, 503, "CredentialUnavailable", f"{name}: {err}")
            if any(c in credential for c in "\r\n\0"):
                where = f"Secret {grant.namespace}/{service.secret_name} key {service.secret_key!r}"
                return _refuse(pod, 503, "CredentialUnavailable", f"{name}: {where} is not one line of text")
            headers[service.header] = credential
        base = URL(service.url)
        target = f"{base.origin()}{base.raw_path.rstrip('/')}{path}" + (f"?{query}" if query else "")
        return await self._forward(pod, name, request, URL(target, encoded=True), headers)

    async def _forward(
        self, pod: PodId, name: str, request: web.BaseRequest, target: URL, headers: CIMultiDict[str]
    ) -> web.StreamResponse:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=UPSTREAM_TIMEOUT, auto_decompress=False)
        body = request.content if request.body_exists else None
        try:
            async with self._session.request(
                request.method, target, headers=headers, data=body, allow_redirects=False
            ) as upstream:
                response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for key, value in upstream.headers.items():
                    if key.lower() not in HOP_BY_HOP and key.lower() != "content-length":
                        response.headers.add(key, value)
                if upstream.content_length is not None:
                    response.content_length = upstream.content_length
                await response.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
                return response
        except (aiohttp.ClientError, TimeoutError) as err:
            # aiohttp's message names the host and port, never the headers sent
            return _refuse(pod, 502, "ServiceUnavailable", f"{name}: {type(err).__name__}: {err}")


def path_problem(path: str, prefixes: Sequence[str]) -> str:
    """Why `path` (raw, percent-encoded; empty or starting with /) may not be called, or "".

    A prefix matches whole segments: `/v1/charges` allows `/v1/charges` and `/v1/charges/7`,
    not `/v1/chargesX`."""
    lowered = path.lower()
    if any(unquote(s) in (".", "..") for s in path.split("/")) or "%2f" in lowered or "%5c" in lowered or "\\" in path:
        return f"path {path!r} has a . or .. segment, a \\, or an encoded / or \\"
    if not prefixes:
        return ""
    decoded = unquote(path) or "/"
    for prefix in prefixes:
        if decoded == prefix or decoded.startswith(prefix if prefix.endswith("/") else prefix + "/"):
            return ""
    return f"path {path!r} is not under the allowed prefixes ({', '.join(prefixes)})"


def _refuse(pod: str, status: int, error_type: str, message: str, allow: str | None = None) -> web.Response:
    log.info("service call refused pod=%s status=%d %s: %s", pod, status, error_type, message)
    response = web.json_response({"errorType": error_type, "errorMessage": message}, status=status)
    if allow is not None:
        response.headers["Allow"] = allow
    return response
