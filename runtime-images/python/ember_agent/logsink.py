"""User output in the template and workers: sys.stdout/sys.stderr become LogStreams whose lines go
to the agent as LOG frames (in a worker) or to the agent's stdout with a label (in the template).
"""

import _thread
import io  # loaded by the interpreter at startup: free

from .frames import T_LOG, frame
from .output import _write_fd, prefix_lines


class _LogSink:
    """Where user output goes: in a worker, LOG frames to the agent; in the template, the agent's
    stdout directly with a label ('init', 'freeze', 'thaw')."""

    def __init__(self):
        self.sock = None
        self.lock = _thread.allocate_lock()
        self.label = b"init"
        self.pending = ""
        self.discard = False  # the template's init output (the blank worker's is logged)

    def write(self, s):
        with self.lock:
            self.pending += s
            p = self.pending
            if "\n" in s:
                i = p.rfind("\n") + 1
                out, self.pending = p[:i], p[i:]
                self._emit(out)
            elif len(p) > 8192:
                self.pending = ""
                self._emit(p)

    def flush(self):
        with self.lock:
            if self.pending:
                p, self.pending = self.pending, ""
                self._emit(p)

    def _emit(self, text):
        if self.discard:
            return
        data = text.encode("utf-8", "replace")
        if self.sock is not None:
            self.sock.sendall(frame(T_LOG, data))
        else:
            _write_fd(1, prefix_lines(self.label.decode(), data))

    def send(self, data):
        with self.lock:
            self.sock.sendall(data)


_SINK = _LogSink()


class _LogBuffer:
    def write(self, b):
        _SINK.write(bytes(b).decode("utf-8", "replace"))
        return len(b)

    def flush(self):
        _SINK.flush()


class LogStream(io.TextIOBase):
    """sys.stdout/sys.stderr replacement in the template and workers."""

    def __init__(self, fd, name):
        super().__init__()
        self._fd = fd
        self._name = name
        self.buffer = _LogBuffer()

    encoding = "utf-8"
    errors = "replace"

    @property
    def name(self):
        return self._name

    def writable(self):
        return True

    def isatty(self):
        return False

    def fileno(self):
        return self._fd

    def write(self, s):
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        _SINK.write(s)
        return len(s)

    def flush(self):
        _SINK.flush()
