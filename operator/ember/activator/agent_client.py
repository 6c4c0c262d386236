"""Calls from the activator to runtime agents (CONTRACT.md `/v1/invoke`): the hot path's client.

Every invocation passes here, so this is a small HTTP/1.1 client on asyncio protocols rather
than `aiohttp.ClientSession`: the session spent about 250 µs of CPU per request in the
activator's profile (request/response objects, header multidicts, stream readers), more than
the whole server side; this client writes one pre-assembled request and parses one
Content-Length response, about 20 µs. It only has to speak to our own agents, which answer
every request with Content-Length and keep connections alive. Each request carries the pod's
bearer token (CONTRACT.md, Authentication) in a head prefix its `PodSlots` built once.

Connections are kept per pod address and reused (keep-alive); the router never has more
invocations in flight on a pod than its concurrency, so a pod never has more connections
than that. A connection that fails before the request is written means the agent was
unreachable (the invocation can go to another pod); one that breaks after means the pod died
running it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from ember.activator.throttler import PodSlots
from ember.pods.base import unix_socket

MAX_HEAD_BYTES = 64 * 1024
_LOG_TAIL = b"X-Ember-Log-Type: Tail\r\n"


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
    cpu_ms: str | None = None  # right-sizing reads these three (`VersionState.record_usage`)


class _Connection(asyncio.Protocol):
    """One keep-alive connection to an agent; one request at a time."""

    __slots__ = ("_buffer", "_head", "_length", "_waiter", "closed", "transport")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buffer = bytearray()
        self._waiter: asyncio.Future[tuple[int, dict[bytes, bytes], bytes]] | None = None
        self._head: tuple[int, dict[bytes, bytes]] | None = None
        self._length = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def request(self, data: bytes) -> asyncio.Future[tuple[int, dict[bytes, bytes], bytes]]:
        assert self.transport is not None
        assert self._waiter is None, "one request at a time per connection"
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return waiter

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        if self._head is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD_BYTES:
                    self._fail(AgentLost("agent sent an oversized response head"))
                return
            try:
                self._head, self._length = _parse_head(bytes(buffer[:end]))
            except ValueError as err:
                self._fail(AgentLost(f"agent sent a malformed response: {err}"))
                return
            del buffer[: end + 4]
        if len(buffer) < self._length:
            return
        status, headers = self._head
        body = bytes(buffer[: self._length])
        del buffer[: self._length]
        self._head = None
        waiter, self._waiter = self._waiter, None
        if headers.get(b"connection") == b"close":
            self.close()
        if waiter is not None and not waiter.done():
            waiter.set_result((status, headers, body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(AgentLost(f"connection closed: {exc or 'by the agent'}"))

    def _fail(self, error: Exception) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)
        self.close()

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


def _parse_head(head: bytes) -> tuple[tuple[int, dict[bytes, bytes]], int]:
    lines = head.split(b"\r\n")
    status_line = lines[0]
    if not status_line.startswith(b"HTTP/1.") or len(status_line) < 12:
        raise ValueError(f"bad status line {status_line[:40]!r}")
    status = int(status_line[9:12])
    headers: dict[bytes, bytes] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep:
            raise ValueError(f"bad header line {line[:40]!r}")
        headers[name.strip().lower()] = value.strip()
    if b"transfer-encoding" in headers:
        raise ValueError("chunked responses are not part of the agent contract")
    length = int(headers.get(b"content-length", b"0"))
    return (status, headers), length


def _text(headers: dict[bytes, bytes], name: bytes) -> str | None:
    value = headers.get(name)
    return value.decode("latin-1") if value is not None else None


class AgentClient:
    """HTTP client of the runtime agents; `start` and `close` bracket its life."""

    def __init__(self) -> None:
        self._idle: dict[str, list[_Connection]] = {}
        self._all: set[_Connection] = set()
        self._closing = False

    async def start(self) -> None:
        self._closing = False

    async def close(self) -> None:
        self._closing = True
        for connection in list(self._all):
            connection.close()
        self._all.clear()
        self._idle.clear()

    async def _connect(self, address: str) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            path = unix_socket(address)
            if path is not None:
                _, connection = await loop.create_unix_connection(_Connection, path)
            else:
                host, _, port = address.rpartition(":")
                _, connection = await loop.create_connection(_Connection, host, int(port))
        except OSError as err:
            raise AgentUnreachable(f"agent at {address}: {err}") from err
        self._all.add(connection)
        return connection

    async def preconnect(self, address: str) -> None:
        """Open a kept connection to a pod before its first invocation needs one.

        In gVisor a new connection costs the agent an accept and a thread (tens of ms under
        ptrace); the scaler calls this while the pod is being specialized, off the cold path.
        """
        connection = await self._connect(address)
        self._idle.setdefault(address, []).append(connection)

    async def invoke(
        self,
        pod: PodSlots,
        body: bytes,
        *,
        request_id: str,
        timeout_s: float,
        log_tail: bool,
        call_token: str | None = None,
        function_timeout_ms: int | None = None,
        thaw: bool = False,
    ) -> AgentReply:
        """POST the event to the pod's agent and read the whole reply (`call_token`: the
        invocation's portion calls, `ember.activator.portions`; `function_timeout_ms`: shorter than
        the Version's timeout, for a portion called with less time left; `thaw`: the pod is frozen,
        and the agent thaws it first, `ember.activator.freezer`)."""
        address = pod.address
        extra = b""
        if call_token is not None:
            extra += b"X-Ember-Call-Token: %s\r\n" % call_token.encode()
        if function_timeout_ms is not None:
            extra += b"X-Ember-Timeout-Ms: %d\r\n" % function_timeout_ms
        if thaw:
            extra += b"X-Ember-Thaw: 1\r\n"
        # one join: the pod's fixed head (with its token, `PodSlots.invoke_head`), this request's lines, the body
        request = b"%sX-Ember-Request-Id: %s\r\n%s%sContent-Length: %d\r\n\r\n%s" % (
            pod.invoke_head,
            request_id.encode("latin-1"),
            _LOG_TAIL if log_tail else b"",
            extra,
            len(body),
            body,
        )
        connection = self._take_idle(address) or await self._connect(address)
        try:
            async with asyncio.timeout(timeout_s):
                status, headers, payload = await connection.request(request)
        except BaseException:
            # never retried here: the agent may have started the invocation
            connection.close()
            self._all.discard(connection)
            raise
        if connection.closed or self._closing:
            self._all.discard(connection)
        else:
            self._idle.setdefault(address, []).append(connection)
        return AgentReply(
            status=status,
            body=payload,
            function_error=_text(headers, b"x-ember-function-error"),
            log_result=_text(headers, b"x-ember-log-result"),
            duration_ms=_text(headers, b"x-ember-duration-ms"),
            max_rss_kib=_text(headers, b"x-ember-max-rss-kib"),
            cpu_ms=_text(headers, b"x-ember-cpu-ms"),
        )

    async def control(self, pod: PodSlots, path: str, *, timeout_s: float) -> tuple[int, bytes]:
        """POST an empty request to one of the agent's control endpoints (`/v1/freeze`) on a
        connection of its own, closed after the answer; -> (status, body)."""
        head = pod.invoke_head.replace(b"POST /v1/invoke ", b"POST %s " % path.encode(), 1)
        connection = await self._connect(pod.address)
        try:
            async with asyncio.timeout(timeout_s):
                status, _, body = await connection.request(b"%sConnection: close\r\nContent-Length: 0\r\n\r\n" % head)
        finally:
            connection.close()
            self._all.discard(connection)
        return status, body

    def _take_idle(self, address: str) -> _Connection | None:
        idle = self._idle.get(address)
        while idle:
            candidate = idle.pop()
            if not candidate.closed:
                return candidate
            self._all.discard(candidate)
        return None

    def forget(self, address: str) -> None:
        """Close the kept connections of a pod that is gone."""
        for connection in self._idle.pop(address, []):
            connection.close()
            self._all.discard(connection)
