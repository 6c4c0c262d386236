"""Where pods come from: the one interface the activator (and the operator) use to get pods.

A *pod* is one sandbox running the runtime agent (a Kubernetes pod, or a local process in
gVisor). Pods start **generic** in a warm pool keyed by `PoolKey` (runtime, sandbox, size,
policy) and hold no code. The activator `claim`s one when a Version needs capacity (a pool
hit, or a cold start when the pool is empty), `specialize`s it with the Version's code, routes
invocations to its `address`, and `release`s it when idle. Pods of a Version can be listed and
watched, so that a pod that dies leaves the routing table.

Everything above this module (routing, scaling, versions) only knows these types; the two
implementations are `ember.pods.local` (processes) and `ember.pods.kubernetes` (pods).
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NewType, Protocol

PodId = NewType("PodId", str)


@dataclass(frozen=True, slots=True)
class PoolKey:
    """Pods are interchangeable only within one pool: same runtime, sandbox, size and policy."""

    runtime: str
    sandbox: str
    memory_mib: int
    policy_hash: str

    def __str__(self) -> str:
        return f"{self.runtime}/{self.sandbox}/{self.memory_mib}Mi/{self.policy_hash[:12]}"


@dataclass(frozen=True, slots=True)
class VersionKey:
    """One Version of one Function."""

    namespace: str
    function: str
    number: int

    def __str__(self) -> str:
        return f"{self.namespace}/{self.function}@{self.number}"


class ClaimKind(enum.Enum):
    """How a claimed pod was obtained; cold-start metrics are split by it."""

    POOL_HIT = "pool_hit"
    POOL_MISS = "pool_miss"


@dataclass(frozen=True, slots=True)
class PodHandle:
    """A claimed pod: where its agent listens, and the Version it serves once specialized."""

    id: PodId
    address: str  # host:port of the runtime agent
    pool: PoolKey
    claim: ClaimKind
    version: VersionKey | None = None
    concurrency: int = 1


@dataclass(frozen=True, slots=True)
class SpecializeRequest:
    """What a pod needs to load a Version: the agent's `/v1/specialize` body (see CONTRACT.md)."""

    version: VersionKey
    code_hash: str
    payload: Mapping[str, Any]
    concurrency: int


class PodSourceError(Exception):
    """Base of the errors a pod source raises."""


class PoolUnavailable(PodSourceError):
    """No pod could be had for a pool (start failed, or the source is closing)."""


class SpecializeFailed(PodSourceError):
    """The agent refused the Version's code; the pod stays generic (or is gone)."""

    def __init__(self, pod: PodId, status: int, error_type: str, message: str) -> None:
        self.pod = pod
        self.status = status
        self.error_type = error_type
        self.message = message
        super().__init__(f"pod {pod}: specialize failed with {status} {error_type}: {message}")

    @property
    def is_code_error(self) -> bool:
        """True when the code itself is bad (422/400): retrying on another pod will not help."""
        return self.status in (400, 409, 422)


class PodGone(PodSourceError):
    """The pod died or was released while being used."""


class PodSource(Protocol):
    """Claim, specialize, release and list pods; implementations own the pods' lifecycle."""

    async def claim(self, pool: PoolKey) -> PodHandle:
        """A generic pod of the pool, taken out of it: warm when one is ready, else started now."""
        ...

    async def specialize(self, pod: PodHandle, request: SpecializeRequest) -> PodHandle:
        """Load a Version into a claimed pod; the returned handle carries the Version."""
        ...

    async def release(self, pod: PodHandle) -> None:
        """Stop a claimed pod; idempotent."""
        ...

    def endpoints(self, version: VersionKey) -> Sequence[PodHandle]:
        """Live specialized pods of a Version."""
        ...

    def watch(self, version: VersionKey) -> AsyncIterator[Sequence[PodHandle]]:
        """The Version's live pods now, then again after every change (a pod added or lost)."""
        ...

    def warm_pods(self) -> Mapping[PoolKey, int]:
        """Generic pods ready to be claimed, per pool (for metrics)."""
        ...

    async def ensure_pool(self, pool: PoolKey, size: int) -> None:
        """Keep `size` generic pods warm in the pool (0 lets it drain)."""
        ...

    async def report_load_failure(self, version: VersionKey, *, code_hash: str, message: str) -> None:
        """Make a Version's failed load visible where its status lives (the API server; nowhere locally).

        Loads that succeed need no report: the Version's specialized pods are the evidence."""
        ...

    async def close(self) -> None:
        """Stop every pod this source started."""
        ...
