"""Fakes of the activator's unit tier: a pod source whose claims and specializations finish at once, a clock.

`World` wires the real Registry and Scaler over them, as `make_app` does, without sockets or processes.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, cast

from ember.activator.agent_client import AgentClient
from ember.activator.config import ActivatorConfig
from ember.activator.metrics import Metrics
from ember.activator.registry import Registry
from ember.activator.scaler import Scaler
from ember.activator.throttler import PodSlots
from ember.activator.version_state import VersionState
from ember.activator.wake import Wakeup
from ember.api.function import Function
from ember.pods.base import (
    ClaimKind,
    MemoryKills,
    PodHandle,
    PodId,
    PodSource,
    PodSourceError,
    PoolKey,
    Portal,
    SpecializeFailed,
    SpecializeRequest,
    StateHandler,
    VersionKey,
)

QUEUE_DEPTH = 4


@dataclass(frozen=True, slots=True)
class LoadFailureReport:
    version: VersionKey
    code_hash: str
    message: str


@dataclass
class FakePods:
    """Every claim succeeds at once; specializing refuses the code of `bad_code` (422) or fails `flaky` times."""

    bad_code: set[VersionKey] = field(default_factory=set)
    flaky: int = 0
    live: dict[PodId, PodHandle] = field(default_factory=dict)
    released: list[PodId] = field(default_factory=list)
    reports: list[LoadFailureReport] = field(default_factory=list)
    kills: dict[VersionKey, MemoryKills] = field(default_factory=dict)  # memory_kills answers these
    sizing_reports: list[tuple[VersionKey, str]] = field(default_factory=list)
    expected: dict[PoolKey, int] = field(default_factory=dict)  # the scaler's last expect_claims
    _claims: int = 0

    async def claim(self, pool: PoolKey) -> PodHandle:
        self._claims += 1
        return PodHandle(PodId(f"pod-{self._claims}"), f"10.0.0.{self._claims}:8000", pool, ClaimKind.POOL_HIT)

    async def specialize(self, pod: PodHandle, request: SpecializeRequest) -> PodHandle:
        if request.version in self.bad_code:
            raise SpecializeFailed(pod.id, 422, "ImportError", "No module named 'nope'")
        if self.flaky > 0:
            self.flaky -= 1
            raise PodSourceError(f"pod {pod.id}: connection refused")
        handle = replace(pod, version=request.version, concurrency=request.concurrency)
        self.live[handle.id] = handle
        return handle

    async def release(self, pod: PodHandle) -> None:
        self.live.pop(pod.id, None)
        self.released.append(pod.id)

    def endpoints(self, version: VersionKey) -> Sequence[PodHandle]:
        return [h for h in self.live.values() if h.version == version]

    async def watch(self, version: VersionKey) -> AsyncIterator[Sequence[PodHandle]]:
        yield self.endpoints(version)

    def warm_pods(self) -> Mapping[PoolKey, int]:
        return {}

    discarded_bound = 0

    async def ensure_pool(self, pool: PoolKey, size: int) -> None:
        return None

    def expect_claims(self, claims: Mapping[PoolKey, int]) -> None:
        self.expected = dict(claims)

    def route_calls(self, portal: Portal) -> None:
        self.portal = portal

    def route_state(self, handler: StateHandler) -> None:
        self.state = handler

    async def report_load_failure(self, version: VersionKey, *, code_hash: str, message: str) -> None:
        await asyncio.sleep(0)  # as a real API call, it yields to the loop
        self.reports.append(LoadFailureReport(version, code_hash, message))

    def memory_kills(self, version: VersionKey) -> MemoryKills:
        return self.kills.get(version, MemoryKills())

    def sandbox_overhead_mib(self, pool: PoolKey) -> int:
        return 30

    async def report_sizing(self, version: VersionKey, *, report: str) -> None:
        await asyncio.sleep(0)
        self.sizing_reports.append((version, report))

    async def close(self) -> None:
        return None


class FakeAgents:
    """Agents that answer every control request (`/v1/freeze`) with `answers[path]` (200
    by default; an exception is raised instead), and record them."""

    def __init__(self) -> None:
        self.controls: list[tuple[str, str]] = []  # (pod address, path)
        self.answers: dict[str, int | Exception] = {}
        self.forgotten: list[str] = []
        self.preconnected: list[str] = []

    async def preconnect(self, address: str) -> None:
        self.preconnected.append(address)

    def forget(self, address: str) -> None:
        self.forgotten.append(address)

    async def control(self, pod: PodSlots, path: str, *, timeout_s: float) -> tuple[int, bytes]:
        await asyncio.sleep(0)  # as a real request, it yields to the loop
        self.controls.append((pod.address, path))
        answer = self.answers.get(path, 200)
        if isinstance(answer, Exception):
            raise answer
        return answer, b"{}"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class World:
    """A registry and scaler over fake pods, with the live replica count settable."""

    def __init__(self, replicas: int = 1, *, pods: FakePods | None = None, load_attempts: int = 3) -> None:
        self.replicas = replicas
        self.clock = Clock()
        self.pods = pods or FakePods()
        config = ActivatorConfig(queue_depth=QUEUE_DEPTH, warm_pool_size=0, load_attempts=load_attempts)
        metrics = self.metrics = Metrics()
        wakeup = Wakeup()
        self.registry = Registry(config, metrics, clock=self.clock, wake=wakeup, replicas=lambda: self.replicas)
        self.agents = FakeAgents()
        self.scaler = Scaler(
            self.registry,
            cast(PodSource, self.pods),
            config,
            metrics,
            cast(AgentClient, self.agents),
            clock=self.clock,
            replicas=lambda: self.replicas,
            wakeup=wakeup,
        )

    def function(self, code: str = "def handler(e, c): return 1", **scaling: int | bool) -> VersionState:
        spec: dict[str, Any] = {
            "runtime": "python3.12",
            "handler": "main.handler",
            "code": {"inline": code},
            "concurrency": 1,
            "scaling": scaling,
        }
        vs = self.registry.apply(Function.model_validate({"metadata": {"name": "f"}, "spec": spec}))
        assert vs is not None
        return vs

    async def step(self) -> None:
        """One scaling step, then every pod start, release or report it spawned runs to its end."""
        self.clock.now += 0.25
        await self.scaler.step()
        while self.scaler._tasks:
            await asyncio.gather(*self.scaler._tasks)
            # The tasks leave the set in their done callbacks, which run on the next loop turn; awaiting
            # already-done tasks never yields (a busy loop on Python 3.12), so give the loop that turn.
            await asyncio.sleep(0)
