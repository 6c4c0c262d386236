"""Container images without Docker or a registry: debootstrap, buildah, and `ctr import`.

* The base root filesystem is a minimal Debian (`debootstrap --variant=minbase`), cached as a tarball and
  committed into buildah's storage as `localhost/ember-base:bookworm`; Ember's Dockerfiles build
  `FROM ${BASE_IMAGE}`.
* `build_image()` runs `buildah bud` (chroot isolation, no daemon) on a Dockerfile directory and saves
  the result as a docker-archive under the cache, keyed by a hash of the build context and arguments,
  so an unchanged image is not rebuilt.
* `import_image()` loads an archive into containerd's `k8s.io` namespace, where the kubelet finds it
  (pods use `imagePullPolicy: Never`).

buildah keeps its storage under the cache (`~/.cache/ember/buildah`), apart from any system storage.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from . import build, procs
from .paths import BASE_IMAGE, DEBIAN_SUITE, KUBERNETES_VERSION, PACKAGE_DIR, PAUSE_IMAGE, cache_root


def debian_mirror() -> str:
    """The Debian archive this machine's apt already uses (debootstrap fetches the base from it)."""
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        if not path.is_file():
            continue
        for line in path.read_text().splitlines():
            words = line.split()
            if words[:1] == ["URIs:"] or words[:1] == ["deb"]:
                uri = next((w for w in words[1:] if "://" in w), None)
                if uri and not uri.rstrip("/").endswith("-security"):
                    return uri
    raise RuntimeError("no Debian archive configured for apt (/etc/apt/sources.list*): debootstrap needs one")


def images_dir() -> Path:
    path = cache_root() / "images"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _buildah_storage() -> list[str]:
    root = cache_root() / "buildah"
    return ["--root", str(root / "storage"), "--runroot", str(root / "run"), "--storage-driver", "overlay"]


def buildah(*args: str | Path, log: Path | None = None) -> str:
    return procs.run(["buildah", *_buildah_storage(), *args], log=log or images_dir() / "buildah.log")


def _image_exists(tag: str) -> bool:
    result = subprocess.run(
        ["buildah", *_buildah_storage(), "inspect", "--type", "image", tag], capture_output=True, check=False
    )
    return result.returncode == 0


def ensure_base_rootfs() -> Path:
    """A minimal Debian root filesystem tarball, made once with debootstrap."""
    tarball = images_dir() / f"debian-{DEBIAN_SUITE}-minbase.tar"
    if tarball.exists():
        return tarball
    with build._locked("debootstrap"):
        if tarball.exists():
            return tarball
        started = time.monotonic()
        print(f"tests.cluster.images: debootstrap {DEBIAN_SUITE} (minbase) into {tarball}", flush=True)
        with tempfile.TemporaryDirectory(prefix="ember-debootstrap-", dir=images_dir()) as tmp:
            rootfs = Path(tmp) / "rootfs"
            log = images_dir() / "debootstrap.log"
            procs.run(
                [
                    "debootstrap",
                    "--variant=minbase",
                    "--include=ca-certificates",
                    DEBIAN_SUITE,
                    rootfs,
                    debian_mirror(),
                ],
                log=log,
                timeout_s=1800,
            )
            # Smaller and reproducible enough: no apt lists or caches in the base layer.
            for leftover in ("var/lib/apt/lists", "var/cache/apt/archives"):
                for entry in (rootfs / leftover).glob("*"):
                    if entry.is_file():
                        entry.unlink()
            partial = tarball.with_suffix(".partial")
            procs.run(["tar", "-C", rootfs, "--numeric-owner", "-cf", partial, "."], log=log)
            partial.rename(tarball)
        print(f"tests.cluster.images: base rootfs ready in {time.monotonic() - started:.0f} s", flush=True)
    return tarball


def ensure_base_image() -> str:
    """`localhost/ember-base:bookworm` in buildah's storage, from the debootstrap tarball."""
    if _image_exists(BASE_IMAGE):
        return BASE_IMAGE
    tarball = ensure_base_rootfs()
    with build._locked("base-image"):
        if _image_exists(BASE_IMAGE):
            return BASE_IMAGE
        container = buildah("from", "scratch").strip()
        try:
            buildah("add", container, tarball, "/")
            buildah("config", "--env", "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", container)
            buildah("config", "--cmd", "/bin/bash", container)
            buildah("commit", "--rm", container, BASE_IMAGE)
        except BaseException:
            subprocess.run(["buildah", *_buildah_storage(), "rm", container], capture_output=True, check=False)
            raise
    return BASE_IMAGE


def _context_digest(context: Path, build_args: Mapping[str, str], extra: str = "") -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in context.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        digest.update(str(path.relative_to(context)).encode())
        digest.update(path.read_bytes())
    digest.update(json.dumps(dict(build_args), sort_keys=True).encode())
    digest.update(extra.encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True, kw_only=True)
class BuiltImage:
    tag: str
    archive: Path


def _archive_name(tag: str) -> str:
    return tag.replace("/", "_").replace(":", "_")


def build_image(
    dockerfile_dir: Path,
    tag: str,
    build_args: Mapping[str, str] | None = None,
    *,
    dockerfile: Path | None = None,
    context: Path | None = None,
) -> BuiltImage:
    """Build `dockerfile_dir/Dockerfile` with buildah as `tag`; cached by a hash of the context and args.

    `context` defaults to `dockerfile_dir`. `BASE_IMAGE` is passed as a build argument (the debootstrap
    base) unless `build_args` sets it.
    """
    args = {"BASE_IMAGE": BASE_IMAGE, **(build_args or {})}
    context = context or dockerfile_dir
    dockerfile = dockerfile or dockerfile_dir / "Dockerfile"
    if not dockerfile.exists():
        raise procs.ClusterError(f"{dockerfile}: no Dockerfile to build {tag} from")
    base_id = ""
    if args["BASE_IMAGE"] == BASE_IMAGE and "FROM scratch" not in dockerfile.read_text():
        ensure_base_image()
        base_id = buildah("inspect", "--type", "image", "--format", "{{.FromImageID}}", BASE_IMAGE).strip()
    key = _context_digest(context, args, extra=dockerfile.read_text() + base_id)
    archive = images_dir() / f"{_archive_name(tag)}-{key}.tar"
    if archive.exists():
        return BuiltImage(tag=tag, archive=archive)
    started = time.monotonic()
    print(f"tests.cluster.images: building {tag} from {dockerfile}", flush=True)
    log = images_dir() / f"{_archive_name(tag)}.log"
    argv: list[str | Path] = ["bud", "--isolation", "chroot", "--pull-never", "-f", dockerfile, "-t", tag]
    for name, value in args.items():
        argv += ["--build-arg", f"{name}={value}"]
    buildah(*argv, context, log=log)
    for stale in images_dir().glob(f"{_archive_name(tag)}-*.tar"):
        stale.unlink()
    partial = archive.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    buildah("push", tag, f"docker-archive:{partial}:{tag}", log=log)
    partial.rename(archive)
    print(f"tests.cluster.images: built {tag} in {time.monotonic() - started:.0f} s", flush=True)
    return BuiltImage(tag=tag, archive=archive)


def _pause_binary(work: Path) -> Path:
    """Compile Kubernetes' pause.c (from the k8s.io/kubernetes module) into a static binary."""
    info = json.loads(
        procs.run(["go", "mod", "download", "-json", f"k8s.io/kubernetes@v{KUBERNETES_VERSION}"], cwd=work)
    )
    source = Path(info["Dir"]) / "build" / "pause" / "linux" / "pause.c"
    binary = work / "pause"
    version = PAUSE_IMAGE.rsplit(":", 1)[1]
    procs.run(["gcc", "-Os", "-Wall", "-Werror", "-static", f'-DVERSION="{version}"', "-o", binary, source])
    procs.run(["strip", binary])
    return binary


def ensure_pause_image() -> BuiltImage:
    """The sandbox image containerd starts every pod with, tagged as the kubelet expects."""
    recipe = PACKAGE_DIR / "images" / "pause"
    existing = sorted(images_dir().glob(f"{_archive_name(PAUSE_IMAGE)}-*.tar"))
    # The binary is compiled into a scratch context, so the cache key is the recipe plus the source version.
    key = _context_digest(recipe, {"KUBERNETES_VERSION": KUBERNETES_VERSION})
    archive = images_dir() / f"{_archive_name(PAUSE_IMAGE)}-{key}.tar"
    if archive in existing:
        return BuiltImage(tag=PAUSE_IMAGE, archive=archive)
    with tempfile.TemporaryDirectory(prefix="ember-pause-") as tmp:
        context = Path(tmp)
        shutil.copy(recipe / "Dockerfile", context / "Dockerfile")
        _pause_binary(context)
        built = build_image(context, PAUSE_IMAGE, {"PAUSE_VERSION": PAUSE_IMAGE.rsplit(":", 1)[1]})
        built.archive.rename(archive)
    return BuiltImage(tag=PAUSE_IMAGE, archive=archive)


def import_image(image: BuiltImage, *, containerd_socket: Path, containerd_root: Path) -> None:
    """Load `image` into containerd's `k8s.io` namespace (unpacked) unless this archive was loaded before.

    containerd's root persists between runs, so a stamp per archive (whose name carries the content hash)
    records what it already holds.
    """
    stamps = containerd_root / "ember-imported"
    stamp = stamps / image.archive.name
    listed = procs.run(["ctr", "--address", containerd_socket, "-n", "k8s.io", "images", "list", "-q"]).split()
    if stamp.exists() and image.tag in listed:
        return
    procs.run(["ctr", "--address", containerd_socket, "-n", "k8s.io", "images", "import", image.archive], timeout_s=600)
    stamps.mkdir(parents=True, exist_ok=True)
    for old in stamps.glob(image.archive.name.rsplit("-", 1)[0] + "-*"):
        old.unlink()
    stamp.touch()
