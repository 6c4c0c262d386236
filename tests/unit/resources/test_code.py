"""Version → code ConfigMap, ConfigMap reading, and ConfigMap files → agent payload (pure)."""

from __future__ import annotations

import base64
import io
import zipfile
from typing import Any

import pytest

from ember.api.function import Function, FunctionSpec
from ember.api.security_policy import DEFAULT_POLICY
from ember.api.version import Version
from ember.resources.code import (
    CONFIGMAP_MAX_BYTES,
    CodeError,
    CodeFiles,
    agent_code_payload,
    code_configmap,
    files_from_configmap,
    version_files,
)
from ember.resources.version import build_version
from tests.unit.resources.conftest import function_body

HASH = "sha256:" + "a" * 64


def _spec(**extra: Any) -> FunctionSpec:
    return Function.model_validate(function_body(**extra)).spec


def _stored_version(**extra: Any) -> Version:
    body = build_version(
        Function.model_validate(function_body(**extra)), number=2, code_hash=HASH, policy=DEFAULT_POLICY
    )
    body["metadata"]["uid"] = "v-uid"
    return Version.model_validate(body)


@pytest.mark.parametrize(
    ("extra", "referenced", "expected"),
    [
        pytest.param({}, None, {"main.py": "x = 1\n"}, id="inline-default-filename-python"),
        pytest.param(
            {"runtime": "nodejs20", "handler": "index.handler"}, None, {"index.js": "x = 1\n"}, id="inline-node"
        ),
        pytest.param({"code": {"inline": "y", "filename": "app.py"}}, None, {"app.py": "y"}, id="inline-filename"),
        pytest.param(
            {"code": {"configMapRef": {"name": "src"}}},
            CodeFiles(data={"a.py": "1", "b.py": "2"}),
            {"a.py": "1", "b.py": "2"},
            id="configmap-snapshot",
        ),
        pytest.param({"code": {"url": "https://example.invalid/c.zip", "sha256": "b" * 64}}, None, None, id="url"),
    ],
)
def test_version_files(extra: dict[str, Any], referenced: CodeFiles | None, expected: dict[str, str] | None) -> None:
    files = version_files(_spec(**extra), referenced)
    assert (None if files is None else dict(files.data)) == expected


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        pytest.param({"code": {"configMapRef": {"name": "src"}}}, "was not read", id="configmap-not-read"),
        pytest.param({"code": {"path": "./src"}}, "local mode only", id="path-in-cluster"),
    ],
)
def test_version_files_rejects(extra: dict[str, Any], match: str) -> None:
    with pytest.raises(CodeError, match=match):
        version_files(_spec(**extra), None)


def test_code_configmap_is_immutable_owned_and_labelled() -> None:
    version = _stored_version()
    body = code_configmap(version, CodeFiles(data={"main.py": "x"}, binary_data={"z.bin": b"\x00\x01"}))
    assert body["metadata"]["name"] == "hello-v2-code"
    assert body["immutable"] is True
    assert body["data"] == {"main.py": "x"}
    assert base64.b64decode(body["binaryData"]["z.bin"]) == b"\x00\x01"
    assert body["metadata"]["labels"]["ember.run/version"] == "2"
    assert body["metadata"]["annotations"]["ember.run/code-hash"] == HASH
    (owner,) = body["metadata"]["ownerReferences"]
    assert (owner["kind"], owner["name"], owner["uid"]) == ("Version", "hello-v2", "v-uid")


def test_code_configmap_too_large_names_the_way_out() -> None:
    with pytest.raises(CodeError, match=r"spec\.code\.url"):
        code_configmap(_stored_version(), CodeFiles(data={"big.py": "x" * (CONFIGMAP_MAX_BYTES + 1)}))


CM = {"metadata": {"name": "src"}, "data": {"a.py": "1"}, "binaryData": {"b.zip": base64.b64encode(b"PK").decode()}}


@pytest.mark.parametrize(
    ("configmap", "key", "data", "binary"),
    [
        pytest.param(CM, None, {"a.py": "1"}, {"b.zip": b"PK"}, id="all-keys"),
        pytest.param(CM, "a.py", {"a.py": "1"}, {}, id="one-text-key"),
        pytest.param(CM, "b.zip", {}, {"b.zip": b"PK"}, id="one-binary-key"),
    ],
)
def test_files_from_configmap(
    configmap: dict[str, Any], key: str | None, data: dict[str, str], binary: dict[str, bytes]
) -> None:
    files = files_from_configmap(configmap, key=key)
    assert dict(files.data) == data
    assert dict(files.binary_data) == binary


@pytest.mark.parametrize(
    ("configmap", "key", "match"),
    [
        pytest.param(CM, "nope.py", r"no key 'nope.py' \(keys: a.py, b.zip\)", id="missing-key"),
        pytest.param({"metadata": {"name": "e"}}, None, "has no data", id="empty"),
    ],
)
def test_files_from_configmap_rejects(configmap: dict[str, Any], key: str | None, match: str) -> None:
    with pytest.raises(CodeError, match=match):
        files_from_configmap(configmap, key=key)


def test_digest_depends_on_content_and_names_not_order() -> None:
    a = CodeFiles(data={"a.py": "1", "b.py": "2"})
    assert a.digest() == CodeFiles(data={"b.py": "2", "a.py": "1"}).digest()
    assert a.digest() != CodeFiles(data={"a.py": "1", "b.py": "3"}).digest()
    assert a.digest() != CodeFiles(data={"a.py": "1", "c.py": "2"}).digest()


def test_agent_payload_single_file_is_inline() -> None:
    assert agent_code_payload(CodeFiles(data={"main.py": "x"})) == {"inline": "x", "filename": "main.py"}


def test_agent_payload_single_binary_is_a_zip() -> None:
    payload = agent_code_payload(CodeFiles(binary_data={"code.zip": b"PK\x03\x04"}))
    assert payload == {"inline": base64.b64encode(b"PK\x03\x04").decode(), "encoding": "base64-zip"}


def test_agent_payload_many_files_are_zipped() -> None:
    payload = agent_code_payload(CodeFiles(data={"main.py": "import util", "util.py": "X = 1"}))
    assert payload["encoding"] == "base64-zip"
    with zipfile.ZipFile(io.BytesIO(base64.b64decode(payload["inline"]))) as archive:
        assert {n: archive.read(n).decode() for n in archive.namelist()} == {
            "main.py": "import util",
            "util.py": "X = 1",
        }
