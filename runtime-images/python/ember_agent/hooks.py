"""Runtime hooks in the template and workers: the `ember_runtime` module (and the SnapStart-compatible
`snapshot_restore_py`) that user code registers before-freeze / after-thaw callables with, and running them.
"""

import sys

from .errors import format_stack
from .frames import T_FREEZE
from .logsink import _SINK


def _install_runtime_modules():
    """`import ember_runtime` (and the SnapStart-compatible `snapshot_restore_py`) for user code."""
    mod = type(sys)("ember_runtime")
    mod.__doc__ = "Ember runtime hooks: register callables run before a freeze and after a thaw."
    mod._before_freeze = []
    mod._after_thaw = []

    def register_before_freeze(func, *args, **kwargs):
        mod._before_freeze.append((func, args, kwargs))
        return func

    def register_after_thaw(func, *args, **kwargs):
        mod._after_thaw.append((func, args, kwargs))
        return func

    mod.register_before_freeze = register_before_freeze
    mod.register_after_thaw = register_after_thaw
    snap = type(sys)("snapshot_restore_py")
    snap.register_before_snapshot = register_before_freeze
    snap.register_after_restore = register_after_thaw
    snap.get_before_snapshot = lambda: [f for f, _, _ in mod._before_freeze]
    snap.get_after_restore = lambda: [f for f, _, _ in mod._after_thaw]
    sys.modules["ember_runtime"] = mod
    sys.modules["snapshot_restore_py"] = snap
    return mod


def _run_hooks(kind):
    """before-freeze hooks last-registered first, after-thaw hooks in registration order."""
    mod = sys.modules["ember_runtime"]
    hooks = list(reversed(mod._before_freeze)) if kind == T_FREEZE else list(mod._after_thaw)
    for func, args, kwargs in hooks:
        try:
            func(*args, **kwargs)
        except BaseException as e:
            _SINK.flush()
            return {
                "errorType": type(e).__name__,
                "errorMessage": "{} hook {} raised: {}".format(
                    "before-freeze" if kind == T_FREEZE else "after-thaw", getattr(func, "__qualname__", repr(func)), e
                ),
                "stackTrace": format_stack(e.__traceback__),
            }
    _SINK.flush()
    return {"ok": True}
