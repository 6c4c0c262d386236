"""The agent process's state: one _State (_S) whose fields _lock guards, and every socket it holds."""

import _thread
import os

from .config import _env_int

_thread_state = _thread._local()  # per connection thread: a log line to write after the answer
_lock = _thread.allocate_lock()  # guards the fields of _S
_spec_lock = _thread.allocate_lock()  # one specialize/freeze/thaw at a time


class _State:
    def __init__(self):
        self.state = "generic"
        self.frozen = False
        self.stopped = ()  # pids a freeze stopped beyond the workers' groups; its thaw continues them
        self.thaw_hooks = 0  # after-thaw hooks of the frozen code (freeze.py): 0, and a thaw skips them
        self.code_hash = None
        self.handler = None
        self.spec = None
        self.template = None
        self.idle = []
        self.n_workers = 0
        self.all_workers = set()  # every live _Worker
        self.in_flight = 0
        self.attempt = 0
        self.child_status = {}  # pid -> waitpid status, for the agent's own children (templates)
        self.worker_exits = {}  # pid -> waitpid status, reported by the template
        self.shutting_down = False
        self.standby = None  # _Template waiting for a spec (generic state only)
        self.entry = None  # absolute path of the entry script, to exec a standby (supervisor.py)
        self.token = None  # bytes: the bearer token bound by the first specialize (auth.py)

    def configure(self):
        """Read the agent's environment; main() does it first, so an invalid value ends the agent at
        start with a message naming the variable."""
        self.concurrency = _env_int("EMBER_AGENT_CONCURRENCY", 1, 1)
        self.max_payload = _env_int("EMBER_AGENT_MAX_PAYLOAD_BYTES", 6 * 1024 * 1024, 0)
        self.code_base = os.environ.get("EMBER_AGENT_CODE_DIR") or ""
        self.own_code_base = not self.code_base
        self.max_code_bytes = _env_int("EMBER_AGENT_MAX_CODE_BYTES", 512 * 1024 * 1024, 1)
        self.shutdown_grace = _env_int("EMBER_AGENT_SHUTDOWN_GRACE_SECONDS", 10, 0)


_S = _State()  # main() configures it before anything else runs
_OPEN_SOCKS = set()  # every socket the agent holds; closed (detached) in forked children
