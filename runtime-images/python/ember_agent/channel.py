"""The code's channel to Ember (runtime-images/CONTRACT.md, Portions and Key-value state): HTTP
POSTs to the URLs the host announced in the environment, each on a keep-alive connection of its
own per process, and `context.state` (also `ember_runtime.state`), the Function's key-value state.
"""

# contextlib.suppress would cost an import (functools, collections) in the worker:
# ruff: noqa: SIM105

import _socket
import _thread
import os

from .json_codec import JSONError, json_dumps, json_loads

STATE_TIMEOUT_S = 10.0  # one state operation, inside or outside an invocation


class ChannelUnreachable(Exception):
    """The request could not be sent or its answer not read (the message says why)."""


def _split_url(base):
    """'http://host:port/path' -> (host, port, path); the host announces only such URLs."""
    rest = base.split("://", 1)[1]
    netloc, slash, path = rest.partition("/")
    host, _, port = netloc.rpartition(":")
    return host.strip("[]"), int(port), slash + path


class _Connection:
    """A keep-alive HTTP/1.1 connection to one host per thread, dropped in a forked child (the
    socket is the parent's).  A raw socket, not http.client: importing that costs ~140 ms under
    gVisor on the first call, and each request ~0.1 ms more; Ember's side always answers with a
    Content-Length (or chunked)."""

    __slots__ = ("local",)

    def __init__(self):
        self.local = _thread._local()

    def post(self, base, path, body, headers, timeout):
        """-> (status, {lower-case header: value}, body bytes); ChannelUnreachable when it cannot be done.

        A kept-alive connection the other side closed while idle is opened again once (the
        request was not made); any other failure is not retried (the request may have been)."""
        mine = self.local
        if getattr(mine, "pid", 0) != os.getpid():
            mine.sock, mine.pid = None, os.getpid()  # not close(): that would end the parent's too
        host, port, _ = base
        extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
        request = (f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{extra}Content-Length: {len(body)}\r\n\r\n").encode(
            "latin-1"
        ) + body
        for attempt in (0, 1):
            sock = mine.sock
            reused = sock is not None
            try:
                if sock is None:
                    sock = mine.sock = _connect(timeout, host, port)
                sock.settimeout(timeout)
                sock.sendall(request)
                status, head, data, keep = _read_reply(sock)
            except (EOFError, OSError, ValueError) as e:  # ValueError: a malformed answer
                _close(mine)
                if reused and not attempt and isinstance(e, (EOFError, BrokenPipeError, ConnectionResetError)):
                    continue
                raise ChannelUnreachable(str(e) or type(e).__name__) from None
            if not keep:
                _close(mine)
            return status, head, data
        raise ChannelUnreachable("the connection was closed twice")  # not reached


def _connect(timeout, host, port):
    """A connection to Ember: EMBER_CHANNEL_SOCKET when the host announced one (local mode: the
    services proxy's socket itself, which skips the agent's relay, ~0.4 ms a request under gVisor),
    else TCP to the URL's host."""
    path = os.environ.get("EMBER_CHANNEL_SOCKET")
    if path:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        sock.settimeout(timeout)
        sock.connect(path)
        return sock
    family = _socket.AF_INET6 if ":" in host else _socket.AF_INET
    sock = _socket.socket(family, _socket.SOCK_STREAM)
    sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
    sock.settimeout(timeout)
    sock.connect((host, port))
    return sock


def _close(mine):
    sock, mine.sock = mine.sock, None
    if sock is not None:
        try:
            sock.close()
        except OSError:
            pass


def _read_reply(sock):
    """-> (status, headers, body, keep-alive) of one HTTP/1.1 answer; EOFError when the connection
    ends first (before any byte: the idle connection was closed)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed" if not buf else "connection closed mid-answer")
        buf += chunk
        if len(buf) > 65536:
            raise OSError("answer head too large")
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body, rest = b"", rest
        while True:
            while b"\r\n" not in rest:
                rest += _recv_some(sock)
            size_line, _, rest = rest.partition(b"\r\n")
            size = int(size_line.split(b";")[0], 16)
            while len(rest) < size + 2:
                rest += _recv_some(sock)
            body, rest = body + rest[:size], rest[size + 2 :]
            if size == 0:
                break
    else:
        length = int(headers.get("content-length", "0"))
        body = rest
        while len(body) < length:
            body += _recv_some(sock)
    keep = headers.get("connection", "").lower() != "close"
    return status, headers, body, keep


def _recv_some(sock):
    chunk = sock.recv(65536)
    if not chunk:
        raise EOFError("connection closed mid-answer")
    return chunk


def _error_of(data):
    """The `{"errorType", "errorMessage"}` of an answer, or None."""
    try:
        parsed = json_loads(data) if data else None
    except JSONError:
        return None
    return parsed if isinstance(parsed, dict) else None


class StateError(Exception):
    """A key-value state operation that was refused or could not be made."""

    def __init__(self, error_type, message, status=None):
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.error_message = message
        self.status = status


_STATE_CONN = _Connection()


def _state_op(body):
    base = os.environ.get("EMBER_STATE_URL", "")
    if not base:
        raise StateError("StateNotEnabled", "this Function has no key-value state (spec.state.keyValue)")
    if not isinstance(body.get("key"), str):
        raise StateError("InvalidStateRequest", f"a state key is a string, not {type(body.get('key')).__name__}")
    try:
        # as UTF-8, not \u escapes: the value's size limit counts its UTF-8 bytes
        data = json_dumps(body, ascii=False).encode()
    except (TypeError, ValueError) as e:  # UnicodeEncodeError (a lone surrogate) is a ValueError
        raise StateError("InvalidStateRequest", f"the value for state key {body['key']!r} is not JSON: {e}") from None
    url = _split_url(base)
    headers = {"Content-Type": "application/json"}
    try:
        status, _, answer = _STATE_CONN.post(url, url[2], data, headers, STATE_TIMEOUT_S)
    except ChannelUnreachable as e:
        raise StateError("StateUnavailable", f"Ember's state endpoint cannot be reached: {e}") from None
    parsed = _error_of(answer)
    if status != 200 or parsed is None:
        if parsed is not None and parsed.get("errorType"):
            raise StateError(parsed["errorType"], parsed.get("errorMessage", ""), status)
        raise StateError("StateUnavailable", answer[:200].decode(errors="replace"), status)
    return parsed


def _with_ttl(body, ttl):
    if ttl is not None:
        body["ttl"] = ttl
    return body


class KeyValueState:
    """The Function's key-value state, shared by all its pods (runtime-images/CONTRACT.md)."""

    __slots__ = ()

    def get(self, key, default=None):
        """The key's value, or `default` when it has none (or it expired)."""
        r = _state_op({"op": "get", "key": key})
        return r.get("value") if r.get("found") else default

    def put(self, key, value, ttl=None):
        """Set the key's value (any JSON but None); with `ttl` it expires after that many seconds."""
        _state_op(_with_ttl({"op": "put", "key": key, "value": value}, ttl))

    def delete(self, key):
        """Remove the key; True when it had a value."""
        return bool(_state_op({"op": "delete", "key": key}).get("deleted"))

    def incr(self, key, by=1, ttl=None):
        """Add `by` to the key's integer (a missing key counts as 0) and return the new value."""
        return _state_op(_with_ttl({"op": "incr", "key": key, "by": by}, ttl)).get("value")

    def compare_and_set(self, key, expected, value, ttl=None):
        """Set the key to `value` if it holds `expected` (None: if it has no value); True if it did."""
        body = {"op": "compare_and_set", "key": key, "expected": expected, "value": value}
        return bool(_state_op(_with_ttl(body, ttl)).get("swapped"))

    def __repr__(self):
        return "<ember key-value state>"


STATE = KeyValueState()
