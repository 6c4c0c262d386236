"""Calls from the activator to runtime agents (CONTRACT.md `/v1/invoke`).

One `aiohttp.ClientSession` for the activator's life, with keep-alive connections to every
pod; nothing is built per request except the request headers.
"""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp

from ember.activator.throttler import PodSlots


class AgentUnreachable(Exception):
    """The pod's agent could not be reached: the invocation was not delivered."""


class AgentLost(Exception):
    """The connection broke after the invocation was sent: the pod probably died running it."""


@dataclass(frozen=True, slots=True)
class AgentReply:
    """What an agent answered to one invocation."""

    status: int
    body: bytes
    function_error: str | None
    log_result: str | None
    duration_ms: str | None
    max_rss_kib: str | None


class AgentClient:
    """HTTP client of the runtime agents; `start` and `close` bracket its life."""

    def __init__(self, *, keepalive_timeout_s: float = 60.0) -> None:
        self._keepalive_timeout_s = keepalive_timeout_s
        self._session: aiohttp.ClientSession | None = None
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(
            limit=0, keepalive_timeout=self._keepalive_timeout_s, enable_cleanup_closed=False, ttl_dns_cache=None
        )
        self._session = aiohttp.ClientSession(
            connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent", "Accept-Encoding")
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _timeout(self, seconds: float) -> aiohttp.ClientTimeout:
        timeout = self._timeouts.get(seconds)
        if timeout is None:
            timeout = self._timeouts[seconds] = aiohttp.ClientTimeout(total=seconds, sock_connect=min(seconds, 5.0))
        return timeout

    async def invoke(
        self, pod: PodSlots, body: bytes, *, request_id: str, timeout_s: float, log_tail: bool
    ) -> AgentReply:
        """POST the event to the pod's agent and read the whole reply."""
        assert self._session is not None, "AgentClient.start() was not awaited"
        headers = {"X-Ember-Request-Id": request_id, "Content-Type": "application/json"}
        if log_tail:
            headers["X-Ember-Log-Type"] = "Tail"
        try:
            async with self._session.post(pod.url, data=body, headers=headers, timeout=self._timeout(timeout_s)) as r:
                payload = await r.read()
                h = r.headers
                return AgentReply(
                    status=r.status,
                    body=payload,
                    function_error=h.get("X-Ember-Function-Error"),
                    log_result=h.get("X-Ember-Log-Result"),
                    duration_ms=h.get("X-Ember-Duration-Ms"),
                    max_rss_kib=h.get("X-Ember-Max-Rss-Kib"),
                )
        except aiohttp.ClientConnectorError as err:
            raise AgentUnreachable(f"agent at {pod.address}: {err}") from err
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError, aiohttp.ClientPayloadError) as err:
            raise AgentLost(f"agent at {pod.address} closed the connection: {err}") from err
        except TimeoutError as err:
            raise TimeoutError(f"agent at {pod.address} gave no reply within {timeout_s:g} s") from err
