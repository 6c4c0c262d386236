"""POST /v1/freeze and /v1/thaw (CONTRACT.md): a freeze runs the before-freeze hooks in the idle
workers and the template, which then end their TCP connections, and stops those processes and
every process below the agent (SIGSTOP: what the code started, in its own session or detached
by a double fork, which the agent adopts as the children's subreaper); a thaw starts the same
processes again (SIGCONT) and runs the after-thaw hooks."""

# contextlib.suppress would cost an import (functools, collections) in the agent:
# ruff: noqa: SIM105

import os
import struct

from .config import HOOK_TIMEOUT_S
from .errors import HTTPError
from .forksafe import _import
from .frames import T_FREEZE, T_HOOK, T_LOG, T_THAW, frame
from .json_codec import json_loads
from .output import _write_fd, prefix_lines
from .state import _S, _lock, _spec_lock
from .supervisor import _await_template_load, _discard_worker


def _freeze_thaw(freeze):
    with _spec_lock:
        with _lock:
            if freeze == _S.frozen:  # already there: idempotent
                return 200, {"state": "frozen" if freeze else _S.state}
            if freeze and _S.in_flight:
                raise HTTPError(409, "Busy", f"{_S.in_flight} invocation(s) in flight; freeze when idle")
            specialized = _S.state == "specialized"
            _S.frozen = True  # invoke and specialize refuse from here on
        if specialized and not freeze:
            _signal_code(_SIGCONT)
        # a thaw asks the processes only if the freeze found after-thaw hooks (while frozen, no
        # code runs that could register one): a thaw without them is one signal per process
        ask = specialized and (freeze or _S.thaw_hooks > 0)
        errors, closed, thaw_hooks = _hooks(T_FREEZE if freeze else T_THAW) if ask else ([], 0, 0)
        if freeze:
            _S.thaw_hooks = thaw_hooks if not errors else 0
        if specialized and freeze and not errors:
            _signal_code(_SIGSTOP)
        with _lock:
            _S.frozen = freeze and not errors
            state = "frozen" if _S.frozen else _S.state
        if errors:
            kind = "Runtime.BeforeFreezeError" if freeze else "Runtime.AfterThawError"
            msg = "; ".join("{}: {}".format(e.get("errorType"), e.get("errorMessage")) for e in errors)
            return 500, {"errorType": kind, "errorMessage": msg, "state": state}
        if freeze and specialized:
            return 200, {"state": state, "connectionsClosed": closed}
        return 200, {"state": state}


_SIGSTOP = 19
_SIGCONT = 18


def _signal_code(sig):
    """Stop (SIGSTOP) or continue (SIGCONT) the template and every worker, each with the processes
    of its group, then every other process below the agent: what the code started in a session of
    its own (`setsid`), or detached (re-parented to the agent, `_adopt_orphans`).  Invocations are
    refused meanwhile, so no worker is being forked; a process the code forks between two scans is
    found by the next (a stopped one forks nothing), and a thaw continues exactly those stopped."""
    with _lock:
        pids = [w.pid for w in _S.all_workers if w.pid is not None]
        if _S.template is not None and not _S.template.dead:
            pids.append(_S.template.pid)
    for pid in pids:
        try:
            os.killpg(pid, sig)
        except OSError:
            _kill(pid, sig)
    if sig == _SIGCONT:
        stopped, _S.stopped = _S.stopped, ()
        for pid in stopped:
            _kill(pid, sig)
        return
    stopped = set()
    for _ in range(8):
        found = [pid for pid in _below(os.getpid()) if pid not in stopped]
        if not found:
            break
        for pid in found:
            _kill(pid, sig)
        stopped.update(found)
    _S.stopped = tuple(stopped)


def _kill(pid, sig):
    try:
        os.kill(pid, sig)
    except OSError:
        pass  # gone: the reaper reports it


def _below(root):
    """The pids of every process below `root`, from each process's parent in /proc/<pid>/stat."""
    children = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/" + name + "/stat", "rb") as f:
                    stat = f.read()
            except OSError:
                continue  # gone meanwhile
            ppid = int(stat[stat.rindex(b")") + 2 :].split()[1])  # after "pid (comm) state"
            children.setdefault(ppid, []).append(int(name))
    found, todo = [], [root]
    while todo:
        for pid in children.get(todo.pop(), ()):
            found.append(pid)
            todo.append(pid)
    return found


def _adopt_orphans():
    """prctl(PR_SET_CHILD_SUBREAPER, 1) for the agent: a process the code detaches by a double fork
    is re-parented to the agent (which reaps it), not to the sandbox's init, so a freeze finds it
    below the agent.  Run after start by `lifecycle._agent_prctls`; a failure is ignored (such a
    process then escapes the freeze)."""
    try:
        ctypes = _import("ctypes")
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER = 36
    except Exception:
        pass


def _hooks(kind):
    """Run before-freeze (kind=T_FREEZE) or after-thaw hooks in idle workers and the template;
    -> (errors, the TCP connections they ended, the after-thaw hooks they hold)."""
    errors = []
    closed = thaw_hooks = 0
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
                    closed += r.get("closed", 0)
                    thaw_hooks += r.get("thawHooks", 0)
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
            closed += r.get("closed", 0)
        else:
            errors.append(
                {
                    "errorType": "Runtime.HookTimeout",
                    "errorMessage": f"{label} hooks in the template did not finish",
                }
            )
    return errors, closed, thaw_hooks
