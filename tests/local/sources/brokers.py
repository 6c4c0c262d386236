"""Real brokers for the tests: a `redis-server` of the test's own, on a free loopback port, in a
folder of its own (AOF on, `appendfsync always`, as the chart runs it), stopped by pid."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class RedisServer:
    port: int
    folder: Path
    password: str = ""
    process: subprocess.Popen[bytes] | None = None
    host: str = "127.0.0.1"  # the address it binds (an address the test added to the loopback)
    options: tuple[str, ...] = ()  # more redis-server arguments (later ones win, e.g. --timeout 6)

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{self.host}:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed (tests/cluster/install-deps.sh installs it)"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                binary,
                "--port",
                str(self.port),
                "--bind",
                self.host,
                "--dir",
                str(self.folder),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
                "--protected-mode",
                "yes",
                "--logfile",
                str(self.folder / "redis.log"),
                *(["--requirepass", self.password] if self.password else []),
                *self.options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            if self.process.poll() is not None:
                log = (self.folder / "redis.log").read_text(errors="replace")[-2000:]
                raise AssertionError(f"redis-server exited with {self.process.returncode}: {log}")
            with contextlib.suppress(OSError), socket.create_connection((self.host, self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith((b"+PONG", b"-NOAUTH")):
                    return
            assert time.monotonic() < deadline, "redis-server did not answer PING"
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: what it has not fsynced is lost (with appendfsync always: nothing it answered)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


@contextlib.contextmanager
def redis_server(folder: Path, host: str = "127.0.0.1", options: tuple[str, ...] = ()) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), folder, host=host, options=options)
    server.start()
    try:
        yield server
    finally:
        server.kill()


@dataclass
class NatsServer:
    """A `nats-server` with JetStream (its store in `folder`), on a free loopback port."""

    port: int
    folder: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        binary = shutil.which("nats-server")
        assert binary, "nats-server is not installed (tests/cluster/install-deps.sh installs it)"
        self.folder.mkdir(parents=True, exist_ok=True)
        log = self.folder / "nats.log"
        self.process = subprocess.Popen(
            [binary, "-js", "-a", "127.0.0.1", "-p", str(self.port), "-sd", str(self.folder), "-l", str(log)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 20
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"nats-server exited with {self.process.returncode}: {log.read_text()[-2000:]}")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                if s.recv(4096).startswith(b"INFO"):
                    return
            assert time.monotonic() < deadline, "nats-server did not answer"
            time.sleep(0.05)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


@contextlib.contextmanager
def nats_server(folder: Path) -> Iterator[NatsServer]:
    server = NatsServer(free_port(), folder)
    server.start()
    try:
        yield server
    finally:
        server.kill()
