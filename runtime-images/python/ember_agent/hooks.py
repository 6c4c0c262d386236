"""Runtime hooks in the template and workers: the `ember_runtime` module (and the SnapStart-compatible
`snapshot_restore_py`) that user code registers before-freeze / after-thaw callables with, and running them.
"""

import os
import sys

from .channel import STATE, StateError
from .errors import format_stack
from .frames import T_FREEZE
from .logsink import _SINK


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
    mod.state = STATE
    mod.StateError = StateError
    snap = type(sys)("snapshot_restore_py")
    snap.register_before_snapshot = register_before_freeze
    snap.register_after_restore = register_after_thaw
    snap.get_before_snapshot = lambda: [f for f, _, _ in mod._before_freeze]
    snap.get_after_restore = lambda: [f for f, _, _ in mod._after_thaw]
    sys.modules["ember_runtime"] = mod
    sys.modules["snapshot_restore_py"] = snap
    return mod


def _run_hooks(kind):
    """before-freeze hooks last-registered first, after-thaw hooks in registration order; then, for a
    freeze, the end of this process's TCP connections (`_end_connections`)."""
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
    if kind == T_FREEZE:  # the after-thaw hooks the thaw will run: none, and it need not ask
        return {"ok": True, "closed": _end_connections(), "thawHooks": len(mod._after_thaw)}
    return {"ok": True}


_S_IFMT = 0o170000
_S_IFSOCK = 0o140000


def _end_connections():
    """Shut down (both ways) every connected TCP socket this process holds; returns how many.

    Just before a freeze (CONTRACT.md): the peer sees the connection closed now, not a silent
    half-open socket after its idle timeout, and the code's next use of it gets EOF or a reset,
    which pooling clients recover from by reconnecting.  shutdown, not close: the descriptor
    stays the code's (no number reused under it), and a socket shared with forked processes is
    ended for all of them.  Unix sockets (the agent's channels) and listeners are left alone."""
    import _socket

    n = 0
    try:
        names = os.listdir("/proc/self/fd")
    except OSError:
        return 0
    for name in names:
        try:
            fd = int(name)
            if os.fstat(fd).st_mode & _S_IFMT != _S_IFSOCK:
                continue
            sock = _socket.socket(fileno=fd)
        except (ValueError, OSError):
            continue
        try:
            if sock.family in (_socket.AF_INET, _socket.AF_INET6) and sock.type == _socket.SOCK_STREAM:
                sock.getpeername()  # OSError: listening or not connected
                sock.shutdown(_socket.SHUT_RDWR)
                n += 1
        except OSError:
            pass
        finally:
            sock.detach()
    return n
