"""Pieces shared by every Ember resource: base model, object metadata, conditions, CRD hints."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

GROUP = "ember.run"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# Names end up inside pod, ConfigMap and label values (`<function>-v<number>-<suffix>`), which
# Kubernetes caps at 63 characters; 40 leaves room for the suffixes.
NAME_MAX_LENGTH = 40
DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


def content_digest(value: Any) -> str:
    """SHA-256 (hex) of a JSON value in canonical form: equal for equal content, whatever the key order."""
    canonical = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(canonical).hexdigest()


class Model(BaseModel):
    """Base of every API model: camelCase on the wire, unknown fields rejected, no silent coercion."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        strict=False,
        validate_default=False,
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as the API server stores it: camelCase, without unset optionals."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def cel(rule: str, message: str) -> dict[str, str]:
    """One CEL rule for `x-kubernetes-validations`; the message is what `kubectl apply` shows."""
    return {"rule": rule, "message": message}


def validations(*rules: dict[str, str]) -> dict[str, Any]:
    """`json_schema_extra` carrying CEL rules into the generated CRD."""
    return {"x-kubernetes-validations": list(rules)}


class OwnerReference(Model):
    """A Kubernetes owner reference (set by the operator on Versions)."""

    api_version: str = Field(description="apiVersion of the owner.")
    kind: str = Field(description="Kind of the owner.")
    name: str = Field(description="Name of the owner.")
    uid: str = Field(description="UID of the owner.")
    controller: bool | None = Field(default=None, description="Whether the owner is the managing controller.")
    block_owner_deletion: bool | None = Field(
        default=None, description="Whether the owner cannot be deleted before this object."
    )


class ObjectMeta(Model):
    """Kubernetes object metadata: what users write plus the fields the API server adds."""

    name: str = Field(
        min_length=1,
        max_length=NAME_MAX_LENGTH,
        pattern=DNS_LABEL_PATTERN,
        description="Object name, a DNS label of at most 40 characters.",
    )
    namespace: str = Field(default="default", pattern=DNS_LABEL_PATTERN, description="Namespace of the object.")
    labels: dict[str, str] = Field(default_factory=dict, description="Kubernetes labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Kubernetes annotations.")
    generate_name: str | None = Field(default=None, description="Set by clients; unused by Ember.")
    uid: str | None = Field(default=None, description="Set by the API server.")
    resource_version: str | None = Field(default=None, description="Set by the API server.")
    generation: int | None = Field(default=None, description="Set by the API server.")
    creation_timestamp: str | None = Field(default=None, description="Set by the API server.")
    deletion_timestamp: str | None = Field(default=None, description="Set by the API server.")
    deletion_grace_period_seconds: int | None = Field(default=None, description="Set by the API server.")
    owner_references: list[OwnerReference] = Field(default_factory=list, description="Owners of this object.")
    finalizers: list[str] = Field(default_factory=list, description="Finalizers of this object.")
    managed_fields: list[dict[str, Any]] = Field(default_factory=list, description="Set by the API server.")
    self_link: str | None = Field(default=None, description="Deprecated; set by old API servers.")


ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(Model):
    """One observation of an object's state, as in Kubernetes' metav1.Condition."""

    type: str = Field(max_length=316, description="Type of condition in CamelCase, e.g. Ready.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(
        default="",
        max_length=1024,
        description="One CamelCase word for machines saying why the condition is in this status.",
    )
    message: str = Field(default="", max_length=32768, description="A sentence for people with the details.")
    last_transition_time: dt.datetime | None = Field(default=None, description="When the status last changed.")
    observed_generation: int | None = Field(
        default=None, ge=0, description="The .metadata.generation this condition was computed from."
    )


class PrinterColumn(Model):
    """One `additionalPrinterColumns` entry of a CRD."""

    name: str
    type: Literal["string", "integer", "number", "boolean", "date"]
    json_path: str
    description: str = ""
    priority: int = 0


class Resource(Model):
    """Common shape of a top-level Ember resource; subclasses set the CRD facts below."""

    KIND: ClassVar[str]
    PLURAL: ClassVar[str]
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ()
    PRINTER_COLUMNS: ClassVar[tuple[PrinterColumn, ...]] = ()
    ROOT_VALIDATIONS: ClassVar[tuple[dict[str, str], ...]] = ()

    api_version: Literal["ember.run/v1alpha1"] = Field(
        default="ember.run/v1alpha1", description="Always ember.run/v1alpha1."
    )
    metadata: ObjectMeta = Field(description="Standard object metadata.")

    @property
    def key(self) -> tuple[str, str]:
        """(namespace, name) of the object."""
        return (self.metadata.namespace, self.metadata.name)


class Status(Model):
    """Fields every Ember status has."""

    model_config = ConfigDict(frozen=False)

    observed_generation: int | None = Field(
        default=None, ge=0, description="The .metadata.generation the status was computed from."
    )
    conditions: list[Condition] = Field(
        default_factory=list, max_length=16, description="Conditions, keyed by type; Ready is always present."
    )
