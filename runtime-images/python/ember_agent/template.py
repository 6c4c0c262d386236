"""The processes forked from the agent: the standby template, the blank worker and the template
(the package docstring tells their roles).  They never return into agent code.
"""

# contextlib.suppress would cost an import (functools, collections) on the start path:
# ruff: noqa: SIM105

import _signal
import _socket
import os
import struct
import sys
import time

from .errors import LoadError
from .frames import (
    _PIDST,
    T_EXIT,
    T_FREEZE,
    T_HOOK,
    T_LOAD_ERR,
    T_LOAD_OK,
    T_THAW,
    FrameReader,
    _read_one_frame,
    _recv_exact,
    frame,
)
from .hooks import _install_runtime_modules, _run_hooks
from .json_codec import jbytes, json_dumps, json_loads
from .loader import _SITE_DIRS, _load
from .logsink import _SINK, LogStream
from .output import _flush_marks, _mark, _marks
from .worker import LambdaContext, _worker_main

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
