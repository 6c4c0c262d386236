"""POST /v1/invoke: one invocation on an idle (or fresh) worker, and its outcome as the response and
the X-Ember-* headers.
"""

import os
import time

from .config import LOG_TAIL_BYTES
from .errors import HTTPError, bad_request, describe_status
from .forksafe import _import
from .frames import _HDR, _INV, _RES, ST_BAD_EVENT, ST_HANDLED, ST_OK, ST_OOM, ST_UNHANDLED, T_INVOKE, T_LOG, T_RESULT
from .json_codec import jbytes
from .output import _mark, _write_fd, prefix_lines
from .state import _S, _lock
from .supervisor import _discard_worker, _ensure_template_loaded, _spawn_worker, _wait_status


def new_request_id():
    h = os.urandom(16).hex()
    return "{}-{}-4{}-{}{}-{}".format(h[:8], h[8:12], h[13:16], "89ab"[int(h[16], 16) & 3], h[17:20], h[20:32])


def valid_request_id(rid):
    return 0 < len(rid) <= 128 and all(c.isalnum() or c in "-_.:" for c in rid) and rid.isascii()


def valid_call_token(token):
    """A portion-call token (the activator's: URL-safe base64)."""
    return 0 < len(token) <= 64 and token.isascii() and all(c.isalnum() or c in "-_" for c in token)


def log_tail(buf, limit=LOG_TAIL_BYTES):
    """Last `limit` bytes of `buf`, not starting in the middle of a UTF-8 sequence."""
    tail = bytes(buf[-limit:])
    if len(buf) > limit:
        i = 0
        while i < 3 and i < len(tail) and 0x80 <= tail[i] < 0xC0:
            i += 1
        tail = tail[i:]
    return tail


def _agent_error(rid, error_type, message):
    return jbytes({"errorMessage": message, "errorType": error_type, "requestId": rid, "stackTrace": []})


def _proc_stats(pid):
    """(max rss KiB, cpu ms) of a live process from /proc, zeros when unavailable."""
    rss = cpu = 0
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    rss = int(line.split()[1])
                    break
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        cpu = (int(fields[11]) + int(fields[12])) * 1000.0 / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    return rss, cpu


def _invoke(headers, body):
    """-> (status, body bytes, extra header bytes)."""
    rid = headers.get("x-ember-request-id") or new_request_id()
    if not valid_request_id(rid):
        raise bad_request("X-Ember-Request-Id must be 1-128 characters of letters, digits and -_.:")
    tmo = headers.get("x-ember-timeout-ms")
    want_tail = headers.get("x-ember-log-type", "").lower() == "tail"
    call = headers.get("x-ember-call-token", "")
    if call and not valid_call_token(call):
        raise bad_request("X-Ember-Call-Token must be 1-64 characters of letters, digits and -_")
    with _lock:
        if _S.frozen:
            raise HTTPError(503, "Frozen", "the agent is frozen; thaw it first")
        if _S.state != "specialized":
            raise HTTPError(503, "NotSpecialized", "the agent is not specialized; POST /v1/specialize first")
        if _S.in_flight >= _S.concurrency:
            raise HTTPError(
                429, "TooManyRequests", f"{_S.in_flight} invocation(s) in flight; concurrency is {_S.concurrency}"
            )
        if tmo is not None:
            if not tmo.isdigit() or int(tmo) <= 0:
                raise bad_request("X-Ember-Timeout-Ms must be a positive integer")
            timeout_ms = int(tmo)
        else:
            timeout_ms = int(_S.spec["timeoutSeconds"] * 1000)
        memory = _S.spec["memoryMiB"]
        _S.in_flight += 1
        w = _S.idle.pop() if _S.idle else None
    t0 = time.monotonic_ns()
    deadline = t0 + timeout_ms * 1_000_000
    tail = bytearray() if want_tail else None
    replace = False
    try:
        status, out, dur, cpu, rss, ferr, w, replace = _run(w, rid, deadline, body, tail, t0, timeout_ms, memory, call)
    except BaseException:
        with _lock:
            _S.in_flight -= 1
        raise
    with _lock:
        _S.in_flight -= 1
        if w is not None:
            if _S.n_workers > _S.concurrency:
                w_extra = w
                w = None
            else:
                _S.idle.append(w)
                w_extra = None
        else:
            w_extra = None
    if w_extra is not None:
        _discard_worker(w_extra)
    if status == 400:
        return 400, out, b"", False
    extra = (
        b"X-Ember-Request-Id: %s\r\nX-Ember-Duration-Ms: %.3f\r\nX-Ember-Max-Rss-Kib: %d\r\nX-Ember-Cpu-Ms: %.3f\r\n"
        % (rid.encode(), dur, rss, cpu)
    )
    if ferr:
        extra += b"X-Ember-Function-Error: " + ferr + b"\r\n"
    if tail is not None:
        binascii = _import("binascii")
        extra += b"X-Ember-Log-Result: " + binascii.b2a_base64(log_tail(tail), newline=False) + b"\r\n"
    return 200, out, extra, replace


def _agent_log(rid, tail, text):
    data = text.encode() + b"\n"
    if tail is not None:
        tail += data
    _write_fd(1, prefix_lines(rid, data))


def _run(w, rid, deadline, body, tail, t0, timeout_ms, memory, call=""):
    """Run one invocation on a worker.

    -> (http status, body, duration ms, cpu ms, rss KiB, function error, worker to keep or None,
        whether to pre-fork a replacement)."""
    holder = [w]
    try:
        return _run1(holder, rid, deadline, body, tail, t0, timeout_ms, memory, call)
    except BaseException:
        if holder[0] is not None:
            _discard_worker(holder[0])
        raise


def _run1(holder, rid, deadline, body, tail, t0, timeout_ms, memory, call=""):
    w = holder[0]
    payload = _INV.pack(deadline, len(rid), len(call)) + rid.encode() + call.encode()
    for attempt in (0, 1):
        if w is None:
            w = holder[0] = _spawn_worker()
        if not w.await_hello((deadline - time.monotonic_ns()) / 1e9):
            _discard_worker(w)
            w = holder[0] = None
            if attempt:
                raise HTTPError(502, "Runtime.WorkerUnavailable", "a worker process did not start")
            continue
        try:
            w.sock.sendall(_HDR.pack(len(payload) + len(body), T_INVOKE) + payload + body)
            _mark("a.inv_sent")
            break
        except OSError:  # an idle worker died between invocations: use a fresh one
            _discard_worker(w)
            w = holder[0] = None
            if attempt:
                raise HTTPError(502, "Runtime.WorkerUnavailable", "could not reach a worker process") from None
    sock = w.sock
    read = w.read
    while True:
        remaining = (deadline - time.monotonic_ns()) / 1e9
        try:
            if remaining <= 0:
                raise TimeoutError
            sock.settimeout(remaining)
            typ, data = read()
        except TimeoutError:
            rss, cpu = _proc_stats(w.pid)
            _discard_worker(w)
            msg = f"RequestId: {rid} Error: Task timed out after {timeout_ms / 1000:.2f} seconds"
            _agent_log(rid, tail, msg)
            return (
                200,
                _agent_error(rid, "Sandbox.Timedout", msg),
                (time.monotonic_ns() - t0) / 1e6,
                cpu,
                rss,
                b"Unhandled",
                None,
                True,
            )
        except (EOFError, OSError):
            with _lock:
                tmpl = _S.template
            if tmpl is not None:
                _ensure_template_loaded(tmpl)
            st = _wait_status(_S.worker_exits, w.pid)
            _discard_worker(w)
            msg = f"RequestId: {rid} Error: {describe_status(st)}"
            _agent_log(rid, tail, msg)
            return (
                200,
                _agent_error(rid, "Runtime.ExitError", msg),
                (time.monotonic_ns() - t0) / 1e6,
                0.0,
                0,
                b"Unhandled",
                None,
                True,
            )
        if typ == T_LOG:
            if tail is not None:
                tail += data
                if len(tail) > 4 * LOG_TAIL_BYTES:
                    del tail[:-LOG_TAIL_BYTES]
            _write_fd(1, prefix_lines(rid, data))
            continue
        if typ != T_RESULT:  # T_HELLO of a worker the template pre-forked
            continue
        _mark("a.result")
        st, dur, cpu, rss = _RES.unpack_from(data)
        out = data[_RES.size :]
        if st == ST_OK:
            return 200, out, dur, cpu, rss, None, w, False
        if st == ST_HANDLED:
            return 200, out, dur, cpu, rss, b"Handled", w, False
        if st == ST_UNHANDLED:
            return 200, out, dur, cpu, rss, b"Unhandled", w, False
        if st == ST_BAD_EVENT:
            return 400, out, dur, cpu, rss, None, w, False
        # ST_EXITING / ST_OOM: the worker exits after this frame
        _discard_worker(w)
        if st == ST_OOM:
            dur = (time.monotonic_ns() - t0) / 1e6
            msg = f"RequestId: {rid} Error: Runtime exited with error: out of memory (memoryMiB {memory})"
            out = _agent_error(rid, "Runtime.OutOfMemory", msg)
            _agent_log(rid, tail, msg)
        return 200, out, dur, cpu, rss, b"Unhandled", None, True


def _prefork_replacement():
    with _lock:
        if _S.state != "specialized" or _S.n_workers >= _S.concurrency or _S.idle or _S.shutting_down:
            return
    try:
        w = _spawn_worker()
    except HTTPError:
        return
    with _lock:
        _S.idle.append(w)
