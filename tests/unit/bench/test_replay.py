"""The trace replay benchmark (bench/replay.py), pure parts: the simulator's accounting, trace files, the generator.

Small constructed traces and scripted policies with hand-computed answers. The policies themselves are
tests/unit/scaling/test_predictor.py's; the full-size run (a million invocations, four policies, worker
processes) is the benchmark's own, `python bench/replay.py`.
"""

from __future__ import annotations

import importlib.util
import sys
from array import array
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.scaling.predictor import FixedKeepAlive, Plan

_PATH = Path(__file__).resolve().parents[3] / "bench" / "replay.py"
if "ember_bench_replay" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("ember_bench_replay", _PATH)
    assert _spec is not None
    assert _spec.loader is not None
    sys.modules["ember_bench_replay"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["ember_bench_replay"])
replay = sys.modules["ember_bench_replay"]


def function(rows: list[tuple[float, float, float]], name: str = "f", pattern: str | None = None) -> Any:
    """A function of (arrival s, duration s, memory MiB) rows, already in time order."""
    return replay.FunctionTrace(
        name,
        pattern,
        array("d", [r[0] for r in rows]),
        array("d", [r[1] for r in rows]),
        array("d", [r[2] for r in rows]),
    )


class Scripted:
    """A policy whose plan is fixed offsets from `idle_from`; it records every call it gets."""

    name = "scripted"

    def __init__(self, offsets: tuple[tuple[float, float], ...]) -> None:
        self.offsets = offsets
        self.calls: list[tuple[str, float]] = []

    def invoked(self, at: float) -> None:
        self.calls.append(("invoked", at))

    def plan(self, idle_from: float) -> Plan:
        self.calls.append(("plan", idle_from))
        return Plan(tuple((idle_from + a, idle_from + b) for a, b in self.offsets), "scripted")


# ---------------------------------------------------------------------------------------------
# The simulator's accounting


def test_keep_alive_warms_the_gap_it_covers_and_counts_only_its_windows_as_idle() -> None:
    # 0 (1 s) cold; idle from 1, kept [1, 11): 5 is warm, idle 4 s; idle from 6, kept [6, 16): 30 is
    # cold, idle 10 s; idle from 32, kept [32, 42) but the trace ends at 35: idle 3 s.
    fn = function([(0.0, 1.0, 256.0), (5.0, 1.0, 256.0), (30.0, 2.0, 256.0)])
    tally = replay.replay_function(FixedKeepAlive(10.0), fn, end_s=35.0)
    assert tally == replay.Tally(invocations=3, cold=2, idle_mib_s=256.0 * (4 + 10 + 3))


def test_overlapping_invocations_are_warm_extend_the_busy_period_and_plan_once_it_ends() -> None:
    # 0..10 busy; 2 (ends 5) and 8 (ends 13) arrive during it: warm, busy until 13, memory the largest (512).
    # Kept [13, 18): 20 is cold, 512 MiB idle for 5 s. Then kept [21, 26) at 128 MiB, the trace ends at 30.
    fn = function([(0.0, 10.0, 128.0), (2.0, 3.0, 512.0), (8.0, 5.0, 256.0), (20.0, 1.0, 128.0)])
    policy = Scripted(((0.0, 5.0),))
    tally = replay.replay_function(policy, fn, end_s=30.0)
    assert policy.calls == [
        ("invoked", 0.0),  # as the live scaler's Forecast: one call per busy period, at its start
        ("plan", 13.0),
        ("invoked", 20.0),
        ("plan", 21.0),
    ]
    assert tally == replay.Tally(invocations=4, cold=2, idle_mib_s=512.0 * 5 + 128.0 * 5)


def test_prewarm_windows_after_a_gap_are_warm_and_idle_only_while_they_last() -> None:
    # Idle from 1: kept [3, 5) and [11, 13). The arrival at 12 is inside the second: warm; idle is
    # the first window (2 s) and the second up to the arrival (1 s). After it (idle from 13): [15, 17), [23, 25).
    fn = function([(0.0, 1.0, 100.0), (12.0, 1.0, 100.0)])
    tally = replay.replay_function(Scripted(((2.0, 4.0), (10.0, 12.0))), fn, end_s=24.0)
    assert tally == replay.Tally(invocations=2, cold=1, idle_mib_s=100.0 * (2 + 1 + 2 + 1))


@pytest.mark.parametrize(
    ("arrival", "warm"),
    [
        pytest.param(3.0, True, id="at-a-window-start-is-warm"),
        pytest.param(4.999, True, id="just-before-its-end-is-warm"),
        pytest.param(5.0, False, id="at-its-end-is-cold"),
        pytest.param(2.5, False, id="before-a-prewarm-window-is-cold"),
    ],
)
def test_window_edges(arrival: float, warm: bool) -> None:
    fn = function([(0.0, 1.0, 128.0), (arrival, 0.1, 128.0)])
    tally = replay.replay_function(Scripted(((2.0, 4.0),)), fn, end_s=arrival + 0.1)
    assert tally.cold == (1 if warm else 2)


def test_an_arrival_as_the_previous_ends_is_no_overlap_the_policy_is_asked() -> None:
    fn = function([(0.0, 1.0, 128.0), (1.0, 1.0, 128.0)])
    policy = Scripted(((5.0, 6.0),))
    tally = replay.replay_function(policy, fn, end_s=2.0)
    assert ("plan", 1.0) in policy.calls
    assert tally.cold == 2


def test_after_the_last_invocation_idle_runs_to_the_end_of_the_trace_and_no_further() -> None:
    fn = function([(0.0, 4.0, 128.0)])
    assert replay.replay_function(FixedKeepAlive(600.0), fn, end_s=10.0).idle_mib_s == 128.0 * 6
    assert replay.replay_function(FixedKeepAlive(600.0), fn, end_s=4.0).idle_mib_s == 0.0


def test_an_empty_function_counts_nothing() -> None:
    assert replay.replay_function(FixedKeepAlive(60.0), function([]), end_s=10.0) == replay.Tally()


_rows = st.lists(
    st.tuples(
        st.floats(0, 1000, allow_nan=False),
        st.floats(0, 20, allow_nan=False),
        st.just(256.0),
    ),
    min_size=1,
    max_size=40,
).map(sorted)


@given(_rows)
def test_keep_alive_longer_than_the_trace_is_cold_once_and_idle_whenever_not_busy(
    rows: list[tuple[float, float, float]],
) -> None:
    end_s = max(a + d for a, d, _m in rows) + 5.0
    busy_s = 0.0
    until = -1.0
    for a, d, _m in rows:
        start = max(a, until)
        if a + d > start:
            busy_s += a + d - start
        until = max(until, a + d)
    tally = replay.replay_function(FixedKeepAlive(1e9), function(rows), end_s=end_s)
    assert tally.cold == 1
    assert tally.idle_mib_s == pytest.approx(256.0 * (end_s - rows[0][0] - busy_s), abs=1e-6)


@given(_rows)
def test_no_keep_alive_is_cold_for_every_arrival_that_finds_the_instance_idle(
    rows: list[tuple[float, float, float]],
) -> None:
    overlaps = 0
    until = -1.0
    for a, d, _m in rows:
        overlaps += a < until
        until = max(until, a + d)
    tally = replay.replay_function(FixedKeepAlive(0.0), function(rows), end_s=until)
    assert tally == replay.Tally(invocations=len(rows), cold=len(rows) - overlaps, idle_mib_s=0.0)


# ---------------------------------------------------------------------------------------------
# Trace files


def parse(text: str) -> Any:
    return replay.parse_trace(text.splitlines(keepends=True), source="t.csv")


def test_a_trace_sorts_each_function_and_fills_in_duration_and_memory() -> None:
    trace = parse("timestamp_s,function\n30,b\n20.5,a\n10,a\n\n5,b\n")
    assert [f.name for f in trace.functions] == ["b", "a"]
    b, a = trace.functions
    assert list(a.arrivals_s) == [10.0, 20.5]
    assert list(b.arrivals_s) == [5.0, 30.0]
    assert list(a.durations_s) == [0.1, 0.1]
    assert list(a.memory_mib) == [128.0, 128.0]
    assert a.pattern is None
    assert trace.invocations == 4
    assert trace.end_s == pytest.approx(30.1)


def test_a_trace_reads_durations_memory_and_classes_and_empty_fields_take_the_defaults() -> None:
    trace = parse("function,timestamp_s,duration_ms,memory_mib,class\nf,1,250,512,timer\nf,2,,,timer\ng,3,1,64,\n")
    f, g = trace.functions
    assert list(f.durations_s) == [0.25, 0.1]
    assert list(f.memory_mib) == [512.0, 128.0]
    assert (f.pattern, g.pattern) == ("timer", None)


@pytest.mark.parametrize(
    ("text", "error"),
    [
        pytest.param("", "t.csv: empty file", id="empty"),
        pytest.param("function,timestamp_s\n", "t.csv: no invocations", id="header-only"),
        pytest.param("function,time\nf,1\n", "t.csv:1: unknown column 'time'", id="unknown-column"),
        pytest.param("function,duration_ms\nf,1\n", "t.csv:1: the header has no 'timestamp_s' column", id="no-time"),
        pytest.param("function,timestamp_s,function\nf,1,f\n", "t.csv:1: column 'function' appears twice", id="twice"),
        pytest.param("function,timestamp_s\nf,1\nf,abc\n", "t.csv:3: timestamp_s 'abc' is not a number", id="text"),
        pytest.param("function,timestamp_s\nf,-1\n", "t.csv:2: timestamp_s (-1) must not be negative", id="negative"),
        pytest.param("function,timestamp_s\nf,nan\n", "t.csv:2: timestamp_s (nan) must be a finite", id="nan"),
        pytest.param(
            "function,timestamp_s,duration_ms\nf,1,-5\n", "t.csv:2: duration_ms (-5) must not be negative", id="dur"
        ),
        pytest.param("function,timestamp_s,memory_mib\nf,1,0\n", "t.csv:2: memory_mib (0) must be positive", id="mem"),
        pytest.param(
            "function,timestamp_s,duration_ms\nf,1,5\nf,2\n", "t.csv:3: 2 fields where the header has 3", id="missing"
        ),
        pytest.param("function,timestamp_s\nf,1,9\n", "t.csv:2: 3 fields where the header has 2", id="extra-field"),
        pytest.param("function,timestamp_s\n ,1\n", "t.csv:2: the function name is empty", id="no-name"),
        pytest.param(
            "function,timestamp_s,class\nf,1,timer\nf,2,poisson\n",
            "t.csv:3: function 'f' has class 'poisson' here but 'timer'",
            id="two-classes",
        ),
    ],
)
def test_a_bad_trace_names_the_file_the_line_and_the_problem(text: str, error: str) -> None:
    with pytest.raises(replay.TraceError) as caught:
        parse(text)
    assert str(caught.value).startswith(error)


def test_a_missing_trace_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nope.csv"
    with pytest.raises(replay.TraceError, match=r"nope\.csv: cannot read"):
        replay.read_trace(missing)


def test_a_written_trace_reads_back_the_same(tmp_path: Path) -> None:
    trace = replay.generate(seed=3, functions=12, hours=2.0)
    path = tmp_path / "t.csv"
    path.write_text("".join(replay.trace_lines(trace)), encoding="utf-8")
    again = replay.read_trace(path)
    assert again.end_s == trace.end_s
    assert [(f.name, f.pattern) for f in again.functions] == [(f.name, f.pattern) for f in trace.functions]
    for a, b in zip(again.functions, trace.functions, strict=True):
        assert (a.arrivals_s, a.durations_s, a.memory_mib) == (b.arrivals_s, b.durations_s, b.memory_mib)


# ---------------------------------------------------------------------------------------------
# The synthetic generator


def test_a_seed_always_makes_the_same_trace_and_another_seed_another() -> None:
    one = replay.generate(seed=5, functions=30, hours=6.0)
    again = replay.generate(seed=5, functions=30, hours=6.0)
    other = replay.generate(seed=6, functions=30, hours=6.0)
    assert one == again
    assert one.functions != other.functions


def test_fewer_functions_are_the_first_ones_of_more() -> None:
    few = replay.generate(seed=2, functions=10, hours=4.0)
    many = replay.generate(seed=2, functions=40, hours=4.0)
    assert many.functions[: len(few.functions)] == few.functions


def test_synthetic_functions_have_a_class_sorted_arrivals_and_sizes_in_range() -> None:
    trace = replay.generate(seed=1, functions=200, hours=12.0)
    assert {f.pattern for f in trace.functions} == set(replay.PATTERNS)
    for f in trace.functions:
        arrivals = list(f.arrivals_s)
        assert arrivals == sorted(arrivals)
        assert arrivals[0] >= 0
        assert arrivals[-1] < 12 * 3600
        assert all(0 < d <= 300 for d in f.durations_s)
        assert all(128 <= m <= 1024 for m in f.memory_mib)


def test_a_synthetic_timer_runs_once_per_period_with_small_jitter() -> None:
    timers = [f for f in replay.generate(seed=1, functions=60, hours=24.0).functions if f.pattern == "timer"]
    assert timers
    for f in timers:
        gaps = sorted(b - a for a, b in zip(f.arrivals_s, f.arrivals_s[1:], strict=False))
        period = gaps[len(gaps) // 2]
        assert min(abs(period - 60 * p) for p in replay.TIMER_PERIODS_MIN) < 10
        assert all(abs(g - period * round(g / period)) < 15 for g in gaps)  # skipped runs are whole periods


# ---------------------------------------------------------------------------------------------
# The table


def test_the_table_has_a_column_per_policy_and_a_row_per_class() -> None:
    trace = replay.generate(seed=1, functions=40, hours=6.0)
    results = replay.replay(trace, workers=1)
    table = replay.format_table(trace, results)
    header = table.splitlines()[0]
    for label, _factory in replay.POLICIES:
        assert label in header
    for pattern in {f.pattern for f in trace.functions}:
        assert f"  {pattern}: " in table
    assert "periodic: cold starts / hybrid histogram" in table


def test_a_trace_without_classes_is_reported_overall_only() -> None:
    trace = parse("function,timestamp_s\nf,1\nf,100\ng,5\n")
    table = replay.format_table(trace, replay.replay(trace, workers=1))
    assert "cold starts, all (3 inv.)" in table
    assert "periodic" not in table
    assert replay.UNCLASSIFIED not in table
