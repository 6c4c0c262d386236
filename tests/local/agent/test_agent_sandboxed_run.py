"""The agents run as the runtime images run them: uid/gid 65532, read-only root filesystem, only
the code directory and TMPDIR writable (emptyDirs in a pod).  Done with a private mount
namespace (`unshare -m`, root remounted read-only, a tmpfs for the writable part) and `setpriv`."""

from __future__ import annotations

import os
import shlex
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

from conftest import Agent, agent_command, spec

# Needs root with unshare and setpriv (util-linux), as `make test` has; without them the tests
# fail rather than skip, so a missing component never passes unnoticed.

PY = (
    "import os\n"
    "def handler(event, context):\n"
    "    try:\n"
    "        open('/etc/ember-should-not-exist', 'w')\n"
    "        wrote = True\n"
    "    except OSError:\n"
    "        wrote = False\n"
    "    with open(os.path.join(os.environ['TMPDIR'], 'scratch'), 'w') as f:\n"
    "        f.write('ok')\n"
    "    return {'uid': os.getuid(), 'gid': os.getgid(), 'wroteRoot': wrote}\n"
)
JS = (
    "const fs = require('fs'); const path = require('path');\n"
    "exports.handler = async () => {\n"
    "  let wrote = true;\n"
    "  try { fs.writeFileSync('/etc/ember-should-not-exist', 'x'); } catch { wrote = false; }\n"
    "  fs.writeFileSync(path.join(process.env.TMPDIR, 'scratch'), 'ok');\n"
    "  return { uid: process.getuid(), gid: process.getgid(), wroteRoot: wrote };\n"
    "};\n"
)


@pytest.fixture
def writable():
    # the mount point must be reachable by uid 65532 (pytest's tmp_path is under a 0700 dir)
    d = tempfile.mkdtemp(prefix="ember-sandbox-", dir="/tmp")
    os.chmod(d, 0o755)
    yield Path(d)
    os.rmdir(d)


def test_agent_runs_non_root_on_read_only_root(lang, writable):
    argv = agent_command(lang)
    if lang == "python" and os.path.exists("/usr/bin/python3"):
        argv[0] = "/usr/bin/python3"  # the test's interpreter may live under /root (0700)
    cmd = " ".join(shlex.quote(c) for c in argv)
    script = (
        f"set -e; mount -t tmpfs -o size=64m,mode=1777 tmpfs {writable}; "
        f"mkdir -m 1777 {writable}/code {writable}/tmp; "
        "mount -o remount,bind,ro /; "
        f"exec setpriv --reuid 65532 --regid 65532 --clear-groups env -i PATH=/usr/bin:/bin "
        f"EMBER_AGENT_PORT=0 EMBER_AGENT_HOST=127.0.0.1 EMBER_AGENT_CODE_DIR={writable}/code "
        f"TMPDIR={writable}/tmp {cmd}"
    )
    proc = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    lines: list[str] = []
    ready = threading.Event()

    def drain() -> None:
        assert proc.stdout is not None
        for raw in iter(proc.stdout.readline, b""):
            lines.append(raw.decode("utf-8", "replace"))
            ready.set()
        ready.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        end = time.monotonic() + 15
        while time.monotonic() < end and not any("EMBER_AGENT_LISTENING" in ln for ln in lines):
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        listening = [ln for ln in lines if ln.startswith("EMBER_AGENT_LISTENING")]
        assert listening, "".join(lines)
        agent = Agent(lang, proc, int(listening[0].split("port=")[1]), lines)
        r = agent.specialize(spec(PY if lang == "python" else JS))
        assert r.status == 200, r
        r = agent.invoke({})
        assert r.status == 200, r
        assert r.json() == {"uid": 65532, "gid": 65532, "wroteRoot": False}
        assert agent.healthz()["state"] == "specialized"
        # the code and scratch files live only in the private tmpfs: nothing leaked outside it
        assert not os.path.exists("/etc/ember-should-not-exist")
        assert os.listdir(writable) == []
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
