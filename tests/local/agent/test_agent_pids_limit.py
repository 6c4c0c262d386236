"""EMBER_AGENT_PIDS_LIMIT (CONTRACT.md): the agent's RLIMIT_NPROC, the pod's `limits.pids` in gVisor and Kata.

Real agents run as a uid of their own (no other process of it on this machine, so the kernel counts
the agent's tasks alone, as gVisor counts a pod's): code that forks past the bound gets EAGAIN, its
attempt to raise the bound fails, and the agent keeps serving. As root the kernel ignores the
rlimit (CAP_SYS_RESOURCE), so the tests need root to switch to that uid; CI runs as root. The
same bound inside gVisor: tests/local/security/test_sandbox_policy.py and the cluster tier.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.local.agent import conftest
from tests.local.agent.conftest import Agent, spec

UID = 54321  # no user of this machine has it: the rlimit counts this agent's tasks only
LIMIT = 40

PY_BOMB = """
import os, resource, time

def handler(event, context):
    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (4096, 4096))
        lifted = True
    except (OSError, ValueError):
        lifted = False
    children, error = [], None
    try:
        while len(children) < 1000:
            pid = os.fork()
            if pid == 0:
                time.sleep(30)
                os._exit(0)
            children.append(pid)
    except OSError as e:
        error = e.errno
    for pid in children:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    return {"forked": len(children), "error": error, "lifted": lifted,
            "limit": list(resource.getrlimit(resource.RLIMIT_NPROC))}
"""

NODE_BOMB = """
const { spawn } = require('node:child_process');
exports.handler = async () => {
  const children = [];
  let error = null;
  while (children.length < 1000) {
    const child = spawn('/bin/sleep', ['30'], { stdio: 'ignore' });
    const failed = await new Promise((done) => { child.once('spawn', () => done(null)); child.once('error', done); });
    if (failed) { error = failed.code; break; }
    children.push(child);
  }
  // the bomb's processes end with its invocation
  const ended = (child) => new Promise((done) => { child.once('exit', done); child.kill('SIGKILL'); });
  await Promise.all(children.map(ended));
  return { forked: children.length, error };
};
"""


def _command(lang: str) -> list[str]:
    if lang == "python":  # an interpreter the uid can read (not one under /root)
        python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
        return [python, "-S", "-E", str(conftest.PY_AGENT)]
    return conftest.agent_command(lang)


@pytest.fixture(params=["python", "node"])
def bounded(request: pytest.FixtureRequest) -> Iterator[Agent]:
    if os.geteuid() != 0:
        pytest.fail("these tests run the agent as another uid, which needs root (CI runs as root)")
    tmp = Path(tempfile.mkdtemp(prefix="ember-pids-"))
    tmp.chmod(0o777)
    env = {"EMBER_AGENT_PIDS_LIMIT": str(LIMIT)}
    agent = conftest._start(request.param, env, tmp, command=_command(request.param), user=UID)
    try:
        yield agent
    finally:
        agent.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def _limits(pid: int) -> tuple[str, str]:
    line = next(ln for ln in Path(f"/proc/{pid}/limits").read_text().splitlines() if ln.startswith("Max processes"))
    soft, hard = line.split()[2:4]
    return soft, hard


def test_the_agent_sets_its_task_bound_soft_and_hard(bounded: Agent) -> None:
    assert _limits(bounded.proc.pid) == (str(LIMIT), str(LIMIT))


def test_code_forking_past_the_bound_gets_eagain_and_the_agent_keeps_serving(bounded: Agent) -> None:
    bomb = PY_BOMB if bounded.lang == "python" else NODE_BOMB
    handler = "main.handler" if bounded.lang == "python" else "index.handler"
    assert bounded.specialize(spec(bomb, handler=handler)).status == 200
    first = bounded.invoke({})
    assert first.status == 200, first
    assert first.header("X-Ember-Function-Error") is None, first
    result = first.json()
    assert 4 < result["forked"] < LIMIT, result
    assert result["error"] in (11, "EAGAIN"), result  # errno.EAGAIN
    if bounded.lang == "python":
        assert result["lifted"] is False, result
        assert result["limit"] == [LIMIT, LIMIT], result
    again = bounded.invoke({})  # the children are gone: the same bound again, the same agent
    assert again.status == 200, again
    assert 4 < again.json()["forked"] < LIMIT, again


def test_a_bound_below_eight_ends_the_agent_naming_the_variable(tmp_path: Path) -> None:
    for lang in ("python", "node"):
        env = {"PATH": os.environ.get("PATH", ""), "EMBER_AGENT_PORT": "0", "TMPDIR": str(tmp_path)}
        done = subprocess.run(
            conftest.agent_command(lang),
            env={**env, "EMBER_AGENT_PIDS_LIMIT": "4"},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert done.returncode != 0, (lang, done)
        assert "EMBER_AGENT_LISTENING" not in done.stdout, (lang, done)
        assert "EMBER_AGENT_PIDS_LIMIT" in done.stderr, (lang, done.stderr)
