"""Cluster tier: the operator keeps a gVisor warm pool; the Kubernetes pod source claims, specializes, invokes.

On the real single-node cluster (kubelet, containerd, gVisor `runsc`, kube-controller-manager):
the operator (a host process, as in the apiserver tier) turns a Function into a Version, its code
ConfigMap and a pool Deployment whose pods run the Python agent under RuntimeClass gvisor. The test
then acts as an activator with `KubernetesPodSource`: claims a warm pod, specializes it with the
Version's code, invokes it over the pod network, sees the ReplicaSet replace the claimed pod, and
deletes the Function to see garbage collection take everything it owned.

The pool runs runtime-images/python3.12 (built and imported by the `runtime_images` fixture).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client as aclient
from kubernetes_asyncio import config as aconfig

from ember.api.function import FunctionSpec
from ember.api.security_policy import SecurityPolicySpec
from ember.pods.base import VersionKey
from ember.pods.kubernetes import KubernetesPodSource
from ember.pods.payload import pool_key, specialize_request
from tests.apiserver.operator_harness import Ember, OperatorProcess, condition, eventually
from tests.cluster.paths import kube_bin_dir

CODE = "def handler(event, context):\n    return {'hello': event.get('name', 'world')}\n"


@pytest.fixture
async def api(kubeconfig: Path) -> AsyncIterator[aclient.ApiClient]:
    configuration = aclient.Configuration()
    await aconfig.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    async with aclient.ApiClient(configuration) as api_client:
        yield api_client


def _ready_generic(ember: Ember, pool: str) -> list[Any]:
    pods = ember.core.list_namespaced_pod(ember.ns, label_selector=f"ember.run/pool={pool},ember.run/state=generic")
    return [
        p
        for p in pods.items
        if p.metadata.deletion_timestamp is None
        and any(c.type == "Ready" and c.status == "True" for c in (p.status.conditions or []))
    ]


def _kubectl(kubeconfig: Path, *args: str) -> str:
    out = subprocess.run(
        [str(kube_bin_dir() / "kubectl"), f"--kubeconfig={kubeconfig}", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


async def test_function_to_gvisor_pool_claim_specialize_invoke_and_collection(
    ember_ns: Ember, operator: OperatorProcess, api: aclient.ApiClient, kubeconfig: Path
) -> None:
    ember = ember_ns
    spec = {"runtime": "python3.12", "handler": "main.handler", "code": {"inline": CODE}}
    ember.create("functions", {"kind": "Function", "metadata": {"name": "hello"}, "spec": spec})
    # Stored, not Ready: a Version is Ready once a pod has loaded it (below).
    eventually(
        lambda: condition(ember.get("versions", "hello-v1"), "CodeReady").get("status") == "True",
        timeout_s=60,
        what="Version 1 stored",
    )
    assert condition(ember.get("functions", "hello"), "Ready").get("status") != "True"
    key = pool_key(FunctionSpec.model_validate(spec), SecurityPolicySpec())
    (deployment,) = ember.pools().values()
    pool_id = deployment.metadata.labels["ember.run/pool"]
    warm = eventually(
        lambda: len(_ready_generic(ember, pool_id)) == 2 and _ready_generic(ember, pool_id),
        timeout_s=240,
        what="2 ready generic pods in gVisor",
    )
    assert all(p.spec.runtime_class_name == "gvisor" for p in warm)

    # gVisor's Sentry reports its own kernel, not the host's.
    argv = ["-n", ember.ns, "exec", warm[0].metadata.name, "--", "python3", "-c", "print(open('/proc/version').read())"]
    pod_kernel = _kubectl(kubeconfig, *argv)
    assert pod_kernel.startswith("Linux version")
    assert os.uname().release not in pod_kernel

    source = KubernetesPodSource(api, namespace=ember.ns, holder="test-activator")
    try:
        await source.start()
        handle = await source.claim(key)
        version = VersionKey(namespace=ember.ns, function="hello", number=1)
        version_obj = ember.get("versions", "hello-v1")
        assert version_obj is not None
        request = specialize_request(version, FunctionSpec.model_validate(spec), version_obj["spec"]["codeHash"])
        handle = await source.specialize(handle, request)
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"http://{handle.address}/v1/invoke",
                data=json.dumps({"name": "gvisor"}),
                headers={"Authorization": handle.authorization},
            ) as rsp,
        ):
            assert rsp.status == 200
            assert await rsp.json() == {"hello": "gvisor"}

        # The relabel making the pod the Version's runs in the background, off the cold path.
        await asyncio.wait_for(asyncio.gather(*source._background), timeout=30)
        pod = ember.core.read_namespaced_pod(handle.id, ember.ns)
        assert pod.metadata.owner_references[0].kind == "Version"
        assert pod.metadata.labels["ember.run/state"] == "specialized"
        # A pod loaded Version 1: the operator marks it loaded, and the Function Ready.
        eventually(
            lambda: condition(ember.get("functions", "hello"), "Ready").get("status") == "True",
            timeout_s=60,
            what="Function Ready once a pod loaded Version 1",
        )
        assert condition(ember.get("versions", "hello-v1"), "Loaded")["reason"] == "Loaded"
        # The claimed pod left the Deployment: its ReplicaSet starts a replacement.
        eventually(lambda: len(_ready_generic(ember, pool_id)) == 2, timeout_s=240, what="pool refilled")
        assert handle.id not in {p.metadata.name for p in _ready_generic(ember, pool_id)}
    finally:
        await source.close()

    # Deleting the Function: garbage collection takes Versions, code ConfigMaps, the pool, the claimed pod.
    ember.custom.delete_namespaced_custom_object("ember.run", "v1alpha1", ember.ns, "functions", "hello")
    eventually(lambda: ember.versions("hello") == {}, timeout_s=120, what="Versions collected")
    eventually(lambda: "hello-v1-code" not in ember.configmap_names(), timeout_s=120, what="code ConfigMap collected")
    eventually(lambda: ember.pools() == {}, timeout_s=120, what="pool Deployment collected")
    eventually(
        lambda: not ember.core.list_namespaced_pod(ember.ns, label_selector="ember.run/function=hello").items,
        timeout_s=120,
        what="specialized pod collected",
    )
