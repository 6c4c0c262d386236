"""User scenarios shared by the cluster tests: they run against any activator URL (host process or Service).

`ActivatorProcess` runs the activator in Kubernetes mode as a host process against the cluster.

`invoke_via_boto3` calls a Function with boto3's Lambda client, unchanged. `roll_under_load` edits a
Function's code while four clients keep invoking and checks that traffic moved to the new Version
with no failed request. `edit_under_load` does the same for any edit that makes a new Version (a
SecurityPolicy's, say), whatever the code answers.
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
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import aiohttp
import boto3
import pytest
from botocore.config import Config

from tests.apiserver.operator_harness import Ember

ROOT = Path(__file__).resolve().parents[2]
Result = tuple[int, str, str, Any]


class ActivatorProcess:
    """`python -m ember.activator_main` on 127.0.0.1 and a free port, as claim holder `holder`; stopped by pid."""

    def __init__(
        self, kubeconfig: Path, ns: str, log: Path, *, holder: str = "test-act", env: Mapping[str, str] | None = None
    ) -> None:
        self.kubeconfig = kubeconfig
        self.ns = ns
        self.log = log
        self.holder = holder
        self.env = dict(env or {})
        self.proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout_s: float = 60.0) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "PYTHONUNBUFFERED": "1",
            "POD_NAME": self.holder,
            **self.env,
        }
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
            assert self.proc.poll() is None, f"{self.holder} exited with {self.proc.returncode}:\n{self.log_tail()}"
            time.sleep(0.1)
        raise AssertionError(f"{self.holder} did not listen within {timeout_s:.0f}s:\n{self.log_tail()}")

    def kill(self) -> None:
        """SIGKILL: no release of pods, no Lease deleted - a crash or a lost node."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> int | None:
        """SIGTERM (graceful: drain, release pods), then SIGKILL after 30 s; the exit code (None if killed)."""
        if self.proc is None:
            return None
        code = self.proc.poll()
        if code is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                code = self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
                code = None
        self.proc = None
        return code

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""


def code(version: int) -> str:
    """The hello handler of a numbered code revision (it answers with its revision)."""
    return f"def handler(event, context):\n    return {{'version': {version}, 'hello': event.get('name', 'world')}}\n"


async def invoke(http: aiohttp.ClientSession, url: str, ns: str, name: str) -> Result:
    """One Ember API call: (status, executed Version, function error header, JSON body or text)."""
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


async def invoke_via_boto3(url: str, function_name: str, *, expect_version: str) -> None:
    """boto3's Lambda client against the activator: a RequestResponse call and a 404 for an unknown name."""
    lam = boto3.client(
        "lambda",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="ember",
        aws_secret_access_key="ember",
        config=Config(retries={"max_attempts": 0}),
    )
    payload = json.dumps({"name": "boto3"}).encode()
    out = await asyncio.to_thread(lam.invoke, FunctionName=function_name, Payload=payload)
    assert out["StatusCode"] == 200
    assert out["ExecutedVersion"] == expect_version
    assert "FunctionError" not in out
    assert json.loads(out["Payload"].read())["hello"] == "boto3"
    with pytest.raises(lam.exceptions.ResourceNotFoundException):
        await asyncio.to_thread(lam.invoke, FunctionName=f"{function_name}-nope", Payload=b"{}")


async def roll_under_load(ember: Ember, url: str, name: str, *, to_version: int = 2, timeout_s: float = 240) -> None:
    """Edit `name`'s code to revision `to_version` while 4 clients invoke; 0 failures, traffic moves.

    `name` must be at revision `to_version - 1` (see `code`): `edit_under_load`, plus that each
    answer came from the code of the Version it names."""
    streams = await edit_under_load(
        url,
        ember.ns,
        name,
        lambda: ember.patch("functions", name, {"spec": {"code": {"inline": code(to_version)}}}),
        old=str(to_version - 1),
        new=str(to_version),
        timeout_s=timeout_s,
    )
    assert all(r[3]["version"] == int(r[1]) for stream in streams for r in stream)


async def edit_under_load(
    url: str, ns: str, name: str, edit: Callable[[], object], *, old: str, new: str, timeout_s: float = 240
) -> list[list[Result]]:
    """Make `edit` while 4 clients invoke `name` on Version `old`: 0 failures, and traffic ends on `new`.

    For edits that make a new Version of the same code (a SecurityPolicy, memory, env), so only the
    executed Version is checked, not what the code answers (`roll_under_load` adds that). Bounded: 3000 calls
    per client and `timeout_s`; each client stops after 20 answers in a row from `new`. Returns each
    client's results in order, for the caller's own checks.
    """
    streams: list[list[Result]] = [[] for _ in range(4)]
    stop = asyncio.Event()

    async def client(results: list[Result]) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=90)) as http:
            streak = 0
            for _ in range(3000):
                result = await invoke(http, url, ns, name)
                results.append(result)
                streak = streak + 1 if result[1] == new else 0
                if stop.is_set() or streak >= 20:
                    return

    clients = [asyncio.create_task(client(results)) for results in streams]
    await asyncio.sleep(1.0)
    await asyncio.to_thread(edit)  # the clients keep invoking meanwhile
    try:
        async with asyncio.timeout(timeout_s):
            await asyncio.gather(*clients)
    except TimeoutError:
        stop.set()
        await asyncio.gather(*clients, return_exceptions=True)
        seen_all = sorted({r[1] for results in streams for r in results})
        raise AssertionError(
            f"traffic did not move to Version {new} within {timeout_s:.0f} s; versions seen: {seen_all}"
        ) from None

    results = [r for stream in streams for r in stream]
    failed = [r for r in results if r[0] != 200 or r[2]]
    assert failed == [], f"{len(failed)} of {len(results)} failed, e.g. {failed[:3]}"
    assert all(stream and stream[0][1] == old for stream in streams), "the load ran on the old Version before the edit"
    assert {r[1] for r in results} == {old, new}
    for stream in streams:  # once the new Version took a client's traffic it kept it, to the end
        seen = [r[1] for r in stream]
        moved = seen.index(new)
        assert seen[moved:] == [new] * (len(seen) - moved), seen
    return streams
