"""Loading user code in the blank worker and the template: put the code in place (inline source, a
base64 zip, a directory, or a URL fetched in a short-lived child), import the module, resolve the handler.
"""

# contextlib.suppress would cost an import (functools, collections) on the start path:
# ruff: noqa: SIM105

import _imp
import io  # loaded by the interpreter at startup: free
import os
import sys

from .errors import LoadError, describe_status, format_stack
from .json_codec import jbytes, json_loads
from .output import _mark
from .spec import parse_handler
from .state import _S

_SITE_DIRS = []  # the interpreter's site-packages folders that exist (set by _prewarm)


def _run_in_child(fn, *args):
    """Run fn(*args) in a forked child (keeps zipfile/urllib/hashlib out of the template's memory);
    a LoadError in the child is re-raised here."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = 0
        try:
            fn(*args)
        except LoadError as e:
            os.write(w, jbytes({"errorType": e.error_type, "errorMessage": e.message}))
            code = 1
        except BaseException as e:
            os.write(w, jbytes({"errorType": "Runtime.CodeError", "errorMessage": f"{type(e).__name__}: {e}"}))
            code = 1
        os._exit(code)
    os.close(w)
    chunks = []
    while True:
        c = os.read(r, 65536)
        if not c:
            break
        chunks.append(c)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        err = (
            json_loads(b"".join(chunks))
            if chunks
            else {"errorType": "Runtime.CodeError", "errorMessage": f"code loader {describe_status(status)}"}
        )
        raise LoadError(err["errorType"], err["errorMessage"])


def unzip(data_or_path, dest, max_bytes):
    """Unpack a zip archive (bytes or a file path) into dest; LoadError names what is wrong."""
    import zipfile

    src = data_or_path
    if isinstance(src, bytes):
        src = io.BytesIO(src)
    try:
        with zipfile.ZipFile(src) as zf:
            infos = zf.infolist()
            total = sum(i.file_size for i in infos)
            if total > max_bytes:
                raise LoadError("InvalidArchive", f"code archive unpacks to {total} bytes; the limit is {max_bytes}")
            for info in infos:
                name = info.filename
                if name.startswith("/") or ".." in name.replace("\\", "/").split("/"):
                    raise LoadError("InvalidArchive", f"code archive has an unsafe path {name!r}")
            zf.extractall(dest)
    except LoadError:
        raise
    except zipfile.BadZipFile as e:
        raise LoadError("InvalidArchive", f"code archive is not a valid zip file: {e}") from None
    except Exception as e:  # zlib.error, EOFError, OSError, NotImplementedError (method), ...
        raise LoadError("InvalidArchive", f"code archive is corrupt: {type(e).__name__}: {e}") from None


def _fetch(url, sha256, dest, module_file, max_bytes):
    import hashlib
    import urllib.request

    tmp = os.path.join(dest, ".ember-download")
    h = hashlib.sha256()
    size = 0
    try:
        with urllib.request.urlopen(url, timeout=30) as resp, open(tmp, "wb") as f:
            while True:
                chunk = resp.read(1 << 20)
                if not chunk:
                    break
                size += len(chunk)
                if size > max_bytes:
                    raise LoadError("CodeFetchFailed", f"code at {url} is larger than {max_bytes} bytes")
                h.update(chunk)
                f.write(chunk)
    except LoadError:
        raise
    except Exception as e:
        raise LoadError("CodeFetchFailed", f"fetching code from {url} failed: {e}") from None
    got = h.hexdigest()
    if got != sha256.lower():
        os.unlink(tmp)
        raise LoadError("ChecksumMismatch", f"sha256 mismatch for {url}: expected {sha256.lower()}, got {got}")
    with open(tmp, "rb") as f:
        magic = f.read(4)
    if magic in (b"PK\x03\x04", b"PK\x05\x06"):
        unzip(tmp, dest, max_bytes)
        os.unlink(tmp)
    else:
        os.replace(tmp, os.path.join(dest, module_file))


def _materialize(code, modname, dest):
    """Put the code in place -> the directory to import from."""
    max_bytes = _S.max_code_bytes
    module_file = modname.replace(".", "/") + ".py"
    if "path" in code:
        path = code["path"]
        if not os.path.isdir(path):
            raise LoadError("Runtime.CodeNotFound", f"code.path {path!r} is not a directory")
        return path
    if "url" in code:
        _run_in_child(_fetch, code["url"], code["sha256"], dest, module_file, max_bytes)
        return dest
    if code.get("encoding") == "base64-zip":
        import binascii

        try:
            data = binascii.a2b_base64(code["inline"].encode("ascii"), strict_mode=True)
        except (binascii.Error, UnicodeEncodeError, TypeError) as e:
            raise LoadError("InvalidArchive", f"code.inline is not valid base64: {e}") from None
        _run_in_child(unzip, data, dest, max_bytes)
        return dest
    fname = code.get("filename") or module_file
    path = os.path.join(dest, fname)
    if "/" in fname:
        os.makedirs(os.path.dirname(path), exist_ok=True)
    data = code["inline"].encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    return dest


def _written_module(code, modname, dest):
    """(path, bytes) of the handler's module when it is the one inline source file just written
    into the empty code directory `dest`, a top-level module that `import` would find there
    (nothing builtin, frozen or already imported by that name); else None."""
    if "inline" not in code or code.get("encoding") == "base64-zip" or "." in modname:
        return None
    fname = code.get("filename") or modname + ".py"
    if fname != modname + ".py" or modname in sys.modules or modname in sys.builtin_module_names:
        return None
    if _imp.is_frozen(modname):
        return None
    return os.path.join(dest, fname), code["inline"].encode("utf-8")


def _import_written(name, path, source):
    """`import name` of the source file just written at `path` (whose bytes are `source`), as the
    path finder and SourceFileLoader would do it: the same spec, loader, module attributes,
    module lock, sys.modules handling, compile of the bytes (so a coding cookie applies), minus
    their file-system calls (listing the directory, stat, looking for a .pyc, reading the file
    back): ~2 ms under gVisor."""
    boot = sys.modules["_frozen_importlib"]
    spec = sys.modules["_frozen_importlib_external"].spec_from_file_location(name, path)
    with boot._ModuleLockManager(name):
        mod = boot.module_from_spec(spec)
        spec._initializing = True
        sys.modules[name] = mod
        try:
            exec(compile(source, path, "exec", dont_inherit=True), mod.__dict__)
        except BaseException:
            sys.modules.pop(name, None)
            raise
        finally:
            spec._initializing = False
    return sys.modules[name]


def _without_loader(tb):
    """A load error's traceback without _import_written's frame (import hides its own frames)."""
    if tb is not None and tb.tb_next is not None and tb.tb_next.tb_frame.f_code is _import_written.__code__:
        tb.tb_next = tb.tb_next.tb_next
    return tb


def _listing(path):
    try:
        names = sorted(os.listdir(path))
    except OSError:
        return "(unreadable)"
    names = [n for n in names if not n.startswith(".")]
    return ", ".join(names[:20]) + (", ..." if len(names) > 20 else "") if names else "(empty)"


def _agent_dir():
    """The sys.path folder the agent was imported from: the package's parent folder, or the folder of
    the one-file build (see bundle.py), which has no package."""
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.dirname(here) if __package__ else here


def _load(spec, dest, code_path=None):
    """Import the user module and resolve the handler.  -> handler callable.

    The blank worker passes `dest` (the code is put in place there); the template passes the
    `code_path` the blank worker loaded from."""
    handler = spec["handler"]
    modname, attr = parse_handler(handler)
    written = None
    if code_path is None:
        code_path = _materialize(spec["code"], modname, dest)
        written = _written_module(spec["code"], modname, dest)
        _mark("x.written")
    _mark("x.ready")
    os.environ.update(spec["env"])
    try:
        os.chdir(code_path)
    except OSError:
        pass
    _mark("x.chdir")
    agent_dir = _agent_dir()
    sys.path[:] = [code_path] + [p for p in sys.path if p and os.path.abspath(p) != agent_dir] + _SITE_DIRS
    sys.argv = [os.path.join(code_path, modname.replace(".", "/") + ".py")]
    _mark("x.paths")
    try:
        if written is not None:
            mod = _import_written(modname, *written)
        else:
            __import__(modname)
            mod = sys.modules[modname]
        _mark("x.imported")
    except SyntaxError as e:
        where = (
            os.path.relpath(e.filename, code_path) if e.filename and e.filename.startswith(code_path) else e.filename
        )
        raise LoadError(
            "Runtime.UserCodeSyntaxError",
            f"Syntax error in module '{modname}': {e.msg} ({where}, line {e.lineno})",
        ) from None
    except ImportError as e:
        msg = f"Unable to import module '{modname}': {e}"
        if getattr(e, "name", None) == modname.split(".")[0] or e.name == modname:
            msg += f" (files in the code directory: {_listing(code_path)})"
        raise LoadError("Runtime.ImportModuleError", msg, format_stack(_without_loader(e.__traceback__))) from None
    except SystemExit as e:
        raise LoadError(
            "Runtime.ExitError", f"module '{modname}' called sys.exit({e.code!r}) while being imported"
        ) from None
    except BaseException as e:
        raise LoadError(
            "Runtime.InitError",
            f"module '{modname}' raised {type(e).__name__} while being imported: {e}",
            format_stack(_without_loader(e.__traceback__)),
        ) from None
    try:
        fn = getattr(mod, attr)
    except AttributeError:
        raise LoadError(
            "Runtime.HandlerNotFound",
            f"handler '{handler}' not found: module '{modname}' has no attribute '{attr}'",
        ) from None
    if not callable(fn):
        raise LoadError(
            "Runtime.HandlerNotFound",
            f"handler '{handler}' is not callable: '{attr}' is a {type(fn).__name__}",
        )
    target = getattr(fn, "__wrapped__", fn)
    code = getattr(target, "__code__", None) or getattr(type(target).__dict__.get("__call__"), "__code__", None)
    if code is not None and code.co_flags & 0x80:  # CO_COROUTINE: warm asyncio up for every worker
        import asyncio  # noqa: F401
    return fn
