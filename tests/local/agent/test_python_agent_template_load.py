"""The Python agent's template imports the code after the first invocation (deferred): what
waits for that import, and what a worker's exit looks like while it runs.  Real agent processes."""

from __future__ import annotations

import threading
import time

import pytest

from conftest import spec

pytestmark = pytest.mark.parametrize("lang", ["python"])  # only the Python agent has a template

# The first import (the blank worker's) is quick; the second one (the template's) sleeps.
SLOW_SECOND_IMPORT = (
    "import os, time\n"
    "if os.path.exists(os.environ['MARKER']):\n"
    "    time.sleep(float(os.environ['SECOND_IMPORT_SLEEP']))\n"
    "    if os.environ.get('SECOND_IMPORT_RAISES'):\n"
    "        raise RuntimeError('the second import fails')\n"
    "open(os.environ['MARKER'], 'w').close()\n"
    "import ember_runtime\n"
    "SLOW_HOOK = [os.path.exists(os.environ['MARKER']) and os.environ.get('SLOW_FREEZE_HOOK')]\n"
    "@ember_runtime.register_before_freeze\n"
    "def _freeze():\n"
    "    print('freeze hook in', os.getpid())\n"
    "    if SLOW_HOOK[0]:  # in the template, once: late, then fails\n"
    "        SLOW_HOOK[0] = None\n"
    "        time.sleep(float(os.environ['SLOW_FREEZE_HOOK']))\n"
    "        raise RuntimeError('late hook failure')\n"
    "@ember_runtime.register_after_thaw\n"
    "def _thaw():\n"
    "    print('thaw hook in', os.getpid())\n"
    "def handler(e, c):\n"
    "    time.sleep(e.get('sleep', 0))\n"
    "    if e.get('exit') is not None:\n"
    "        os._exit(e['exit'])\n"
    "    if e.get('kill'):\n"
    "        os.kill(os.getpid(), 9)\n"
    "    return os.getpid()\n"
)


def _specialize(agent, tmp_path, sleep, **extra):
    env = {"MARKER": str(tmp_path / "imported"), "SECOND_IMPORT_SLEEP": str(sleep), **extra.pop("env", {})}
    r = agent.specialize(spec(SLOW_SECOND_IMPORT, env=env, **extra))
    assert r.status == 200, r
    return r


def _two_at_once(agent):
    results = []

    def first():
        results.append(agent.invoke({"sleep": 1}, fresh=True))

    t = threading.Thread(target=first)
    t.start()
    time.sleep(0.3)  # the first worker is busy: the second invoke needs a worker from the template
    second = agent.invoke({}, fresh=True)
    t.join()
    return results[0], second


def test_a_second_worker_waits_for_a_template_import_longer_than_10s(agent, lang, tmp_path):
    _specialize(agent, tmp_path, 11, concurrency=2, initTimeoutSeconds=20, timeoutSeconds=30)
    t0 = time.monotonic()
    first, second = _two_at_once(agent)
    assert first.status == 200, first
    assert isinstance(first.json(), int), first
    assert second.status == 200, second
    assert isinstance(second.json(), int), second
    assert second.json() != first.json(), second
    assert time.monotonic() - t0 >= 10
    assert "template process died" not in agent.output()
    # one code directory: the template was not restarted (which would load the code again)
    assert len(list(tmp_path.glob("ember-agent-*/v*"))) == 1, list(tmp_path.glob("ember-agent-*/v*"))


def test_a_template_import_that_fails_is_a_clear_error(agent, lang, tmp_path):
    _specialize(agent, tmp_path, 0.5, concurrency=2, timeoutSeconds=30, env={"SECOND_IMPORT_RAISES": "1"})
    t0 = time.monotonic()
    first, second = _two_at_once(agent)
    assert first.status == 200, first
    assert second.status == 502, second
    assert second.json()["errorType"] == "Runtime.WorkerUnavailable"
    assert "the second import fails" in second.json()["errorMessage"], second
    assert time.monotonic() - t0 < 8


def test_a_template_import_longer_than_init_timeout_is_an_error_not_a_hang(agent, lang, tmp_path):
    _specialize(agent, tmp_path, 30, concurrency=2, initTimeoutSeconds=2, timeoutSeconds=30)
    t0 = time.monotonic()
    first, second = _two_at_once(agent)
    assert first.status == 200, first
    assert second.status == 502, second
    assert "initTimeoutSeconds" in second.json()["errorMessage"], second
    assert time.monotonic() - t0 < 8


@pytest.mark.parametrize(("event", "said"), [({"exit": 3}, "exit status 3"), ({"kill": True}, "signal: killed")])
def test_first_worker_exit_status_while_the_template_imports(agent, lang, tmp_path, event, said):
    # the first worker is the template's child; the template reaps it while it is still importing
    _specialize(agent, tmp_path, 2, timeoutSeconds=10)
    assert isinstance(agent.invoke({}).json(), int)  # the template starts importing now (2 s)
    r = agent.invoke(event)
    assert r.status == 200, r
    assert r.json()["errorType"] == "Runtime.ExitError", r
    assert said in r.json()["errorMessage"], r
    assert isinstance(agent.invoke({}).json(), int)


def test_first_worker_exit_status_before_the_template_imports(agent, lang, tmp_path):
    _specialize(agent, tmp_path, 2, timeoutSeconds=10)
    r = agent.invoke({"exit": 5})  # the first invocation: the template has not got the code yet
    assert r.json()["errorType"] == "Runtime.ExitError", r
    assert "exit status 5" in r.json()["errorMessage"], r
    assert isinstance(agent.invoke({}).json(), int)


def test_hooks_wait_for_the_template_import_and_get_their_own_replies(agent, lang, tmp_path):
    _specialize(agent, tmp_path, 11, initTimeoutSeconds=20, timeoutSeconds=30)
    assert isinstance(agent.invoke({}).json(), int)  # the template starts importing now (11 s)
    r = agent.request("POST", "/v1/freeze")
    assert r.status == 200, r
    assert r.json() == {"state": "frozen", "connectionsClosed": 0}
    r = agent.request("POST", "/v1/thaw")
    assert r.status == 200, r
    assert r.json() == {"state": "specialized"}
    out = agent.wait_output("thaw hook in")
    assert out.count("freeze hook in") == 2, out  # the first worker and the template
    agent.wait_output("thaw hook in", timeout=5)
    time.sleep(0.3)
    assert agent.output().count("thaw hook in") == 2, agent.output()
    assert isinstance(agent.invoke({}).json(), int)


def test_a_late_hook_reply_does_not_answer_the_next_hook_request(agent, lang, tmp_path):
    # the template's first freeze hook outlasts the hook timeout (10 s) and then fails; that late
    # reply belongs to the first freeze, not to the second
    _specialize(agent, tmp_path, 0, env={"SLOW_FREEZE_HOOK": "11"})
    assert isinstance(agent.invoke({}).json(), int)
    r = agent.request("POST", "/v1/freeze")
    assert r.status == 500, r
    assert "Runtime.HookTimeout" in r.json()["errorMessage"], r
    r = agent.request("POST", "/v1/freeze")
    assert r.status == 200, r
    assert r.json() == {"state": "frozen", "connectionsClosed": 0}
    assert agent.request("POST", "/v1/thaw").json() == {"state": "specialized"}
    assert isinstance(agent.invoke({}).json(), int)
