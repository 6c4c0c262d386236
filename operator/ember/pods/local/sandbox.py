"""Sandboxes for local agent processes: which one this machine has, and the command line in it.

Best first (`EMBER_SANDBOX=runsc|bwrap|none` forces one):

- **runsc** (gVisor; `EMBER_RUNSC` names the binary, else PATH): `runsc --rootless
  --network=host do`. The sandbox gets gVisor's own kernel (syscalls never reach the host
  kernel directly) and a read-only view of the host filesystem with a private writable
  overlay. `runsc do` without `--network=host` gives the sandbox its own network namespace,
  which it wires with a veth pair and iptables NAT on a 192.168.10.0/24 address per sandbox:
  that needs iptables, puts every sandbox on the same fixed address, and uses a private range
  this machine must not send traffic to. With `--network=host` the sandboxed agent binds a
  port on the host's loopback (gVisor's hostinet), which the activator reaches like any local
  process, so local mode does not isolate the network (a cluster enforces the
  SecurityPolicy's egress with NetworkPolicy instead). `EMBER_RUNSC_FLAGS` adds flags (e.g.
  `--platform=systrap` for a newer runsc).
- **bwrap** (bubblewrap): new user, mount, pid, ipc and uts namespaces, read-only root,
  private /tmp, host network (for the same reason).
- **none**: a plain child process, with a loud warning: the function is not isolated.
"""

from __future__ import annotations

import enum
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path


class Sandbox(enum.Enum):
    """How agent processes are isolated."""

    RUNSC = "runsc"
    BWRAP = "bwrap"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class SandboxChoice:
    """The sandbox in use, the binary that provides it, and why (for `ember dev`'s banner)."""

    kind: Sandbox
    binary: str | None
    note: str

    @property
    def isolated(self) -> bool:
        return self.kind is not Sandbox.NONE


def detect_sandbox(env: Mapping[str, str] | None = None) -> SandboxChoice:
    """The best sandbox available here (see the module docstring)."""
    env = os.environ if env is None else env
    forced = env.get("EMBER_SANDBOX", "").strip().lower()
    if forced and forced not in {s.value for s in Sandbox}:
        raise ValueError(f"EMBER_SANDBOX={forced!r}: must be one of runsc, bwrap, none")
    runsc = env.get("EMBER_RUNSC") or shutil.which("runsc")
    bwrap = shutil.which("bwrap")
    if forced in ("", "runsc") and runsc:
        if not os.access(runsc, os.X_OK):
            raise ValueError(f"EMBER_RUNSC={runsc!r} is not an executable file")
        return SandboxChoice(Sandbox.RUNSC, runsc, f"gVisor ({runsc}, host network)")
    if forced == "runsc":
        raise ValueError("EMBER_SANDBOX=runsc but runsc is not installed (apt-get install runsc, or set EMBER_RUNSC)")
    if forced in ("", "bwrap") and bwrap:
        return SandboxChoice(Sandbox.BWRAP, bwrap, f"bubblewrap ({bwrap}); install runsc for gVisor")
    if forced == "bwrap":
        raise ValueError("EMBER_SANDBOX=bwrap but bwrap is not installed (apt-get install bubblewrap)")
    return SandboxChoice(
        Sandbox.NONE, None, "NONE: functions run as plain processes, NOT ISOLATED (install runsc or bubblewrap)"
    )


def sandboxed(choice: SandboxChoice, command: list[str], env: Mapping[str, str] | None = None) -> list[str]:
    """Wrap an agent command line in the chosen sandbox."""
    env = os.environ if env is None else env
    if choice.kind is Sandbox.RUNSC:
        assert choice.binary is not None
        extra = env.get("EMBER_RUNSC_FLAGS", "").split()
        return [choice.binary, "--rootless", "--network=host", *extra, "do", *command]
    if choice.kind is Sandbox.BWRAP:
        assert choice.binary is not None
        # the private /tmp hides the host's; an interpreter or agent living there is bound back
        keep = sorted({str(root) for p in command if (root := _tmp_root(Path(p))) is not None})
        binds = [arg for path in keep for arg in ("--ro-bind", path, path)]
        return [
            choice.binary,
            "--ro-bind", "/", "/",
            "--dev", "/dev",
            "--proc", "/proc",
            "--tmpfs", "/tmp",
            *binds,
            "--unshare-all",
            "--share-net",
            "--die-with-parent",
            "--new-session",
            "--",
            *command,
        ]  # fmt: skip
    return list(command)


def _tmp_root(path: Path) -> Path | None:
    """The top folder under /tmp holding `path` (e.g. /tmp/clone for /tmp/clone/x/y), or None."""
    parts = path.resolve().parts if path.is_absolute() else ()
    if len(parts) > 2 and parts[1] == "tmp":
        return Path("/", "tmp", parts[2])
    return None
