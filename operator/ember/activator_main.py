"""Entry point of the activator in a cluster: `python -m ember.activator_main` (the chart's command).

Settings come from the environment the chart sets, each overridable by a flag:
`EMBER_ACTIVATOR_PORT` (`--port`, default 8080), `EMBER_ACTIVATOR_HOST` (`--host`, default
0.0.0.0), `EMBER_GATEWAY_PORT` (`--gateway-port`, off when empty: a second listener on the same
host serving only HTTP routes and function URLs, the one to expose publicly; see
`ember.activator.gateway.public_app`), `EMBER_NAMESPACES` (`--namespace`; one namespace: the pod
source and the catalog work per namespace), `POD_NAME` (the claim holder),
`EMBER_SERVICES_ADDRESS` (`--services-address`, default `POD_IP`: the address function pods
reach this activator's services proxy at; none: auxiliary services are off, and a Function whose
policy lists some fails to load, saying so), `EMBER_SERVICES_PORT` (`--services-port`, default
8090: the proxy's port on that address; see `ember.pods.services`), `EMBER_ASYNC_STORE`
(`--async-store`: where asynchronous invocations wait: a `redis://` or `rediss://` URL, shared
by the replicas (the chart sets it from a Secret), or a SQLite file path, this replica's alone;
default `/tmp/ember/async-<holder>.db`, with a warning), `EMBER_ACTIVATOR_LEASE_S` (`--lease-s`, default
15: the holder Lease's duration; see `ember.pods.kubernetes.leases`),
`EMBER_POOL_DEMAND_WINDOW_S` (`--pool-demand-window-s`, default 60: the window over which claims
per pool are published as demand; see `ember.scaling.pool_demand`), `EMBER_SIZING_INTERVAL_S`
(`--sizing-interval-s`, default 60: a Version's right-sizing advice is published on it at most
once per interval, unless it ran out of memory; see `ember.activator.sizing`),
`EMBER_SIZING_MIN_SAMPLES` (`--sizing-min-samples`, default 20: invocations measured before it
advises), `EMBER_LOG_LEVEL`. The API
server is reached in-cluster when `KUBERNETES_SERVICE_HOST` is set, else through `KUBECONFIG`
(or ~/.kube/config).

The holder names this activator's claims and its Lease, so it must be unique among the activators
of a namespace: the pod name in a pod (the chart sets `POD_NAME`), else `<host name>-<pid>` (two
processes on one host never share it), folded into a DNS label by `holder_name`. A restarted
container keeps its pod name and so finds, and deletes, the pods its previous run left. The
pod source's count of live activator Leases (`live_replicas`) is what the scaler divides each
Function's `minScale` and `maxScale` by.

Generic pool sizes are the operator's: the activator claims from the pools and publishes how many
pods it claimed per pool (on its Lease); the operator resizes the pools from that and its floor
(`EMBER_POOL_SIZE`). SIGTERM/SIGINT: readiness off, the listener closes,
in-flight invocations finish, the activator's pods are released, the watches and the pod source
stop.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping
from pathlib import Path

from aiohttp import web
from kubernetes_asyncio import client as kclient
from kubernetes_asyncio import config as kconfig
from kubernetes_asyncio.config.config_exception import ConfigException

from ember.activator import keys
from ember.activator.app import make_app
from ember.activator.catalog import Catalog
from ember.activator.config import ActivatorConfig
from ember.activator.gateway import public_app
from ember.pods.base import PodSourceError
from ember.pods.kubernetes import KubernetesPodSource, holder_name
from ember.pods.kubernetes.secrets import ApiSecrets
from ember.pods.services import ServiceProxy
from ember.resources.pool import SERVICES_PORT
from ember.scaling.pool_demand import DEFAULT_WINDOW_S
from ember.sources.redis_streams import RedisStore
from ember.sources.sqlite import SqliteStore
from ember.sources.store import EventStore, StoreError, redacted
from ember.state.redis import RedisKeyValueStore
from ember.state.sqlite import SqliteKeyValueStore
from ember.state.store import KeyValueStore

log = logging.getLogger("ember.activator")

DEFAULT_PORT = 8080
DEFAULT_HOST = "0.0.0.0"  # a pod's listener; the Service fronts it
DEFAULT_LEASE_S = 15.0
SIZING = ActivatorConfig()  # right-sizing's defaults


class SettingsError(ValueError):
    """A setting of the activator is wrong; the message names the variable or flag."""


def namespace_of(value: str) -> str:
    """The single namespace an EMBER_NAMESPACES value names."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    if len(names) != 1:
        raise SettingsError(
            f"EMBER_NAMESPACES={value!r}: the activator serves exactly one namespace; "
            "run one activator per namespace (or set --namespace)"
        )
    return names[0]


def parse_args(argv: list[str], env: Mapping[str, str]) -> argparse.Namespace:
    """Flags, with defaults from the environment; bad values raise SettingsError."""
    parser = argparse.ArgumentParser(prog="ember.activator_main", description="Run the Ember activator in a cluster.")
    parser.add_argument("--host", default=env.get("EMBER_ACTIVATOR_HOST", DEFAULT_HOST))
    parser.add_argument("--port", default=env.get("EMBER_ACTIVATOR_PORT", str(DEFAULT_PORT)))
    parser.add_argument("--gateway-port", default=env.get("EMBER_GATEWAY_PORT", ""))
    parser.add_argument("--async-store", default=env.get("EMBER_ASYNC_STORE", ""))
    parser.add_argument("--namespace", default=None, help="the namespace to serve (default: EMBER_NAMESPACES)")
    parser.add_argument("--log-level", default=env.get("EMBER_LOG_LEVEL", "INFO"))
    parser.add_argument("--lease-s", default=env.get("EMBER_ACTIVATOR_LEASE_S", str(DEFAULT_LEASE_S)))
    parser.add_argument("--pool-demand-window-s", default=env.get("EMBER_POOL_DEMAND_WINDOW_S", str(DEFAULT_WINDOW_S)))
    parser.add_argument("--services-address", default=env.get("EMBER_SERVICES_ADDRESS") or env.get("POD_IP", ""))
    parser.add_argument("--services-port", default=env.get("EMBER_SERVICES_PORT", str(SERVICES_PORT)))
    parser.add_argument(
        "--sizing-interval-s", default=env.get("EMBER_SIZING_INTERVAL_S", str(SIZING.sizing_interval_s))
    )
    parser.add_argument(
        "--sizing-min-samples", default=env.get("EMBER_SIZING_MIN_SAMPLES", str(SIZING.sizing_min_samples))
    )
    args = parser.parse_args(argv)
    try:
        args.sizing_interval_s = float(args.sizing_interval_s)
        args.sizing_min_samples = int(args.sizing_min_samples)
    except ValueError:
        raise SettingsError(
            f"right-sizing settings {args.sizing_interval_s!r}, {args.sizing_min_samples!r} (EMBER_SIZING_INTERVAL_S, "
            "EMBER_SIZING_MIN_SAMPLES) must be a number of seconds and a whole number"
        ) from None
    if not 0 <= args.sizing_interval_s <= 86400 or not 1 <= args.sizing_min_samples <= 100_000:
        raise SettingsError(
            f"right-sizing interval {args.sizing_interval_s} (EMBER_SIZING_INTERVAL_S) must be 0-86400 seconds and "
            f"its samples {args.sizing_min_samples} (EMBER_SIZING_MIN_SAMPLES) 1-100000"
        )
    try:
        args.services_port = int(args.services_port)
    except ValueError:
        raise SettingsError(
            f"services port {args.services_port!r} (EMBER_SERVICES_PORT or --services-port) is not a number"
        ) from None
    if not 0 <= args.services_port <= 65535:
        raise SettingsError(
            f"services port {args.services_port} (EMBER_SERVICES_PORT or --services-port) must be 0-65535"
        )
    if args.services_address:
        try:
            args.services_address = str(ipaddress.ip_address(args.services_address))
        except ValueError:
            raise SettingsError(
                f"services address {args.services_address!r} (EMBER_SERVICES_ADDRESS, --services-address or "
                "POD_IP) is not an IP address"
            ) from None
    try:
        args.pool_demand_window_s = float(args.pool_demand_window_s)
    except ValueError:
        raise SettingsError(
            f"pool demand window {args.pool_demand_window_s!r} (EMBER_POOL_DEMAND_WINDOW_S or "
            "--pool-demand-window-s) is not a number"
        ) from None
    if not 1 <= args.pool_demand_window_s <= 3600:
        raise SettingsError(
            f"pool demand window {args.pool_demand_window_s} (EMBER_POOL_DEMAND_WINDOW_S or "
            "--pool-demand-window-s) must be 1-3600 seconds"
        )
    try:
        args.lease_s = float(args.lease_s)
    except ValueError:
        raise SettingsError(
            f"lease duration {args.lease_s!r} (EMBER_ACTIVATOR_LEASE_S or --lease-s) is not a number"
        ) from None
    if not 3 <= args.lease_s <= 3600:
        raise SettingsError(
            f"lease duration {args.lease_s} (EMBER_ACTIVATOR_LEASE_S or --lease-s) must be 3-3600 seconds"
        )
    try:
        args.port = int(args.port)
    except ValueError:
        raise SettingsError(f"port {args.port!r} (EMBER_ACTIVATOR_PORT or --port) is not a number") from None
    if not 0 <= args.port <= 65535:
        raise SettingsError(f"port {args.port} (EMBER_ACTIVATOR_PORT or --port) must be 0-65535")
    args.gateway_port = _gateway_port(args.gateway_port)
    args.async_store = _async_store(args.async_store)
    if args.namespace is None:
        args.namespace = namespace_of(env.get("EMBER_NAMESPACES", ""))
    args.holder = holder_of_process(env, hostname=socket.gethostname(), pid=os.getpid())
    return args


DEFAULT_ASYNC_STORE = "/tmp/ember/async-{holder}.db"  # one per process (a restarted pod keeps its name)
DEFAULT_STATE_STORE = "/tmp/ember/state-{holder}.db"  # without Redis, the key-value state is a replica's own


def _async_store(value: str) -> str:
    value = value.strip() or DEFAULT_ASYNC_STORE
    scheme = value.split("://", 1)[0].lower() if "://" in value else ""
    if scheme in ("redis", "rediss"):
        return value
    if scheme:
        raise SettingsError(
            f"async store {redacted(value)!r} (EMBER_ASYNC_STORE or --async-store) is neither a redis:// or "
            "rediss:// URL nor a file path"
        )
    return value


def open_async_store(value: str, namespace: str, holder: str) -> EventStore:
    """The event store a checked `--async-store` names (not started)."""
    if value.startswith(("redis://", "rediss://", "REDIS://", "REDISS://")):
        return RedisStore(value, namespace)
    if value == DEFAULT_ASYNC_STORE:
        value = value.format(holder=holder)
        log.warning(
            "asynchronous invocations are kept in %s: this replica's alone, lost with the pod; set EMBER_ASYNC_STORE "
            "to a Redis URL to share them between replicas and keep them",
            value,
        )
    return SqliteStore(Path(value))


def open_state_store(value: str, holder: str) -> KeyValueStore:
    """The key-value state store (`ember.state`) beside a checked `--async-store`: the same Redis, so
    every replica sees one state, linearizable per key; else a SQLite file of this replica's own."""
    if value.lower().startswith(("redis://", "rediss://")):
        return RedisKeyValueStore(value)
    path = Path(DEFAULT_STATE_STORE.format(holder=holder))
    log.warning(
        "key-value state (spec.state.keyValue) is kept in %s: this replica's alone, lost with the pod; set "
        "EMBER_ASYNC_STORE to a Redis URL to share it between replicas and keep it",
        path,
    )
    return SqliteKeyValueStore(path)


def _gateway_port(value: str) -> int | None:
    if not value.strip():
        return None
    try:
        port = int(value)
    except ValueError:
        raise SettingsError(f"gateway port {value!r} (EMBER_GATEWAY_PORT or --gateway-port) is not a number") from None
    if not 0 <= port <= 65535:
        raise SettingsError(f"gateway port {port} (EMBER_GATEWAY_PORT or --gateway-port) must be 0-65535")
    return port


def holder_of_process(env: Mapping[str, str], *, hostname: str, pid: int) -> str:
    """This activator's claim holder: its pod name in a pod, `<host>-<pid>` elsewhere (see the docstring)."""
    pod_name = env.get("POD_NAME", "").strip()
    return holder_name(pod_name or f"{hostname}-{pid}")


async def load_api_config() -> kclient.Configuration:
    """In-cluster configuration inside a pod, else the kubeconfig."""
    configuration = kclient.Configuration()
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        kconfig.load_incluster_config(client_configuration=configuration)  # type: ignore[no-untyped-call]
    else:
        await kconfig.load_kube_config(
            config_file=os.environ.get("KUBECONFIG") or None, client_configuration=configuration
        )
    return configuration


async def serve(args: argparse.Namespace, stop: asyncio.Event) -> int:
    """Run until `stop` is set."""
    configuration = await load_api_config()
    async with kclient.ApiClient(configuration) as api:
        secrets = ApiSecrets(api)
        services = ServiceProxy(secrets)
        services_base = ""
        if args.services_address:
            port = await services.serve_tcp(args.services_address, args.services_port)
            host = f"[{args.services_address}]" if ":" in args.services_address else args.services_address
            services_base = f"http://{host}:{port}"
        else:
            log.warning("no services address (EMBER_SERVICES_ADDRESS or POD_IP): auxiliary services are off")
        source = KubernetesPodSource(
            api,
            services=services,
            services_base=services_base,
            namespace=args.namespace,
            holder=args.holder,
            lease_duration_s=args.lease_s,
            demand_window_s=args.pool_demand_window_s,
        )
        app = make_app(
            source,
            ActivatorConfig(
                default_namespace=args.namespace,
                warm_pool_size=0,
                sizing_interval_s=args.sizing_interval_s,
                sizing_min_samples=args.sizing_min_samples,
            ),
            replicas=source.live_replicas,
            credentials=secrets,
            store=open_async_store(args.async_store, args.namespace, args.holder),
            state=open_state_store(args.async_store, args.holder),
            holder=args.holder,
        )
        catalog = Catalog(
            api,
            app[keys.REGISTRY],
            namespace=args.namespace,
            on_change=app[keys.SCALER].poke,
        )
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=30.0)
        public: web.AppRunner | None = None
        if args.gateway_port is not None:
            public = web.AppRunner(public_app(app), access_log=None, handle_signals=False, shutdown_timeout=30.0)
        try:
            await source.start()
            await catalog.start()
            await runner.setup()
            site = web.TCPSite(runner, args.host, args.port)
            await site.start()
            bound = runner.addresses[0][1] if runner.addresses else args.port
            gateway = "off"
            if public is not None:
                await public.setup()
                await web.TCPSite(public, args.host, args.gateway_port).start()
                gateway = f"http://{args.host}:{public.addresses[0][1]}"
            # One line tests and people can read the ports from (port 0 picks a free one).
            print(
                f"ember activator: listening on http://{args.host}:{bound} namespace={args.namespace} "
                f"holder={args.holder} services={services_base or 'off'} gateway={gateway} "
                f"async={app[keys.ASYNC].store.description}",
                flush=True,
            )
            await stop.wait()
            log.info("stopping: draining invocations, releasing pods")
        finally:
            if public is not None:
                await public.cleanup()  # first: the public listener closes, its in-flight calls finish
            await runner.cleanup()  # readiness off, listener closed, in-flight finished, pods released
            await catalog.close()
            await source.close()
            await services.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse settings and run the activator until SIGTERM/SIGINT."""
    try:
        args = parse_args(sys.argv[1:] if argv is None else argv, os.environ)
    except SettingsError as err:
        print(f"ember activator: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s level=%(levelname)s logger=%(name)s %(message)s"
    )

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        return await serve(args, stop)

    try:
        return asyncio.run(run())
    except ConfigException as err:
        print(f"ember activator: no Kubernetes configuration: {err}", file=sys.stderr)
        return 2
    except StoreError as err:  # the async store cannot be opened: a wrong URL, Redis down
        print(f"ember activator: {err}", file=sys.stderr)
        return 1
    except PodSourceError as err:  # e.g. the Lease cannot be created: RBAC without coordination.k8s.io
        print(f"ember activator: cannot start the pod source: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
