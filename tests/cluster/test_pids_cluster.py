"""Cluster tier (#11, hostile suite): `limits.pids` bounds a gVisor pod's tasks.

Kubernetes has no per-pod pids limit (the kubelet's is per node), so the pool's pods run their
agent with `EMBER_AGENT_PIDS_LIMIT`, its RLIMIT_NPROC: gVisor gives each pod a kernel of its own, where
the pod's uid counts only the pod's tasks. A Python and a Node function fork-bomb under a policy
of 64 tasks: the fork past it fails with EAGAIN in the code, the Python one cannot raise the
bound, the same pod keeps serving, the policy reports nothing unsupported, and a bystander
invoked all along sees no error. The operator and the activator run as host processes (as in
test_agent_restart_cluster.py).
"""

from __future__ import annotations

import json

import aiohttp

from tests.apiserver.operator_harness import Ember, condition
from tests.cluster.scenarios import ActivatorProcess
from tests.cluster.test_agent_restart_cluster import BYSTANDER, _bystander_load, _call, _create_ready, _function

LIMIT = 64

PY_BOMB = r"""
import os, resource, time

def handler(event, context):
    if event.get("noop"):
        return {"limit": list(resource.getrlimit(resource.RLIMIT_NPROC))}
    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (4096, 4096))
        lifted = True
    except (OSError, ValueError):
        lifted = False
    children, error = [], None
    try:
        while len(children) < 5000:
            pid = os.fork()
            if pid == 0:
                time.sleep(60)
                os._exit(0)
            children.append(pid)
    except OSError as e:
        error = e.strerror
    for pid in children:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
    return {"forked": len(children), "error": error, "lifted": lifted}
"""

NODE_BOMB = r"""
const { spawn } = require('node:child_process');
exports.handler = async (event) => {
  if (event.noop) return { alive: true };
  const children = [];
  let error = null;
  while (children.length < 5000) {
    const child = spawn('/bin/sleep', ['60'], { stdio: 'ignore' });
    const failed = await new Promise((done) => { child.once('spawn', () => done(null)); child.once('error', done); });
    if (failed) { error = failed.code; break; }
    children.push(child);
  }
  const ended = (child) => new Promise((done) => { child.once('exit', done); child.kill('SIGKILL'); });
  await Promise.all(children.map(ended));
  return { forked: children.length, error };
};
"""


def _pods(ember: Ember, name: str) -> set[str]:
    pods = ember.core.list_namespaced_pod(ember.ns, label_selector=f"ember.run/function={name}").items
    return {p.metadata.name for p in pods if p.metadata.deletion_timestamp is None}


async def test_a_fork_bomb_stops_at_the_policys_pids_limit_in_a_gvisor_pod(
    ember_ns: Ember, activator: ActivatorProcess
) -> None:
    ember = ember_ns
    ember.create(
        "securitypolicies",
        {"kind": "SecurityPolicy", "metadata": {"name": "few"}, "spec": {"limits": {"pids": LIMIT}}},
    )
    bounded = {"securityPolicyRef": {"name": "few"}, "timeoutSeconds": 60, "resources": {"memoryMiB": 512}}
    node = {**bounded, "runtime": "nodejs20", "handler": "index.handler"}
    _create_ready(
        ember,
        _function("pybomb", PY_BOMB, **bounded),
        _function("nodebomb", NODE_BOMB, **node),
        _function("bystander", BYSTANDER),
    )
    supported = condition(ember.get("securitypolicies", "few"), "Unsupported")
    assert (supported.get("status"), supported.get("reason")) == ("False", "AllSupported"), supported
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=180)) as http:
        url, ns = activator.url, ember.ns
        status, text = await _call(http, url, ns, "pybomb", {"noop": True})
        assert (status, json.loads(text)) == (200, {"limit": [LIMIT, LIMIT]}), text
        assert (await _call(http, url, ns, "nodebomb", {"noop": True}))[0] == 200
        before = _pods(ember, "pybomb") | _pods(ember, "nodebomb")
        async with _bystander_load(http, url, ns) as load:
            py_status, py_text = await _call(http, url, ns, "pybomb", {})
            node_status, node_text = await _call(http, url, ns, "nodebomb", {})
            again = [await _call(http, url, ns, name, {"noop": True}) for name in ("pybomb", "nodebomb")]
        after = _pods(ember, "pybomb") | _pods(ember, "nodebomb")
    assert load.errors == []
    assert load.calls > 0, load
    assert py_status == 200, py_text
    py = json.loads(py_text)
    assert 16 < py["forked"] < LIMIT, py
    assert py["error"] == "Resource temporarily unavailable", py
    assert py["lifted"] is False, py
    assert node_status == 200, node_text
    node_bomb = json.loads(node_text)
    assert 8 < node_bomb["forked"] < LIMIT, node_bomb
    assert node_bomb["error"] == "EAGAIN", node_bomb
    assert [status for status, _ in again] == [200, 200], again
    assert before <= after, (before, after)  # no pod was lost: the bombed ones kept serving
