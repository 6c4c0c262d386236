"""POST /v1/freeze and /v1/thaw: run the before-freeze / after-thaw hooks in idle workers and the template."""

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
