"""The agent process from start to exit: listen (TCP, or a Unix socket if EMBER_AGENT_SOCKET is set),
fork the standby, start the services relay (EMBER_AGENT_SERVICES_SOCKET), serve; the main thread
then only waits for signals (SIGCHLD: reap, also as PID 1; SIGTERM/SIGINT: drain and exit).
"""

# contextlib.suppress would cost an import (functools, collections) on the start path:
# ruff: noqa: SIM105

import _signal
import _socket
import _thread
import os
import stat  # imported by os already: free on the start path
import sys
import time

from .auth import _make_undumpable
from .config import MAX_SOCKET_PATH_BYTES, _env_int
from .freeze import _adopt_orphans
from .output import _dump_trace, _start_trace, _write_fd
from .relay import _services_socket, _start_relay
from .server import _accept_loop, _start_spare
from .state import _OPEN_SOCKS, _S, _lock
from .supervisor import _fork_standby, _rmtree
from .template import _standby_main


def _limit_tasks():
    """EMBER_AGENT_PIDS_LIMIT: RLIMIT_NPROC, soft and hard, before the agent makes any process or thread.

    It bounds the tasks (processes and threads) of the agent's uid, the agent's own included, which
    is a pod's pids limit where the uid's tasks are counted per sandbox (gVisor's kernel, a Kata VM):
    a fork or thread past it fails with EAGAIN in the code, and the code cannot raise it back.
    """
    limit = _env_int("EMBER_AGENT_PIDS_LIMIT", 0, 8)
    if limit:
        import resource

        hard = resource.getrlimit(resource.RLIMIT_NPROC)[1]
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)  # a tighter bound from outside stays
        resource.setrlimit(resource.RLIMIT_NPROC, (limit, limit))


def main():
    _S.configure()
    if sys.argv[1:2] == ["--standby"]:  # a standby exec'd by _fork_standby: none of the agent's memory
        _exec_standby_main(sys.argv[2:])
    _S.entry = os.path.abspath(sys.argv[0])
    _limit_tasks()
    _start_trace()
    services = _services_socket()
    sock_path = os.environ.get("EMBER_AGENT_SOCKET") or ""
    listen_fd = os.environ.get("EMBER_AGENT_LISTEN_FD") or ""
    if listen_fd:
        sock_path = ""  # the host made the socket file; it is not the agent's to remove
        lsock, family, listening = _adopt_listening_fd(listen_fd)
    else:
        lsock, family, listening = _listen_unix(sock_path) if sock_path else _listen_tcp()
    _OPEN_SOCKS.add(lsock)
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
    _thread.start_new_thread(_agent_prctls, ())  # the agent only: the standby stays as it was
    if services:  # after the standby: its relay is the agent's alone
        listening += b" services=%d" % _start_relay(services)
    _start_spare()
    _thread.start_new_thread(_accept_loop, (lsock, family))
    _write_fd(1, b"EMBER_AGENT_LISTENING %s\n" % listening)
    while True:
        info = _signal.sigwaitinfo(sigs)
        if info.si_signo == _signal.SIGCHLD:
            _reap()
        else:
            try:
                lsock.close()
            except OSError:
                pass
            if sock_path:  # as Node's server.close() does: the next agent at this path finds no file
                try:
                    os.unlink(sock_path)
                except OSError:
                    pass
            _shutdown()


def _adopt_listening_fd(raw):
    """-> (listening socket, AF_UNIX, b"fd=<n>") from EMBER_AGENT_LISTEN_FD: a Unix stream socket
    the host made, bound and listening, and handed down (its file is not in the agent's sandbox)."""
    what = f"ember-agent: EMBER_AGENT_LISTEN_FD={raw!r}"
    if not raw.isdigit() or int(raw) < 3:
        raise SystemExit(f"{what} must be a file descriptor number of 3 or more")
    fd = int(raw)
    try:
        lsock = _socket.socket(fileno=fd)
    except OSError as e:
        raise SystemExit(f"{what} is not an open socket: {e}") from None
    listening = lsock.getsockopt(_socket.SOL_SOCKET, _socket.SO_ACCEPTCONN)
    if lsock.family != _socket.AF_UNIX or lsock.type != _socket.SOCK_STREAM or not listening:
        lsock.detach()
        raise SystemExit(f"{what} is not a listening Unix stream socket")
    os.set_inheritable(fd, False)
    return lsock, _socket.AF_UNIX, b"fd=%d" % fd


def _listen_tcp():
    """-> (listening socket, family, b"port=<n>") on EMBER_AGENT_HOST:EMBER_AGENT_PORT."""
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
    return lsock, family, b"port=%d" % lsock.getsockname()[1]


def _listen_unix(path):
    """-> (listening socket, AF_UNIX, b"socket=<path>") on EMBER_AGENT_SOCKET.  A socket file left
    at the path (an agent that was killed) is removed first; any other file is refused, not replaced.
    The file keeps the default mode: the host process that connects may run as another uid."""
    if not os.path.isabs(path):
        raise SystemExit(f"ember-agent: EMBER_AGENT_SOCKET={path!r} must be an absolute path")
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise SystemExit(
            f"ember-agent: EMBER_AGENT_SOCKET={path!r} is longer than {MAX_SOCKET_PATH_BYTES} bytes,"
            " the limit of a Unix socket path"
        )
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        pass
    except OSError as e:
        raise SystemExit(f"ember-agent: EMBER_AGENT_SOCKET={path!r}: {e}") from None
    else:
        if not stat.S_ISSOCK(mode):
            raise SystemExit(f"ember-agent: EMBER_AGENT_SOCKET={path!r} exists and is not a socket; not replacing it")
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise SystemExit(f"ember-agent: EMBER_AGENT_SOCKET={path!r}: cannot remove the old socket: {e}") from None
    lsock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        lsock.bind(path)
    except OSError as e:
        raise SystemExit(f"ember-agent: cannot listen on EMBER_AGENT_SOCKET={path!r}: {e}") from None
    lsock.listen(1024)
    return lsock, _socket.AF_UNIX, b"socket=" + os.fsencode(path)


def _exec_standby_main(args):
    ctl_fd, wsock_fd, dest = args
    ctl = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM, 0, int(ctl_fd))
    wsock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM, 0, int(wsock_fd))
    try:
        _standby_main(ctl, wsock, dest)
    finally:
        os._exit(70)


def _agent_prctls():
    """The agent's prctl settings, off the start path (importing ctypes costs ~ms), in one thread:
    a second thread importing ctypes meanwhile could find it half-initialized in sys.modules."""
    _make_undumpable()
    _adopt_orphans()


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
