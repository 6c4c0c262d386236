"""Build the upstream binaries the test tiers run, from the Go module proxy, into a versioned cache.

Kubernetes: `k8s.io/kubernetes` cannot be required as-is (its go.mod points the staging modules
`k8s.io/api`, `k8s.io/apimachinery`, … at `./staging/...`), so a wrapper module requires
`k8s.io/kubernetes v1.34.N` and replaces every staging module with its published `v0.34.N`; the list is
generated from that tag's own go.mod. Binaries are static (`CGO_ENABLED=0`), `-trimpath`, and carry the
`k8s.io/component-base/version` ldflags so they report v1.34.N.

gVisor: `runsc` and `containerd-shim-runsc-v1` from the `gvisor.dev/gvisor` module (its `go` branch,
pinned as pseudo-versions; the shim from an older commit, patched, see `_patch_shim_oom_score`).

CoreDNS: a release of `github.com/coredns/coredns`, built the way its documentation describes for a custom
plugin set: a `main` that imports `coremain` and only the plugins the cluster's Corefile uses (no `forward`,
so the cluster's DNS cannot send a query off this machine), which also keeps the build small.

kube-router: `cmd/kube-router` of a release of `github.com/cloudnativelabs/kube-router/v2`, unchanged (the
cluster runs only its network policy controller, see `node`); static, with its version ldflags. One of its
dependencies is replaced, see `KUBE_ROUTER_REPLACEMENTS`.

Every step is skipped when its output exists, so a warm `build` costs a few `stat` calls; outputs are
written under a temporary name and renamed, so an interrupted build never leaves a half binary.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .paths import (
    COREDNS_VERSION,
    GVISOR_SHIM_VERSION,
    GVISOR_VERSION,
    KUBE_ROUTER_VERSION,
    KUBERNETES_VERSION,
    build_dir,
    coredns_bin_dir,
    gvisor_bin_dir,
    gvisor_shim_dir,
    kube_bin_dir,
    kube_router_bin_dir,
)
from .procs import ClusterError

KUBE_BINARIES = ("kube-apiserver", "kubelet", "kube-scheduler", "kube-controller-manager", "kube-proxy", "kubectl")
# The CoreDNS plugins compiled in: exactly what `templates/Corefile` uses. Order does not matter here
# (CoreDNS orders plugins by its own directive list, `dnsserver.Directives`).
COREDNS_PLUGINS = ("bind", "errors", "health", "ready", "kubernetes")
GO_BUILD_JOBS = os.environ.get("EMBER_GO_BUILD_JOBS", "2")


def _log(message: str) -> None:
    print(f"tests.cluster.build: {message}", flush=True)


@contextmanager
def _locked(name: str) -> Iterator[None]:
    """Serialize builds of one artifact across processes (a CLI build and a pytest fixture, say)."""
    build_dir().mkdir(parents=True, exist_ok=True)
    with (build_dir() / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _go(args: list[str], *, cwd: Path, log: Path, env: dict[str, str] | None = None) -> str:
    full_env = {**os.environ, "GOFLAGS": "-mod=mod", **(env or {})}
    with log.open("a") as out:
        out.write(f"\n$ go {' '.join(args)}\n")
        out.flush()
        result = subprocess.run(
            ["go", *args], cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=out, text=True, check=False
        )
    if result.returncode != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-25:])
        raise ClusterError(f"`go {' '.join(args[:3])} …` failed in {cwd} (full log: {log}):\n{tail}")
    return result.stdout


def staging_replacements(kubernetes_go_mod: str, version: str) -> list[tuple[str, str]]:
    """(module, published version) for every `=> ./staging/...` replacement in kubernetes' go.mod."""
    minor_version = "v0." + version.split(".", 1)[1]
    replacements = []
    for line in kubernetes_go_mod.splitlines():
        parts = line.split()
        if len(parts) >= 3 and parts[1] == "=>" and parts[2].startswith("./staging/"):
            replacements.append((parts[0], minor_version))
    if not replacements:
        raise ClusterError("k8s.io/kubernetes go.mod has no ./staging replacements: unexpected layout")
    return replacements


def wrapper_go_mod(kubernetes_go_mod: str, version: str) -> str:
    lines = [
        "module ember.test/k8sbuild",
        "",
        "go 1.25.0",
        "",
        "godebug default=go1.24",
        "",
        f"require k8s.io/kubernetes v{version}",
        "",
        "replace (",
    ]
    lines += [f"\t{module} => {module} {ver}" for module, ver in staging_replacements(kubernetes_go_mod, version)]
    lines += [")", ""]
    return "\n".join(lines)


def _version_ldflags(version: str) -> str:
    major, minor, _ = version.split(".")
    flags = ["-s", "-w"]
    for pkg in ("k8s.io/component-base/version", "k8s.io/client-go/pkg/version"):
        flags += [
            f"-X {pkg}.gitVersion=v{version}",
            f"-X {pkg}.gitMajor={major}",
            f"-X {pkg}.gitMinor={minor}",
            f"-X {pkg}.gitTreeState=clean",
            f"-X {pkg}.buildDate=1970-01-01T00:00:00Z",
        ]
    return " ".join(flags)


_WRAPPER_MAIN = "// Package main exists only so this wrapper is a valid module.\npackage main\n\nfunc main() {}\n"


def _kubernetes_workdir() -> Path:
    work = build_dir() / f"k8s-v{KUBERNETES_VERSION}"
    work.mkdir(parents=True, exist_ok=True)
    log = work / "build.log"
    if not (work / "go.mod").exists():
        info = json.loads(
            _go(["mod", "download", "-json", f"k8s.io/kubernetes@v{KUBERNETES_VERSION}"], cwd=work, log=log)
        )
        (work / "main.go").write_text(_WRAPPER_MAIN)
        (work / "go.mod.tmp").write_text(wrapper_go_mod(Path(info["GoMod"]).read_text(), KUBERNETES_VERSION))
        (work / "go.mod.tmp").rename(work / "go.mod")
    return work


def ensure_kubernetes(names: Iterable[str] = KUBE_BINARIES) -> dict[str, Path]:
    """Build each missing Kubernetes binary in `names` (in order) into `~/.cache/ember/k8s-v1.34.N/`."""
    out_dir = kube_bin_dir()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {name: out_dir / name for name in names}
    if all(p.exists() for p in paths.values()):
        return paths
    with _locked(f"k8s-v{KUBERNETES_VERSION}"):
        work = _kubernetes_workdir()
        log = work / "build.log"
        for name, path in paths.items():
            if path.exists():
                continue
            started = time.monotonic()
            _log(f"building {name} v{KUBERNETES_VERSION} (log: {log})")
            tmp = path.with_suffix(".tmp")
            _go(
                [
                    "build",
                    "-p",
                    GO_BUILD_JOBS,
                    "-trimpath",
                    "-ldflags",
                    _version_ldflags(KUBERNETES_VERSION),
                    "-o",
                    str(tmp),
                    f"k8s.io/kubernetes/cmd/{name}",
                ],
                cwd=work,
                log=log,
                env={"CGO_ENABLED": "0"},
            )
            tmp.rename(path)
            _log(f"built {name} in {time.monotonic() - started:.0f} s")
    return paths


def _gvisor_workdir(name: str, version: str, *, patch_shim: bool) -> Path:
    work = build_dir() / name
    work.mkdir(parents=True, exist_ok=True)
    if (work / "go.mod").exists():
        return work
    log = work / "build.log"
    info = json.loads(_go(["mod", "download", "-json", f"gvisor.dev/gvisor@{version}"], cwd=work, log=log))
    go_mod_lines = Path(info["GoMod"]).read_text().splitlines()
    go_directive = next(line.split()[1] for line in go_mod_lines if line.startswith("go "))
    go_mod = f"module ember.test/gvisorbuild\n\ngo {go_directive}\n\nrequire gvisor.dev/gvisor {version}\n"
    if patch_shim:
        source = work / "gvisor-src"
        shutil.rmtree(source, ignore_errors=True)
        shutil.copytree(info["Dir"], source)
        for path in source.rglob("*"):
            path.chmod(path.stat().st_mode | 0o200)
        _patch_shim_oom_score(source / "pkg" / "shim" / "service.go")
        go_mod += "\nreplace gvisor.dev/gvisor => ./gvisor-src\n"
    (work / "main.go").write_text(_WRAPPER_MAIN)
    (work / "go.mod").write_text(go_mod)
    return work


def _patch_shim_oom_score(service_go: Path) -> None:
    """Let the shim start where CAP_SYS_RESOURCE is withheld (as on this VM).

    The shim makes itself unkillable by the OOM killer (oom_score_adj -999), which needs CAP_SYS_RESOURCE;
    without it the write fails with EPERM and the shim refuses to start. containerd's own helper ignores
    that error inside user namespaces; the patch ignores it everywhere, so the shim keeps the default score.
    """
    text = service_go.read_text()
    old = "\tif err := shim.SetScore(cmd.Process.Pid); err != nil {\n"
    if text.count(old) != 1:
        raise ClusterError(f"{service_go}: the SetScore call to patch was not found; re-check the shim version")
    service_go.write_text(
        text.replace(old, "\tif err := shim.SetScore(cmd.Process.Pid); err != nil && !os.IsPermission(err) {\n")
    )


def _go_build_static(work: Path, package: str, out: Path, *, ldflags: str = "-s -w") -> None:
    started = time.monotonic()
    log = work / "build.log"
    _log(f"building {out.name} from {package} (log: {log})")
    tmp = out.with_suffix(".tmp")
    _go(
        ["build", "-p", GO_BUILD_JOBS, "-trimpath", "-ldflags", ldflags, "-o", str(tmp), package],
        cwd=work,
        log=log,
        env={"CGO_ENABLED": "0"},
    )
    tmp.rename(out)
    _log(f"built {out.name} in {time.monotonic() - started:.0f} s")


def ensure_gvisor() -> dict[str, Path]:
    """Build `runsc` and `containerd-shim-runsc-v1` (see `paths.GVISOR_SHIM_VERSION`) into the cache."""
    paths = {
        "runsc": gvisor_bin_dir() / "runsc",
        "containerd-shim-runsc-v1": gvisor_shim_dir() / "containerd-shim-runsc-v1",
    }
    if all(p.exists() for p in paths.values()):
        return paths
    with _locked("gvisor"):
        if not paths["runsc"].exists():
            gvisor_bin_dir().mkdir(parents=True, exist_ok=True)
            work = _gvisor_workdir(f"gvisor-{GVISOR_VERSION}", GVISOR_VERSION, patch_shim=False)
            _go_build_static(work, "gvisor.dev/gvisor/runsc", paths["runsc"])
        if not paths["containerd-shim-runsc-v1"].exists():
            gvisor_shim_dir().mkdir(parents=True, exist_ok=True)
            work = _gvisor_workdir(f"gvisor-shim-{GVISOR_SHIM_VERSION}", GVISOR_SHIM_VERSION, patch_shim=True)
            _go_build_static(work, "gvisor.dev/gvisor/shim", paths["containerd-shim-runsc-v1"])
    return paths


def _coredns_main(plugins: Iterable[str]) -> str:
    imports = "".join(f'\t_ "github.com/coredns/coredns/plugin/{name}"\n' for name in sorted(plugins))
    return (
        "// Package main is CoreDNS with only the plugins the Ember test cluster uses.\n"
        "package main\n\n"
        f'import (\n\t"github.com/coredns/coredns/coremain"\n\n{imports})\n\n'
        "func main() { coremain.Run() }\n"
    )


def coredns_plugin_set(plugins: Iterable[str] = COREDNS_PLUGINS) -> str:
    return hashlib.sha256(",".join(sorted(plugins)).encode()).hexdigest()[:8]


def _build_module(out: Path, *, main_go: str, go_mod: str, package: str, ldflags: str = "-s -w") -> Path:
    """`out`, built (once, under a lock) from `package` of a wrapper module of `main_go` and `go_mod`
    in `~/.cache/ember/build/<out's folder>/`."""
    if out.exists():
        return out
    with _locked(out.parent.name):
        if out.exists():
            return out
        out.parent.mkdir(parents=True, exist_ok=True)
        work = build_dir() / out.parent.name
        work.mkdir(parents=True, exist_ok=True)
        if not (work / "go.mod").exists():
            (work / "main.go").write_text(main_go)
            (work / "go.mod.tmp").write_text(go_mod)
            (work / "go.mod.tmp").rename(work / "go.mod")
        _go_build_static(work, package, out, ldflags=ldflags)
    return out


def ensure_coredns(plugins: Iterable[str] = COREDNS_PLUGINS) -> Path:
    """Build CoreDNS `COREDNS_VERSION` with `plugins` into `~/.cache/ember/coredns-<version>-<plugin set>/`."""
    plugins = tuple(plugins)
    return _build_module(
        coredns_bin_dir(coredns_plugin_set(plugins)) / "coredns",
        main_go=_coredns_main(plugins),
        go_mod=f"module ember.test/corednsbuild\n\ngo 1.25.0\n\nrequire github.com/coredns/coredns {COREDNS_VERSION}\n",
        package=".",
    )


KUBE_ROUTER_MODULE = "github.com/cloudnativelabs/kube-router/v2"
# kube-router v2.10.0 requires netlink at an untagged commit (v1.3.2-0.20260505210927-99e979749d3e) whose
# zip the module proxy refuses; v1.3.1, what kube-router v2.9.x required, builds it. The commit fixed
# default-route lookups for kube-router's policy routing (its router, not run here); the policy
# controller uses netlink only to list the node's links and addresses.
KUBE_ROUTER_REPLACEMENTS = (("github.com/vishvananda/netlink", "v1.3.1"),)


def ensure_kube_router() -> Path:
    """Build kube-router `KUBE_ROUTER_VERSION` into `~/.cache/ember/kube-router-<version>/`."""
    replaces = "".join(f"replace {module} => {module} {ver}\n" for module, ver in KUBE_ROUTER_REPLACEMENTS)
    version_pkg = f"{KUBE_ROUTER_MODULE}/pkg/version"
    return _build_module(
        kube_router_bin_dir() / "kube-router",
        main_go=_WRAPPER_MAIN,
        go_mod=(
            "module ember.test/kuberouterbuild\n\ngo 1.26.2\n\n"
            f"require {KUBE_ROUTER_MODULE} {KUBE_ROUTER_VERSION}\n\n{replaces}"
        ),
        package=f"{KUBE_ROUTER_MODULE}/cmd/kube-router",
        ldflags=f"-s -w -X {version_pkg}.Version={KUBE_ROUTER_VERSION} -X {version_pkg}.BuildDate=1970-01-01T00:00:00Z",
    )
