"""The agent's own output: its stdout/stderr lines under one lock, and trace marks
(EMBER_AGENT_TRACE=1) of every process of the agent, for profiling the cold start.
"""

import _thread
import os
import time

_out_lock = _thread.allocate_lock()


def _write_fd(fd, data):
    with _out_lock:
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except InterruptedError:
                continue
            except OSError:
                return
            view = view[n:]


def _renew_out_lock():
    """In a child just forked from the agent: a fresh lock (another agent thread may have held it)."""
    global _out_lock
    _out_lock = _thread.allocate_lock()


def log_agent(msg):
    _write_fd(2, (f"ember-agent: {msg}\n").encode("utf-8", "replace"))


def prefix_lines(rid, data):
    """Each line of `data` as b'<rid>\\t<line>\\n' (what the agent writes to its stdout)."""
    pre = rid.encode() + b"\t"
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    return b"".join(pre + line + b"\n" for line in lines)


_TRACE = os.environ.get("EMBER_AGENT_TRACE") == "1"
_trace_path = ""
_marks = []


def _start_trace():
    """At agent start: where the marks of this agent's processes go (with EMBER_AGENT_TRACE=1)."""
    global _trace_path
    if _TRACE:
        _trace_path = os.path.join(os.environ.get("TMPDIR") or "/tmp", f"ember-agent-trace-{os.getpid()}")
        _mark("a.start")


def _mark(step):
    """With EMBER_AGENT_TRACE=1: note a step of specialize or invoke with the wall clock (one
    clock for every process of a sandbox), for profiling the cold start.  Notes stay in memory
    until _flush_marks() (any syscall on the measured path, even a write to a file, would cost
    about as much as a step); the agent copies them to stderr when it shuts down."""
    if _TRACE:
        _marks.append((step, time.time_ns()))


def _flush_marks():
    if _marks:
        data = b"".join(b"%d %s %d\n" % (os.getpid(), step.encode(), ns) for step, ns in _marks)
        _marks.clear()
        fd = os.open(_trace_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


def _dump_trace():
    if _TRACE and _trace_path:
        try:
            _flush_marks()
            with open(_trace_path, "rb") as f:
                for line in f:
                    _write_fd(2, b"ember-agent: trace " + line)
            os.unlink(_trace_path)
        except OSError:
            pass
