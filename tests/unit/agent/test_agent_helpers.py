"""Pure helpers of the Python runtime agent (the runtime-images/python/ember_agent package).

The agent as a process is the local tier's (tests/local/agent); the one-file build, test_agent_bundle.py."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import sys
from decimal import Decimal
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

_PKG = Path(__file__).resolve().parents[3] / "runtime-images" / "python" / "ember_agent"
if "ember_agent" not in sys.modules:
    _spec = importlib.util.spec_from_file_location(
        "ember_agent", _PKG / "__init__.py", submodule_search_locations=[str(_PKG)]
    )
    assert _spec is not None
    assert _spec.loader is not None
    sys.modules["ember_agent"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["ember_agent"])
errors = importlib.import_module("ember_agent.errors")
http_parse = importlib.import_module("ember_agent.http_parse")
invoke = importlib.import_module("ember_agent.invoke")
json_codec = importlib.import_module("ember_agent.json_codec")
loader = importlib.import_module("ember_agent.loader")
output = importlib.import_module("ember_agent.output")
spec = importlib.import_module("ember_agent.spec")


# --- JSON


@pytest.mark.parametrize(
    "doc",
    ['{"a": [1, 2.5, "x", null, true, false]}', "[]", '"s"', "0", "-1.5e3", ' \n {"nested": {"k": [{}]}} \t'],
)
def test_json_loads_matches_stdlib(doc):
    assert json_codec.json_loads(doc) == json.loads(doc)
    assert json_codec.json_loads(doc.encode()) == json.loads(doc)


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("{", "Expecting"),
        ('{"a": 1', "delimiter"),
        ("[1, 2] x", "extra data"),
        ("{not json", "Expecting"),
        (b"\xff\xfe", "UTF-8"),
        ("[" * 100000, "nesting"),
    ],
)
def test_json_loads_errors_say_what_is_wrong(doc, words):
    with pytest.raises(json_codec.JSONError) as e:
        json_codec.json_loads(doc)
    assert words.lower() in str(e.value).lower()


def test_json_loads_nan_like_stdlib():
    assert math.isnan(json_codec.json_loads("NaN"))


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
        lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
        max_leaves=20,
    )
)
def test_json_roundtrip_property(value):
    text = json_codec.json_dumps(value)
    assert json.loads(text) == value
    assert json_codec.json_loads(text) == value


def test_json_dumps_rejects_what_lambda_rejects():
    with pytest.raises(TypeError, match="set is not JSON serializable"):
        json_codec.json_dumps({"s": {1}})
    with pytest.raises(ValueError, match="Out of range float"):
        json_codec.json_dumps(float("nan"))
    cyc: list = []
    cyc.append(cyc)
    with pytest.raises(ValueError, match="Circular"):
        json_codec.json_dumps(cyc)


def test_json_dumps_decimal_like_lambda():
    assert json_codec.json_dumps({"a": Decimal("3"), "b": Decimal("1.5")}) == '{"a":3,"b":1.5}'


# --- HTTP parsing


def test_parse_head_ok():
    method, path, version, headers = http_parse.parse_head(
        b"POST /v1/invoke?x=1 HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n"
        b"X-Ember-Request-Id:  abc \r\nAccept: a\r\nAccept: b"
    )
    assert (method, path, version) == ("POST", "/v1/invoke", "HTTP/1.1")
    assert headers["content-length"] == "5"
    assert headers["x-ember-request-id"] == "abc"
    assert headers["accept"] == "a, b"


@pytest.mark.parametrize(
    "head",
    [
        b"GARBAGE",
        b"GET /healthz",
        b"GET /healthz HTTP/2.0",
        b"GET healthz HTTP/1.1",
        b"G(T /healthz HTTP/1.1",
        b"GET /a b HTTP/1.1",
        b"GET /healthz HTTP/1.1\r\nNoColon",
        b"GET /healthz HTTP/1.1\r\nBad Name: x",
        b"GET /healthz HTTP/1.1\r\n: empty",
        b"GET /healthz HTTP/1.1\r\nX: a\x01b",
        b"GET /healthz HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2",
        b"GET /\x7f HTTP/1.1",
    ],
)
def test_parse_head_rejects_malformed(head):
    with pytest.raises(errors.HTTPError) as e:
        http_parse.parse_head(head)
    assert e.value.status == 400
    assert e.value.message


@pytest.mark.parametrize(
    ("headers", "limit", "expect"),
    [({}, 10, 0), ({"content-length": "7"}, 10, 7), ({"transfer-encoding": "chunked"}, 10, -1)],
)
def test_body_length(headers, limit, expect):
    assert http_parse.body_length(headers, limit) == expect


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"content-length": "11"}, 413),
        ({"content-length": "-1"}, 400),
        ({"content-length": "1e3"}, 400),
        ({"content-length": "9" * 30}, 400),
        ({"transfer-encoding": "gzip"}, 501),
        ({"transfer-encoding": "chunked", "content-length": "3"}, 400),
    ],
)
def test_body_length_rejects(headers, status):
    with pytest.raises(errors.HTTPError) as e:
        http_parse.body_length(headers, 10)
    assert e.value.status == status


# --- logs


def test_log_tail_keeps_last_bytes_and_utf8_boundaries():
    assert invoke.log_tail(b"abc", 4096) == b"abc"
    data = ("é" * 3000).encode()  # 6000 bytes, 2 per char
    tail = invoke.log_tail(data, 4095)
    assert len(tail) <= 4095
    tail.decode("utf-8")  # starts on a character boundary
    assert data.endswith(tail)


@given(st.text(max_size=3000), st.integers(min_value=1, max_value=5000))
def test_log_tail_property(text, limit):
    data = text.encode()
    tail = invoke.log_tail(data, limit)
    assert data.endswith(tail)
    assert len(tail) <= limit
    assert len(tail) >= min(len(data), limit) - 3
    tail.decode("utf-8")


def test_prefix_lines():
    assert output.prefix_lines("r1", b"a\nb\n") == b"r1\ta\nr1\tb\n"
    assert output.prefix_lines("r1", b"partial") == b"r1\tpartial\n"
    assert output.prefix_lines("r1", b"\n") == b"r1\t\n"


# --- handler names, request ids, statuses


@pytest.mark.parametrize(
    ("handler", "expect"),
    [
        ("main.handler", ("main", "handler")),
        ("pkg.mod.fn", ("pkg.mod", "fn")),
        ("pkg/mod.fn", ("pkg.mod", "fn")),
    ],
)
def test_parse_handler(handler, expect):
    assert spec.parse_handler(handler) == expect


@pytest.mark.parametrize("handler", ["", "main", ".handler", "main.", "my-mod.handler", "main.1x", "a..b", 3])
def test_parse_handler_rejects(handler):
    with pytest.raises(ValueError, match="handler"):
        spec.parse_handler(handler)


def test_request_ids():
    ids = {invoke.new_request_id() for _ in range(200)}
    assert len(ids) == 200
    for rid in ids:
        assert invoke.valid_request_id(rid)
        parts = rid.split("-")
        assert [len(p) for p in parts] == [8, 4, 4, 4, 12]
        assert parts[2][0] == "4"
        assert parts[3][0] in "89ab"
    assert not invoke.valid_request_id("")
    assert not invoke.valid_request_id("a" * 129)
    assert not invoke.valid_request_id("bad id")
    assert not invoke.valid_request_id("é")


def test_describe_status():
    assert errors.describe_status(3 << 8) == "Runtime exited with error: exit status 3"
    assert errors.describe_status(9) == "Runtime exited with error: signal: killed"
    assert errors.describe_status(11) == "Runtime exited with error: signal: segmentation fault"
    assert "unknown" in errors.describe_status(None)


def test_format_stack_names_file_line_and_source():
    def inner():
        raise ValueError("x")

    try:
        inner()
    except ValueError as e:
        frames = errors.format_stack(e.__traceback__)
    assert len(frames) == 2
    assert frames[-1].startswith(f'  File "{__file__}", line ')
    assert "in inner" in frames[-1]
    assert 'raise ValueError("x")' in frames[-1]


def test_validate_spec_defaults_and_errors():
    s = spec._validate_spec({"handler": "main.handler", "code": {"url": "http://x/c", "sha256": "A" * 64}})
    assert s["codeHash"] == "sha256:" + "a" * 64
    assert s["memoryMiB"] == 128
    assert s["timeoutSeconds"] == 3.0
    assert s["function"] == {"namespace": "default", "name": "function", "version": "$LATEST"}
    with pytest.raises(errors.HTTPError, match="codeHash"):
        spec._validate_spec({"handler": "main.handler", "code": {"path": "/x"}})
    with pytest.raises(errors.HTTPError, match="filename"):
        spec._validate_spec({"handler": "m.h", "code": {"inline": "x", "filename": "../evil.py"}})
    with pytest.raises(errors.HTTPError, match="memoryMiB"):
        spec._validate_spec({"handler": "m.h", "code": {"inline": "x"}, "memoryMiB": 1.5})
    with pytest.raises(errors.HTTPError, match="concurrency"):
        spec._validate_spec({"handler": "m.h", "code": {"inline": "x"}, "concurrency": True})


def test_unzip_rejects_unsafe_and_corrupt(tmp_path):
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("../evil.py", "x = 1\n")
    with pytest.raises(errors.LoadError, match="unsafe path"):
        loader.unzip(buf.getvalue(), str(tmp_path), 1 << 20)
    with pytest.raises(errors.LoadError) as e:
        loader.unzip(b"PK\x03\x04garbage", str(tmp_path), 1 << 20)
    assert e.value.error_type == "InvalidArchive"
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.txt", "0" * 10000)
    with pytest.raises(errors.LoadError, match="limit"):
        loader.unzip(buf.getvalue(), str(tmp_path), 1000)
    assert not os.path.exists(tmp_path / "big.txt")
