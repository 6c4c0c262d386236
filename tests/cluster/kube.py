"""Small Kubernetes API helpers shared by the apiserver and cluster tiers' fixtures."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import yaml

from .paths import REPO_ROOT
from .procs import ClusterError

CRD_DIR = REPO_ROOT / "crds"


def apply_crds(api_client: Any, crd_dir: Path = CRD_DIR, *, timeout_s: float = 30) -> list[str]:
    """Create or replace every CRD in `crd_dir/*.yaml` and wait until each is Established; return their names."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    paths = sorted(crd_dir.glob("*.yaml"))
    if not paths:
        raise ClusterError(f"no CRDs in {crd_dir}")
    ext = client.ApiextensionsV1Api(api_client)
    names = []
    for path in paths:
        crd = yaml.safe_load(path.read_text())
        name = crd["metadata"]["name"]
        names.append(name)
        try:
            ext.create_custom_resource_definition(crd)
        except ApiException as err:
            if err.status != 409:
                raise ClusterError(f"{path}: the API server refused the CRD: {err.body}") from err
            crd["metadata"]["resourceVersion"] = ext.read_custom_resource_definition(name).metadata.resource_version
            ext.replace_custom_resource_definition(name, crd)
    deadline = time.monotonic() + timeout_s
    for name in names:
        while True:
            conditions = ext.read_custom_resource_definition(name).status.conditions or []
            if any(c.type == "Established" and c.status == "True" for c in conditions):
                break
            if time.monotonic() > deadline:
                raise ClusterError(f"CRD {name} not Established after {timeout_s:.0f} s: {conditions}")
            time.sleep(0.1)
    return names
