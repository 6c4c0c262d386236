"""POST /v1/freeze and /v1/thaw (CONTRACT.md): a freeze runs the before-freeze hooks in the idle
workers and the template, which then end their TCP connections, and stops those processes
(SIGSTOP); a thaw starts them again (SIGCONT) and runs the after-thaw hooks."""

# contextlib.suppress would cost an import (functools, collections) in the agent:
# ruff: noqa: SIM105

import os
import struct

from .config import HOOK_TIMEOUT_S
from .errors import HTTPError
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
    of its group (what the code forked).  Invocations are refused meanwhile, so no worker is
    being forked."""
    with _lock:
        pids = [w.pid for w in _S.all_workers if w.pid is not None]
        if _S.template is not None and not _S.template.dead:
            pids.append(_S.template.pid)
    for pid in pids:
        try:
            os.killpg(pid, sig)
        except OSError:
            try:
                os.kill(pid, sig)
            except OSError:
                pass  # gone: the reaper reports it


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
