"""The operator's half of right-sizing: an activator's report (`ember.run/sizing`) becomes a Version's
`status.recommendation` and `status.resources`, a change of size makes the pool of the new size, and
a report that cannot be read changes nothing and crashes nothing.

Reconcilers against `FakeKube` (tests/unit/controller/fake_kube.py); the pure rules are
tests/unit/scaling/test_rightsize.py, a real API server and cluster tests/cluster/test_rightsize_cluster.py.
"""

from __future__ import annotations

import json
from typing import Any, cast

import pytest

from ember.api.security_policy import DEFAULT_POLICY, policy_hash
from ember.controller.function import reconcile_function
from ember.controller.version import reconcile_version
from ember.resources.labels import SIZING_ANNOTATION
from ember.resources.pool import pool_id, pool_name
from tests.unit.controller.fake_kube import FakeKube
from tests.unit.controller.test_reconcile import NOW, NS, SETTINGS, Events, Obj, _fn_body, _with_version

REPORT = json.dumps({"memoryMiB": 256, "cpuMillicores": 100, "samples": 40, "peakMiB": 220, "reason": "measured"})


def _version(kube: FakeKube, **resources: Any) -> Obj:
    fn = kube.add("functions", _fn_body(resources={"memoryMiB": 1024, **resources}))
    _with_version(kube, fn, 1, ready=True)
    return kube.custom[("versions", NS, "hello-v1")]


def _pool(memory_mib: int) -> str:
    key = pool_id(
        runtime="python3.12", sandbox="gvisor", memory_mib=memory_mib, policy_hash=policy_hash(DEFAULT_POLICY)
    )
    return pool_name(key)


async def _reconcile(kube: FakeKube, version: Obj, events: Events | None = None) -> Obj:
    status = await reconcile_version(cast(Any, kube), SETTINGS, version, now=NOW, record=events or Events())
    version["status"] = {**version.get("status", {}), **status}
    return status


async def test_a_report_becomes_the_recommendation_and_with_auto_resize_the_size_of_new_pods() -> None:
    kube = FakeKube()
    version = _version(kube, autoResize=True)
    status = await _reconcile(kube, version)
    assert status["resources"] == {
        "memoryMiB": 1024,
        "reason": "spec.resources.memoryMiB, until autoResize has measured enough invocations",
    }
    assert "recommendation" not in status
    version["metadata"]["annotations"][SIZING_ANNOTATION] = REPORT
    events = Events()
    kube.writes.clear()
    status = await _reconcile(kube, version, events)
    assert status["recommendation"]["memoryMiB"] == 256
    assert status["resources"] == {"memoryMiB": 256, "reason": "autoResize: measured"}
    assert "Resized" in events.reasons
    assert kube.writes == ["status versions/hello-v1", "annotate functions/hello"], "stored, then the Function nudged"


async def test_without_auto_resize_the_recommendation_is_shown_and_the_spec_size_stays() -> None:
    kube = FakeKube()
    version = _version(kube)
    version["metadata"]["annotations"][SIZING_ANNOTATION] = REPORT
    status = await _reconcile(kube, version)
    assert status["recommendation"]["memoryMiB"] == 256
    assert status["resources"]["memoryMiB"] == 1024


async def test_the_largest_out_of_memory_size_of_any_activator_is_kept() -> None:
    kube = FakeKube()
    version = _version(kube, autoResize=True)
    version["metadata"]["annotations"][SIZING_ANNOTATION] = json.dumps(
        {"memoryMiB": 512, "outOfMemoryAtMiB": 256, "reason": "out of memory at 256 MiB: doubled"}
    )
    await _reconcile(kube, version)
    # another activator, which saw no kill, reports less
    version["metadata"]["annotations"][SIZING_ANNOTATION] = json.dumps({"memoryMiB": 128, "reason": "measured"})
    status = await _reconcile(kube, version)
    assert status["recommendation"]["outOfMemoryAtMiB"] == 256
    assert status["resources"]["memoryMiB"] == 260


@pytest.mark.parametrize(
    "report",
    [
        pytest.param("not json", id="not-json"),
        pytest.param("[256]", id="a-list"),
        pytest.param('{"memoryMiB": 16}', id="below-64"),
        pytest.param('{"memoryMiB": 100000}', id="above-10240"),
        pytest.param('{"memoryMiB": true}', id="a-bool"),
        pytest.param('{"memoryMiB": 256, "rm": "-rf"}', id="unknown-field"),
        pytest.param('{"memoryMiB": 256, "reason": "' + "x" * 3000 + '"}', id="too-long"),
        pytest.param("", id="empty"),
    ],
)
async def test_a_report_that_cannot_be_read_changes_nothing(report: str) -> None:
    kube = FakeKube()
    version = _version(kube, autoResize=True)
    version["metadata"]["annotations"][SIZING_ANNOTATION] = REPORT
    await _reconcile(kube, version)
    version["metadata"]["annotations"][SIZING_ANNOTATION] = report
    status = await _reconcile(kube, version)
    assert status["recommendation"]["memoryMiB"] == 256, "the stored advice stays"
    assert status["resources"]["memoryMiB"] == 256


async def test_a_stored_status_that_cannot_be_read_is_written_anew() -> None:
    kube = FakeKube()
    version = _version(kube, autoResize=True)
    version["status"]["recommendation"] = {"memoryMiB": "lots"}
    version["status"]["resources"] = "garbled"
    status = await _reconcile(kube, version)
    assert "recommendation" not in status
    assert status["resources"]["memoryMiB"] == 1024


async def test_the_pool_follows_the_recommendation_with_auto_resize() -> None:
    kube = FakeKube()
    version = _version(kube, autoResize=True)
    fn = kube.custom[("functions", NS, "hello")]
    await reconcile_function(cast(Any, kube), SETTINGS, fn, now=NOW, record=Events())
    assert (NS, _pool(1024)) in kube.deployments
    version["metadata"]["annotations"][SIZING_ANNOTATION] = REPORT
    await _reconcile(kube, version)
    events = Events()
    await reconcile_function(cast(Any, kube), SETTINGS, fn, now=NOW, record=events)
    assert (NS, _pool(256)) in kube.deployments
    assert (NS, _pool(1024)) not in kube.deployments, "no serving Version wants the old size"
    container = kube.deployments[(NS, _pool(256))]["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["memory"] == "256Mi"
