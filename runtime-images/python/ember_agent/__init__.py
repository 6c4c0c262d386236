"""Ember runtime agent for Python: the process inside every function pod.

Standard library only, and on the start path only builtin C modules (``_socket``, ``_thread``,
``_signal``, ``_json``) plus ``os``: ``socket``/``signal``/``json`` would pull in ``enum`` and ``re``
and cost ~20 ms and ~2 MiB.  Start with ``python3 -S -E agent.py`` (the entry script beside this
package).  The HTTP contract is ``runtime-images/CONTRACT.md``.

Processes:

* agent (``lifecycle.main``): HTTP/1.1 server, one thread per connection; the main thread only
  waits for signals (SIGTERM: drain and exit; SIGCHLD: reap, also as PID 1).
* template: forked by the agent at start as a standby.  It forks the blank worker and waits.
  Once the blank worker has loaded the code, the template imports it too (its init output is
  dropped), answers LOAD_OK or LOAD_ERR and then only forks workers; the agent sends it the spec
  after the first invocation (or when a worker or a hook needs it first), so that the cold start
  does not share the CPU with a second import.  Whoever needs it waits for that answer (up to
  initTimeoutSeconds).  It reports the blank worker's exit also while it imports.  A failed load
  kills it: the agent stays generic and clean.
* blank worker: forked by the standby template before any code exists; it makes the code
  directory and warms up.  On specialize the agent sends it the spec directly: it puts the code in
  place (fetching/unpacking in a short-lived child), imports the module, answers the agent
  (LOAD_OK with its pid: the specialize answer) and becomes the first worker, so specialize + first
  invoke fork nothing and pass through no third process (under gVisor a fork costs ~10-25 ms and
  every hop between processes ~0.5 ms).
* workers: forked from the template (code already imported, so a new worker is ready in ~1 ms);
  each runs one invocation at a time.  The agent talks to a worker over a socketpair with
  length-prefixed frames, and kills it (timeout, exit, out of memory) and asks the template for a
  fresh one.

Modules, lowest layer first (each imports only from those above it):

========================  ===========================================================================
shared by all processes
``config``                limits, defaults, environment parsing
``forksafe``              imports in agent threads (the fork hazard) and the lock the fork holds
``output``                the agent's stdout/stderr lines; trace marks (EMBER_AGENT_TRACE=1)
``json_codec``            JSON on the C accelerator, without importing ``json``
``errors``                HTTPError, LoadError, exit statuses, Lambda-style stack traces
``http_parse``            request head and body length (pure)
``frames``                the frames between agent, template and workers
``state``                 the agent's state (``_S``) and its lock
``spec``                  validation of the specialize request (pure)
forked children
``logsink``               user output: sys.stdout/sys.stderr of the template and workers
``hooks``                 the ``ember_runtime`` module and running its freeze/thaw hooks
``loader``                putting the code in place, importing it, resolving the handler
``worker``                a worker's invoke loop and LambdaContext
``template``              standby template, blank worker, template (never return into agent code)
the agent process
``auth``                  the bearer token the first specialize binds; making the agent non-dumpable
``supervisor``            forking and talking to the standby, the template and the workers
``specialize``            POST /v1/specialize
``invoke``                POST /v1/invoke
``freeze``                POST /v1/freeze, /v1/thaw
``relay``                 the services relay: sandbox loopback to the host's services proxy socket
``server``                HTTP/1.1 server: connections, routes, answers
``lifecycle``             ``main``: start, signals, reaping, shutdown
========================  ===========================================================================

Images and local mode run the one-file build of this package (``bundle.py`` concatenates the
modules), which starts as fast as one module; importing twenty costs ~2 ms natively and ~48 ms
under gVisor.  So: every top-level name is defined in one module only, modules share names
only through ``from .module import name`` (never ``module.name``), and a global is rebound
(``global``) only by functions of its own module.
"""

from .config import RUNTIME
from .lifecycle import main

__all__ = ["RUNTIME", "main"]
