"""The cluster activator's claim holder and Lease duration settings (`ember.activator_main`)."""

from __future__ import annotations

import pytest

from ember.activator_main import DEFAULT_LEASE_S, SettingsError, holder_of_process, parse_args


def test_in_a_pod_the_pod_name_is_the_holder() -> None:
    assert holder_of_process({"POD_NAME": "ember-activator-5f7d-abcde"}, hostname="node-1", pid=1) == (
        "ember-activator-5f7d-abcde"
    )


def test_host_processes_are_told_apart_by_pid() -> None:
    one = holder_of_process({}, hostname="Build.Example.com", pid=100)
    two = holder_of_process({"POD_NAME": " "}, hostname="Build.Example.com", pid=101)
    assert one != two
    assert one.startswith("build-example-com-100")


def test_lease_duration_from_environment_and_flag() -> None:
    env = {"EMBER_NAMESPACES": "team"}
    assert parse_args([], env).lease_s == DEFAULT_LEASE_S
    assert parse_args([], {**env, "EMBER_ACTIVATOR_LEASE_S": "6"}).lease_s == 6.0
    assert parse_args(["--lease-s", "30"], {**env, "EMBER_ACTIVATOR_LEASE_S": "6"}).lease_s == 30.0


@pytest.mark.parametrize(
    ("value", "message"),
    [("soon", "'soon' .* is not a number"), ("1", "must be 3-3600 seconds"), ("nan", "must be 3-3600 seconds")],
)
def test_bad_lease_durations_name_the_setting(value: str, message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        parse_args([], {"EMBER_NAMESPACES": "team", "EMBER_ACTIVATOR_LEASE_S": value})
