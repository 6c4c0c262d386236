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
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NewType, Protocol

from aiohttp import web

from ember.resources.state_volume import StateMount

PodId = NewType("PodId", str)
# (calling pod, portion name, the request) -> the reply: where the services proxy sends portion
# calls (`ember.activator.portions.PortionPortal`)
Portal = Callable[[PodId, str, web.BaseRequest], Awaitable[web.StreamResponse]]
# Serves one key-value state operation of a pod's code for a Function's scope ("<namespace>/<function>",
# `ember.state.http.handle` over the activator's store)
StateHandler = Callable[[str, web.BaseRequest], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class ServiceRoute:
    """One auxiliary service of a pool's SecurityPolicy (`spec.services[]`), as the services proxy
    applies it (`ember.pods.services`): where calls go, which credential they carry, and what
    they may ask. Empty `methods` or `path_prefixes` allow any."""

    name: str
    url: str
    header: str = "Authorization"
    secret_name: str | None = None  # the Secret (in the Function's namespace) holding the credential
    secret_key: str | None = None
    methods: tuple[str, ...] = ()
    path_prefixes: tuple[str, ...] = ()

    @property
    def env_name(self) -> str:
        """The variable that announces the service's URL to function code."""
        return f"EMBER_SERVICE_{self.name.upper().replace('-', '_')}_URL"


@dataclass(frozen=True, slots=True)
class AllowedNetwork:
    """One `cidr` entry of a policy's egress allow-list: all protocols, or TCP to `ports` (and UDP
    to 53 when they list it, `ember.api.security_policy.DNS_PORT`)."""

    cidr: str
    ports: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Isolation:
    """What a pool's SecurityPolicy asks of each of its sandboxes, as a local sandbox applies it
    (`ember.pods.local.sandbox`; a cluster's pool Deployment carries the whole policy instead)."""

    network: bool = False  # False: egress `none`, a network namespace of its own (loopback only)
    allow: tuple[AllowedNetwork, ...] = ()  # with `network`: the allow-list's cidrs (host names stay denied)
    tmp_size_mib: int = 64
    pids: int = 256  # the policy's limits.pids (a runsc sandbox's host-task backstop follows it)
    services: tuple[ServiceRoute, ...] = ()  # the policy's auxiliary services


@dataclass(frozen=True, slots=True)
class PoolKey:
    """Pods are interchangeable only within one pool: same runtime, sandbox, size and policy.

    `isolation` follows from the policy, which `policy_hash` already names: it is carried for
    the pod source, not compared."""

    runtime: str
    sandbox: str
    memory_mib: int
    policy_hash: str
    isolation: Isolation = field(default=Isolation(), compare=False)
    # its pods' code calls portions (`ember.resources.portions`): each pod gets a channel to Ember
    calls: bool = False
    # `resources.cpuMillicores`: a CPU bound of its own (None: proportional to memory in a cluster,
    # unbounded in local mode)
    cpu_millicores: int | None = None
    # `state.keyValue`: its pods' code reaches the Function's key-value state (`ember.state`) through
    # a channel to Ember, whatever the policy's egress
    key_value: bool = False
    # `state.volume`: its pods mount the Function's volume read-write (a cluster: its claim; local
    # mode: a folder per Function), so they serve that Function alone
    volume: StateMount | None = None

    def __str__(self) -> str:
        calls = "/calls" if self.calls else ""
        cpu = f"/{self.cpu_millicores}m" if self.cpu_millicores is not None else ""
        kv = "/kv" if self.key_value else ""
        volume = f"/{self.volume}" if self.volume is not None else ""
        return f"{self.runtime}/{self.sandbox}/{self.memory_mib}Mi{cpu}/{self.policy_hash[:12]}{calls}{kv}{volume}"

    @property
    def channel(self) -> bool:
        """Whether its pods reach Ember's services proxy (auxiliary services, portion calls,
        key-value state)."""
        return self.calls or self.key_value or bool(self.isolation.services)


@dataclass(frozen=True, slots=True)
class VersionKey:
    """One Version of one Function."""

    namespace: str
    function: str
    number: int
    portion: str = ""  # one of the Version's portions (`ember.resources.portions`); "" the Function itself

    def __str__(self) -> str:
        part = f"/{self.portion}" if self.portion else ""
        return f"{self.namespace}/{self.function}@{self.number}{part}"

    @property
    def state_scope(self) -> str:
        """The Function's key-value state, shared by all its Versions and portions (`ember.state`)."""
        return f"{self.namespace}/{self.function}"


@dataclass(frozen=True, slots=True)
class MemoryKills:
    """A Version's pods a pod source saw killed at their memory bound (`PodSource.memory_kills`):
    how many so far, and the largest pod size (MiB) among them."""

    count: int = 0
    largest_mib: int = 0

    def plus(self, memory_mib: int) -> MemoryKills:
        """These kills and one more, of a pod of `memory_mib`."""
        return MemoryKills(self.count + 1, max(self.largest_mib, memory_mib))


class ClaimKind(enum.Enum):
    """How a claimed pod was obtained; cold-start metrics are split by it."""

    POOL_HIT = "pool_hit"
    POOL_MISS = "pool_miss"


@dataclass(frozen=True, slots=True)
class PodHandle:
    """A claimed pod: where its agent listens, the Version it serves once specialized, and the
    bearer token its agent binds at specialize (CONTRACT.md, Authentication).

    The source makes a fresh `token` per claim (`new_agent_token`); the agent then answers only
    requests that carry it, so a pod some other client specialized (or bound) first is refused
    to us and never used: the source discards it and claims another. Never logged (no repr)."""

    id: PodId
    address: str  # host:port of the runtime agent, or unix:<path> of its socket (`unix_socket`)
    pool: PoolKey
    claim: ClaimKind
    version: VersionKey | None = None
    concurrency: int = 1
    token: str = field(default="", repr=False)

    @property
    def authorization(self) -> str:
        """The `Authorization` header value for this pod's agent."""
        return f"Bearer {self.token}"


def agent_error(body: bytes) -> tuple[str, str]:
    """The `errorType` and `errorMessage` of an agent's error reply (CONTRACT.md), however it is garbled."""
    try:
        parsed = json.loads(body)
    except ValueError:
        return "InvalidResponse", body[:200].decode(errors="replace")
    if isinstance(parsed, dict):
        return str(parsed.get("errorType", "Unknown")), str(parsed.get("errorMessage", ""))
    return "InvalidResponse", str(parsed)[:200]


UNIX_ADDRESS_PREFIX = "unix:"


def unix_socket(address: str) -> str | None:
    """The socket path of a `unix:<path>` pod address (local sandboxes), None for host:port."""
    return address[len(UNIX_ADDRESS_PREFIX) :] if address.startswith(UNIX_ADDRESS_PREFIX) else None


def http_host(address: str) -> str:
    """The Host header for requests to the agent at `address` (an agent ignores it)."""
    return "agent" if unix_socket(address) is not None else address


def new_agent_token() -> str:
    """A fresh bearer token for one claimed pod (256 random bits)."""
    return secrets.token_urlsafe(32)


# How many pods a specialize discards, because another client had bound them, before it gives up.
MAX_BOUND_DISCARDS = 3


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


class PoolShortage(PoolUnavailable):
    """The pool had no ready pod to claim within the claim timeout: a shortage of capacity (other
    activators hold its pods, new ones are still starting), not a fault of the Version's. A
    Version never fails for it; its next pod start tries again."""


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
        """True when the code itself is bad (422/400): retrying on another pod will not help.

        A 401 or 409 is never one: it means another client bound or specialized the pod first,
        and the sources discard such a pod and claim another (`BoundByAnotherClient`)."""
        return self.status in (400, 422)


class BoundByAnotherClient(PodSourceError):
    """Pods kept answering specialize with 401/409: another client had bound them first (every
    one was discarded). Not the code's fault; the scaler tries again later."""


def bound_by_another(status: int) -> bool:
    """A specialize answer that means the pod is not ours: its agent is bound to another token
    (401) or was specialized by someone else (409: a claimed generic pod is never ours yet)."""
    return status in (401, 409)


class PodGone(PodSourceError):
    """The pod died or was released while being used."""


class PodSource(Protocol):
    """Claim, specialize, release and list pods; implementations own the pods' lifecycle."""

    discarded_bound: int  # pods discarded because another client had bound their agent first

    async def claim(self, pool: PoolKey) -> PodHandle:
        """A generic pod of the pool, taken out of it: warm when one is ready, else started now."""
        ...

    async def specialize(self, pod: PodHandle, request: SpecializeRequest) -> PodHandle:
        """Load a Version into a claimed pod; the returned handle carries the Version.

        A pod whose agent another client bound first is released, and another pod of the pool is
        claimed and specialized in its place (the returned handle may name another pod), at most
        `MAX_BOUND_DISCARDS` times before `BoundByAnotherClient`."""
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

    def expect_claims(self, claims: Mapping[PoolKey, int]) -> None:
        """Claims the predictor expects from each pool within the next demand window (prewarms of
        predictive Functions that have no pod), replacing the last call's. A hint for sizing
        pools; sources whose pool size is not theirs to publish ignore it."""

    def route_calls(self, portal: Portal) -> None:
        """Send the portion calls that pods' code makes through its channel to `portal`."""
        ...

    def route_state(self, handler: StateHandler) -> None:
        """Send the key-value state operations that pods' code makes through its channel to `handler`."""
        ...

    async def report_load_failure(self, version: VersionKey, *, code_hash: str, message: str) -> None:
        """Make a Version's failed load visible where its status lives (the API server; nowhere locally).

        Loads that succeed need no report: the Version's specialized pods are the evidence."""
        ...

    def memory_kills(self, version: VersionKey) -> MemoryKills:
        """The Version's pods this source saw killed at their memory bound, so far (right-sizing)."""
        ...

    def sandbox_overhead_mib(self, pool: PoolKey) -> int:
        """MiB a pod of the pool takes beyond its worker's peak: the agent and the sandbox
        (`ember.scaling.rightsize.sandbox_overhead_mib` of what this source runs it in)."""
        ...

    async def report_sizing(self, version: VersionKey, *, report: str) -> None:
        """Publish a Version's right-sizing advice (`ember.scaling.rightsize.encode_report`) where its
        status lives: the Version's annotation, which the operator folds into its status; nowhere
        locally, where the activator's own Version state is the status. Best effort."""
        ...

    async def close(self) -> None:
        """Stop every pod this source started."""
        ...
