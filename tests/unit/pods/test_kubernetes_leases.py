"""Holder names, Lease parsing and the dead-holder verdict of the Kubernetes pod source, on plain values.

The Lease calls, the sweep deleting pods and the restart clean-up run against a real API server in
tests/apiserver/test_activator_leases.py; two activators on real pods in tests/cluster.
"""

from __future__ import annotations

import re
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st
from kubernetes_asyncio.client import ApiClient, Configuration

from ember.pods.kubernetes import KubernetesPodSource
from ember.pods.kubernetes.leases import (
    CLAIMED_BY,
    HolderLiveness,
    ObservedLease,
    count_live_replicas,
    holder_name,
    holder_of,
    lease_name,
    parse_lease,
    pods_of_dead_holders,
)

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        pytest.param("ember-activator-7d9f8-x2k4q", "ember-activator-7d9f8-x2k4q", id="pod-name-kept"),
        pytest.param("a", "a", id="one-char"),
    ],
)
def test_a_dns_label_is_its_own_holder_name(raw: str, expected: str) -> None:
    assert holder_name(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param("Build-Host.example.com-4242", id="fqdn-upper"),
        pytest.param("x" * 200, id="long-pod-name"),
        pytest.param("under_score", id="underscore"),
        pytest.param("-lead-and-trail-", id="dashes"),
        pytest.param("", id="empty"),
        pytest.param("é", id="non-ascii"),
    ],
)
def test_other_names_fold_into_a_dns_label(raw: str) -> None:
    assert DNS_LABEL.match(holder_name(raw)), holder_name(raw)


@given(st.text(max_size=300), st.text(max_size=300))
def test_holder_names_are_dns_labels_and_distinct_names_stay_distinct(one: str, two: str) -> None:
    assert DNS_LABEL.match(holder_name(one))
    assert holder_name(holder_name(one)) == holder_name(one)
    if one != two and holder_name(one) == holder_name(two):
        # only a name that is a label already can meet the folded form of another (hash collisions aside)
        assert DNS_LABEL.match(one) or DNS_LABEL.match(two)


def test_two_processes_on_one_host_get_different_holders() -> None:
    assert holder_name("Host.Example-1") != holder_name("Host.Example-2")


@pytest.mark.parametrize(
    ("pod", "expected"),
    [
        pytest.param({"metadata": {"labels": {CLAIMED_BY: "act-a"}}}, "act-a", id="labelled"),
        pytest.param({"metadata": {"labels": {}}}, "", id="no-label"),
        pytest.param({"metadata": {"labels": None}}, "", id="labels-null"),
        pytest.param({"metadata": {}}, "", id="no-labels"),
        pytest.param({}, "", id="no-metadata"),
        pytest.param({"metadata": {"labels": {CLAIMED_BY: 7}}}, "", id="not-a-string"),
    ],
)
def test_holder_of_a_pod_tolerates_malformed_labels(pod: dict[str, Any], expected: str) -> None:
    assert holder_of(pod) == expected


@pytest.mark.parametrize(
    ("obj", "expected"),
    [
        pytest.param(
            {"metadata": {"name": "l", "resourceVersion": "5"}, "spec": {"leaseDurationSeconds": 9}},
            ObservedLease("l", "5", 9.0),
            id="full",
        ),
        pytest.param({"metadata": {"name": "l", "resourceVersion": "5"}}, ObservedLease("l", "5", 15.0), id="no-spec"),
        pytest.param(
            {"metadata": {"name": "l", "resourceVersion": "5"}, "spec": {"leaseDurationSeconds": 0}},
            ObservedLease("l", "5", 15.0),
            id="zero-duration",
        ),
        pytest.param(
            {"metadata": {"name": "l", "resourceVersion": "5"}, "spec": {"leaseDurationSeconds": "9"}},
            ObservedLease("l", "5", 15.0),
            id="string-duration",
        ),
        pytest.param(
            {"metadata": {"name": "l", "resourceVersion": "5"}, "spec": {"leaseDurationSeconds": True}},
            ObservedLease("l", "5", 15.0),
            id="bool-duration",
        ),
        pytest.param({"metadata": {"resourceVersion": "5"}}, None, id="no-name"),
        pytest.param({"metadata": {"name": "l"}}, None, id="no-version"),
        pytest.param({}, None, id="empty"),
    ],
)
def test_parse_lease(obj: dict[str, Any], expected: ObservedLease | None) -> None:
    assert parse_lease(obj, default_duration_s=15.0) == expected


def _lease(holder: str, version: str, duration_s: float = 10.0) -> ObservedLease:
    return ObservedLease(lease_name(holder), version, duration_s)


def test_a_renewed_lease_never_dies_and_an_unrenewed_one_dies_after_its_duration() -> None:
    liveness = HolderLiveness(own=lease_name("me"), missing_duration_s=10.0)
    for t in range(0, 30, 3):
        dead = liveness.observe(float(t), [_lease("live", str(t)), _lease("still", "1")], [])
        assert lease_name("live") not in dead
        assert (lease_name("still") in dead) == (t >= 10)


def test_time_counts_from_when_this_process_saw_the_lease_not_from_its_renew_time() -> None:
    liveness = HolderLiveness(own=lease_name("me"), missing_duration_s=10.0)
    # A Lease last renewed long ago (by its own clock) is first seen at t=100: ten more seconds to live.
    assert liveness.observe(100.0, [_lease("old", "1")], []) == set()
    assert liveness.observe(109.0, [_lease("old", "1")], []) == set()
    assert liveness.observe(110.0, [_lease("old", "1")], []) == {lease_name("old")}


def test_a_missing_lease_of_a_pods_holder_dies_after_the_grace() -> None:
    liveness = HolderLiveness(own=lease_name("me"), missing_duration_s=10.0)
    wanted = {lease_name("gone"), lease_name("")}
    assert liveness.observe(0.0, [], wanted) == set()
    assert liveness.observe(10.0, [], wanted) == wanted


def test_a_lease_that_appears_resets_the_clock() -> None:
    liveness = HolderLiveness(own=lease_name("me"), missing_duration_s=10.0)
    wanted = {lease_name("new")}
    liveness.observe(0.0, [], wanted)  # pod seen before its holder's Lease was listed
    assert liveness.observe(8.0, [_lease("new", "1")], wanted) == set()
    assert liveness.observe(17.0, [_lease("new", "1")], wanted) == set()
    assert liveness.observe(18.0, [_lease("new", "1")], wanted) == wanted


def test_the_own_lease_is_never_dead() -> None:
    liveness = HolderLiveness(own=lease_name("me"), missing_duration_s=1.0)
    liveness.observe(0.0, [_lease("me", "1")], {lease_name("me")})
    assert liveness.observe(100.0, [_lease("me", "1")], {lease_name("me")}) == set()


def _pod(name: str, state: str, holder: object = None, *, deleting: bool = False) -> dict[str, Any]:
    pod_labels: dict[str, object] = {"ember.run/state": state}
    if holder is not None:
        pod_labels[CLAIMED_BY] = holder
    meta: dict[str, Any] = {"name": name, "labels": pod_labels}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"metadata": meta}


def test_pods_of_dead_holders_are_claimed_or_specialized_ones_of_those_holders_only() -> None:
    pods = [
        _pod("dead-specialized", "specialized", "dead"),
        _pod("dead-claimed", "claimed", "dead"),
        _pod("dead-generic", "generic", "dead"),
        _pod("dead-deleting", "specialized", "dead", deleting=True),
        _pod("live", "specialized", "live"),
        _pod("mine", "specialized", "me"),
        _pod("no-holder", "specialized"),
        _pod("bad-holder", "specialized", 12),
        {"metadata": {"labels": None}},
        {},
    ]
    dead = {lease_name("dead"), lease_name(""), lease_name("me")}
    assert pods_of_dead_holders(pods, dead, own="me") == ["bad-holder", "dead-claimed", "dead-specialized", "no-holder"]


@pytest.mark.parametrize("holder", ["Not_A_Label", "", "x" * 64, "UPPER"])
def test_a_source_refuses_a_holder_that_is_not_a_dns_label(holder: str) -> None:
    with pytest.raises(ValueError, match="must be a DNS label"):
        KubernetesPodSource(cast(Any, None), namespace="team", holder=holder)


@pytest.mark.parametrize(
    ("listed", "dead", "count"),
    [
        pytest.param([], set(), 1, id="own-lease-not-listed-yet"),
        pytest.param(["me"], set(), 1, id="alone"),
        pytest.param(["me", "other"], set(), 2, id="two"),
        pytest.param(["other", "third"], set(), 3, id="own-deleted-under-it-still-counts"),
        pytest.param(["me", "other", "crashed"], {"crashed"}, 2, id="dead-lease-not-counted"),
        pytest.param(["me", "other"], {"gone"}, 2, id="missing-holder-not-counted"),
    ],
)
def test_live_replicas_are_the_leases_not_seen_dead_and_this_ones_own(
    listed: list[str], dead: set[str], count: int
) -> None:
    leases = [_lease(name, "1") for name in listed]
    assert count_live_replicas(leases, {lease_name(n) for n in dead}, own=lease_name("me")) == count


async def test_a_source_counts_itself_alone_before_its_first_sweep() -> None:
    async with ApiClient(Configuration()) as api:  # never called: nothing started
        assert KubernetesPodSource(api, namespace="team", holder="me").live_replicas() == 1
