"""Sandboxes for local agent processes: which one this machine has, and the command line in it.

Function code is hostile (DESIGN.md, Trust boundaries). Whatever the sandbox, the command line
built here starts the agent with a minimal, explicit environment (`ember.pods.local.process.
AGENT_ENV` plus the agent's own `EMBER_AGENT_*` settings), never the environment of the process
running `ember dev`. Best first (`EMBER_SANDBOX=runsc|bwrap|none` forces one):

- **runsc** (gVisor; `EMBER_RUNSC` names the binary, else PATH): `runsc --rootless
  --network=host do`. The sandbox gets gVisor's own kernel (syscalls never reach the host
  kernel directly) and a private in-memory overlay on every mount, so nothing it writes reaches
  the host. `runsc do` runs its command as root with every capability (gVisor's); the command
  here first becomes uid/gid 65534 with no capabilities and no_new_privs (`setpriv`). When the
  runsc's `do` takes `-volume` (newer gVisor; Debian's 2022 runsc does not), its root is a
  minimal skeleton (`_skeleton`) with read-only-in-effect volumes of /usr, a few /etc files and
  the agent's own interpreter and code only: no project tree, no /root, no /etc/shadow. With an
  older runsc the root is the host's, read-only: the uid keeps /etc/shadow and /root out, but
  world-readable files (the project tree, the other functions' manifests) stay readable; and
  when the interpreter itself lives where uid 65534 cannot reach it (pyenv under /root), the
  agent stays uid 0 with no capabilities, which does not keep those out (a warning says so).
  `runsc do` without `--network=host` gives the sandbox its own network namespace, wired with a
  veth pair and iptables NAT on a fixed 192.168.10.0/24 address per sandbox: that needs
  iptables and uses a private range this machine must not send traffic to. With
  `--network=host` the agent binds a port on the host's loopback (gVisor's hostinet), so local
  mode does not isolate the network (a cluster enforces the SecurityPolicy's egress with
  NetworkPolicy instead). `EMBER_RUNSC_FLAGS` adds flags (e.g. `--platform=systrap`).
- **bwrap** (bubblewrap), only unprivileged: a new user namespace mapped to uid/gid 65534,
  every capability dropped, no further user namespaces (`--disable-userns`, bubblewrap 0.8+),
  new pid, ipc, uts and cgroup namespaces, its own session, killed with its parent. The root is
  empty but for read-only binds of /usr (and the merged-/usr symlinks), a few /etc files and
  the agent's own interpreter and code, a private tmpfs /tmp (the only writable path), /dev
  and /proc; host network (for
  the reason above). bwrap is refused when it cannot make that user namespace here (probed
  once); it never runs privileged.
- **none**: a plain child process, with a loud warning: the function is not isolated.
"""

from __future__ import annotations

import enum
import functools
import logging
import os
import shlex
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from ember.pods.local.process import AGENT_ENV, AGENT_SETTINGS

log = logging.getLogger(__name__)

SANDBOX_UID = 65534  # nobody: owns nothing on the host
# What the agent and a function's runtime need from the host's /etc; nothing else of it is seen.
ETC_FILES = ("ld.so.cache", "resolv.conf", "hosts", "nsswitch.conf", "localtime", "ssl", "ca-certificates")
MERGED_USR = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")


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
        if shutil.which("setpriv") is None:
            raise ValueError("runsc needs setpriv (util-linux) to run agents as a non-root user")
        return SandboxChoice(Sandbox.RUNSC, runsc, f"gVisor ({runsc}, host network)")
    if forced == "runsc":
        raise ValueError("EMBER_SANDBOX=runsc but runsc is not installed (apt-get install runsc, or set EMBER_RUNSC)")
    refused = ""
    if forced in ("", "bwrap") and bwrap:
        refused = _bwrap_problem(bwrap)
        if not refused:
            return SandboxChoice(Sandbox.BWRAP, bwrap, f"bubblewrap ({bwrap}); install runsc for gVisor")
        if forced == "bwrap":
            raise ValueError(f"EMBER_SANDBOX=bwrap but {refused}")
    if forced == "bwrap":
        raise ValueError("EMBER_SANDBOX=bwrap but bwrap is not installed (apt-get install bubblewrap)")
    because = f" ({refused})" if refused else ""
    return SandboxChoice(
        Sandbox.NONE,
        None,
        f"NONE: functions run as plain processes, NOT ISOLATED{because} (install runsc or bubblewrap)",
    )


def sandboxed(choice: SandboxChoice, command: list[str], env: Mapping[str, str] | None = None) -> list[str]:
    """Wrap an agent command line in the chosen sandbox, with the agent's minimal environment."""
    env = os.environ if env is None else env
    if choice.kind is Sandbox.RUNSC:
        assert choice.binary is not None
        extra = env.get("EMBER_RUNSC_FLAGS", "").split()
        do = _runsc_do(choice.binary, command)
        return _clean_env([choice.binary, "--rootless", "--network=host", *extra, "do", *do])
    if choice.kind is Sandbox.BWRAP:
        assert choice.binary is not None
        return _clean_env(_bwrap(choice.binary, command))
    return _clean_env(list(command))


def runsc_has_volumes(binary: str) -> bool:
    """Whether this runsc's `do` takes `-volume` (and so can run on a minimal root)."""
    return _runsc_do_help(binary).count("-volume") > 0


# -- the environment


def _clean_env(command: list[str]) -> list[str]:
    """`command` started with only `AGENT_ENV` and the agent's own settings that are set.

    The caller's environment is whatever the process running `ember dev` has (tokens, cloud
    credentials); `runsc do` hands its own environment to the sandboxed process. So the sandbox
    binary itself starts from an empty environment: `sh` keeps each `EMBER_AGENT_*` setting the
    agent reads (`AGENT_SETTINGS`) that is set, `env -i` drops everything else. Values pass as
    they are (quoted expansions); costs one `sh` and one `env` exec per agent start (~1 ms).
    """
    keep = " ".join(f'${{{name}+"{name}=${name}"}}' for name in AGENT_SETTINGS)
    base = " ".join(shlex.quote(f"{k}={v}") for k, v in AGENT_ENV.items())
    script = f'exec {shlex.quote(_which("env"))} -i {base} {keep} "$@"'
    return ["/bin/sh", "-c", script, "ember-agent", *command]


# -- runsc


def _runsc_do(binary: str, command: list[str]) -> list[str]:
    """`runsc do`'s flags and command: a minimal root when it can, and a non-root uid."""
    flags = ["-cwd", "/tmp"]
    user = [_which("setpriv"), f"--reuid={SANDBOX_UID}", f"--regid={SANDBOX_UID}", "--clear-groups"]
    if runsc_has_volumes(binary):
        flags = ["-root", str(_skeleton()), *flags]
        for path in _host_paths(command):
            if not (path.is_symlink() and path.parent == Path("/")):  # the skeleton has /bin -> usr/bin
                flags += ["-volume", f"{path}:{path}"]
    elif not all(_reachable_by_others(Path(p)) for p in command if p.startswith("/")):
        # the host's root is the sandbox's, and uid 65534 could not start the interpreter
        log.warning(
            "runsc %s has no `do -volume`: agent %s runs as uid 0 without capabilities, so files only root "
            "may read (/etc/shadow, /root) are readable by functions; use a newer runsc (EMBER_RUNSC)",
            binary,
            command[0],
        )
        user = [_which("setpriv")]
    drop = ["--inh-caps=-all", "--ambient-caps=-all", "--bounding-set=-all", "--no-new-privs"]
    return [*flags, *user, *drop, "--", *command]


@functools.cache
def _runsc_do_help(binary: str) -> str:
    try:
        done = subprocess.run([binary, "do", "--help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout + done.stderr


def _skeleton() -> Path:
    """An empty root for `runsc do -root`: the merged-/usr symlinks and a /tmp; volumes fill it.

    Kept under the user's cache folder (not /tmp, where another user could plant one). gVisor
    makes the volumes' mount points itself, in the root's in-memory overlay.
    """
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    root = cache / "ember" / "runsc-root-v1"
    if not (root / "tmp").is_dir():
        root.mkdir(parents=True, exist_ok=True, mode=0o755)
        for name in MERGED_USR:
            host = Path("/", name)
            if host.is_symlink() and not (root / name).is_symlink():
                (root / name).symlink_to(os.readlink(host))
        (root / "tmp").mkdir(exist_ok=True)
        (root / "tmp").chmod(0o1777)
    return root


# -- bwrap


def _bwrap(binary: str, command: list[str]) -> list[str]:
    args = [
        binary,
        "--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
        "--cap-drop", "ALL",
        "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
        "--die-with-parent", "--new-session",
    ]  # fmt: skip
    if _bwrap_disables_userns(binary):
        args.append("--disable-userns")
    args += ["--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp", "--chdir", "/tmp"]
    for path in _host_paths(command):
        if path.is_symlink() and path.parent == Path("/"):
            args += ["--symlink", os.readlink(path), str(path)]
        else:
            args += ["--ro-bind", str(path), str(path)]
    args += ["--remount-ro", "/"]  # the root bwrap built the binds on: its /tmp stays writable
    return [*args, "--", *command]


@functools.cache
def _bwrap_disables_userns(binary: str) -> bool:
    try:
        done = subprocess.run([binary, "--help"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return "--disable-userns" in done.stdout + done.stderr


@functools.cache
def _bwrap_problem(binary: str) -> str:
    """Why bwrap cannot sandbox unprivileged here, or "" (runs the real sandbox once, on `true`)."""
    true = shutil.which("true") or "/usr/bin/true"
    try:
        done = subprocess.run(_bwrap(binary, [true]), capture_output=True, text=True, timeout=30, env=AGENT_ENV)
    except (OSError, subprocess.SubprocessError) as err:
        return f"bwrap does not start: {err}"
    if done.returncode != 0:
        return f"bwrap cannot make an unprivileged user namespace here: {done.stderr.strip() or done.returncode}"
    return ""


# -- what of the host a sandbox sees


def _host_paths(command: Sequence[str]) -> list[Path]:
    """The host paths a sandbox binds (read-only) for `command`, in mount order.

    /usr, the root's merged-/usr symlinks (or real folders), `ETC_FILES` that exist, and per
    absolute path in the command: an interpreter's installation prefix (the folder above its
    bin/) or a script's folder; nothing under /usr twice. Never the project tree: the agent
    sources are the runtime-images folder's own (the Python agent's one-file build has its own
    folder).
    """
    paths = [Path("/usr")]
    paths += [p for name in MERGED_USR if (p := Path("/", name)).exists() or p.is_symlink()]
    paths += [p for name in ETC_FILES if (p := Path("/etc", name)).exists()]
    for arg in command:
        if not arg.startswith("/"):
            continue
        path = Path(os.path.realpath(arg))
        if path.parent.name == "bin" and os.access(path, os.X_OK) and path.is_file():
            path = path.parent.parent
        else:
            path = path.parent
        if path == Path("/") or any(path == p or p in path.parents for p in paths if p.is_dir()):
            continue
        paths.append(path)
    return paths


def _reachable_by_others(path: Path) -> bool:
    """Whether a user who owns nothing can reach and read `path` (every folder above it searchable)."""
    resolved = Path(os.path.realpath(path))
    try:
        if not resolved.stat().st_mode & 0o004:
            return False
        return all(parent.stat().st_mode & 0o001 for parent in resolved.parents)
    except OSError:
        return False


def _which(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise ValueError(f"local sandboxes need {name!r} on PATH")
    return os.path.realpath(found)
