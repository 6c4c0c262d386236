"""`ember dev` rolling a Function's Versions while it serves: real CLI process, files, agents and sockets.

Covers: an edit of the SecurityPolicy file a Function references, made while four clients keep
invoking it, is a new Version (the policy is part of its content) that takes the traffic with no
failed request; three edits in a row whose code fails to import each make a Version that fails
while every request keeps succeeding on the old one, and a good edit after them still rolls out.
The Version objects' status (`Ready=False`, `LoadFailed`), `readyVersion` and retention are the
operator's, covered on a real cluster by tests/cluster/test_version_rollout.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from .test_devmode import Dev

POLICY = """
apiVersion: ember.run/v1alpha1
kind: SecurityPolicy
metadata:
  name: tight
spec:
  filesystem:
    tmpSizeMiB: {tmp_size_mib}
"""
FUNCTION = """
apiVersion: ember.run/v1alpha1
kind: Function
metadata:
  name: greet
spec:
  runtime: python3.11
  handler: main.handler
  securityPolicyRef: {{name: tight}}
  code:
    inline: |
{code}
"""
GOOD = """\
def handler(event, context):
    return {"version": context.function_version}
"""
CLIENTS = 4
STREAK = 20  # a client stops after this many answers in a row from the Version it waits for
LOAD_BOUND_S = 60.0  # and whatever happens, after this long

# status, X-Ember-Executed-Version, X-Ember-Function-Error, body, when it came (monotonic)
Reply = tuple[int, str, str, Any, float]


def _function(code: str) -> str:
    return FUNCTION.format(code=textwrap.indent(code, " " * 6))


def _bad(module: str) -> str:
    """Code whose import fails: the agent refuses it, so its Version fails to load."""
    return f"import {module}\n\n{GOOD}"


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[Dev]:
    """`ember dev` on a Function under SecurityPolicy `tight`; Ctrl-C at the end, SIGKILL if that hangs."""
    (tmp_path / "policy.yaml").write_text(POLICY.format(tmp_size_mib=16))
    (tmp_path / "greet.yaml").write_text(_function(GOOD))
    proc = subprocess.Popen(
        [sys.executable, "-m", "ember.cli", "dev", str(tmp_path), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    running = Dev(proc)
    try:
        running.url = running.wait_for(r"activator on (http://127\.0\.0\.1:\d+)").group(1)
        running.wait_for(r"Version 1 of default/greet: Ready")
        yield running
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _invoke(http: aiohttp.ClientSession, url: str) -> Reply:
    async with http.post(f"{url}/v1/namespaces/default/functions/greet/invoke", data=b"{}") as rsp:
        body = await rsp.read()
        return (
            rsp.status,
            rsp.headers.get("X-Ember-Executed-Version", ""),
            rsp.headers.get("X-Ember-Function-Error", ""),
            json.loads(body) if rsp.status == 200 else body.decode(errors="replace"),
            time.monotonic(),
        )


async def _load(url: str, *, stop: asyncio.Event, until_version: str | None = None) -> list[list[Reply]]:
    """CLIENTS callers invoking one after another until `stop`, `LOAD_BOUND_S`, or (with `until_version`)
    STREAK answers in a row from that Version; the replies of each."""
    streams: list[list[Reply]] = [[] for _ in range(CLIENTS)]
    deadline = time.monotonic() + LOAD_BOUND_S

    async def client(replies: list[Reply]) -> None:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            streak = 0
            while not stop.is_set() and time.monotonic() < deadline and streak < STREAK:
                replies.append(await _invoke(http, url))
                streak = streak + 1 if until_version is not None and replies[-1][1] == until_version else 0

    await asyncio.gather(*(client(replies) for replies in streams))
    return streams


def _failed(streams: list[list[Reply]]) -> list[Reply]:
    return [r for replies in streams for r in replies if r[0] != 200 or r[2]]


async def test_policy_edit_under_load_rolls_to_a_new_version_with_no_failed_request(dev: Dev, tmp_path: Path) -> None:
    stop = asyncio.Event()
    load = asyncio.create_task(_load(dev.url, stop=stop, until_version="2"))
    await asyncio.sleep(1.0)
    started = time.monotonic()
    (tmp_path / "policy.yaml").write_text(POLICY.format(tmp_size_mib=32))
    try:
        await asyncio.to_thread(dev.wait_for, r"Version 2 of default/greet: loading", 30)
        await asyncio.to_thread(dev.wait_for, r"Version 2 of default/greet: Ready", 45)
    except BaseException:
        stop.set()
        raise
    finally:
        streams = await load  # bounded: it ends by itself
    replies = [r for stream in streams for r in stream]
    moved_s = time.monotonic() - started
    print(f"{len(replies)} calls, {sum(r[1] == '2' for r in replies)} on Version 2; edit to end {moved_s:.1f} s")
    assert _failed(streams) == [], f"{len(_failed(streams))} of {len(replies)} failed, e.g. {_failed(streams)[:3]}"
    assert all(r[3] == {"version": r[1]} for r in replies)  # each answer came from the Version it names
    assert all(stream and stream[0][1] == "1" for stream in streams), "the load ran before the edit"
    assert {r[1] for r in replies} == {"1", "2"}
    for stream in streams:
        seen = [r[1] for r in stream]
        moved = seen.index("2")
        assert seen[moved:] == ["2"] * (len(seen) - moved), f"traffic went back to Version 1: {seen}"
        assert seen[-STREAK:] == ["2"] * STREAK, f"traffic did not end on Version 2: {seen[-STREAK:]}"


async def test_three_bad_edits_in_a_row_never_stop_the_old_version_serving(dev: Dev, tmp_path: Path) -> None:
    stop = asyncio.Event()
    load = asyncio.create_task(_load(dev.url, stop=stop))
    try:
        await asyncio.sleep(0.5)
        for number, module in ((2, "ember_missing_one"), (3, "ember_missing_two"), (4, "ember_missing_three")):
            (tmp_path / "greet.yaml").write_text(_function(_bad(module)))
            await asyncio.to_thread(
                dev.wait_for, rf"Version {number} of default/greet: FAILED: .*No module named '{module}'", 45
            )
        last_failed_at = time.monotonic()
        await asyncio.sleep(2.0)  # it keeps serving after the third
    finally:
        stop.set()
        streams = await load

    replies = [r for stream in streams for r in stream]
    print(f"{len(replies)} calls during three bad edits")
    assert _failed(streams) == [], f"{len(_failed(streams))} of {len(replies)} failed, e.g. {_failed(streams)[:3]}"
    assert {r[1] for r in replies} == {"1"}
    assert all(r[3] == {"version": "1"} for r in replies)
    for stream in streams:
        assert any(r[4] > last_failed_at for r in stream), "a client got no answer after the third bad edit"

    # A good edit after them still rolls out: the failed Versions hold nothing up.
    (tmp_path / "greet.yaml").write_text(_function(GOOD.replace('"version"', '"version_"')))
    dev.wait_for(r"Version 5 of default/greet: Ready", 45)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        status, version, error, body, _ = await _invoke(http, dev.url)
    assert (status, version, error, body) == (200, "5", "", {"version_": "5"})
