"""A freeze stops every process the code started, not only its workers (runtime-images/CONTRACT.md,
`POST /v1/freeze`): a child in the worker's process group, one in a session of its own (`setsid`),
and, in Python, one detached by a double fork (re-parented to the agent, its subreaper).

Each ticker is a real shell loop appending the time to its own file every 50 ms; while the pod is
frozen (1.5 s here) none may write, so each file shows a gap of about that length, and after the
thaw they tick again. Before this, the setsid'd and detached ones kept running through a freeze.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import Agent, spec

pytestmark = pytest.mark.timeout(60)

# `sh` loops: the pid first, then a timestamp every 50 ms
LOOP = 'echo $$ > "$1.pid"; while :; do date +%s.%N >> "$1"; sleep 0.05; done'

PYTHON = r"""
import subprocess

LOOP = LOOP_LITERAL

def handler(event, context):
    d = event["dir"]
    subprocess.Popen(["sh", "-c", LOOP, "sh", d + "/group"])
    subprocess.Popen(["sh", "-c", LOOP, "sh", d + "/session"], start_new_session=True)
    # the outer shell exits at once: the loop is orphaned, in a session of its own
    subprocess.run(["sh", "-c", 'setsid sh -c "$0" sh "$1" &', LOOP, d + "/detached"], check=True)
    return {"started": True}
""".replace("LOOP_LITERAL", repr(LOOP))

NODE = r"""
const { spawn } = require('node:child_process');
const LOOP = LOOP_LITERAL;

exports.handler = async (event) => {
  spawn('sh', ['-c', LOOP, 'sh', event.dir + '/group'], { stdio: 'ignore' });
  spawn('sh', ['-c', LOOP, 'sh', event.dir + '/session'], { stdio: 'ignore', detached: true });
  return { started: true };
};
""".replace("LOOP_LITERAL", json.dumps(LOOP))

FROZEN_S = 1.5


def _stamps(path: Path) -> list[float]:
    return [float(line) for line in path.read_text().split()]


def _longest_gap(stamps: list[float]) -> float:
    return max(b - a for a, b in itertools.pairwise(stamps))


@pytest.mark.parametrize("lang", ["python", "node"])
def test_a_freeze_stops_what_the_code_started_in_its_group_its_own_session_or_detached(
    agent: Agent, lang: str, tmp_path: Path
) -> None:
    r = agent.specialize(spec(PYTHON if lang == "python" else NODE, timeoutSeconds=10))
    assert r.status == 200, r
    tickers = ["group", "session"] + (["detached"] if lang == "python" else [])
    try:
        r = agent.invoke({"dir": str(tmp_path)})
        assert r.status == 200, r
        deadline = time.monotonic() + 10
        while not all((tmp_path / t).exists() and len(_stamps(tmp_path / t)) >= 3 for t in tickers):
            assert time.monotonic() < deadline, f"tickers did not start: {os.listdir(tmp_path)}"
            time.sleep(0.05)
        assert agent.request("POST", "/v1/freeze").status == 200
        frozen_at = time.time()
        time.sleep(FROZEN_S)
        counts = {t: len(_stamps(tmp_path / t)) for t in tickers}
        assert agent.request("POST", "/v1/thaw").status == 200
        time.sleep(0.5)
        for t in tickers:
            stamps = _stamps(tmp_path / t)
            assert len(stamps) > counts[t], f"{t}: no tick after the thaw"
            assert _longest_gap(stamps) > FROZEN_S - 0.3, f"{t} kept ticking while frozen"
            assert not [s for s in stamps if frozen_at + 0.3 < s < frozen_at + FROZEN_S - 0.1], t
    finally:
        for t in tickers:
            pid_file = tmp_path / f"{t}.pid"
            if pid_file.exists():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
