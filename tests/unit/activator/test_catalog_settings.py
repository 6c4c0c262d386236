"""Settings of the cluster activator (`ember.activator_main`): environment and flags, with bad input."""

from __future__ import annotations

import pytest

from ember.activator_main import DEFAULT_PORT, SettingsError, namespace_of, parse_args


def test_chart_environment_is_honoured() -> None:
    env = {"EMBER_ACTIVATOR_PORT": "9090", "EMBER_NAMESPACES": "team", "POD_NAME": "act-1"}
    args = parse_args([], env)
    assert (args.port, args.namespace, args.holder) == (9090, "team", "act-1")
    assert args.host == "0.0.0.0"


def test_the_services_proxy_listens_where_pods_reach_this_activator() -> None:
    args = parse_args([], {"EMBER_NAMESPACES": "t", "POD_IP": "10.244.0.7"})
    assert (args.services_address, args.services_port) == ("10.244.0.7", 8090)
    args = parse_args([], {"EMBER_NAMESPACES": "t", "POD_IP": "10.244.0.7", "EMBER_SERVICES_ADDRESS": "fd00::1"})
    assert args.services_address == "fd00::1"
    assert parse_args([], {"EMBER_NAMESPACES": "t"}).services_address == ""  # off: no address known


def test_the_public_gateway_port_is_off_unless_set() -> None:
    assert parse_args([], {"EMBER_NAMESPACES": "t"}).gateway_port is None
    assert parse_args([], {"EMBER_NAMESPACES": "t", "EMBER_GATEWAY_PORT": "8081"}).gateway_port == 8081
    flag = parse_args(["--gateway-port", "0"], {"EMBER_NAMESPACES": "t", "EMBER_GATEWAY_PORT": "8081"})
    assert flag.gateway_port == 0


def test_flags_override_the_environment() -> None:
    args = parse_args(["--port", "0", "--namespace", "other", "--host", "127.0.0.1"], {"EMBER_NAMESPACES": "team"})
    assert (args.port, args.namespace, args.host) == (0, "other", "127.0.0.1")
    assert parse_args([], {"EMBER_NAMESPACES": " team "}).port == DEFAULT_PORT
    assert parse_args([], {"EMBER_NAMESPACES": "t", "EMBER_POOL_DEMAND_WINDOW_S": "15"}).pool_demand_window_s == 15


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        ([], {"EMBER_NAMESPACES": "team", "EMBER_ACTIVATOR_PORT": "http"}, "'http' .* is not a number"),
        (["--port", "70000"], {"EMBER_NAMESPACES": "team"}, "port 70000 .* must be 0-65535"),
        (["--port", "-1"], {"EMBER_NAMESPACES": "team"}, "must be 0-65535"),
        ([], {}, "exactly one namespace"),
        ([], {"EMBER_NAMESPACES": "a,b"}, "EMBER_NAMESPACES='a,b'.*exactly one namespace"),
        ([], {"EMBER_NAMESPACES": "t", "EMBER_POOL_DEMAND_WINDOW_S": "soon"}, "'soon' .*EMBER_POOL_DEMAND_WINDOW_S"),
        (["--pool-demand-window-s", "0"], {"EMBER_NAMESPACES": "t"}, "window 0.0 .* must be 1-3600 seconds"),
        ([], {"EMBER_NAMESPACES": "t", "EMBER_SERVICES_PORT": "x"}, "'x' .*EMBER_SERVICES_PORT.* not a number"),
        (["--services-port", "65536"], {"EMBER_NAMESPACES": "t"}, "services port 65536 .* must be 0-65535"),
        ([], {"EMBER_NAMESPACES": "t", "EMBER_GATEWAY_PORT": "public"}, "'public' .*EMBER_GATEWAY_PORT.* not a number"),
        (["--gateway-port", "99999"], {"EMBER_NAMESPACES": "t"}, "gateway port 99999 .* must be 0-65535"),
        ([], {"EMBER_NAMESPACES": "t", "POD_IP": "pod.local"}, "'pod.local' .*POD_IP\\) is not an IP address"),
    ],
)
def test_bad_settings_name_what_is_wrong(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message):
        parse_args(argv, env)


def test_namespace_list_forms() -> None:
    assert namespace_of("team,") == "team"
    with pytest.raises(SettingsError):
        namespace_of(" , ")


def test_the_async_store_is_a_redis_url_or_a_file() -> None:
    base = {"EMBER_NAMESPACES": "t"}
    assert parse_args([], base).async_store == "/tmp/ember/async-{holder}.db"  # filled in per process
    redis = parse_args([], {**base, "EMBER_ASYNC_STORE": "redis://:pw@redis.ember:6379/0"}).async_store
    assert redis == "redis://:pw@redis.ember:6379/0"
    assert parse_args(["--async-store", "/var/lib/ember/a.db"], base).async_store == "/var/lib/ember/a.db"
    with pytest.raises(SettingsError, match=r"'amqp://u:\*\*\*@mq:5672/' .*EMBER_ASYNC_STORE.* neither a redis://"):
        parse_args([], {**base, "EMBER_ASYNC_STORE": "amqp://u:secret@mq:5672/"})


def test_right_sizing_settings_from_the_environment_and_bad_ones_named() -> None:
    env = {"EMBER_NAMESPACES": "ns", "EMBER_SIZING_INTERVAL_S": "5", "EMBER_SIZING_MIN_SAMPLES": "7"}
    args = parse_args([], env)
    assert (args.sizing_interval_s, args.sizing_min_samples) == (5.0, 7)
    defaults = parse_args([], {"EMBER_NAMESPACES": "ns"})
    assert (defaults.sizing_interval_s, defaults.sizing_min_samples) == (60.0, 20)
    for bad in (
        {"EMBER_SIZING_INTERVAL_S": "soon"},
        {"EMBER_SIZING_MIN_SAMPLES": "0"},
        {"EMBER_SIZING_INTERVAL_S": "-1"},
    ):
        with pytest.raises(SettingsError, match="EMBER_SIZING"):
            parse_args([], {"EMBER_NAMESPACES": "ns", **bad})
