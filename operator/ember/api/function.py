"""The `Function` resource: what a user wants to run and how it is reached, scaled and secured."""

from __future__ import annotations

import re
from typing import Annotated, ClassVar, Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from ember.api.common import (
    DNS_LABEL_PATTERN,
    Model,
    PrinterColumn,
    Resource,
    Status,
    cel,
    validations,
)
from ember.api.http import Http

Runtime = Literal["python3.11", "python3.12", "nodejs20"]
RUNTIMES: tuple[str, ...] = ("python3.11", "python3.12", "nodejs20")

INLINE_CODE_MAX_BYTES = 256 * 1024
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
ALIAS_PATTERN = r"^[a-z][a-z0-9-]{0,62}$"
SHA256_PATTERN = r"^[0-9a-f]{64}$"
HANDLER_PATTERN = r"^[A-Za-z_][A-Za-z0-9_./-]*\.[A-Za-z_$][A-Za-z0-9_$]*$"


class ObjectRef(Model):
    """A reference to another object in the same namespace."""

    name: str = Field(min_length=1, max_length=253, pattern=DNS_LABEL_PATTERN, description="Object name.")


class KeyRef(Model):
    """A reference to one key of a ConfigMap or Secret in the same namespace."""

    name: str = Field(min_length=1, max_length=253, description="Name of the ConfigMap or Secret.")
    key: str | None = Field(
        default=None, max_length=253, description="Key inside it; all keys (as files) when omitted."
    )


_CODE_SOURCES = ("inline", "configMapRef", "url", "path")


class Code(Model):
    """Where a function's code comes from: exactly one of inline, configMapRef, url (+ sha256), path."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "[has(self.inline), has(self.configMapRef), has(self.url), has(self.path)].filter(x, x).size() == 1",
                "spec.code must set exactly one of inline, configMapRef, url, path",
            ),
            cel("!has(self.url) || has(self.sha256)", "spec.code.url requires spec.code.sha256"),
            cel("!has(self.sha256) || has(self.url)", "spec.code.sha256 is only used with spec.code.url"),
        )
    )

    inline: str | None = Field(
        default=None,
        max_length=INLINE_CODE_MAX_BYTES,
        description="Source code of a single file, in the manifest (at most 256 KiB).",
    )
    filename: str | None = Field(
        default=None,
        max_length=255,
        pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$",
        description="File name for inline code; defaults to the handler's module plus the runtime's extension.",
    )
    config_map_ref: KeyRef | None = Field(
        default=None, description="A ConfigMap holding the code: one file per key, or a zip under one key."
    )
    url: str | None = Field(
        default=None,
        max_length=2048,
        pattern=r"^(https?|file)://.+$",
        description="Where to fetch the code (a source file or a zip archive); needs sha256.",
    )
    sha256: str | None = Field(
        default=None, pattern=SHA256_PATTERN, description="Hex SHA-256 the bytes at url must have."
    )
    path: str | None = Field(
        default=None,
        max_length=4096,
        description="Local mode only: a file or directory relative to the manifest; ember dev watches it.",
    )

    @model_validator(mode="after")
    def _exactly_one_source(self) -> Code:
        given = [name for name in _CODE_SOURCES if getattr(self, _snake(name)) is not None]
        if len(given) != 1:
            found = ", ".join(given) if given else "none"
            raise ValueError(f"spec.code must set exactly one of inline, configMapRef, url, path (found: {found})")
        if self.url is not None and self.sha256 is None:
            raise ValueError("spec.code.url requires spec.code.sha256 (the hex SHA-256 of the bytes)")
        if self.sha256 is not None and self.url is None:
            raise ValueError("spec.code.sha256 is only used with spec.code.url")
        return self


def _snake(camel: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in camel)


class Resources(Model):
    """Memory and CPU of one function pod."""

    memory_mib: int = Field(
        default=128, ge=64, le=10240, alias="memoryMiB", description="Memory limit in MiB (64-10240)."
    )
    cpu_millicores: int | None = Field(
        default=None,
        ge=50,
        le=8000,
        description="CPU limit in millicores (50-8000); proportional to memory when omitted, as in Lambda.",
    )
    auto_resize: bool = Field(
        default=False, description="Apply the measured right-size recommendation to new Versions."
    )


class Scaling(Model):
    """How many specialized pods a Version may have and when they go away."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.minScale) || !has(self.maxScale) || self.minScale <= self.maxScale",
                "spec.scaling.minScale must not exceed spec.scaling.maxScale",
            )
        )
    )

    min_scale: int = Field(default=0, ge=0, le=1000, description="Specialized pods kept even when idle.")
    max_scale: int = Field(default=10, ge=1, le=1000, description="Upper bound of specialized pods.")
    keep_alive_seconds: int = Field(
        default=300, ge=0, le=86400, description="Idle time after which a pod above minScale is released."
    )
    target_utilization: float = Field(
        default=0.7,
        ge=0.1,
        le=1.0,
        description="Fraction of concurrency the autoscaler aims to use (headroom for bursts).",
    )
    predictive: bool = Field(default=False, description="Prewarm ahead of periodic load the predictor detects.")

    @model_validator(mode="after")
    def _min_not_above_max(self) -> Scaling:
        if self.min_scale > self.max_scale:
            raise ValueError(
                f"spec.scaling.minScale ({self.min_scale}) must not exceed spec.scaling.maxScale ({self.max_scale})"
            )
        return self


class TrafficTarget(Model):
    """A share of unqualified traffic: either a fixed Version number or the latest ready Version."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "has(self.version) != (has(self.latest) && self.latest)",
                "each spec.traffic entry sets exactly one of version or latest: true",
            )
        )
    )

    version: int | None = Field(default=None, ge=1, description="A Version number of this Function.")
    latest: bool | None = Field(default=None, description="Follow the latest ready Version.")
    percent: int = Field(ge=0, le=100, description="Share of traffic in percent.")

    @model_validator(mode="after")
    def _version_or_latest(self) -> TrafficTarget:
        if (self.version is not None) == bool(self.latest):
            raise ValueError("each spec.traffic entry sets exactly one of version or latest: true")
        return self


class Alias(Model):
    """A named pointer to a Version, optionally splitting some traffic to a second one."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "has(self.additionalVersion) == has(self.additionalWeight)",
                "an alias sets additionalVersion and additionalWeight together",
            )
        )
    )

    version: int = Field(ge=1, description="The Version the alias points to.")
    additional_version: int | None = Field(default=None, ge=1, description="A second Version for a canary.")
    additional_weight: int | None = Field(
        default=None, ge=0, le=100, description="Percent of the alias's traffic sent to additionalVersion."
    )

    @model_validator(mode="after")
    def _pair(self) -> Alias:
        if (self.additional_version is None) != (self.additional_weight is None):
            raise ValueError("an alias sets additionalVersion and additionalWeight together")
        return self


class EventSource(Model):
    """A queue polled by Ember, with invocations matched to the Function's capacity."""

    name: str = Field(pattern=DNS_LABEL_PATTERN, max_length=63, description="Name of the source, unique per Function.")
    type: Literal["redis-stream", "nats-jetstream"] = Field(description="Kind of queue.")
    connection_secret_ref: KeyRef = Field(
        description="Secret key holding the connection URL (redis:// or rediss://); key `url` when omitted."
    )
    stream: str = Field(min_length=1, max_length=256, description="Stream (Redis) or subject (NATS) to consume.")
    consumer_group: str | None = Field(
        default=None, max_length=256, description="Consumer group; defaults to ember-<namespace>-<function>."
    )
    batch_size: int = Field(default=1, ge=1, le=100, description="Messages per invocation.")
    batch_window_ms: int = Field(
        default=0, ge=0, le=300000, description="Longest wait to fill a batch once its first message came; 0: none."
    )
    max_concurrency: int | None = Field(
        default=None, ge=1, le=1000, description="Upper bound of concurrent invocations from this source."
    )
    max_retries: int = Field(default=3, ge=0, le=100, description="Attempts before a message goes to dead letters.")
    dead_letter_stream: str | None = Field(default=None, max_length=256, description="Where failed messages go.")
    enabled: bool = Field(default=True, description="Pause consumption without deleting the source.")


class Destination(Model):
    """Where the record of an asynchronous invocation goes: a Function, or a stream of a broker."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("has(self.function) != has(self.stream)", "a destination sets exactly one of function or stream"),
            cel(
                "has(self.stream) ? has(self.type) && has(self.connectionSecretRef)"
                " : !has(self.type) && !has(self.connectionSecretRef)",
                "a stream destination sets type and connectionSecretRef (and a function destination neither)",
            ),
        )
    )

    function: str | None = Field(default=None, pattern=DNS_LABEL_PATTERN, max_length=63, description="A Function.")
    stream: str | None = Field(
        default=None, min_length=1, max_length=256, description="A Redis stream or NATS JetStream subject."
    )
    type: Literal["redis-stream", "nats-jetstream"] | None = Field(
        default=None, description="Kind of broker of `stream`."
    )
    connection_secret_ref: KeyRef | None = Field(
        default=None, description="Secret key holding the broker's URL (as an event source's); key `url` when omitted."
    )

    @model_validator(mode="after")
    def _one(self) -> Destination:
        if (self.function is None) == (self.stream is None):
            raise ValueError("a destination sets exactly one of function or stream")
        broker = (self.type is not None, self.connection_secret_ref is not None)
        if broker != ((True, True) if self.stream is not None else (False, False)):
            raise ValueError(
                "a stream destination sets type and connectionSecretRef (and a function destination neither)"
            )
        return self


class AsyncConfig(Model):
    """Asynchronous invocation: retries, event age and destinations, as in Lambda."""

    max_retries: int = Field(default=2, ge=0, le=2, description="Retries after a failed attempt (0-2).")
    max_event_age_seconds: int = Field(
        default=21600, ge=60, le=21600, description="Events older than this are dropped to onFailure."
    )
    on_success: Destination | None = Field(default=None, description="Where successful results are sent.")
    on_failure: Destination | None = Field(default=None, description="Where failed events are sent.")


class StateVolume(Model):
    """A volume shared by every pod of the Function."""

    size_mib: int = Field(default=1024, alias="sizeMiB", ge=1, le=1048576, description="Size of the volume in MiB.")
    mount_path: str = Field(default="/mnt/state", pattern=r"^/", max_length=1024, description="Mount path.")
    storage_class_name: str | None = Field(default=None, max_length=253, description="StorageClass of the volume.")

    # Where a pod keeps what it runs on (its /tmp, the code directory, the agent, the sandbox's own
    # mounts, the system): a volume at, above or inside one of them would hide or break it.
    RESERVED_PATHS: ClassVar[tuple[tuple[str, str], ...]] = (
        ("/tmp", "the pod's private /tmp"),
        ("/var/ember/code", "the code directory"),
        ("/opt/ember", "the runtime agent"),
        ("/run/ember", "the local sandbox's socket folder"),
        *((p, "a system folder") for p in ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib64", "/proc", "/sys", "/dev")),
    )

    @field_validator("mount_path")
    @classmethod
    def _mount_path_free(cls, path: str) -> str:
        if not re.fullmatch(r"(/[A-Za-z0-9_][A-Za-z0-9._-]*)+", path):
            raise ValueError(
                f"spec.state.volume.mountPath ({path!r}) must be an absolute path, not '/', of names made of "
                "letters, digits, '.', '_' and '-' that do not start with '.', with no trailing '/'"
            )
        for reserved, what in cls.RESERVED_PATHS:
            if path == reserved or path.startswith(reserved + "/") or reserved.startswith(path + "/"):
                raise ValueError(
                    f"spec.state.volume.mountPath ({path}) collides with {reserved}, {what}: mount the volume "
                    "elsewhere, e.g. /mnt/state"
                )
        return path


class State(Model):
    """Shared state reachable from every instance of the Function."""

    key_value: bool = Field(default=False, description="A key-value store scoped to the Function.")
    volume: StateVolume | None = Field(default=None, description="A shared volume.")


class Portion(Model):
    """A part of the Function's code run in its own sandbox pool under its own SecurityPolicy.

    Code calls it with `context.invoke_portion(name, event)`, through Ember only: the Function's
    handler may call every portion, a portion only those in its `calls` (ember/resources/portions.py)."""

    name: str = Field(pattern=DNS_LABEL_PATTERN, max_length=20, description="Name of the portion.")
    handler: str = Field(max_length=256, pattern=HANDLER_PATTERN, description="module.function of the portion.")
    security_policy_ref: ObjectRef = Field(description="SecurityPolicy the portion runs under.")
    calls: list[Annotated[str, Field(pattern=DNS_LABEL_PATTERN, max_length=20)]] = Field(
        default_factory=list,
        max_length=8,
        description="Other portions this one may call (the Function's handler may call every portion); "
        "a call to a portion of a higher trustLevel is refused.",
    )


class Freeze(Model):
    """Freezing idle pods instead of keeping them running."""

    enabled: bool = Field(default=False, description="Freeze specialized pods after idleSeconds without requests.")
    idle_seconds: int = Field(default=30, ge=1, le=3600, description="Idle time before a pod is frozen.")


class FunctionSpec(Model):
    """Desired state of a Function."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.traffic) || size(self.traffic) == 0 || self.traffic.map(t, t.percent).sum() == 100",
                "spec.traffic percents must sum to 100",
            ),
            cel(
                "!has(self.portions) || self.portions.all(p, self.portions.exists_one(q, q.name == p.name))",
                "spec.portions: names must be unique",
            ),
            cel(
                "!has(self.eventSources) || "
                "self.eventSources.all(e, self.eventSources.exists_one(f, f.name == e.name))",
                "spec.eventSources: names must be unique",
            ),
            cel(
                "!has(self.portions) || self.portions.all(p, !has(p.calls) || "
                "p.calls.all(c, c != p.name && self.portions.exists(q, q.name == c)))",
                "spec.portions[].calls must name other portions of this Function",
            ),
        )
    )

    runtime: Runtime = Field(description="Language runtime: python3.11, python3.12 or nodejs20.")
    handler: str = Field(
        max_length=256,
        pattern=HANDLER_PATTERN,
        description="Entry point as module.function (Python) or file.export (Node.js).",
    )
    code: Code = Field(description="Where the code comes from.")
    env: dict[str, str] = Field(
        default_factory=dict, max_length=256, description="Environment variables of the function."
    )
    resources: Resources = Field(default_factory=Resources, description="Memory and CPU per pod.")
    timeout_seconds: int = Field(default=3, ge=1, le=900, description="Longest an invocation may run (1-900).")
    concurrency: int = Field(default=1, ge=1, le=1000, description="Invocations in flight at once on one pod.")
    scaling: Scaling = Field(default_factory=Scaling, description="Scaling bounds and behaviour.")
    security_policy_ref: ObjectRef | None = Field(
        default=None, description="SecurityPolicy in the same namespace; the namespace's default when omitted."
    )
    traffic: list[TrafficTarget] = Field(
        default_factory=list,
        max_length=8,
        description="Split of unqualified traffic; all of it to the latest ready Version when empty.",
    )
    aliases: dict[str, Alias] = Field(
        default_factory=dict, max_length=32, description="Named pointers to Versions, usable as qualifiers."
    )
    http: Http | None = Field(default=None, description="HTTP routes to the Function.")
    event_sources: list[EventSource] = Field(
        default_factory=list, max_length=16, description="Queues that trigger the Function."
    )
    async_: AsyncConfig = Field(
        default_factory=AsyncConfig, alias="async", description="Asynchronous invocation settings."
    )
    state: State | None = Field(default=None, description="Shared state of the Function.")
    portions: list[Portion] = Field(
        default_factory=list,
        max_length=8,
        description="Parts of the code run in sandboxes of their own under their own SecurityPolicy.",
    )
    freeze: Freeze = Field(default_factory=Freeze, description="Freezing of idle pods.")

    @field_validator("env")
    @classmethod
    def _env_names(cls, env: dict[str, str]) -> dict[str, str]:
        bad = [name for name in env if not re.match(ENV_NAME_PATTERN, name)]
        if bad:
            raise ValueError(f"environment variable names must match {ENV_NAME_PATTERN}: {', '.join(bad)}")
        return env

    @field_validator("aliases")
    @classmethod
    def _alias_names(cls, aliases: dict[str, Alias]) -> dict[str, Alias]:
        bad = [name for name in aliases if not re.match(ALIAS_PATTERN, name) or name == "latest"]
        if bad:
            raise ValueError(f"alias names must match {ALIAS_PATTERN} and not be 'latest': {', '.join(bad)}")
        return aliases

    @model_validator(mode="after")
    def _event_source_names(self) -> FunctionSpec:
        names = [source.name for source in self.event_sources]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"spec.eventSources: names must be unique ({', '.join(twice)} more than once)")
        return self

    @model_validator(mode="after")
    def _portion_calls(self) -> FunctionSpec:
        names = [p.name for p in self.portions]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"spec.portions: names must be unique ({', '.join(twice)} more than once)")
        for i, portion in enumerate(self.portions):
            unknown = [c for c in portion.calls if c not in names]
            if unknown:
                known = ", ".join(names)
                raise ValueError(f"spec.portions[{i}].calls: no portion named {', '.join(unknown)} (portions: {known})")
            if portion.name in portion.calls:
                raise ValueError(f"spec.portions[{i}].calls: portion {portion.name!r} calls itself")
        cycle = _call_cycle({p.name: p.calls for p in self.portions})
        if cycle:
            raise ValueError(f"spec.portions: calls go round in a cycle ({' -> '.join(cycle)})")
        return self

    @model_validator(mode="after")
    def _traffic_sums_to_100(self) -> FunctionSpec:
        if self.traffic:
            total = sum(t.percent for t in self.traffic)
            if total != 100:
                raise ValueError(f"spec.traffic percents must sum to 100 (they sum to {total})")
        return self


def _call_cycle(calls: dict[str, list[str]]) -> list[str]:
    """A cycle in the portions' calls, as the names along it (first repeated last), or []."""
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> list[str]:
        if name in path:
            return [*path[path.index(name) :], name]
        if name in done:
            return []
        for callee in calls.get(name, []):
            found = visit(callee, [*path, name])
            if found:
                return found
        done.add(name)
        return []

    for name in calls:
        found = visit(name, [])
        if found:
            return found
    return []


class FunctionStatus(Status):
    """Observed state of a Function."""

    latest_version: int | None = Field(default=None, description="Number of the newest Version.")
    ready_version: int | None = Field(default=None, description="Number of the newest Version that can serve.")
    url: str | None = Field(default=None, description="Where to invoke the Function.")
    routes: list[str] = Field(
        default_factory=list, description="HTTP routes the activator serves, e.g. GET /users/{id}."
    )


class Function(Resource):
    """A function: code, configuration, triggers and scaling; the operator makes Versions of it."""

    KIND: ClassVar[str] = "Function"
    PLURAL: ClassVar[str] = "functions"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("fn",)
    PRINTER_COLUMNS: ClassVar[tuple[PrinterColumn, ...]] = (
        PrinterColumn(name="Latest", type="integer", json_path=".status.latestVersion"),
        PrinterColumn(name="Ready", type="string", json_path='.status.conditions[?(@.type=="Ready")].status'),
        PrinterColumn(name="URL", type="string", json_path=".status.url"),
        PrinterColumn(name="Routes", type="string", json_path=".status.routes"),
        PrinterColumn(name="Age", type="date", json_path=".metadata.creationTimestamp"),
        PrinterColumn(name="Runtime", type="string", json_path=".spec.runtime", priority=1),
        PrinterColumn(name="Serving", type="integer", json_path=".status.readyVersion", priority=1),
    )

    kind: Literal["Function"] = Field(default="Function", description="Always Function.")
    spec: FunctionSpec = Field(description="Desired state.")
    status: FunctionStatus | None = Field(default=None, description="Observed state, written by the operator.")
