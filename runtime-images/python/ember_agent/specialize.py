"""POST /v1/specialize: the standby's blank worker loads the code; a pod is specialized once."""

import time

from .errors import HTTPError, bad_request
from .forksafe import _fork_lock
from .json_codec import JSONError, json_loads
from .output import _mark
from .spec import _validate_spec, parse_handler
from .state import _S, _lock, _spec_lock, _thread_state
from .supervisor import _start_template


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
