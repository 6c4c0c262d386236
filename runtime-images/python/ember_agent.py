"""Ember runtime agent for Python: the process inside every function pod.

Standard library only, and on the start path only builtin C modules (``_socket``, ``_thread``,
``_signal``, ``_json``) plus ``os``: ``socket``/``signal``/``json`` would pull in ``enum`` and ``re``
and cost ~20 ms and ~2 MiB.  Start with ``python3 -S -E agent.py`` (the entry script beside this
module; running this file directly works too but compiles it on every start).  The HTTP contract
is ``runtime-images/CONTRACT.md``.

Processes:

* agent (this file's ``main``): HTTP/1.1 server, one thread per connection; the main thread only
  waits for signals (SIGTERM: drain and exit; SIGCHLD: reap, also as PID 1).
* template: forked by the agent at start as a standby.  It forks the blank worker and waits.
  Once the blank worker has loaded the code, the template imports it too (its init output is
  dropped), answers LOAD_OK or LOAD_ERR and then only forks workers; the agent sends it the spec
  after the first invocation (or when a worker or a hook needs it first), so that the cold start
  does not share the CPU with a second import.  Whoever needs it waits for that answer (up to
  initTimeoutSeconds).  It reports the blank worker's exit also while it imports.  A failed load
  kills it: the agent stays generic and clean.
* blank worker: forked by the standby template before any code exists; it makes the code
  directory and warms up.  On specialize the agent sends it the spec directly: it puts the code in
  place (fetching/unpacking in a short-lived child), imports the module, answers the agent
  (LOAD_OK with its pid: the specialize answer) and becomes the first worker, so specialize + first
  invoke fork nothing and pass through no third process (under gVisor a fork costs ~10-25 ms and
  every hop between processes ~0.5 ms).
* workers: forked from the template (code already imported, so a new worker is ready in ~1 ms);
  each runs one invocation at a time.  The agent talks to a worker over a socketpair with
  length-prefixed frames, and kills it (timeout, exit, out of memory) and asks the template for a
  fresh one.
"""

# contextlib.suppress would cost an import (functools, collections) on the start path:
# ruff: noqa: SIM105

import _imp
import _json
import _signal
import _socket
import _thread
import os
import struct
import sys
import time

# ---------------------------------------------------------------------------------------------
# Configuration

RUNTIME = f"python{sys.version_info[0]}.{sys.version_info[1]}"
MAX_HEAD_BYTES = 64 * 1024
MAX_SPECIALIZE_BYTES = 64 * 1024 * 1024
MAX_OTHER_BODY_BYTES = 1024 * 1024
MAX_DRAIN_BYTES = 64 * 1024 * 1024  # an announced too-large body up to this size is read and dropped
LOG_TAIL_BYTES = 4096
HOOK_TIMEOUT_S = 10.0
WORKER_START_TIMEOUT_S = 10.0  # from the request to a loaded template to the new worker's HELLO
DEFAULT_TIMEOUT_S = 3.0
DEFAULT_MEMORY_MIB = 128
DEFAULT_INIT_TIMEOUT_S = 10.0


def _env_int(name, default, minimum=0, maximum=1 << 62):
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"ember-agent: {name}={raw!r} is not an integer") from None
    if not minimum <= value <= maximum:
        raise SystemExit(f"ember-agent: {name}={raw!r} must be between {minimum} and {maximum}")
    return value


# ---------------------------------------------------------------------------------------------
# Minimal JSON on top of the C accelerator (json.loads/dumps semantics, without importing `re`).


class JSONError(ValueError):
    pass


class _ScanCtx:
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float  # 'NaN', 'Infinity', '-Infinity' like json.loads


_scan = _json.make_scanner(_ScanCtx())
_WS = " \t\n\r"


def json_loads(data):
    """Parse one JSON document from str/bytes; JSONError (a ValueError) says what is wrong."""
    if not isinstance(data, str):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise JSONError(f"not UTF-8: {e}") from None
    idx = len(data) - len(data.lstrip(_WS))
    try:
        obj, end = _scan(data, idx)
    except StopIteration as e:
        if idx >= len(data):
            raise JSONError("empty document") from None
        raise JSONError(f"expecting a JSON value at char {e.value}") from None
    except RecursionError:
        raise JSONError("nesting too deep") from None
    except Exception:  # error path only: let the json module word the message
        # (on 3.11 the bare C scanner can fail with SystemError when json.decoder isn't loaded)
        json = _import("json")
        try:
            json.loads(data)
        except ValueError as e:
            raise JSONError(str(e)) from None
        except RecursionError:
            raise JSONError("nesting too deep") from None
        raise JSONError("invalid JSON") from None
    if data[end:].strip(_WS):
        raise JSONError(f"extra data after the JSON value at char {len(data) - len(data[end:].lstrip(_WS))}")
    return obj


def _json_default(o):
    dec = sys.modules.get("decimal")
    if dec is not None and isinstance(o, dec.Decimal):  # like Lambda's runtime
        return int(o) if o == o.to_integral_value() else float(o)
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


def json_dumps(obj, allow_nan=False):
    """Compact JSON text.  Raises TypeError/ValueError/RecursionError for unserializable values."""
    enc = _json.make_encoder({}, _json_default, _json.encode_basestring_ascii, None, ":", ",", False, False, allow_nan)
    return "".join(enc(obj, 0))


def jbytes(obj):
    return json_dumps(obj, allow_nan=True).encode()


# ---------------------------------------------------------------------------------------------
# HTTP/1.1 parsing helpers (pure; unit tested)


class HTTPError(Exception):
    def __init__(self, status, error_type, message):
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


def bad_request(msg):
    return HTTPError(400, "InvalidRequest", msg)


_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


def parse_head(head):
    """Parse a request head (bytes without the final CRLFCRLF) -> (method, path, version, headers).

    Header names are lower-cased str; values str (latin-1).  Raises HTTPError(400) when malformed.
    """
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0] or not parts[1]:
        raise bad_request("malformed request line {!r}".format(lines[0][:100].decode("latin-1")))
    method, target, version = parts
    if not all(c in _TOKEN for c in method):
        raise bad_request("malformed method {!r}".format(method[:20].decode("latin-1")))
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise bad_request("unsupported protocol {!r} (HTTP/1.1 or HTTP/1.0)".format(version[:20].decode("latin-1")))
    if not target.startswith(b"/"):
        raise bad_request("request target must be an absolute path")
    if any(c < 0x21 or c == 0x7F for c in target):
        raise bad_request("request target contains control characters or spaces")
    headers = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or not all(c in _TOKEN for c in name):
            raise bad_request("malformed header line {!r}".format(line[:100].decode("latin-1")))
        if any((c < 0x20 and c != 0x09) or c == 0x7F for c in value):
            raise bad_request("control character in header {!r}".format(name.decode("latin-1")))
        key = name.decode("latin-1").lower()
        val = value.strip(b" \t").decode("latin-1")
        if key in headers:
            if key in ("content-length", "transfer-encoding", "host") and headers[key] != val:
                raise bad_request(f"conflicting {key} headers")
            if key not in ("content-length", "host"):
                headers[key] = headers[key] + ", " + val
        else:
            headers[key] = val
    path = target.split(b"?", 1)[0].decode("latin-1")
    return method.decode("latin-1"), path, version.decode("latin-1"), headers


def body_length(headers, limit):
    """Return the Content-Length (int), -1 for chunked, or raise HTTPError (400/413/501)."""
    te = headers.get("transfer-encoding")
    cl = headers.get("content-length")
    if te is not None:
        if cl is not None:
            raise bad_request("both Content-Length and Transfer-Encoding")
        if te.lower() != "chunked":
            raise HTTPError(501, "InvalidRequest", f"unsupported Transfer-Encoding {te!r}")
        return -1
    if cl is None:
        return 0
    if not cl.isdigit() or len(cl) > 18:
        raise bad_request(f"invalid Content-Length {cl!r}")
    n = int(cl)
    if n > limit:
        raise HTTPError(413, "RequestTooLarge", f"request body is {n} bytes; the limit is {limit}")
    return n


def log_tail(buf, limit=LOG_TAIL_BYTES):
    """Last `limit` bytes of `buf`, not starting in the middle of a UTF-8 sequence."""
    tail = bytes(buf[-limit:])
    if len(buf) > limit:
        i = 0
        while i < 3 and i < len(tail) and 0x80 <= tail[i] < 0xC0:
            i += 1
        tail = tail[i:]
    return tail


def parse_handler(handler):
    """'pkg/mod.func' or 'pkg.mod.func' -> ('pkg.mod', 'func'); ValueError says what is wrong."""
    if not isinstance(handler, str) or not handler:
        raise ValueError("handler must be a non-empty string like 'main.handler'")
    mod, dot, attr = handler.rpartition(".")
    mod = mod.replace("/", ".")
    if not dot or not mod or not attr:
        raise ValueError(f"handler {handler!r} must be '<module>.<function>', e.g. 'main.handler'")
    for part in [*mod.split("."), attr]:
        if not part.isidentifier():
            raise ValueError(f"handler {handler!r}: {part!r} is not a valid Python identifier")
    return mod, attr


def new_request_id():
    h = os.urandom(16).hex()
    return "{}-{}-4{}-{}{}-{}".format(h[:8], h[8:12], h[13:16], "89ab"[int(h[16], 16) & 3], h[17:20], h[20:32])


def valid_request_id(rid):
    return 0 < len(rid) <= 128 and all(c.isalnum() or c in "-_.:" for c in rid) and rid.isascii()


_REASONS = {
    100: b"Continue",
    200: b"OK",
    400: b"Bad Request",
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

# ---------------------------------------------------------------------------------------------
# Frames between agent, template and workers: !IB (payload length, type) + payload.

_HDR = struct.Struct("!IB")
_INV = struct.Struct("!qH")  # invoke: deadline (monotonic ns), request-id length; then id, body
_RES = struct.Struct("!BddQ")  # result: status, duration ms, cpu ms, max rss KiB; then body
_PIDST = struct.Struct("!ii")

T_HELLO, T_INVOKE, T_LOG, T_RESULT, T_FREEZE, T_THAW, T_HOOK = b"HILRZTK"
T_LOAD_OK, T_LOAD_ERR, T_EXIT, T_SPEC = b"OEXP"
ST_OK, ST_HANDLED, ST_UNHANDLED, ST_EXITING, ST_BAD_EVENT, ST_OOM = range(6)


def frame(typ, payload=b""):
    return _HDR.pack(len(payload), typ) + payload


class FrameReader:
    __slots__ = ("buf", "sock")

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()

    def read(self):
        """-> (type, payload bytes).  EOFError when the peer closed; TimeoutError/OSError pass."""
        buf = self.buf
        recv = self.sock.recv
        while len(buf) < 5:
            chunk = recv(262144)
            if not chunk:
                raise EOFError
            buf += chunk
        n, typ = _HDR.unpack_from(buf)
        end = 5 + n
        while len(buf) < end:
            chunk = recv(max(262144, end - len(buf)))
            if not chunk:
                raise EOFError
            buf += chunk
        payload = bytes(buf[5:end])
        del buf[:end]
        return typ, payload


def _read_one_frame(sock):
    """One frame, and not a byte more: what follows may carry a file descriptor (SCM_RIGHTS),
    which a plain recv() past the frame would drop."""
    head = _recv_exact(sock, _HDR.size)
    n, typ = _HDR.unpack(head)
    return typ, _recv_exact(sock, n)


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _send_fd(sock, msg, fd):
    sock.sendmsg([msg], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack("i", fd))])


# ---------------------------------------------------------------------------------------------
# Imports in agent threads
#
# HAZARD: the template is forked from a connection thread while other agent threads run.  If one
# of them is inside an import at that moment, it holds that module's importlib lock, and the child
# (where that thread does not exist) hangs forever when it imports the same module.  So every
# import in the agent after threads start goes through _import(), and the fork holds _fork_lock.

_fork_lock = _thread.RLock()


def _import(name):
    mod = sys.modules.get(name)
    if mod is None:
        with _fork_lock:
            __import__(name)
            mod = sys.modules[name]
    return mod


# ---------------------------------------------------------------------------------------------
# Agent-side output

_out_lock = _thread.allocate_lock()


def _write_fd(fd, data):
    with _out_lock:
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except InterruptedError:
                continue
            except OSError:
                return
            view = view[n:]


def log_agent(msg):
    _write_fd(2, (f"ember-agent: {msg}\n").encode("utf-8", "replace"))


_TRACE = os.environ.get("EMBER_AGENT_TRACE") == "1"
_trace_path = ""
_marks = []


def _mark(step):
    """With EMBER_AGENT_TRACE=1: note a step of specialize or invoke with the wall clock (one
    clock for every process of a sandbox), for profiling the cold start.  Notes stay in memory
    until _flush_marks() (any syscall on the measured path, even a write to a file, would cost
    about as much as a step); the agent copies them to stderr when it shuts down."""
    if _TRACE:
        _marks.append((step, time.time_ns()))


def _flush_marks():
    if _marks:
        data = b"".join(b"%d %s %d\n" % (os.getpid(), step.encode(), ns) for step, ns in _marks)
        _marks.clear()
        fd = os.open(_trace_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


def _dump_trace():
    if _TRACE and _trace_path:
        try:
            _flush_marks()
            with open(_trace_path, "rb") as f:
                for line in f:
                    _write_fd(2, b"ember-agent: trace " + line)
            os.unlink(_trace_path)
        except OSError:
            pass


def prefix_lines(rid, data):
    """Each line of `data` as b'<rid>\\t<line>\\n' (what the agent writes to its stdout)."""
    pre = rid.encode() + b"\t"
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    return b"".join(pre + line + b"\n" for line in lines)


# ---------------------------------------------------------------------------------------------
# Agent state

_thread_state = _thread._local()  # per connection thread: a log line to write after the answer
_lock = _thread.allocate_lock()  # guards the fields of _S
_spec_lock = _thread.allocate_lock()  # one specialize/freeze/thaw at a time


class _State:
    def __init__(self):
        self.state = "generic"
        self.frozen = False
        self.code_hash = None
        self.handler = None
        self.spec = None
        self.template = None
        self.idle = []
        self.n_workers = 0
        self.all_workers = set()  # every live _Worker
        self.in_flight = 0
        self.concurrency = _env_int("EMBER_AGENT_CONCURRENCY", 1, 1)
        self.max_payload = _env_int("EMBER_AGENT_MAX_PAYLOAD_BYTES", 6 * 1024 * 1024, 0)
        self.code_base = os.environ.get("EMBER_AGENT_CODE_DIR") or ""
        self.own_code_base = not self.code_base
        self.max_code_bytes = _env_int("EMBER_AGENT_MAX_CODE_BYTES", 512 * 1024 * 1024, 1)
        self.shutdown_grace = _env_int("EMBER_AGENT_SHUTDOWN_GRACE_SECONDS", 10, 0)
        self.attempt = 0
        self.child_status = {}  # pid -> waitpid status, for the agent's own children (templates)
        self.worker_exits = {}  # pid -> waitpid status, reported by the template
        self.shutting_down = False
        self.standby = None  # _Template waiting for a spec (generic state only)


_S = None
_OPEN_SOCKS = set()  # every socket the agent holds; closed (detached) in forked children


class _Worker:
    """A worker process as the agent sees it.  `pid` is None until its HELLO frame was read (the
    first worker is forked by the template after it reported the code loaded)."""

    __slots__ = ("pid", "reader", "sock")

    def __init__(self, pid, sock):
        self.pid = pid
        self.sock = sock
        self.reader = FrameReader(sock)

    def read(self):
        """The next frame that is not HELLO (HELLO only sets `pid`)."""
        while True:
            typ, data = self.reader.read()
            if typ != T_HELLO:
                return typ, data
            self.pid = struct.unpack("!i", data)[0]

    def await_hello(self, timeout):
        """Make sure `pid` is known before the worker is given work; False if it never said hello."""
        if self.pid is not None:
            return True
        try:
            self.sock.settimeout(max(0.001, timeout))
            typ, data = self.reader.read()
        except (EOFError, OSError):
            return False
        if typ != T_HELLO:
            return False
        self.pid = struct.unpack("!i", data)[0]
        return True

    def kill(self):
        if self.pid is not None:
            for fn in (os.killpg, os.kill):
                try:
                    fn(self.pid, 9)
                except OSError:
                    pass
        self.close()  # a worker that never said hello exits on EOF

    def close(self):
        _OPEN_SOCKS.discard(self.sock)
        try:
            self.sock.close()
        except OSError:
            pass


class _Template:
    def __init__(self, pid, sock, blank, dest):
        self.pid = pid
        self.sock = sock
        self.blank = blank  # _Worker: the blank worker this (standby) template forked
        self.dest = dest  # the code directory of this attempt (the blank worker makes it)
        self.load_frame = None  # the spec, until it is sent (see _ensure_template_loaded)
        self.init_timeout = DEFAULT_INIT_TIMEOUT_S
        self.load_deadline = 0.0  # monotonic: when its import must have finished
        self.load_result = None  # {} once it reported LOAD_OK, else the error of its load
        self.load_done = _thread.allocate_lock()  # released once load_result is set
        self.load_done.acquire()
        self.send_lock = _thread.allocate_lock()
        self.hook_seq = 0  # the hook request whose reply is awaited (under _lock)
        self.reply = None
        self.reply_ready = _thread.allocate_lock()
        self.reply_ready.acquire()
        self.dead = False

    def kill(self):
        self.dead = True
        for fn in (os.killpg, os.kill):
            try:
                fn(self.pid, 9)
            except OSError:
                pass
        _OPEN_SOCKS.discard(self.sock)
        try:
            self.sock.close()
        except OSError:
            pass


def _reader_thread(tmpl):
    """Reads the template's frames: worker exit statuses and hook replies."""
    reader = FrameReader(tmpl.sock)
    while True:
        try:
            typ, payload = reader.read()
        except (EOFError, OSError):
            tmpl.dead = True
            _template_load_finished(
                tmpl, {"errorType": "Runtime.ExitError", "errorMessage": "the template process exited while loading"}
            )
            with _lock:
                if tmpl.reply_ready.locked():
                    tmpl.reply = {"errorType": "Runtime.ExitError", "errorMessage": "template process exited"}
                    tmpl.reply_ready.release()
            return
        if typ == T_LOAD_OK:
            _template_load_finished(tmpl, {})
        elif typ == T_LOAD_ERR:
            _template_load_finished(tmpl, json_loads(payload))
        elif typ == T_EXIT:
            pid, status = _PIDST.unpack(payload)
            with _lock:
                ex = _S.worker_exits
                ex[pid] = status
                while len(ex) > 256:
                    del ex[next(iter(ex))]
        elif typ == T_HOOK:  # the reply to hook request `seq`; a late one (given up on) is dropped
            (seq,) = struct.unpack_from("!I", payload)
            with _lock:
                if seq == tmpl.hook_seq and tmpl.reply_ready.locked():
                    tmpl.reply = json_loads(payload[4:])
                    tmpl.reply_ready.release()


def _template_load_finished(tmpl, result):
    """Note the outcome of the template's import ({} when it loaded), once."""
    with _lock:
        if tmpl.load_result is not None:
            return
        tmpl.load_result = result
    tmpl.load_done.release()


def _await_template_load(tmpl):
    """Have the template import the code (if it has not yet) and wait for that, up to
    initTimeoutSeconds from when it started.  -> None once it loaded, else the error dict of its
    load (it failed, the template died, or it took too long: then the template is killed)."""
    _ensure_template_loaded(tmpl)
    if tmpl.load_done.acquire(timeout=max(0.0, tmpl.load_deadline - time.monotonic())):
        tmpl.load_done.release()
    else:
        _template_load_finished(
            tmpl,
            {
                "errorType": "Runtime.InitTimeout",
                "errorMessage": f"the template's import took longer than {tmpl.init_timeout:g}s (initTimeoutSeconds)",
            },
        )
        tmpl.kill()
    return tmpl.load_result or None


def _wait_status(table, pid, timeout=0.5):
    end = time.monotonic() + timeout
    while True:
        with _lock:
            st = table.pop(pid, None)
        if st is not None or time.monotonic() >= end:
            return st
        time.sleep(0.002)


_SIGNAMES = {
    6: "aborted",
    9: "killed",
    11: "segmentation fault",
    15: "terminated",
    7: "bus error",
    8: "floating point exception",
}


def describe_status(status):
    if status is None:
        return "Runtime exited with error: unknown status"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"Runtime exited with error: signal: {_SIGNAMES.get(sig, f'signal {sig}')}"
    return f"Runtime exited with error: exit status {os.WEXITSTATUS(status)}"


# ---------------------------------------------------------------------------------------------
# Specialize


def _validate_spec(req):
    if not isinstance(req, dict):
        raise bad_request("specialize body must be a JSON object")
    fn = req.get("function") or {}
    if not isinstance(fn, dict):
        raise bad_request("'function' must be an object with namespace, name, version")
    function = {
        "namespace": str(fn.get("namespace") or "default"),
        "name": str(fn.get("name") or "function"),
        "version": str(fn.get("version") if fn.get("version") is not None else "$LATEST"),
    }
    handler = req.get("handler")
    if not isinstance(handler, str) or not handler:
        raise bad_request("'handler' must be a non-empty string like 'main.handler'")
    code = req.get("code")
    if not isinstance(code, dict):
        raise bad_request("'code' must be an object with one of 'inline', 'path', 'url'")
    kinds = [k for k in ("inline", "path", "url") if k in code]
    if len(kinds) != 1:
        raise bad_request("'code' must have exactly one of 'inline', 'path', 'url' (got %s)" % (kinds or "none"))
    kind = kinds[0]
    if not isinstance(code[kind], str) or not code[kind]:
        raise bad_request(f"'code.{kind}' must be a non-empty string")
    if kind == "inline":
        enc = code.get("encoding", "utf-8")
        if enc not in ("utf-8", "base64-zip"):
            raise bad_request("'code.encoding' must be 'utf-8' (source text) or 'base64-zip'")
        fname = code.get("filename")
        if fname is not None and (
            not isinstance(fname, str) or not fname or fname.startswith("/") or ".." in fname.split("/")
        ):
            raise bad_request("'code.filename' must be a relative path without '..'")
    if kind == "url":
        sha = code.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdefABCDEF" for c in sha):
            raise bad_request("'code.sha256' must be 64 hex digits (the sha256 of the bytes at code.url)")
    code_hash = req.get("codeHash")
    if code_hash is None:
        if kind == "url":
            code_hash = "sha256:" + code["sha256"].lower()
        elif kind == "inline":
            hashlib = _import("hashlib")
            code_hash = "sha256:" + hashlib.sha256(code["inline"].encode()).hexdigest()
        else:
            raise bad_request("'codeHash' is required with 'code.path'")
    if not isinstance(code_hash, str) or not code_hash or len(code_hash) > 200:
        raise bad_request("'codeHash' must be a non-empty string")
    env = req.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise bad_request("'env' must be an object of string values")
    for k in env:
        if not k or "=" in k or "\0" in k or "\0" in env[k]:
            raise bad_request(f"'env' has an invalid variable name {k!r}")

    def num(key, default, integer):
        v = req.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 or (integer and v != int(v)):
            raise bad_request("'{}' must be a positive {}".format(key, "integer" if integer else "number"))
        return int(v) if integer else float(v)

    return {
        "function": function,
        "handler": handler,
        "code": code,
        "codeHash": code_hash,
        "env": env,
        "memoryMiB": num("memoryMiB", DEFAULT_MEMORY_MIB, True),
        "timeoutSeconds": num("timeoutSeconds", DEFAULT_TIMEOUT_S, False),
        "concurrency": num("concurrency", None, True),
        "initTimeoutSeconds": num("initTimeoutSeconds", DEFAULT_INIT_TIMEOUT_S, False),
    }


def _specialize(body):
    try:
        with _fork_lock:  # a JSON error makes the C scanner import json.decoder
            req = json_loads(body)
    except JSONError as e:
        raise bad_request(f"specialize body is not valid JSON: {e}") from None
    spec = _validate_spec(req)
    with _spec_lock:
        with _lock:
            if _S.frozen:
                raise HTTPError(503, "Frozen", "the agent is frozen; thaw it first")
            if _S.state == "specialized":
                if _S.code_hash == spec["codeHash"] and _S.handler == spec["handler"]:
                    return 200, {"state": "specialized", "codeHash": _S.code_hash, "durationMs": 0.0}
                raise HTTPError(
                    409,
                    "AlreadySpecialized",
                    f"already specialized with codeHash {_S.code_hash} and handler {_S.handler!r}; "
                    "a pod is specialized once",
                )
        try:
            parse_handler(spec["handler"])
        except ValueError as e:
            return 422, {"errorType": "Runtime.MalformedHandlerName", "errorMessage": str(e)}
        t0 = time.perf_counter()
        _mark("a.validated")
        tmpl, w, err = _start_template(spec)
        if err is not None:
            return 422, err
        with _lock:
            _S.template = tmpl
            _S.spec = spec
            _S.code_hash = spec["codeHash"]
            _S.handler = spec["handler"]
            if spec["concurrency"]:
                _S.concurrency = spec["concurrency"]
            _S.idle.append(w)
            _S.state = "specialized"
        dur = (time.perf_counter() - t0) * 1000
        _thread_state.note = "specialized {}/{}:{} handler={} codeHash={} in {:.1f} ms".format(
            spec["function"]["namespace"],
            spec["function"]["name"],
            spec["function"]["version"],
            spec["handler"],
            spec["codeHash"],
            dur,
        )
        return 200, {"state": "specialized", "codeHash": spec["codeHash"], "durationMs": round(dur, 3)}


def _code_base():
    if not _S.code_base:
        _S.code_base = os.path.join(os.environ.get("TMPDIR") or "/tmp", f"ember-agent-{os.getpid()}")
    return _S.code_base


def _rmtree(path):
    try:
        with os.scandir(path) as it:
            entries = list(it)
    except OSError:
        return
    for e in entries:
        if e.is_dir(follow_symlinks=False):
            _rmtree(e.path)
        else:
            try:
                os.unlink(e.path)
            except OSError:
                pass
    try:
        os.rmdir(path)
    except OSError:
        pass


def _fork_standby():
    """Fork a standby template: a process that waits for a specialization.

    The agent forks one at start, before any thread exists, so the happy specialize path forks
    nothing from the multi-threaded agent (and costs no fork).  The standby forks a blank worker
    that talks to the agent over (wa, wb) and makes the code directory of the next attempt.
    After a failed specialization the used one is dead and a new one is forked (under
    _fork_lock)."""
    _S.attempt += 1
    dest = os.path.join(_code_base(), f"v{_S.attempt}")
    a, b = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
    wa, wb = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
    with _fork_lock:
        pid = os.fork()
    if pid == 0:
        try:
            _in_child_close_agent_fds(keep=(b, wb))
            a.detach()
            wa.detach()
            _standby_main(b, wb, dest)
        finally:
            os._exit(70)
    b.close()
    wb.close()
    _OPEN_SOCKS.add(a)
    _OPEN_SOCKS.add(wa)
    return _Template(pid, a, _Worker(None, wa), dest)


def _replenish_standby():
    with _spec_lock:
        with _lock:
            if _S.standby is not None or _S.state != "generic" or _S.shutting_down:
                return
        _S.standby = _fork_standby()


def _start_template(spec):
    """Hand the spec to the standby's blank worker and wait for it to load the code.

    -> (_Template, first _Worker, None) or (None, None, error).  The blank worker puts the code in
    place, imports it and answers the agent directly: it is the first worker, so specialize and
    the first invoke fork nothing and pass through no other process.  The template loads the code
    later (_ensure_template_loaded), off the cold start."""
    tmpl, _S.standby = _S.standby, None
    if tmpl is None or tmpl.dead:
        tmpl = _fork_standby()
    w, tmpl.blank = tmpl.blank, None
    dest = tmpl.dest
    sock = w.sock
    _mark("a.to_blank")
    try:
        sock.sendall(frame(T_SPEC, jbytes({"spec": spec, "dest": dest})))
    except OSError:
        pass  # a dead blank worker: reading the answer below reports it
    _mark("a.spec_sent")
    sock.settimeout(spec["initTimeoutSeconds"])
    try:
        typ, payload = w.reader.read()
    except TimeoutError:
        err = {
            "errorType": "Runtime.InitTimeout",
            "errorMessage": "loading the code took longer than {:g}s (initTimeoutSeconds)".format(
                spec["initTimeoutSeconds"]
            ),
        }
    except (EOFError, OSError):
        err = {
            "errorType": "Runtime.ExitError",
            "errorMessage": "{} while loading module for handler {!r}".format(
                describe_status(_blank_status(tmpl)), spec["handler"]
            ),
        }
    else:
        if typ == T_LOAD_OK:
            _mark("a.load_ok")
            sock.settimeout(None)
            w.pid = struct.unpack("!i", payload)[0]
            code_path = spec["code"].get("path", dest)
            slim = {k: v for k, v in spec.items() if k != "code"}
            tmpl.load_frame = frame(T_SPEC, jbytes({"spec": slim, "path": code_path}))
            tmpl.init_timeout = spec["initTimeoutSeconds"]
            with _lock:
                _S.n_workers += 1
                _S.all_workers.add(w)
            return tmpl, w, None
        err = json_loads(payload)
    tmpl.kill()  # its process group: the blank worker too, while it is loading
    w.kill()
    _rmtree(dest)
    _thread.start_new_thread(_replenish_standby, ())
    return None, None, err


def _blank_status(tmpl):
    """The wait status of a standby's blank worker that died while loading (its parent, the
    standby template, reaps it and tells), or None."""
    try:
        tmpl.sock.settimeout(2.0)
        tmpl.sock.sendall(frame(T_EXIT))
        typ, payload = FrameReader(tmpl.sock).read()
    except (EOFError, OSError):
        return None
    return _PIDST.unpack(payload)[1] if typ == T_EXIT else None


def _ensure_template_loaded(tmpl):
    """Send the template its spec once: it imports the code then (for the workers it forks later
    and for its freeze/thaw hooks).  Deferred from specialize to after the first invocation, or to
    the first moment a worker or a hook needs it, so that the cold start does not share the CPU
    with a second import.  Messages to the template keep their order: the spec goes first."""
    if tmpl.load_frame is None:
        return
    with tmpl.send_lock:
        if tmpl.load_frame is None:
            return
        tmpl.load_deadline = time.monotonic() + tmpl.init_timeout  # set before load_frame is cleared
        data, tmpl.load_frame = tmpl.load_frame, None
        try:
            tmpl.sock.sendall(data)
        except OSError:
            tmpl.dead = True
    _thread.start_new_thread(_reader_thread, (tmpl,))


def _in_child_close_agent_fds(keep):
    """In a child forked from the (multi-threaded) agent: drop every inherited socket and fd."""
    global _out_lock, _fork_lock
    _out_lock = _thread.allocate_lock()  # another agent thread may have held it at fork time
    _fork_lock = _thread.RLock()  # held by the forking thread itself
    for s in list(_OPEN_SOCKS):
        if not any(s is k for k in keep):
            try:
                s.detach()
            except OSError:
                pass
    keep_fds = {k.fileno() for k in keep}
    try:
        fds = [int(x) for x in os.listdir("/proc/self/fd")]
    except OSError:
        fds = range(3, 1024)
    for fd in fds:
        if fd > 2 and fd not in keep_fds:
            try:
                os.close(fd)
            except OSError:
                pass
    _signal.pthread_sigmask(_signal.SIG_SETMASK, [])
    import _warnings

    _warnings.filters[:] = [f for f in _warnings.filters if f != ("ignore", None, DeprecationWarning, None, 0)]
    if hasattr(_warnings, "_filters_mutated"):
        _warnings._filters_mutated()
    for sig in (_signal.SIGTERM, _signal.SIGINT, _signal.SIGCHLD, _signal.SIGPIPE):
        _signal.signal(sig, _signal.SIG_DFL)
    _signal.signal(_signal.SIGPIPE, _signal.SIG_IGN)


def _spawn_worker(allow_restart=True):
    """Ask the template for a fresh worker; restart the template once if it died."""
    for attempt in (0, 1) if allow_restart else (1,):
        with _lock:
            tmpl = _S.template
        if tmpl is None:
            raise HTTPError(503, "NotSpecialized", "the agent is not specialized")
        if tmpl.dead and attempt == 0:
            _restart_template(tmpl)
            continue
        # the template forks workers once it has imported the code (which may take up to
        # initTimeoutSeconds): wait for that first, then a worker says hello at once
        load_err = _await_template_load(tmpl)
        if load_err is not None:
            tmpl.dead = True
            if attempt == 0 and load_err.get("errorType") != "Runtime.InitTimeout":
                _restart_template(tmpl)
                continue
            raise HTTPError(
                502,
                "Runtime.WorkerUnavailable",
                "could not start a worker process: the template process could not load the code: {}: {}".format(
                    load_err.get("errorType"), load_err.get("errorMessage")
                ),
            )
        a, b = _socket.socketpair(_socket.AF_UNIX, _socket.SOCK_STREAM)
        try:
            with tmpl.send_lock:
                _send_fd(tmpl.sock, b"F", b.fileno())
            b.close()
            a.settimeout(WORKER_START_TIMEOUT_S)
            typ, payload = FrameReader(a).read()
            if typ != T_HELLO:
                raise EOFError
            a.settimeout(None)
        except (EOFError, OSError):
            a.close()
            b.close()
            tmpl.dead = True
            if attempt == 0:
                _restart_template(tmpl)
                continue
            raise HTTPError(502, "Runtime.WorkerUnavailable", "could not start a worker process") from None
        w = _Worker(struct.unpack("!i", payload)[0], a)
        _OPEN_SOCKS.add(a)
        with _lock:
            _S.n_workers += 1
            _S.all_workers.add(w)
        return w
    raise HTTPError(502, "Runtime.WorkerUnavailable", "could not start a worker process")


def _restart_template(old):
    with _spec_lock:
        with _lock:
            if _S.template is not old:
                return
            spec = _S.spec
        old.kill()
        log_agent("template process died; loading the code again")
        tmpl, w, err = _start_template(spec)
        if err is not None:
            log_agent("reloading failed: {}".format(err.get("errorMessage")))
            return
        with _lock:
            _S.template = tmpl
            _S.idle.append(w)
        _ensure_template_loaded(tmpl)


def _discard_worker(w):
    w.kill()
    with _lock:
        if w in _S.all_workers:
            _S.all_workers.discard(w)
            _S.n_workers -= 1
        if w in _S.idle:
            _S.idle.remove(w)


# ---------------------------------------------------------------------------------------------
# Invoke


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
        status, out, dur, cpu, rss, ferr, w, replace = _run(w, rid, deadline, body, tail, t0, timeout_ms, memory)
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


def _run(w, rid, deadline, body, tail, t0, timeout_ms, memory):
    """Run one invocation on a worker.

    -> (http status, body, duration ms, cpu ms, rss KiB, function error, worker to keep or None,
        whether to pre-fork a replacement)."""
    holder = [w]
    try:
        return _run1(holder, rid, deadline, body, tail, t0, timeout_ms, memory)
    except BaseException:
        if holder[0] is not None:
            _discard_worker(holder[0])
        raise


def _run1(holder, rid, deadline, body, tail, t0, timeout_ms, memory):
    w = holder[0]
    payload = _INV.pack(deadline, len(rid)) + rid.encode()
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


# ---------------------------------------------------------------------------------------------
# Freeze / thaw


def _hooks(kind):
    """Run before-freeze (kind=T_FREEZE) or after-thaw hooks in idle workers and the template."""
    errors = []
    with _lock:
        workers = list(_S.idle)
        tmpl = _S.template
    label = "freeze" if kind == T_FREEZE else "thaw"
    for w in workers:
        try:
            w.sock.settimeout(HOOK_TIMEOUT_S)
            w.sock.sendall(frame(kind))
            while True:
                typ, data = w.read()
                if typ == T_LOG:
                    _write_fd(1, prefix_lines(label, data))
                elif typ == T_HOOK:
                    r = json_loads(data)
                    if r.get("errorType"):
                        errors.append(r)
                    break
            w.sock.settimeout(None)
        except (EOFError, OSError):
            with _lock:
                if w in _S.idle:
                    _S.idle.remove(w)
            _discard_worker(w)
            errors.append(
                {
                    "errorType": "Runtime.HookTimeout",
                    "errorMessage": f"{label} hooks did not finish in {HOOK_TIMEOUT_S:g}s",
                }
            )
    # the template runs its hooks once it has imported the code (a failed load ends it: no hooks)
    if tmpl is not None and not tmpl.dead and _await_template_load(tmpl) is None:
        with _lock:
            tmpl.hook_seq += 1
            seq = tmpl.hook_seq
            tmpl.reply = None
            tmpl.reply_ready.acquire(False)  # a reply that came after its request was given up on
        try:
            with tmpl.send_lock:
                tmpl.sock.sendall(bytes([kind]) + struct.pack("!I", seq))
        except OSError:
            pass  # the template is gone: the reader thread answers
        if tmpl.reply_ready.acquire(timeout=HOOK_TIMEOUT_S):
            r = tmpl.reply or {}
            if r.get("errorType"):
                errors.append(r)
        else:
            errors.append(
                {
                    "errorType": "Runtime.HookTimeout",
                    "errorMessage": f"{label} hooks in the template did not finish",
                }
            )
    return errors


def _freeze_thaw(freeze):
    with _spec_lock:
        with _lock:
            if freeze == _S.frozen:  # already there: idempotent
                return 200, {"state": "frozen" if freeze else _S.state}
            if freeze and _S.in_flight:
                raise HTTPError(409, "Busy", f"{_S.in_flight} invocation(s) in flight; freeze when idle")
            specialized = _S.state == "specialized"
            _S.frozen = True
        errors = _hooks(T_FREEZE if freeze else T_THAW) if specialized else []
        with _lock:
            _S.frozen = freeze and not errors
            state = "frozen" if _S.frozen else _S.state
        if errors:
            kind = "Runtime.BeforeFreezeError" if freeze else "Runtime.AfterThawError"
            msg = "; ".join("{}: {}".format(e.get("errorType"), e.get("errorMessage")) for e in errors)
            return 500, {"errorType": kind, "errorMessage": msg, "state": state}
        return 200, {"state": state}


# ---------------------------------------------------------------------------------------------
# HTTP server


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


def _healthz():
    with _lock:
        return {
            "state": "frozen" if _S.frozen else _S.state,
            "runtime": RUNTIME,
            "codeHash": _S.code_hash,
            "inFlight": _S.in_flight,
            "concurrency": _S.concurrency,
        }


_ROUTES = {"/healthz": "GET", "/v1/specialize": "POST", "/v1/invoke": "POST", "/v1/freeze": "POST", "/v1/thaw": "POST"}


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
                if path == "/v1/invoke":
                    status, out, extra, replace = _invoke(headers, body)
                elif path == "/healthz":
                    status, out, extra = 200, jbytes(_healthz()), b""
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


def _reap():
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        except InterruptedError:
            continue
        if pid == 0:
            return
        with _lock:
            cs = _S.child_status
            cs[pid] = status
            while len(cs) > 256:
                del cs[next(iter(cs))]


def _shutdown():
    _S.shutting_down = True
    grace = _S.shutdown_grace
    end = time.monotonic() + grace
    while time.monotonic() < end:
        with _lock:
            if not _S.in_flight:
                break
        time.sleep(0.01)
    with _lock:
        workers = list(_S.all_workers)
        tmpls = [_S.template, _S.standby]
    for w in workers:
        w.kill()
    for tmpl in tmpls:
        if tmpl is not None:
            tmpl.kill()
    if _S.own_code_base and _S.code_base:  # a temp dir the agent made itself (not a mounted volume)
        _rmtree(_S.code_base)
    _dump_trace()
    os._exit(0)


_SITE_DIRS = []  # the interpreter's site-packages folders that exist (set by _prewarm)
_NODENAME = ""


def _prewarm():
    """In the standby template: pay first-use costs before the spec arrives.  The first compile()
    initialises the AST types (0.7 ms on 3.11, ~4 ms on 3.12); workers use resource and select.
    Under gVisor every file-system call on the specialize path costs tens to hundreds of µs, so
    what does not depend on the spec is looked up here."""
    global _NODENAME
    compile("pass", "<prewarm>", "exec")
    for name in ("resource", "select", "binascii"):
        __import__(name)
    ver = f"{sys.version_info[0]}.{sys.version_info[1]}"
    _SITE_DIRS[:] = [
        p
        for p in (
            os.path.join(sys.prefix, "lib", "python" + ver, "site-packages"),
            os.path.join(sys.prefix, "local", "lib", "python" + ver, "dist-packages"),
            f"/usr/local/lib/python{ver}/dist-packages",
            os.path.join(sys.prefix, "lib", "python3", "dist-packages"),
        )
        if os.path.isdir(p)
    ]
    _NODENAME = os.uname().nodename


def _prefault():
    """Touch the objects of this process so that copy-on-write faults happen now, while generic,
    not while loading code or invoking (under gVisor each fault is a trap into the Sentry)."""
    import gc

    for o in gc.get_objects():
        gc.get_referents(o)


def main():
    global _S, _trace_path
    _S = _State()
    if _TRACE:
        _trace_path = os.path.join(os.environ.get("TMPDIR") or "/tmp", f"ember-agent-trace-{os.getpid()}")
        _mark("a.start")
    host = os.environ.get("EMBER_AGENT_HOST") or "0.0.0.0"
    port = _env_int("EMBER_AGENT_PORT", 8080, 0, 65535)
    family = _socket.AF_INET6 if ":" in host else _socket.AF_INET
    lsock = _socket.socket(family, _socket.SOCK_STREAM)
    lsock.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
    try:
        lsock.bind((host, port))
    except OSError as e:
        raise SystemExit(f"ember-agent: cannot listen on {host}:{port}: {e}") from None
    lsock.listen(1024)
    _OPEN_SOCKS.add(lsock)
    port = lsock.getsockname()[1]
    # Signals are handled synchronously by the main thread (sigwaitinfo); block them before any
    # thread starts so every thread inherits the mask and none of them takes a signal.
    sigs = {_signal.SIGTERM, _signal.SIGINT, _signal.SIGCHLD}
    _signal.pthread_sigmask(_signal.SIG_BLOCK, sigs)
    # Python 3.12 warns about fork() in a multi-threaded process; the template is forked from a
    # connection thread on purpose (and closes everything it inherited), so silence that here.
    import _warnings

    _warnings.filters.insert(0, ("ignore", None, DeprecationWarning, None, 0))
    if hasattr(_warnings, "_filters_mutated"):
        _warnings._filters_mutated()
    _signal.signal(_signal.SIGPIPE, _signal.SIG_IGN)
    _S.standby = _fork_standby()  # before any thread starts
    _start_spare()
    _thread.start_new_thread(_accept_loop, (lsock, family))
    _write_fd(1, b"EMBER_AGENT_LISTENING port=%d\n" % port)
    while True:
        info = _signal.sigwaitinfo(sigs)
        if info.si_signo == _signal.SIGCHLD:
            _reap()
        else:
            try:
                lsock.close()
            except OSError:
                pass
            _shutdown()


# =============================================================================================
# Template and worker processes (forked; they never return into agent code)


class LoadError(Exception):
    def __init__(self, error_type, message, stack=None):
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.stack = stack or []


class _LogSink:
    """Where user output goes: in a worker, LOG frames to the agent; in the template, the agent's
    stdout directly with a label ('init', 'freeze', 'thaw')."""

    def __init__(self):
        self.sock = None
        self.lock = _thread.allocate_lock()
        self.label = b"init"
        self.pending = ""
        self.discard = False  # the template's init output (the blank worker's is logged)

    def write(self, s):
        with self.lock:
            self.pending += s
            p = self.pending
            if "\n" in s:
                i = p.rfind("\n") + 1
                out, self.pending = p[:i], p[i:]
                self._emit(out)
            elif len(p) > 8192:
                self.pending = ""
                self._emit(p)

    def flush(self):
        with self.lock:
            if self.pending:
                p, self.pending = self.pending, ""
                self._emit(p)

    def _emit(self, text):
        if self.discard:
            return
        data = text.encode("utf-8", "replace")
        if self.sock is not None:
            self.sock.sendall(frame(T_LOG, data))
        else:
            _write_fd(1, prefix_lines(self.label.decode(), data))

    def send(self, data):
        with self.lock:
            self.sock.sendall(data)


_SINK = _LogSink()


class _LogBuffer:
    def write(self, b):
        _SINK.write(bytes(b).decode("utf-8", "replace"))
        return len(b)

    def flush(self):
        _SINK.flush()


import io  # noqa: E402  (already loaded by the interpreter at startup: free)


class LogStream(io.TextIOBase):
    """sys.stdout/sys.stderr replacement in the template and workers."""

    def __init__(self, fd, name):
        super().__init__()
        self._fd = fd
        self._name = name
        self.buffer = _LogBuffer()

    encoding = "utf-8"
    errors = "replace"

    @property
    def name(self):
        return self._name

    def writable(self):
        return True

    def isatty(self):
        return False

    def fileno(self):
        return self._fd

    def write(self, s):
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        _SINK.write(s)
        return len(s)

    def flush(self):
        _SINK.flush()


class LambdaContext:
    """The `context` argument, with AWS Lambda's field names."""

    __slots__ = (
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

    def __init__(self, info, rid, deadline_ns):
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

    def get_remaining_time_in_millis(self):
        return max(0, (self._deadline_ns - time.monotonic_ns()) // 1_000_000)

    def __repr__(self):
        return (
            f"LambdaContext(function_name={self.function_name!r}, function_version={self.function_version!r}, "
            f"aws_request_id={self.aws_request_id!r})"
        )


_src_cache = {}


def format_stack(tb, skip_dirs=()):
    """Lambda-style stackTrace: one '  File "f", line n, in fn\\n    source\\n' string per frame."""
    out = []
    while tb is not None:
        co = tb.tb_frame.f_code
        fname = co.co_filename
        if not any(d in fname for d in skip_dirs):
            lineno = tb.tb_lineno
            entry = f'  File "{fname}", line {lineno}, in {co.co_name}\n'
            src = _source_line(fname, lineno)
            if src:
                entry += f"    {src}\n"
            out.append(entry)
        tb = tb.tb_next
    return out[-50:]


def _source_line(fname, lineno):
    lines = _src_cache.get(fname)
    if lines is None:
        try:
            with open(fname, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            lines = []
        if len(_src_cache) < 64:
            _src_cache[fname] = lines
    if lineno and 0 < lineno <= len(lines):
        return lines[lineno - 1].strip()
    return ""


def _install_runtime_modules():
    """`import ember_runtime` (and the SnapStart-compatible `snapshot_restore_py`) for user code."""
    mod = type(sys)("ember_runtime")
    mod.__doc__ = "Ember runtime hooks: register callables run before a freeze and after a thaw."
    mod._before_freeze = []
    mod._after_thaw = []

    def register_before_freeze(func, *args, **kwargs):
        mod._before_freeze.append((func, args, kwargs))
        return func

    def register_after_thaw(func, *args, **kwargs):
        mod._after_thaw.append((func, args, kwargs))
        return func

    mod.register_before_freeze = register_before_freeze
    mod.register_after_thaw = register_after_thaw
    snap = type(sys)("snapshot_restore_py")
    snap.register_before_snapshot = register_before_freeze
    snap.register_after_restore = register_after_thaw
    snap.get_before_snapshot = lambda: [f for f, _, _ in mod._before_freeze]
    snap.get_after_restore = lambda: [f for f, _, _ in mod._after_thaw]
    sys.modules["ember_runtime"] = mod
    sys.modules["snapshot_restore_py"] = snap
    return mod


def _run_hooks(kind):
    """before-freeze hooks last-registered first, after-thaw hooks in registration order."""
    mod = sys.modules["ember_runtime"]
    hooks = list(reversed(mod._before_freeze)) if kind == T_FREEZE else list(mod._after_thaw)
    for func, args, kwargs in hooks:
        try:
            func(*args, **kwargs)
        except BaseException as e:
            _SINK.flush()
            return {
                "errorType": type(e).__name__,
                "errorMessage": "{} hook {} raised: {}".format(
                    "before-freeze" if kind == T_FREEZE else "after-thaw", getattr(func, "__qualname__", repr(func)), e
                ),
                "stackTrace": format_stack(e.__traceback__),
            }
    _SINK.flush()
    return {"ok": True}


def _run_in_child(fn, *args):
    """Run fn(*args) in a forked child (keeps zipfile/urllib/hashlib out of the template's memory);
    a LoadError in the child is re-raised here."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            fn(*args)
        except LoadError as e:
            os.write(w, jbytes({"errorType": e.error_type, "errorMessage": e.message}))
            code = 1
        except BaseException as e:
            os.write(w, jbytes({"errorType": "Runtime.CodeError", "errorMessage": f"{type(e).__name__}: {e}"}))
            code = 1
        os._exit(code)
    os.close(w)
    chunks = []
    while True:
        c = os.read(r, 65536)
        if not c:
            break
        chunks.append(c)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        err = (
            json_loads(b"".join(chunks))
            if chunks
            else {"errorType": "Runtime.CodeError", "errorMessage": f"code loader {describe_status(status)}"}
        )
        raise LoadError(err["errorType"], err["errorMessage"])


def unzip(data_or_path, dest, max_bytes):
    """Unpack a zip archive (bytes or a file path) into dest; LoadError names what is wrong."""
    import zipfile

    src = data_or_path
    if isinstance(src, bytes):
        src = io.BytesIO(src)
    try:
        with zipfile.ZipFile(src) as zf:
            infos = zf.infolist()
            total = sum(i.file_size for i in infos)
            if total > max_bytes:
                raise LoadError("InvalidArchive", f"code archive unpacks to {total} bytes; the limit is {max_bytes}")
            for info in infos:
                name = info.filename
                if name.startswith("/") or ".." in name.replace("\\", "/").split("/"):
                    raise LoadError("InvalidArchive", f"code archive has an unsafe path {name!r}")
            zf.extractall(dest)
    except LoadError:
        raise
    except zipfile.BadZipFile as e:
        raise LoadError("InvalidArchive", f"code archive is not a valid zip file: {e}") from None
    except Exception as e:  # zlib.error, EOFError, OSError, NotImplementedError (method), ...
        raise LoadError("InvalidArchive", f"code archive is corrupt: {type(e).__name__}: {e}") from None


def _fetch(url, sha256, dest, module_file, max_bytes):
    import hashlib
    import urllib.request

    tmp = os.path.join(dest, ".ember-download")
    h = hashlib.sha256()
    size = 0
    try:
        with urllib.request.urlopen(url, timeout=30) as resp, open(tmp, "wb") as f:
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise LoadError("CodeFetchFailed", f"code at {url} is larger than {max_bytes} bytes")
                h.update(chunk)
                f.write(chunk)
    except LoadError:
        raise
    except Exception as e:
        raise LoadError("CodeFetchFailed", f"fetching code from {url} failed: {e}") from None
    got = h.hexdigest()
    if got != sha256.lower():
        os.unlink(tmp)
        raise LoadError("ChecksumMismatch", f"sha256 mismatch for {url}: expected {sha256.lower()}, got {got}")
    with open(tmp, "rb") as f:
        magic = f.read(4)
    if magic in (b"PK\x03\x04", b"PK\x05\x06"):
        unzip(tmp, dest, max_bytes)
        os.unlink(tmp)
    else:
        os.replace(tmp, os.path.join(dest, module_file))


def _materialize(code, modname, dest):
    """Put the code in place -> the directory to import from."""
    max_bytes = _S.max_code_bytes
    module_file = modname.replace(".", "/") + ".py"
    if "path" in code:
        path = code["path"]
        if not os.path.isdir(path):
            raise LoadError("Runtime.CodeNotFound", f"code.path {path!r} is not a directory")
        return path
    if "url" in code:
        _run_in_child(_fetch, code["url"], code["sha256"], dest, module_file, max_bytes)
        return dest
    if code.get("encoding") == "base64-zip":
        import binascii

        try:
            data = binascii.a2b_base64(code["inline"].encode("ascii"), strict_mode=True)
        except (binascii.Error, UnicodeEncodeError, TypeError) as e:
            raise LoadError("InvalidArchive", f"code.inline is not valid base64: {e}") from None
        _run_in_child(unzip, data, dest, max_bytes)
        return dest
    fname = code.get("filename") or module_file
    path = os.path.join(dest, fname)
    if "/" in fname:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    data = code["inline"].encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    return dest


def _written_module(code, modname, dest):
    """(path, bytes) of the handler's module when it is the one inline source file just written
    into the empty code directory `dest`, a top-level module that `import` would find there
    (nothing builtin, frozen or already imported by that name); else None."""
    if "inline" not in code or code.get("encoding") == "base64-zip" or "." in modname:
        return None
    fname = code.get("filename") or modname + ".py"
    if fname != modname + ".py" or modname in sys.modules or modname in sys.builtin_module_names:
        return None
    if _imp.is_frozen(modname):
        return None
    return os.path.join(dest, fname), code["inline"].encode("utf-8")


def _import_written(name, path, source):
    """`import name` of the source file just written at `path` (whose bytes are `source`), as the
    path finder and SourceFileLoader would do it: the same spec, loader, module attributes,
    module lock, sys.modules handling, compile of the bytes (so a coding cookie applies), minus
    their file-system calls (listing the directory, stat, looking for a .pyc, reading the file
    back): ~2 ms under gVisor."""
    boot = sys.modules["_frozen_importlib"]
    spec = sys.modules["_frozen_importlib_external"].spec_from_file_location(name, path)
    with boot._ModuleLockManager(name):
        mod = boot.module_from_spec(spec)
        spec._initializing = True
        sys.modules[name] = mod
        try:
            exec(compile(source, path, "exec", dont_inherit=True), mod.__dict__)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        finally:
            spec._initializing = False
    return sys.modules[name]


def _without_loader(tb):
    """A load error's traceback without _import_written's frame (import hides its own frames)."""
    if tb is not None and tb.tb_next is not None and tb.tb_next.tb_frame.f_code is _import_written.__code__:
        tb.tb_next = tb.tb_next.tb_next
    return tb


def _listing(path):
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return "(unreadable)"
    names = [n for n in names if not n.startswith(".")]
    return ", ".join(names[:20]) + (", ..." if len(names) > 20 else "") if names else "(empty)"


def _load(spec, dest, code_path=None):
    """Import the user module and resolve the handler.  -> handler callable.

    The blank worker passes `dest` (the code is put in place there); the template passes the
    `code_path` the blank worker loaded from."""
    handler = spec["handler"]
    modname, attr = parse_handler(handler)
    written = None
    if code_path is None:
        code_path = _materialize(spec["code"], modname, dest)
        written = _written_module(spec["code"], modname, dest)
        _mark("x.written")
    _mark("x.ready")
    os.environ.update(spec["env"])
    try:
        os.chdir(code_path)
    except OSError:
        pass
    _mark("x.chdir")
    agent_dir = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [code_path] + [p for p in sys.path if p and os.path.abspath(p) != agent_dir] + _SITE_DIRS
    sys.argv = [os.path.join(code_path, modname.replace(".", "/") + ".py")]
    _mark("x.paths")
    try:
        if written is not None:
            mod = _import_written(modname, *written)
        else:
            __import__(modname)
            mod = sys.modules[modname]
        _mark("x.imported")
    except SyntaxError as e:
        where = (
            os.path.relpath(e.filename, code_path) if e.filename and e.filename.startswith(code_path) else e.filename
        )
        raise LoadError(
            "Runtime.UserCodeSyntaxError",
            f"Syntax error in module '{modname}': {e.msg} ({where}, line {e.lineno})",
        ) from None
    except ImportError as e:
        msg = f"Unable to import module '{modname}': {e}"
        if getattr(e, "name", None) == modname.split(".")[0] or e.name == modname:
            msg += f" (files in the code directory: {_listing(code_path)})"
        raise LoadError("Runtime.ImportModuleError", msg, format_stack(_without_loader(e.__traceback__))) from None
    except SystemExit as e:
        raise LoadError(
            "Runtime.ExitError", f"module '{modname}' called sys.exit({e.code!r}) while being imported"
        ) from None
    except BaseException as e:
        raise LoadError(
            "Runtime.InitError",
            f"module '{modname}' raised {type(e).__name__} while being imported: {e}",
            format_stack(_without_loader(e.__traceback__)),
        ) from None
    try:
        fn = getattr(mod, attr)
    except AttributeError:
        raise LoadError(
            "Runtime.HandlerNotFound",
            f"handler '{handler}' not found: module '{modname}' has no attribute '{attr}'",
        ) from None
    if not callable(fn):
        raise LoadError(
            "Runtime.HandlerNotFound",
            f"handler '{handler}' is not callable: '{attr}' is a {type(fn).__name__}",
        )
    target = getattr(fn, "__wrapped__", fn)
    code = getattr(target, "__code__", None) or getattr(type(target).__dict__.get("__call__"), "__code__", None)
    if code is not None and code.co_flags & 0x80:  # CO_COROUTINE: warm asyncio up for every worker
        import asyncio  # noqa: F401
    return fn


def _kill_quietly(pid):
    try:
        os.kill(pid, 9)
    except OSError:
        pass


def _vm_size_kib(statm=-1):
    """The address space of this process (VmSize); from `statm`, an open /proc/self/statm of this
    process, in one read."""
    try:
        if statm >= 0:
            return int(os.pread(statm, 64, 0).split()[0]) * (os.sysconf("SC_PAGE_SIZE") // 1024)
        with open("/proc/self/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmSize:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _standby_main(ctl, wsock, dest):
    """Standby template: warm up, fork the blank worker (on `wsock`, the agent's first worker),
    then wait for the agent: the spec to load once the blank worker has loaded it, or a request
    for the blank worker's exit status (it died while loading).

    The standby leads its own process group at once, so killing the template's group also kills
    the blank worker while that is still loading (it leaves the group when it starts serving)."""
    os.setpgid(0, 0)
    _marks.clear()  # the agent's
    _mark("t.start")
    _prewarm()
    blank_pid = os.fork()
    if blank_pid == 0:
        try:
            ctl.close()
            _blank_main(wsock, dest)
        finally:
            os._exit(70)
    wsock.close()
    _prefault()
    try:
        typ, payload = _read_one_frame(ctl)
    except (EOFError, OSError):
        os._exit(0)  # the agent is gone: nothing to do (the blank worker exits on EOF)
    if typ == T_EXIT:
        _, status = os.waitpid(blank_pid, 0)
        ctl.sendall(frame(T_EXIT, _PIDST.pack(blank_pid, status)))
        os._exit(0)
    _mark("t.spec")
    req = json_loads(payload)
    _template_main(ctl, blank_pid, req["spec"], req["path"])


def _blank_main(chan, dest):
    """Blank worker: make the code directory, warm up, wait for the spec from the agent, put the
    code in place, import it, answer LOAD_OK (with its pid) or LOAD_ERR, and serve as a worker."""
    _marks.clear()  # the template's
    _mark("b.start")
    pid = os.getpid()
    try:
        os.makedirs(os.path.dirname(dest), mode=0o700, exist_ok=True)
        os.makedirs(dest, exist_ok=True)
        dest_error = None
    except OSError as e:
        dest_error = e
    _prefault()
    sys.stdout = LogStream(1, "<stdout>")
    sys.stderr = LogStream(2, "<stderr>")
    _install_runtime_modules()
    # warm the invoke path up (first calls touch pages the template shares: faults, costly in gVisor)
    json_dumps(json_loads(b'{"a":[1]}'))
    LambdaContext(("f", "1", "arn", "128", "g", "s"), "warm-up", 0).get_remaining_time_in_millis()
    try:
        statm = os.open("/proc/self/statm", os.O_RDONLY)
    except OSError:
        statm = -1
    try:
        _typ, payload = FrameReader(chan).read()
    except (EOFError, OSError):
        os._exit(0)
    _mark("b.spec")
    req = json_loads(payload)
    spec = req["spec"]
    sys.dont_write_bytecode = True
    try:
        if dest_error is not None and "path" not in spec["code"]:
            raise LoadError("Runtime.CodeDirError", f"cannot create the code directory: {dest_error}")
        handler = _load(spec, dest)
    except LoadError as e:
        _SINK.flush()
        chan.sendall(
            frame(T_LOAD_ERR, jbytes({"errorType": e.error_type, "errorMessage": e.message, "stackTrace": e.stack}))
        )
        os._exit(0)
    except BaseException as e:
        _SINK.flush()
        chan.sendall(
            frame(T_LOAD_ERR, jbytes({"errorType": "Runtime.InitError", "errorMessage": f"{type(e).__name__}: {e}"}))
        )
        os._exit(0)
    _SINK.flush()
    info = _fn_info(spec)
    base_vm = _vm_size_kib(statm)
    if statm >= 0:
        os.close(statm)
    _mark("b.info")
    try:
        chan.sendall(frame(T_LOAD_OK, struct.pack("!i", pid)))
        _mark("b.sent")
        _worker_main(chan.detach(), handler, info, spec["memoryMiB"], base_vm, hello=False)
    except OSError:  # the agent is gone
        os._exit(0)


def _fn_info(spec):
    """The LambdaContext fields of this function (see LambdaContext.__init__)."""
    fn = spec["function"]
    return (
        fn["name"],
        fn["version"],
        "arn:ember:lambda:{}:{}:function:{}:{}".format("local", fn["namespace"], fn["name"], fn["version"]),
        str(spec["memoryMiB"]),
        "/ember/{}/{}".format(fn["namespace"], fn["name"]),
        "{}/[{}]{}".format(time.strftime("%Y/%m/%d", time.gmtime()), fn["version"], _NODENAME or os.uname().nodename),
    )


def _template_main(ctl, blank_pid, spec, code_path):
    """The template, once the blank worker serves: import the code again (its output is dropped:
    the blank worker's was logged), answer LOAD_OK or LOAD_ERR, then fork workers on request, run
    hooks and report worker exits.  A failed import here ends the template; the agent loads the
    code in a new one when it needs a worker.

    The blank worker (the first worker) is this process's child: its exit is reported at once,
    also while the import runs (which may take up to initTimeoutSeconds)."""
    blank = [blank_pid]

    def reap_blank(*_args):  # only that pid: the import may wait for children of its own
        if blank[0]:
            try:
                pid, status = os.waitpid(blank[0], os.WNOHANG)
            except ChildProcessError:
                pid, status = blank[0], None
            if pid:
                blank[0] = 0
                if status is not None:
                    try:
                        ctl.sendall(frame(T_EXIT, _PIDST.pack(pid, status)))
                    except OSError:
                        pass

    _signal.signal(_signal.SIGCHLD, reap_blank)
    reap_blank()  # it may have exited already
    sys.dont_write_bytecode = True  # one compile per pod; skip writing __pycache__
    sys.stdout = LogStream(1, "<stdout>")
    sys.stderr = LogStream(2, "<stderr>")
    _install_runtime_modules()
    _SINK.discard = True
    try:
        handler = _load(spec, None, code_path)
    except BaseException as e:
        _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
        err = (
            {"errorType": e.error_type, "errorMessage": e.message}
            if isinstance(e, LoadError)
            else {"errorType": "Runtime.InitError", "errorMessage": f"{type(e).__name__}: {e}"}
        )
        try:
            ctl.sendall(frame(T_LOAD_ERR, jbytes(err)))
        except OSError:
            pass
        os._exit(1)
    _SINK.flush()
    _SINK.discard = False  # freeze/thaw hook output is logged
    _flush_marks()
    import resource  # noqa: F401  (workers use it for measurements and the memory limit)

    info = _fn_info(spec)
    base_vm = _vm_size_kib()
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    _signal.set_wakeup_fd(wake_w)
    _signal.signal(_signal.SIGCHLD, lambda *a: None)
    os.write(wake_w, b"\0")  # reap what exited before this handler existed
    workers = {blank[0]} if blank[0] else set()
    ctl.sendall(frame(T_LOAD_OK))

    def fork_worker(fd):
        pid = os.fork()
        if pid == 0:
            try:
                _marks.clear()  # the template's
                _signal.set_wakeup_fd(-1)
                _signal.signal(_signal.SIGCHLD, _signal.SIG_DFL)
                os.close(wake_r)
                os.close(wake_w)
                ctl.close()
                _worker_main(fd, handler, info, spec["memoryMiB"], base_vm)
            finally:
                os._exit(70)
        workers.add(pid)
        os.close(fd)
        return pid

    # Serve: fork workers on request, run hooks, report exits of workers.
    import select

    while True:
        try:
            ready, _, _ = select.select([ctl, wake_r], [], [])
        except InterruptedError:
            continue
        if wake_r in ready:
            try:
                os.read(wake_r, 512)
            except OSError:
                pass
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                workers.discard(pid)
                try:
                    ctl.sendall(frame(T_EXIT, _PIDST.pack(pid, status)))
                except OSError:
                    pass
        if ctl in ready:
            try:
                msg, anc, _flags, _addr = ctl.recvmsg(1, _socket.CMSG_SPACE(4))
            except InterruptedError:
                continue
            except OSError:
                msg = b""
            if not msg:  # the agent is gone
                for pid in workers:
                    try:
                        os.killpg(pid, 9)
                    except OSError:
                        pass
                os._exit(0)
            if msg == b"F":
                fds = [
                    struct.unpack("i", data[:4])[0]
                    for level, typ, data in anc
                    if level == _socket.SOL_SOCKET and typ == _socket.SCM_RIGHTS
                ]
                if fds:
                    fork_worker(fds[0])
            elif msg in (bytes([T_FREEZE]), bytes([T_THAW])):
                try:
                    seq = _recv_exact(ctl, 4)  # the request's number: the reply carries it
                except (EOFError, OSError):
                    continue  # the agent is gone: the next read says so
                _SINK.label = b"freeze" if msg[0] == T_FREEZE else b"thaw"
                res = _run_hooks(msg[0])
                ctl.sendall(frame(T_HOOK, seq + jbytes(res)))


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
            deadline, n = _INV.unpack_from(payload)
            rid = payload[10 : 10 + n].decode()
            body = payload[10 + n :]
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
            ctx = LambdaContext(info, rid, deadline)
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


if __name__ == "__main__":
    main()
