"""`ember validate` and `ember dev` name the fields a manifest sets that have no effect (issue #10).

Real CLI processes on real files. What is on the list is the unit tier's
(tests/unit/api/test_unsupported.py); the operator's condition and event are the apiserver tier's
(tests/apiserver/test_operator_unsupported.py).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SIZED = """
apiVersion: ember.run/v1alpha1
kind: Function
metadata:
  name: sized
spec:
  runtime: python3.11
  handler: main.handler
  code:
    inline: |
      def handler(event, context):
          return "hi"
  state: {volume: {sizeMiB: 2048, mountPath: /mnt/shared}}
"""
SIZED_WARNING = (
    "Function default/sized: spec.state.volume.sizeMiB is accepted but not implemented in local mode (ember dev); "
    "it has no effect there"
)

POLICY = """
apiVersion: ember.run/v1alpha1
kind: SecurityPolicy
metadata:
  name: intranet
spec:
  egress: {mode: allowList, allow: [{cidr: 10.0.0.0/8, ports: [443]}, {host: api.example.com}]}
"""


def _ember(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ember.cli", *args], capture_output=True, text=True, timeout=60)


def test_validate_warns_about_a_volume_size_local_mode_cannot_bound_and_still_succeeds(tmp_path: Path) -> None:
    (tmp_path / "sized.yaml").write_text(SIZED)
    result = _ember("validate", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["ok  Function default/sized"]
    assert result.stderr.splitlines() == [f"warning: {tmp_path / 'sized.yaml'}: {SIZED_WARNING}"]


def test_validate_names_local_mode_gaps_and_keeps_errors_failing(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(POLICY)
    (tmp_path / "broken.yaml").write_text(SIZED.replace("handler: main.handler", "handler: nodot"))
    result = _ember("validate", str(tmp_path / "policy.yaml"), str(tmp_path / "broken.yaml"))
    assert result.returncode == 1
    assert (
        f"warning: {tmp_path / 'policy.yaml'}: SecurityPolicy default/intranet: spec.egress.allow[].host is accepted "
        "but not implemented in local mode (ember dev); it has no effect there"
    ) in result.stderr.splitlines()
    assert "spec.handler" in result.stderr
    assert "sized: spec.state" not in result.stderr, "an invalid manifest gets its errors, not warnings"


def test_dev_warns_once_per_manifest(tmp_path: Path) -> None:
    (tmp_path / "sized.yaml").write_text(SIZED)
    (tmp_path / "policy.yaml").write_text(POLICY)
    proc = subprocess.Popen(
        [sys.executable, "-m", "ember.cli", "dev", str(tmp_path), "--port", "0", "--no-watch", "--warm-pool", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not any("activator on" in line for line in lines):
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line.rstrip("\n"))
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    warnings = [line for line in lines if line.startswith("ember dev: warning: ")]
    assert warnings == [  # in the order of the files' names
        f"ember dev: warning: {tmp_path / 'policy.yaml'}: SecurityPolicy default/intranet: spec.egress.allow[].host "
        "is accepted but not implemented in local mode (ember dev); it has no effect there",
        f"ember dev: warning: {tmp_path / 'sized.yaml'}: {SIZED_WARNING}",
    ], "\n".join(lines)
