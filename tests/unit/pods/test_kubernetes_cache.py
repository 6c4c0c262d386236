"""The Kubernetes pod source's cache and its (pool, state) index, fed plain pod dicts as watch events would.

The watch itself, claims racing over real pods and the relabels run against a real API server in
tests/apiserver/test_pods_kubernetes.py.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from ember.pods.kubernetes.cache import PodCache, memory_limit_mib, oom_kills, ready
from ember.resources import labels

Obj = dict[str, Any]
GENERIC, CLAIMED, SPECIALIZED = labels.STATE_GENERIC, labels.STATE_CLAIMED, labels.STATE_SPECIALIZED


def _pod(name: str, pool: str | None, state: str | None, *, version: int = 1, is_ready: bool = True) -> Obj:
    pod_labels = {labels.MANAGED_BY: labels.MANAGER}
    if pool is not None:
        pod_labels[labels.POOL] = pool
    if state is not None:
        pod_labels[labels.STATE] = state
    return {
        "metadata": {"name": name, "resourceVersion": str(version), "labels": pod_labels},
        "status": {
            "podIP": "10.0.0.1",
            "conditions": [{"type": "Ready", "status": "True" if is_ready else "False"}],
        },
    }


def _names(pods: Any) -> set[str]:
    return {pod["metadata"]["name"] for pod in pods}


def _full_scan(cache: PodCache, pool: str) -> set[str]:
    """What a claim looked at before the index: every cached pod, filtered by its labels and readiness."""
    return {
        name
        for name, pod in cache.view.items()
        if pod["metadata"]["labels"].get(labels.POOL) == pool
        and pod["metadata"]["labels"].get(labels.STATE) == GENERIC
        and ready(pod)
    }


def test_index_follows_added_modified_and_deleted_pods() -> None:
    cache = PodCache()
    cache.put(_pod("a", "p1", GENERIC))
    cache.put(_pod("b", "p1", GENERIC))
    cache.put(_pod("c", "p2", GENERIC))
    assert _names(cache.in_pool("p1", GENERIC)) == {"a", "b"}
    assert _names(cache.in_pool("p2", GENERIC)) == {"c"}

    cache.put(_pod("a", "p1", CLAIMED, version=2))  # MODIFIED: claimed, it leaves the generic pods
    assert _names(cache.in_pool("p1", GENERIC)) == {"b"}
    assert _names(cache.in_pool("p1", CLAIMED)) == {"a"}

    cache.put(_pod("b", "p1", GENERIC, version=2, is_ready=False))  # MODIFIED: no longer ready
    assert _names(cache.in_pool("p1", GENERIC)) == {"b"}
    assert cache.claimable("p1") == []

    cache.remove("c")  # DELETED
    cache.remove("never-seen")
    assert _names(cache.in_pool("p2", GENERIC)) == set()
    assert set(cache) == {"a", "b"}


def test_relist_replaces_the_index() -> None:
    cache = PodCache()
    cache.put(_pod("old", "p1", GENERIC))
    cache.replace([_pod("new", "p1", GENERIC), _pod("other", "p2", SPECIALIZED)])
    assert _names(cache.in_pool("p1", GENERIC)) == {"new"}
    assert _names(cache.in_pool("p2", SPECIALIZED)) == {"other"}


def test_a_stale_reply_moves_nothing_and_a_deleted_pod_stays_out() -> None:
    cache = PodCache()
    cache.put(_pod("a", "p1", CLAIMED, version=5))
    cache.store(_pod("a", "p1", GENERIC, version=4))  # a PATCH reply older than the watch event
    assert _names(cache.in_pool("p1", CLAIMED)) == {"a"}
    assert _names(cache.in_pool("p1", GENERIC)) == set()
    cache.store(_pod("a", "p1", SPECIALIZED, version=6))
    assert _names(cache.in_pool("p1", SPECIALIZED)) == {"a"}
    assert _names(cache.in_pool("p1", CLAIMED)) == set()
    cache.remove("a")
    cache.store(_pod("a", "p1", SPECIALIZED, version=7))
    assert len(cache) == 0


POOLS = ["p1", "p2", "p3", None]
STATES = [GENERIC, CLAIMED, SPECIALIZED, None]
pods = st.builds(
    _pod,
    name=st.sampled_from(["a", "b", "c", "d", "e", "f"]),
    pool=st.sampled_from(POOLS),
    state=st.sampled_from(STATES),
    version=st.integers(min_value=1, max_value=9),
    is_ready=st.booleans(),
)
events = st.one_of(
    st.tuples(st.just("put"), pods),
    st.tuples(st.just("store"), pods),
    st.tuples(st.just("remove"), st.sampled_from(["a", "b", "c", "d", "e", "f"])),
    st.tuples(st.just("replace"), st.lists(pods, max_size=6)),
)


@given(st.lists(events, max_size=40))
def test_claim_candidates_equal_the_full_scan(history: list[tuple[str, Any]]) -> None:
    cache = PodCache()
    for kind, arg in history:
        getattr(cache, kind)(arg)
        for pool in POOLS[:-1]:
            assert _names(cache.claimable(pool)) == _full_scan(cache, pool)
        indexed = [pod for pool in POOLS for state in STATES for pod in cache.in_pool(pool, state)]  # type: ignore[arg-type]
        assert len(indexed) == len(cache)  # every pod in exactly one bucket
        assert _names(indexed) == set(cache)


def _killed(state: str, container_id: str) -> Obj:
    terminated = {"terminated": {"reason": "OOMKilled", "containerID": container_id, "exitCode": 137}}
    return {"restartCount": 1, state: terminated}


def test_containers_killed_at_their_memory_limit_are_named_once_each() -> None:
    pod: Obj = {"status": {"containerStatuses": [_killed("lastState", "containerd://a")]}}
    assert oom_kills(pod) == ["containerd://a"]
    both = {"restartCount": 1, "state": _killed("state", "c://b")["state"], "lastState": _killed("x", "c://b")["x"]}
    assert oom_kills({"status": {"containerStatuses": [both]}}) == ["c://b"]
    other = {"lastState": {"terminated": {"reason": "Error", "containerID": "c://c"}}}
    assert oom_kills({"status": {"containerStatuses": [other]}}) == []
    assert oom_kills({}) == []
    assert oom_kills({"status": {"containerStatuses": None}}) == []


def test_a_pods_memory_limit_in_mib() -> None:
    def limit(value: Any) -> Obj:
        return {"spec": {"containers": [{"resources": {"limits": {"memory": value}}}]}}

    assert memory_limit_mib(limit("256Mi")) == 256
    assert memory_limit_mib(limit("1Gi")) == 1024
    assert memory_limit_mib(limit(str(128 * 2**20))) == 128
    assert [memory_limit_mib(limit(v)) for v in ("lots", "", None, "-5Mi")] == [0, 0, 0, 0]
    assert memory_limit_mib({"spec": {"containers": []}}) == 0
    assert memory_limit_mib({}) == 0
