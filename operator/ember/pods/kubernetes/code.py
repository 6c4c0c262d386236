"""What specializing a pod needs of a Version: its uid (the pod's owner) and its code, read once.

Both are immutable, so each Version is read from the API server once per process. Code kept in the
Version's ConfigMap is read from there, so a pod gets the snapshot the Version was made with; a
Version whose code is a URL has no ConfigMap and the specialize request's own code is used.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException
from pydantic import ValidationError

from ember.api.common import GROUP, VERSION
from ember.api.version import Version, version_name
from ember.pods.base import PodGone, VersionKey
from ember.resources.code import agent_code_payload, code_configmap_name, code_configmap_problem, files_from_configmap


@dataclass(frozen=True, slots=True)
class VersionFacts:
    """A Version's uid and its agent code payload."""

    uid: str
    code: Any


class VersionCode:
    """Reads and remembers `VersionFacts` per Version."""

    def __init__(self, api: client.ApiClient, *, core: Any, custom: Any) -> None:
        self._api: Any = api
        self._core = core
        self._custom = custom
        self._facts: dict[VersionKey, VersionFacts] = {}

    async def facts(self, version: VersionKey, given: Any) -> VersionFacts:
        """The Version's uid and code; `PodGone` when either cannot be read."""
        cached = self._facts.get(version)
        if cached is not None:
            return cached
        name = version_name(version.function, version.number)
        try:
            owner = await self._custom.get_namespaced_custom_object(GROUP, VERSION, version.namespace, "versions", name)
        except ApiException as err:
            raise PodGone(f"Version {version} cannot be read ({err.status} {err.reason})") from err
        try:
            model = Version.model_validate(
                {k: owner[k] for k in ("apiVersion", "kind", "metadata", "spec") if k in owner}
            )
        except ValidationError as err:
            raise PodGone(f"Version {version} is not a valid Version: {err}") from err
        facts = VersionFacts(uid=str(owner["metadata"]["uid"]), code=await self._code_for(version, model, given))
        self._facts[version] = facts
        return facts

    async def _code_for(self, version: VersionKey, model: Version, given: Any) -> Any:
        """The Version's snapshotted code from its ConfigMap (only one the Version controls and
        whose code it names, `code_configmap_problem`); the request's own code for url code."""
        cm_name = code_configmap_name(version_name(version.function, version.number))
        try:
            cm = await self._core.read_namespaced_config_map(cm_name, version.namespace)
        except ApiException as err:
            if err.status == 404 and given is not None and model.spec.function.code.url is not None:
                return given
            raise PodGone(f"Version {version}: code ConfigMap {cm_name} cannot be read ({err.status})") from err
        stored = self._api.sanitize_for_serialization(cm)
        problem = code_configmap_problem(model, stored)
        if problem is not None:
            raise PodGone(f"Version {version}: {problem}")
        return agent_code_payload(files_from_configmap(stored, key=None))
