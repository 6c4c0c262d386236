"""The Python agent runs alike as the ember_agent package (the source tree's entry script, as the
README runs it by hand) and as its one-file build (what images and local mode run, and what the
contract suite tests).  Real agent processes."""

from __future__ import annotations

import pytest

import conftest
from conftest import spec

pytestmark = pytest.mark.parametrize("lang", ["python"])

PROBE = (
    "import os, sys\n"
    "import ember_runtime\n"
    "def handler(event, context):\n"
    "    print('probe says hi')\n"
    "    return {'path': sys.path, 'fn': context.function_name}\n"
)


@pytest.fixture(params=["package", "one-file build"])
def build(request, monkeypatch) -> str:
    if request.param == "package":
        monkeypatch.setattr(conftest, "PY_AGENT", conftest.PY_SOURCE_AGENT)
    return request.param


def test_both_builds_specialize_invoke_freeze_and_thaw(build, agent, lang):
    r = agent.specialize(spec(PROBE))
    assert r.status == 200, r
    r = agent.invoke({}, headers={"X-Ember-Log-Type": "Tail"})
    assert r.status == 200, r
    assert r.json()["fn"] == "hello"
    assert "probe says hi" in agent.wait_output("probe says hi")
    assert agent.request("POST", "/v1/freeze").json() == {"state": "frozen", "connectionsClosed": 0}
    assert agent.request("POST", "/v1/thaw").json() == {"state": "specialized"}
    assert agent.healthz()["state"] == "specialized"


def test_user_code_does_not_see_the_agents_folder_on_sys_path(build, agent, lang):
    assert agent.specialize(spec(PROBE)).status == 200
    path = agent.invoke({}).json()["path"]
    agent_dir = str(conftest.PY_AGENT.parent)
    assert agent_dir not in path, (build, path)
