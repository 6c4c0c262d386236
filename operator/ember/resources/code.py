"""Version → its code ConfigMap, and the way back: a ConfigMap's files → the agent's `code` payload.

Inline code and code in a user's ConfigMap are snapshotted into an immutable ConfigMap per
Version (`<function>-v<n>-code`), so editing the user's ConfigMap later never changes what a
Version runs. Code given as url + sha256 stays a reference: the agent fetches and checks it.
"""

from __future__ import annotations

import base64
import hashlib
import io
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ember.api.function import Code, FunctionSpec
from ember.api.version import Version, code_hash
from ember.resources import labels
from ember.resources.meta import owner_reference
from ember.resources.version import version_labels

CONFIGMAP_MAX_BYTES = 1024 * 1024
_EXTENSIONS = {"python3.11": ".py", "python3.12": ".py", "nodejs20": ".js"}


class CodeError(ValueError):
    """Code cannot be stored or handed to an agent as given."""


@dataclass(frozen=True, slots=True)
class CodeFiles:
    """Files of a Version's code: text in `data`, other bytes in `binary_data` (as ConfigMaps hold them)."""

    data: Mapping[str, str] = field(default_factory=dict)
    binary_data: Mapping[str, bytes] = field(default_factory=dict)

    def digest(self) -> str:
        """Content digest over names and bytes, independent of order: feeds `code_hash`."""
        digest = hashlib.sha256()
        merged = {**{k: v.encode() for k, v in self.data.items()}, **dict(self.binary_data)}
        for name in sorted(merged):
            digest.update(name.encode() + b"\0" + merged[name] + b"\0")
        return "sha256:" + digest.hexdigest()

    @property
    def size(self) -> int:
        """Total bytes."""
        return sum(len(v.encode()) for v in self.data.values()) + sum(len(v) for v in self.binary_data.values())


def default_filename(spec: FunctionSpec) -> str:
    """File name of inline code: the handler's module plus the runtime's extension."""
    module = spec.handler.rsplit(".", 1)[0]
    return module + _EXTENSIONS.get(spec.runtime, "")


def files_from_configmap(
    configmap: Mapping[str, Any], *, key: str | None, where: str = "spec.code.configMapRef"
) -> CodeFiles:
    """The code files in a user's ConfigMap body: one key, or every key when `key` is None."""
    name = configmap.get("metadata", {}).get("name", "?")
    data = dict(configmap.get("data") or {})
    binary = {k: base64.b64decode(v) for k, v in (configmap.get("binaryData") or {}).items()}
    if key is not None:
        if key in data:
            return CodeFiles(data={key: data[key]})
        if key in binary:
            return CodeFiles(binary_data={key: binary[key]})
        keys = ", ".join(sorted([*data, *binary])) or "none"
        raise CodeError(f"{where}: ConfigMap {name!r} has no key {key!r} (keys: {keys})")
    if not data and not binary:
        raise CodeError(f"{where}: ConfigMap {name!r} has no data")
    return CodeFiles(data=data, binary_data=binary)


def version_files(spec: FunctionSpec, referenced: CodeFiles | None) -> CodeFiles | None:
    """The files a Version's ConfigMap holds: inline code, the referenced ConfigMap's, or None (url)."""
    code: Code = spec.code
    if code.inline is not None:
        return CodeFiles(data={code.filename or default_filename(spec): code.inline})
    if code.config_map_ref is not None:
        if referenced is None:
            raise CodeError(f"spec.code.configMapRef {code.config_map_ref.name!r} was not read")
        return referenced
    if code.url is not None:
        return None
    raise CodeError("spec.code.path is for local mode only; in a cluster use inline, configMapRef or url")


def code_configmap_name(version_name: str) -> str:
    """Name of a Version's code ConfigMap."""
    return f"{version_name}-code"


def code_configmap(version: Version, files: CodeFiles) -> dict[str, Any]:
    """The immutable ConfigMap holding a Version's code, owned by the Version."""
    if files.size > CONFIGMAP_MAX_BYTES:
        raise CodeError(
            f"code of {version.metadata.name} is {files.size} bytes; a ConfigMap holds at most "
            f"{CONFIGMAP_MAX_BYTES} - use spec.code.url with sha256 for large code"
        )
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": code_configmap_name(version.metadata.name),
            "namespace": version.metadata.namespace,
            "labels": version_labels(version.spec.function_name, version.spec.number),
            "annotations": {labels.CODE_HASH_ANNOTATION: version.spec.code_hash},
            "ownerReferences": [owner_reference(kind="Version", name=version.metadata.name, uid=version.metadata.uid)],
        },
        "immutable": True,
        "data": dict(files.data),
    }
    if files.binary_data:
        body["binaryData"] = {k: base64.b64encode(v).decode() for k, v in files.binary_data.items()}
    return body


def code_configmap_problem(version: Version, configmap: Mapping[str, Any]) -> str | None:
    """Why a stored `<version>-code` ConfigMap is not this Version's snapshot (a sentence), or None.

    Anyone who may create ConfigMaps in the namespace could make one under that name before the
    operator does, or in its place: it is taken only when the Version controls it (its uid) and it
    holds exactly the code the Version names (the inline code itself; for configMapRef code,
    files whose digest gives the Version's codeHash). The operator reports a problem as the
    Version's CodeReady condition; the activator refuses to specialize from it."""
    meta = configmap.get("metadata") or {}
    name = meta.get("name")
    uid = version.metadata.uid
    controlled = any(
        o.get("kind") == "Version" and o.get("controller") and uid and o.get("uid") == uid
        for o in meta.get("ownerReferences") or []
    )
    advice = "Ember does not run it; delete it and Ember makes the Version's own."
    if not controlled:
        return f"ConfigMap {name} exists but is not controlled by Version {version.metadata.name}. {advice}"
    spec = version.spec.function
    try:
        files = files_from_configmap(dict(configmap), key=None)
    except CodeError as err:
        return f"ConfigMap {name}: {err}. {advice}"
    if spec.code.inline is not None:
        expected = version_files(spec, None)
        same = expected is not None and files.digest() == expected.digest()
    elif spec.code.config_map_ref is not None:
        same = code_hash(spec, version.spec.policy, files.digest()) == version.spec.code_hash
    else:
        return f"ConfigMap {name} exists but Version {version.metadata.name}'s code is not kept in one. {advice}"
    if not same:
        return f"ConfigMap {name} does not hold the code of Version {version.metadata.name} (codeHash). {advice}"
    return None


def agent_code_payload(files: CodeFiles) -> dict[str, Any]:
    """The `code` member of the agent's specialize body for ConfigMap-held files.

    One text file goes inline; a single binary file is taken to be a zip; several files are
    zipped, so the agent needs no access to the Kubernetes API.
    """
    if len(files.data) == 1 and not files.binary_data:
        ((name, text),) = files.data.items()
        return {"inline": text, "filename": name}
    if len(files.binary_data) == 1 and not files.data:
        ((_, blob),) = files.binary_data.items()
        return {"inline": base64.b64encode(blob).decode(), "encoding": "base64-zip"}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, text in sorted(files.data.items()):
            archive.writestr(name, text)
        for name, blob in sorted(files.binary_data.items()):
            archive.writestr(name, blob)
    return {"inline": base64.b64encode(buffer.getvalue()).decode(), "encoding": "base64-zip"}
