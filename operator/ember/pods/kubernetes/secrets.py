"""Auxiliary services' credentials read from the API server: one key of one Secret, for the
services proxy (`ember.pods.services`) of an activator.

A value is kept for `ttl_s` (a rotated Secret is used within that long) and is never logged;
errors name the Secret and key, and why (missing, or not readable by the activator's RBAC).
"""

from __future__ import annotations

import base64
import binascii
import time
from collections.abc import Callable
from typing import Any

from kubernetes_asyncio import client
from kubernetes_asyncio.client.exceptions import ApiException

from ember.pods.services import CredentialUnavailable


class ApiSecrets:
    """`Credentials` over `CoreV1Api.read_namespaced_secret`, cached per Secret."""

    def __init__(self, api: client.ApiClient, *, ttl_s: float = 10.0, clock: Callable[[], float] = time.monotonic):
        self._core: Any = client.CoreV1Api(api)
        self._ttl_s = ttl_s
        self._clock = clock
        self._cache: dict[tuple[str, str], tuple[float, dict[str, str]]] = {}

    async def __call__(self, namespace: str, name: str, key: str) -> str:
        now = self._clock()
        cached = self._cache.get((namespace, name))
        if cached is None or now - cached[0] > self._ttl_s:
            cached = (now, await self._read(namespace, name))
            self._cache[(namespace, name)] = cached
        value = cached[1].get(key)
        if value is None:
            raise CredentialUnavailable(f"Secret {namespace}/{name} has no key {key!r}")
        return value

    async def _read(self, namespace: str, name: str) -> dict[str, str]:
        try:
            secret = await self._core.read_namespaced_secret(name, namespace)
        except ApiException as err:
            if err.status == 404:
                raise CredentialUnavailable(f"no Secret {namespace}/{name}") from None
            if err.status == 403:
                raise CredentialUnavailable(
                    f"the activator may not read Secret {namespace}/{name} (RBAC: get secrets)"
                ) from None
            raise CredentialUnavailable(f"Secret {namespace}/{name}: API error {err.status} {err.reason}") from None
        values: dict[str, str] = {}
        for key, encoded in (secret.data or {}).items():
            try:
                values[key] = base64.b64decode(encoded).decode()
            except (binascii.Error, UnicodeDecodeError):
                continue  # not text: not usable as a header value; reported as a missing key
        return values
