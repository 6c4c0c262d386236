"""Benchmark of the runtime agents (runtime-images/python/ember_agent, runtime-images/nodejs/agent.js).

    python bench/agent.py [--runs 15] [--invokes 3000] [--python PATH] [--node PATH] [--runsc PATH]

Prints one table: agent start to healthy (with `python3 -S -E -c pass` / `node -e 0` measured in
the same run as baselines), specialize of a hello module and of a module importing several
standard-library modules (with the bare import cost of those modules as baseline), invoke overhead
(HTTP round trip to the agent minus a bare in-process call of the same handler) p50/p99, and idle
RSS/PSS of the agent generic and specialized (agent + template + workers), and the cold start
from a warm pool: specialize of the hello module plus the first invoke on a generic agent (with a
second, warm invoke as baseline).  With --runsc (e.g. /usr/bin/runsc) the cold start of the Python
agent is also measured inside gVisor (`runsc --rootless --network=host do`), with
`runsc do python -S -E -c pass` as baseline.  Medians over --runs fresh agent processes.
The Python agent runs as its one-file build (runtime-images/python/bundle.py), as images and
local mode run it; two baselines show what that build saves: `import ember_agent` of the build and
of the package.  Everything runs on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY_DIR = ROOT / "runtime-images" / "python"
NODE_AGENT = ROOT / "runtime-images" / "nodejs" / "agent.js"

PY_HELLO = "def handler(event, context):\n    return {'hello': event.get('name', 'world')}\n"
JS_HELLO = "exports.handler = async (event) => ({ hello: event.name || 'world' });\n"
PY_STDLIB_IMPORTS = "import json, re, datetime, decimal, urllib.parse, collections, dataclasses, typing, base64, uuid"
PY_STDLIB = PY_STDLIB_IMPORTS + "\n\n" + PY_HELLO
JS_STDLIB = (
    "const crypto = require('crypto'); const url = require('url'); const util = require('util');\n"
    "const zlib = require('zlib'); const events = require('events'); const querystring = require('querystring');\n"
    + JS_HELLO
)


# ---------------------------------------------------------------------------------------------
# a tiny keep-alive HTTP client (raw socket: measures the agent, not a client library)


AUTH = f"Authorization: Bearer {secrets.token_urlsafe(32)}\r\n"  # as the activator sends (CONTRACT.md)


class Client:
    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def request(self, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
        # every agent request but a bare /healthz carries the token the first specialize bound
        head = f"{method} {path} HTTP/1.1\r\nHost: a\r\n{AUTH}Content-Length: {len(body)}\r\n\r\n".encode()
        self.sock.sendall(head + body)
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head_b, self.buf = self.buf.split(b"\r\n\r\n", 1)
        lines = head_b.split(b"\r\n")
        status = int(lines[0].split()[1])
        n = 0
        for line in lines[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                n = int(v)
        while len(self.buf) < n:
            self._fill()
        data, self.buf = self.buf[:n], self.buf[n:]
        return status, data

    def _fill(self) -> None:
        c = self.sock.recv(262144)
        if not c:
            raise ConnectionError("agent closed the connection")
        self.buf += c

    def close(self) -> None:
        self.sock.close()


# ---------------------------------------------------------------------------------------------
# processes


class AgentProc:
    def __init__(self, cmd: list[str], tmp: str) -> None:
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "EMBER_AGENT_PORT": "0",
            "EMBER_AGENT_HOST": "127.0.0.1",
            "TMPDIR": tmp,
        }
        self.t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().decode()
        if not line.startswith("EMBER_AGENT_LISTENING"):
            raise RuntimeError(f"agent did not start: {line!r}")
        self.port = int(line.split("port=")[1])
        # keep draining stdout so the agent never blocks on a full pipe
        self._drain = subprocess.Popen(["cat"], stdin=self.proc.stdout, stdout=subprocess.DEVNULL)
        self.proc.stdout.close()

    def healthy_after(self) -> float:
        """Seconds from spawn to the first 200 from /healthz."""
        while True:
            try:
                c = Client(self.port)
                status, _ = c.request("GET", "/healthz")
                c.close()
                if status == 200:
                    return time.perf_counter() - self.t0
            except OSError:
                pass
            time.sleep(0.0005)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        self._drain.wait(10)


def run_wall(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(d))
    out, todo = [pid], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def mem_kib(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in KiB."""
    rss = pss = 0
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Rss:"):
                    rss = int(line.split()[1])
                elif line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def tree_mem(pid: int, cat_pid: int | None = None) -> tuple[int, int, int, int]:
    """(agent RSS, sum RSS, sum PSS, processes) of the agent and its descendants."""
    pids = [p for p in descendants(pid) if p != cat_pid]
    mems = [mem_kib(p) for p in pids]
    return mems[0][0], sum(m[0] for m in mems), sum(m[1] for m in mems), len(pids)


def specialize_body(source: str, lang: str) -> bytes:
    return json.dumps(
        {
            "function": {"namespace": "bench", "name": "hello", "version": 1},
            "handler": "main.handler",
            "code": {"inline": source, "filename": "main.py" if lang == "python" else "main.js"},
            "codeHash": "sha256:" + "0" * 64,
        }
    ).encode()


# ---------------------------------------------------------------------------------------------
# measurements


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p / 100 * len(s)))]


def bench_lang(
    lang: str, cmd: list[str], runs: int, invokes: int, tmp: str, baselines: dict[str, list[str]]
) -> dict[str, str]:
    """Baselines are measured inside the same loop as the agent, so both see the same machine load."""
    r: dict[str, str] = {}
    start, spec_hello, spec_hello_agent, spec_std, spec_std_agent = [], [], [], [], []
    cold, second = [], []
    gen_mem, spec_mem = [], []
    hello = PY_HELLO if lang == "python" else JS_HELLO
    std = PY_STDLIB if lang == "python" else JS_STDLIB
    base: dict[str, list[float]] = {name: [] for name in baselines}
    for i in range(runs):
        for name, argv in baselines.items():
            base[name].append(run_wall(argv) * 1000)
        for which in ("hello", "std"):
            a = AgentProc(cmd, tmp)
            try:
                t = a.healthy_after()
                if which == "hello":
                    start.append(t * 1000)
                time.sleep(0.15 if lang == "python" else 0.4)  # let post-listen warm-up finish
                if which == "hello" and i < 5:
                    gen_mem.append(tree_mem(a.proc.pid, a._drain.pid))
                c = Client(a.port)
                t0 = time.perf_counter()
                status, body = c.request(
                    "POST", "/v1/specialize", specialize_body(hello if which == "hello" else std, lang)
                )
                dt = (time.perf_counter() - t0) * 1000
                assert status == 200, body
                agent_ms = json.loads(body)["durationMs"]
                (spec_hello if which == "hello" else spec_std).append(dt)
                (spec_hello_agent if which == "hello" else spec_std_agent).append(agent_ms)
                if which == "hello":
                    cold_ms, warm_ms = first_invokes(c, t0)
                    cold.append(cold_ms)
                    second.append(warm_ms)
                if which == "hello" and i < 5:
                    time.sleep(0.1)
                    spec_mem.append(tree_mem(a.proc.pid, a._drain.pid))
                c.close()
            finally:
                a.stop()
    r["start→healthy (ms)"] = f"{med(start):.1f}"
    for name, xs in base.items():
        r[f"baseline: {name} (ms)"] = f"{med(xs):.1f}"
    r["specialize hello (ms, client / agent)"] = f"{med(spec_hello):.2f} / {med(spec_hello_agent):.2f}"
    r["specialize stdlib-heavy (ms, client / agent)"] = f"{med(spec_std):.2f} / {med(spec_std_agent):.2f}"
    r["cold: specialize + first invoke (ms)"] = f"{med(cold):.2f}"
    r["baseline: second (warm) invoke (ms)"] = f"{med(second):.2f}"
    g = [statistics.median([m[k] for m in gen_mem]) for k in range(4)]
    s = [statistics.median([m[k] for m in spec_mem]) for k in range(4)]
    r["idle RSS generic (MiB, agent / all procs)"] = f"{g[0] / 1024:.1f} / {g[1] / 1024:.1f} ({int(g[3])}p)"
    r["idle PSS generic (MiB, all procs)"] = f"{g[2] / 1024:.1f}"
    r["idle RSS specialized (MiB, agent / all procs)"] = f"{s[0] / 1024:.1f} / {s[1] / 1024:.1f} ({int(s[3])}p)"
    r["idle PSS specialized (MiB, all procs)"] = f"{s[2] / 1024:.1f}"

    # invoke overhead
    a = AgentProc(cmd, tmp)
    try:
        a.healthy_after()
        c = Client(a.port)
        status, body = c.request("POST", "/v1/specialize", specialize_body(hello, lang))
        assert status == 200, body
        event = b'{"name":"bench"}'
        for _ in range(300):
            c.request("POST", "/v1/invoke", event)
        rtts = []
        for _ in range(invokes):
            t0 = time.perf_counter_ns()
            status, body = c.request("POST", "/v1/invoke", event)
            rtts.append((time.perf_counter_ns() - t0) / 1e6)
            if status != 200 or body != b'{"hello":"bench"}':
                raise RuntimeError(f"unexpected invoke answer {status} {body!r}")
        c.close()
    finally:
        a.stop()
    bare = bare_call_ms(lang, cmd)
    r["bare in-process call (ms)"] = f"{bare:.4f}"
    r["invoke round trip p50 / p99 (ms)"] = f"{pct(rtts, 50):.3f} / {pct(rtts, 99):.3f}"
    r["invoke overhead p50 / p99 (ms)"] = f"{pct(rtts, 50) - bare:.3f} / {pct(rtts, 99) - bare:.3f}"
    return r


def first_invokes(c: Client, t0: float) -> tuple[float, float]:
    """-> (ms from t0, the start of the specialize request, to the end of the first invoke; ms of
    a second invoke)."""
    status, body = c.request("POST", "/v1/invoke", b'{"name":"cold"}')
    t1 = time.perf_counter()
    if status != 200 or body != b'{"hello":"cold"}':
        raise RuntimeError(f"unexpected first invoke answer {status} {body!r}")
    status, body = c.request("POST", "/v1/invoke", b'{"name":"warm"}')
    t2 = time.perf_counter()
    if status != 200 or body != b'{"hello":"warm"}':
        raise RuntimeError(f"unexpected second invoke answer {status} {body!r}")
    return (t1 - t0) * 1000, (t2 - t1) * 1000


def bench_cold(cmd: list[str], runs: int, tmp: str, baseline: list[str]) -> dict[str, str]:
    """Cold start only (for the agent inside gVisor, where /proc memory figures would describe the
    sandbox's host processes, not the agent)."""
    start, spec_ms, cold, second, base = [], [], [], [], []
    for _ in range(runs):
        base.append(run_wall(baseline) * 1000)
        a = AgentProc(cmd, tmp)
        try:
            start.append(a.healthy_after() * 1000)
            time.sleep(1.0)  # the standby template and blank worker get ready
            c = Client(a.port)
            t0 = time.perf_counter()
            status, body = c.request("POST", "/v1/specialize", specialize_body(PY_HELLO, "python"))
            if status != 200:
                raise RuntimeError(f"specialize failed: {status} {body!r}")
            spec_ms.append((time.perf_counter() - t0) * 1000)
            cold_ms, warm_ms = first_invokes(c, t0)
            cold.append(cold_ms)
            second.append(warm_ms)
            c.close()
        finally:
            a.stop()
    return {
        "start→healthy (ms)": f"{med(start):.1f}",
        "baseline: runsc do python -S -E -c pass (ms)": f"{med(base):.1f}",
        "specialize hello (ms, client / agent)": f"{med(spec_ms):.2f} / -",
        "cold: specialize + first invoke (ms)": f"{med(cold):.2f}",
        "baseline: second (warm) invoke (ms)": f"{med(second):.2f}",
    }


def bare_call_ms(lang: str, cmd: list[str]) -> float:
    """Median time of calling the same handler in-process (the call alone: a conservative baseline,
    the agent's JSON decode/encode of the event and result counts as overhead)."""
    if lang == "python":
        code = (
            "import json, time\n" + PY_HELLO + "\n"
            'ev = b\'{"name":"bench"}\'\nts = []\n'
            "e = json.loads(ev)\n"
            "for i in range(20000):\n"
            "    t0 = time.perf_counter_ns(); handler(e, None); ts.append(time.perf_counter_ns() - t0)\n"
            "ts.sort(); print(ts[len(ts)//2] / 1e6)\n"
        )
        out = subprocess.run([cmd[0], "-c", code], check=True, capture_output=True, text=True).stdout
    else:
        code = (
            JS_HELLO.replace("exports.handler", "const handler")
            + "(async () => { const ts = []; const e = { name: 'bench' };\n"
            "for (let i = 0; i < 20000; i++) { const t0 = process.hrtime.bigint();"
            " await handler(e, {}); ts.push(Number(process.hrtime.bigint() - t0)); }\n"
            "ts.sort((a, b) => a - b); console.log(ts[ts.length >> 1] / 1e6); })();\n"
        )
        out = subprocess.run([cmd[0], "-e", code], check=True, capture_output=True, text=True).stdout
    return float(out.strip())


def python_agent_build(python: str) -> Path:
    """The one-file build of the Python agent, made (and compiled) by the interpreter that runs it."""
    done = subprocess.run(
        [python, "-S", "-E", str(PY_DIR / "bundle.py"), "--cached"], capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise SystemExit(f"bench: building the Python agent failed: {done.stderr.strip()}")
    return Path(done.stdout.strip())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--invokes", type=int, default=3000)
    ap.add_argument("--python", default=sys.executable, help="interpreter that runs the Python agent")
    ap.add_argument("--node", default=shutil.which("node"))
    ap.add_argument("--runsc", default=None, help="also measure the Python agent's cold start in gVisor")
    args = ap.parse_args()
    py = args.python
    pyver = subprocess.run(
        [py, "-c", "import sys; print(sys.version.split()[0])"], capture_output=True, text=True, check=True
    ).stdout.strip()
    py_agent = python_agent_build(py)
    import_agent = "import sys; sys.path.insert(0, sys.argv[1]); import ember_agent"
    with tempfile.TemporaryDirectory() as tmp:
        cols: dict[str, dict[str, str]] = {}
        col = bench_lang(
            "python",
            [py, "-S", "-E", str(py_agent)],
            args.runs,
            args.invokes,
            tmp,
            {
                "python -S -E -c pass": [py, "-S", "-E", "-c", "pass"],
                "python -c pass": [py, "-c", "pass"],
                "python -S -E -c '<stdlib imports>'": [py, "-S", "-E", "-c", PY_STDLIB_IMPORTS],
                "import ember_agent, one-file build": [py, "-S", "-E", "-c", import_agent, str(py_agent.parent)],
                "import ember_agent, package": [py, "-S", "-E", "-c", import_agent, str(PY_DIR)],
            },
        )
        cols[f"python {pyver}"] = col
        if args.runsc:
            runsc = [args.runsc, "--rootless", "--network=host", "do"]
            cols[f"python {pyver} in gVisor"] = bench_cold(
                [*runsc, py, "-S", "-E", str(py_agent)], args.runs, tmp, [*runsc, py, "-S", "-E", "-c", "pass"]
            )
        if args.node:
            nodever = subprocess.run(
                [args.node, "--version"], capture_output=True, text=True, check=True
            ).stdout.strip()
            cols[f"node {nodever}"] = bench_lang(
                "node",
                [args.node, str(NODE_AGENT)],
                args.runs,
                args.invokes,
                tmp,
                {"node -e 0": [args.node, "-e", "0"]},
            )
    targets = {
        "start→healthy (ms)": "≤ 60 (py)",
        "specialize hello (ms, client / agent)": "≤ 5",
        "invoke overhead p50 / p99 (ms)": "p50 ≤ 0.5",
        "cold: specialize + first invoke (ms)": "≤ 20 (py, gVisor)",
        "idle RSS generic (MiB, agent / all procs)": "≤ 15 (py)",
    }
    rows = list(dict.fromkeys(k for c in cols.values() for k in c))
    names = list(cols)
    w0 = max(len(r) for r in rows)
    widths = [max(len(n), *(len(cols[n].get(r, "")) for r in rows)) for n in names]
    print(
        f"load average at end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs; medians of {args.runs} runs,"
        f" {args.invokes} invokes"
    )
    header = (
        f"{'metric'.ljust(w0)} | " + " | ".join(n.ljust(w) for n, w in zip(names, widths, strict=True)) + " | target"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        print(
            f"{row.ljust(w0)} | "
            + " | ".join(cols[n].get(row, "-").ljust(w) for n, w in zip(names, widths, strict=True))
            + f" | {targets.get(row, '')}"
        )


if __name__ == "__main__":
    main()
