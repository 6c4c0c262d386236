"""Cold start in the cluster: claim + relabel + specialize + invoke from a warm generic gVisor pod.

Prints p50/p99 next to two baselines measured in the same run: a warm invoke of a specialized
pod, and the time to start a fresh pod (a generic pod deleted, until its replacement is Ready). The
cold path is the activator's (claim, then specialize while the first connection opens, then
invoke), in two series: with the pool settled (full, nothing shutting down) and right after the
previous sample, while the pool's replacement sandbox boots on the same node.

    python -m tests.cluster up            # a real single-node cluster with gVisor
    python bench/cluster_coldstart.py     # N=30 by default; N=10 for a quick look
    python -m tests.cluster down

The operator runs as a host process against the cluster, as in the cluster-tier tests.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from kubernetes import client, config
from kubernetes_asyncio import client as aclient
from kubernetes_asyncio import config as aconfig

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LOGS = Path(tempfile.mkdtemp(prefix="ember-bench-"))
from tests.apiserver.operator_harness import Ember, OperatorProcess, apply_crds, eventually  # noqa: E402

from ember.activator.agent_client import AgentClient  # noqa: E402
from ember.activator.throttler import PodSlots  # noqa: E402
from ember.api.function import FunctionSpec  # noqa: E402
from ember.api.security_policy import SecurityPolicySpec  # noqa: E402
from ember.pods.base import VersionKey  # noqa: E402
from ember.pods.kubernetes import KubernetesPodSource, pool_id_of  # noqa: E402
from ember.pods.payload import pool_key, specialize_request  # noqa: E402

KUBECONFIG = Path(os.environ.get("KUBECONFIG", "/var/tmp/ember-cluster/admin.kubeconfig"))
N = int(os.environ.get("N", "30"))  # samples
SPEC = {
    "runtime": "python3.12",
    "handler": "main.handler",
    "code": {"inline": "def handler(event, context):\n    return {'n': event.get('n')}\n"},
}


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


async def main() -> None:
    import logging

    logging.basicConfig(level=logging.WARNING, filename=str(LOGS / "pods.log"))
    logging.getLogger("ember.pods.kubernetes").setLevel(logging.DEBUG)
    from tests.cluster.cluster import Cluster, build_runtime_images

    Cluster().node.import_images(build_runtime_images())  # the current runtime-images/ agents
    api_sync = config.new_client_from_config(config_file=str(KUBECONFIG))
    apply_crds(api_sync)
    ns = f"bench-{uuid.uuid4().hex[:6]}"
    client.CoreV1Api(api_sync).create_namespace({"metadata": {"name": ns}})
    ember = Ember(api_sync, ns)
    op = OperatorProcess(
        KUBECONFIG,
        ns,
        LOGS / f"{ns}-operator.log",
        EMBER_IMAGE_REGISTRY="localhost",
        EMBER_IMAGE_TAG="dev",
        EMBER_IMAGE_PULL_POLICY="Never",
        EMBER_POOL_SIZE="4",
    )
    op.start()
    configuration = aclient.Configuration()
    await aconfig.load_kube_config(config_file=str(KUBECONFIG), client_configuration=configuration)
    api = aclient.ApiClient(configuration)
    source = KubernetesPodSource(api, namespace=ns, holder="bench")
    try:
        ember.create("functions", {"kind": "Function", "metadata": {"name": "bench"}, "spec": SPEC})
        version = eventually(lambda: ember.get("versions", "bench-v1"), timeout_s=60, what="Version")
        key = pool_key(FunctionSpec.model_validate(SPEC), SecurityPolicySpec())
        pid = pool_id_of(key)
        await source.start()

        def ready_generic() -> int:
            return sum(
                1
                for p in source.cached_pods.values()
                if p["metadata"]["labels"].get("ember.run/pool") == pid
                and p["metadata"]["labels"].get("ember.run/state") == "generic"
                and any(
                    c.get("type") == "Ready" and c.get("status") == "True"
                    for c in (p.get("status") or {}).get("conditions") or []
                )
            )

        async def wait_generic(n: int, limit_s: float = 300) -> None:
            deadline = time.monotonic() + limit_s
            while ready_generic() < n:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{n} ready generic pods")
                await asyncio.sleep(0.05)

        await wait_generic(4)
        vkey = VersionKey(namespace=ns, function="bench", number=1)
        request = specialize_request(vkey, FunctionSpec.model_validate(SPEC), version["spec"]["codeHash"])

        async def settled() -> None:
            """The pool full and no pod shutting down: nothing else competes for the node's CPU."""
            await wait_generic(4)
            while any(p["metadata"].get("deletionTimestamp") for p in source.cached_pods.values()):  # noqa: ASYNC110 (polls the watch cache)
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)

        agents = AgentClient()
        await agents.start()
        series: dict[str, list[list[float]]] = {}
        warm: list[float] = []
        for label, wait in (("settled", settled), ("refilling", lambda: wait_generic(1))):
            cold, claim_ms, spec_ms = series.setdefault(label, [[], [], []])
            for i in range(N):
                await wait()
                # The activator's cold path (ember.activator.scaler): claim, then specialize while
                # the first invocation's connection opens, then invoke.
                t0 = time.perf_counter()
                handle = await source.claim(key)
                t1 = time.perf_counter()
                connecting = asyncio.create_task(agents.preconnect(handle.address))
                handle = await source.specialize(handle, request)
                await connecting
                t2 = time.perf_counter()
                slots = PodSlots(handle, now=time.monotonic())
                reply = await agents.invoke(
                    slots, json.dumps({"n": i}).encode(), request_id=f"bench-{i}", timeout_s=30, log_tail=False
                )
                t3 = time.perf_counter()
                assert json.loads(reply.body) == {"n": i}, reply
                cold.append((t3 - t0) * 1000)
                claim_ms.append((t1 - t0) * 1000)
                spec_ms.append((t2 - t1) * 1000)
                for _ in range(5):
                    w0 = time.perf_counter()
                    await agents.invoke(slots, b"{}", request_id="bench-warm", timeout_s=30, log_tail=False)
                    warm.append((time.perf_counter() - w0) * 1000)
                agents.forget(handle.address)
                await source.release(handle)
        await agents.close()
        # Fresh pod: delete a generic pod and time until its replacement is Ready (scheduling,
        # gVisor sandbox, agent start, readiness probe). The operator alone sizes the pool, so the
        # pool is not scaled here: its Deployment replaces the pod.
        fresh = []
        core = client.CoreV1Api(api_sync)
        for _ in range(5):
            await wait_generic(4)
            before = set(source.cached_pods)
            victim = next(
                n
                for n, p in source.cached_pods.items()
                if p["metadata"]["labels"].get("ember.run/pool") == pid
                and p["metadata"]["labels"].get("ember.run/state") == "generic"
            )
            t0 = time.perf_counter()
            core.delete_namespaced_pod(victim, ns, grace_period_seconds=0)
            deadline = time.monotonic() + 120
            while not [
                p
                for n, p in source.cached_pods.items()
                if n not in before
                and any(
                    c.get("type") == "Ready" and c.get("status") == "True"
                    for c in (p.get("status") or {}).get("conditions") or []
                )
            ]:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no replacement of {victim} Ready within 120 s")
                await asyncio.sleep(0.02)
            fresh.append((time.perf_counter() - t0) * 1000)
        print(f"n={N} cold starts from warm generic pods per series, namespace {ns}")
        print(f"{'measure':52s} {'p50 ms':>9s} {'p99 ms':>9s}")
        rows = []
        for label, (cold, claim_ms, spec_ms) in series.items():
            rows += [
                (f"cold start, pool {label} (claim+specialize+invoke)", cold),
                ("  claim (relabel w/ precondition)", claim_ms),
                ("  specialize (agent; relabel in background)", spec_ms),
            ]
        rows += [("warm invoke (baseline)", warm), ("fresh pod start (a generic pod replaced, to Ready)", fresh)]
        for label, xs in rows:
            print(f"{label:52s} {statistics.median(xs):9.1f} {pct(xs, 99):9.1f}")
    finally:
        await source.close()
        await api.close()
        op.stop()
        client.CoreV1Api(api_sync).delete_namespace(ns)


if __name__ == "__main__":
    asyncio.run(main())
