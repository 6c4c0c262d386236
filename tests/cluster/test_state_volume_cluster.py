"""Cluster tier: `spec.state.volume` on the real node (real API server, PV binder, kubelet, gVisor pods).

The node has no dynamic provisioner: the test makes a hostPath PersistentVolume, ReadWriteMany, of
a StorageClass name of its own, after the Function that asks for it. Until then the Function's
claim is Pending, and its `StateVolumeReady` condition says so; once the volume binds, the
condition turns True (the claim's watch runs the Function again), and the pool's pods, which mount
the claim, start. A file one pod writes is read by another pod of the Function (two invocations at
once, concurrency 1) and by the pods of its next Version; the claim is the Function's, and is kept
across the Version change. The operator and an activator run as host processes. The claim's
builder and the reconcile's table are tests/unit/; the same in local mode is
tests/local/activator/test_state_volume.py.
"""

from __future__ import annotations

import asyncio
import json
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.apiserver.operator_harness import Ember, OperatorProcess, condition, eventually
from tests.cluster.scenarios import ActivatorProcess

NOTES = textwrap.dedent(
    """
    import os, time, uuid

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
)
CLAIM = "ember-state-notes"


@pytest.fixture
def storage_class(ember_ns: Ember) -> str:
    """A StorageClass name no other test's volume has (no StorageClass object: static binding)."""
    return f"ember-test-{ember_ns.ns}"


@pytest.fixture
def host_folder(tmp_path: Path) -> Path:
    """The PersistentVolume's folder on the node, writable by the pods' user (hostPath gets no fsGroup)."""
    folder = tmp_path / "volume"
    folder.mkdir()
    folder.chmod(0o777)
    return folder


@pytest.fixture
def persistent_volume(api_client: Any, storage_class: str, host_folder: Path) -> Iterator[dict[str, Any]]:
    """The body of the hostPath PersistentVolume the test creates when it wants to; deleted afterwards."""
    body: dict[str, Any] = {
        "metadata": {"name": storage_class},
        "spec": {
            "capacity": {"storage": "1Gi"},
            "accessModes": ["ReadWriteMany"],
            "storageClassName": storage_class,
            "persistentVolumeReclaimPolicy": "Retain",
            "hostPath": {"path": str(host_folder), "type": "Directory"},
        },
    }
    try:
        yield body
    finally:
        try:
            client.CoreV1Api(api_client).delete_persistent_volume(storage_class)
        except ApiException as err:
            if err.status != 404:
                raise


async def _invoke(http: aiohttp.ClientSession, url: str, event: dict[str, Any]) -> dict[str, Any]:
    async with http.post(url, data=json.dumps(event)) as response:
        body = await response.read()
        assert response.status == 200, body
        assert "X-Ember-Function-Error" not in response.headers, body
        return dict(json.loads(body))


def _claim(ember: Ember) -> Any:
    return ember.core.read_namespaced_persistent_volume_claim(CLAIM, ember.ns)


async def test_two_pods_and_two_versions_of_a_function_share_its_volume(
    ember_ns: Ember,
    operator: OperatorProcess,
    activator: ActivatorProcess,
    api_client: Any,
    storage_class: str,
    host_folder: Path,
    persistent_volume: dict[str, Any],
) -> None:
    ember = ember_ns
    spec: dict[str, Any] = {
        "runtime": "python3.12",
        "handler": "main.handler",
        "code": {"inline": NOTES},
        "timeoutSeconds": 30,
        "scaling": {"maxScale": 2},
        "state": {"volume": {"sizeMiB": 64, "mountPath": "/mnt/state", "storageClassName": storage_class}},
    }
    ember.create("functions", {"kind": "Function", "metadata": {"name": "notes"}, "spec": spec})

    def claim_pending() -> dict[str, Any] | None:
        found = condition(ember.get("functions", "notes"), "StateVolumeReady")
        return found if found.get("reason") == "ClaimPending" else None

    # no volume yet: the claim waits, and the Function says so
    pending = await asyncio.to_thread(eventually, claim_pending, timeout_s=60, what="StateVolumeReady ClaimPending")
    assert pending["status"] == "Unknown"
    assert CLAIM in pending["message"]
    assert "Pending" in pending["message"]
    claim = _claim(ember)
    assert claim.spec.access_modes == ["ReadWriteMany"]
    assert claim.spec.storage_class_name == storage_class
    assert [(o.kind, o.name) for o in claim.metadata.owner_references] == [("Function", "notes")]
    pools = ember.pools()
    assert pools, "no pool"
    mounted = [
        v.persistent_volume_claim.claim_name
        for d in pools.values()
        for v in d.spec.template.spec.volumes
        if v.persistent_volume_claim is not None
    ]
    assert mounted == [CLAIM]

    client.CoreV1Api(api_client).create_persistent_volume(persistent_volume)
    await asyncio.to_thread(
        eventually,
        lambda: condition(ember.get("functions", "notes"), "StateVolumeReady").get("status") == "True",
        timeout_s=120,
        what="StateVolumeReady True once the volume binds",
    )
    await asyncio.to_thread(
        eventually,
        lambda: condition(ember.get("functions", "notes"), "Ready").get("status") == "True",
        timeout_s=240,
        what="Function Ready",
    )
    url = f"{activator.url}/v1/namespaces/{ember.ns}/functions/notes/invoke"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as http:
        first = await _invoke(http, url, {"write": "hello"})
        assert first["text"] == "hello\n"
        assert first["uid"] != 0
        # concurrency 1: two invocations at once need two pods
        replies = await asyncio.gather(*(_invoke(http, url, {"sleep": 3}) for _ in range(2)))
        assert len({r["pod"] for r in replies}) == 2, replies
        assert [r["text"] for r in replies] == ["hello\n", "hello\n"]
        assert (host_folder / "notes.txt").read_text() == "hello\n"

        # a Version change: the claim stays, and the new Version's pods see the file
        uid = _claim(ember).metadata.uid
        ember.patch("functions", "notes", {"spec": {"env": {"EDITION": "2"}}})
        for _ in range(600):
            reply = await _invoke(http, url, {})
            if reply["version"] == "2":
                break
            await asyncio.sleep(0.2)
        else:
            raise AssertionError("Version 2 did not serve")
        second = await _invoke(http, url, {"write": "again"})
    assert second["text"] == "hello\nagain\n"
    assert _claim(ember).metadata.uid == uid
    assert (host_folder / "notes.txt").read_text() == "hello\nagain\n"
