"""Pool keys and specialize bodies built from Functions; the agent's side is tested in tests/local/agent."""

from __future__ import annotations

import base64
import io
import zipfile
from pathlib import Path

import pytest

from ember.api.function import Function
from ember.api.security_policy import SecurityPolicySpec
from ember.pods.base import PodId, PoolKey, SpecializeFailed, VersionKey
from ember.pods.payload import PayloadError, code_payload, path_digest, pool_key, specialize_request


def _fn(code: dict[str, object], **spec: object) -> Function:
    return Function.model_validate(
        {
            "metadata": {"name": "hello"},
            "spec": {"runtime": "python3.12", "handler": "main.handler", "code": code, **spec},
        }
    )


def test_specialize_body_follows_the_contract() -> None:
    fn = _fn({"inline": "def handler(e, c): return 1"}, env={"A": "b"}, concurrency=3, timeoutSeconds=7)
    req = specialize_request(VersionKey("default", "hello", 2), fn.spec, "sha256:" + "a" * 64)
    assert req.payload == {
        "function": {"namespace": "default", "name": "hello", "version": 2},
        "handler": "main.handler",
        "code": {"inline": "def handler(e, c): return 1"},
        "codeHash": "sha256:" + "a" * 64,
        "env": {"A": "b"},
        "memoryMiB": 128,
        "timeoutSeconds": 7,
        "concurrency": 3,
    }
    assert req.concurrency == 3


def test_pool_key_separates_policies_and_sizes() -> None:
    small = _fn({"inline": "x"})
    big = _fn({"inline": "x"}, resources={"memoryMiB": 512})
    strict = SecurityPolicySpec(trust_level="trusted")
    assert pool_key(small.spec, None) == pool_key(_fn({"inline": "y"}).spec, None)
    assert pool_key(small.spec, None) != pool_key(big.spec, None)
    assert pool_key(small.spec, None) != pool_key(small.spec, strict)
    assert pool_key(small.spec, None).sandbox == "gvisor"
    assert str(PoolKey("python3.12", "gvisor", 128, "abcdef0123456789")) == "python3.12/gvisor/128Mi/abcdef012345"


def test_path_code_file_is_sent_inline_and_dir_as_path(tmp_path: Path) -> None:
    (tmp_path / "main.py").write_text("def handler(e, c): return 2\n")
    file_fn = _fn({"path": "main.py"})
    assert code_payload(file_fn.spec, tmp_path) == {"inline": "def handler(e, c): return 2\n", "filename": "main.py"}
    dir_fn = _fn({"path": "."})
    sent = code_payload(dir_fn.spec, tmp_path)
    assert sent["encoding"] == "base64-zip"
    with zipfile.ZipFile(io.BytesIO(base64.b64decode(sent["inline"]))) as archive:
        assert archive.read("main.py") == b"def handler(e, c): return 2\n"


def test_path_digest_changes_with_file_content(tmp_path: Path) -> None:
    (tmp_path / "main.py").write_text("a")
    fn = _fn({"path": "main.py"})
    first = path_digest(fn.spec, tmp_path)
    (tmp_path / "main.py").write_text("b")
    assert path_digest(fn.spec, tmp_path) != first
    assert path_digest(_fn({"inline": "x"}).spec, tmp_path) is None


@pytest.mark.parametrize(
    ("code", "base", "message"),
    [
        pytest.param({"path": "missing.py"}, True, "does not exist", id="missing-path"),
        pytest.param({"path": "main.py"}, False, "relative", id="relative-without-base"),
        pytest.param({"configMapRef": {"name": "cm"}}, True, "only available in a cluster", id="configmap-locally"),
    ],
)
def test_code_that_cannot_be_sent_is_named(tmp_path: Path, code: dict[str, object], base: bool, message: str) -> None:
    with pytest.raises(PayloadError, match=message):
        code_payload(_fn(code).spec, tmp_path if base else None)


def test_specialize_failed_tells_code_errors_from_pod_errors() -> None:
    assert SpecializeFailed(PodId("p"), 422, "ImportError", "boom").is_code_error
    assert not SpecializeFailed(PodId("p"), 503, "Unavailable", "x").is_code_error
    assert "pod p: specialize failed with 422 ImportError: boom" in str(
        SpecializeFailed(PodId("p"), 422, "ImportError", "boom")
    )
