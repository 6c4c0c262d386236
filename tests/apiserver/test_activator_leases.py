"""Activator holder Leases and the dead-holder sweep of the Kubernetes pod source, against a real kube-apiserver.

Pods are Pod objects created here with the labels activators give them (no kubelet runs in this tier,
and none is needed: the sweep reads labels and deletes). Leases are the pod sources' own, or made by
hand to stand for an activator that died. The sweeper's monotonic clock is injected so that expiry
is decided at exact instants; everything else (Lease create, renew with resourceVersion, take-over,
delete with preconditions, pod watch and deletes) is the real API server's. The live-replica count the
scaler divides a Function's bounds by is read off the same Leases. The pure verdict is
tests/unit/pods/test_kubernetes_leases.py; two activator processes on real pods are tests/cluster.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from kubernetes import client
from kubernetes_asyncio import client as aclient
from kubernetes_asyncio import config as aconfig
from tests.apiserver.operator_harness import Ember, crds, ember, ns

from ember.pods.base import PoolUnavailable
from ember.pods.kubernetes import CLAIMED_BY, KubernetesPodSource, lease_name

__all__ = ["crds", "ember", "ns"]

SELECTOR = "app.kubernetes.io/managed-by=ember-operator"


@pytest.fixture
async def api(kubeconfig: Path) -> AsyncIterator[aclient.ApiClient]:
    configuration = aclient.Configuration()
    await aconfig.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    async with aclient.ApiClient(configuration) as api_client:
        yield api_client


@pytest.fixture
def leases(crds: client.ApiClient) -> client.CoordinationV1Api:
    return client.CoordinationV1Api(crds)


@pytest.fixture
def core(ember: Ember) -> client.CoreV1Api:
    # No controller-manager in this tier: pods need the namespace's default ServiceAccount made by hand.
    ember.core.create_namespaced_service_account(ember.ns, {"metadata": {"name": "default"}})
    return ember.core


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _pod(core: client.CoreV1Api, ns: str, name: str, state: str, holder: str | None) -> None:
    pod_labels = {"app.kubernetes.io/managed-by": "ember-operator", "ember.run/state": state}
    if holder is not None:
        pod_labels[CLAIMED_BY] = holder
    body = {
        "metadata": {"name": name, "labels": pod_labels},
        "spec": {"containers": [{"name": "agent", "image": "localhost/ember-runtime-python:dev"}]},
    }
    core.create_namespaced_pod(ns, body)


def _dead_lease(leases: client.CoordinationV1Api, ns: str, holder: str, *, duration_s: int = 5) -> None:
    """The Lease a crashed activator left: right labels, never renewed again."""
    body = {
        "metadata": {
            "name": lease_name(holder),
            "labels": {"app.kubernetes.io/managed-by": "ember-operator", "ember.run/component": "activator"},
        },
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": duration_s,
        },
    }
    leases.create_namespaced_lease(ns, body)


def _pod_names(core: client.CoreV1Api, ns: str) -> set[str]:
    return {p.metadata.name for p in core.list_namespaced_pod(ns).items if p.metadata.deletion_timestamp is None}


def _lease_names(leases: client.CoordinationV1Api, ns: str) -> set[str]:
    return {lease.metadata.name for lease in leases.list_namespaced_lease(ns).items}


async def _cached(source: KubernetesPodSource, names: set[str]) -> None:
    for _ in range(100):
        if names <= set(source.cached_pods):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"pods {sorted(names - set(source.cached_pods))} never reached the source's cache")


async def test_start_creates_the_lease_renewal_updates_it_and_close_deletes_it(
    api: aclient.ApiClient, ember: Ember, leases: client.CoordinationV1Api
) -> None:
    source = KubernetesPodSource(api, namespace=ember.ns, holder="act-a", lease_duration_s=9)
    try:
        await source.start()
        lease = leases.read_namespaced_lease("ember-activator-act-a", ember.ns)
        assert lease.spec.holder_identity == "act-a"
        assert lease.spec.lease_duration_seconds == 9
        assert lease.metadata.labels["ember.run/component"] == "activator"
        first_version, first_renew = lease.metadata.resource_version, lease.spec.renew_time

        await asyncio.sleep(0.01)
        await source.renew_lease()
        renewed = leases.read_namespaced_lease("ember-activator-act-a", ember.ns)
        assert renewed.metadata.resource_version != first_version
        assert renewed.spec.renew_time > first_renew
        assert renewed.spec.acquire_time == lease.spec.acquire_time

        # Renewed in the background every lease_duration_s / 3 (this event loop runs the renewer).
        for _ in range(100):
            current = leases.read_namespaced_lease("ember-activator-act-a", ember.ns).metadata.resource_version
            if current != renewed.metadata.resource_version:
                break
            await asyncio.sleep(0.1)
        else:
            raise AssertionError("the Lease was not renewed in the background within 10 s")
    finally:
        await source.close()
    assert "ember-activator-act-a" not in _lease_names(leases, ember.ns)


async def test_a_lease_deleted_under_a_live_activator_is_recreated_and_a_foreign_write_taken_over(
    api: aclient.ApiClient, ember: Ember, leases: client.CoordinationV1Api
) -> None:
    source = KubernetesPodSource(api, namespace=ember.ns, holder="act-a", lease_duration_s=60)
    try:
        await source.start()
        leases.delete_namespaced_lease("ember-activator-act-a", ember.ns)
        await source.renew_lease()
        assert leases.read_namespaced_lease("ember-activator-act-a", ember.ns).spec.holder_identity == "act-a"
        # Someone else writes it (a second process with the same holder): the renewal still wins.
        leases.patch_namespaced_lease("ember-activator-act-a", ember.ns, {"spec": {"holderIdentity": "intruder"}})
        await source.renew_lease()
        lease = leases.read_namespaced_lease("ember-activator-act-a", ember.ns)
        assert lease.spec.holder_identity == "act-a"
        assert lease.spec.lease_transitions == 1
    finally:
        await source.close()


async def test_sweep_deletes_pods_of_dead_or_missing_holders_and_never_a_live_ones(
    api: aclient.ApiClient, ember: Ember, core: client.CoreV1Api, leases: client.CoordinationV1Api
) -> None:
    ns = ember.ns
    _dead_lease(leases, ns, "act-dead", duration_s=5)
    clock = FakeClock()
    # A long own lease keeps the background loops (every 20 s) out of the way of the sweeps below.
    sweeper = KubernetesPodSource(api, namespace=ns, holder="act-sweeper", lease_duration_s=60, clock=clock)
    live = KubernetesPodSource(api, namespace=ns, holder="act-live", lease_duration_s=5)
    doomed = {"dead-specialized", "dead-claimed", "gone-specialized", "no-holder", "empty-holder", "bad-holder"}
    kept = {"live-specialized", "live-claimed", "mine", "dead-but-generic"}
    try:
        await sweeper.start()
        await live.start()
        _pod(core, ns, "dead-specialized", "specialized", "act-dead")
        _pod(core, ns, "dead-claimed", "claimed", "act-dead")
        _pod(core, ns, "gone-specialized", "specialized", "act-gone")  # its holder never had a Lease here
        _pod(core, ns, "no-holder", "specialized", None)
        _pod(core, ns, "empty-holder", "specialized", "")
        _pod(core, ns, "bad-holder", "specialized", "Not_A.DNS_Label")
        _pod(core, ns, "live-specialized", "specialized", "act-live")
        _pod(core, ns, "live-claimed", "claimed", "act-live")
        _pod(core, ns, "mine", "specialized", "act-sweeper")
        _pod(core, ns, "dead-but-generic", "generic", "act-dead")
        await _cached(sweeper, doomed | kept)

        assert await sweeper.sweep_dead_holders() == []  # first sight: every clock starts now
        clock.now += 4
        await live.renew_lease()
        assert await sweeper.sweep_dead_holders() == []  # act-dead's 5 s are not over yet
        clock.now += 1
        await live.renew_lease()
        assert await sweeper.sweep_dead_holders() == ["dead-claimed", "dead-specialized"]
        assert "ember-activator-act-dead" not in _lease_names(leases, ns)
        assert _pod_names(core, ns) == (doomed | kept) - {"dead-claimed", "dead-specialized"}

        # A missing Lease is given the sweeper's own lease duration (60 s) before its pods go.
        clock.now += 55
        await live.renew_lease()
        deleted = await sweeper.sweep_dead_holders()
        assert set(deleted) == {"gone-specialized", "no-holder", "empty-holder", "bad-holder"}
        assert _pod_names(core, ns) == kept
        assert {"ember-activator-act-live", "ember-activator-act-sweeper"} <= _lease_names(leases, ns)

        # Level-based: nothing more to do, however often it runs.
        clock.now += 1
        await live.renew_lease()
        assert await sweeper.sweep_dead_holders() == []
        assert _pod_names(core, ns) == kept
    finally:
        await live.close()
        await sweeper.close()


async def test_a_lease_renewed_after_it_was_listed_survives_the_sweep(
    api: aclient.ApiClient, ember: Ember, core: client.CoreV1Api, leases: client.CoordinationV1Api
) -> None:
    """The expired Lease is deleted under a resourceVersion precondition: a renewal landing in between stays."""
    ns = ember.ns
    _dead_lease(leases, ns, "act-slow", duration_s=5)
    clock = FakeClock()
    sweeper = KubernetesPodSource(api, namespace=ns, holder="act-sweeper", lease_duration_s=60, clock=clock)
    try:
        await sweeper.start()
        assert await sweeper.sweep_dead_holders() == []
        clock.now += 5
        listed = sweeper._coordination.list_namespaced_lease

        async def list_then_renew(*args: Any, **kwargs: Any) -> Any:
            out = await listed(*args, **kwargs)
            leases.patch_namespaced_lease(lease_name("act-slow"), ns, {"spec": {"leaseTransitions": 1}})
            return out

        sweeper._coordination.list_namespaced_lease = list_then_renew
        await sweeper.sweep_dead_holders()
        assert lease_name("act-slow") in _lease_names(leases, ns), "the renewed Lease must stay"
    finally:
        await sweeper.close()


async def test_a_restarted_activator_deletes_what_its_previous_incarnation_claimed(
    api: aclient.ApiClient, ember: Ember, core: client.CoreV1Api, leases: client.CoordinationV1Api
) -> None:
    ns = ember.ns
    _dead_lease(leases, ns, "act-r", duration_s=15)  # the previous run's Lease, still unexpired
    _pod(core, ns, "old-specialized", "specialized", "act-r")
    _pod(core, ns, "old-claimed", "claimed", "act-r")
    _pod(core, ns, "other", "specialized", "act-other")
    _pod(core, ns, "pool", "generic", None)
    source = KubernetesPodSource(api, namespace=ns, holder="act-r", lease_duration_s=15)
    try:
        await source.start()
        assert _pod_names(core, ns) == {"other", "pool"}
        lease = leases.read_namespaced_lease("ember-activator-act-r", ns)
        assert (lease.spec.holder_identity, lease.spec.lease_transitions) == ("act-r", 1)
    finally:
        await source.close()


async def test_start_fails_naming_the_lease_when_it_cannot_be_created(api: aclient.ApiClient, ember: Ember) -> None:
    source = KubernetesPodSource(api, namespace=f"{ember.ns}-missing", holder="act-a")
    try:
        with pytest.raises(
            PoolUnavailable, match=f"Lease {ember.ns}-missing/ember-activator-act-a: create failed with 404"
        ):
            await source.start()
    finally:
        await source.close()


async def test_live_replicas_count_the_live_leases_from_start_and_follow_joins_deaths_and_closes(
    api: aclient.ApiClient, ember: Ember, leases: client.CoordinationV1Api
) -> None:
    ns = ember.ns
    _dead_lease(leases, ns, "act-crashed", duration_s=5)
    clock = FakeClock()
    one = KubernetesPodSource(api, namespace=ns, holder="act-one", lease_duration_s=60, clock=clock)
    two = KubernetesPodSource(api, namespace=ns, holder="act-two", lease_duration_s=60)
    try:
        await one.start()
        assert one.live_replicas() == 2, "counted at start, before any claim: itself and a Lease not yet seen dead"
        await two.start()
        assert two.live_replicas() == 3
        await one.sweep_dead_holders()
        assert one.live_replicas() == 3
        clock.now += 5
        await two.renew_lease()
        await one.sweep_dead_holders()
        assert one.live_replicas() == 2, "the crashed activator's Lease is dead"
        await two.close()
        await one.sweep_dead_holders()
        assert one.live_replicas() == 1, "a closed activator deleted its Lease"
    finally:
        await two.close()
        await one.close()
