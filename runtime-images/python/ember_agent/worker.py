"""A worker process: one invocation at a time (INVOKE in; LOG and RESULT frames out) under an
address-space limit of memoryMiB, with AWS Lambda's `context` argument (LambdaContext).
"""

# contextlib.suppress would cost an import (functools, collections) on the start path:
# ruff: noqa: SIM105

import _socket
import _thread
import os
import struct
import time

from .channel import STATE, ChannelUnreachable, _Connection, _split_url
from .errors import format_stack
from .frames import (
    _HDR,
    _INV,
    _RES,
    ST_BAD_EVENT,
    ST_EXITING,
    ST_HANDLED,
    ST_OK,
    ST_OOM,
    ST_UNHANDLED,
    T_FREEZE,
    T_HELLO,
    T_HOOK,
    T_INVOKE,
    T_RESULT,
    T_THAW,
    FrameReader,
    frame,
)
from .hooks import _run_hooks
from .json_codec import JSONError, jbytes, json_dumps, json_loads
from .logsink import _SINK
from .output import _flush_marks, _mark


class LambdaContext:
    """The `context` argument, with AWS Lambda's field names."""

    __slots__ = (
        "_call_token",
        "_deadline_ns",
        "aws_request_id",
        "client_context",
        "function_name",
        "function_version",
        "identity",
        "invoked_function_arn",
        "log_group_name",
        "log_stream_name",
        "memory_limit_in_mb",
    )

    def __init__(self, info, rid, deadline_ns, call_token=""):
        (
            self.function_name,
            self.function_version,
            self.invoked_function_arn,
            self.memory_limit_in_mb,
            self.log_group_name,
            self.log_stream_name,
        ) = info
        self.aws_request_id = rid
        self.identity = None
        self.client_context = None
        self._deadline_ns = deadline_ns
        self._call_token = call_token

    def get_remaining_time_in_millis(self):
        return max(0, (self._deadline_ns - time.monotonic_ns()) // 1_000_000)

    state = STATE  # the Function's key-value state (channel.py)

    def invoke_portion(self, name, event=None):
        """Run `event` on this function's portion `name` (spec.portions) and return its result;
        PortionError when the portion fails or the call is refused (undeclared, up in trust)."""
        event = {} if event is None else event
        return _invoke_portion(self._call_token, name, event, self.get_remaining_time_in_millis())

    def __repr__(self):
        return (
            f"LambdaContext(function_name={self.function_name!r}, function_version={self.function_version!r}, "
            f"aws_request_id={self.aws_request_id!r})"
        )


class PortionError(Exception):
    """A portion call that returned no result: the portion's error, or Ember's refusal."""

    def __init__(self, error_type, message, status=None):
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.error_message = message
        self.status = status


_PORTAL = _Connection()  # a keep-alive connection to EMBER_PORTIONS_URL, per worker


def _invoke_portion(token, name, event, remaining_ms):
    """POST `event` to the portion through Ember (runtime-images/CONTRACT.md, Portions)."""
    import urllib.parse

    base = os.environ.get("EMBER_PORTIONS_URL", "")
    if not base or not token:
        raise PortionError("PortionsUnavailable", "this function calls no portions (spec.portions)")
    if not isinstance(name, str) or not name or len(name) > 63:
        raise PortionError("InvalidPortionName", f"a portion name is a string of 1-63 characters, not {name!r}")
    try:
        body = json_dumps(event).encode()
    except (TypeError, ValueError) as e:
        raise PortionError("InvalidEvent", f"the event for portion {name!r} is not JSON: {e}") from None
    url = _split_url(base)
    path = f"{url[2]}/{urllib.parse.quote(name, safe='')}"
    headers = {"Content-Type": "application/json", "X-Ember-Call-Token": token}
    try:
        status, header, data = _PORTAL.post(url, path, body, headers, max(0.001, remaining_ms / 1000))
    except ChannelUnreachable as e:
        raise PortionError("PortionUnreachable", f"portion {name!r}: {e}") from None
    try:
        parsed = json_loads(data) if data else None
    except JSONError:
        parsed = None
    if status != 200 or header.get("x-ember-function-error"):
        if isinstance(parsed, dict):
            raise PortionError(parsed.get("errorType", "PortionError"), parsed.get("errorMessage", ""), status)
        raise PortionError("PortionError", data[:200].decode(errors="replace"), status)
    return parsed


def _error_body(e, rid, skip_dirs):
    try:
        msg = str(e)
    except Exception:
        msg = f"<unprintable {type(e).__name__}>"
    return {
        "errorMessage": msg,
        "errorType": type(e).__name__,
        "requestId": rid,
        "stackTrace": format_stack(e.__traceback__.tb_next if e.__traceback__ else None, skip_dirs),
    }


def _worker_main(fd, handler, info, memory_mib, base_vm_kib, hello=True):
    import resource

    os.setpgid(0, 0)
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM, 0, fd)
    if memory_mib and base_vm_kib:
        limit = (base_vm_kib + memory_mib * 1024) * 1024
        try:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        except (ValueError, OSError):
            pass
    _SINK.sock = sock
    _SINK.lock = _thread.allocate_lock()  # a user thread may have held it at fork time
    _SINK.pending = ""
    send = _SINK.send
    if hello:  # (the blank worker's pid came with its LOAD_OK)
        send(frame(T_HELLO, struct.pack("!i", os.getpid())))
    reader = FrameReader(sock)
    getrusage = resource.getrusage
    perf = time.perf_counter
    ptime = time.process_time
    loop = None
    asyncio_dir = os.sep + "asyncio" + os.sep
    oom_frame = frame(T_RESULT, _RES.pack(ST_OOM, 0.0, 0.0, 0))
    while True:
        try:
            typ, payload = reader.read()
        except (EOFError, OSError):
            os._exit(0)
        _mark("w.recv")
        if typ != T_INVOKE:
            if typ in (T_FREEZE, T_THAW):
                send(frame(T_HOOK, jbytes(_run_hooks(typ))))
            continue
        try:
            deadline, n, m = _INV.unpack_from(payload)
            start = _INV.size
            rid = payload[start : start + n].decode()
            call = payload[start + n : start + n + m].decode()
            body = payload[start + n + m :]
            try:
                event = json_loads(body) if body else {}
            except JSONError as e:
                send(
                    frame(
                        T_RESULT,
                        _RES.pack(ST_BAD_EVENT, 0.0, 0.0, 0)
                        + jbytes(
                            {
                                "errorType": "InvalidRequest",
                                "errorMessage": f"invoke body is not valid JSON: {e}",
                            }
                        ),
                    )
                )
                continue
            ctx = LambdaContext(info, rid, deadline, call)
            exiting = False
            t0 = perf()
            c0 = ptime()
            try:
                result = handler(event, ctx)
                if hasattr(result, "__await__"):
                    if loop is None:
                        import asyncio

                        loop = asyncio.new_event_loop()
                        asyncio.set_event_loop(loop)
                    result = loop.run_until_complete(result)
                status = ST_OK
                try:
                    out = json_dumps(result).encode()
                except (TypeError, ValueError, RecursionError) as e:
                    status = ST_UNHANDLED
                    out = jbytes(
                        {
                            "errorMessage": f"Unable to marshal response: {e}",
                            "errorType": "Runtime.MarshalError",
                            "requestId": rid,
                            "stackTrace": [],
                        }
                    )
            except MemoryError:
                result = event = None
                _SINK.pending = ""
                sock.sendall(oom_frame)
                os._exit(0)
            except SystemExit as e:
                status = ST_EXITING
                exiting = True
                out = jbytes(
                    {
                        "errorMessage": f"RequestId: {rid} Error: Runtime exited with error: "
                        f"handler called sys.exit({e.code!r})",
                        "errorType": "Runtime.ExitError",
                        "requestId": rid,
                        "stackTrace": [],
                    }
                )
            except BaseException as e:
                status = ST_HANDLED
                err = _error_body(e, rid, (asyncio_dir,))
                out = jbytes(err)
                _SINK.write(
                    "[ERROR] {}: {}\nTraceback (most recent call last):\n{}".format(
                        err["errorType"], err["errorMessage"], "".join(err["stackTrace"])
                    )
                )
                del e
            dur = (perf() - t0) * 1000.0
            cpu = (ptime() - c0) * 1000.0
            result = event = ctx = None
            _SINK.flush()
            send(_HDR.pack(_RES.size + len(out), T_RESULT) + _RES.pack(status, dur, cpu, getrusage(0).ru_maxrss) + out)
            _mark("w.sent")
            _flush_marks()
            if exiting:
                os._exit(0)
        except MemoryError:
            try:
                sock.sendall(oom_frame)
            finally:
                os._exit(0)
