"""The services relay (EMBER_AGENT_SERVICES_SOCKET): a TCP listener on the sandbox's loopback whose
every connection is copied byte for byte, both ways, to a new connection to the host's services
proxy socket, so function code reaches its auxiliary services with any HTTP client at the
``EMBER_SERVICE_<NAME>_URL`` the host announces.  The relay holds no credential and reads nothing
it copies: the proxy authenticates each request by the token in its path.  It runs in the agent
process only (its sockets are not inheritable, and workers come from the exec'd standby).
"""

# contextlib.suppress would cost an import (functools, collections) on the start path:
# ruff: noqa: SIM105

import _socket
import _thread
import os
import stat  # imported by os already: free on the start path
import time

from .config import MAX_SOCKET_PATH_BYTES
from .output import log_agent
from .state import _lock

MAX_RELAYS = 256  # connections relayed at once; one more is closed at once (the proxy bounds requests)
_RELAY_CHUNK = 65536
_relays = [0]  # connections being relayed (guarded by _lock)


def _services_socket():
    """-> the path of EMBER_AGENT_SERVICES_SOCKET ('' if unset); a value that is not an absolute
    path of an existing Unix socket no longer than a socket path may be ends the agent at start."""
    path = os.environ.get("EMBER_AGENT_SERVICES_SOCKET") or ""
    if not path:
        return ""
    what = f"ember-agent: EMBER_AGENT_SERVICES_SOCKET={path!r}"
    if not os.path.isabs(path):
        raise SystemExit(f"{what} must be an absolute path")
    if len(os.fsencode(path)) > MAX_SOCKET_PATH_BYTES:
        raise SystemExit(f"{what} is longer than {MAX_SOCKET_PATH_BYTES} bytes, the limit of a Unix socket path")
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise SystemExit(f"{what}: {e.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise SystemExit(f"{what} is not a Unix socket")
    return path


def _start_relay(path):
    """Listen on 127.0.0.1 (a port the kernel picks) and relay each connection to `path`
    (a thread per connection); -> the port."""
    lsock = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)
    try:
        lsock.bind(("127.0.0.1", 0))
    except OSError as e:
        raise SystemExit(f"ember-agent: cannot listen for the services relay on 127.0.0.1: {e}") from None
    lsock.listen(128)
    _thread.start_new_thread(_relay_accept_loop, (lsock, path))
    return lsock.getsockname()[1]


def _relay_accept_loop(lsock, path):
    while True:
        try:
            fd, _addr = lsock._accept()
        except OSError:  # out of descriptors, for one: let some close
            time.sleep(0.01)
            continue
        client = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM, 0, fd)
        try:
            client.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        except OSError:
            pass
        with _lock:
            full = _relays[0] >= MAX_RELAYS
            if not full:
                _relays[0] += 1
        if full:
            client.close()
            continue
        try:
            _thread.start_new_thread(_relay_one, (client, path))
        except RuntimeError:  # no thread to spare
            with _lock:
                _relays[0] -= 1
            client.close()


def _relay_one(client, path):
    upstream = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        try:
            upstream.connect(path)
        except OSError as e:
            log_agent(f"services relay: cannot reach the services proxy: {e.strerror}")
            return
        done = _thread.allocate_lock()
        done.acquire()
        _thread.start_new_thread(_copy, (upstream, client, done))
        _copy(client, upstream, None)
        done.acquire()  # the other direction ended too: both sockets can close
    finally:
        upstream.close()
        client.close()
        with _lock:
            _relays[0] -= 1


def _copy(src, dst, done):
    """Copy src to dst until src ends, then end dst's sending side (a half-close, as TCP peers mean
    it); an error on either side ends both directions."""
    try:
        while True:
            chunk = src.recv(_RELAY_CHUNK)
            if not chunk:
                break
            dst.sendall(chunk)
        dst.shutdown(_socket.SHUT_WR)
    except OSError:
        for s in (src, dst):
            try:
                s.shutdown(_socket.SHUT_RDWR)
            except OSError:
                pass
    finally:
        if done is not None:
            done.release()
