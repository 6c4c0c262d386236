"""`python -m tests.cluster build|up|down|status|runsc-path|kubeconfig`: the cluster tier's command line."""

from __future__ import annotations

import argparse
import json
import sys
import time

from . import images, runsc_bench
from .build import ensure_coredns, ensure_gvisor, ensure_kube_router, ensure_kubernetes
from .cluster import Cluster, build_runtime_images
from .procs import ClusterError


def _build() -> None:
    started = time.monotonic()
    ensure_kubernetes()
    ensure_gvisor()
    ensure_coredns()
    ensure_kube_router()
    images.ensure_pause_image()
    images.ensure_base_image()
    for image in build_runtime_images():
        print(f"{image.tag}: {image.archive}")
    print(f"tests.cluster: build complete in {time.monotonic() - started:.1f} s", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster", description=__doc__)
    parser.add_argument(
        "command",
        choices=("build", "up", "down", "status", "runsc-path", "kubeconfig", "bench-runsc"),
        help="build: binaries and images into ~/.cache/ember; up/down/status: the development cluster; "
        "runsc-path: the runsc local mode should use; kubeconfig: the running cluster's admin kubeconfig; "
        "bench-runsc: gVisor start-up per runsc build and platform",
    )
    args = parser.parse_args(argv)
    try:
        if args.command == "build":
            _build()
        elif args.command == "up":
            cluster = Cluster()
            with cluster.locked():
                cluster.up()
                (cluster.state.root / "kept-by-cli").touch()
            cluster.node.import_images(build_runtime_images())
            print(f"export KUBECONFIG={cluster.kubeconfig}")
        elif args.command == "down":
            cluster = Cluster()
            with cluster.locked():
                cluster.down()
                (cluster.state.root / "kept-by-cli").unlink(missing_ok=True)
        elif args.command == "status":
            report = Cluster().status()
            print(json.dumps(report, indent=2))
            return 0 if report["healthy"] else 1
        elif args.command == "runsc-path":
            print(ensure_gvisor()["runsc"])
        elif args.command == "bench-runsc":
            runsc_bench.main()
        elif args.command == "kubeconfig":
            print(Cluster().kubeconfig)
    except ClusterError as err:
        print(f"tests.cluster {args.command}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
