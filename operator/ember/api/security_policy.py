"""The `SecurityPolicy` resource: the sandbox, network and limits a Function runs under."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import ConfigDict, Field, StringConstraints, model_validator

from ember.api.common import DNS_LABEL_PATTERN, Model, PrinterColumn, Resource, Status, cel, content_digest, validations
from ember.api.function import KeyRef

Sandbox = Literal["gvisor", "kata", "none"]
TrustLevel = Literal["untrusted", "standard", "trusted"]

# RuntimeClass each sandbox maps to; `none` runs with the cluster's default runtime (runc).
RUNTIME_CLASS_BY_SANDBOX: dict[str, str | None] = {"gvisor": "gvisor", "kata": "kata", "none": None}


# DNS: a rule whose `ports` list it allows UDP to it as well (the only UDP a rule can allow; a rule
# without ports allows every protocol). NetworkPolicy and the local iptables rules both match the
# resolver's real address: in a cluster that is the DNS pods' (or node-local cache's) address, not the
# DNS Service's ClusterIP, which kube-proxy rewrites before any policy sees the packet.
DNS_PORT = 53


class EgressRule(Model):
    """One destination a function may open connections to."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel("has(self.cidr) != has(self.host)", "an egress rule sets exactly one of cidr or host")
        )
    )

    cidr: str | None = Field(
        default=None,
        max_length=49,
        pattern=r"^[0-9a-fA-F.:]+/[0-9]{1,3}$",
        description="Destination network, e.g. 10.0.0.0/8.",
    )
    host: str | None = Field(
        default=None,
        max_length=253,
        pattern=r"^(\*\.)?[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="Destination host name, e.g. api.example.com or *.example.com.",
    )
    ports: list[int] = Field(
        default_factory=list,
        max_length=16,
        description="Destination TCP ports (53 also allows DNS over UDP); all ports and protocols when empty.",
    )

    @model_validator(mode="after")
    def _one_destination(self) -> EgressRule:
        if (self.cidr is None) == (self.host is None):
            raise ValueError("an egress rule sets exactly one of cidr or host")
        bad = [p for p in self.ports if not 1 <= p <= 65535]
        if bad:
            raise ValueError(f"egress ports must be 1-65535 (got {', '.join(map(str, bad))})")
        return self


class Egress(Model):
    """Outbound network access of functions under the policy; denied unless allowed."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.mode == 'allowList' || !has(self.allow) || size(self.allow) == 0",
                "spec.egress.allow is only used with mode: allowList",
            )
        )
    )

    mode: Literal["none", "allowList"] = Field(default="none", description="none, or allowList.")
    allow: list[EgressRule] = Field(default_factory=list, max_length=64, description="Allowed destinations.")

    @model_validator(mode="after")
    def _allow_needs_allow_list(self) -> Egress:
        if self.mode != "allowList" and self.allow:
            raise ValueError("spec.egress.allow is only used with mode: allowList")
        return self


class AuxiliaryService(Model):
    """A service functions call at EMBER_SERVICE_<NAME>_URL; Ember adds the credential the code never sees."""

    # A path below that URL goes to `url` with the path appended and the credential in `header`,
    # if the method and path are allowed (pods/services.py; README, Auxiliary services).

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "!has(self.credentialsSecretRef) || has(self.credentialsSecretRef.key)",
                "credentialsSecretRef.key is required: it names the Secret key holding the credential",
            ),
            cel(
                "!has(self.pathPrefixes) || self.pathPrefixes.all(p, !p.contains('/./') && !p.contains('/../')"
                " && !p.endsWith('/.') && !p.endsWith('/..'))",
                "pathPrefixes may not have a . or .. segment",
            ),
        )
    )

    name: str = Field(pattern=DNS_LABEL_PATTERN, max_length=63, description="Name the function uses for it.")
    url: str = Field(
        max_length=2048,
        pattern=r"^https?://[^/?#@\s]+(/[^?#\s]*)?$",
        description="Base URL of the service (scheme, host, optional port and path; no query, fragment or user).",
    )
    credentials_secret_ref: KeyRef | None = Field(
        default=None, description="Secret key whose value is sent as the credential; none is sent when unset."
    )
    header: str = Field(
        default="Authorization",
        max_length=256,
        pattern=r"^[A-Za-z0-9-]+$",
        description="Request header that carries the credential (its value exactly as the Secret holds it).",
    )
    methods: list[Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]] = Field(
        default_factory=list, max_length=7, description="HTTP methods allowed; any of them when empty."
    )
    path_prefixes: list[Annotated[str, StringConstraints(max_length=1024, pattern=r"^/[^?#%\\\s]*$")]] = Field(
        default_factory=list,
        max_length=32,
        description="Paths (below url) allowed, each a prefix starting with /; every path when empty.",
    )

    @model_validator(mode="after")
    def _check(self) -> AuxiliaryService:
        if self.credentials_secret_ref is not None and self.credentials_secret_ref.key is None:
            raise ValueError("credentialsSecretRef.key is required: it names the Secret key holding the credential")
        for prefix in self.path_prefixes:
            if any(part in (".", "..") for part in prefix.split("/")):
                raise ValueError(f"pathPrefixes: {prefix!r} may not have a . or .. segment")
        return self


class Filesystem(Model):
    """Filesystem of function pods."""

    read_only_root: bool = Field(default=True, description="Mount the root filesystem read-only.")
    tmp_size_mib: int = Field(
        default=64, alias="tmpSizeMiB", ge=1, le=10240, description="Size of the writable /tmp in MiB."
    )


class Limits(Model):
    """Upper bounds on what Functions under the policy may ask for."""

    max_memory_mib: int = Field(default=10240, ge=64, le=10240, alias="maxMemoryMiB", description="Largest memory.")
    max_timeout_seconds: int = Field(default=900, ge=1, le=900, description="Longest timeout.")
    pids: int = Field(default=256, ge=8, le=32768, description="Processes and threads per pod.")


class SecurityPolicySpec(Model):
    """Desired security of the Functions that refer to the policy."""

    model_config = ConfigDict(
        json_schema_extra=validations(
            cel(
                "self.sandbox != 'none' || (has(self.allowUnsandboxed) && self.allowUnsandboxed)",
                "spec.sandbox none requires spec.allowUnsandboxed: true",
            ),
            cel(
                "!has(self.services) || self.services.all(s, self.services.exists_one(t, t.name == s.name))",
                "spec.services: each name may appear once",
            ),
        )
    )

    sandbox: Sandbox = Field(default="gvisor", description="Sandbox: gvisor, kata, or none (needs allowUnsandboxed).")
    allow_unsandboxed: bool = Field(default=False, description="Permit sandbox: none.")
    runtime_class_name: str | None = Field(
        default=None,
        max_length=253,
        description="RuntimeClass to use instead of the sandbox's default (gvisor, kata).",
    )
    egress: Egress = Field(default_factory=Egress, description="Outbound network access.")
    services: list[AuxiliaryService] = Field(
        default_factory=list, max_length=32, description="Auxiliary services reachable with injected credentials."
    )
    filesystem: Filesystem = Field(default_factory=Filesystem, description="Filesystem of function pods.")
    limits: Limits = Field(default_factory=Limits, description="Bounds on memory, timeout and processes.")
    trust_level: TrustLevel = Field(
        default="untrusted",
        description="untrusted, standard or trusted: a Function or portion calls only portions at its own level "
        "or below; pods under different policies never share.",
    )

    @model_validator(mode="after")
    def _unsandboxed_is_explicit(self) -> SecurityPolicySpec:
        if self.sandbox == "none" and not self.allow_unsandboxed:
            raise ValueError("spec.sandbox none requires spec.allowUnsandboxed: true")
        return self

    @model_validator(mode="after")
    def _unique_services(self) -> SecurityPolicySpec:
        names = [s.name for s in self.services]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"spec.services: names must be unique ({', '.join(twice)} more than once)")
        return self

    @property
    def runtime_class(self) -> str | None:
        """The RuntimeClass pods under this policy use (None: the cluster default, runc)."""
        return self.runtime_class_name or RUNTIME_CLASS_BY_SANDBOX[self.sandbox]


DEFAULT_POLICY = SecurityPolicySpec()  # what a Function runs under when no SecurityPolicy applies: gVisor, no egress


def policy_hash(policy: SecurityPolicySpec) -> str:
    """Content hash of a policy (hex): pods are shared only between Functions under equal policies."""
    return content_digest(policy.model_dump(by_alias=True, mode="json"))


class SecurityPolicyStatus(Status):
    """Observed state of a SecurityPolicy."""

    policy_hash: str | None = Field(default=None, description="Hash of the spec; pools are keyed by it.")


class SecurityPolicy(Resource):
    """How Functions that refer to it are sandboxed, what they may reach and what they may use."""

    KIND: ClassVar[str] = "SecurityPolicy"
    PLURAL: ClassVar[str] = "securitypolicies"
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ("secpol",)
    PRINTER_COLUMNS: ClassVar[tuple[PrinterColumn, ...]] = (
        PrinterColumn(name="Sandbox", type="string", json_path=".spec.sandbox"),
        PrinterColumn(name="Egress", type="string", json_path=".spec.egress.mode"),
        PrinterColumn(name="Age", type="date", json_path=".metadata.creationTimestamp"),
        PrinterColumn(name="Trust", type="string", json_path=".spec.trustLevel", priority=1),
    )

    kind: Literal["SecurityPolicy"] = Field(default="SecurityPolicy", description="Always SecurityPolicy.")
    spec: SecurityPolicySpec = Field(default_factory=SecurityPolicySpec, description="Desired state.")
    status: SecurityPolicyStatus | None = Field(default=None, description="Observed state.")
