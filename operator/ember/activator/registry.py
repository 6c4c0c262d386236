"""Functions and their Versions as the activator knows them, and which Version serves a request.

`Registry.apply` takes a Function as it is now (from files in local mode, from the API server
in a cluster): when its code or configuration changed (`ember.api.version.code_hash`) it
makes a new Version, numbered after the last, in phase Loading. The scaler gives the new
Version pods; it becomes Ready once it has its initial capacity, and only then does "latest"
(unqualified traffic) move to it. A Version that fails to load becomes Failed and leaves
traffic where it was. Versions no longer referenced by latest, `spec.traffic` or an alias
drain and lose their pods, but can still be invoked by number (they scale from zero).

In a cluster the operator makes the Versions, so the activator must not number them itself:
the catalog (`ember.activator.catalog`) calls `follow` with each Function (traffic, aliases and
scaling only) and `apply_version` with each Version object the operator wrote. Code kept in a
ConfigMap is then sent as `code: null`; the Kubernetes pod source fills in the Version's
ConfigMap snapshot.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import logging
import random
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from prometheus_client import Counter, Histogram

from ember.activator.config import ActivatorConfig
from ember.activator.errors import FunctionNotFound, NotReady
from ember.activator.metrics import Metrics
from ember.activator.throttler import PodSlots, Throttler
from ember.activator.traffic import AliasTarget, Split, latest_serving, resolve
from ember.api.function import Function, FunctionSpec
from ember.api.security_policy import DEFAULT_POLICY, SecurityPolicySpec
from ember.api.version import code_hash
from ember.pods.base import PodId, PoolKey, SpecializeRequest, VersionKey
from ember.pods.payload import PayloadError, path_digest, pool_key, specialize_request
from ember.scaling.autoscaler import Autoscaler, ScalingParams, initial_target

log = logging.getLogger(__name__)


class Phase(enum.Enum):
    """Lifecycle of a Version in the activator."""

    LOADING = "Loading"
    READY = "Ready"
    FAILED = "Failed"


def scaling_params(spec: FunctionSpec, config: ActivatorConfig) -> ScalingParams:
    """Autoscaler knobs of a Version: the Function's scaling block plus the activator's windows."""
    return ScalingParams(
        concurrency=spec.concurrency,
        target_utilization=spec.scaling.target_utilization,
        min_scale=spec.scaling.min_scale,
        max_scale=spec.scaling.max_scale,
        keep_alive_s=float(spec.scaling.keep_alive_seconds),
        stable_window_s=config.stable_window_s,
        panic_window_s=min(config.panic_window_s, config.stable_window_s),
        panic_threshold=config.panic_threshold,
        granularity_s=min(1.0, config.panic_window_s, config.tick_s * 4),
    )


class VersionState:
    """One Version: its code, pods, queue, autoscaler and phase."""

    def __init__(
        self,
        *,
        fs: FunctionState,
        number: int,
        spec: FunctionSpec,
        digest: str,
        request: SpecializeRequest | None,
        pool: PoolKey,
        config: ActivatorConfig,
        metrics: Metrics,
        now: float,
        on_queue: Callable[[], None],
        initial_target: int,
    ) -> None:
        self.fs = fs
        self.key = VersionKey(fs.namespace, fs.name, number)
        self.spec = spec
        self.code_hash = digest
        self.request = request
        self.pool = pool
        self._phase = Phase.LOADING
        self.message = ""
        self.created_at = now
        self.last_qualified_at = -1e18
        self.initial_target = initial_target
        self.starting = 0
        self.failures = 0
        self.pods: dict[PodId, PodSlots] = {}
        self.draining: dict[PodId, PodSlots] = {}
        self.timeout_s = spec.timeout_seconds + config.agent_timeout_margin_s
        self.label = str(number)
        self.throttler = Throttler(
            name=f"{fs.label}@{number}",
            queue_depth=config.queue_depth,
            queue_timeout_s=config.queue_timeout_s,
            retry_after_s=config.retry_after_s,
            on_queue=on_queue,
        )
        self.autoscaler = Autoscaler(scaling_params(spec, config), now=now)
        self._metrics = metrics
        self._outcomes: dict[str, Counter] = {}
        self.duration: Histogram = metrics.duration.labels(fs.label, self.label)

    def count(self, outcome: str) -> None:
        """Count one invocation outcome (label child cached: this is on the hot path)."""
        child = self._outcomes.get(outcome)
        if child is None:
            child = self._outcomes[outcome] = self._metrics.invocations.labels(self.fs.label, self.label, outcome)
        child.inc()

    @property
    def phase(self) -> Phase:
        return self._phase

    @phase.setter
    def phase(self, phase: Phase) -> None:
        self._phase = phase
        self.fs.forget_latest()  # "latest" may now mean another Version

    @property
    def ready_pods(self) -> int:
        return len(self.throttler.pods)

    def mark_failed(self, message: str) -> None:
        self.phase = Phase.FAILED
        self.message = message
        self.throttler.fail_waiters(NotReady(f"{self.fs.label} Version {self.key.number} failed to load: {message}"))
        log.error("version failed function=%s version=%d reason=%s", self.fs.label, self.key.number, message)


class FunctionState:
    """One Function: its latest spec and every Version made of it."""

    def __init__(self, namespace: str, name: str) -> None:
        self.namespace = namespace
        self.name = name
        self.label = f"{namespace}/{name}"
        self.spec: FunctionSpec | None = None
        self.versions: dict[int, VersionState] = {}
        self.latest_number = 0
        self.traffic: tuple[Split, ...] = ()
        self.aliases: dict[str, AliasTarget] = {}
        self.removed = False
        self._known: dict[int, bool] = {}
        self._latest: int | None = None  # cached: every invocation asks; phases change rarely

    def forget_latest(self) -> None:
        self._latest = None

    def latest(self) -> int:
        """The Version number "latest" means now (newest Ready, else newest Loading)."""
        if self._latest is None:
            ready = [n for n, v in self.versions.items() if v.phase is Phase.READY]
            loading = [n for n, v in self.versions.items() if v.phase is Phase.LOADING]
            self._latest = latest_serving(ready, loading, self.label)
        return self._latest

    def referenced(self) -> set[int]:
        """Versions that traffic or aliases point to, and the newest while it loads; the others drain."""
        refs: set[int] = set()
        newest = self.versions.get(self.latest_number)
        if newest is not None and newest.phase is Phase.LOADING:
            refs.add(newest.key.number)
        with contextlib.suppress(NotReady):
            refs.add(self.latest())
        refs.update(s.version for s in self.traffic if s.version is not None)
        for alias in self.aliases.values():
            refs.add(alias.version)
            if alias.additional_version is not None:
                refs.add(alias.additional_version)
        return refs

    def route(self, qualifier: str | None, draw: float) -> VersionState:
        """The Version that serves one invocation with this qualifier."""
        targets = resolve(
            qualifier,
            function=self.label,
            known=self._known,
            latest=self.latest(),
            traffic=self.traffic,
            aliases=self.aliases,
        )
        number = targets.pick(draw)
        vs = self.versions.get(number)
        if vs is None:
            raise FunctionNotFound(f"function {self.label} has no Version {number}")
        if vs.phase is Phase.FAILED:
            raise NotReady(f"function {self.label} Version {number} failed to load: {vs.message}")
        return vs

    def _reindex(self) -> None:
        self._known = {n: True for n in self.versions}
        self._latest = None


class Registry:
    """Every function the activator serves."""

    def __init__(
        self,
        config: ActivatorConfig,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_queue: Callable[[], None] = lambda: None,
        replicas: Callable[[], int] = lambda: 1,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self.on_queue = on_queue
        self.replicas = replicas  # live activator replicas sharing the Functions' bounds (see Scaler)
        self._functions: dict[tuple[str, str], FunctionState] = {}
        self._removed: list[FunctionState] = []
        self._random = random.Random()

    def functions(self) -> Iterator[FunctionState]:
        return iter(list(self._functions.values()))

    def get(self, namespace: str, name: str) -> FunctionState:
        fs = self._functions.get((namespace, name))
        if fs is None or fs.removed:
            raise FunctionNotFound(f"function {namespace}/{name} not found")
        return fs

    def route(self, namespace: str, name: str, qualifier: str | None) -> VersionState:
        """The Version that serves one invocation (traffic splits draw at random)."""
        return self.get(namespace, name).route(qualifier, self._random.random() * 100)

    def follow(self, function: Function) -> FunctionState:
        """Take a Function's traffic, aliases and scaling as they are now; never makes a Version."""
        namespace, name = function.metadata.namespace, function.metadata.name
        fs = self._functions.get((namespace, name))
        if fs is None or fs.removed:
            fs = self._functions[(namespace, name)] = FunctionState(namespace, name)
        spec = function.spec
        fs.spec = spec
        fs.traffic = tuple(Split(t.version, t.percent) for t in spec.traffic)
        fs.aliases = {
            alias: AliasTarget(a.version, a.additional_version, a.additional_weight or 0)
            for alias, a in spec.aliases.items()
        }
        for vs in fs.versions.values():  # scaling may have changed; a Version keeps its concurrency
            vs.autoscaler.params = dataclasses.replace(
                scaling_params(spec, self.config), concurrency=vs.spec.concurrency
            )
        fs.forget_latest()
        return fs

    def apply(
        self, function: Function, *, policy: SecurityPolicySpec | None = None, base_dir: Path | None = None
    ) -> VersionState | None:
        """Take a Function as it is now (local mode); returns the new Version when one was made."""
        fs = self.follow(function)
        spec = function.spec
        pool = pool_key(spec, policy)
        digest = code_hash(spec, policy or DEFAULT_POLICY, path_digest(spec, base_dir))
        current = fs.versions.get(fs.latest_number)
        if current is not None and current.code_hash == digest:
            return None  # scaling, traffic or aliases changed: no new Version
        number = fs.latest_number + 1
        key = VersionKey(fs.namespace, fs.name, number)
        request: SpecializeRequest | None
        problem = ""
        try:
            request = specialize_request(key, spec, digest, base_dir)
        except PayloadError as err:
            request, problem = None, str(err)
        return self._add_version(fs, number, spec, digest, pool, request, problem)

    def apply_version(
        self, namespace: str, name: str, number: int, digest: str, spec: FunctionSpec, pool: PoolKey
    ) -> VersionState | None:
        """Take one Version the operator made (cluster mode); returns it when it is new here.

        The Function must have been given to `follow` first. A Version already known by number is
        left as it is (Versions are immutable); a lower number than the newest known does not move
        "latest". Code in a ConfigMap goes out as `code: null`: the Kubernetes pod source reads the
        Version's ConfigMap snapshot instead.
        """
        if number < 1:
            raise ValueError(f"Version {namespace}/{name}@{number}: number must be at least 1")
        fs = self._functions.get((namespace, name))
        if fs is None or fs.removed:
            raise FunctionNotFound(f"function {namespace}/{name} is not followed; Version {number} ignored")
        if number in fs.versions:
            return None
        if fs.spec is not None:  # scaling is the Function's now, not what it was when the Version was made
            spec = spec.model_copy(update={"scaling": fs.spec.scaling})
        key = VersionKey(namespace, name, number)
        request: SpecializeRequest | None
        problem = ""
        try:
            request = cluster_specialize_request(key, spec, digest)
        except PayloadError as err:
            request, problem = None, str(err)
        return self._add_version(fs, number, spec, digest, pool, request, problem)

    def forget_version(self, namespace: str, name: str, number: int) -> bool:
        """Drop a Version the operator deleted (retention), once nothing routes to it and it holds no pods.

        Returns True when it was dropped; False while it is referenced or still has pods (the caller
        asks again later; its pods go with the Version object by garbage collection).
        """
        fs = self._functions.get((namespace, name))
        vs = fs.versions.get(number) if fs is not None else None
        if fs is None or vs is None:
            return False
        if vs.pods or vs.draining or vs.starting or number in fs.referenced():
            return False
        vs.throttler.fail_waiters(FunctionNotFound(f"function {fs.label} Version {number} was deleted"))
        del fs.versions[number]
        fs._reindex()
        log.info("version forgotten function=%s version=%d", fs.label, number)
        return True

    def _add_version(
        self,
        fs: FunctionState,
        number: int,
        spec: FunctionSpec,
        digest: str,
        pool: PoolKey,
        request: SpecializeRequest | None,
        problem: str,
    ) -> VersionState:
        serving = 0
        with contextlib.suppress(NotReady, KeyError):
            serving = fs.versions[fs.latest()].ready_pods
        vs = VersionState(
            fs=fs,
            number=number,
            spec=spec,
            digest=digest,
            request=request,
            pool=pool,
            config=self.config,
            metrics=self.metrics,
            now=self.clock(),
            on_queue=self.on_queue,
            initial_target=initial_target(
                min_scale=spec.scaling.min_scale,
                max_scale=spec.scaling.max_scale,
                serving=serving,
                replicas=max(1, self.replicas()),
            ),
        )
        vs.autoscaler.hold(self.clock(), vs.initial_target)
        fs.versions[number] = vs
        fs.latest_number = max(fs.latest_number, number)
        fs._reindex()
        if request is None:
            vs.mark_failed(problem)
            self.metrics.version_failures.labels(fs.label).inc()
        log.info("version created function=%s version=%d hash=%s", fs.label, number, digest[:19])
        return vs

    def remove(self, namespace: str, name: str) -> FunctionState | None:
        """Forget a Function; its Versions drain (the scaler releases their pods)."""
        fs = self._functions.pop((namespace, name), None)
        if fs is not None:
            fs.removed = True
            self._removed.append(fs)
            for vs in fs.versions.values():
                vs.throttler.fail_waiters(FunctionNotFound(f"function {fs.label} was removed"))
        return fs

    def all_versions(self) -> list[VersionState]:
        """Versions of live and of removed Functions (the latter until their pods are released)."""
        self._removed = [
            fs for fs in self._removed if any(v.pods or v.draining or v.starting for v in fs.versions.values())
        ]
        return [vs for fs in (*self._functions.values(), *self._removed) for vs in fs.versions.values()]


def cluster_specialize_request(key: VersionKey, spec: FunctionSpec, digest: str) -> SpecializeRequest:
    """The specialize body of a Version in a cluster: ConfigMap code is left for the pod source to fill in."""
    if spec.code.config_map_ref is None:
        if spec.code.path is not None:
            raise PayloadError("spec.code.path is only available in local mode; use inline, url or configMapRef")
        return specialize_request(key, spec, digest)
    placeholder = spec.model_copy(update={"code": spec.code.model_copy(update={"config_map_ref": None, "inline": ""})})
    request = specialize_request(key, placeholder, digest)
    return dataclasses.replace(request, payload={**request.payload, "code": None})
