"""The `Version` resource: an immutable, numbered, content-addressed snapshot of a Function."""

from __future__ import annotations

from collections.abc import Mapping
from typing import ClassVar, Literal

from pydantic import ConfigDict, Field

from ember.api.common import (
    DNS_LABEL_PATTERN,
    Model,
    PrinterColumn,
    Resource,
    Status,
    cel,
    content_digest,
    validations,
)
from ember.api.function import FunctionSpec
from ember.api.security_policy import SecurityPolicySpec, policy_hash

Phase = Literal["Pending", "Loading", "Ready", "Failed", "Retired"]

# The parts of a FunctionSpec that make a new Version when they change: what runs and how.
# Scaling, traffic, aliases, triggers and async settings only change how Versions are reached,
# so editing them must not mint a Version (traffic naming a Version would otherwise chase itself).
VERSIONED_FIELDS: tuple[str, ...] = (
    "runtime",
    "handler",
    "code",
    "env",
    "resources",
    "timeoutSeconds",
    "concurrency",
    "securityPolicyRef",
    "state",
    "portions",
    "freeze",
)


def code_hash(
    spec: FunctionSpec,
    policy: SecurityPolicySpec,
    resolved_code_digest: str | None = None,
    portion_policies: Mapping[str, SecurityPolicySpec] | None = None,
) -> str:
    """Content hash of what a Version runs and under which policy: `sha256:<hex>`, equal for equal content.

    The effective SecurityPolicy is part of it, so a policy edit makes a new Version that rolls out
    like any other change (the old one serves, under its old pool, until the new one is ready).
    `resolved_code_digest` is the digest of code the spec only points to (a ConfigMap or a local
    path); the caller reads it, since the bytes live outside the spec. Inline code and url + sha256
    are already content in the spec. The policies of the Function's portions are part of it too
    (a Version's portions are as immutable as the Version).
    """
    wire = spec.model_dump(by_alias=True, exclude_none=True, mode="json")
    content = {name: wire[name] for name in VERSIONED_FIELDS if name in wire}
    content["policy"] = policy_hash(policy)
    if resolved_code_digest is not None:
        content["resolvedCode"] = resolved_code_digest
    if portion_policies:
        content["portionPolicies"] = {name: policy_hash(p) for name, p in sorted(portion_policies.items())}
    return "sha256:" + content_digest(content)


def version_name(function_name: str, number: int) -> str:
    """Name of a Function's Version object, e.g. hello-v3."""
    return f"{function_name}-v{number}"


class VersionSpec(Model):
    """What the Version runs; set once by the operator and never changed."""

    model_config = ConfigDict(json_schema_extra=validations(cel("self == oldSelf", "a Version's spec is immutable")))

    function_name: str = Field(pattern=DNS_LABEL_PATTERN, max_length=63, description="The Function it belongs to.")
    number: int = Field(ge=1, description="Version number, 1, 2, 3... per Function.")
    code_hash: str = Field(pattern=r"^sha256:[0-9a-f]{64}$", description="Content hash of code and config.")
    function: FunctionSpec = Field(description="Frozen copy of the Function's effective spec.")
    policy: SecurityPolicySpec = Field(
        description="Frozen copy of the SecurityPolicy the Version runs under (the Function's, else the "
        "namespace's default, else the built-in default); part of the content hash."
    )
    policy_name: str | None = Field(
        default=None,
        pattern=DNS_LABEL_PATTERN,
        max_length=253,
        description="Name of the SecurityPolicy copied into policy (absent: the built-in default).",
    )
    portion_policies: dict[str, SecurityPolicySpec] = Field(
        default_factory=dict,
        max_length=8,
        description="Frozen copy of each portion's SecurityPolicy, by portion name; part of the content hash.",
    )


class ResourceRecommendation(Model):
    """Right-sizing advice from measured invocations (`ember.scaling.rightsize`)."""

    memory_mib: int = Field(ge=64, le=10240, alias="memoryMiB", description="Recommended memory in MiB.")
    cpu_millicores: int | None = Field(
        default=None, ge=50, le=8000, description="Recommended CPU (advice only: autoResize applies memory)."
    )
    samples: int = Field(default=0, ge=0, le=10**12, description="Invocations the advice is based on.")
    peak_mib: int | None = Field(
        default=None, ge=0, le=1048576, alias="peakMiB", description="p99 of the measured worker peaks, in MiB."
    )
    out_of_memory_at_mib: int | None = Field(
        default=None,
        ge=1,
        le=10240,
        alias="outOfMemoryAtMiB",
        description="The largest pod size (MiB) at which it ran out of memory; no size at or below it is advised.",
    )
    reason: str = Field(default="", max_length=1024, description="Why, for people.")


class VersionResources(Model):
    """The memory and CPU the Version's new pods get, and why."""

    memory_mib: int = Field(ge=64, le=10240, alias="memoryMiB", description="Memory limit of new pods in MiB.")
    cpu_millicores: int | None = Field(
        default=None, ge=50, le=8000, description="CPU limit of new pods (absent: proportional to memory)."
    )
    reason: str = Field(default="", max_length=1024, description="Where the size comes from, for people.")


class VersionStatus(Status):
    """Observed state of a Version."""

    phase: Phase | None = Field(
        default=None, description="Pending, Loading, Ready, Failed or Retired; derived from the conditions."
    )
    ready_pods: int = Field(default=0, ge=0, description="Specialized pods that can take invocations.")
    warm_pods: int = Field(default=0, ge=0, description="Generic pods ready to be specialized for it.")
    recommendation: ResourceRecommendation | None = Field(default=None, description="Right-sizing advice.")
    resources: VersionResources | None = Field(
        default=None,
        description="The size its new pods get: spec.resources, or the recommendation with autoResize.",
    )


class Version(Resource):
    """An immutable snapshot of a Function's code and configuration, made by the operator."""

    KIND: ClassVar[str] = "Version"
    PLURAL: ClassVar[str] = "versions"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("fnv",)
    PRINTER_COLUMNS: ClassVar[tuple[PrinterColumn, ...]] = (
        PrinterColumn(name="Function", type="string", json_path=".spec.functionName"),
        PrinterColumn(name="Number", type="integer", json_path=".spec.number"),
        PrinterColumn(name="Phase", type="string", json_path=".status.phase"),
        PrinterColumn(name="Ready", type="integer", json_path=".status.readyPods"),
        PrinterColumn(
            name="Memory",
            type="integer",
            json_path=".status.resources.memoryMiB",
            description="MiB its new pods get (spec.resources.memoryMiB, or the recommendation with autoResize).",
        ),
        PrinterColumn(
            name="Recommended",
            type="integer",
            json_path=".status.recommendation.memoryMiB",
            description="MiB right-sizing recommends from its measured invocations.",
        ),
        PrinterColumn(name="Age", type="date", json_path=".metadata.creationTimestamp"),
        PrinterColumn(name="Hash", type="string", json_path=".spec.codeHash", priority=1),
        PrinterColumn(name="Sized", type="string", json_path=".status.resources.reason", priority=1),
    )

    kind: Literal["Version"] = Field(default="Version", description="Always Version.")
    spec: VersionSpec = Field(description="What the Version runs.")
    status: VersionStatus | None = Field(default=None, description="Observed state, written by the operator.")
