"""Operator configuration from the environment (the chart sets it), checked once at start."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from ember.api.function import RUNTIMES
from ember.resources.policy import DEFAULT_POLICY_NAME
from ember.resources.pool import BURST_CPU_MILLICORES, ActivatorPeer


class SettingsError(ValueError):
    """A setting is malformed; the message names the variable and what is allowed."""


@dataclass(frozen=True)
class Settings:
    """What the operator needs to know beyond the resources it watches."""

    keep_versions: int = 3
    image_registry: str = "localhost"
    image_tag: str = "dev"
    runtime_images: Mapping[str, str] = field(default_factory=dict)
    pool_sizes: Mapping[str, int] = field(default_factory=dict)
    default_pool_size: int = 1
    max_pool_size: int = 20  # ceiling of a pool's replicas, however many claims the activators report
    activator_url: str = "http://ember-activator.ember-system.svc:8080"
    namespaces: tuple[str, ...] = ()
    default_policy_name: str = DEFAULT_POLICY_NAME
    run_as_user: int = 65532
    image_pull_policy: str = "IfNotPresent"
    pool_cpu_burst_millicores: int = BURST_CPU_MILLICORES
    activators: ActivatorPeer = field(default_factory=ActivatorPeer)  # the only pods that reach agents

    def image_for(self, runtime: str) -> str:
        """Runtime image: an override, else <registry>/ember-runtime-<runtime>:<tag> (runtime-images/<runtime>/)."""
        return self.runtime_images.get(runtime) or f"{self.image_registry}/ember-runtime-{runtime}:{self.image_tag}"

    def pool_size_for(self, runtime: str) -> int:
        """Generic pods a pool of this runtime keeps at least (its floor; demand adds to it)."""
        return self.pool_sizes.get(runtime, self.default_pool_size)

    def function_url(self, namespace: str, name: str) -> str:
        """Where a Function is invoked through the activator (Ember's invoke API)."""
        return f"{self.activator_url.rstrip('/')}/v1/namespaces/{namespace}/functions/{name}/invoke"


_DEFAULTS = Settings()


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingsError(f"{name}={raw!r} is not an integer") from None
    if value < minimum:
        raise SettingsError(f"{name}={value} must be at least {minimum}")
    return value


def _pairs(env: Mapping[str, str], name: str) -> dict[str, str]:
    """`runtime=value,runtime=value` with known runtimes only."""
    out: dict[str, str] = {}
    raw = env.get(name, "").strip()
    if not raw:
        return out
    for item in raw.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or not key or not value:
            raise SettingsError(f"{name}: {item.strip()!r} is not runtime=value")
        if key not in RUNTIMES:
            raise SettingsError(f"{name}: unknown runtime {key!r} (known: {', '.join(RUNTIMES)})")
        out[key] = value
    return out


# a label key's optional DNS-subdomain prefix and its name; a value (may be empty)
_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


def _activators(env: Mapping[str, str]) -> ActivatorPeer:
    """EMBER_ACTIVATOR_NAMESPACE and EMBER_ACTIVATOR_POD_LABELS (`key=value,key=value`)."""
    namespace = env.get("EMBER_ACTIVATOR_NAMESPACE") or _DEFAULTS.activators.namespace
    if not _DNS_LABEL.match(namespace):
        raise SettingsError(f"EMBER_ACTIVATOR_NAMESPACE={namespace!r} is not a namespace name")
    raw = env.get("EMBER_ACTIVATOR_POD_LABELS", "").strip()
    if not raw:
        return ActivatorPeer(namespace=namespace)
    pairs: list[tuple[str, str]] = []
    for item in raw.split(","):
        key, sep, value = item.strip().partition("=")
        if not sep or not _LABEL_KEY.match(key) or not _LABEL_VALUE.match(value):
            raise SettingsError(f"EMBER_ACTIVATOR_POD_LABELS: {item.strip()!r} is not label-key=label-value")
        pairs.append((key, value))
    return ActivatorPeer(namespace=namespace, pod_labels=tuple(pairs))


def from_env(env: Mapping[str, str]) -> Settings:
    """Settings from EMBER_* variables; raises SettingsError naming the first bad one."""
    sizes: dict[str, int] = {}
    for runtime, raw in _pairs(env, "EMBER_POOL_SIZES").items():
        if not raw.isdigit():
            raise SettingsError(f"EMBER_POOL_SIZES: {runtime}={raw!r} is not a non-negative integer")
        sizes[runtime] = int(raw)
    namespaces = tuple(ns.strip() for ns in env.get("EMBER_NAMESPACES", "").split(",") if ns.strip())
    return Settings(
        keep_versions=_int(env, "EMBER_KEEP_VERSIONS", _DEFAULTS.keep_versions, minimum=1),
        image_registry=env.get("EMBER_IMAGE_REGISTRY") or _DEFAULTS.image_registry,
        image_tag=env.get("EMBER_IMAGE_TAG") or _DEFAULTS.image_tag,
        runtime_images=_pairs(env, "EMBER_RUNTIME_IMAGES"),
        pool_sizes=sizes,
        default_pool_size=_int(env, "EMBER_POOL_SIZE", _DEFAULTS.default_pool_size, minimum=0),
        max_pool_size=_int(env, "EMBER_POOL_MAX_SIZE", _DEFAULTS.max_pool_size, minimum=0),
        activator_url=env.get("EMBER_ACTIVATOR_URL") or _DEFAULTS.activator_url,
        namespaces=namespaces,
        default_policy_name=env.get("EMBER_DEFAULT_POLICY") or _DEFAULTS.default_policy_name,
        run_as_user=_int(env, "EMBER_RUN_AS_USER", _DEFAULTS.run_as_user, minimum=1),
        image_pull_policy=env.get("EMBER_IMAGE_PULL_POLICY") or _DEFAULTS.image_pull_policy,
        pool_cpu_burst_millicores=_int(
            env, "EMBER_POOL_CPU_BURST_MILLICORES", _DEFAULTS.pool_cpu_burst_millicores, minimum=0
        ),
        activators=_activators(env),
    )
