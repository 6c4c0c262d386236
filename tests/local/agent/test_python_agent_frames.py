"""The Python agent's frames between processes, over real socketpairs (the contract suite
covers the processes end to end; these pin down a race it can only hit by chance)."""

from __future__ import annotations

import importlib
import importlib.util
import socket
import sys
from pathlib import Path

import pytest

_PKG = Path(__file__).resolve().parents[3] / "runtime-images" / "python" / "ember_agent"
if "ember_agent" not in sys.modules:
    _spec = importlib.util.spec_from_file_location(
        "ember_agent", _PKG / "__init__.py", submodule_search_locations=[str(_PKG)]
    )
    assert _spec is not None
    assert _spec.loader is not None
    sys.modules["ember_agent"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["ember_agent"])
frames = importlib.import_module("ember_agent.frames")


def test_standby_reads_its_spec_without_swallowing_the_worker_request_behind_it():
    # The agent sends the template its spec and, at once, a worker request that carries a
    # socket (SCM_RIGHTS); both are in the socket before the template reads.
    ctl, tmpl = socket.socketpair()
    worker_a, worker_b = socket.socketpair()
    with ctl, tmpl, worker_a, worker_b:
        tmpl.settimeout(5)
        ctl.sendall(frames.frame(frames.T_SPEC, b'{"spec": {}, "path": "/code"}'))
        frames._send_fd(ctl, b"F", worker_b.fileno())
        typ, payload = frames._read_one_frame(tmpl)
        assert (typ, payload) == (frames.T_SPEC, b'{"spec": {}, "path": "/code"}')
        msg, anc, _flags, _addr = tmpl.recvmsg(1, socket.CMSG_SPACE(4))
        assert msg == b"F"
        assert len(anc) == 1, "the worker's socket was dropped"
        fd = int.from_bytes(anc[0][2][:4], sys.byteorder)
        with socket.socket(fileno=fd) as passed:
            passed.sendall(b"hello")
            assert worker_a.recv(5) == b"hello"


def test_a_frame_cut_short_is_eof():
    a, b = socket.socketpair()
    with a, b:
        a.sendall(frames.frame(frames.T_SPEC, b"abc")[:6])
        a.shutdown(socket.SHUT_WR)
        with pytest.raises(EOFError):
            frames._read_one_frame(b)
