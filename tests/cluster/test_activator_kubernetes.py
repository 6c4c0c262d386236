"""Cluster tier: the activator in Kubernetes mode, end to end on the real node.

The operator and the activator (`python -m ember.activator_main`) run as host processes against
the real cluster, in a namespace of this test's own. A Function applied through the API server
becomes the operator's Version 1 and a gVisor warm pool; the activator follows the Function and
its Versions (it mints none), claims a warm pod and invokes it over the pod network, through the
Ember API and through boto3's Lambda client. The Function's code is then edited while four
clients keep invoking: the operator makes Version 2, the activator loads it, and traffic moves
to it with no failed request. SIGTERM then stops the activator cleanly and releases its pods.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import pytest
from botocore.config import Config

from tests.apiserver.operator_harness import Ember, OperatorProcess, condition, eventually

ROOT = Path(__file__).resolve().parents[2]
CODE_V1 = "def handler(event, context):\n    return {'version': 1, 'hello': event.get('name', 'world')}\n"
CODE_V2 = "def handler(event, context):\n    return {'version': 2, 'hello': event.get('name', 'world')}\n"
SPEC: dict[str, Any] = {
    "runtime": "python3.12",
    "handler": "main.handler",
    "code": {"inline": CODE_V1},
    "concurrency": 8,  # one pod takes the four clients: the test does not wait on pool refills mid-load
}


class ActivatorProcess:
    """`python -m ember.activator_main` on 127.0.0.1 and a free port, stopped by pid."""

    def __init__(self, kubeconfig: Path, ns: str, log: Path) -> None:
        self.kubeconfig = kubeconfig
        self.ns = ns
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout_s: float = 60.0) -> None:
        env = {**os.environ, "KUBECONFIG": str(self.kubeconfig), "PYTHONUNBUFFERED": "1", "POD_NAME": "test-act"}
        env.pop("KUBERNETES_SERVICE_HOST", None)
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "ember.activator_main",
                    "--host=127.0.0.1",
                    "--port=0",
                    f"--namespace={self.ns}",
                ],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = re.search(r"listening on (http://127\.0\.0\.1:\d+)", self.log.read_text(errors="replace"))
            if found:
                self.url = found.group(1)
                return
            assert self.proc.poll() is None, f"activator exited with {self.proc.returncode}:\n{self.log_tail()}"
            time.sleep(0.1)
        raise AssertionError(f"activator did not listen within {timeout_s:.0f}s:\n{self.log_tail()}")

    def stop(self) -> int | None:
        """SIGTERM (graceful: drain, release pods), then SIGKILL after 30 s; the exit code."""
        if self.proc is None:
            return None
        code = self.proc.poll()
        if code is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                code = self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
                code = None
        self.proc = None
        return code

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""


@pytest.fixture
def activator(
    kubeconfig: Path, ember_ns: Ember, operator: OperatorProcess, tmp_path: Path
) -> Iterator[ActivatorProcess]:
    proc = ActivatorProcess(kubeconfig, ember_ns.ns, tmp_path / "activator.log")
    try:
        proc.start()
        yield proc
    finally:
        code = proc.stop()  # None when the test stopped it already
        print(f"--- activator log (exit {code}) ---\n{proc.log_tail()}")


def _ready_generic(ember: Ember) -> int:
    pods = ember.core.list_namespaced_pod(ember.ns, label_selector="ember.run/state=generic")
    return sum(
        1
        for p in pods.items
        if p.metadata.deletion_timestamp is None
        and any(c.type == "Ready" and c.status == "True" for c in (p.status.conditions or []))
    )


async def _invoke(http: aiohttp.ClientSession, url: str, ns: str, name: str) -> tuple[int, str, str, Any]:
    async with http.post(
        f"{url}/v1/namespaces/{ns}/functions/{name}/invoke", data=json.dumps({"name": "ember"})
    ) as rsp:
        body = await rsp.read()
        return (
            rsp.status,
            rsp.headers.get("X-Ember-Executed-Version", ""),
            rsp.headers.get("X-Ember-Function-Error", ""),
            json.loads(body) if rsp.status == 200 else body.decode(errors="replace"),
        )


async def test_activator_follows_operator_versions_and_rolls_under_load(
    ember_ns: Ember, activator: ActivatorProcess
) -> None:
    ember = ember_ns
    ember.create("functions", {"kind": "Function", "metadata": {"name": "hello"}, "spec": SPEC})
    eventually(
        lambda: condition(ember.get("functions", "hello"), "Ready").get("status") == "True",
        timeout_s=60,
        what="Function Ready",
    )
    eventually(lambda: _ready_generic(ember) == 2, timeout_s=240, what="2 ready generic pods in gVisor")

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as http:
        # Ember API: the first call claims and specializes a warm pod with the operator's Version 1.
        status, version, error, body = await _invoke(http, activator.url, ember.ns, "hello")
        assert (status, version, error) == (200, "1", ""), body
        assert body == {"version": 1, "hello": "ember"}
        async with http.get(f"{activator.url}/readyz") as rsp:
            ready = await rsp.json()
        # The activator minted nothing: it knows exactly the operator's Versions.
        assert set(ready["functions"][f"{ember.ns}/hello"]) == {"1"}
        assert set(ember.versions("hello")) == {1}
        async with http.post(f"{activator.url}/v1/namespaces/{ember.ns}/functions/nope/invoke", data="{}") as rsp:
            assert rsp.status == 404

        # boto3's Lambda client, unchanged, against the activator.
        lam = boto3.client(
            "lambda",
            endpoint_url=activator.url,
            region_name="us-east-1",
            aws_access_key_id="ember",
            aws_secret_access_key="ember",
            config=Config(retries={"max_attempts": 0}),
        )
        out = await asyncio.to_thread(
            lam.invoke, FunctionName=f"{ember.ns}/hello", Payload=json.dumps({"name": "boto3"}).encode()
        )
        assert out["StatusCode"] == 200
        assert out["ExecutedVersion"] == "1"
        assert "FunctionError" not in out
        assert json.loads(out["Payload"].read()) == {"version": 1, "hello": "boto3"}
        with pytest.raises(lam.exceptions.ResourceNotFoundException):
            await asyncio.to_thread(lam.invoke, FunctionName=f"{ember.ns}/nope", Payload=b"{}")

        # The pool refilled after the claim: Version 2 will find a warm pod.
        eventually(lambda: _ready_generic(ember) == 2, timeout_s=240, what="pool refilled to 2")

        # Edit the code under a light steady load: 4 clients, bounded by count and by time.
        results: list[tuple[int, str, str, Any]] = []
        stop = asyncio.Event()

        async def client() -> None:
            streak = 0
            for _ in range(3000):
                result = await _invoke(http, activator.url, ember.ns, "hello")
                results.append(result)
                streak = streak + 1 if result[1] == "2" else 0
                if stop.is_set() or streak >= 20:
                    return

        clients = [asyncio.create_task(client()) for _ in range(4)]
        await asyncio.sleep(1.0)
        before = len(results)
        ember.custom.patch_namespaced_custom_object(
            "ember.run", "v1alpha1", ember.ns, "functions", "hello", {"spec": {"code": {"inline": CODE_V2}}}
        )
        try:
            async with asyncio.timeout(240):
                await asyncio.gather(*clients)
        except TimeoutError:
            stop.set()
            await asyncio.gather(*clients, return_exceptions=True)
            raise AssertionError(
                f"traffic did not move to Version 2 within 240 s; versions seen: "
                f"{sorted({r[1] for r in results})}; activator:\n{activator.log_tail()}"
            ) from None

    failed = [r for r in results if r[0] != 200 or r[2]]
    assert failed == [], f"{len(failed)} of {len(results)} failed, e.g. {failed[:3]}"
    assert before > 0  # the load was running before the edit
    seen = [r[1] for r in results]
    assert set(seen) == {"1", "2"}
    # Once Version 2 took the traffic it kept it, and each answer came from the Version it names.
    first_v2 = seen.index("2")
    assert all(v == "2" for v in seen[first_v2 + 8 :]), seen[first_v2:]
    assert all(r[3]["version"] == int(r[1]) for r in results)
    assert set(ember.versions("hello")) == {1, 2}

    # Graceful shutdown: SIGTERM drains, releases the activator's specialized pods and exits 0.
    assert ember.core.list_namespaced_pod(ember.ns, label_selector="ember.run/function=hello").items
    assert activator.stop() == 0
    eventually(
        lambda: not ember.core.list_namespaced_pod(ember.ns, label_selector="ember.run/function=hello").items,
        timeout_s=60,
        what="the activator's pods released",
    )
