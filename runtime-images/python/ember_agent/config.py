"""Limits, defaults and environment parsing of the Python agent (CONTRACT.md lists the variables)."""

import os
import sys

RUNTIME = f"python{sys.version_info[0]}.{sys.version_info[1]}"
MAX_HEAD_BYTES = 64 * 1024
MAX_SPECIALIZE_BYTES = 64 * 1024 * 1024
MAX_OTHER_BODY_BYTES = 1024 * 1024
MAX_DRAIN_BYTES = 64 * 1024 * 1024  # an announced too-large body up to this size is read and dropped
LOG_TAIL_BYTES = 4096
HOOK_TIMEOUT_S = 10.0
WORKER_START_TIMEOUT_S = 10.0  # from the request to a loaded template to the new worker's HELLO
DEFAULT_TIMEOUT_S = 3.0
DEFAULT_MEMORY_MIB = 128
DEFAULT_INIT_TIMEOUT_S = 10.0
MAX_SOCKET_PATH_BYTES = 107  # sun_path is 108 bytes with the final NUL (Node truncates a longer path)


def _env_int(name, default, minimum=0, maximum=1 << 62):
    raw = os.environ.get(name, "")
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SystemExit(f"ember-agent: {name}={raw!r} is not an integer") from None
    if not minimum <= value <= maximum:
        raise SystemExit(f"ember-agent: {name}={raw!r} must be between {minimum} and {maximum}")
    return value
