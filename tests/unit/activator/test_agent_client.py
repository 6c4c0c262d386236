"""Parsing agent responses in the activator's HTTP client: split reads, keep-alive, malformed input.

Feeds bytes to the protocol object directly (no sockets); calls to real agents are in tests/local.
"""

from __future__ import annotations

import asyncio

import pytest

from ember.activator.agent_client import AgentClient, AgentLost, _Connection, _parse_head
from ember.activator.throttler import PodSlots
from ember.pods.base import ClaimKind, PodHandle, PodId, PoolKey


class _Transport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))

    def close(self) -> None:
        self.closed = True


def _connected() -> tuple[_Connection, _Transport]:
    connection = _Connection()
    transport = _Transport()
    connection.connection_made(transport)
    return connection, transport


RESPONSE = (
    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Ember-Function-Error: Handled\r\n"
    b'Content-Length: 11\r\n\r\n{"a": true}'
)


async def test_response_split_across_reads_is_reassembled() -> None:
    connection, transport = _connected()
    reply = connection.request(b"POST / HTTP/1.1\r\n\r\n")
    for i in range(0, len(RESPONSE), 7):
        connection.data_received(RESPONSE[i : i + 7])
    status, headers, body = await reply
    assert (status, headers[b"x-ember-function-error"], body) == (200, b"Handled", b'{"a": true}')
    assert transport.written == [b"POST / HTTP/1.1\r\n\r\n"]
    assert not connection.closed
    second = connection.request(b"again")
    connection.data_received(RESPONSE)
    assert (await second)[0] == 200


async def test_connection_close_header_closes_after_the_reply() -> None:
    connection, transport = _connected()
    reply = connection.request(b"x")
    connection.data_received(b"HTTP/1.1 503 Unavailable\r\nConnection: close\r\nContent-Length: 0\r\n\r\n")
    assert (await reply)[0] == 503
    assert transport.closed


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"garbage\r\n\r\n", id="bad-status-line"),
        pytest.param(b"HTTP/1.1 200 OK\r\nno colon here\r\n\r\n", id="bad-header"),
        pytest.param(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n", id="chunked"),
        pytest.param(b"HTTP/1.1 200 OK\r\nContent-Length: many\r\n\r\n", id="bad-length"),
        pytest.param(b"HTTP/1.1 200 OK\r\nX: " + b"y" * 70_000, id="oversized-head"),
    ],
)
async def test_malformed_responses_fail_the_invocation(data: bytes) -> None:
    connection, transport = _connected()
    reply = connection.request(b"x")
    connection.data_received(data)
    with pytest.raises(AgentLost):
        await reply
    assert transport.closed


async def test_connection_lost_mid_reply_is_agent_lost() -> None:
    connection, _ = _connected()
    reply = connection.request(b"x")
    connection.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial")
    connection.connection_lost(None)
    with pytest.raises(AgentLost, match="connection closed"):
        await reply


def test_parse_head_lowercases_names() -> None:
    (status, headers), length = _parse_head(b"HTTP/1.1 201 Created\r\nX-Ember-Duration-Ms: 1.5\r\nContent-Length: 3")
    assert (status, headers[b"x-ember-duration-ms"], length) == (201, b"1.5", 3)


async def test_invoke_sends_the_pods_token_in_the_head_built_once_per_pod() -> None:
    """Every invocation carries `Authorization: Bearer <the pod's token>` (CONTRACT.md); the
    fixed part of the head is the pod's, made when its slots were."""
    handle = PodHandle(
        id=PodId("p1"),
        address="10.0.0.7:8080",
        pool=PoolKey("python3.12", "gvisor", 128, "h"),
        claim=ClaimKind.POOL_HIT,
        token="tok-" + "x" * 40,
    )
    slots = PodSlots(handle, now=0.0)
    assert "tok-" not in repr(handle)  # never logged with the handle
    head = slots.invoke_head
    client = AgentClient()
    connection, transport = _connected()
    client._idle[handle.address] = [connection]
    invoking = asyncio.ensure_future(
        client.invoke(slots, b'{"k": 1}', request_id="req-1", timeout_s=5.0, log_tail=True)
    )
    await asyncio.sleep(0)
    connection.data_received(RESPONSE)
    reply = await invoking
    assert reply.status == 200
    assert transport.written == [
        b"POST /v1/invoke HTTP/1.1\r\nHost: 10.0.0.7:8080\r\nContent-Type: application/json\r\n"
        b"Authorization: Bearer tok-" + b"x" * 40 + b"\r\nX-Ember-Request-Id: req-1\r\n"
        b'X-Ember-Log-Type: Tail\r\nContent-Length: 8\r\n\r\n{"k": 1}'
    ]
    assert slots.invoke_head is head
