"""Key-value state end to end in local mode (issue #15): a real activator over real sandboxed agents
(gVisor's runsc when installed), the Function's state in a real SQLite file, reached by the code
through its channel to Ember under the default policy (egress `none`).

The stores' own behaviour (TTL, CAS equality, Redis) is tests/local/state/test_stores.py; the
agent's client side of the contract, tests/local/agent.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

from ember.activator.version_state import Phase
from ember.api.function import Function
from ember.state.sqlite import SqliteKeyValueStore

from .helpers import Activator, function, run_activator

STATE = {"keyValue": True}

COUNTER = """
    import threading, uuid

    POD = uuid.uuid4().hex  # one per pod: the template imports the module once, workers fork from it

    def handler(event, context):
        errors = []

        def bump():
            try:
                for _ in range(event["each"]):
                    context.state.incr("hits")
            except Exception as e:
                errors.append(repr(e))

        threads = [threading.Thread(target=bump) for _ in range(event["threads"])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {"pod": POD, "errors": errors}
"""

CAS = """
    import uuid

    POD = uuid.uuid4().hex

    def handler(event, context):
        state = context.state
        retries = 0
        for _ in range(event["each"]):
            while True:
                current = state.get("doc")
                new = {"n": (current or {"n": 0})["n"] + 1, "by": POD}
                if state.compare_and_set("doc", current, new):
                    break
                retries += 1
        return {"pod": POD, "retries": retries}
"""

OPS = """
    import ember_runtime

    def handler(event, context):
        s = context.state
        out = {}
        for op in event["ops"]:
            name, args = op[0], op[1:]
            try:
                out[len(out)] = ["ok", getattr(s, name)(*args)]
            except ember_runtime.StateError as e:
                out[len(out)] = ["error", e.error_type, e.status, e.error_message]
        return {"results": [out[i] for i in range(len(out))], "same": s is ember_runtime.state}
"""


async def _result(act: Activator, name: str, event: object) -> dict[str, Any]:
    async with act.http.post(act.invoke_url(name), data=json.dumps(event).encode()) as response:
        text = await response.text()
        assert response.status == 200, text
        assert "X-Ember-Function-Error" not in response.headers, text
        return dict(json.loads(text))


async def _apply_and_wait(act: Activator, fn: Function) -> None:
    """Apply a new Version and wait until it is the one that serves (the old one serves meanwhile)."""
    vs = act.registry.apply(fn)
    assert vs is not None
    deadline = time.monotonic() + 60
    while vs.phase is not Phase.READY:
        assert vs.phase is not Phase.FAILED, vs
        assert time.monotonic() < deadline, "the new Version did not become Ready"
        await asyncio.sleep(0.05)


async def test_a_thousand_concurrent_increments_over_several_pods_end_at_exactly_a_thousand() -> None:
    async with run_activator() as act:
        act.registry.apply(function("counter", COUNTER, state=STATE, scaling={"maxScale": 4}))
        replies = await asyncio.gather(*(_result(act, "counter", {"each": 5, "threads": 4}) for _ in range(50)))
        final = await _result(act, "counter", {"each": 0, "threads": 0})
        act.registry.apply(function("reader", OPS, state=STATE))
        other = await _result(act, "reader", {"ops": [["get", "hits"]]})
    assert [r["errors"] for r in replies if r["errors"]] == []
    assert len({r["pod"] for r in replies} | {final["pod"]}) >= 2, "the calls should have spread over several pods"
    assert other["results"] == [["ok", None]]  # another Function's state is not this one's


async def test_compare_and_set_under_contention_never_loses_an_update() -> None:
    async with run_activator() as act:
        act.registry.apply(function("cas", CAS, state=STATE, scaling={"maxScale": 3}))
        replies = await asyncio.gather(*(_result(act, "cas", {"each": 5}) for _ in range(24)))
        await _apply_and_wait(act, function("cas", OPS, state=STATE))  # a new Version of the same Function
        after = await _result(act, "cas", {"ops": [["get", "doc"]]})
    [[ok, doc]] = after["results"]
    assert ok == "ok"
    assert doc["n"] == 24 * 5, (doc, [r["retries"] for r in replies])


async def test_state_survives_the_activator_and_its_pods_restarting(tmp_path: Path) -> None:
    async with run_activator(state=SqliteKeyValueStore(tmp_path / "state.db")) as act:
        act.registry.apply(function("kv", OPS, state=STATE))
        await _result(act, "kv", {"ops": [["put", "kept", {"across": "restarts"}], ["incr", "n", 2]]})
    async with run_activator(state=SqliteKeyValueStore(tmp_path / "state.db")) as act:  # new pods, same file
        act.registry.apply(function("kv", OPS, state=STATE))
        after = await _result(act, "kv", {"ops": [["get", "kept"], ["incr", "n"]]})
    assert after["results"] == [["ok", {"across": "restarts"}], ["ok", 3]]


async def test_state_survives_a_version_change_and_refuses_bad_input_clearly() -> None:
    async with run_activator() as act:
        act.registry.apply(function("kv", OPS, state=STATE))
        first = await _result(
            act,
            "kv",
            {"ops": [["put", "greeting", {"text": "hi"}], ["incr", "n", 5], ["put", "gone", 1, 1]]},
        )
        pods_before = {s.handle.id for vs in act.registry.all_versions() for s in vs.serving}
        await _apply_and_wait(act, function("kv", OPS.replace("out = {}", "out = {}  # v2"), state=STATE))
        await asyncio.sleep(1.2)  # "gone" had a ttl of 1 s
        ops = [
            ["get", "greeting"],
            ["get", "n"],
            ["get", "gone", "default"],
            ["incr", "greeting"],
            ["put", "big", "x" * (256 * 1024)],
            ["put", "k" * 600, 1],
            ["put", "nothing", None],
            ["put", "ttl", 1, 0],
            ["delete", "greeting"],
            ["delete", "greeting"],
            ["compare_and_set", "fresh", None, [1, 2]],
            ["compare_and_set", "fresh", None, [3]],
            ["get", "fresh"],
        ]
        second = await _result(act, "kv", {"ops": ops})
        pods_after = {s.handle.id for vs in act.registry.all_versions() if vs.key.number == 2 for s in vs.serving}
        act.registry.apply(function("stateless", OPS))
        stateless = await _result(act, "stateless", {"ops": [["get", "greeting"]]})
    assert first["results"] == [["ok", None], ["ok", 5], ["ok", None]]
    assert first["same"] is True  # context.state is ember_runtime.state
    assert pods_after
    assert not pods_after & pods_before  # the new Version's pods are new pods
    results = second["results"]
    assert results[0] == ["ok", {"text": "hi"}]
    assert results[1] == ["ok", 5]
    assert results[2] == ["ok", "default"]  # expired
    assert results[3][:3] == ["error", "NotAnInteger", 409]
    assert results[4][:3] == ["error", "ValueTooLarge", 413]
    assert "262146" in results[4][3], results[4]  # the size
    assert "262144" in results[4][3], results[4]  # and the limit
    assert results[5][:3] == ["error", "InvalidStateRequest", 400]
    assert "600" in results[5][3], results[5]
    assert "512" in results[5][3], results[5]
    assert results[6][:3] == ["error", "InvalidStateRequest", 400]
    assert results[7][:3] == ["error", "InvalidStateRequest", 400]
    assert "ttl" in results[7][3]
    assert results[8:] == [["ok", True], ["ok", False], ["ok", True], ["ok", False], ["ok", [1, 2]]]
    assert stateless["results"] == [["error", "StateNotEnabled", None, stateless["results"][0][3]]]


NODE_STATE = """
exports.handler = async (event, context) => {
  const s = context.state;
  const out = {};
  await s.put('doc', { n: 1 });
  out.swapped = await s.compareAndSet('doc', { n: 1 }, { n: 2 });
  out.lost = await s.compare_and_set('doc', { n: 1 }, { n: 3 });
  out.doc = await s.get('doc');
  out.missing = await s.get('nothing', 'fallback');
  const hits = await Promise.all(Array.from({ length: 20 }, () => s.incr('hits')));
  out.hits = hits.sort((a, b) => a - b);
  try {
    await s.put('big', 'x'.repeat(300 * 1024));
  } catch (e) {
    out.big = { name: e.name, errorType: e.errorType, status: e.status };
  }
  out.deleted = await s.delete('doc');
  return out;
};
"""


async def test_node_code_uses_the_same_state_through_the_activator() -> None:
    spec = {"runtime": "nodejs20", "handler": "index.handler", "code": {"inline": NODE_STATE}, "state": STATE}
    async with run_activator() as act:
        act.registry.apply(Function.model_validate({"metadata": {"name": "node-kv"}, "spec": spec}))
        reply = await _result(act, "node-kv", {})
        again = await _result(act, "node-kv", {})
    assert reply["swapped"] is True
    assert reply["lost"] is False
    assert reply["doc"] == {"n": 2}
    assert reply["missing"] == "fallback"
    assert reply["hits"] == list(range(1, 21))  # 20 concurrent increments, none lost
    assert reply["big"] == {"name": "StateError", "errorType": "ValueTooLarge", "status": 413}
    assert reply["deleted"] is True
    assert again["hits"] == list(range(21, 41))


HOSTILE = """
import json, os, socket

def _post(path, body):
    host, port = "127.0.0.1", int(os.environ["EMBER_STATE_URL"].split(":")[2].split("/")[0])
    data = json.dumps(body).encode()
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"POST %s HTTP/1.1\\r\\nHost: x\\r\\nContent-Length: %d\\r\\nConnection: close\\r\\n\\r\\n%s"
                  % (path.encode(), len(data), data))
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    head, _, body = out.partition(b"\\r\\n\\r\\n")
    return int(head.split()[1]), json.loads(body or b"null")

def handler(event, context):
    url = os.environ["EMBER_STATE_URL"]
    path = "/" + url.split("/", 3)[3]
    token = path.split("/")[1]
    tries = {
        "own": _post(path, {"op": "get", "key": "secret"}),
        "scope_member": _post(path, {"op": "get", "key": "secret", "scope": "default/victim"}),
        "forged_token": _post("/" + "A" * len(token) + "/_state", {"op": "get", "key": "secret"}),
        "sub_path": _post(path + "/default/victim", {"op": "get", "key": "secret"}),
        "not_json": _post(path, "get secret"),
    }
    out = {}
    for name, (status, body) in tries.items():
        body = body or {}
        out[name] = [status, body.get("errorType"), body.get("value")]
    return out
"""


async def test_code_cannot_reach_another_functions_state() -> None:
    """The scope is the pod's, from its grant: nothing in a request can name another Function's."""
    async with run_activator() as act:
        act.registry.apply(function("victim", OPS, state=STATE))
        put = await _result(act, "victim", {"ops": [["put", "secret", "the victim's"]]})
        act.registry.apply(function("attacker", HOSTILE, state=STATE))
        tries = await _result(act, "attacker", {})
        still = await _result(act, "victim", {"ops": [["get", "secret"]]})
    assert put["results"] == [["ok", None]]
    assert tries["own"] == [200, None, None]  # its own scope has no such key
    assert tries["scope_member"][:2] == [400, "InvalidStateRequest"]  # no member names a scope
    assert tries["forged_token"][:2] == [401, "Unauthorized"]
    assert tries["sub_path"][:2] == [404, "UnknownService"]
    assert tries["not_json"][:2] == [400, "InvalidStateRequest"]
    assert still["results"] == [["ok", "the victim's"]]
