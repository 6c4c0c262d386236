"""CONTRACT.md "Authentication", against both agents as real processes: the first specialize binds
its bearer token; without it (or with another) every request but a bare `GET /healthz` is a 401
that says nothing about the code, and that bare probe reveals liveness only.  Issue #11: a
hostile function read a victim agent's codeHash from /healthz and pre-specialized warm generic
agents with its own code under that hash, which the activator's idempotent specialize accepted.

Python only (Node runs code in threads of the agent process, see CONTRACT.md): a template
restarted after the token is bound holds no copy of it, and a worker of the same uid cannot read
the agent's memory.  The local end to end attack is tests/local/security/test_hostile_agent_auth.py.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import sys
import tempfile
import threading
from pathlib import Path

import pytest

import conftest
from conftest import spec

OTHER = secrets.token_urlsafe(32)

# A worker that scans its own memory for bearer tokens: what hostile code would do to find one.
SCAN_OWN_MEMORY = r"""
import os, re

def handler(event, context):
    if event.get("kill_template"):  # the template is the worker's parent; the agent restarts it
        os.kill(os.getppid(), 9)
        os._exit(3)
    found = set()
    with open("/proc/self/maps") as maps, open("/proc/self/mem", "rb", 0) as mem:
        for line in maps:
            parts = line.split()
            if "r" not in parts[1] or (len(parts) > 5 and parts[5].startswith("[v")):
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            try:
                mem.seek(lo)
                data = mem.read(hi - lo)
            except (OSError, OverflowError, ValueError):
                continue
            found.update(m.group(1).decode() for m in re.finditer(rb"Bearer ([A-Za-z0-9_-]{16,})", data))
    return {"found": sorted(found)}
"""

# A worker that tries to read the agent's memory (the agent is its grandparent).
READ_AGENT_MEMORY = r"""
import os

def _ppid(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])

def handler(event, context):
    agent = _ppid(os.getppid())
    try:
        with open(f"/proc/{agent}/maps") as maps:
            lo = int(maps.readline().split("-")[0], 16)
        with open(f"/proc/{agent}/mem", "rb", 0) as mem:
            mem.seek(lo)
            return {"agent": agent, "read": len(mem.read(64))}
    except OSError as e:
        return {"agent": agent, "error": type(e).__name__}
"""


def victim_spec(code):
    return spec(code["hello"], code_hash="sha256:" + "v" * 64, function={"namespace": "team-a", "name": "victim"})


def assert_refused(r):
    assert r.status == 401, r
    assert r.header("WWW-Authenticate") == "Bearer"
    body = r.json()
    assert body["errorType"] == "Unauthorized"
    assert "sha256:" not in r.body.decode(), r
    assert "main.handler" not in r.body.decode(), r


@pytest.mark.parametrize("token", [None, OTHER], ids=["no token", "another token"])
def test_every_request_but_healthz_needs_the_bound_token(agent, code, token):
    assert agent.specialize(victim_spec(code)).status == 200
    assert_refused(agent.invoke({"name": "x"}, token=token))
    assert_refused(agent.specialize(victim_spec(code), token=token))
    assert_refused(agent.request("POST", "/v1/freeze", token=token))
    assert_refused(agent.request("POST", "/v1/thaw", token=token))
    assert agent.healthz()["state"] == "specialized"  # not frozen by the refused freeze
    r = agent.invoke({"name": "owner"})
    assert r.status == 200, r
    assert r.json() == {"hello": "owner"}


@pytest.mark.parametrize("token", [None, OTHER], ids=["no token", "another token"])
def test_healthz_without_the_token_reveals_liveness_only(agent, code, token, lang):
    assert agent.specialize(victim_spec(code)).status == 200
    r = agent.request("GET", "/healthz", token=token)
    assert r.status == 200, r
    assert r.json() == {"state": "specialized", "runtime": r.json()["runtime"]}
    for secret in ("sha256:", "victim", "team-a", "main.handler"):
        assert secret not in r.body.decode()
    assert agent.healthz()["codeHash"] == "sha256:" + "v" * 64


def test_specialize_with_another_token_and_the_same_code_is_refused(agent, code):
    """The idempotent path ("same codeHash and handler: 200") answers the token holder only."""
    assert agent.specialize(victim_spec(code)).status == 200
    assert_refused(agent.specialize(victim_spec(code), token=OTHER))
    r = agent.specialize(victim_spec(code))
    assert r.status == 200, r
    assert r.json()["durationMs"] == 0


def test_an_agent_bound_by_another_client_refuses_the_activator(agent_factory, code):
    """The poisoning of issue #11: the attacker specializes a generic agent first, with its own code
    under the victim's codeHash and handler; the activator's specialize and invoke are then refused
    (the activator discards such a pod), never answered by the attacker's code."""
    agent = agent_factory()
    poison = spec(code["hello_v2"], code_hash="sha256:" + "v" * 64, function={"name": "victim"})
    assert agent.specialize(poison, token=OTHER).status == 200
    assert_refused(agent.specialize(victim_spec(code)))
    assert_refused(agent.invoke({"name": "victim"}))


def test_specialize_without_a_token_is_refused_and_binds_nothing(agent, code):
    assert_refused(agent.specialize(victim_spec(code), token=None))
    r = agent.request("POST", "/v1/specialize", json.dumps(victim_spec(code)), token="too-short")
    assert r.status == 401, r
    assert agent.specialize(victim_spec(code)).status == 200  # still free for the activator


def test_concurrent_specializes_with_two_tokens_bind_one(agent, code):
    results: dict[str, int] = {}

    def go(token: str) -> None:
        body = json.dumps(victim_spec(code))
        results[token] = agent.request("POST", "/v1/specialize", body, token=token, fresh=True).status

    threads = [threading.Thread(target=go, args=(t,)) for t in (agent.token, OTHER)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results.values()) == [200, 401], results
    winner = next(t for t, status in results.items() if status == 200)
    assert agent.invoke({"name": "w"}, token=winner).status == 200


@pytest.mark.parametrize("lang", ["python"])
def test_restarted_template_holds_no_copy_of_the_token(agent, lang):
    """A template restarted once the token is bound is exec'd, not forked from the agent: forked,
    its first worker found the token in its own memory (the agent's request heads)."""
    assert agent.specialize(spec(SCAN_OWN_MEMORY)).status == 200
    assert agent.invoke({}).json() == {"found": []}
    r = agent.invoke({"kill_template": True})
    assert r.header("X-Ember-Function-Error") == "Unhandled", r
    agent.wait_output("template process died")
    r = agent.invoke({})
    assert r.status == 200, r
    assert r.json() == {"found": []}


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the agent as another user")
@pytest.mark.parametrize("lang", ["python"])
def test_a_worker_cannot_read_the_agent_memory(lang):
    """The agent is not dumpable: a worker of the same (non-root) uid cannot read its memory."""
    tmp = Path(tempfile.mkdtemp(prefix="ember-auth-"))
    tmp.chmod(0o777)
    python = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable  # not under /root
    command = [python, "-S", "-E", str(conftest.PY_AGENT)]
    agent = conftest._start("python", {}, tmp, command=command, user=65534)
    try:
        assert agent.specialize(spec(READ_AGENT_MEMORY)).status == 200
        r = agent.invoke({})
        assert r.status == 200, r
        assert r.json()["agent"] == agent.proc.pid
        assert r.json().get("error") == "PermissionError", r.json()
    finally:
        agent.stop()
        shutil.rmtree(tmp, ignore_errors=True)
