"""Pure builders from API models to what a pod source needs: the pool key and the specialize body.

Both sides of the pod-source interface use them, so that a Function lands in the same pool,
and its agent gets the same `/v1/specialize` body, whichever implementation serves it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import zipfile
from pathlib import Path
from typing import Any

from ember.api.function import FunctionSpec
from ember.api.security_policy import DEFAULT_POLICY, SecurityPolicySpec, policy_hash
from ember.pods.base import AllowedNetwork, Isolation, PoolKey, ServiceRoute, SpecializeRequest, VersionKey
from ember.resources.state_volume import state_mount


class PayloadError(ValueError):
    """A Version's code cannot be given to an agent by this pod source."""


def pool_key(
    spec: FunctionSpec,
    policy: SecurityPolicySpec | None,
    *,
    calls: bool = False,
    memory_mib: int | None = None,
    namespace: str = "",
    function: str = "",
) -> PoolKey:
    """The generic pool a Function's pods come from (`calls`: their code calls portions; `memory_mib`:
    the size right-sizing applies instead of `spec.resources.memoryMiB`, `ember.scaling.rightsize`).

    A spec with `state.volume` has pools of its own Function, named by `namespace` and `function`
    (`ember.resources.state_volume`); they are needed then."""
    effective = policy or DEFAULT_POLICY
    volume = spec.state.volume if spec.state is not None else None
    if volume is not None and not (namespace and function):
        raise ValueError("the pool key of a spec with state.volume needs its Function's namespace and name")
    return PoolKey(
        runtime=spec.runtime,
        sandbox=effective.sandbox,
        memory_mib=spec.resources.memory_mib if memory_mib is None else memory_mib,
        policy_hash=policy_hash(effective),
        calls=calls,
        cpu_millicores=spec.resources.cpu_millicores,
        key_value=spec.state is not None and spec.state.key_value,
        volume=state_mount(volume, namespace=namespace, function=function),
        isolation=Isolation(
            network=effective.egress.mode != "none",
            allow=tuple(
                AllowedNetwork(rule.cidr, tuple(rule.ports)) for rule in effective.egress.allow if rule.cidr is not None
            ),
            tmp_size_mib=effective.filesystem.tmp_size_mib,
            pids=effective.limits.pids,
            services=tuple(
                ServiceRoute(
                    name=service.name,
                    url=service.url,
                    header=service.header,
                    secret_name=None if (ref := service.credentials_secret_ref) is None else ref.name,
                    secret_key=None if ref is None else ref.key,
                    methods=tuple(service.methods),
                    path_prefixes=tuple(service.path_prefixes),
                )
                for service in effective.services
            ),
        ),
    )


def code_payload(spec: FunctionSpec, base_dir: Path | None) -> dict[str, Any]:
    """The `code` member of the specialize body for the spec's code source.

    `path` code is resolved against `base_dir` (the manifest's folder) and sent inline (a
    directory as a base64 zip), so a sandboxed agent needs no access to the user's files.
    """
    code = spec.code
    if code.inline is not None:
        out: dict[str, Any] = {"inline": code.inline}
        if code.filename is not None:
            out["filename"] = code.filename
        return out
    if code.url is not None:
        return {"url": code.url, "sha256": code.sha256}
    if code.path is not None:
        path = Path(code.path)
        if not path.is_absolute():
            if base_dir is None:
                raise PayloadError(f"spec.code.path {code.path!r} is relative but no manifest folder is known")
            path = base_dir / path
        if path.is_dir():
            return {"inline": _zip_dir(path), "encoding": "base64-zip"}
        if path.is_file():
            try:
                return {"inline": path.read_text(), "filename": path.name}
            except (OSError, UnicodeDecodeError) as err:
                raise PayloadError(f"spec.code.path {str(path)!r} cannot be read as text: {err}") from err
        raise PayloadError(f"spec.code.path {str(path)!r} does not exist")
    raise PayloadError("spec.code.configMapRef is only available in a cluster; use inline, path or url locally")


def _zip_dir(root: Path) -> str:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
            archive.write(file, file.relative_to(root).as_posix())
    return base64.b64encode(buffer.getvalue()).decode()


def path_digest(spec: FunctionSpec, base_dir: Path | None) -> str | None:
    """Digest of the bytes `spec.code.path` points to (None for other code sources).

    Feeds `code_hash`, so that editing a file under the path makes a new Version.
    """
    if spec.code.path is None:
        return None
    path = Path(spec.code.path)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        digest.update(str(file.relative_to(path) if path.is_dir() else file.name).encode() + b"\0")
        try:
            digest.update(file.read_bytes())
        except OSError:
            digest.update(b"<unreadable>")
        digest.update(b"\0")
    return "sha256:" + digest.hexdigest()


def specialize_request(
    version: VersionKey, spec: FunctionSpec, code_hash: str, base_dir: Path | None = None
) -> SpecializeRequest:
    """The agent's `/v1/specialize` body for one Version (CONTRACT.md)."""
    payload: dict[str, Any] = {
        "function": {"namespace": version.namespace, "name": version.function, "version": version.number},
        "handler": spec.handler,
        "code": code_payload(spec, base_dir),
        "codeHash": code_hash,
        "env": dict(spec.env),
        "memoryMiB": spec.resources.memory_mib,
        "timeoutSeconds": spec.timeout_seconds,
        "concurrency": spec.concurrency,
    }
    return SpecializeRequest(version=version, code_hash=code_hash, payload=payload, concurrency=spec.concurrency)
