"""Trace replay of the keep-alive policies: cold starts and idle memory-time of four policies, one trace.

    python bench/replay.py                          # synthetic Azure-like trace, seed 1: ~1M invocations
    python bench/replay.py --seed 7 --functions 500 --hours 24
    python bench/replay.py --write-trace t.csv      # the same run, and the trace written out
    python bench/replay.py --trace t.csv            # replay a trace file (the format below)

It drives the real policy classes of `ember.scaling.predictor` (the code the live scaler runs)
with a simulated clock, and prints one table: per policy, the cold-start percentage overall and per
pattern class, the idle memory-time in GiB·s, and for the periodic functions (classes `timer` and
`multi-timer`) the ratios to fixed keep-alive and to the hybrid histogram; then the replay's wall
time and rate, and whether the targets of issue #14 are met.

The policies: fixed 10-minute keep-alive (Lambda), scale to zero after 60 s idle (Knative's
default), the hybrid histogram of "Serverless in the Wild" (Shahrad et al., USENIX ATC 2020; the
anchor) and Ember's predictor.

## Simulation model

Each function is replayed on its own, its invocations in time order, each with an arrival time, a
duration and a memory size, against one instance:

- An invocation that arrives while the instance is executing (the previous one has not ended: an
  overlap) is warm; it extends the busy period to the later of the two ends. The policy is told of
  the arrival that starts a busy period (`invoked(at)`), and asked for a plan when it ends: what
  the live scaler's `Forecast` does (a Function busy without pause is one long invocation).
- When the busy period ends at `idle_from`, the policy's `plan(idle_from)` gives the windows in
  which the instance is kept warm. The next arrival is warm if it falls inside one of them
  (`start <= at < end`), otherwise it is a cold start. The first invocation of a function is cold.
  Asking for the plan lazily, at the next arrival, is the same as asking at `idle_from`: the
  policy sees nothing in between.
- Idle memory-time is the instance's memory times the length of the plan's windows intersected
  with `[idle_from, next arrival)`, and after the last invocation with `[idle_from, end of trace)`.
  Busy time is not idle time. The instance's memory is the largest of its busy period's
  invocations (a synthetic function has one size). The trace ends when its last invocation ends.
- Start-up time is ignored: a window that has begun is a warm instance (Ember's `Predictor` opens
  its windows `lead_s` early to pay for its start-up; that shows up here as memory-time).

Cold-start percentages are cold starts over invocations, summed over the functions of a class
(not a mean of per-function percentages).

## Trace format

CSV with a header line naming the columns, `function,timestamp_s[,duration_ms,memory_mib]`, plus
an optional `class` (the pattern class, for per-class rows); columns in any order, rows in any
order (each function's rows are sorted by time). An absent column or an empty field means
`duration_ms` 100 and `memory_mib` 128. `timestamp_s` and `duration_ms` must be finite and not
negative, `memory_mib` positive, `function` not empty, and a function keeps one class. A bad file
stops the run with its name, line and problem: `t.csv:7: timestamp_s 'x' is not a number`. A
trace without a `class` column is reported overall only.

## Synthetic traces

Without `--trace`, a trace shaped like the Azure Functions 2019 trace (Shahrad et al.) is made from
`--seed`: `--functions` functions over `--hours`, each of one pattern class, drawn in proportion
timer 30 %, multi-timer 10 %, poisson 30 %, bursty 15 %, diurnal 15 %:

- `timer`: one period from {1, 5, 10, 15, 30, 60, 120, 240} min, a random phase, each run late by
  |N(0, sigma)| with sigma log-uniform in 0.1..2 s, each run skipped with a probability up to 5 %;
- `multi-timer`: two or three such timers of different periods (5 and 60 min, say);
- `poisson`: a rate log-uniform from 3 a day to 2 a minute;
- `bursty`: bursts of 10..200 invocations (log-uniform; gaps inside a burst exponential, mean
  0.05..5 s) separated by exponential idle gaps of mean 1..12 h;
- `diurnal`: Poisson whose rate follows a 24-hour sine (amplitude 50..95 % of its mean, mean rate
  log-uniform from 1 an hour to 2 a minute), by thinning.

Durations are log-normal: a per-function median log-normal around 1 s (sigma 1, 10 ms..60 s), each
invocation that median times a log-normal of sigma 0.5, at most 5 minutes. Memory per function is
128 · 8^(u²) MiB for u uniform in [0, 1): 128..1024 MiB, median ~215. Every function draws from its
own generator seeded with the seed and its index, so a seed always gives the same trace and
`--functions 100` is the first 100 functions of `--functions 2000`; functions that drew no
invocation are left out. Times are rounded to the millisecond, so `--write-trace` and `--trace`
replay to the same table.

## Speed

The four policies are replayed in parallel (`multiprocessing`, fork: the workers inherit the trace,
held in `array`s so that reading it does not copy it), each policy's functions split into chunks of
about equal invocations. The table's last rows give each policy's CPU time.
"""

from __future__ import annotations

import argparse
import csv
import math
import multiprocessing
import os
import random
import sys
import time
from array import array
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))

from ember.scaling.predictor import FixedKeepAlive, HybridHistogram, Policy, Predictor  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Traces

COLUMNS: Final = ("function", "timestamp_s", "duration_ms", "memory_mib", "class")
REQUIRED: Final = ("function", "timestamp_s")
FORMAT: Final = "function,timestamp_s[,duration_ms,memory_mib][,class]"
DEFAULT_DURATION_MS: Final = 100.0
DEFAULT_MEMORY_MIB: Final = 128.0

PATTERNS: Final = ("timer", "multi-timer", "poisson", "bursty", "diurnal")
PERIODIC: Final = frozenset({"timer", "multi-timer"})
UNCLASSIFIED: Final = "unclassified"


class TraceError(ValueError):
    """A trace file that cannot be read: the message names the file, the line and the problem."""


@dataclass(frozen=True, slots=True)
class FunctionTrace:
    """One function's invocations, in time order: arrival (s), duration (s), memory (MiB)."""

    name: str
    pattern: str | None
    arrivals_s: array[float]
    durations_s: array[float]
    memory_mib: array[float]


@dataclass(frozen=True, slots=True)
class Trace:
    """The functions of a trace and when it ends (its last invocation's end)."""

    functions: tuple[FunctionTrace, ...]
    end_s: float
    source: str

    @property
    def invocations(self) -> int:
        return sum(len(f.arrivals_s) for f in self.functions)


def _function(name: str, pattern: str | None, rows: list[tuple[float, float, float]]) -> FunctionTrace:
    rows.sort(key=lambda row: row[0])
    return FunctionTrace(
        name,
        pattern,
        array("d", (row[0] for row in rows)),
        array("d", (row[1] for row in rows)),
        array("d", (row[2] for row in rows)),
    )


def _trace(functions: Iterable[FunctionTrace], source: str) -> Trace:
    kept = tuple(f for f in functions if f.arrivals_s)
    end_s = max((max(a + d for a, d in zip(f.arrivals_s, f.durations_s, strict=True)) for f in kept), default=0.0)
    return Trace(kept, end_s, source)


def _number(text: str, column: str, where: str, *, positive: bool = False) -> float:
    try:
        value = float(text)
    except ValueError:
        raise TraceError(f"{where}: {column} {text.strip()!r} is not a number") from None
    if not math.isfinite(value):
        raise TraceError(f"{where}: {column} ({text.strip()}) must be a finite number")
    if positive and value <= 0:
        raise TraceError(f"{where}: {column} ({text.strip()}) must be positive")
    if value < 0:
        raise TraceError(f"{where}: {column} ({text.strip()}) must not be negative")
    return value


def parse_trace(lines: Iterable[str], *, source: str) -> Trace:
    """A trace from the lines of a CSV file (see the module docstring); `source` names it in errors."""
    reader = csv.reader(lines)
    try:
        header = next(reader, None)
        if header is None:
            raise TraceError(f"{source}: empty file; the first line must be the header {FORMAT}")
        columns = [c.strip() for c in header]
        for column in columns:
            if column not in COLUMNS:
                raise TraceError(
                    f"{source}:{reader.line_num}: unknown column {column!r} in the header"
                    f" (allowed: {', '.join(COLUMNS)}; the format is {FORMAT})"
                )
        for column in set(columns):
            if columns.count(column) > 1:
                raise TraceError(f"{source}:{reader.line_num}: column {column!r} appears twice in the header")
        for column in REQUIRED:
            if column not in columns:
                raise TraceError(f"{source}:{reader.line_num}: the header has no {column!r} column (format: {FORMAT})")
        width = len(columns)
        i_function = columns.index("function")
        i_timestamp = columns.index("timestamp_s")
        i_duration = columns.index("duration_ms") if "duration_ms" in columns else None
        i_memory = columns.index("memory_mib") if "memory_mib" in columns else None
        i_class = columns.index("class") if "class" in columns else None

        rows: dict[str, list[tuple[float, float, float]]] = {}
        classes: dict[str, str | None] = {}
        for row in reader:
            where = f"{source}:{reader.line_num}"
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != width:
                raise TraceError(f"{where}: {len(row)} fields where the header has {width} ({','.join(columns)})")
            name = row[i_function].strip()
            if not name:
                raise TraceError(f"{where}: the function name is empty")
            at = _number(row[i_timestamp], "timestamp_s", where)
            duration_ms = DEFAULT_DURATION_MS
            if i_duration is not None and row[i_duration].strip():
                duration_ms = _number(row[i_duration], "duration_ms", where)
            memory_mib = DEFAULT_MEMORY_MIB
            if i_memory is not None and row[i_memory].strip():
                memory_mib = _number(row[i_memory], "memory_mib", where, positive=True)
            pattern = (row[i_class].strip() or None) if i_class is not None else None
            if name not in rows:
                rows[name] = []
                classes[name] = pattern
            elif classes[name] != pattern:
                raise TraceError(
                    f"{where}: function {name!r} has class {pattern!r} here but {classes[name]!r} on an earlier line"
                )
            rows[name].append((at, duration_ms / 1000.0, memory_mib))
    except csv.Error as err:
        raise TraceError(f"{source}:{reader.line_num}: {err}") from err
    if not rows:
        raise TraceError(f"{source}: no invocations after the header")
    return _trace((_function(name, classes[name], fn_rows) for name, fn_rows in rows.items()), source)


def read_trace(path: Path) -> Trace:
    """The trace in the CSV file at `path`."""
    try:
        with path.open(newline="", encoding="utf-8") as file:
            return parse_trace(file, source=str(path))
    except OSError as err:
        raise TraceError(f"{path}: cannot read: {err.strerror or err}") from err
    except UnicodeDecodeError as err:
        raise TraceError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from err


def trace_lines(trace: Trace) -> Iterator[str]:
    """The trace as CSV lines (with a class column when the functions have classes): `parse_trace` reads them back."""
    with_class = any(f.pattern is not None for f in trace.functions)
    yield "function,timestamp_s,duration_ms,memory_mib" + (",class" if with_class else "") + "\n"
    for f in trace.functions:
        tail = f",{f.pattern or ''}\n" if with_class else "\n"
        for at, duration_s, memory in zip(f.arrivals_s, f.durations_s, f.memory_mib, strict=True):
            yield f"{f.name},{at!r},{round(duration_s * 1000.0, 3)!r},{memory:g}{tail}"


# ---------------------------------------------------------------------------------------------
# Synthetic traces (shaped like the Azure Functions 2019 trace; see the module docstring)

MIX: Final = (0.30, 0.10, 0.30, 0.15, 0.15)  # weights of PATTERNS
TIMER_PERIODS_MIN: Final = (1, 5, 10, 15, 30, 60, 120, 240)
DAY_S: Final = 86400.0


def _log_uniform(rng: random.Random, low: float, high: float) -> float:
    return math.exp(rng.uniform(math.log(low), math.log(high)))


def _timer_runs(rng: random.Random, horizon_s: float, period_s: float) -> list[float]:
    jitter_s = _log_uniform(rng, 0.1, 2.0)
    skip = rng.uniform(0.0, 0.05)
    runs: list[float] = []
    tick = rng.uniform(0.0, period_s)
    while tick < horizon_s:
        if rng.random() >= skip:
            runs.append(tick + abs(rng.gauss(0.0, jitter_s)))
        tick += period_s
    return runs


def _timer(rng: random.Random, horizon_s: float) -> list[float]:
    return _timer_runs(rng, horizon_s, 60.0 * rng.choice(TIMER_PERIODS_MIN))


def _multi_timer(rng: random.Random, horizon_s: float) -> list[float]:
    periods = rng.sample(TIMER_PERIODS_MIN, rng.choice((2, 3)))
    return [t for period in periods for t in _timer_runs(rng, horizon_s, 60.0 * period)]


def _poisson_runs(rng: random.Random, horizon_s: float, rate_per_s: float) -> list[float]:
    arrivals: list[float] = []
    t = rng.expovariate(rate_per_s)
    while t < horizon_s:
        arrivals.append(t)
        t += rng.expovariate(rate_per_s)
    return arrivals


def _poisson(rng: random.Random, horizon_s: float) -> list[float]:
    return _poisson_runs(rng, horizon_s, _log_uniform(rng, 3.0 / DAY_S, 2.0 / 60.0))


def _bursty(rng: random.Random, horizon_s: float) -> list[float]:
    gap_mean_s = _log_uniform(rng, 3600.0, 12 * 3600.0)
    size = round(_log_uniform(rng, 10.0, 200.0))
    inside_mean_s = _log_uniform(rng, 0.05, 5.0)
    arrivals: list[float] = []
    t = rng.uniform(0.0, gap_mean_s)
    while t < horizon_s:
        for _ in range(size):
            arrivals.append(t)
            t += rng.expovariate(1.0 / inside_mean_s)
        t += rng.expovariate(1.0 / gap_mean_s)
    return [a for a in arrivals if a < horizon_s]


def _diurnal(rng: random.Random, horizon_s: float) -> list[float]:
    mean_rate = _log_uniform(rng, 1.0 / 3600.0, 2.0 / 60.0)
    amplitude = rng.uniform(0.5, 0.95)
    phase = rng.uniform(0.0, 2 * math.pi)
    peak = mean_rate * (1 + amplitude)
    return [
        t
        for t in _poisson_runs(rng, horizon_s, peak)
        if rng.random() * peak < mean_rate * (1 + amplitude * math.sin(2 * math.pi * t / DAY_S + phase))
    ]


ARRIVALS: Final[dict[str, Callable[[random.Random, float], list[float]]]] = {
    "timer": _timer,
    "multi-timer": _multi_timer,
    "poisson": _poisson,
    "bursty": _bursty,
    "diurnal": _diurnal,
}


def synthetic_function(seed: int, index: int, horizon_s: float) -> FunctionTrace:
    """Function `index` of the synthetic trace of `seed` (its own generator: independent of the others)."""
    rng = random.Random(f"ember-replay:{seed}:{index}")
    pattern = rng.choices(PATTERNS, weights=MIX)[0]
    arrivals = sorted(round(t, 3) for t in ARRIVALS[pattern](rng, horizon_s))
    median_ms = min(60_000.0, max(10.0, rng.lognormvariate(math.log(1000.0), 1.0)))
    memory_mib = float(round(128 * 8 ** (rng.random() ** 2)))
    durations_s = array(
        "d", (round(min(300_000.0, median_ms * rng.lognormvariate(0.0, 0.5))) / 1000.0 for _ in arrivals)
    )
    return FunctionTrace(
        f"{pattern}-{index:05d}",
        pattern,
        array("d", arrivals),
        durations_s,
        array("d", [memory_mib]) * len(arrivals),
    )


def generate(*, seed: int, functions: int, hours: float) -> Trace:
    """The synthetic trace of `seed`: `functions` functions over `hours` (those without invocations left out)."""
    horizon_s = hours * 3600.0
    return _trace(
        (synthetic_function(seed, i, horizon_s) for i in range(functions)),
        f"synthetic, seed {seed}, {functions:,} functions over {hours:g} h",
    )


# ---------------------------------------------------------------------------------------------
# The simulation (pure: one policy, one function)


@dataclass(frozen=True, slots=True)
class Tally:
    """What a replay counted: invocations, cold starts, idle memory-time (MiB·s)."""

    invocations: int = 0
    cold: int = 0
    idle_mib_s: float = 0.0

    def __add__(self, other: Tally) -> Tally:
        return Tally(self.invocations + other.invocations, self.cold + other.cold, self.idle_mib_s + other.idle_mib_s)

    @property
    def cold_percent(self) -> float:
        return 100.0 * self.cold / self.invocations if self.invocations else 0.0

    @property
    def idle_gib_s(self) -> float:
        return self.idle_mib_s / 1024.0


def replay_function(policy: Policy, function: FunctionTrace, *, end_s: float) -> Tally:
    """One function's invocations against one instance kept by `policy` (the model: module docstring)."""
    arrivals = function.arrivals_s
    if not arrivals:
        return Tally()
    durations = function.durations_s
    memories = function.memory_mib
    invoked = policy.invoked
    plan = policy.plan
    cold = 1
    idle_mib_s = 0.0
    invoked(arrivals[0])
    busy_until = arrivals[0] + durations[0]
    memory = memories[0]
    for i in range(1, len(arrivals)):
        at = arrivals[i]
        if at < busy_until:  # the instance is executing: warm, and the busy period goes on
            end = at + durations[i]
            if end > busy_until:
                busy_until = end
            if memories[i] > memory:
                memory = memories[i]
            continue
        warm = False
        kept_s = 0.0
        for start, stop in plan(busy_until).windows:  # sorted and disjoint
            if start > at:
                break
            if at < stop:
                warm = True
            low = start if start > busy_until else busy_until
            high = stop if stop < at else at
            if high > low:
                kept_s += high - low
        idle_mib_s += memory * kept_s
        if not warm:
            cold += 1
        invoked(at)
        busy_until = at + durations[i]
        memory = memories[i]
    kept_s = 0.0
    for start, stop in plan(busy_until).windows:
        low = start if start > busy_until else busy_until
        high = stop if stop < end_s else end_s
        if high > low:
            kept_s += high - low
    return Tally(len(arrivals), cold, idle_mib_s + memory * kept_s)


# ---------------------------------------------------------------------------------------------
# Running the four policies (the I/O-free part ends at `replay`; workers are processes)

POLICIES: Final[tuple[tuple[str, Callable[[], Policy]], ...]] = (
    ("keep-alive 10 min", lambda: FixedKeepAlive(600.0)),
    ("scale to zero 60 s", lambda: FixedKeepAlive(60.0, name="scale to zero 60 s")),
    ("hybrid histogram", HybridHistogram),
    ("ember predictor", Predictor),
)
FIXED: Final = 0
HYBRID: Final = 2
EMBER: Final = 3


@dataclass(frozen=True, slots=True)
class PolicyResult:
    """One policy's replay of a trace: a tally per function (in the trace's order), CPU time spent."""

    label: str
    per_function: tuple[Tally, ...]
    cpu_s: float

    def by_class(self, trace: Trace) -> dict[str, Tally]:
        out: dict[str, Tally] = {}
        for function, tally in zip(trace.functions, self.per_function, strict=True):
            key = function.pattern or UNCLASSIFIED
            out[key] = out.get(key, Tally()) + tally
        return out


_SHARED: Trace | None = None  # the trace a forked worker replays (inherited, never pickled)


def _replay_chunk(task: tuple[int, tuple[int, ...]]) -> tuple[int, list[tuple[int, Tally]], float]:
    policy_index, indices = task
    trace = _SHARED
    assert trace is not None, "workers are forked after _SHARED is set"
    factory = POLICIES[policy_index][1]
    started = time.process_time()
    tallies = [(i, replay_function(factory(), trace.functions[i], end_s=trace.end_s)) for i in indices]
    return policy_index, tallies, time.process_time() - started


def _chunks(trace: Trace, count: int) -> list[tuple[int, ...]]:
    """The functions dealt into `count` chunks of about equal invocations (largest first, to the lightest)."""
    order = sorted(range(len(trace.functions)), key=lambda i: -len(trace.functions[i].arrivals_s))
    chunks: list[list[int]] = [[] for _ in range(count)]
    loads = [0] * count
    for i in order:
        lightest = loads.index(min(loads))
        chunks[lightest].append(i)
        loads[lightest] += len(trace.functions[i].arrivals_s)
    return [tuple(sorted(c)) for c in chunks if c]


def replay(trace: Trace, *, workers: int) -> list[PolicyResult]:
    """Every policy over every function of `trace`, in `workers` processes (1: in this one)."""
    global _SHARED
    chunks = _chunks(trace, max(1, 2 * workers))
    # The predictor is the slowest, the fixed keep-alives the fastest: longest first keeps the workers even.
    tasks = [(p, chunk) for p in (EMBER, HYBRID, FIXED, 1) for chunk in chunks]
    _SHARED = trace
    try:
        if workers == 1:
            done = [_replay_chunk(task) for task in tasks]
        else:
            with multiprocessing.get_context("fork").Pool(workers) as pool:
                done = list(pool.imap_unordered(_replay_chunk, tasks))
    finally:
        _SHARED = None
    per_function: list[list[Tally]] = [[Tally()] * len(trace.functions) for _ in POLICIES]
    cpu_s = [0.0] * len(POLICIES)
    for policy_index, tallies, spent in done:
        cpu_s[policy_index] += spent
        for i, tally in tallies:
            per_function[policy_index][i] = tally
    return [PolicyResult(label, tuple(per_function[p]), cpu_s[p]) for p, (label, _factory) in enumerate(POLICIES)]


# ---------------------------------------------------------------------------------------------
# The table and the targets (pure)


def _classes(trace: Trace) -> list[str]:
    present = {f.pattern or UNCLASSIFIED for f in trace.functions}
    return [p for p in PATTERNS if p in present] + sorted(present - set(PATTERNS))


def _periodic(by_class: dict[str, Tally]) -> Tally | None:
    parts = [tally for pattern, tally in by_class.items() if pattern in PERIODIC]
    return sum(parts, Tally()) if parts else None


def _ratio(numerator: float, denominator: float) -> str:
    if denominator == 0:
        return "-" if numerator == 0 else "inf"
    return f"{numerator / denominator:.3f}"


def format_table(trace: Trace, results: Sequence[PolicyResult]) -> str:
    """One table: a column per policy; cold starts and idle memory-time, overall, periodic and per class."""
    classes = _classes(trace)
    by_class = [r.by_class(trace) for r in results]
    totals = [sum(c.values(), Tally()) for c in by_class]
    periodic = [_periodic(c) for c in by_class]
    counts = {p: sum(1 for f in trace.functions if (f.pattern or UNCLASSIFIED) == p) for p in classes}
    per_class = len(classes) > 1 or classes != [UNCLASSIFIED]

    rows: list[tuple[str, list[str]]] = []
    rows.append((f"cold starts, all ({totals[0].invocations:,} inv.)", [f"{t.cold_percent:.2f} %" for t in totals]))
    if per_class and periodic[0] is not None:
        rows.append(
            (
                f"  periodic: timer + multi-timer ({periodic[0].invocations:,} inv.)",
                [f"{t.cold_percent:.2f} %" if t else "" for t in periodic],
            )
        )
    if per_class:
        for p in classes:
            label = f"  {p}: {counts[p]:,} fns, {by_class[0][p].invocations:,} inv."
            rows.append((label, [f"{c[p].cold_percent:.2f} %" for c in by_class]))
    rows.append(("idle memory-time, all (GiB·s)", [f"{t.idle_gib_s:,.0f}" for t in totals]))
    if per_class and periodic[0] is not None:
        rows.append(("  periodic", [f"{t.idle_gib_s:,.0f}" if t else "" for t in periodic]))
    if per_class:
        for p in classes:
            rows.append((f"  {p}", [f"{c[p].idle_gib_s:,.0f}" for c in by_class]))
    if per_class and periodic[FIXED] is not None and len(results) == len(POLICIES):
        fixed = periodic[FIXED]
        hybrid = periodic[HYBRID]
        assert fixed is not None
        assert hybrid is not None
        for name, reference in (("keep-alive 10 min", fixed), ("hybrid histogram", hybrid)):
            rows.append(
                (
                    f"periodic: cold starts / {name}",
                    [_ratio(t.cold, reference.cold) if t else "" for t in periodic],
                )
            )
            rows.append(
                (
                    f"periodic: memory-time / {name}",
                    [_ratio(t.idle_mib_s, reference.idle_mib_s) if t else "" for t in periodic],
                )
            )
    rows.append(("replay CPU time (s)", [f"{r.cpu_s:.1f}" for r in results]))

    headers = [r.label for r in results]
    first = max(len(label) for label, _cells in rows)
    widths = [max(len(h), *(len(cells[i]) for _label, cells in rows)) for i, h in enumerate(headers)]
    lines = [" " * first + "".join(f"  {h:>{w}}" for h, w in zip(headers, widths, strict=True))]
    lines.extend(
        f"{label:<{first}}" + "".join(f"  {c:>{w}}" for c, w in zip(cells, widths, strict=True))
        for label, cells in rows
    )
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Target:
    what: str
    met: bool
    measured: str


def targets(trace: Trace, results: Sequence[PolicyResult], *, wall_s: float) -> list[Target]:
    """The benchmark targets of issue #14, judged on this replay."""
    out: list[Target] = []
    totals = [sum(r.by_class(trace).values(), Tally()) for r in results]
    periodic = [_periodic(r.by_class(trace)) for r in results]
    fixed_p, hybrid_p, ember_p = periodic[FIXED], periodic[HYBRID], periodic[EMBER]
    if fixed_p is not None and hybrid_p is not None and ember_p is not None:
        cold = ember_p.cold / fixed_p.cold if fixed_p.cold else math.inf
        memory = ember_p.idle_mib_s / fixed_p.idle_mib_s if fixed_p.idle_mib_s else math.inf
        out.append(
            Target(
                "periodic: >= 3x fewer cold starts than keep-alive 10 min",
                ember_p.cold * 3 <= fixed_p.cold,
                f"{1 / cold:.2f}x fewer" if cold else "none cold",
            )
        )
        out.append(
            Target(
                "periodic: <= 50 % of keep-alive 10 min's idle memory-time",
                ember_p.idle_mib_s <= 0.5 * fixed_p.idle_mib_s,
                f"{100 * memory:.1f} %",
            )
        )
        out.append(
            Target(
                "periodic: fewer cold starts than the hybrid histogram",
                ember_p.cold < hybrid_p.cold,
                f"{ember_p.cold:,} vs {hybrid_p.cold:,}",
            )
        )
        out.append(
            Target(
                "periodic: no more idle memory-time than the hybrid histogram",
                ember_p.idle_mib_s <= hybrid_p.idle_mib_s,
                f"{ember_p.idle_gib_s:,.0f} vs {hybrid_p.idle_gib_s:,.0f} GiB·s",
            )
        )
    fixed, ember = totals[FIXED], totals[EMBER]
    out.append(
        Target(
            "all: fewer cold starts than keep-alive 10 min",
            ember.cold < fixed.cold,
            f"{ember.cold_percent:.2f} % vs {fixed.cold_percent:.2f} %",
        )
    )
    out.append(
        Target(
            "all: less idle memory-time than keep-alive 10 min",
            ember.idle_mib_s < fixed.idle_mib_s,
            f"{ember.idle_gib_s:,.0f} vs {fixed.idle_gib_s:,.0f} GiB·s",
        )
    )
    out.append(
        Target(
            "1 million invocations replayed (all four policies) in under a minute",
            wall_s * 1_000_000 / max(1, trace.invocations) < 60.0,
            f"{trace.invocations:,} in {wall_s:.1f} s",
        )
    )
    return out


# ---------------------------------------------------------------------------------------------
# The command


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trace", type=Path, help=f"a CSV trace ({FORMAT}); without it, a synthetic one")
    parser.add_argument("--seed", type=int, default=1, help="seed of the synthetic trace (default 1)")
    parser.add_argument("--functions", type=int, default=1200, help="functions in the synthetic trace (default 1200)")
    parser.add_argument("--hours", type=float, default=48.0, help="length of the synthetic trace (default 48)")
    parser.add_argument("--write-trace", type=Path, help="write the trace replayed to this CSV file")
    parser.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="processes replaying (default: one per CPU)"
    )
    args = parser.parse_args(argv)
    if args.functions < 1 or args.hours <= 0 or args.workers < 1:
        parser.error("--functions and --workers must be at least 1, --hours positive")

    started = time.perf_counter()
    if args.trace is not None:
        try:
            trace = read_trace(args.trace)
        except TraceError as err:
            print(f"replay: {err}", file=sys.stderr)
            return 2
        made = "read"
    else:
        trace = generate(seed=args.seed, functions=args.functions, hours=args.hours)
        made = "generated"
    prepared_s = time.perf_counter() - started
    if args.write_trace is not None:
        with args.write_trace.open("w", encoding="utf-8") as file:
            file.writelines(trace_lines(trace))

    started = time.perf_counter()
    results = replay(trace, workers=args.workers)
    wall_s = time.perf_counter() - started

    print(
        f"trace: {trace.source}: {len(trace.functions):,} functions, {trace.invocations:,} invocations,"
        f" {trace.end_s / 3600:.1f} h ({made} in {prepared_s:.1f} s)"
    )
    print()
    print(format_table(trace, results))
    print()
    replays = trace.invocations * len(results)
    print(
        f"replay: {trace.invocations:,} invocations x {len(results)} policies in {wall_s:.1f} s wall"
        f" on {args.workers} worker(s): {trace.invocations / wall_s:,.0f} invocations/s (all four policies),"
        f" {replays / wall_s:,.0f} policy-invocations/s"
    )
    print()
    for target in targets(trace, results, wall_s=wall_s):
        print(f"  [{'met' if target.met else 'NOT met'}] {target.what}: {target.measured}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
