"""The HTTP/1.1 server: a thread per connection (one spare started ahead), the routes, the answers."""

# contextlib.suppress would cost an import (functools, collections) on the start path:
# ruff: noqa: SIM105

import _socket
import _thread
import time

from .auth import _authorize, _authorized
from .config import MAX_DRAIN_BYTES, MAX_HEAD_BYTES, MAX_OTHER_BODY_BYTES, MAX_SPECIALIZE_BYTES, RUNTIME
from .errors import HTTPError, bad_request
from .freeze import _freeze_thaw
from .http_parse import body_length, parse_head
from .invoke import _invoke, _prefork_replacement
from .json_codec import jbytes
from .output import _mark, log_agent
from .specialize import _specialize
from .state import _OPEN_SOCKS, _S, _lock, _thread_state
from .supervisor import _ensure_template_loaded

_REASONS = {
    100: b"Continue",
    200: b"OK",
    400: b"Bad Request",
    401: b"Unauthorized",
    404: b"Not Found",
    405: b"Method Not Allowed",
    409: b"Conflict",
    413: b"Payload Too Large",
    422: b"Unprocessable Entity",
    429: b"Too Many Requests",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
}
_ROUTES = {"/healthz": "GET", "/v1/specialize": "POST", "/v1/invoke": "POST", "/v1/freeze": "POST", "/v1/thaw": "POST"}


class _Conn:
    __slots__ = ("buf", "sock")

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()

    def fill(self):
        chunk = self.sock.recv(262144)
        if not chunk:
            raise EOFError
        self.buf += chunk

    def read_exact(self, n):
        buf = self.buf
        if len(buf) >= n:
            data = bytes(buf[:n])
            del buf[:n]
            return data
        out = bytearray(n)
        view = memoryview(out)
        have = len(buf)
        view[:have] = buf
        buf.clear()
        while have < n:
            k = self.sock.recv_into(view[have:], n - have)
            if not k:
                raise EOFError
            have += k
        return bytes(out)

    def discard(self, n):
        take = min(n, len(self.buf))
        del self.buf[:take]
        n -= take
        while n > 0:
            k = len(self.sock.recv(min(n, 262144)))
            if not k:
                raise EOFError
            n -= k

    def read_line(self, limit=4096):
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                line = bytes(self.buf[:i])
                del self.buf[: i + 2]
                return line
            if len(self.buf) > limit:
                raise bad_request("chunk header line too long")
            self.fill()

    def read_chunked(self, limit):
        out = bytearray()
        while True:
            line = self.read_line()
            size_s = line.split(b";", 1)[0].strip()
            try:
                size = int(size_s, 16)
            except ValueError:
                raise bad_request("malformed chunk size {!r}".format(size_s[:20].decode("latin-1"))) from None
            if size < 0:
                raise bad_request("malformed chunk size")
            if size == 0:
                while self.read_line():  # trailers
                    pass
                return bytes(out)
            if len(out) + size > limit:
                raise HTTPError(413, "RequestTooLarge", f"request body is larger than the limit of {limit} bytes")
            out += self.read_exact(size)
            if self.read_exact(2) != b"\r\n":
                raise bad_request("malformed chunk: missing CRLF after data")


def _thaw_first(headers):
    """An invocation with `X-Ember-Thaw: 1` thaws a frozen agent first (CONTRACT.md): None when
    it may run, else the failed thaw's (status, answer)."""
    if headers.get("x-ember-thaw") != "1" or not _S.frozen:
        return None
    status, obj = _freeze_thaw(False)
    return None if status == 200 else (status, obj)


def _respond(sock, status, body, extra=b"", close=False):
    head = b"HTTP/1.1 %d %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n%s%s\r\n" % (
        status,
        _REASONS.get(status, b"Unknown"),
        len(body),
        extra,
        b"Connection: close\r\n" if close else b"",
    )
    if len(body) < 65536:
        sock.sendall(head + body)
    else:
        sock.sendall(head)
        sock.sendall(body)


def _healthz(authorized):
    """Liveness for anyone; what the pod runs only for the client holding its token."""
    if not authorized:
        return {"state": "frozen" if _S.frozen else _S.state, "runtime": RUNTIME}
    with _lock:
        return {
            "state": "frozen" if _S.frozen else _S.state,
            "runtime": RUNTIME,
            "codeHash": _S.code_hash,
            "inFlight": _S.in_flight,
            "concurrency": _S.concurrency,
        }


def _serve_conn(sock):
    conn = _Conn(sock)
    try:
        while True:
            # --- request head
            buf = conn.buf
            while True:
                while buf[:2] == b"\r\n":  # tolerate stray CRLF between requests
                    del buf[:2]
                i = buf.find(b"\r\n\r\n")
                if i >= 0:
                    break
                if len(buf) > MAX_HEAD_BYTES:
                    raise HTTPError(400, "InvalidRequest", f"request head larger than {MAX_HEAD_BYTES} bytes")
                try:
                    conn.fill()
                except EOFError:
                    if buf.strip():
                        raise bad_request("connection closed in the middle of a request head") from None
                    return
            head = bytes(buf[:i])
            del buf[: i + 4]
            _mark("a.head")
            method, path, version, headers = parse_head(head)
            conn_hdr = headers.get("connection", "").lower()
            keep = ("close" not in conn_hdr) if version == "HTTP/1.1" else ("keep-alive" in conn_hdr)
            # --- body
            limit = (
                _S.max_payload
                if path == "/v1/invoke"
                else MAX_SPECIALIZE_BYTES
                if path == "/v1/specialize"
                else MAX_OTHER_BODY_BYTES
            )
            try:
                n = body_length(headers, limit)
            except HTTPError as e:
                # Too large but announced: read and drop it so the client sees the 413 instead of
                # a connection reset, and the connection stays usable.
                cl = headers.get("content-length", "")
                if e.status != 413 or not cl.isdigit() or int(cl) > MAX_DRAIN_BYTES or "expect" in headers:
                    raise
                conn.discard(int(cl))
                _respond(sock, 413, jbytes({"errorType": e.error_type, "errorMessage": e.message}), close=not keep)
                if not keep:
                    return
                continue
            if n and headers.get("expect", "").lower() == "100-continue" and len(buf) < n:
                sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
            body = conn.read_chunked(limit) if n < 0 else conn.read_exact(n) if n else b""
            _mark("a.body")
            # --- dispatch
            want = _ROUTES.get(path)
            replace = False
            try:
                if want is None:
                    raise HTTPError(404, "NotFound", f"no route {method} {path}")
                if method != want:
                    raise HTTPError(405, "MethodNotAllowed", f"{method} {path}: use {want}")
                if path != "/healthz":
                    _authorize(headers, path == "/v1/specialize")
                if path == "/v1/invoke":
                    thaw = _thaw_first(headers)
                    if thaw is None:
                        status, out, extra, replace = _invoke(headers, body)
                    else:  # the thaw the invocation asked for failed: it did not run
                        status, out, extra = thaw[0], jbytes(thaw[1]), b""
                elif path == "/healthz":
                    status, out, extra = 200, jbytes(_healthz(_authorized(headers))), b""
                elif path == "/v1/specialize":
                    status, obj = _specialize(body)
                    out, extra = jbytes(obj), b""
                else:
                    status, obj = _freeze_thaw(path == "/v1/freeze")
                    out, extra = jbytes(obj), b""
            except HTTPError as e:
                status, out, extra = e.status, jbytes({"errorType": e.error_type, "errorMessage": e.message}), b""
                if e.status == 405:
                    extra = b"Allow: %s\r\n" % want.encode()
                elif e.status == 401:
                    extra = b"WWW-Authenticate: Bearer\r\n"
            if not keep:
                _respond(sock, status, out, extra, close=True)
                _after_response(path)
                return
            if version == "HTTP/1.0":
                extra += b"Connection: keep-alive\r\n"
            _respond(sock, status, out, extra)
            _mark("a.replied")
            if replace:
                _prefork_replacement()
            _after_response(path)
    except HTTPError as e:  # protocol-level: answer and close, the stream can't be trusted
        try:
            _respond(sock, e.status, jbytes({"errorType": e.error_type, "errorMessage": e.message}), close=True)
            # lingering close: let the client finish sending so it reads our answer, not a reset
            sock.shutdown(_socket.SHUT_WR)
            sock.settimeout(1.0)
            budget = 4 * 1024 * 1024
            while budget > 0:
                k = len(sock.recv(262144))
                if not k:
                    break
                budget -= k
        except OSError:
            pass
    except (EOFError, OSError):
        pass
    except Exception as e:  # a bug: say so, answer 500, keep the agent alive
        log_agent(f"internal error: {type(e).__name__}: {e}")
        try:
            _respond(
                sock,
                500,
                jbytes({"errorType": "AgentError", "errorMessage": f"{type(e).__name__}: {e}"}),
                close=True,
            )
        except OSError:
            pass
    finally:
        _OPEN_SOCKS.discard(sock)
        try:
            sock.close()
        except OSError:
            pass


def _after_response(path):
    """Work kept off the answer: the log line of a specialization; once the first invocation is
    answered, the template loads the code (see _ensure_template_loaded)."""
    note = getattr(_thread_state, "note", None)
    if note is not None:
        _thread_state.note = None
        log_agent(note)
    if getattr(_thread_state, "start_spare", False):
        _thread_state.start_spare = False
        _start_spare()
    tmpl = _S.template
    if path == "/v1/invoke" and tmpl is not None and tmpl.load_frame is not None:
        _ensure_template_loaded(tmpl)


def _accept_loop(lsock, family):
    while True:
        try:
            fd, _addr = lsock._accept()
        except OSError:
            if _S.shutting_down:
                return
            time.sleep(0.01)
            continue
        sock = _socket.socket(family, _socket.SOCK_STREAM, 0, fd)
        if family != _socket.AF_UNIX:
            try:
                sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
            except OSError:
                pass
        _OPEN_SOCKS.add(sock)
        with _lock:
            spare = _spares.pop() if _spares else None
        if spare is None:
            _thread.start_new_thread(_serve_conn, (sock,))
        else:
            spare.sock = sock
            spare.ready.release()


class _Spare:
    """A connection thread started ahead of its connection: under gVisor starting a thread costs
    ~0.7 ms, which a new connection (the activator's first invoke of a cold start) then skips."""

    __slots__ = ("ready", "sock")

    def __init__(self):
        self.ready = _thread.allocate_lock()
        self.ready.acquire()
        self.sock = None


_spares = []  # idle _Spare threads, at most one (guarded by _lock)


def _start_spare():
    with _lock:
        if _spares or _S.shutting_down:
            return
        spare = _Spare()
        _spares.append(spare)
    _thread.start_new_thread(_spare_main, (spare,))


def _spare_main(spare):
    spare.ready.acquire()
    _thread_state.start_spare = True  # the next spare starts after this connection's first answer
    _serve_conn(spare.sock)
    if _thread_state.start_spare:  # closed before any answer
        _start_spare()
