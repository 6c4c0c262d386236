"""Imports in agent threads, made safe for fork.

HAZARD: the template is forked from a connection thread while other agent threads run.  If one
of them is inside an import at that moment, it holds that module's importlib lock, and the child
(where that thread does not exist) hangs forever when it imports the same module.  So every
import in the agent after threads start goes through _import(), and the fork holds _fork_lock.
A child forked from the agent renews the lock first (_renew_fork_lock); the modules that take
_fork_lock by name run only in the agent, so they never hold a stale one.
"""

import _thread
import sys

_fork_lock = _thread.RLock()


def _import(name):
    mod = sys.modules.get(name)
    if mod is None:
        with _fork_lock:
            __import__(name)
            mod = sys.modules[name]
    return mod


def _renew_fork_lock():
    """In a child just forked from the agent: a fresh lock (the forking thread, which held this one,
    does not exist there)."""
    global _fork_lock
    _fork_lock = _thread.RLock()
