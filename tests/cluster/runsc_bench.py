"""Measure gVisor start-up on this machine: `runsc do` with each runsc build and platform.

`python -m tests.cluster bench-runsc` prints a table of medians (seconds) for `true` and for a Python
interpreter start, with the same command run unsandboxed as the baseline, all measured in the same run.
A candidate that fails (Debian's 2022 runsc has no systrap) is reported as failing, not hidden.
"""

from __future__ import annotations

import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .build import ensure_gvisor

COMMANDS = {
    "true": ["true"],
    "python -c pass": [sys.executable, "-c", "pass"],
    'python -c "import asyncio, json"': [sys.executable, "-c", "import asyncio, json"],
}


@dataclass(frozen=True, kw_only=True)
class Candidate:
    label: str
    argv: list[str]


def candidates() -> list[Candidate]:
    built = ensure_gvisor()["runsc"]
    found = [
        Candidate(label="unsandboxed (baseline)", argv=[]),
        Candidate(label=f"built runsc, systrap ({built.parent.name})", argv=[str(built), "--platform=systrap"]),
        Candidate(label=f"built runsc, ptrace ({built.parent.name})", argv=[str(built), "--platform=ptrace"]),
    ]
    debian = shutil.which("runsc") or "/usr/bin/runsc"
    if Path(debian).exists():
        found += [
            Candidate(label="Debian runsc, ptrace", argv=[debian, "--platform=ptrace"]),
            Candidate(label="Debian runsc, systrap", argv=[debian, "--platform=systrap"]),
        ]
    return found


def _time_once(argv: list[str]) -> float | None:
    started = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, timeout=60, check=False)
    elapsed = time.perf_counter() - started
    return elapsed if result.returncode == 0 else None


def measure(candidate: Candidate, command: list[str], runs: int) -> str:
    argv = [*candidate.argv, "--network=none", "do", *command] if candidate.argv else command
    samples = []
    for _ in range(runs):
        elapsed = _time_once(argv)
        if elapsed is None:
            return "fails"
        samples.append(elapsed)
    return f"{statistics.median(samples):.3f}"


def main(runs: int = 7) -> None:
    rows = [(c.label, [measure(c, cmd, runs) for cmd in COMMANDS.values()]) for c in candidates()]
    width = max(len(label) for label, _ in rows)
    print(f"median of {runs} runs, seconds")
    print(f"{'runsc':<{width}}  " + "  ".join(f"{name:>15}" for name in COMMANDS))
    for label, values in rows:
        print(f"{label:<{width}}  " + "  ".join(f"{v:>15}" for v in values))
