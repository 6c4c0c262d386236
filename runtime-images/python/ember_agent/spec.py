"""The specialize request: its validation into a spec (pure; unit tested) and the handler's name."""

from .config import DEFAULT_INIT_TIMEOUT_S, DEFAULT_MEMORY_MIB, DEFAULT_TIMEOUT_S
from .errors import bad_request
from .forksafe import _import


def parse_handler(handler):
    """'pkg/mod.func' or 'pkg.mod.func' -> ('pkg.mod', 'func'); ValueError says what is wrong."""
    if not isinstance(handler, str) or not handler:
        raise ValueError("handler must be a non-empty string like 'main.handler'")
    mod, dot, attr = handler.rpartition(".")
    mod = mod.replace("/", ".")
    if not dot or not mod or not attr:
        raise ValueError(f"handler {handler!r} must be '<module>.<function>', e.g. 'main.handler'")
    for part in [*mod.split("."), attr]:
        if not part.isidentifier():
            raise ValueError(f"handler {handler!r}: {part!r} is not a valid Python identifier")
    return mod, attr


def _validate_spec(req):
    if not isinstance(req, dict):
        raise bad_request("specialize body must be a JSON object")
    fn = req.get("function") or {}
    if not isinstance(fn, dict):
        raise bad_request("'function' must be an object with namespace, name, version")
    function = {
        "namespace": str(fn.get("namespace") or "default"),
        "name": str(fn.get("name") or "function"),
        "version": str(fn.get("version") if fn.get("version") is not None else "$LATEST"),
    }
    handler = req.get("handler")
    if not isinstance(handler, str) or not handler:
        raise bad_request("'handler' must be a non-empty string like 'main.handler'")
    code = req.get("code")
    if not isinstance(code, dict):
        raise bad_request("'code' must be an object with one of 'inline', 'path', 'url'")
    kinds = [k for k in ("inline", "path", "url") if k in code]
    if len(kinds) != 1:
        raise bad_request("'code' must have exactly one of 'inline', 'path', 'url' (got %s)" % (kinds or "none"))
    kind = kinds[0]
    if not isinstance(code[kind], str) or not code[kind]:
        raise bad_request(f"'code.{kind}' must be a non-empty string")
    if kind == "inline":
        enc = code.get("encoding", "utf-8")
        if enc not in ("utf-8", "base64-zip"):
            raise bad_request("'code.encoding' must be 'utf-8' (source text) or 'base64-zip'")
        fname = code.get("filename")
        if fname is not None and (
            not isinstance(fname, str) or not fname or fname.startswith("/") or ".." in fname.split("/")
        ):
            raise bad_request("'code.filename' must be a relative path without '..'")
    if kind == "url":
        sha = code.get("sha256")
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdefABCDEF" for c in sha):
            raise bad_request("'code.sha256' must be 64 hex digits (the sha256 of the bytes at code.url)")
    code_hash = req.get("codeHash")
    if code_hash is None:
        if kind == "url":
            code_hash = "sha256:" + code["sha256"].lower()
        elif kind == "inline":
            hashlib = _import("hashlib")
            code_hash = "sha256:" + hashlib.sha256(code["inline"].encode()).hexdigest()
        else:
            raise bad_request("'codeHash' is required with 'code.path'")
    if not isinstance(code_hash, str) or not code_hash or len(code_hash) > 200:
        raise bad_request("'codeHash' must be a non-empty string")
    env = req.get("env") or {}
    if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
        raise bad_request("'env' must be an object of string values")
    for k in env:
        if not k or "=" in k or "\0" in k or "\0" in env[k]:
            raise bad_request(f"'env' has an invalid variable name {k!r}")

    def num(key, default, integer):
        v = req.get(key)
        if v is None:
            return default
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0 or (integer and v != int(v)):
            raise bad_request("'{}' must be a positive {}".format(key, "integer" if integer else "number"))
        return int(v) if integer else float(v)

    return {
        "function": function,
        "handler": handler,
        "code": code,
        "codeHash": code_hash,
        "env": env,
        "memoryMiB": num("memoryMiB", DEFAULT_MEMORY_MIB, True),
        "timeoutSeconds": num("timeoutSeconds", DEFAULT_TIMEOUT_S, False),
        "concurrency": num("concurrency", None, True),
        "initTimeoutSeconds": num("initTimeoutSeconds", DEFAULT_INIT_TIMEOUT_S, False),
    }
