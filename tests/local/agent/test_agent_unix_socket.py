"""CONTRACT.md `EMBER_AGENT_SOCKET`, against both agents as real processes: with it set the agent
listens on a Unix stream socket at that path instead of TCP and serves the same HTTP contract
there (health, bearer-token auth, specialize, invoke); a socket file left at the path is replaced,
and a relative path, one too long for a Unix socket or a path holding any other file ends the agent
at start with a message naming the setting.  The contract itself over TCP is test_agent_contract.py's.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import socket
import stat
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import Agent, agent_command, spec

UMASK = 0o002  # the agents' socket file takes the default mode: 0o777 less the umask


class UnixHTTPConnection(http.client.HTTPConnection):
    """http.client over a Unix stream socket (the Host header stays `localhost`)."""

    def __init__(self, sock_path: Path, timeout: float = 60) -> None:
        super().__init__("localhost", timeout=timeout)
        self.sock_path = sock_path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.sock_path))
        except OSError:
            sock.close()
            raise
        self.sock = sock


class UnixAgent(Agent):
    """An `Agent` whose one kept connection is the Unix socket (so no `fresh=True` requests)."""

    def __init__(self, lang: str, proc: subprocess.Popen, sock_path: Path, out_lines: list[str]) -> None:
        super().__init__(lang, proc, 0, out_lines)
        self.sock_path = sock_path

    def conn(self) -> http.client.HTTPConnection:
        if self._conn is None:
            self._conn = UnixHTTPConnection(self.sock_path)
        return self._conn


def _popen(lang: str, sock_path: str, tmp: Path) -> subprocess.Popen:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "TMPDIR": str(tmp),
        "EMBER_AGENT_SOCKET": sock_path,
        # ignored with EMBER_AGENT_SOCKET set: as TCP settings both would end the agent at start
        "EMBER_AGENT_HOST": "203.0.113.1",
        "EMBER_AGENT_PORT": "not a port",
    }
    return subprocess.Popen(
        agent_command(lang), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp, umask=UMASK
    )


@pytest.fixture
def unix_agent_factory(lang: str, tmp_path: Path) -> Iterator[Callable[[Path], UnixAgent]]:
    """Starts an agent on a Unix socket and waits for its LISTENING line; stops it by pid at the end."""
    started: list[UnixAgent] = []

    def factory(sock_path: Path) -> UnixAgent:
        proc = _popen(lang, str(sock_path), tmp_path)
        lines: list[str] = []
        agent = UnixAgent(lang, proc, sock_path, lines)
        started.append(agent)
        listening = threading.Event()

        def drain() -> None:
            assert proc.stdout is not None
            for raw in iter(proc.stdout.readline, b""):
                lines.append(raw.decode("utf-8", "replace"))
                if raw.startswith(b"EMBER_AGENT_LISTENING"):
                    listening.set()
            listening.set()

        threading.Thread(target=drain, daemon=True).start()
        assert listening.wait(15), f"{lang} agent did not print EMBER_AGENT_LISTENING: {agent.output()}"
        assert any(ln.startswith("EMBER_AGENT_LISTENING") for ln in lines), f"{lang} agent exited: {agent.output()}"
        return agent

    yield factory
    for agent in started:
        with contextlib.suppress(Exception):
            agent.stop()


def _run_refused(lang: str, sock_path: str, tmp: Path) -> tuple[int, str]:
    """Start an agent that must not start: -> (exit status, its output)."""
    return _outcome(_popen(lang, sock_path, tmp))


def _outcome(proc: subprocess.Popen) -> tuple[int, str]:
    """Wait for an agent that must not start: -> (exit status, its output)."""
    try:
        out, _ = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    return proc.returncode, out.decode("utf-8", "replace")


def test_agent_serves_health_auth_specialize_and_invoke_on_the_socket(unix_agent_factory, lang, code, tmp_path):
    sock_path = tmp_path / "agent.sock"
    agent = unix_agent_factory(sock_path)
    listening = [ln for ln in agent.out_lines if ln.startswith("EMBER_AGENT_LISTENING")]
    assert listening == [f"EMBER_AGENT_LISTENING socket={sock_path}\n"]
    st = os.lstat(sock_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o777 & ~UMASK  # not narrowed: the host process may be another uid

    h = agent.healthz(token=None)
    assert h == {"state": "generic", "runtime": h["runtime"]}
    assert h["runtime"].startswith("python3." if lang == "python" else "nodejs")
    r = agent.specialize(spec(code["hello"]))
    assert r.status == 200, r
    assert r.json()["state"] == "specialized"
    r = agent.invoke({"name": "unix"})
    assert r.status == 200, r
    assert r.json() == {"hello": "unix"}
    assert agent.invoke({"name": "unix"}, token="another-token").status == 401
    h = agent.healthz()
    assert h["state"] == "specialized"
    assert h["codeHash"] == spec(code["hello"])["codeHash"]

    agent.stop()
    assert agent.proc.returncode == 0, agent.output()
    assert not sock_path.exists()  # removed on SIGTERM, as CONTRACT.md says


def test_socket_file_left_by_a_killed_agent_is_replaced(unix_agent_factory, tmp_path):
    sock_path = tmp_path / "agent.sock"
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))  # bound, never listening, then closed: the file stays, as after SIGKILL
    stale.close()
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    agent = unix_agent_factory(sock_path)
    assert agent.healthz(token=None)["state"] == "generic"


def test_relative_socket_path_is_refused(lang, tmp_path):
    status, out = _run_refused(lang, "agent.sock", tmp_path)
    assert status != 0, out
    assert "EMBER_AGENT_SOCKET" in out
    assert "absolute" in out
    assert "EMBER_AGENT_LISTENING" not in out
    assert not (tmp_path / "agent.sock").exists()


def test_socket_path_of_the_longest_length_serves_and_a_longer_one_is_refused(unix_agent_factory, lang, tmp_path):
    def path_of(n: int) -> Path:
        return tmp_path / ("s" * (n - len(os.fsencode(tmp_path)) - 1))

    longest = path_of(107)  # sun_path is 108 bytes with the final NUL; Node would truncate a longer path
    assert unix_agent_factory(longest).healthz(token=None)["state"] == "generic"
    status, out = _run_refused(lang, str(path_of(108)), tmp_path)
    assert status != 0, out
    assert "EMBER_AGENT_SOCKET" in out
    assert "107 bytes" in out
    assert [p.name for p in tmp_path.iterdir() if p.is_socket()] == [longest.name]  # no truncated twin


def test_path_holding_a_regular_file_is_refused_and_the_file_left_untouched(lang, tmp_path):
    path = tmp_path / "agent.sock"
    path.write_bytes(b"not a socket\n")
    path.chmod(0o640)
    before = os.lstat(path)
    status, out = _run_refused(lang, str(path), tmp_path)
    assert status != 0, out
    assert "EMBER_AGENT_SOCKET" in out
    assert "not a socket" in out
    assert "EMBER_AGENT_LISTENING" not in out
    after = os.lstat(path)
    assert path.read_bytes() == b"not a socket\n"
    assert (after.st_ino, after.st_mode, after.st_mtime_ns) == (before.st_ino, before.st_mode, before.st_mtime_ns)


def _popen_with_listen_fd(lang: str, value: str, tmp: Path, pass_fds: tuple[int, ...] = ()) -> subprocess.Popen:
    """An agent handed `EMBER_AGENT_LISTEN_FD=value` (and the given descriptors)."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "TMPDIR": str(tmp), "EMBER_AGENT_LISTEN_FD": value}
    return subprocess.Popen(
        agent_command(lang), env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp, pass_fds=pass_fds
    )


def test_a_handed_down_socket_serves_and_bad_ones_are_refused(lang, tmp_path):
    """Socket activation (EMBER_AGENT_LISTEN_FD): the host binds and listens, the agent serves."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "handed.sock"))
    listener.listen(16)
    proc = _popen_with_listen_fd(lang, str(listener.fileno()), tmp_path, (listener.fileno(),))
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert line == f"EMBER_AGENT_LISTENING fd={listener.fileno()}\n", line
        listener.close()  # the agent holds it now
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(10)
            client.connect(str(tmp_path / "handed.sock"))
            client.sendall(b"GET /healthz HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n")
            reply = b""
            while chunk := client.recv(4096):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200"), reply
        assert b'"generic"' in reply
    finally:
        proc.terminate()
        proc.wait(15)
    # not a number, a standard stream, a closed descriptor, a file that is no socket
    with open(tmp_path / "plain", "w") as plain:
        for value, fds in (("three", ()), ("1", ()), ("97", ()), (str(plain.fileno()), (plain.fileno(),))):
            status, out = _outcome(_popen_with_listen_fd(lang, value, tmp_path, fds))
            assert status != 0, (value, out)
            assert "EMBER_AGENT_LISTEN_FD" in out, (value, out)
            assert "EMBER_AGENT_LISTENING" not in out, (value, out)
