"""The pod cache of the Kubernetes pod source: the namespace's Ember pods as the watch last saw them.

`KubernetesPodSource` lists, then watches, the namespace's pods labelled
`ember.run/managed-by=ember` (kubernetes_asyncio, plain dicts) and feeds every event here; every
read of the source is from this cache. Replies to the source's own PATCHes are stored too, unless
the watch already knows better (`store`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

from ember.resources import labels

Obj = dict[str, Any]


def state_of(pod: Mapping[str, Any]) -> Any:
    """The pod's `ember.run/state` label (None when missing)."""
    return ((pod.get("metadata") or {}).get("labels") or {}).get(labels.STATE)


class PodCache:
    """Pods by name."""

    def __init__(self) -> None:
        self._pods: dict[str, Obj] = {}

    @property
    def view(self) -> Mapping[str, Obj]:
        """A read-only, live view of the pods by name."""
        return MappingProxyType(self._pods)

    def __len__(self) -> int:
        return len(self._pods)

    def __iter__(self) -> Iterator[str]:
        return iter(self._pods)

    def get(self, name: str) -> Obj | None:
        return self._pods.get(name)

    def values(self) -> Iterable[Obj]:
        return self._pods.values()

    def replace(self, pods: Iterable[Obj]) -> None:
        """Forget every pod and keep `pods` (a fresh list)."""
        self._pods = {pod["metadata"]["name"]: pod for pod in pods}

    def put(self, pod: Obj) -> None:
        """A pod the watch saw added or modified."""
        self._pods[pod["metadata"]["name"]] = pod

    def remove(self, name: str) -> None:
        """A pod the watch saw deleted."""
        self._pods.pop(name, None)

    def store(self, pod: Obj) -> None:
        """Put a pod the API server returned into the cache, unless the watch already knows better.

        A reply can arrive after a newer watch event: a pod deleted meanwhile stays out, and an
        older resourceVersion does not replace a newer one."""
        name = pod["metadata"]["name"]
        cached = self._pods.get(name)
        if cached is None:
            return
        try:
            if int(pod["metadata"]["resourceVersion"]) < int(cached["metadata"]["resourceVersion"]):
                return
        except (KeyError, TypeError, ValueError):
            pass  # resourceVersions are opaque in general; these are the API server's integers
        self._pods[name] = pod
