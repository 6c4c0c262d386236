"""JWT authorizers of HTTP routes (`spec.http.authorizers[].jwt`), as API Gateway's HTTP APIs check them.

The token is the `Authorization` header's (a `Bearer ` prefix is optional). It must be signed
by a key of the issuer's JWKS (read from a Secret key through the activator's `Credentials`,
the Secret of the Function's namespace; the parsed key set is reused while the text is the
same), with one of the authorizer's asymmetric algorithms (never `none` or HMAC: the keys are
public), the configured `iss`, an `aud` among the audiences, and an `exp` in the future (`nbf`
and `iat` checked when present). Anything else is `Unauthorized` (401); a valid token without
one of the route's scopes is `Forbidden` (403). The function is not invoked in either case.
The verified claims go to the event as `requestContext.authorizer.jwt`. PyJWT does the
cryptography and the claim checks.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import jwt

from ember.api.http import JwtAuthorizer
from ember.pods.services import Credentials, CredentialUnavailable

log = logging.getLogger(__name__)


class Unauthorized(Exception):
    """No valid token (401)."""


class Forbidden(Exception):
    """A valid token without a scope the route needs (403)."""


class JwtVerifier:
    """Checks bearer tokens against the authorizers' key sets."""

    def __init__(self, credentials: Credentials) -> None:
        self._credentials = credentials
        self._parsed: dict[str, jwt.PyJWKSet] = {}  # by the JWKS text (a rotated Secret parses anew)

    async def verify(
        self, namespace: str, authorizer: JwtAuthorizer, header: str | None, scopes: Sequence[str]
    ) -> dict[str, Any]:
        """The event's `authorizer` block for a request with this `Authorization` header."""
        if not header:
            raise Unauthorized("no Authorization header")
        token = header[7:].strip() if header[:7].lower() == "bearer " else header.strip()
        keys = await self._key_set(namespace, authorizer)
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.InvalidTokenError as err:
            raise Unauthorized(f"malformed token: {err}") from None
        candidates = [k for k in keys.keys if kid is None or k.key_id == kid]
        if not candidates:
            raise Unauthorized(f"no key {kid!r} in the issuer's key set")
        claims: dict[str, Any] | None = None
        error: jwt.InvalidTokenError | None = None
        for key in candidates:
            try:
                claims = jwt.decode(
                    token,
                    key,
                    algorithms=list(authorizer.algorithms),
                    audience=list(authorizer.audiences),
                    issuer=authorizer.issuer,
                    leeway=authorizer.leeway_seconds,
                    options={"require": ["exp", "iss", "aud"]},
                )
                break
            except jwt.InvalidSignatureError as err:
                error = err  # another key of the set (no kid) may fit
            except jwt.InvalidTokenError as err:
                raise Unauthorized(str(err)) from None
        if claims is None:
            raise Unauthorized(str(error or "no key verified the token"))
        granted = _scopes(claims)
        if scopes and not set(scopes) & set(granted):
            raise Forbidden(f"the token has none of the scopes this route needs ({', '.join(scopes)})")
        return {"jwt": {"claims": claims, "scopes": granted or None}}

    async def _key_set(self, namespace: str, authorizer: JwtAuthorizer) -> jwt.PyJWKSet:
        ref = authorizer.jwks_secret_ref
        try:
            text = await self._credentials(namespace, ref.name, ref.key)
        except CredentialUnavailable as err:
            log.warning("jwt authorizer keys unavailable namespace=%s: %s", namespace, err)
            raise Unauthorized("the authorizer's keys are unavailable") from None
        parsed = self._parsed.get(text)
        if parsed is None:
            try:
                parsed = jwt.PyJWKSet.from_dict(json.loads(text))
            except (ValueError, jwt.PyJWKError, jwt.PyJWKSetError) as err:
                log.warning("jwt authorizer keys invalid secret=%s/%s key=%s: %s", namespace, ref.name, ref.key, err)
                raise Unauthorized("the authorizer's keys are unavailable") from None
            if len(self._parsed) > 64:
                self._parsed.clear()
            self._parsed[text] = parsed
        return parsed


def _scopes(claims: dict[str, Any]) -> list[str]:
    raw = claims.get("scope", claims.get("scp"))
    if isinstance(raw, str):
        return raw.split()
    if isinstance(raw, list):
        return [str(s) for s in raw]
    return []
