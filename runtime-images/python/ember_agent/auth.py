"""Who may talk to the agent: the bearer token bound by the first specialize (CONTRACT.md, Authentication).

Function code is hostile and, in local mode, shares the host's loopback with every agent.  So the
first ``POST /v1/specialize`` binds its ``Authorization: Bearer <token>`` (the activator makes a
fresh one per claimed pod) and from then on every request but a bare ``GET /healthz`` must carry
the same token, else 401, which says nothing about the code loaded.

The token lives in this process only: it is never part of the spec sent to the template and the
workers, nothing is forked from this process once a token is bound without replacing its memory
by exec (``supervisor._fork_standby``), and the process makes itself non-dumpable
(``_make_undumpable``) so that same-uid processes (the workers) cannot read its memory through
/proc/<pid>/mem or ptrace.
"""

import _thread
from _operator import _compare_digest  # hmac.compare_digest, without importing hmac on the start path

from .errors import HTTPError
from .forksafe import _import
from .state import _S, _lock

MIN_TOKEN_CHARS = 16
MAX_TOKEN_CHARS = 512
_undumpable = _thread.allocate_lock()  # held until _make_undumpable has run: binding waits for it
_undumpable.acquire()


def _unauthorized():
    return HTTPError(401, "Unauthorized", "this agent answers only the client that specialized it")


def _presented(headers):
    """The bearer token of the request (bytes), or None."""
    value = headers.get("authorization")
    if value is None or value[:7].lower() != "bearer ":
        return None
    return value[7:].strip(" ").encode("latin-1")


def _authorized(headers):
    """True when the request carries the bound token (never before one is bound)."""
    bound = _S.token
    token = _presented(headers)
    return bound is not None and token is not None and _compare_digest(token, bound)


def _authorize(headers, binding):
    """Raise 401 unless the request carries the bound token.  With `binding` (a specialize) and no
    token bound yet, the request's token is bound: the first one wins, under _lock."""
    token = _presented(headers)
    if token is None:
        raise _unauthorized()
    if _S.token is None and binding:
        if not MIN_TOKEN_CHARS <= len(token) <= MAX_TOKEN_CHARS:
            raise HTTPError(
                401,
                "Unauthorized",
                f"the bearer token must be {MIN_TOKEN_CHARS} to {MAX_TOKEN_CHARS} characters",
            )
        _undumpable.acquire()  # made non-dumpable before it holds anything worth reading
        _undumpable.release()
        with _lock:
            if _S.token is None:
                _S.token = token
    bound = _S.token
    if bound is None or not _compare_digest(token, bound):
        raise _unauthorized()


def _make_undumpable():
    """prctl(PR_SET_DUMPABLE, 0) for the agent process: only root (CAP_SYS_PTRACE) may then read
    its memory.  Runs in a thread right after start (importing ctypes costs ~ms, kept off the
    start-to-healthy path); the standby was forked before, so its workers stay dumpable as usual.
    Failure (no libc, a kernel without prctl) is ignored: the token is still never sent to code."""
    try:
        ctypes = _import("ctypes")
        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
    except Exception:
        pass
    finally:
        _undumpable.release()
