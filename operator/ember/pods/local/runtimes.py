"""What runs in a local pod: the generic agent's command line per runtime, and the interpreter for it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from ember.pods.base import PoolUnavailable

RUNTIME_IMAGES = Path(__file__).resolve().parents[4] / "runtime-images"


def _python_for(version: str) -> str:
    """The real interpreter binary for python3.X (pyenv shims resolved: sandboxes run it directly)."""
    candidate = shutil.which(f"python{version}")
    if candidate is not None and "/shims/" in candidate:
        # a pyenv shim picks the interpreter by the current directory; find the binary itself
        root = Path(os.environ.get("PYENV_ROOT") or Path(candidate).parents[1])
        installed = sorted(root.glob(f"versions/{version}*/bin/python{version}"))
        candidate = str(installed[-1]) if installed else None
    if candidate is None:
        if f"{sys.version_info[0]}.{sys.version_info[1]}" == version:
            return sys.executable
        raise PoolUnavailable(f"runtime python{version} is not installed on this machine")
    try:
        resolved = subprocess.run(
            [candidate, "-c", "import sys; print(sys.executable)"],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError) as err:
        raise PoolUnavailable(f"runtime python{version} ({candidate}) does not start: {err}") from err
    # The agent runs with -S -E on the standard library alone, so a virtualenv's interpreter is
    # replaced by the binary it links to: a sandbox then needs no view of the virtualenv.
    return os.path.realpath(resolved or candidate)


def _bundle_cache(sources: Path) -> list[str]:
    """Where the agent's one-file build goes (`bundle.py --cached [DIR]`): beside its sources (their
    `__pycache__`) where this user may write there, as in a checkout; else this user's cache, as
    when `ember dev` runs as another user than the one who installed Ember."""
    beside = sources / "__pycache__"
    if os.access(beside if beside.exists() else sources, os.W_OK):
        return []
    return [str(Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ember" / "agent")]


def agent_command(runtime: str, runtime_images: Path = RUNTIME_IMAGES) -> list[str]:
    """The command line of a generic agent for a runtime."""
    if runtime.startswith("python"):
        # the agent package's one-file build, as images run it (importing the package module by
        # module would cost every start ~2 ms, ~48 ms under gVisor): see runtime-images/python/bundle.py
        bundle = runtime_images / "python" / "bundle.py"
        if not bundle.is_file():
            raise PoolUnavailable(f"the Python agent is missing: {bundle}")
        python = _python_for(runtime.removeprefix("python"))
        try:
            built = subprocess.run(
                [python, "-S", "-E", str(bundle), "--cached", *_bundle_cache(bundle.parent)],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
        except subprocess.CalledProcessError as err:
            raise PoolUnavailable(f"building the Python agent failed: {err.stderr.strip()}") from err
        except (OSError, subprocess.SubprocessError) as err:
            raise PoolUnavailable(f"building the Python agent failed: {err}") from err
        return [python, "-S", "-E", built.stdout.strip()]
    if runtime.startswith("nodejs"):
        agent = runtime_images / "nodejs" / "agent.js"
        node = shutil.which("node")
        if not agent.is_file() or node is None:
            raise PoolUnavailable(f"runtime {runtime} needs node and {agent}")
        return [node, str(agent)]
    raise PoolUnavailable(f"runtime {runtime!r} has no local agent")
