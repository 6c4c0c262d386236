"""The activator's view of the cluster: the Functions and Versions the operator keeps.

In a cluster the operator numbers the Versions; the activator only follows them. `Catalog`
lists, then watches, both kinds in one namespace (kubernetes_asyncio; a watch that expires with
410 Gone is re-listed), keeps the raw objects, and after every change applies the whole picture
to the `Registry` (level-based: the result depends only on what is stored, not on the order of
events). The picture is computed by the pure `plan`: each valid Function with its valid Versions
(those that name it and are owned by its uid, so leftovers of an earlier Function of the same
name are ignored) and the pool each Version's pods come from. A Version carries the
SecurityPolicy it was made under (`spec.policy`), so the activator resolves no policy itself: a
policy edit reaches it as a new Version from the operator. The size a Version's new pods get
follows its status the same way (`status.recommendation`, which the operator merges from the
activators' reports, through `applied_resources`: the rule the operator makes pools by), so every
activator replica claims from the pool the operator keeps (`Registry.size_version`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from kubernetes_asyncio import client, watch
from kubernetes_asyncio.client.exceptions import ApiException
from pydantic import ValidationError

from ember.activator.errors import FunctionNotFound
from ember.activator.registry import Registry
from ember.api.common import GROUP, VERSION
from ember.api.function import Function
from ember.api.version import ResourceRecommendation, Version, VersionResources
from ember.pods.base import PoolKey
from ember.pods.payload import pool_key
from ember.resources.objects import Obj
from ember.scaling.rightsize import applied_resources, parse_recommendation

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (namespace, name)
PLURALS: tuple[str, ...] = ("functions", "versions")


@dataclass(frozen=True, slots=True)
class VersionPlan:
    """One Version as the registry should know it."""

    number: int
    code_hash: str
    version: Version
    pool: PoolKey
    # right-sizing, from its status (the operator's): the stored advice and the size it applies
    advice: ResourceRecommendation | None = None
    resources: VersionResources | None = None


@dataclass(frozen=True, slots=True)
class FunctionPlan:
    """One Function and the Versions of it the activator can serve."""

    function: Function
    versions: tuple[VersionPlan, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything the registry should hold, and what was wrong with the objects that were skipped."""

    functions: dict[Key, FunctionPlan] = field(default_factory=dict)
    problems: tuple[str, ...] = ()


def _model_body(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of a stored object the models parse (status and server-only metadata dropped)."""
    meta = obj.get("metadata") or {}
    kept = ("name", "namespace", "labels", "annotations", "uid", "resourceVersion", "generation", "creationTimestamp")
    body = {k: obj[k] for k in ("apiVersion", "kind", "spec") if k in obj}
    body["metadata"] = {k: meta[k] for k in kept if meta.get(k) is not None}
    return body


def _where(plural: str, obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata") or {}
    return f"{plural} {meta.get('namespace', '?')}/{meta.get('name', '?')}"


def plan(functions: Mapping[Key, Obj], versions: Mapping[Key, Obj]) -> Plan:
    """What the registry should hold for these stored objects (pure: no I/O, no clock)."""
    problems: list[str] = []
    parsed: dict[Key, Function] = {}
    for key, obj in functions.items():
        try:
            parsed[key] = Function.model_validate(_model_body(obj))
        except ValidationError as err:
            problems.append(f"{_where('functions', obj)}: invalid, skipped: {err.error_count()} error(s)")
    owned: dict[Key, list[tuple[Version, Obj]]] = {key: [] for key in parsed}
    for obj in versions.values():
        try:
            version = Version.model_validate(_model_body(obj))
        except ValidationError as err:
            problems.append(f"{_where('versions', obj)}: invalid, skipped: {err.error_count()} error(s)")
            continue
        fkey = (version.metadata.namespace, version.spec.function_name)
        fn = parsed.get(fkey)
        if fn is None:
            continue  # its Function is gone (garbage collection follows) or not valid
        owners = (obj.get("metadata") or {}).get("ownerReferences") or []
        if fn.metadata.uid is not None and not any(o.get("uid") == fn.metadata.uid for o in owners):
            continue  # left over from an earlier Function of the same name
        owned[fkey].append((version, obj))
    out: dict[Key, FunctionPlan] = {}
    for key, fn in parsed.items():
        seen: dict[int, VersionPlan] = {}
        for version, obj in owned[key]:
            number = version.spec.number
            pool = pool_key(
                version.spec.function,
                version.spec.policy,
                calls=bool(version.spec.function.portions),
                namespace=key[0],
                function=key[1],
            )
            # the operator's rule on what it stored (an unreadable recommendation counts as none)
            advice = parse_recommendation((obj.get("status") or {}).get("recommendation"))
            resources = applied_resources(
                version.spec.function.resources, max_memory_mib=version.spec.policy.limits.max_memory_mib, advice=advice
            )
            seen[number] = VersionPlan(number, version.spec.code_hash, version, pool, advice, resources)
        out[key] = FunctionPlan(fn, tuple(seen[n] for n in sorted(seen)))
    return Plan(out, tuple(problems))


def apply_plan(registry: Registry, wanted: Plan) -> list[str]:
    """Make the registry hold `wanted`: follow Functions, add new Versions, forget deleted idle ones, drop the rest.

    Returns one line per change, for the log.
    """
    changes: list[str] = []
    # Oldest first: a Function seen for the first time takes its place in the route table in this
    # order, the operator's (ember.controller.routes), so an older Function keeps a route two claim.
    ordered = sorted(
        wanted.functions.items(), key=lambda kv: (kv[1].function.metadata.creation_timestamp or "9999", kv[0])
    )
    for (namespace, name), fp in ordered:
        registry.follow(fp.function)
        for vp in fp.versions:
            made = registry.apply_version(
                namespace,
                name,
                vp.number,
                vp.code_hash,
                vp.version.spec.function,
                vp.pool,
                policy=vp.version.spec.policy,
                portion_policies=vp.version.spec.portion_policies,
            )
            if made is not None:
                changes.append(f"Version {vp.number} of {namespace}/{name}: loading")
            if registry.size_version(namespace, name, vp.number, resources=vp.resources, advice=vp.advice):
                assert vp.resources is not None
                changes.append(f"Version {vp.number} of {namespace}/{name}: new pods get {vp.resources.memory_mib} MiB")
        planned = {vp.number for vp in fp.versions}
        known = registry.get(namespace, name).versions
        for number in sorted(set(known) - planned):
            if registry.forget_version(namespace, name, number):
                changes.append(f"Version {number} of {namespace}/{name}: deleted by the operator, forgotten")
    for fs in list(registry.functions()):
        if (fs.namespace, fs.name) not in wanted.functions:
            registry.remove(fs.namespace, fs.name)
            changes.append(f"function {fs.label} removed")
    return changes


class Catalog:
    """Lists and watches Functions, Versions and SecurityPolicies of one namespace into a registry."""

    def __init__(
        self,
        api: client.ApiClient,
        registry: Registry,
        *,
        namespace: str,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.namespace = namespace
        self._api: Any = api
        self._custom: Any = client.CustomObjectsApi(api)
        self._registry = registry
        self._on_change = on_change
        self._objects: dict[str, dict[Key, Obj]] = {plural: {} for plural in PLURALS}
        self._synced = {plural: asyncio.Event() for plural in PLURALS}
        self._tasks: list[asyncio.Task[None]] = []
        self._reported: set[str] = set()

    async def start(self) -> None:
        """Start following; returns once every kind has been listed and applied."""
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._follow(plural), name=f"ember-catalog-{plural}") for plural in PLURALS
            ]
        for event in self._synced.values():
            await event.wait()
        self.sync()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    def sync(self) -> None:
        """Apply what is stored now to the registry (once every kind has been listed)."""
        if not all(event.is_set() for event in self._synced.values()):
            return
        wanted = plan(self._objects["functions"], self._objects["versions"])
        for problem in wanted.problems:
            if problem not in self._reported:
                self._reported.add(problem)
                log.warning("catalog namespace=%s %s", self.namespace, problem)
        try:
            changes = apply_plan(self._registry, wanted)
        except (FunctionNotFound, ValueError) as err:  # cannot happen for a plan; logged, next event retries
            log.error("catalog namespace=%s apply failed: %s", self.namespace, err)
            return
        for change in changes:
            log.info("catalog namespace=%s %s", self.namespace, change)
        if changes:
            self._on_change()

    async def _follow(self, plural: str) -> None:
        """List, then watch, one kind; relist when the watch expires (410) or breaks."""
        store = self._objects[plural]
        while True:
            try:
                listed = await self._custom.list_namespaced_custom_object(GROUP, VERSION, self.namespace, plural)
                store.clear()
                for item in listed.get("items", []):
                    store[self._key(item)] = item
                self._synced[plural].set()
                self.sync()
                stream = watch.Watch()
                async for event in stream.stream(
                    self._custom.list_namespaced_custom_object,
                    GROUP,
                    VERSION,
                    self.namespace,
                    plural,
                    resource_version=listed["metadata"]["resourceVersion"],
                    timeout_seconds=300,
                ):
                    kind, obj = event["type"], event["object"]
                    if kind == "ERROR" or not isinstance(obj, dict) or "metadata" not in obj:
                        break  # typically 410 Gone: the resourceVersion is too old; relist
                    if kind == "DELETED":
                        store.pop(self._key(obj), None)
                    else:
                        store[self._key(obj)] = obj
                    self.sync()
            except asyncio.CancelledError:
                raise
            except ApiException as err:
                if err.status != 410:
                    log.warning(
                        "catalog namespace=%s %s watch failed: %s %s; retrying",
                        self.namespace,
                        plural,
                        err.status,
                        err.reason,
                    )
                    await asyncio.sleep(1.0)
            except (aiohttp.ClientError, TimeoutError) as err:
                log.warning("catalog namespace=%s %s watch interrupted: %s; retrying", self.namespace, plural, err)
                await asyncio.sleep(1.0)

    @staticmethod
    def _key(obj: Mapping[str, Any]) -> Key:
        meta = obj["metadata"]
        return (str(meta.get("namespace", "")), str(meta["name"]))
