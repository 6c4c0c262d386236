"""`spec.state.volume` in local mode: a real activator over real sandboxed agents (gVisor's runsc
when installed) sharing a folder per Function under the source's volumes folder.

Covers, under runsc and bubblewrap alike: a file one pod writes is read by another pod of the
same Function, and by the pods of its next Version; another Function, with a volume of its own at
the same path, does not see it, nor does a Function without one; a Function's pools with a volume
are prewarmed, and their pods serve that Function alone. A `mountPath` over /tmp, the code
directory or a system folder is refused by `ember validate` with the reason. The claim, its pool
template and the reconcile are tests/unit/resources/test_state_volume.py and
tests/unit/controller/test_state_volume_reconcile.py; a real cluster's claim
tests/cluster/test_state_volume_cluster.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from ember.pods.local import LocalPodSource
from ember.pods.local.sandbox import SANDBOX_UID, detect_sandbox

from .helpers import FAST, Activator, function, run_activator

NOTES = """
    import json, os, time, uuid

    POD = uuid.uuid4().hex  # one per pod: each pod imports the code once
    PATH = "/mnt/state/notes.txt"

    def handler(event, context):
        time.sleep(event.get("sleep", 0))
        if event.get("write") is not None:
            with open(PATH, "a") as f:
                f.write(event["write"] + "\\n")
        try:
            with open(PATH) as f:
                text = f.read()
        except FileNotFoundError:
            text = None
        return {"pod": POD, "text": text, "uid": os.getuid(), "version": context.function_version}
"""
VOLUME: dict[str, Any] = {"state": {"volume": {"mountPath": "/mnt/state", "sizeMiB": 64}}}


@pytest.fixture(params=["runsc", "bwrap"])
async def activator(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Activator]:
    """An activator over a local source in each sandbox (tests/cluster/install-deps.sh installs
    both: one missing fails here), whose volumes live in `tmp_path/volumes`."""
    sandbox = detect_sandbox({**os.environ, "EMBER_SANDBOX": request.param})
    async with run_activator(FAST, source=LocalPodSource(sandbox=sandbox, volumes=tmp_path / "volumes")) as running:
        yield running


async def _invoke(act: Activator, name: str, event: object) -> dict[str, Any]:
    async with act.http.post(act.invoke_url(name), data=json.dumps(event).encode()) as response:
        body = await response.read()
        assert response.status == 200, body
        assert "X-Ember-Function-Error" not in response.headers, body
        return dict(json.loads(body))


async def _until_version(act: Activator, name: str, version: str, timeout_s: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        reply = await _invoke(act, name, {})
        if reply["version"] == version:
            return reply
        assert time.monotonic() < deadline, f"Version {version} of {name} did not serve within {timeout_s} s"
        await asyncio.sleep(0.1)


async def test_a_file_one_pod_writes_is_read_by_other_pods_and_the_next_version(
    activator: Activator, tmp_path: Path
) -> None:
    activator.registry.apply(function("notes", NOTES, **VOLUME))
    first = await _invoke(activator, "notes", {"write": "hello"})
    assert first["text"] == "hello\n"
    assert first["uid"] == SANDBOX_UID  # the sandbox's user, not root, writes it
    # concurrency 1: two invocations at once need two pods
    replies = await asyncio.gather(*(_invoke(activator, "notes", {"sleep": 1.0}) for _ in range(2)))
    assert len({r["pod"] for r in replies}) == 2
    assert [r["text"] for r in replies] == ["hello\n", "hello\n"]
    assert (tmp_path / "volumes" / "default" / "notes" / "notes.txt").read_text() == "hello\n"

    # a Version change: the new Version's pods see the files, and add to them
    activator.registry.apply(function("notes", NOTES, env={"EDITION": "2"}, **VOLUME))
    await _until_version(activator, "notes", "2")
    second = await _invoke(activator, "notes", {"write": "again"})
    assert second["version"] == "2"
    assert second["text"] == "hello\nagain\n"
    assert second["pod"] not in {first["pod"], *(r["pod"] for r in replies)}


async def test_another_function_does_not_see_the_volume(activator: Activator, tmp_path: Path) -> None:
    activator.registry.apply(function("notes", NOTES, **VOLUME))
    activator.registry.apply(function("other", NOTES, **VOLUME))
    activator.registry.apply(function("plain", NOTES))
    assert (await _invoke(activator, "notes", {"write": "mine"}))["text"] == "mine\n"
    assert (await _invoke(activator, "other", {}))["text"] is None
    assert (await _invoke(activator, "plain", {}))["text"] is None
    assert not (tmp_path / "volumes" / "default" / "other" / "notes.txt").exists()
    # each Function with a volume has pools of its own, prewarmed like any other
    pools = {key.volume.function: count for key, count in activator.source.warm_pods().items() if key.volume}
    assert set(pools) == {"notes", "other"}
    deadline = time.monotonic() + 30
    while min(activator.source.warm_pods()[k] for k in activator.source.warm_pods() if k.volume) < 1:
        assert time.monotonic() < deadline, "the pools with a volume were not prewarmed"
        await asyncio.sleep(0.1)


@pytest.mark.parametrize(
    ("mount_path", "reason"),
    [
        pytest.param("/tmp/state", "collides with /tmp, the pod's private /tmp", id="tmp"),
        pytest.param("/var/ember/code", "collides with /var/ember/code, the code directory", id="code-dir"),
        pytest.param("/var/ember", "collides with /var/ember/code, the code directory", id="above-code-dir"),
        pytest.param("/usr/local/state", "collides with /usr, a system folder", id="system"),
        pytest.param("/mnt/../etc", "must be an absolute path", id="dot-dot"),
    ],
)
def test_ember_validate_refuses_a_mount_path_that_collides(tmp_path: Path, mount_path: str, reason: str) -> None:
    manifest = f"""
        apiVersion: ember.run/v1alpha1
        kind: Function
        metadata: {{name: notes}}
        spec:
          runtime: python3.11
          handler: main.handler
          code: {{inline: "def handler(event, context): return 1"}}
          state: {{volume: {{mountPath: {mount_path}}}}}
    """
    (tmp_path / "notes.yaml").write_text(textwrap.dedent(manifest))
    done = subprocess.run(
        [sys.executable, "-m", "ember.cli", "validate", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode != 0
    assert f"spec.state.volume.mountPath ({mount_path!r}" in done.stdout + done.stderr or (
        f"spec.state.volume.mountPath ({mount_path})" in done.stdout + done.stderr
    )
    assert reason in done.stdout + done.stderr
