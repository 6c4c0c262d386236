"""The agent's errors and their wording: HTTPError (answered with its status), LoadError (code that
does not load), exit statuses, and Lambda-style stack traces.
"""

import os


class HTTPError(Exception):
    def __init__(self, status, error_type, message):
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


def bad_request(msg):
    return HTTPError(400, "InvalidRequest", msg)


class LoadError(Exception):
    def __init__(self, error_type, message, stack=None):
        super().__init__(message)
        self.error_type = error_type
        self.message = message
        self.stack = stack or []


_SIGNAMES = {
    6: "aborted",
    9: "killed",
    11: "segmentation fault",
    15: "terminated",
    7: "bus error",
    8: "floating point exception",
}


def describe_status(status):
    if status is None:
        return "Runtime exited with error: unknown status"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        return f"Runtime exited with error: signal: {_SIGNAMES.get(sig, f'signal {sig}')}"
    return f"Runtime exited with error: exit status {os.WEXITSTATUS(status)}"


_src_cache = {}


def format_stack(tb, skip_dirs=()):
    """Lambda-style stackTrace: one '  File "f", line n, in fn\\n    source\\n' string per frame."""
    out = []
    while tb is not None:
        co = tb.tb_frame.f_code
        fname = co.co_filename
        if not any(d in fname for d in skip_dirs):
            lineno = tb.tb_lineno
            entry = f'  File "{fname}", line {lineno}, in {co.co_name}\n'
            src = _source_line(fname, lineno)
            if src:
                entry += f"    {src}\n"
            out.append(entry)
        tb = tb.tb_next
    return out[-50:]


def _source_line(fname, lineno):
    lines = _src_cache.get(fname)
    if lines is None:
        try:
            with open(fname, encoding="utf-8", errors="replace") as f:
                lines = f.read().splitlines()
        except OSError:
            lines = []
        if len(_src_cache) < 64:
            _src_cache[fname] = lines
    if lineno and 0 < lineno <= len(lines):
        return lines[lineno - 1].strip()
    return ""
