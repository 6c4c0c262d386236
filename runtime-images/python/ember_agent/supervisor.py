"""The agent's side of its child processes: forking the standby template, handing the spec to its
blank worker, having the template load the code and fork workers, restarting a dead template.
"""

# contextlib.suppress would cost an import (functools, collections) on the start path:
# ruff: noqa: SIM105

import _signal
import _socket
import _thread
import os
import struct
import sys
import time

from .config import DEFAULT_INIT_TIMEOUT_S, WORKER_START_TIMEOUT_S
from .errors import HTTPError, describe_status
from .forksafe import _fork_lock, _renew_fork_lock
from .frames import _PIDST, T_EXIT, T_HELLO, T_HOOK, T_LOAD_ERR, T_LOAD_OK, T_SPEC, FrameReader, _send_fd, frame
from .json_codec import jbytes, json_loads
from .output import _mark, _renew_out_lock, log_agent
from .state import _OPEN_SOCKS, _S, _lock, _spec_lock
from .template import _standby_main


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


def _wait_status(table, pid, timeout=0.5):
    end = time.monotonic() + timeout
    while True:
        with _lock:
            st = table.pop(pid, None)
        if st is not None or time.monotonic() >= end:
            return st
        time.sleep(0.002)


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


def _in_child_close_agent_fds(keep):
    """In a child forked from the (multi-threaded) agent: drop every inherited socket and fd."""
    _renew_out_lock()
    _renew_fork_lock()
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
            if _S.token is not None:
                _exec_standby(b, wb, dest)
            _standby_main(b, wb, dest)
        finally:
            os._exit(70)
    b.close()
    wb.close()
    _OPEN_SOCKS.add(a)
    _OPEN_SOCKS.add(wa)
    return _Template(pid, a, _Worker(None, wa), dest)


def _exec_standby(ctl, wsock, dest):
    """Become a fresh standby by exec: a child forked once a token is bound holds a copy of the
    agent's memory (the token, the request heads in this thread's frames and in freed buffers), and
    its blank worker would run function code.  exec replaces that memory; it costs an interpreter
    start (~25 ms natively), paid only when a template is restarted or a failed load replaced."""
    for s in (ctl, wsock):
        os.set_inheritable(s.fileno(), True)
    entry = _S.entry
    os.execv(
        sys.executable,
        [sys.executable, "-S", "-E", entry, "--standby", str(ctl.fileno()), str(wsock.fileno()), dest],
    )


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
