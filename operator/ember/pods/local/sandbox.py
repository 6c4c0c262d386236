"""Sandboxes for local agent processes: which one this machine has, and the command line in it.

Function code is hostile (DESIGN.md, Trust boundaries). Whatever the sandbox, an agent starts with
a minimal, explicit environment (`ember.pods.local.process.AGENT_ENV` plus its own `EMBER_AGENT_*`
settings), never the environment of the process running `ember dev`, and listens on a Unix socket
in its pod's private folder (`PodPlace`), never on a TCP port: only this process reaches it, not
other functions. Per pod, the pool's `Isolation` (from its SecurityPolicy) decides the network, the
size of /tmp and the process bound; the root is always read-only (writes go to /tmp). Best first
(`EMBER_SANDBOX=runsc|bwrap|none` forces one):

- **runsc** (gVisor; `EMBER_RUNSC` names the binary, else PATH): `runsc run` on an OCI bundle
  written per pod (`_oci_config`), which every runsc has (Debian's 2022 one included). The sandbox
  gets gVisor's own kernel (syscalls never reach the host kernel directly) and runs the agent as
  uid/gid 65534 with no capabilities and no_new_privs. Its root is a minimal skeleton (`_skeleton`:
  the merged-/usr symlinks) with read-only binds of /usr, a few /etc files and the agent's own
  interpreter and code only: no project tree, no /root, no /etc/shadow, no other function's files.
  /tmp is a tmpfs of the policy's `tmpSizeMiB`. The pod's memory (`memoryMiB`) bounds the sandbox
  as a whole, gVisor's own kernel and every process in it, through the memory cgroup runsc makes
  (as in a cluster, where the Sentry runs in the pod's cgroup): past it the sandbox is killed, and
  its invocations fail with the reason. `resources.cpuMillicores` bounds its CPU the same way (a
  CFS quota of that many millicores in the cgroup's `cpu` controller, `_cpu_quota`), the Sentry
  included, as a pod's CPU limit does. `limits.pids` bounds the sandbox's tasks, the agent's
  included, exactly as in a cluster's gVisor pods: the agent's RLIMIT_NPROC
  (`EMBER_AGENT_PIDS_LIMIT`), which gVisor counts for the sandbox's uid 65534 alone (a fork past it
  fails with EAGAIN, and the code cannot raise it); the pids cgroup bounds its host tasks too
  (`runsc_host_tasks`, a backstop). Egress `none` gives the sandbox its own network stack with
  loopback only (`--network=none`), and runsc itself a network namespace of its own (`unshare
  --net`): Debian's runsc names each sandbox's control socket in the abstract namespace of the
  network namespace it starts in, where anyone may drive the sandbox. An allow-list gives the
  sandbox gVisor's hostinet (`--network=host`) inside a network namespace of the pod's own whose
  rules allow only the listed cidrs (`ember.pods.local.egress`). runsc is used as root only:
  without root (its `--rootless`) neither Debian's runsc nor a current one starts the agent here
  (Debian's cannot make the agent's socket, EINVAL; a current one is killed at start), so
  `detect_sandbox` picks bwrap then, and `EMBER_SANDBOX=runsc` is refused with that reason. The
  agent makes its socket itself (`--host-uds=create`) in the pod's run/ folder, the one writable
  bind, a 1 MiB tmpfs as root (`_small_tmpfs`); code in gVisor cannot replace that socket nor
  connect to a host socket, except, for a pod with a channel to Ember (auxiliary services, portion
  calls: `PoolKey.channel`, `--host-uds=all`), the services proxy's socket this process makes in
  the same folder (`ember.pods.services`); bwrap sees that socket alone, bound read-only at the
  same path. `EMBER_RUNSC_FLAGS` adds flags (e.g. `--platform=systrap`).
- **bwrap** (bubblewrap), only unprivileged: a new user namespace mapped to uid/gid 65534,
  every capability dropped, no further user namespaces (`--disable-userns`, bubblewrap 0.8+),
  new pid, ipc, uts and cgroup namespaces and a network namespace (loopback only for egress
  `none`, and for an allow-list without root; as root the pod's own enforcing an allow-list,
  `ember.pods.local.egress`), its own session,
  killed with its parent. The root is empty but for read-only binds of /usr (and the
  merged-/usr symlinks), a few /etc files and the agent's own interpreter and code; a private
  tmpfs /tmp of `tmpSizeMiB`, /dev and /proc. No host folder is writable: the agent is handed
  its listening socket (`EMBER_AGENT_LISTEN_FD`), made by this process in the pod's folder,
  which the sandbox does not see. As root, cgroups of the pod's own (`bwrap_cgroups`) bound it
  as a whole: `memoryMiB` for all its processes (past it the whole sandbox is killed, as a runsc
  one is: cgroup v2 kills the group, under v1 `watch_oom` tells this process to), a CPU quota of
  `resources.cpuMillicores` when set, and `limits.pids` tasks, the agent's included (a fork past
  it fails with EAGAIN, as in a pod). Without root bwrap makes no cgroup and only the agent's
  per-worker memory limit applies. bwrap is refused when it cannot make that user namespace here
  (probed once); it never runs privileged.
- **none**: a plain child process, with a loud warning: the function is not isolated. It is
  handed its listening socket as under bwrap.

A Function's volume (`spec.state.volume`, `VolumeBind`) is a folder on the host bound read-write
at its `mountPath` into every sandbox of the Function, the one host folder besides run/ a
sandbox may write: under runsc a bind mount of the OCI bundle (as root the folder is uid 65534's,
the sandbox's user), under bwrap a `--bind` (the user namespace maps the sandbox's uid to the
folder's owner, this process's user); with no sandbox, as root, a bind in a mount namespace of
the pod's own over a folder that must exist at `mountPath` (without root none can be made: the
pod does not start, and says why). Its size is not bounded locally.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
import functools
import json
import logging
import os
import shlex
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ember.pods.base import Isolation, PoolUnavailable
from ember.pods.local import egress
from ember.pods.local.process import AGENT_ENV, PodPlace, agent_environment

log = logging.getLogger(__name__)

SANDBOX_UID = 65534  # nobody: owns nothing on the host
# What the agent and a function's runtime need from the host's /etc; nothing else of it is seen.
ETC_FILES = ("ld.so.cache", "resolv.conf", "hosts", "nsswitch.conf", "localtime", "ssl", "ca-certificates")
MERGED_USR = ("bin", "sbin", "lib", "lib32", "lib64", "libx32")
CGROUP_ROOT = Path("/sys/fs/cgroup")


class Sandbox(enum.Enum):
    """How agent processes are isolated."""

    RUNSC = "runsc"
    BWRAP = "bwrap"
    NONE = "none"


@dataclass(frozen=True, slots=True)
class VolumeBind:
    """A Function's volume in its sandboxes: the host folder (`make_volume` makes it), in `root`,
    the folder of every Function's volume, and where the sandbox sees it."""

    root: Path
    host: Path
    mount_path: str


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
        if os.geteuid() == 0:
            return SandboxChoice(Sandbox.RUNSC, runsc, f"gVisor ({runsc})")
        if forced == "runsc":
            raise ValueError(f"EMBER_SANDBOX=runsc needs root: {RUNSC_NEEDS_ROOT}")
    elif forced == "runsc":
        raise ValueError("EMBER_SANDBOX=runsc but runsc is not installed (apt-get install runsc, or set EMBER_RUNSC)")
    refused = ""
    if forced in ("", "bwrap") and bwrap:
        refused = _bwrap_problem(bwrap)
        if not refused:
            bound = "" if os.geteuid() == 0 else "; not root, so no memory or process bound per sandbox"
            hint = (
                "; install runsc for gVisor" if not runsc else "" if os.geteuid() == 0 else "; run as root for gVisor"
            )
            note = f"bubblewrap ({bwrap}{bound}){hint}"
            return SandboxChoice(Sandbox.BWRAP, bwrap, note)
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


RUNSC_NEEDS_ROOT = (
    "runsc without root (--rootless) does not start the agent (Debian's cannot make its socket, a current "
    "one is killed at start); run ember dev as root for gVisor, or use bubblewrap"
)
SANDBOX_RUN_DIR = "/run/ember"  # where a sandbox sees its pod's run/ folder


SANDBOX_SOCKET = f"{SANDBOX_RUN_DIR}/agent.sock"  # a runsc agent's EMBER_AGENT_SOCKET
SANDBOX_SERVICES_SOCKET = f"{SANDBOX_RUN_DIR}/services.sock"  # EMBER_AGENT_SERVICES_SOCKET (runsc, bwrap)


def agent_makes_its_socket(choice: SandboxChoice) -> bool:
    """Whether the agent makes its socket itself, in the pod's run/ folder bound into the sandbox
    (runsc: Debian's cannot hand a socket into a sandbox), or is handed a listening socket this
    process made (`EMBER_AGENT_LISTEN_FD`: bwrap and none, which then see no host folder to write).

    Inside gVisor the socket cannot be replaced (unlink and rename fail), nor can code connect to
    any host socket but its pod's services socket; a bwrap sandbox given the folder could swap
    the socket for a symlink to any host socket, which this process would then connect to."""
    return choice.kind is Sandbox.RUNSC


def sandboxed(
    choice: SandboxChoice,
    command: list[str],
    settings: Mapping[str, str],
    place: PodPlace,
    *,
    memory_mib: int,
    isolation: Isolation,
    channel: bool = False,
    env: Mapping[str, str] | None = None,
    cpu_millicores: int | None = None,
    volume: VolumeBind | None = None,
) -> list[str]:
    """The command line of one pod: `command` in the chosen sandbox with the agent's minimal
    environment (`agent_environment(settings)`), isolated as `isolation` says; with `channel`
    it sees the services proxy's socket (`PoolKey.channel`: auxiliary services, portion calls);
    `cpu_millicores` bounds its CPU (as root: runsc and bwrap make cgroups only then); `volume`
    is bound read-write into it (`VolumeBind`).

    Makes the pod's folders (and, for runsc, writes its OCI bundle there) and the volume's folder."""
    env = os.environ if env is None else env
    environment = agent_environment(settings)
    isolation = enforceable(isolation)
    if volume is not None:
        _check_volume(choice, command, volume)
        make_volume(choice, volume)
    make_place(place)
    if choice.kind is Sandbox.RUNSC:
        assert choice.binary is not None
        # uid 65534 in gVisor makes the socket here; the pod folder above keeps others out
        place.run_dir.chmod(0o777)
        _small_tmpfs(place.run_dir)
        # the agent's RLIMIT_NPROC is the pod's pids limit, as in a cluster's gVisor pods
        # (`ember.resources.pool.pids_limit`): gVisor counts the sandbox's own uid 65534 alone
        config = _oci_config(
            command,
            {**environment, "EMBER_AGENT_PIDS_LIMIT": str(isolation.pids)},
            place,
            memory_mib=memory_mib,
            isolation=isolation,
            cpu_millicores=cpu_millicores,
            volume=volume,
        )
        (place.root / "config.json").write_text(json.dumps(config))
        network = "host" if isolation.network else "none"
        # `all`: the agent may also connect to the services proxy's socket in its run/ folder
        # (the only host socket a sandbox sees); `create` lets it make its own socket there
        uds = "all" if channel else "create"
        flags = [f"--root={place.root / 'state'}", "--rootless", f"--network={network}", f"--host-uds={uds}"]
        flags += ["--overlay2=none", *env.get("EMBER_RUNSC_FLAGS", "").split()]
        runsc = [choice.binary, *flags, "run", "--bundle", str(place.root), place.name]
        if not isolation.network:
            # Debian's runsc names its control socket in the abstract namespace of the network
            # namespace it starts in, where anyone there may drive the sandbox: give it its own
            runsc = [_which("unshare"), "--net", "--", *runsc]
        return _clean_env(_in_allow_list_network(runsc, place, isolation), AGENT_ENV)
    if choice.kind is Sandbox.BWRAP:
        assert choice.binary is not None
        services = place.services_socket if channel else None
        bwrap = _bwrap(choice.binary, command, isolation, services, volume)
        groups = bwrap_cgroups(place, memory_mib=memory_mib, isolation=isolation, cpu_millicores=cpu_millicores)
        bounded = _in_cgroups(bwrap, groups)
        return _clean_env(_in_allow_list_network(bounded, place, isolation), environment)
    return _clean_env(_in_volume_namespace(list(command), volume), environment)


def make_volume(choice: SandboxChoice, volume: VolumeBind) -> None:
    """A Function's volume folder, writable by the sandbox's user: under runsc as root uid 65534's
    (gVisor's gofer, as root, gives the files the sandbox writes that owner too); without root the
    sandbox's uid is not this process's, so the folder is open to all and the volumes' root (mode
    0700) keeps other users out; bwrap maps the sandbox's uid to this process's user, and a plain
    process is that user."""
    volume.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    host = volume.host
    host.mkdir(mode=0o700, parents=True, exist_ok=True)
    if choice.kind is not Sandbox.RUNSC:
        return
    if os.geteuid() == 0:
        if host.stat().st_uid != SANDBOX_UID:
            os.chown(host, SANDBOX_UID, SANDBOX_UID)
    else:
        host.chmod(0o777)


def _check_volume(choice: SandboxChoice, command: Sequence[str], volume: VolumeBind) -> None:
    """`PoolUnavailable` when the volume cannot be bound at its mount path in this sandbox: over
    (or around) a host path the sandbox binds for the agent, or, with no sandbox, anywhere but
    over an existing folder as root."""
    target = Path(volume.mount_path)
    if choice.kind is Sandbox.NONE:
        if os.geteuid() != 0:
            raise PoolUnavailable(
                f"spec.state.volume: with no sandbox a volume needs root to be bound at {target}; "
                "install runsc or bubblewrap"
            )
        if not target.is_dir() or target.is_symlink():
            raise PoolUnavailable(
                f"spec.state.volume: with no sandbox a volume is bound over a folder of this machine, and "
                f"{target} is none; install runsc or bubblewrap"
            )
        return
    for path in _host_paths(command):
        if path == target or path in target.parents or target in path.parents:
            raise PoolUnavailable(f"spec.state.volume.mountPath {target} collides with {path}, which the agent needs")


def _in_volume_namespace(command: list[str], volume: VolumeBind | None) -> list[str]:
    """With no sandbox: `command` in a mount namespace of its own where the volume's folder is
    bound over `mountPath` (`_check_volume` made sure it can be), private so nothing leaks out."""
    if volume is None:
        return command
    bind = 'mount --bind -- "$1" "$2" && shift 2 && exec "$@"'
    return [
        _which("unshare"),
        "--mount",
        "--propagation",
        "private",
        "--",
        _which("sh"),
        "-c",
        bind,
        "sh",
        str(volume.host),
        volume.mount_path,
        *command,
    ]


def enforceable(isolation: Isolation) -> Isolation:
    """`isolation`, or, when its egress allow-list cannot be enforced here (`egress.problem()`:
    not root), egress `none`: an allow-list this process cannot enforce gives the sandbox no
    network rather than the host's (fail closed; `ember dev` says so at start)."""
    if isolation.network and egress.problem():
        return replace(isolation, network=False, allow=())
    return isolation


def _in_allow_list_network(command: list[str], place: PodPlace, isolation: Isolation) -> list[str]:
    """`command` in a network namespace of the pod's own that enforces its egress allow-list
    (`ember.pods.local.egress`) when the policy allows egress (`enforceable` made sure this
    process can make one)."""
    if not isolation.network:
        return command
    try:
        network = egress.create(place.name, isolation.allow)
    except OSError as err:
        raise PoolUnavailable(f"cannot make the network namespace of its egress allow-list: {err}") from err
    return [_which("nsenter"), f"--net={network.path}", "--", *command]


def make_place(place: PodPlace) -> None:
    """The pod's folders: its private one (0700) and run/ in it."""
    place.root.mkdir(mode=0o700, parents=True, exist_ok=True)
    place.run_dir.mkdir(exist_ok=True)


def release_place(place: PodPlace) -> None:
    """Remove the pod's folders, and every mount under them first: the small tmpfs on run/, and
    what runsc leaves in its state folder (a bind of the sandbox's network namespace, which would
    keep the namespace alive); and kill what still runs in its cgroups.

    The pod's process is gone (or never started) when this runs, so whatever is left in the
    pod's cgroups (named for this pod alone) is a part of its sandbox that outlived it: a runsc
    sandbox still leaving, or a bwrap sandbox's init when its outer process died (bwrap's
    die-with-parent does not always hold when it runs as root, and the kernel drops a parent-death
    signal when the process changes its credentials). A blocking call: run it in a thread."""
    remove_tree(place.root)
    egress.remove(place.name)
    cgroups = [*CGROUP_ROOT.glob(f"*/{place.name}"), CGROUP_ROOT / place.name]
    for cgroup in cgroups:
        with contextlib.suppress(OSError, ValueError):
            for pid in (cgroup / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    os.kill(int(pid), signal.SIGKILL)
    for _ in range(100):  # up to 5 s (a sandbox the kernel killed takes a while to leave)
        for cgroup in list(cgroups):
            try:
                cgroup.rmdir()
            except FileNotFoundError:
                pass
            except OSError:
                continue  # busy: not empty yet
            cgroups.remove(cgroup)
        if not cgroups:
            return
        time.sleep(0.05)
    log.warning("cgroups of sandbox %s are still in use; left: %s", place.name, ", ".join(map(str, cgroups)))


def sweep_cgroups(picks: Callable[[str], bool]) -> None:
    """Remove the empty cgroups, of every controller, whose name `picks` (those of pods whose
    sandbox was still leaving them at their release, or of a killed `ember dev`)."""
    for group in [*CGROUP_ROOT.glob("*/ember-*"), *CGROUP_ROOT.glob("ember-*")]:
        if group.is_dir() and picks(group.name):
            with contextlib.suppress(OSError):
                group.rmdir()


def oom_kills(place: PodPlace) -> int:
    """Out-of-memory kills in a runsc pod's memory cgroup (runsc names it after the container:
    cgroup v1's memory controller, or v2's unified tree); 0 when it has none."""
    container = place.name
    for path, key in (
        (f"/sys/fs/cgroup/memory/{container}/memory.oom_control", "oom_kill"),
        (f"/sys/fs/cgroup/{container}/memory.events", "oom_kill"),
    ):
        try:
            lines = Path(path).read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    return 0


def memory_peak_bytes(place: PodPlace) -> int | None:
    """The most memory a pod's sandbox has used at once, as its memory cgroup counts it (cgroup v1's
    `memory.max_usage_in_bytes` or v2's `memory.peak`, of the cgroup named after its container);
    None without one (not root). What right-sizing's figures are checked against."""
    for path in (
        CGROUP_ROOT / "memory" / place.name / "memory.max_usage_in_bytes",
        CGROUP_ROOT / place.name / "memory.peak",
    ):
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            continue
    return None


def remove_tree(path: Path) -> None:
    """Unmount everything under `path` (deepest first), then remove it."""
    root = str(path) + "/"
    try:
        with open("/proc/self/mountinfo") as f:
            points = [line.split()[4] for line in f]
    except OSError:
        points = []
    for point in sorted((p for p in points if p.startswith(root)), key=len, reverse=True):
        _libc().umount2(os.fsencode(point), 2)  # MNT_DETACH
    shutil.rmtree(path, ignore_errors=True)


RUN_DIR_MIB = 1  # a runsc pod's run/ (the agent's socket only): what code there may write on the host


def _small_tmpfs(path: Path) -> None:
    """Mount a 1 MiB tmpfs on a runsc pod's run/: the one host folder the sandbox may write, so
    files written there (beside the socket) cannot fill the host's disk. Needs root; without it
    the folder stays on the host's disk (the banner says runsc is not bounded then)."""
    if os.geteuid() != 0:
        return
    options = f"size={RUN_DIR_MIB}m,mode=0777".encode()
    flags = 2 | 4 | 8  # MS_NOSUID | MS_NODEV | MS_NOEXEC
    if _libc().mount(b"tmpfs", os.fsencode(path), b"tmpfs", flags, options) != 0:
        log.warning("run/ of %s stays on the host's disk: mount failed (errno %d)", path, ctypes.get_errno())


@functools.cache
def _libc() -> Any:
    return ctypes.CDLL(None, use_errno=True)


# -- the environment


def _clean_env(command: list[str], environment: Mapping[str, str]) -> list[str]:
    """`command` started with exactly `environment`, whatever environment it is started with.

    The caller's environment is whatever the process running `ember dev` has (tokens, cloud
    credentials); `env -i` drops all of it. runsc itself gets `AGENT_ENV`: the OCI bundle holds
    the agent's."""
    return [_which("env"), "-i", *(f"{k}={v}" for k, v in environment.items()), *command]


# -- runsc


# gVisor's own threads, and the host tasks behind each task in it (under ptrace a stub
# process and the Sentry's threads that drive it): measured on Debian's runsc, a sandbox needs
# about 40 host tasks to boot and 4 to 6 more per process forked in it. The exact bound is the
# agent's RLIMIT_NPROC inside; this one must stay above what `limits.pids` tasks cost: at 8 per
# task a Node agent (about 20 threads) whose code forked up to a bound of 64 got the sandbox killed.
RUNSC_OWN_TASKS = 64
RUNSC_TASKS_PER_PROCESS = 16


# -- bwrap's cgroups


def bwrap_cgroups(
    place: PodPlace, *, memory_mib: int, isolation: Isolation, cpu_millicores: int | None = None
) -> list[Path]:
    """As root: the cgroups that bound a bwrap sandbox as a whole, named after its pod (as runsc
    names its own): memory `memoryMiB` for every process in it (swap included where the kernel
    accounts it), `limits.pids` tasks, processes and threads, the agent's included, as a pod's
    pids limit counts them: a fork past it fails with EAGAIN, and with `cpu_millicores` a CPU
    quota (`_cpu_quota`). Without root: none (the banner says so). Removed with the pod
    (`release_place`)."""
    if os.geteuid() != 0:
        return []
    limit = str(memory_mib * 1024 * 1024)
    tasks = str(isolation.pids)
    quota = _cpu_quota(cpu_millicores)
    if (CGROUP_ROOT / "cgroup.controllers").exists():  # v2: one group, the kernel kills it whole on OOM
        settings = {"memory.max": limit, "memory.swap.max": "0", "memory.oom.group": "1", "pids.max": tasks}
        if quota is not None:
            settings["cpu.max"] = f"{quota[0]} {quota[1]}"
        return [_make_cgroup(CGROUP_ROOT / place.name, settings)]
    memory = {"memory.limit_in_bytes": limit, "memory.memsw.limit_in_bytes": limit}
    groups = [
        _make_cgroup(CGROUP_ROOT / "memory" / place.name, memory),
        _make_cgroup(CGROUP_ROOT / "pids" / place.name, {"pids.max": tasks}),
    ]
    if quota is not None:
        cpu = {"cpu.cfs_period_us": str(quota[1]), "cpu.cfs_quota_us": str(quota[0])}
        groups.append(_make_cgroup(CGROUP_ROOT / "cpu" / place.name, cpu))
    return groups


CPU_PERIOD_US = 100_000  # the CFS period of a pod's CPU quota, as the kubelet's


def _cpu_quota(cpu_millicores: int | None) -> tuple[int, int] | None:
    """(quota, period) in microseconds for a CPU bound of `cpu_millicores`, as a pod's limit gets."""
    if cpu_millicores is None:
        return None
    return max(1000, cpu_millicores * CPU_PERIOD_US // 1000), CPU_PERIOD_US


def _make_cgroup(group: Path, settings: Mapping[str, str]) -> Path:
    group.mkdir(exist_ok=True)
    for name, value in settings.items():
        path = group / name
        if name in ("memory.memsw.limit_in_bytes", "memory.swap.max") and not path.exists():
            continue  # a kernel without swap accounting: memory alone is bounded
        try:
            path.write_text(value)
        except OSError as err:
            raise PoolUnavailable(f"cannot bound the sandbox: {path}: {err.strerror}") from err
    return group


def _in_cgroups(command: list[str], groups: Sequence[Path]) -> list[str]:
    """`command`, started in `groups` (a shell moves itself there, then becomes `command`)."""
    if not groups:
        return command
    moves = "".join(f"echo $$ > {shlex.quote(str(group / 'cgroup.procs'))} && " for group in groups)
    return [_which("sh"), "-c", moves + 'exec "$@"', "sh", *command]


def watch_oom(place: PodPlace) -> int | None:
    """An eventfd that becomes readable when a bwrap pod's cgroup v1 memory bound is hit (the
    kernel then kills one process in it: the caller kills the rest, `kill_cgroup`, so the whole
    sandbox goes, as a runsc sandbox and a v2 group do); None where there is nothing to watch."""
    control = CGROUP_ROOT / "memory" / place.name / "memory.oom_control"
    if not control.exists():
        return None
    events = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
    oom = os.open(control, os.O_RDONLY | os.O_CLOEXEC)
    try:
        (control.parent / "cgroup.event_control").write_text(f"{events} {oom}")
    except OSError:
        os.close(events)
        return None
    finally:
        os.close(oom)  # the kernel holds the registration while `events` is open
    return events


def kill_cgroup(place: PodPlace) -> None:
    """SIGKILL every process in the pod's memory cgroup (v1), until none is left."""
    procs = CGROUP_ROOT / "memory" / place.name / "cgroup.procs"
    for _ in range(20):
        try:
            pids = procs.read_text().split()
        except OSError:
            return
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(OSError):
                os.kill(int(pid), signal.SIGKILL)
        time.sleep(0.01)


def runsc_host_tasks(isolation: Isolation) -> int:
    """The pids cgroup bound of a runsc sandbox: a backstop that follows `limits.pids`, not a
    count of its processes (the Sentry's threads count too). A fork bomb reaches it and gets the
    sandbox killed, instead of filling the host's process table."""
    return RUNSC_OWN_TASKS + RUNSC_TASKS_PER_PROCESS * isolation.pids


def _oci_config(
    command: list[str],
    environment: Mapping[str, str],
    place: PodPlace,
    *,
    memory_mib: int,
    isolation: Isolation,
    cpu_millicores: int | None = None,
    volume: VolumeBind | None = None,
) -> dict[str, Any]:
    """The OCI runtime spec of one runsc pod (see the module docstring)."""
    mounts: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc"},
        {
            "destination": "/tmp",
            "type": "tmpfs",
            "source": "tmpfs",
            "options": ["nosuid", "nodev", "mode=1777", f"size={isolation.tmp_size_mib}m"],
        },
    ]
    for path in _host_paths(command):
        if not (path.is_symlink() and path.parent == Path("/")):  # the skeleton has /bin -> usr/bin
            mounts.append({"destination": str(path), "type": "bind", "source": str(path), "options": ["rbind", "ro"]})
    mounts.append({"destination": SANDBOX_RUN_DIR, "type": "bind", "source": str(place.run_dir), "options": ["rbind"]})
    if volume is not None:
        mounts.append(
            {"destination": volume.mount_path, "type": "bind", "source": str(volume.host), "options": ["rbind", "rw"]}
        )
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if not isolation.network:
        namespaces.append({"type": "network"})
    no_caps: dict[str, list[str]] = {k: [] for k in ("bounding", "effective", "inheritable", "permitted", "ambient")}
    resources: dict[str, Any] = {
        "memory": {"limit": memory_mib * 1024 * 1024},
        "pids": {"limit": runsc_host_tasks(isolation)},
    }
    quota = _cpu_quota(cpu_millicores)
    if quota is not None:
        resources["cpu"] = {"quota": quota[0], "period": quota[1]}
    return {
        "ociVersion": "1.0.2",
        "process": {
            "terminal": False,
            "user": {"uid": SANDBOX_UID, "gid": SANDBOX_UID},
            "args": command,
            "env": [f"{k}={v}" for k, v in environment.items()],
            "cwd": "/tmp",
            "noNewPrivileges": True,
            "capabilities": no_caps,
        },
        "root": {"path": str(_skeleton()), "readonly": True},
        "hostname": "ember",
        "mounts": mounts,
        "linux": {
            "namespaces": namespaces,
            "resources": resources,
        },
    }


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


def _bwrap(
    binary: str,
    command: list[str],
    isolation: Isolation,
    services: Path | None = None,
    volume: VolumeBind | None = None,
) -> list[str]:
    args = [
        binary,
        "--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID),
        "--cap-drop", "ALL",
        "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
        "--die-with-parent", "--new-session",
    ]  # fmt: skip
    if not isolation.network:
        args.append("--unshare-net")
    if _bwrap_disables_userns(binary):
        args.append("--disable-userns")
    args += ["--dev", "/dev", "--proc", "/proc"]
    args += ["--size", str(isolation.tmp_size_mib * 1024 * 1024), "--tmpfs", "/tmp", "--chdir", "/tmp"]
    for path in _host_paths(command):
        if path.is_symlink() and path.parent == Path("/"):
            args += ["--symlink", os.readlink(path), str(path)]
        else:
            args += ["--ro-bind", str(path), str(path)]
    if services is not None:  # the services proxy's socket, alone (its folder holds the agent's)
        args += ["--ro-bind", str(services), SANDBOX_SERVICES_SOCKET]
    if volume is not None:  # read-write: `--remount-ro /` below leaves mounts on the root as they are
        args += ["--bind", str(volume.host), volume.mount_path]
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
        probe = _bwrap(binary, [true], Isolation())
        done = subprocess.run(probe, capture_output=True, text=True, timeout=30, env=AGENT_ENV)
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


def _which(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        raise ValueError(f"local sandboxes need {name!r} on PATH")
    return os.path.realpath(found)
