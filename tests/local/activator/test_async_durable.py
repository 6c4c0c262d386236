"""Accepted is kept: `ember dev` SIGKILLed with 1,000 accepted asynchronous invocations not yet
run; after a restart on the same folder every one of them runs, and none is lost.

The Function is slow when the events are accepted (one at a time, a minute each: almost all of
them wait in the store when the kill comes). Before the restart its code changes: events name a
Function, not a Version, so they run on the new code, which answers at once. Every request id
the 202s gave must then report `succeeded` with the new code's answer for its own payload.
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import aiohttp
import pytest
from tests.local.activator.test_devmode import dev_in

pytestmark = pytest.mark.timeout(420)

EVENTS = 1000

MANIFEST = """
apiVersion: ember.run/v1alpha1
kind: Function
metadata:
  name: work
spec:
  runtime: python3.12
  handler: main.handler
  timeoutSeconds: 120
  scaling: {maxScale: 2}
  code:
    inline: |
      import time
      def handler(event, context):
          BODY
"""
SLOW = "time.sleep(60); return {'slow': event['n']}"
FAST = "return {'fast': event['n']}"


async def _enqueue(http: aiohttp.ClientSession, url: str, n: int) -> str:
    async with http.post(
        f"{url}/v1/namespaces/default/functions/work/invoke",
        json={"n": n},
        headers={"X-Ember-Invocation-Type": "async"},
    ) as response:
        assert response.status == 202, await response.text()
        return str((await response.json())["requestId"])


async def _accept_all(url: str) -> list[str]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=32)) as http:
        return list(await asyncio.gather(*(_enqueue(http, url, n) for n in range(EVENTS))))


async def _results(url: str, ids: list[str], timeout_s: float) -> dict[str, dict[str, object]]:
    done: dict[str, dict[str, object]] = {}
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as http:
        while len(done) < len(ids) and time.monotonic() < deadline:
            for rid in [r for r in ids if r not in done]:
                async with http.get(f"{url}/v1/invocations/{rid}") as response:
                    status = await response.json()
                if status.get("state") == "succeeded":
                    done[rid] = status
            if len(done) < len(ids):
                await asyncio.sleep(0.5)
    return done


def test_a_sigkill_loses_no_accepted_event(tmp_path: Path) -> None:
    manifest = tmp_path / "work.yaml"
    manifest.write_text(MANIFEST.replace("BODY", SLOW))
    runs = dev_in(tmp_path)
    first = next(runs)
    first.wait_for(r"Version 1 of default/work: Ready")
    started = time.monotonic()
    ids = asyncio.run(_accept_all(first.url))
    accepted_s = time.monotonic() - started
    assert len(set(ids)) == EVENTS
    first.proc.send_signal(signal.SIGKILL)  # no drain, no cleanup: the store's file is all there is
    first.proc.wait(timeout=10)
    runs.close()
    assert (tmp_path / ".ember" / "async.db").exists()

    manifest.write_text(MANIFEST.replace("BODY", FAST))
    again = dev_in(tmp_path)
    second = next(again)
    try:
        second.wait_for(r"Version 1 of default/work: Ready")
        done = asyncio.run(_results(second.url, ids, timeout_s=240))
        lost = [rid for rid in ids if rid not in done]
        assert lost == [], f"{len(lost)} of {EVENTS} accepted events never succeeded after the restart"
        for n, rid in enumerate(ids):
            assert done[rid]["result"] == {"fast": n}, done[rid]
    finally:
        again.close()
    print(f"{EVENTS} events accepted in {accepted_s:.2f} s before the kill; all ran after the restart")


SNOOP = """
apiVersion: ember.run/v1alpha1
kind: Function
metadata:
  name: snoop
spec:
  runtime: python3.12
  handler: main.handler
  code:
    inline: |
      import os
      def handler(event, context):
          out = {}
          for path in event["paths"]:
              try:
                  with open(path, "rb") as f:
                      out[path] = "read %d bytes" % len(f.read())
              except OSError as err:
                  out[path] = type(err).__name__
          try:
              out["listing"] = os.listdir(event["dir"])
          except OSError as err:
              out["listing"] = type(err).__name__
          return out
"""


def test_a_function_cannot_read_the_queued_events_of_others(tmp_path: Path) -> None:
    """The store holds every function's queued payloads: it is in DIR/.ember, which no sandbox sees."""
    (tmp_path / "snoop.yaml").write_text(SNOOP)
    runs = dev_in(tmp_path)
    dev = next(runs)
    try:
        dev.wait_for(r"Version 1 of default/snoop: Ready")
        state = tmp_path / ".ember"
        paths = [str(state / "async.db"), str(state / "async.db-wal"), str(state / "async.db.lock")]
        payload = {"paths": paths, "dir": str(state)}

        async def call() -> dict[str, object]:
            async with aiohttp.ClientSession() as http:
                invoke = f"{dev.url}/v1/namespaces/default/functions/snoop/invoke"
                async with http.post(invoke, json=payload) as rsp:
                    assert rsp.status == 200
                    return dict(await rsp.json())

        seen = asyncio.run(call())
        assert (state / "async.db").exists()  # it is there on the host
        assert all(seen[p] in ("FileNotFoundError", "PermissionError") for p in paths), seen
        assert seen["listing"] in ("FileNotFoundError", "PermissionError"), seen
    finally:
        runs.close()
