"""The pod cache of the Kubernetes pod source: the namespace's Ember pods as the watch last saw them.

`KubernetesPodSource` lists, then watches, the namespace's pods labelled
`ember.run/managed-by=ember` (kubernetes_asyncio, plain dicts) and feeds every event here; every
read of the source is from this cache. Replies to the source's own PATCHes are stored too, unless
the watch already knows better (`store`).

A claim must not cost a walk over every pod of the namespace (hundreds, across every pool), so the
cache keeps an index by (`ember.run/pool`, `ember.run/state`), updated by every write here, and a
claim reads only its pool's generic pods (`claimable`). Readiness is not in the index key: it
changes without a label change, so it is checked on the few pods the index returns.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any

from ember.resources import labels
from ember.resources.meta import pod_ready
from ember.resources.objects import Obj as Obj  # re-exported: leases.py and source.py import it from here


def state_of(pod: Mapping[str, Any]) -> Any:
    """The pod's `ember.run/state` label (None when missing)."""
    return ((pod.get("metadata") or {}).get("labels") or {}).get(labels.STATE)


def ready(pod: Obj) -> bool:
    """Ready and reachable: the activator routes to the pod's IP."""
    return pod_ready(pod) and bool((pod.get("status") or {}).get("podIP"))


def restarts(pod: Obj) -> int:
    """How often the pod's containers restarted (an agent that restarts loses its code and token)."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    return sum(int(c.get("restartCount") or 0) for c in statuses)


OOM_KILLED = "OOMKilled"  # what the kubelet reports of a container killed at its memory limit


def oom_kills(pod: Obj) -> list[str]:
    """The containers of the pod killed at their memory limit, by the id of the dead container (its
    current state or its last one, before a restart: each dead container once)."""
    out: list[str] = []
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        for which in ("state", "lastState"):
            terminated = (status.get(which) or {}).get("terminated") or {}
            if terminated.get("reason") == OOM_KILLED:
                mark = str(terminated.get("containerID") or terminated.get("finishedAt") or which)
                if mark not in out:
                    out.append(mark)
    return out


_MEMORY_UNITS = {"Ki": 1 / 1024, "Mi": 1, "Gi": 1024, "Ti": 1024 * 1024, "M": 1e6 / 2**20, "G": 1e9 / 2**20}


def memory_limit_mib(pod: Obj) -> int:
    """The memory limit of the pod's first container in MiB (0 when it has none or it is unreadable)."""
    containers = (pod.get("spec") or {}).get("containers") or [{}]
    raw = str((((containers[0] or {}).get("resources") or {}).get("limits") or {}).get("memory") or "")
    for unit, mib in _MEMORY_UNITS.items():
        if raw.endswith(unit) and raw[: -len(unit)].isdigit():
            return int(int(raw[: -len(unit)]) * mib)
    return int(raw) // 2**20 if raw.isdigit() else 0


def _index_key(pod: Obj) -> tuple[Any, Any]:
    pod_labels = pod["metadata"].get("labels") or {}
    return pod_labels.get(labels.POOL), pod_labels.get(labels.STATE)


class PodCache:
    """Pods by name, and by (pool, state)."""

    def __init__(self) -> None:
        self._pods: dict[str, Obj] = {}
        self._by_pool_state: dict[tuple[Any, Any], dict[str, Obj]] = {}

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

    def in_pool(self, pool_id: str, state: str) -> Iterable[Obj]:
        """The pods labelled with this pool and state (a live view: copy it before awaiting)."""
        return self._by_pool_state.get((pool_id, state), {}).values()

    def claimable(self, pool_id: str) -> list[Obj]:
        """The ready generic pods of a pool."""
        return [pod for pod in self.in_pool(pool_id, labels.STATE_GENERIC) if ready(pod)]

    def replace(self, pods: Iterable[Obj]) -> None:
        """Forget every pod and keep `pods` (a fresh list)."""
        self._pods = {}
        self._by_pool_state = {}
        for pod in pods:
            self.put(pod)

    def put(self, pod: Obj) -> None:
        """A pod the watch saw added or modified."""
        name = pod["metadata"]["name"]
        self.remove(name)
        self._pods[name] = pod
        self._by_pool_state.setdefault(_index_key(pod), {})[name] = pod

    def remove(self, name: str) -> None:
        """A pod the watch saw deleted."""
        old = self._pods.pop(name, None)
        if old is None:
            return
        key = _index_key(old)
        bucket = self._by_pool_state[key]
        del bucket[name]
        if not bucket:
            del self._by_pool_state[key]

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
        self.put(pod)
