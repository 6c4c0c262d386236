"""The Kubernetes pod source against a real kube-apiserver and real runtime agents.

No kubelet runs in this tier, so the test plays its part for a handful of Pod objects: it starts
real agent processes on loopback addresses 127.0.0.2-4 (one port) and writes each pod's status
(podIP, Ready) through the status subresource, as a kubelet would. Everything the pod source does
- the watch, claims with resourceVersion preconditions, relabelling, owner references, the
agent's specialize over HTTP, invocation, deletion, pool scaling - runs for real. Pool
replacement by the ReplicaSet needs kube-controller-manager: that is the cluster tier's.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from kubernetes_asyncio import client as aclient
from kubernetes_asyncio import config as aconfig
from tests.apiserver.operator_harness import Ember, crds, ember, eventually, hello_function, ns

from ember.api.function import Function
from ember.api.security_policy import DEFAULT_POLICY, SecurityPolicySpec
from ember.api.version import Version, code_hash
from ember.pods.base import PodGone, PodHandle, PoolShortage, SpecializeFailed, VersionKey
from ember.pods.kubernetes import CLAIMED_AT, CLAIMED_BY, KubernetesPodSource
from ember.pods.local import agent_command
from ember.pods.payload import pool_key, specialize_request
from ember.resources.code import code_configmap, version_files
from ember.resources.pool import PoolSpec, pool_deployment
from ember.resources.version import build_version

__all__ = ["crds", "ember", "ns"]

HOSTS = ("127.0.0.2", "127.0.0.3", "127.0.0.4")
CODE = "def handler(event, context):\n    return {'hello': event.get('name', 'world')}\n"


def _free_port_on_all(hosts: tuple[str, ...]) -> int:
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind((hosts[0], 0))
            port = int(probe.getsockname()[1])
        try:
            for host in hosts[1:]:
                with socket.socket() as other:
                    other.bind((host, port))
        except OSError:
            continue
        return port
    raise RuntimeError("no port free on every loopback address")


@pytest.fixture
def agents(tmp_path: Path) -> Iterator[int]:
    """Three real generic agents on 127.0.0.2-4, same port; stopped by pid."""
    port = _free_port_on_all(HOSTS)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, host in enumerate(HOSTS):
            code_dir = tmp_path / f"code{i}"
            code_dir.mkdir()
            env = {**os.environ, "EMBER_AGENT_HOST": host, "EMBER_AGENT_PORT": str(port)}
            env["EMBER_AGENT_CODE_DIR"] = str(code_dir)
            with (tmp_path / f"agent{i}.log").open("wb") as log:
                procs.append(subprocess.Popen(agent_command("python3.12"), env=env, stdout=log, stderr=log))
        for host in HOSTS:
            eventually(lambda host=host: _listening(host, port), what=f"agent on {host}:{port}")
        yield port
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _listening(host: str, port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex((host, port)) == 0


class World:
    """A Function, its Version with code ConfigMap, and three generic pool pods, in one namespace."""

    def __init__(self, ember: Ember) -> None:
        self.ember = ember
        # No controller-manager in this tier: pods need the namespace's default ServiceAccount made by hand.
        ember.core.create_namespaced_service_account(ember.ns, {"metadata": {"name": "default"}})
        fn_body = ember.create("functions", hello_function(code={"inline": CODE}))
        self.fn = Function.model_validate({k: fn_body[k] for k in ("apiVersion", "kind", "metadata", "spec")})
        self.hash = code_hash(self.fn.spec, DEFAULT_POLICY)
        stored = ember.create("versions", build_version(self.fn, number=1, code_hash=self.hash, policy=DEFAULT_POLICY))
        self.version = Version.model_validate({k: stored[k] for k in ("apiVersion", "kind", "metadata", "spec")})
        files = version_files(self.fn.spec, None)
        assert files is not None
        ember.core.create_namespaced_config_map(ember.ns, code_configmap(self.version, files))
        self.pool = pool_key(self.fn.spec, SecurityPolicySpec())
        self.pool_spec = PoolSpec(
            namespace=ember.ns,
            runtime=self.pool.runtime,
            memory_mib=self.pool.memory_mib,
            policy=SecurityPolicySpec(),
            policy_hash=self.pool.policy_hash,
            image="localhost/ember-runtime-python:dev",
            replicas=1,
        )
        self.key = VersionKey(namespace=ember.ns, function="hello", number=1)

    def add_generic_pods(self) -> list[str]:
        template = pool_deployment(self.pool_spec)["spec"]["template"]
        names = []
        for i, host in enumerate(HOSTS):
            name = f"pool-pod-{i}"
            body = {"metadata": {"name": name, **template["metadata"]}, "spec": template["spec"]}
            self.ember.core.create_namespaced_pod(self.ember.ns, body)
            status = {
                "status": {
                    "phase": "Running",
                    "podIP": host,
                    "podIPs": [{"ip": host}],
                    "conditions": [{"type": "Ready", "status": "True"}],
                }
            }
            self.ember.core.patch_namespaced_pod_status(name, self.ember.ns, status)
            names.append(name)
        return names


@pytest.fixture
def world(ember: Ember) -> World:
    return World(ember)


@pytest.fixture
async def api(kubeconfig: Path) -> AsyncIterator[aclient.ApiClient]:
    configuration = aclient.Configuration()
    await aconfig.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
    async with aclient.ApiClient(configuration) as api_client:
        yield api_client


async def _source(api: aclient.ApiClient, ns: str, holder: str, port: int, **kw: Any) -> KubernetesPodSource:
    source = KubernetesPodSource(api, namespace=ns, holder=holder, agent_port=port, **kw)
    await source.start()
    return source


async def test_two_activators_never_claim_the_same_pod(
    api: aclient.ApiClient, world: World, agents: int, ember: Ember
) -> None:
    names = world.add_generic_pods()
    one = await _source(api, ember.ns, "activator-a", agents, claim_timeout_s=2.0)
    two = await _source(api, ember.ns, "activator-b", agents, claim_timeout_s=2.0)
    try:
        await asyncio.sleep(0.3)  # both caches have seen the pods
        results = await asyncio.gather(
            *(source.claim(world.pool) for source in (one, two, one, two, one, two)), return_exceptions=True
        )
        handles = [r for r in results if isinstance(r, PodHandle)]
        failures = [r for r in results if not isinstance(r, PodHandle)]
        assert sorted(h.id for h in handles) == sorted(names), "each pod claimed exactly once"
        assert len(failures) == 3
        assert all(isinstance(f, PoolShortage) for f in failures), failures  # capacity: no Version fails for it
        for handle in handles:
            pod = ember.core.read_namespaced_pod(handle.id, ember.ns)
            assert pod.metadata.labels["ember.run/state"] == "claimed"
            assert pod.metadata.labels[CLAIMED_BY] in {"activator-a", "activator-b"}
    finally:
        await one.close()
        await two.close()


async def test_specialize_owns_the_pod_by_the_version_loads_code_and_release_deletes_it(
    api: aclient.ApiClient, world: World, agents: int, ember: Ember
) -> None:
    world.add_generic_pods()
    source = await _source(api, ember.ns, "activator-a", agents)
    try:
        handle = await source.claim(world.pool)
        # The request carries other code: the pod must get the Version's snapshot from its ConfigMap.
        stale = world.fn.spec.model_copy(update={"code": world.fn.spec.code.model_copy(update={"inline": "x = ("})})
        request = specialize_request(world.key, stale, world.hash)
        specialized = await source.specialize(handle, request)
        assert specialized.version == world.key
        # This source routes to it at once; the relabel making it the Version's follows off the cold path.
        assert [e.id for e in source.endpoints(world.key)] == [handle.id]

        # The source's event loop runs the relabel meanwhile: wait without blocking it.
        await asyncio.wait_for(asyncio.gather(*source._background), timeout=10)
        pod = ember.core.read_namespaced_pod(handle.id, ember.ns)
        assert pod.metadata.labels["ember.run/state"] == "specialized"
        assert pod.metadata.labels["ember.run/function"] == "hello"
        assert pod.metadata.labels["ember.run/version"] == "1"
        (owner,) = pod.metadata.owner_references
        assert (owner.kind, owner.uid, owner.controller) == ("Version", world.version.metadata.uid, True)

        endpoints = await asyncio.wait_for(_first_nonempty(source, world.key), timeout=10)
        assert [e.id for e in endpoints] == [handle.id]
        url = f"http://{handle.address}/v1/invoke"
        auth = {"Authorization": handle.authorization}
        async with (
            aiohttp.ClientSession() as http,
            http.post(url, data=json.dumps({"name": "k8s"}), headers=auth) as rsp,
        ):
            assert rsp.status == 200
            assert await rsp.json() == {"hello": "k8s"}

        await source.release(specialized)
        await source.release(specialized)  # idempotent
        eventually(lambda: handle.id not in {p.metadata.name for p in ember.core.list_namespaced_pod(ember.ns).items})
        assert await asyncio.wait_for(_first_empty(source, world.key), timeout=10) == []
    finally:
        await source.close()


async def _first_empty(source: KubernetesPodSource, key: VersionKey) -> list[PodHandle] | None:
    async for endpoints in source.watch(key):
        if not endpoints:
            return list(endpoints)
    return None


async def _first_nonempty(source: KubernetesPodSource, key: VersionKey) -> list[PodHandle]:
    async for endpoints in source.watch(key):
        if endpoints:
            return list(endpoints)
    return []


async def test_bad_code_fails_specialize_and_the_pod_is_deleted(
    api: aclient.ApiClient, world: World, agents: int, ember: Ember
) -> None:
    world.add_generic_pods()
    # Version 2 of the Function: code that does not import
    bad = world.fn.model_copy(update={"spec": world.fn.spec.model_copy(update={"code": _bad()})})
    bad_hash = code_hash(bad.spec, DEFAULT_POLICY)
    stored = ember.create("versions", build_version(bad, number=2, code_hash=bad_hash, policy=DEFAULT_POLICY))
    version2 = Version.model_validate({k: stored[k] for k in ("apiVersion", "kind", "metadata", "spec")})
    ember.core.create_namespaced_config_map(ember.ns, code_configmap(version2, version_files(bad.spec, None)))
    source = await _source(api, ember.ns, "activator-a", agents)
    try:
        handle = await source.claim(world.pool)
        with pytest.raises(SpecializeFailed) as caught:
            await source.specialize(handle, specialize_request(replace(world.key, number=2), bad.spec, bad_hash))
        assert caught.value.is_code_error
        eventually(lambda: handle.id not in {p.metadata.name for p in ember.core.list_namespaced_pod(ember.ns).items})
    finally:
        await source.close()


@pytest.mark.parametrize("forged", ["other-code", "not-owned"])
async def test_a_code_configmap_someone_else_planted_is_never_run(
    api: aclient.ApiClient, world: World, agents: int, ember: Ember, forged: str
) -> None:
    """Whoever may create ConfigMaps could put `hello-v1-code` in place of the operator's: the
    source specializes only from one the Version controls that holds the code the Version names."""
    world.add_generic_pods()
    ember.core.delete_namespaced_config_map("hello-v1-code", ember.ns)
    evil = world.fn.spec.model_copy(update={"code": _evil()})
    body = code_configmap(world.version, version_files(evil, None))
    if forged == "not-owned":
        body = code_configmap(world.version, version_files(world.fn.spec, None))
        body["metadata"]["ownerReferences"] = []
    ember.core.create_namespaced_config_map(ember.ns, body)
    source = await _source(api, ember.ns, "activator-a", agents)
    try:
        handle = await source.claim(world.pool)
        with pytest.raises(PodGone) as caught:
            await source.specialize(handle, specialize_request(world.key, world.fn.spec, world.hash))
        expected = "does not hold the code of Version hello-v1" if forged == "other-code" else "is not controlled by"
        assert expected in str(caught.value)
        assert source.endpoints(world.key) == []
        await source.release(handle)
    finally:
        await source.close()


def _evil() -> Any:
    from ember.api.function import Code

    return Code(inline="def handler(event, context):\n    return {'hello': 'evil'}\n")


def _bad() -> Any:
    from ember.api.function import Code

    return Code(inline="def handler(event, context):\n    return (\n")


async def test_claims_are_published_on_the_lease_as_pool_demand(
    api: aclient.ApiClient, world: World, ember: Ember, agents: int
) -> None:
    # Pool size is the operator's; the activator only says how many pods it claimed per pool.
    world.add_generic_pods()
    source = KubernetesPodSource(api, namespace=ember.ns, holder="a", agent_port=agents)
    try:
        await source.start()
        handle = await source.claim(world.pool)
        await source.renew_lease()
        lease = ember.coordination.read_namespaced_lease("ember-activator-a", ember.ns)
        published = json.loads(lease.metadata.annotations["ember.run/pool-demand"])
        assert published == {world.pool_spec.id: 1}
        source.expect_claims({world.pool: 2})  # the predictor's prewarms due in the next window
        await source.renew_lease()
        lease = ember.coordination.read_namespaced_lease("ember-activator-a", ember.ns)
        published = json.loads(lease.metadata.annotations["ember.run/pool-demand"])
        assert published == {world.pool_spec.id: 3}, "claims made plus claims expected"
        source.expect_claims({})
        await source.renew_lease()
        lease = ember.coordination.read_namespaced_lease("ember-activator-a", ember.ns)
        assert json.loads(lease.metadata.annotations["ember.run/pool-demand"]) == {world.pool_spec.id: 1}
        await source.release(handle)
    finally:
        await source.close()


async def test_claim_with_a_stale_resource_version_loses(
    api: aclient.ApiClient, world: World, agents: int, ember: Ember
) -> None:
    (name, *_) = world.add_generic_pods()
    source = await _source(api, ember.ns, "activator-a", agents)
    try:
        stale = ember.core.read_namespaced_pod(name, ember.ns).metadata.resource_version
        ember.core.patch_namespaced_pod(name, ember.ns, {"metadata": {"labels": {CLAIMED_BY: "someone-else"}}})
        assert await source._relabel(name, stale, {"ember.run/state": "claimed"}) is None
        pod = ember.core.read_namespaced_pod(name, ember.ns)
        assert pod.metadata.labels["ember.run/state"] == "generic"
        fresh = pod.metadata.resource_version
        assert await source._relabel(name, fresh, {"ember.run/state": "claimed"}) is not None
    finally:
        await source.close()


async def test_claims_never_specialized_are_swept_after_the_ttl(
    api: aclient.ApiClient, world: World, agents: int, ember: Ember
) -> None:
    first, second, _ = world.add_generic_pods()
    source = await _source(api, ember.ns, "activator-a", agents, stale_claim_s=60.0)
    try:
        handle = await source.claim(world.pool)
        claimed_at = float(ember.core.read_namespaced_pod(handle.id, ember.ns).metadata.annotations[CLAIMED_AT])
        # A claim without a stamp (an older activator's) counts as stale at once.
        other = second if handle.id == first else first
        ember.core.patch_namespaced_pod(other, ember.ns, {"metadata": {"labels": {"ember.run/state": "claimed"}}})
        for _ in range(100):  # the watch (on this event loop) brings the relabel into the cache
            if source.cached_pods[other]["metadata"]["labels"]["ember.run/state"] == "claimed":
                break
            await asyncio.sleep(0.1)
        assert await source.sweep_stale_claims(now=claimed_at + 30) == [other]
        assert await source.sweep_stale_claims(now=claimed_at + 61) == [handle.id]
        names = {p.metadata.name for p in ember.core.list_namespaced_pod(ember.ns).items}
        assert handle.id not in names
        assert other not in names
    finally:
        await source.close()


async def test_a_specialized_pod_whose_agent_restarted_leaves_routing_and_is_deleted(
    api: aclient.ApiClient, world: World, agents: int, ember: Ember
) -> None:
    """A container restart leaves a generic agent (no code, no token) in a pod still labelled
    specialized and Ready: the source must stop routing to it and delete it. The kubelet's part
    (the restart count in the status) is played here, with the pod Ready throughout."""
    world.add_generic_pods()
    source = await _source(api, ember.ns, "activator-a", agents)
    try:
        handle = await source.claim(world.pool)
        await source.specialize(handle, specialize_request(world.key, world.fn.spec, world.hash))
        await asyncio.wait_for(asyncio.gather(*source._background), timeout=10)
        pod = ember.core.read_namespaced_pod(handle.id, ember.ns)
        assert pod.metadata.annotations["ember.run/agent-restarts"] == "0"  # as claimed
        assert [e.id for e in source.endpoints(world.key)] == [handle.id]

        container = pod.spec.containers[0]
        restarted = {
            "status": {
                "containerStatuses": [
                    {
                        "name": container.name,
                        "image": container.image,
                        "imageID": "",
                        "ready": True,
                        "restartCount": 1,
                        "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}},
                    }
                ],
                "conditions": [{"type": "Ready", "status": "True"}],
            }
        }
        ember.core.patch_namespaced_pod_status(handle.id, ember.ns, restarted)
        assert await asyncio.wait_for(_first_empty(source, world.key), timeout=10) == []
        async with asyncio.timeout(30):  # the source deletes it in the background: keep its loop running
            while handle.id in {p.metadata.name for p in ember.core.list_namespaced_pod(ember.ns).items}:  # noqa: ASYNC110
                await asyncio.sleep(0.2)
    finally:
        await source.close()
