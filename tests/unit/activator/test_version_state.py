"""A Version's transitions: its one collection of pods (serving or draining), its phase, and telling its Function.

Plain values on a real event loop (no scaler, no sockets); the scaler driving these is test_scaler.py.
"""

from __future__ import annotations

import asyncio

import pytest

from ember.activator.config import ActivatorConfig
from ember.activator.errors import NotReady
from ember.activator.metrics import Metrics
from ember.activator.registry import Registry
from ember.activator.version_state import Phase, VersionState
from ember.api.function import Function
from ember.pods.base import ClaimKind, PodHandle, PodId, PoolKey

POOL = PoolKey("python3.12", "gvisor", 128, "x")


def _handle(n: int) -> PodHandle:
    return PodHandle(PodId(f"pod-{n}"), f"10.0.0.{n}:8000", POOL, ClaimKind.POOL_HIT)


def _version(registry: Registry, code: str = "def handler(e, c): return 1", **scaling: int) -> VersionState:
    spec = {"runtime": "python3.12", "handler": "main.handler", "code": {"inline": code}, "scaling": scaling}
    vs = registry.apply(Function.model_validate({"metadata": {"name": "f"}, "spec": spec}))
    assert vs is not None
    return vs


@pytest.fixture
def registry() -> Registry:
    return Registry(ActivatorConfig(), Metrics())


def test_a_version_is_ready_at_its_initial_target_and_then_takes_latest(registry: Registry) -> None:
    old = _version(registry)
    old.pod_starting()
    old.pod_ready(_handle(1), now=0.0)
    assert old.phase is Phase.READY
    new = _version(registry, "def handler(e, c): return 2", minScale=2)
    assert new.initial_target == 2
    new.pod_starting()
    new.pod_starting()
    new.pod_ready(_handle(2), now=0.0)
    assert new.phase is Phase.LOADING, "one of two pods: not Ready yet"
    assert registry.get("default", "f").latest() == 1
    new.pod_ready(_handle(3), now=0.0)
    assert new.phase is Phase.READY
    assert registry.get("default", "f").latest() == 2, "the Function was told: latest moved"
    assert (new.ready_pods, new.starting) == (2, 0)


def test_a_lone_start_that_finishes_makes_a_version_ready_below_its_target(registry: Registry) -> None:
    vs = _version(registry, minScale=3)
    vs.pod_starting()
    vs.pod_ready(_handle(1), now=0.0)
    assert vs.phase is Phase.READY, "nothing else is starting: what it has is its capacity"


def test_drained_pods_leave_routing_at_once_and_the_version_once_idle(registry: Registry) -> None:
    vs = _version(registry)
    for n in (1, 2):
        vs.pod_starting()
        vs.pod_ready(_handle(n), now=0.0)
    busy = vs.throttler.try_acquire()
    assert busy is not None
    idle = next(p for p in vs.serving if p is not busy)
    vs.drain(busy)
    vs.pod_lost(idle)
    assert vs.serving == ()
    assert set(vs.draining) == {busy, idle}
    assert vs.throttler.try_acquire() is None, "a draining pod takes no new invocation"
    assert vs.take_drained_idle() == [idle.handle]
    vs.throttler.release(busy)
    assert vs.take_drained_idle() == [busy.handle]
    assert not vs.holds_pods
    vs.pod_lost(busy)  # reported again after it left: nothing to do
    assert vs.draining == ()


def test_a_pod_ready_for_a_failed_version_is_refused(registry: Registry) -> None:
    vs = _version(registry)
    vs.pod_starting()
    assert vs.mark_failed("ImportError: x")
    assert vs.pod_ready(_handle(1), now=0.0) is None
    assert (vs.ready_pods, vs.starting, vs.holds_pods) == (0, 0, False)


async def test_failing_wakes_waiters_once_and_leaves_latest_on_the_ready_version(registry: Registry) -> None:
    old = _version(registry)
    old.pod_starting()
    old.pod_ready(_handle(1), now=0.0)
    new = _version(registry, "def handler(e, c): return 2")
    waiter = asyncio.create_task(new.throttler.acquire())
    await asyncio.sleep(0)
    assert new.queued == 1
    assert new.mark_failed("ImportError: x")
    assert not new.mark_failed("again"), "already Failed: no second transition"
    with pytest.raises(NotReady, match="Version 2 failed to load: ImportError: x"):
        await waiter
    assert new.message == "ImportError: x"
    assert registry.get("default", "f").latest() == 1


def test_start_failures_fail_a_loading_version_only_after_the_attempts(registry: Registry) -> None:
    vs = _version(registry)
    for _ in range(2):
        vs.pod_starting()
        assert not vs.pod_start_failed("refused", code_error=False, max_attempts=3)
    vs.pod_starting()
    assert vs.pod_start_failed("refused", code_error=False, max_attempts=3)
    assert vs.phase is Phase.FAILED


def test_a_pool_shortage_never_fails_a_version(registry: Registry) -> None:
    """No pod to claim (other activators hold the pool's pods) is capacity, not the Version's fault:
    a replica started during a shortage must not fail, for good, a Version the others serve."""
    vs = _version(registry)
    for _ in range(10):
        vs.pod_starting()
        assert not vs.pod_start_failed("no ready generic pod", code_error=False, shortage=True, max_attempts=3)
    assert vs.phase is Phase.LOADING
    assert vs.starting == 0
    vs.pod_starting()  # the count of failures in a row is that of real failures only
    assert not vs.pod_start_failed("refused", code_error=False, max_attempts=2)


def test_bad_code_fails_at_once_and_a_version_without_code_starts_no_pod(registry: Registry) -> None:
    vs = _version(registry)
    vs.pod_starting()
    assert vs.pod_start_failed("SyntaxError: x", code_error=True, max_attempts=3)
    fn = Function.model_validate(
        {
            "metadata": {"name": "g"},
            "spec": {"runtime": "python3.12", "handler": "main.handler", "code": {"configMapRef": {"name": "cm"}}},
        }
    )
    without_code = registry.apply(fn)
    assert without_code is not None
    with pytest.raises(RuntimeError, match="has no code to load"):
        without_code.pod_starting()
