"""`ember dev` and `ember invoke` as a user runs them: real CLI processes, real files, real agents.

Covers the banner (URL + curl line), invoking through the CLI, an edit that makes a new Version,
a broken file that keeps the old definition serving, bad CLI input, and a clean Ctrl-C that
leaves no agent running.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

MANIFEST = """
apiVersion: ember.run/v1alpha1
kind: Function
metadata:
  name: greet
spec:
  runtime: python3.11
  handler: main.handler
  code:
    inline: |
      def handler(event, context):
          return {"greeting": "GREETING " + event.get("name", "world"), "version": context.function_version}
"""


class Dev:
    """A running `ember dev`; a thread reads its output so lines are never stuck in a buffer."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self.url = ""
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line)
        self._queue.put(None)

    def wait_for(self, pattern: str, timeout_s: float = 60) -> re.Match[str]:
        regex = re.compile(pattern)
        for line in self.lines:
            if m := regex.search(line):
                return m
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            if m := regex.search(line):
                return m
        raise AssertionError(f"no line matching {pattern!r} within {timeout_s} s; output:\n{''.join(self.lines)}")


def _children(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return {int(p) for p in out.split()}


def dev_in(directory: Path) -> Iterator[Dev]:
    """`ember dev DIR --port 0` running until the generator is closed (then Ctrl-C, or killed)."""
    with running_dev([sys.executable, "-m", "ember.cli", "dev", str(directory), "--port", "0"]) as running:
        yield running


@contextlib.contextmanager
def running_dev(argv: list[str]) -> Iterator[Dev]:
    """`argv` (an `ember dev` command line) running for the block (then Ctrl-C, or killed)."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    running = Dev(proc)
    try:
        running.url = running.wait_for(r"activator on (http://127\.0\.0\.1:\d+)").group(1)
        yield running
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[Dev]:
    (tmp_path / "greet.yaml").write_text(MANIFEST.replace("GREETING", "hello"))
    yield from dev_in(tmp_path)


def _invoke(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ember.cli", "invoke", *args, "--url", url], capture_output=True, text=True, timeout=60
    )


def test_dev_serves_edits_and_stops_cleanly(dev: Dev, tmp_path: Path) -> None:
    dev.wait_for(r"curl -s -X POST http://127.0.0.1:\d+/v1/namespaces/default/functions/greet/invoke")
    dev.wait_for(r"Version 1 of default/greet: Ready")
    first = _invoke(dev.url, "greet", "--data", '{"name": "ada"}')
    assert (first.returncode, first.stdout.strip()) == (0, '{"greeting":"hello ada","version":"1"}')

    (tmp_path / "greet.yaml").write_text(MANIFEST.replace("GREETING", "hi"))
    dev.wait_for(r"Version 2 of default/greet: Ready")
    second = _invoke(dev.url, "greet", "--data", '{"name": "ada"}')
    assert second.stdout.strip() == '{"greeting":"hi ada","version":"2"}'
    pinned = _invoke(dev.url, "greet", "--qualifier", "1", "--data", '{"name": "ada"}')
    assert pinned.stdout.strip() == '{"greeting":"hello ada","version":"1"}'

    (tmp_path / "greet.yaml").write_text("apiVersion: ember.run/v1alpha1\nkind: Function\nmetadata: {name: greet}\n")
    dev.wait_for(r"error: .*greet\.yaml: spec: required field is missing")
    dev.wait_for(r"keeping its previous definitions")
    still = _invoke(dev.url, "greet", "--data", '{"name": "ada"}')
    assert still.stdout.strip() == '{"greeting":"hi ada","version":"2"}'

    queued = _invoke(dev.url, "greet", "--async", "--data", "{}")
    assert queued.returncode == 0
    assert '"requestId"' in queued.stdout

    agents = _children(dev.proc.pid)
    assert agents, "ember dev started no agent processes"
    dev.proc.send_signal(signal.SIGINT)
    assert dev.proc.wait(timeout=30) == 0
    time.sleep(0.5)
    left = [pid for pid in agents if Path(f"/proc/{pid}").exists()]
    assert left == []


def test_invoke_reports_errors(dev: Dev) -> None:
    dev.wait_for(r"Version 1 of default/greet: Ready")
    missing = _invoke(dev.url, "nope")
    assert missing.returncode == 1
    assert "404" in missing.stderr
    assert "function default/nope not found" in missing.stderr
    bad = _invoke(dev.url, "greet", "--data", "{not json")
    assert bad.returncode == 2
    assert "--data is not JSON" in bad.stderr
    failing = subprocess.run(
        [sys.executable, "-m", "ember.cli", "invoke", "greet", "--url", "http://127.0.0.1:9"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert failing.returncode == 1
    assert "is `ember dev` running?" in failing.stderr


def test_dev_rejects_a_missing_directory(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "ember.cli", "dev", str(tmp_path / "nowhere"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert "no such directory" in result.stderr


def test_function_with_unknown_policy_is_reported(tmp_path: Path) -> None:
    text = MANIFEST.replace("  runtime: python3.11", "  runtime: python3.11\n  securityPolicyRef: {name: missing}")
    (tmp_path / "f.yaml").write_text(textwrap.dedent(text))
    proc = subprocess.Popen(
        [sys.executable, "-m", "ember.cli", "dev", str(tmp_path), "--port", "0", "--no-watch"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    dev = Dev(proc)
    try:
        dev.wait_for(r"spec\.securityPolicyRef\.name 'missing' names no SecurityPolicy")
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
