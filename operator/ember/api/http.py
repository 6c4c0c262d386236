"""`Function.spec.http`: routes that put a Function behind URLs, as API Gateway's HTTP APIs do.

A route's `path` is a template of whole segments: a literal (`users`), a parameter (`{id}`),
or, last only, a greedy parameter (`{proxy+}`) that takes the rest of the path (one segment or
more). The table built from every Function's routes (`ember.resources.routes`) prefers, at
each segment, a literal over a parameter over a greedy parameter, as API Gateway does, and a
route naming the method over `ANY`. The activator's own paths are reserved.

`parse_template` is the one parser of templates: the models validate with it and the table
compiles with it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, field_validator, model_validator

from ember.api.common import Model

HttpMethod = Literal["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "ANY"]
JwtAlgorithm = Literal["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]

_PARAM = re.compile(r"^\{([A-Za-z0-9_.-]{1,64})(\+?)\}$")
_LITERAL = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=:@%-]+$")
# The activator's own API: a route may not shadow it (exact paths, and prefixes of whole segments).
RESERVED_PATHS: tuple[str, ...] = ("/healthz", "/readyz", "/metrics")
RESERVED_PREFIXES: tuple[str, ...] = ("/v1/namespaces", "/v1/invocations", "/2015-03-31")


@dataclass(frozen=True, slots=True)
class Segment:
    """One segment of a template: a literal, or a parameter (`greedy`: it takes the rest)."""

    literal: str | None = None
    param: str | None = None
    greedy: bool = False


def parse_template(path: str) -> tuple[Segment, ...]:
    """The segments of a route template; ValueError naming what is wrong with it."""
    if not path.startswith("/"):
        raise ValueError(f"route path {path!r} must start with /")
    if path == "/":
        return ()
    parts = path[1:].removesuffix("/").split("/")
    segments: list[Segment] = []
    names: set[str] = set()
    for i, part in enumerate(parts):
        if part == "":
            raise ValueError(f"route path {path!r} has an empty segment (//)")
        param = _PARAM.match(part)
        if param is not None:
            name, greedy = param.group(1), param.group(2) == "+"
            if greedy and i != len(parts) - 1:
                raise ValueError(f"route path {path!r}: the greedy parameter {{{name}+}} must be the last segment")
            if name in names:
                raise ValueError(f"route path {path!r}: parameter {{{name}}} appears twice")
            names.add(name)
            segments.append(Segment(param=name, greedy=greedy))
        elif "{" in part or "}" in part:
            raise ValueError(
                f"route path {path!r}: segment {part!r} must be a literal or a whole parameter"
                " like {id} or {proxy+}"
            )
        elif not _LITERAL.match(part):
            raise ValueError(f"route path {path!r}: segment {part!r} has characters a URL path cannot hold")
        else:
            segments.append(Segment(literal=part))
    literal_prefix = "/" + "/".join(s.literal or "\0" for s in segments)
    if literal_prefix in RESERVED_PATHS or any(
        literal_prefix == p or literal_prefix.startswith(p + "/") for p in RESERVED_PREFIXES
    ):
        reserved = ", ".join((*RESERVED_PATHS, *(p + "/..." for p in RESERVED_PREFIXES)))
        raise ValueError(f"route path {path!r} is the activator's own (reserved: {reserved})")
    return tuple(segments)


class JwksRef(Model):
    """One key of a Secret in the Function's namespace (in local mode, a Secret manifest beside the Function's)."""

    name: str = Field(min_length=1, max_length=253, description="Name of the Secret.")
    key: str = Field(min_length=1, max_length=253, description="Key holding the JWKS JSON document.")


class JwtAuthorizer(Model):
    """Verify a JSON Web Token from the `Authorization` header before invoking (API Gateway's JWT authorizer)."""

    issuer: str = Field(min_length=1, max_length=512, description="Required `iss` claim.")
    audiences: list[str] = Field(
        min_length=1, max_length=16, description="Accepted `aud` values; the token must carry one of them."
    )
    jwks_secret_ref: JwksRef = Field(description="Secret key holding the issuer's public keys as a JWKS document.")
    algorithms: list[JwtAlgorithm] = Field(
        default_factory=lambda: list[JwtAlgorithm](["RS256", "ES256"]),
        min_length=1,
        max_length=10,
        description="Signature algorithms accepted (never `none` or HMAC: the keys are public).",
    )
    leeway_seconds: int = Field(default=0, ge=0, le=300, description="Clock skew allowed on `exp` and `nbf`.")


class Authorizer(Model):
    """A named authorizer routes refer to."""

    jwt: JwtAuthorizer = Field(description="Verify a JWT bearer token.")


class HttpRoute(Model):
    """An API-gateway route: requests matching it become invocations of this Function."""

    path: str = Field(
        min_length=1,
        max_length=1024,
        pattern=r"^/[A-Za-z0-9._~!$&'()*+,;=:@%/{}-]*$",
        description="Path template, e.g. /users/{id} or /files/{proxy+}.",
    )
    methods: list[HttpMethod] = Field(
        default_factory=lambda: list[HttpMethod](["ANY"]),
        min_length=1,
        max_length=8,
        description="Methods matched; ANY matches all.",
    )
    host: str | None = Field(
        default=None,
        max_length=253,
        pattern=r"^[A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?$",
        description="Host header to match (without port); any when omitted.",
    )
    qualifier: str | None = Field(
        default=None, max_length=64, description="Version number or alias to invoke; traffic split when omitted."
    )
    payload_format: Literal["apigateway-v2", "raw"] = Field(
        default="apigateway-v2",
        description="Event shape: an API Gateway HTTP API (2.0) event, or the request body itself as the event "
        "(JSON), answered with the function's result as the body.",
    )
    authorizer: str | None = Field(
        default=None, max_length=63, description="Name of an authorizer in http.authorizers."
    )
    scopes: list[str] = Field(
        default_factory=list,
        max_length=16,
        description="With a JWT authorizer: scopes (the `scope` or `scp` claim) of which the token needs one.",
    )

    @field_validator("path")
    @classmethod
    def _template(cls, path: str) -> str:
        parse_template(path)
        return path

    @field_validator("host")
    @classmethod
    def _lower_host(cls, host: str | None) -> str | None:
        return host.lower() if host is not None else None


class Cors(Model):
    """Cross-origin requests: preflights answered by the activator, responses given the CORS headers."""

    allow_origins: list[str] = Field(
        min_length=1, max_length=32, description="Origins allowed (scheme://host[:port]), or * for any."
    )
    allow_methods: list[HttpMethod] = Field(
        default_factory=lambda: list[HttpMethod](["ANY"]), max_length=8, description="Methods allowed; ANY for all."
    )
    allow_headers: list[str] = Field(default_factory=list, max_length=32, description="Request headers allowed.")
    expose_headers: list[str] = Field(default_factory=list, max_length=32, description="Response headers exposed.")
    max_age: int = Field(default=0, ge=0, le=86400, description="Seconds a browser may cache a preflight.")
    allow_credentials: bool = Field(default=False, description="Allow cookies and credentials (not with origin *).")

    @model_validator(mode="after")
    def _credentials_need_origins(self) -> Cors:
        if self.allow_credentials and "*" in self.allow_origins:
            raise ValueError("http.cors: allowCredentials cannot be used with allowOrigins '*' (browsers refuse it)")
        return self


class FunctionUrl(Model):
    """Every path under the Function's own prefix, like a Lambda function URL (routeKey `$default`)."""

    qualifier: str | None = Field(default=None, max_length=64, description="Version number or alias to invoke.")
    authorizer: str | None = Field(
        default=None, max_length=63, description="Name of an authorizer in http.authorizers."
    )


class Http(Model):
    """HTTP triggers of the Function."""

    routes: list[HttpRoute] = Field(default_factory=list, max_length=64, description="Routes to this Function.")
    function_url: FunctionUrl | None = Field(
        default=None,
        description="Serve every path under /v1/namespaces/<namespace>/functions/<name>/url/ as API Gateway "
        "events (Lambda function URL style).",
    )
    cors: Cors | None = Field(default=None, description="CORS for the routes and the function URL.")
    authorizers: dict[str, Authorizer] = Field(
        default_factory=dict, max_length=8, description="Named authorizers the routes and the function URL refer to."
    )

    @model_validator(mode="after")
    def _authorizers_known(self) -> Http:
        users = [(f"routes[{i}]", r.authorizer) for i, r in enumerate(self.routes)]
        if self.function_url is not None:
            users.append(("functionUrl", self.function_url.authorizer))
        for where, name in users:
            if name is not None and name not in self.authorizers:
                known = ", ".join(sorted(self.authorizers)) or "none defined"
                raise ValueError(f"http.{where}.authorizer: no authorizer named {name!r} (authorizers: {known})")
        for i, route in enumerate(self.routes):
            if route.scopes and route.authorizer is None:
                raise ValueError(f"http.routes[{i}].scopes needs an authorizer: scopes are checked on a verified JWT")
        return self
