"""Benchmark of durable asynchronous invocations and event sources: how fast events are stored
(the 202 waits for it), against the ceilings measured in the same run, and how soon a stored
event or a queued message starts.

    python bench/async_invocations.py            # about a minute
    python bench/async_invocations.py --quick    # fewer events

1. Enqueue rate of the event stores (`ember.sources`), in this process, many puts in flight:
   - SQLite (WAL, synchronous FULL) with group commit, against the same store fed one put at a
     time (one commit, one fsync each: what it would do without group commit);
   - Redis Streams against a real `redis-server` (AOF, `appendfsync always`, as the chart runs
     it), against `redis-benchmark`'s pipelined `XADD` rate on the same server: the ceiling.
2. End to end in local mode (`ember dev`, the best sandbox here: gVisor): event-to-start latency
   (from the store's `enqueuedAt` to the handler's first line, read back from its result) at a
   steady 50 events/s, p50 and p99; then the rate of 202s over HTTP (64 connections, a client
   process of its own) against the same activator's dry-run rate (the HTTP path without the
   store: the ceiling), for a burst whose events run meanwhile (every core is shared with the
   sandboxes running them) and for one whose Function takes them slowly (`maxScale: 1`, 1 s
   each: the enqueue path alone); then the event-to-start latency again, beside that slow
   Function's backlog (parked in the store: it holds one worker, not all of them).

3. An event source on a real redis-server at a steady 50 messages/s: message-added to
   invocation-start (`ember_event_source_delay_seconds`), as histogram bounds; then a backlog
   of 10,000 messages drained by a Function with maxScale 2: the rate, and the most invocations
   running or queued on it at any /metrics sample (rate matching keeps it at 2).

Targets (issue #13): enqueue >= 2,000 events/s with SQLite and with Redis; event-to-start p99
<= 100 ms at steady state.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))
sys.path.insert(0, str(ROOT))

from tests.local.sources.brokers import redis_server  # noqa: E402

from ember.sources.redis_streams import RedisStore  # noqa: E402
from ember.sources.sqlite import SqliteStore  # noqa: E402
from ember.sources.store import Event, EventStore  # noqa: E402


def _events(n: int, tag: str) -> list[Event]:
    now = time.time()
    return [Event(f"{tag}-{i}", "default", "fn", None, b'{"order": %d}' % i, now) for i in range(n)]


async def _rate(store: EventStore, events: list[Event], in_flight: int) -> float:
    await store.start()
    try:
        started = time.perf_counter()
        if in_flight == 1:
            for event in events:
                await store.put(event)
        else:
            gate = asyncio.Semaphore(in_flight)

            async def one(event: Event) -> None:
                async with gate:
                    await store.put(event)

            await asyncio.gather(*(one(e) for e in events))
        return len(events) / (time.perf_counter() - started)
    finally:
        await store.close()


def redis_benchmark_xadd(port: int, n: int) -> float:
    binary = shutil.which("redis-benchmark")
    if binary is None:
        raise RuntimeError("redis-benchmark is not installed (apt-get install redis-tools)")
    out = subprocess.run(
        [binary, "-p", str(port), "-n", str(n), "-c", "50", "-P", "16", "-q", "XADD", "bench:ceiling", "*", "d", "x"],
        capture_output=True,
        text=True,
        check=True,
        timeout=300,
    ).stdout
    found = re.search(r"([\d.]+) requests per second", out)
    if not found:
        raise RuntimeError(f"redis-benchmark said: {out!r}")
    return float(found.group(1))


HANDLER = """
import time
def handler(event, context):
    if event.get("hold"):
        time.sleep(1)
    return {"started": time.time(), "n": event["n"]}
"""

HAMMER = """
import asyncio, sys, time, aiohttp
async def main(url, kind, n, hold):
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as http:
        async def one(i):
            body = {"n": i, "hold": hold == "1"}
            async with http.post(url, json=body, headers={"X-Ember-Invocation-Type": kind}) as r:
                assert r.status in (202, 204), await r.text()
        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(n)))
        print(n / (time.perf_counter() - started))
asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]))
"""


async def _hammer(url: str, kind: str, n: int, hold: bool) -> float:
    """Requests per second from a client process of its own (so it does not share this event loop)."""
    client = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HAMMER, url, kind, str(n), "1" if hold else "0", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await client.communicate()
    if client.returncode != 0:
        raise RuntimeError(f"the client failed ({client.returncode})")
    return float(out.decode().strip())


@contextlib.asynccontextmanager
async def ember_dev(manifests: str, ready: int) -> AsyncIterator[tuple[str, str]]:
    """`ember dev` (a process of its own) on `manifests` in a temporary folder, until `ready`
    Versions said Ready: yields its URL and sandbox; stopped with Ctrl-C (killed if it lingers)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "operator")}
    with tempfile.TemporaryDirectory(prefix="ember-bench-async-") as folder:
        await asyncio.to_thread(Path(folder, "bench.yaml").write_text, manifests)
        dev = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "ember.cli", "dev", folder, "--port", "0", "--no-watch",
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env,
        )  # fmt: skip
        try:
            assert dev.stdout is not None
            url, sandbox, seen = "", "", 0
            while not (url and seen >= ready):
                line = (await asyncio.wait_for(dev.stdout.readline(), 120)).decode()
                if not line:
                    raise RuntimeError("ember dev exited")
                if "sandbox:" in line:
                    sandbox = line.split("sandbox:", 1)[1].strip()
                if m := re.search(r"activator on (http://\S+)", line):
                    url = m.group(1)
                seen += ": Ready" in line
            yield url, sandbox
        finally:
            dev.send_signal(2)
            try:
                await asyncio.wait_for(dev.wait(), 30)
            except TimeoutError:
                dev.kill()


async def end_to_end(n_burst: int, seconds: float) -> tuple[str, dict[str, float], dict[str, list[float]]]:
    code = textwrap.indent(HANDLER, "      ")
    manifests = "\n---\n".join(
        "apiVersion: ember.run/v1alpha1\nkind: Function\n"
        f"metadata: {{name: {name}}}\nspec:\n  runtime: python3.12\n  handler: main.handler\n  {scaling}\n"
        f"  code:\n    inline: |\n{code}"
        for name, scaling in (("sink", "scaling: {minScale: 2}"), ("held", "scaling: {maxScale: 1}"))
    )
    async with ember_dev(manifests, ready=2) as (url, sandbox):
        sink = f"{url}/v1/namespaces/default/functions/sink/invoke"
        async with aiohttp.ClientSession() as http:

            async def post(n: int) -> str:
                body = {"n": n}
                async with http.post(sink, json=body, headers={"X-Ember-Invocation-Type": "async"}) as rsp:
                    assert rsp.status == 202, await rsp.text()
                    return str((await rsp.json())["requestId"])

            async def steady() -> list[float]:
                """Event-to-start delays of sink's events at 50 events/s."""
                ids: list[str] = []
                begin = time.perf_counter()
                for i in range(int(seconds * 50)):
                    await asyncio.sleep(max(0.0, begin + i / 50 - time.perf_counter()))
                    ids.append(await post(i))
                return [s["result"]["started"] - s["enqueuedAt"] for s in await _drained(http, url, ids)]

            delays = {"quiet": await steady()}
            held = f"{url}/v1/namespaces/default/functions/held/invoke"
            rates = {"dry-run": await _hammer(sink, "dry-run", n_burst, False)}
            rates["running"] = await _hammer(sink, "async", n_burst, False)
            await _ran(url, "default/sink", len(delays["quiet"]) + n_burst)  # a quiet machine for the next burst
            rates["held"] = await _hammer(held, "async", n_burst, True)  # held's events wait, one runs at a time
            delays["beside a backlog"] = await steady()  # sink's events beside held's backlog
        return sandbox, rates, delays


async def source_delay(redis_url: str, seconds: float) -> tuple[int, dict[float, float]]:
    """An event source at 50 messages/s: the histogram of message-added to invocation-start."""
    import redis.asyncio as aioredis

    code = textwrap.indent("def handler(event, context):\n    return {'batchItemFailures': []}\n", "      ")
    manifests = (
        "apiVersion: ember.run/v1alpha1\nkind: Function\nmetadata: {name: consumer}\nspec:\n"
        "  runtime: python3.12\n  handler: main.handler\n  scaling: {minScale: 2}\n"
        "  eventSources: [{name: feed, type: redis-stream, connectionSecretRef: {name: q}, stream: feed}]\n"
        f"  code:\n    inline: |\n{code}\n---\n"
        f"apiVersion: v1\nkind: Secret\nmetadata: {{name: q}}\nstringData: {{url: '{redis_url}'}}\n"
    )
    producer = aioredis.Redis.from_url(redis_url)
    try:
        async with ember_dev(manifests, ready=1) as (url, _):
            await producer.xadd("feed", {"body": '{"n": -1, "warm": true}'})
            await _ran(url, "default/consumer", 1)
            count = int(seconds * 50)
            begin = time.perf_counter()
            for i in range(count):
                await asyncio.sleep(max(0.0, begin + i / 50 - time.perf_counter()))
                await producer.xadd("feed", {"body": f'{{"n": {i}}}'})
            await _ran(url, "default/consumer", count + 1)
            async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics") as rsp:
                text = await rsp.text()
    finally:
        await producer.aclose()
    acked = sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("ember_event_source_messages_total{") and 'outcome="acked"' in line
    )
    if acked < count + 1:
        raise RuntimeError(f"only {acked:.0f} of {count + 1} messages were acked")
    buckets: dict[float, float] = {}
    for line in text.splitlines():
        if line.startswith("ember_event_source_delay_seconds_bucket{"):
            bound = re.search(r'le="([^"]+)"', line)
            if bound and bound.group(1) != "+Inf":
                buckets[float(bound.group(1))] = float(line.rsplit(" ", 1)[1])
    return count + 1, buckets


async def backlog_drain(redis_url: str, messages: int) -> tuple[float, float, float]:
    """A backlog of `messages` for a Function with maxScale 2 (concurrency 1): how fast it drains,
    and the most invocations running or queued on it at any sample (rate matching: at most 2)."""
    import redis.asyncio as aioredis

    code = textwrap.indent("def handler(event, context):\n    return {}\n", "      ")
    manifests = (
        "apiVersion: ember.run/v1alpha1\nkind: Function\nmetadata: {name: drain}\nspec:\n"
        "  runtime: python3.12\n  handler: main.handler\n  scaling: {maxScale: 2}\n"
        "  eventSources: [{name: backlog, type: redis-stream, connectionSecretRef: {name: q}, stream: backlog,"
        " batchSize: 10}]\n"
        f"  code:\n    inline: |\n{code}\n---\n"
        f"apiVersion: v1\nkind: Secret\nmetadata: {{name: q}}\nstringData: {{url: '{redis_url}'}}\n"
    )
    producer = aioredis.Redis.from_url(redis_url)
    for start in range(0, messages, 1000):
        async with producer.pipeline(transaction=False) as pipe:
            for n in range(start, min(messages, start + 1000)):
                pipe.xadd("backlog", {"body": f'{{"n": {n}}}'})
            await pipe.execute()
    most = 0.0
    try:
        async with ember_dev(manifests, ready=0) as (url, _):
            started = time.perf_counter()
            async with aiohttp.ClientSession() as http:
                while True:
                    async with http.get(f"{url}/metrics") as rsp:
                        text = await rsp.text()
                    load = acked = 0.0
                    for line in text.splitlines():
                        value = line.rsplit(" ", 1)[-1]
                        if line.startswith(("ember_in_flight{", "ember_queue_depth{")) and "default/drain" in line:
                            load += float(value)
                        elif line.startswith("ember_event_source_messages_total{") and 'outcome="acked"' in line:
                            acked += float(value)
                    most = max(most, load)
                    if acked >= messages:
                        break
                    if time.perf_counter() - started > 600:
                        raise RuntimeError(f"only {acked:.0f} of {messages} drained in 600 s")
                    await asyncio.sleep(0.05)
            took = time.perf_counter() - started
    finally:
        await producer.aclose()
    return took, messages / took, most


def bucket_quantile(buckets: dict[float, float], total: int, q: float) -> float:
    """The smallest histogram bound holding the q-th quantile (an upper bound of it)."""
    for bound in sorted(buckets):
        if buckets[bound] >= q / 100 * total:
            return bound
    return float("inf")


async def _ran(url: str, function: str, count: int) -> None:
    """Wait until the activator has run `count` invocations of the function (its /metrics)."""
    deadline = time.monotonic() + 300
    async with aiohttp.ClientSession() as http:
        while time.monotonic() < deadline:
            async with http.get(f"{url}/metrics") as rsp:
                text = await rsp.text()
            total = sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("ember_invocations_total{") and f'function="{function}"' in line
            )
            if total >= count:
                return
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{function} did not run {count} invocations")


async def _drained(http: aiohttp.ClientSession, url: str, ids: list[str]) -> list[dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 300
    while len(out) < len(ids):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{len(ids) - len(out)} events did not run")
        for rid in [r for r in ids if r not in out]:
            async with http.get(f"{url}/v1/invocations/{rid}") as rsp:
                status = await rsp.json()
            if status.get("state") == "succeeded":
                out[rid] = status
            elif status.get("state") == "failed":
                raise RuntimeError(f"event {rid} failed: {status}")
        await asyncio.sleep(0.2)
    return [out[r] for r in ids]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


async def main_async(quick: bool) -> int:
    n = 4_000 if quick else 20_000
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="ember-bench-stores-") as folder:  # on a disk: fsyncs cost here
        few = min(n, 2_000)
        one = await _rate(SqliteStore(Path(folder, "one.db")), _events(few, "one"), in_flight=1)
        rows.append(("sqlite, one put at a time (a commit each): baseline", one))
        grouped = await _rate(SqliteStore(Path(folder, "g.db")), _events(n, "g"), 256)
        rows.append(("sqlite, 256 puts in flight (group commit)", grouped))
        with redis_server(Path(folder, "redis")) as redis:
            ceiling = redis_benchmark_xadd(redis.port, n * 5)
            rows.append(("redis-benchmark XADD, 50 clients x 16 pipelined: ceiling", ceiling))
            rows.append(
                ("redis store, one put at a time", await _rate(RedisStore(redis.url, "one"), _events(few, "o"), 1))
            )
            many = await _rate(RedisStore(redis.url, "many"), _events(n, "r"), 256)
            rows.append(("redis store, 256 puts in flight (pipelined)", many))
    print(f"event store enqueue rate, durable before the reply ({n} events; sqlite synchronous FULL, "
          "redis appendfsync always)")  # fmt: skip
    print(f"{'store':<62} {'events/s':>10}")
    for label, rate in rows:
        print(f"{label:<62} {rate:>10.0f}")
    sandbox, rates, delays = await end_to_end(1_000 if quick else 5_000, 5.0 if quick else 20.0)
    print()
    print(f"end to end in local mode ({sandbox or 'sandbox unknown'})")
    print(f"{'measure':<62} {'value':>10}")
    for when, values in delays.items():
        print(f"{f'event-to-start p50 ms, 50 events/s, {when}':<62} {pct(values, 50) * 1000:>10.1f}")
        print(f"{f'event-to-start p99 ms, 50 events/s, {when} (<= 100)':<62} {pct(values, 99) * 1000:>10.1f}")
    print(f"{'dry-run replies per second (the HTTP path, no store): ceiling':<62} {rates['dry-run']:>10.0f}")
    print(f"{'async 202s per second, events held back (maxScale 1)':<62} {rates['held']:>10.0f}")
    print(f"{'async 202s per second, events running meanwhile':<62} {rates['running']:>10.0f}")
    backlog = 2_000 if quick else 10_000
    with tempfile.TemporaryDirectory(prefix="ember-bench-redis-") as folder, redis_server(Path(folder)) as redis:
        total, buckets = await source_delay(redis.url, 5.0 if quick else 20.0)
        took, rate, most = await backlog_drain(redis.url, backlog)
    p50, p99 = (bucket_quantile(buckets, total, q) * 1000 for q in (50, 99))
    print()
    print(f"event source (Redis Streams, batchSize 1) at 50 messages/s, {total} messages (histogram bounds)")
    print(f"{'measure':<62} {'value':>10}")
    print(f"{'message-to-start p50 ms, at most':<62} {p50:>10.1f}")
    print(f"{'message-to-start p99 ms, at most (target <= 100)':<62} {p99:>10.1f}")
    print()
    print(f"a backlog of {backlog} messages, batchSize 10, for a Function with maxScale 2 (concurrency 1)")
    print(f"{'measure':<62} {'value':>10}")
    print(f"{'seconds to drain (ember dev start included)':<62} {took:>10.1f}")
    print(f"{'messages per second':<62} {rate:>10.0f}")
    print(f"{'most invocations running or queued at a sample (limit 2)':<62} {most:>10.0f}")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer events")
    return asyncio.run(main_async(parser.parse_args().quick))


if __name__ == "__main__":
    sys.exit(main())
