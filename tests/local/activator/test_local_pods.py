"""`LocalPodSource` on its own: real agent processes in the real sandboxes installed here.

Covers pool hits and misses, background refill, bad code (the pod stays generic), watching a
Version's endpoints, release, and that code really runs inside gVisor / bubblewrap.
"""

from __future__ import annotations

import asyncio
import os
import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from ember.api.function import Function
from ember.pods.base import ClaimKind, PodHandle, PoolKey, SpecializeFailed, VersionKey
from ember.pods.local import LocalPodSource, Sandbox, agent_session, detect_sandbox
from ember.pods.local.sandbox import CGROUP_ROOT
from ember.pods.payload import specialize_request

_HERE = Path(__file__).resolve().parts
BOUND_FROM_TMP = {_HERE[2]} if _HERE[1] == "tmp" else set()
POOL = PoolKey("python3.11", "gvisor", 128, "test")
PROBE = """
import os
def handler(event, context):
    with open("/proc/version") as f:
        kernel = f.read()
    return {"kernel": kernel, "uid": os.getuid(), "tmp": sorted(os.listdir("/tmp"))}
"""


def _request(code: str, number: int = 1) -> object:
    fn = Function.model_validate(
        {
            "metadata": {"name": "probe"},
            "spec": {"runtime": "python3.11", "handler": "main.handler", "code": {"inline": code}},
        }
    )
    return specialize_request(VersionKey("default", "probe", number), fn.spec, "sha256:" + f"{number:064x}")


@pytest.fixture
async def source() -> AsyncIterator[LocalPodSource]:
    src = LocalPodSource()
    try:
        yield src
    finally:
        pids = src.running_pids()
        await src.close()
        assert src.running_pids() == []
        assert [p for p in pids if _not_zombie(p)] == []
        # nothing of the pods is left: no folder, no mount (runsc binds a network namespace there)
        assert _left_of(str(src._places)) == []


def _left_of(places: str) -> list[str]:
    """The pods' folder if it is still there, and every mount still under it."""
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f if places in line]
    return ([places] if os.path.exists(places) else []) + mounts


def _not_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def _invoke(pod: PodHandle) -> dict[str, object]:
    """Invoke a pod's agent directly, with the token its specialize bound (CONTRACT.md)."""
    auth = {"Authorization": pod.authorization}
    async with (
        agent_session(pod.address) as http,
        http.post("http://agent/v1/invoke", data=b"{}", headers=auth) as r,
    ):
        assert r.status == 200
        return dict(await r.json())


async def _until(predicate, timeout_s: float = 30) -> None:  # type: ignore[no-untyped-def]
    async with asyncio.timeout(timeout_s):
        while not predicate():  # noqa: ASYNC110 - polling state the source exposes
            await asyncio.sleep(0.02)


async def test_claim_is_a_miss_on_an_empty_pool_then_hits_after_refill(source: LocalPodSource) -> None:
    cold = await source.claim(POOL)
    assert cold.claim is ClaimKind.POOL_MISS
    await source.ensure_pool(POOL, 2)
    await _until(lambda: source.warm_pods().get(POOL) == 2)
    warm = await source.claim(POOL)
    assert warm.claim is ClaimKind.POOL_HIT
    await _until(lambda: source.warm_pods().get(POOL) == 2)  # refilled in the background
    await source.release(cold)
    await source.release(warm)
    await source.ensure_pool(POOL, 0)
    assert source.warm_pods().get(POOL) == 0


async def test_expected_claims_keep_more_generic_pods_warm_until_they_are_no_longer_expected(
    source: LocalPodSource,
) -> None:
    await source.ensure_pool(POOL, 1)
    await _until(lambda: source.warm_pods().get(POOL) == 1)
    source.expect_claims({POOL: 2})  # the predictor's prewarms due soon
    await _until(lambda: source.warm_pods().get(POOL) == 3)
    handle = await source.claim(POOL)
    assert handle.claim is ClaimKind.POOL_HIT
    await _until(lambda: source.warm_pods().get(POOL) == 3)  # refilled to floor + expected
    source.expect_claims({})
    await _until(lambda: source.warm_pods().get(POOL) == 1)
    await source.release(handle)


async def test_specialize_runs_code_inside_the_sandbox(source: LocalPodSource) -> None:
    pod = await source.specialize(await source.claim(POOL), _request(PROBE))  # type: ignore[arg-type]
    result = await _invoke(pod)
    if source.sandbox.kind is Sandbox.RUNSC:
        # gVisor's own kernel answers, not the host's
        assert "4.4.0" in str(result["kernel"]) or "gvisor" in str(result["kernel"])  # Debian's, newer ones
        assert os.uname().release not in str(result["kernel"])
    elif source.sandbox.kind is Sandbox.BWRAP:
        assert all(str(name).startswith("ember") for name in result["tmp"])  # type: ignore[attr-defined]
    assert pod.version == VersionKey("default", "probe", 1)
    assert [p.id for p in source.endpoints(pod.version)] == [pod.id]


async def test_bad_code_fails_specialize_and_leaves_the_pod_generic(source: LocalPodSource) -> None:
    pod = await source.claim(POOL)
    with pytest.raises(SpecializeFailed) as info:
        await source.specialize(pod, _request("def handler(:\n"))  # type: ignore[arg-type]
    assert info.value.is_code_error
    assert info.value.status == 422
    good = await source.specialize(pod, _request("def handler(e, c):\n    return 7\n", 2))  # type: ignore[arg-type]
    assert good.token == pod.token  # the failed specialize bound it: the same pod, the same token
    auth = {"Authorization": good.authorization}
    async with agent_session(good.address) as http, http.post("http://agent/v1/invoke", headers=auth) as r:
        assert await r.json() == 7


async def test_watch_reports_added_and_lost_pods(source: LocalPodSource) -> None:
    version = VersionKey("default", "probe", 1)
    seen: list[int] = []

    async def watch() -> None:
        async for endpoints in source.watch(version):
            seen.append(len(endpoints))
            if seen[-2:] == [1, 0]:
                return

    watcher = asyncio.create_task(watch())
    pod = await source.specialize(await source.claim(POOL), _request(PROBE))  # type: ignore[arg-type]
    await _until(lambda: 1 in seen)
    os.kill(source.pods()[pod.id].pid, 9)
    await asyncio.wait_for(watcher, 10)
    assert seen[0] == 0
    assert seen[-2:] == [1, 0]
    assert source.endpoints(version) == []


async def test_bubblewrap_sandbox_serves() -> None:
    src = LocalPodSource(sandbox=detect_sandbox({"EMBER_SANDBOX": "bwrap"}))
    try:
        pod = await src.specialize(await src.claim(POOL), _request(PROBE))  # type: ignore[arg-type]
        result = await _invoke(pod)
        # bwrap's private /tmp holds only what the agent made (and this checkout, when it lives under
        # /tmp and is bound back so the agent can run), not the host's files
        assert all(str(name).startswith("ember") or name in BOUND_FROM_TMP for name in result["tmp"])  # type: ignore[attr-defined]
        assert os.listdir("/tmp")
    finally:
        await src.close()
    assert src.running_pids() == []


def test_sandbox_choice_follows_the_environment() -> None:
    with pytest.raises(ValueError, match="EMBER_SANDBOX='docker': must be one of runsc, bwrap, none"):
        detect_sandbox({"EMBER_SANDBOX": "docker"})
    with pytest.raises(ValueError, match="is not an executable file"):
        detect_sandbox({"EMBER_RUNSC": "/nonexistent/runsc"})
    plain = detect_sandbox({"EMBER_SANDBOX": "none"})
    assert plain.kind is Sandbox.NONE
    assert not plain.isolated
    assert "NOT ISOLATED" in plain.note


def test_bubblewrap_binds_back_an_agent_that_lives_under_tmp(tmp_path: object) -> None:
    from pathlib import Path

    from ember.pods.base import Isolation
    from ember.pods.local import SandboxChoice, sandboxed
    from ember.pods.local.sandbox import PodPlace

    agent = Path(str(tmp_path)) / "runtime-images" / "python" / "agent.py"
    command = sandboxed(
        SandboxChoice(Sandbox.BWRAP, "/usr/bin/bwrap", ""),
        ["/usr/bin/python3", str(agent)],
        {},
        PodPlace(Path(str(tmp_path)) / "pod", "pod"),
        memory_mib=128,
        isolation=Isolation(),
    )
    # Only the agent's own folder, read-only, after the private /tmp: never the whole checkout.
    binds = [command[i : i + 3] for i in range(len(command))]
    assert ["--ro-bind", str(agent.parent), str(agent.parent)] in binds
    root = "/tmp/" + Path(str(tmp_path)).relative_to("/tmp").parts[0]
    assert ["--ro-bind", root, root] not in binds


@pytest.mark.skipif(os.geteuid() != 0, reason="bubblewrap sandboxes have cgroups of their own only as root")
async def test_nothing_left_in_a_bubblewrap_pods_cgroups_outlives_its_release() -> None:
    """What outlives a pod's process in its cgroups (bwrap's init, when its outer process died
    and its parent-death signal did not hold) is part of its sandbox: released, it is killed.
    A process of the test, moved into the pod's cgroups, stands for that straggler."""
    src = LocalPodSource(sandbox=detect_sandbox({"EMBER_SANDBOX": "bwrap"}))
    straggler = await asyncio.create_subprocess_exec("sleep", "600")
    try:
        pod = await src.claim(POOL)
        place = src._pod_places[pod.id]
        groups = [g for g in (*CGROUP_ROOT.glob(f"*/{place.name}"), CGROUP_ROOT / place.name) if g.is_dir()]
        assert groups, f"no cgroup of pod {pod.id}"
        for group in groups:
            (group / "cgroup.procs").write_text(str(straggler.pid))
        await src.release(pod)
        assert await asyncio.wait_for(straggler.wait(), 10) == -signal.SIGKILL
        await _until(lambda: not any(g.exists() for g in groups), timeout_s=10)
    finally:
        if straggler.returncode is None:
            straggler.kill()
            await straggler.wait()
        await src.close()
