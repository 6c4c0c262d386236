"""Frames between agent, template and workers: !IB (payload length, type) + payload.

FrameReader reads a stream of frames; _read_one_frame reads exactly one where a file descriptor
(SCM_RIGHTS) may follow it.
"""

import _socket
import struct

_HDR = struct.Struct("!IB")
# invoke: deadline (monotonic ns), request-id length, call-token length; then id, token, body
_INV = struct.Struct("!qHH")
_RES = struct.Struct("!BddQ")  # result: status, duration ms, cpu ms, max rss KiB; then body
_PIDST = struct.Struct("!ii")
T_HELLO, T_INVOKE, T_LOG, T_RESULT, T_FREEZE, T_THAW, T_HOOK = b"HILRZTK"
T_LOAD_OK, T_LOAD_ERR, T_EXIT, T_SPEC = b"OEXP"
ST_OK, ST_HANDLED, ST_UNHANDLED, ST_EXITING, ST_BAD_EVENT, ST_OOM = range(6)


def frame(typ, payload=b""):
    return _HDR.pack(len(payload), typ) + payload


class FrameReader:
    __slots__ = ("buf", "sock")

    def __init__(self, sock):
        self.sock = sock
        self.buf = bytearray()

    def read(self):
        """-> (type, payload bytes).  EOFError when the peer closed; TimeoutError/OSError pass."""
        buf = self.buf
        recv = self.sock.recv
        while len(buf) < 5:
            chunk = recv(262144)
            if not chunk:
                raise EOFError
            buf += chunk
        n, typ = _HDR.unpack_from(buf)
        end = 5 + n
        while len(buf) < end:
            chunk = recv(max(262144, end - len(buf)))
            if not chunk:
                raise EOFError
            buf += chunk
        payload = bytes(buf[5:end])
        del buf[:end]
        return typ, payload


def _read_one_frame(sock):
    """One frame, and not a byte more: what follows may carry a file descriptor (SCM_RIGHTS),
    which a plain recv() past the frame would drop."""
    head = _recv_exact(sock, _HDR.size)
    n, typ = _HDR.unpack(head)
    return typ, _recv_exact(sock, n)


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError
        buf += chunk
    return bytes(buf)


def _send_fd(sock, msg, fd):
    sock.sendmsg([msg], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, struct.pack("i", fd))])
