"""Minimal JSON on top of the C accelerator (json.loads/dumps semantics, without importing `re`)."""

import _json
import sys

from .forksafe import _import


class JSONError(ValueError):
    pass


class _ScanCtx:
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = float  # 'NaN', 'Infinity', '-Infinity' like json.loads


_scan = _json.make_scanner(_ScanCtx())
_WS = " \t\n\r"


def json_loads(data):
    """Parse one JSON document from str/bytes; JSONError (a ValueError) says what is wrong."""
    if not isinstance(data, str):
        try:
            data = bytes(data).decode("utf-8")
        except UnicodeDecodeError as e:
            raise JSONError(f"not UTF-8: {e}") from None
    idx = len(data) - len(data.lstrip(_WS))
    try:
        obj, end = _scan(data, idx)
    except StopIteration as e:
        if idx >= len(data):
            raise JSONError("empty document") from None
        raise JSONError(f"expecting a JSON value at char {e.value}") from None
    except RecursionError:
        raise JSONError("nesting too deep") from None
    except Exception:  # error path only: let the json module word the message
        # (on 3.11 the bare C scanner can fail with SystemError when json.decoder isn't loaded)
        json = _import("json")
        try:
            json.loads(data)
        except ValueError as e:
            raise JSONError(str(e)) from None
        except RecursionError:
            raise JSONError("nesting too deep") from None
        raise JSONError("invalid JSON") from None
    if data[end:].strip(_WS):
        raise JSONError(f"extra data after the JSON value at char {len(data) - len(data[end:].lstrip(_WS))}")
    return obj


def _json_default(o):
    dec = sys.modules.get("decimal")
    if dec is not None and isinstance(o, dec.Decimal):  # like Lambda's runtime
        return int(o) if o == o.to_integral_value() else float(o)
    raise TypeError(f"Object of type {type(o).__name__} is not JSON serializable")


def json_dumps(obj, allow_nan=False, ascii=True):
    """Compact JSON text (`ascii`: non-ASCII characters escaped).  Raises TypeError/ValueError/
    RecursionError for unserializable values."""
    quote = _json.encode_basestring_ascii if ascii else _json.encode_basestring
    enc = _json.make_encoder({}, _json_default, quote, None, ":", ",", False, False, allow_nan)
    return "".join(enc(obj, 0))


def jbytes(obj):
    return json_dumps(obj, allow_nan=True).encode()
