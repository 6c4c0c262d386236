"""Functions and their Versions as the activator knows them, and which Version serves a request.

`Registry.apply` takes a Function as it is now in local mode (from files): when its code,
configuration or policy changed (`ember.api.version.code_hash`) it makes a new Version, numbered
as the operator numbers them (`ember.resources.version.plan_next_version`), in phase Loading.
Each Version is a `VersionState` (`ember.activator.version_state`), which owns its pods and
phase; a `FunctionState` is its `Owner` and only keeps what spans Versions: traffic, aliases,
and which Version "latest" means, cached until a Version tells it its phase changed. The
scaler gives a new Version pods; it becomes Ready once it has its initial capacity, and only
then does "latest" (unqualified traffic) move to it. A Version that fails to load becomes
Failed and leaves traffic where it was. Versions no longer referenced by latest,
`spec.traffic` or an alias drain and lose their pods, but can still be invoked by number (they
scale from zero).

In a cluster the operator makes the Versions, so the activator must not number them itself:
the catalog (`ember.activator.catalog`) calls `follow` with each Function (traffic, aliases and
scaling only) and `apply_version` with each Version object the operator wrote. Code kept in a
ConfigMap is then sent as `code: null`; the Kubernetes pod source fills in the Version's
ConfigMap snapshot.

Right-sizing (`ember.activator.sizing`): in local mode a Version applies its own advice (the
activator is its operator); in a cluster the catalog hands over the size the operator wrote into
the Version's status (`size_version`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from ember.activator.config import ActivatorConfig
from ember.activator.errors import FunctionNotFound, NotReady
from ember.activator.metrics import Metrics, VersionGauges
from ember.activator.traffic import AliasTarget, Split, latest_serving, resolve
from ember.activator.version_state import Phase, VersionState, scaling_params
from ember.activator.wake import Asleep, Wake
from ember.api.function import Function, FunctionSpec
from ember.api.security_policy import DEFAULT_POLICY, SecurityPolicySpec
from ember.api.version import ResourceRecommendation, VersionResources, code_hash
from ember.pods.base import PoolKey, SpecializeRequest, VersionKey
from ember.pods.payload import PayloadError, path_digest, pool_key, specialize_request
from ember.resources.portions import MAIN, callees, portion_spec
from ember.resources.routes import Compiled, compile_routes, function_routes
from ember.resources.version import plan_next_version
from ember.scaling.autoscaler import initial_target
from ember.scaling.predictor import Forecast, Predictor

log = logging.getLogger(__name__)


class FunctionState:
    """One Function: its latest spec and every Version made of it (the `Owner` of each)."""

    def __init__(self, namespace: str, name: str, seq: int = 0) -> None:
        self.namespace = namespace
        self.name = name
        self.seq = seq  # order of arrival: on a route conflict the earlier Function keeps the route
        self.label = f"{namespace}/{name}"
        self.spec: FunctionSpec | None = None
        self.versions: dict[int, VersionState] = {}
        self.latest_number = 0
        self.traffic: tuple[Split, ...] = ()
        self.aliases: dict[str, AliasTarget] = {}
        self.removed = False
        self._known: dict[int, bool] = {}
        self._latest: int | None = None  # cached: every invocation asks; phases change rarely
        # `scaling.predictive`: when its next invocation is expected, learned across its Versions
        self.forecast: Forecast | None = None

    def take(self, spec: FunctionSpec, config: ActivatorConfig) -> None:
        """The Function's spec as it is now: traffic, aliases and scaling (its code is the Versions')."""
        self.spec = spec
        if not spec.scaling.predictive:
            self.forecast = None
        else:
            if self.forecast is None:
                predictor = Predictor(lead_s=config.predict_lead_s, min_period_s=config.predict_min_period_s)
                self.forecast = Forecast(predictor)
            self.forecast.policy.fallback_keep_s = float(spec.scaling.keep_alive_seconds)
        self.traffic = tuple(Split(t.version, t.percent) for t in spec.traffic)
        self.aliases = {
            alias: AliasTarget(a.version, a.additional_version, a.additional_weight or 0)
            for alias, a in spec.aliases.items()
        }
        for vs in self.versions.values():  # scaling may have changed; a Version keeps its concurrency
            vs.autoscaler.params = dataclasses.replace(scaling_params(spec, config), concurrency=vs.spec.concurrency)
        self._latest = None

    def phase_changed(self) -> None:
        """One of its Versions became Ready or Failed: "latest" is worked out again at the next ask."""
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
        wake: Wake | None = None,
        replicas: Callable[[], int] = lambda: 1,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.clock = clock
        self._wake: Wake = wake or Asleep()  # an invocation queued on one of the Versions
        self.replicas = replicas  # live activator replicas sharing the Functions' bounds (see Scaler)
        self._functions: dict[tuple[str, str], FunctionState] = {}
        self._removed: list[FunctionState] = []
        self._random = random.Random()
        self._seq = 0
        self.routes: Compiled = compile_routes(())  # every Function's HTTP routes (ember.resources.routes)

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
            self._seq += 1
            fs = self._functions[(namespace, name)] = FunctionState(namespace, name, self._seq)
        routed = fs.spec.http if fs.spec is not None else None
        fs.take(function.spec, self.config)
        if function.spec.http != routed:
            self._compile_routes()
        return fs

    def _compile_routes(self) -> None:
        """The route table again, from every Function's `spec.http` (oldest Function first)."""
        self.routes = compile_routes(
            function_routes(fs.namespace, fs.name, fs.spec.http)
            for fs in sorted(self._functions.values(), key=lambda f: f.seq)
            if fs.spec is not None and fs.spec.http is not None
        )

    def apply(
        self,
        function: Function,
        *,
        policy: SecurityPolicySpec | None = None,
        base_dir: Path | None = None,
        portion_policies: Mapping[str, SecurityPolicySpec] | None = None,
    ) -> VersionState | None:
        """Take a Function as it is now (local mode); returns the new Version when one was made.

        `portion_policies` holds each of its portions' policy (`ember.resources.portions`,
        checked by the caller); a portion without one is not made, and calls to it fail."""
        fs = self.follow(function)
        spec = function.spec
        portion_policies = dict(portion_policies or {})
        pool = pool_key(spec, policy, calls=bool(spec.portions), namespace=fs.namespace, function=fs.name)
        resolved = path_digest(spec, base_dir)
        digest = code_hash(spec, policy or DEFAULT_POLICY, resolved, portion_policies)
        newest = fs.versions.get(fs.latest_number)
        plan = plan_next_version(
            digest,
            newest_number=newest.key.number if newest is not None else None,
            newest_hash=newest.code_hash if newest is not None else None,
            last_number=fs.latest_number,
        )
        if plan.create is None:
            return None  # scaling, traffic or aliases changed: no new Version
        number = plan.create
        key = VersionKey(fs.namespace, fs.name, number)
        request: SpecializeRequest | None
        problem = ""
        try:
            request = specialize_request(key, spec, digest, base_dir)
        except PayloadError as err:
            request, problem = None, str(err)
        vs = self._add_version(fs, number, spec, digest, pool, request, problem)
        vs.trust_level = (policy or DEFAULT_POLICY).trust_level
        vs.max_memory_mib = (policy or DEFAULT_POLICY).limits.max_memory_mib
        vs.sizes_itself = True  # no operator here: the activator applies its own advice
        self._add_portions(
            fs, vs, portion_policies, lambda key, pspec, d: specialize_request(key, pspec, d, base_dir), resolved
        )
        return vs

    def _add_portions(
        self,
        fs: FunctionState,
        vs: VersionState,
        policies: Mapping[str, SecurityPolicySpec],
        make_request: Callable[[VersionKey, FunctionSpec, str], SpecializeRequest],
        resolved: str | None = None,
    ) -> None:
        """The Version's portions: one `VersionState` each, with pods of their own pool, owned by
        the Version (same number, `VersionKey.portion` set; referenced while it is) and linked as
        each may call them. `make_request` is the mode's specialize body (`resolved`: the digest
        of code the spec only points to, as for the Version)."""
        spec = vs.spec
        for portion in spec.portions:
            policy = policies.get(portion.name)
            if policy is None:
                continue
            pspec = portion_spec(spec, portion)
            owner = PortionOwner(fs, portion.name, vs.key.number)
            digest = code_hash(pspec, policy, resolved)
            key = VersionKey(fs.namespace, fs.name, vs.key.number, portion.name)
            request: SpecializeRequest | None = None
            problem = ""
            try:
                request = make_request(key, pspec, digest)
            except PayloadError as err:
                problem = str(err)
            child = VersionState(
                owner=owner,
                number=vs.key.number,
                spec=pspec,
                digest=digest,
                request=request,
                pool=pool_key(pspec, policy, calls=bool(portion.calls), namespace=fs.namespace, function=fs.name),
                config=self.config,
                metrics=self.metrics,
                now=self.clock(),
                wake=self._wake,
                initial_target=1,
                portion=portion.name,
            )
            child.version_hash = vs.code_hash
            child.autoscaler.hold(self.clock(), 1)
            child.trust_level = policy.trust_level
            if request is None:
                child.mark_failed(problem)
            vs.portions[portion.name] = child
        family = tuple(p.name for p in spec.portions)
        for name, each in ((MAIN, vs), *vs.portions.items()):
            each.family = family
            each.callees = {c: vs.portions[c] for c in callees(spec, name) if c in vs.portions}

    def apply_version(
        self,
        namespace: str,
        name: str,
        number: int,
        digest: str,
        spec: FunctionSpec,
        pool: PoolKey,
        *,
        policy: SecurityPolicySpec | None = None,
        portion_policies: Mapping[str, SecurityPolicySpec] | None = None,
    ) -> VersionState | None:
        """Take one Version the operator made (cluster mode); returns it when it is new here.

        The Function must have been given to `follow` first. A Version already known by number is
        left as it is (Versions are immutable); a lower number than the newest known does not move
        "latest". Code in a ConfigMap goes out as `code: null`: the Kubernetes pod source reads the
        Version's ConfigMap snapshot instead. `policy` and `portion_policies` are the ones the
        Version was made under (`spec.policy`, `spec.portionPolicies`): its portions are made of them.
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
        vs = self._add_version(fs, number, spec, digest, pool, request, problem)
        vs.trust_level = (policy or DEFAULT_POLICY).trust_level
        vs.max_memory_mib = (policy or DEFAULT_POLICY).limits.max_memory_mib
        self._add_portions(fs, vs, portion_policies or {}, cluster_specialize_request)
        return vs

    def size_version(
        self,
        namespace: str,
        name: str,
        number: int,
        *,
        resources: VersionResources | None,
        advice: ResourceRecommendation | None,
    ) -> bool:
        """The size the operator gives a Version's new pods, from its status (cluster mode): `resources`
        (None: not written yet, the spec's stays), and the stored `advice`, whose out-of-memory size
        this activator's right-sizing learns (another activator may have seen it). True when the size
        in use changed."""
        fs = self._functions.get((namespace, name))
        vs = fs.versions.get(number) if fs is not None else None
        if vs is None or vs.sizes_itself:
            return False
        if advice is not None and vs.sizer is not None:
            vs.sizer.learn_oom(advice.out_of_memory_at_mib)
        return resources is not None and vs.resize(resources)

    def forget_version(self, namespace: str, name: str, number: int) -> bool:
        """Drop a Version the operator deleted (retention), once nothing routes to it and it holds no pods.

        Returns True when it was dropped; False while it is referenced or still has pods (the caller
        asks again later; its pods go with the Version object by garbage collection).
        """
        fs = self._functions.get((namespace, name))
        vs = fs.versions.get(number) if fs is not None else None
        if fs is None or vs is None:
            return False
        if any(v.holds_pods for v in (vs, *vs.portions.values())) or number in fs.referenced():
            return False
        for gone in (vs, *vs.portions.values()):
            gone.fail_waiters(FunctionNotFound(f"function {fs.label} Version {number} was deleted"))
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
            owner=fs,
            number=number,
            spec=spec,
            digest=digest,
            request=request,
            pool=pool,
            config=self.config,
            metrics=self.metrics,
            now=self.clock(),
            wake=self._wake,
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
        log.info("version created function=%s version=%d hash=%s", fs.label, number, digest[:19])
        return vs

    def remove(self, namespace: str, name: str) -> FunctionState | None:
        """Forget a Function; its Versions drain (the scaler releases their pods)."""
        fs = self._functions.pop((namespace, name), None)
        if fs is not None:
            fs.removed = True
            self._removed.append(fs)
            if fs.spec is not None and fs.spec.http is not None:
                self._compile_routes()
            for vs in _with_portions(fs):
                vs.fail_waiters(FunctionNotFound(f"function {fs.label} was removed"))
        return fs

    def all_versions(self) -> list[VersionState]:
        """Versions (and their portions) of live and of removed Functions (the latter until their
        pods are released)."""
        self._removed = [fs for fs in self._removed if any(v.holds_pods for v in _with_portions(fs))]
        return [vs for fs in (*self._functions.values(), *self._removed) for vs in _with_portions(fs)]

    def gauges(self) -> list[VersionGauges]:
        """Every live Function's Versions (and their portions) as /metrics shows them."""
        return [vs.gauges() for fs in self._functions.values() for vs in _with_portions(fs)]


def _with_portions(fs: FunctionState) -> Iterator[VersionState]:
    for vs in fs.versions.values():
        yield vs
        yield from vs.portions.values()


class PortionOwner:
    """The `Owner` of a portion's `VersionState`: its Function's, labelled `<function>.<portion>`
    in logs and metrics (never a Function's name, which has no dot), referenced while its Version
    is, removed with its Function."""

    def __init__(self, function: FunctionState, portion: str, number: int) -> None:
        self.namespace = function.namespace
        self.name = function.name
        self.label = f"{function.label}.{portion}"
        self._function = function
        self._number = number

    @property
    def removed(self) -> bool:
        return self._function.removed

    @property
    def forecast(self) -> Forecast | None:
        """Portions are not predicted (`ember.resources.portions` turns `predictive` off for them)."""
        return None

    def referenced(self) -> set[int]:
        return {self._number} if self._number in self._function.referenced() else set()

    def phase_changed(self) -> None:
        """A portion's phase moves no traffic."""


def cluster_specialize_request(key: VersionKey, spec: FunctionSpec, digest: str) -> SpecializeRequest:
    """The specialize body of a Version in a cluster: ConfigMap code is left for the pod source to fill in."""
    if spec.code.config_map_ref is None:
        if spec.code.path is not None:
            raise PayloadError("spec.code.path is only available in local mode; use inline, url or configMapRef")
        return specialize_request(key, spec, digest)
    placeholder = spec.model_copy(update={"code": spec.code.model_copy(update={"config_map_ref": None, "inline": ""})})
    request = specialize_request(key, placeholder, digest)
    return dataclasses.replace(request, payload={**request.payload, "code": None})
