"""Right-sizing's pure logic (`ember.scaling.rightsize`): histograms, advice, out-of-memory growth,
the applied size and the published report's codec, on plain values.

What the activator does with it is tests/unit/activator/test_sizing.py; the operator's status
tests/unit/controller/test_sizing_status.py; real agents in sandboxes tests/local/activator/test_rightsize.py.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ember.api.function import Resources
from ember.api.version import ResourceRecommendation
from ember.scaling.rightsize import (
    MAX_REPORT_CHARS,
    Histogram,
    Isolation,
    Sizer,
    SizingFacts,
    Usage,
    applied_resources,
    decode_report,
    encode_report,
    isolation_of,
    merge_reports,
    parse_recommendation,
    quantile_top,
    recommend_cpu,
    sandbox_overhead_mib,
)

PYTHON = SizingFacts(runtime="python3.12", overhead_mib=30)
MIB = 1024


def _stable(sizer: Sizer, peak_mib: float, n: int = 25, cpu_ms: float = 50.0, duration_ms: float = 100.0) -> None:
    for _ in range(n):
        sizer.record(int(peak_mib * MIB), cpu_ms, duration_ms)


@given(st.lists(st.integers(min_value=0, max_value=2**34), min_size=1, max_size=200), st.floats(0.01, 1.0))
def test_a_quantile_is_never_below_the_true_one_nor_more_than_a_bucket_above(values: list[int], q: float) -> None:
    histogram = Histogram()
    for value in values:
        histogram.add(value)
    top = quantile_top((histogram,), q)
    ordered = sorted(values)
    true = ordered[max(1, math.ceil(q * len(ordered))) - 1]
    assert top is not None
    assert true <= top <= true + true / 64


def test_buckets_are_bounded_for_any_spread_of_values() -> None:
    histogram = Histogram()
    for value in range(0, 2**24, 997):
        histogram.add(value)
    assert len(histogram.counts) < 64 * 25  # 64 per doubling over 24 doublings, whatever the count


@pytest.mark.parametrize("allocated_mib", [50, 100, 200, 400])
def test_a_stable_function_is_advised_within_ten_percent_above_what_its_sandbox_needs(allocated_mib: int) -> None:
    # the worker's peak is what it allocates plus the Python it starts with (19 MiB under runsc)
    peak = allocated_mib + 19
    need = peak + 30  # the sandbox's overhead (module docstring): what its cgroup peaked at
    sizer = Sizer(PYTHON)
    _stable(sizer, peak)
    advice = sizer.advice()
    assert advice is not None
    assert need <= advice.memory_mib <= need * 1.10, advice
    assert advice.memory_mib % 4 == 0
    assert advice.peak_mib is not None
    assert peak <= advice.peak_mib <= peak * 1.02 + 1
    assert "30 MiB sandbox" in advice.reason


def test_no_advice_before_the_minimum_of_samples() -> None:
    sizer = Sizer(PYTHON)
    _stable(sizer, 100, n=PYTHON.min_samples - 1)
    assert sizer.advice() is None
    _stable(sizer, 100, n=1)
    assert sizer.advice() is not None


def test_advice_is_never_below_64_mib_nor_above_the_policy_limit() -> None:
    small = Sizer(SizingFacts(runtime="python3.12", overhead_mib=6))
    _stable(small, 10)
    assert small.advice() is not None
    assert small.advice().memory_mib == 64
    capped = Sizer(SizingFacts(runtime="python3.12", overhead_mib=30, max_memory_mib=256))
    _stable(capped, 400)
    advice = capped.advice()
    assert advice is not None
    assert advice.memory_mib == 256
    assert "capped at limits.maxMemoryMiB 256" in advice.reason


def test_python_counts_one_peak_per_concurrent_worker_and_node_one_process() -> None:
    python = Sizer(SizingFacts(runtime="python3.12", overhead_mib=30, concurrency=4))
    node = Sizer(SizingFacts(runtime="nodejs20", overhead_mib=0, concurrency=4))
    _stable(python, 50)
    _stable(node, 50)
    assert python.advice().memory_mib >= 30 + 4 * 50  # type: ignore[union-attr]
    assert node.advice().memory_mib < 64 + 8  # type: ignore[union-attr]


def test_out_of_memory_doubles_at_once_and_measurements_then_rule_above_the_killed_size() -> None:
    sizer = Sizer(PYTHON)
    assert sizer.out_of_memory(64)
    advice = sizer.advice()
    assert advice is not None
    assert advice.memory_mib == 128
    assert advice.out_of_memory_at_mib == 64
    assert not sizer.out_of_memory(64), "the same size again is no news"
    assert sizer.out_of_memory(128)
    assert sizer.advice().memory_mib == 256  # type: ignore[union-attr]
    _stable(sizer, 120)  # measured at 256: it needs 150
    advice = sizer.advice()
    assert advice is not None
    assert 150 <= advice.memory_mib < 170
    assert "out of memory once at 128 MiB" in advice.reason
    _stable(sizer, 60)  # what it uses drops (after two windows), but a killed size is never offered again
    tiny = Sizer(PYTHON, window=25)
    tiny.out_of_memory(128)
    _stable(tiny, 60, n=75)
    assert tiny.advice().memory_mib == 132  # type: ignore[union-attr]


def test_out_of_memory_at_the_policy_limit_cannot_grow_and_says_so() -> None:
    sizer = Sizer(SizingFacts(runtime="python3.12", overhead_mib=30, max_memory_mib=128))
    sizer.out_of_memory(128)
    advice = sizer.advice()
    assert advice is not None
    assert advice.memory_mib == 128
    assert "cannot grow" in advice.reason


def test_an_out_of_memory_size_learned_from_another_activator_holds_until_measured() -> None:
    sizer = Sizer(PYTHON)
    _stable(sizer, 50)
    sizer.learn_oom(128)
    assert sizer.advice().memory_mib == 256  # type: ignore[union-attr]
    _stable(sizer, 50)
    assert sizer.advice().memory_mib == 132  # type: ignore[union-attr]


def test_advice_grows_at_once_and_shrinks_only_past_two_steps() -> None:
    sizer = Sizer(PYTHON, window=25)
    _stable(sizer, 200)
    first = sizer.advice()
    assert first is not None
    _stable(sizer, 196, n=50)  # one step less: kept
    assert sizer.advice().memory_mib == first.memory_mib  # type: ignore[union-attr]
    _stable(sizer, 150, n=50)  # far less: taken
    assert sizer.advice().memory_mib < first.memory_mib  # type: ignore[union-attr]
    sizer.record(300 * MIB, 1, 100)  # more at once: the p99 of 50 samples is their top
    assert sizer.advice().memory_mib > first.memory_mib  # type: ignore[union-attr]


def test_the_window_forgets_old_samples() -> None:
    usage = Usage(window=10)
    for _ in range(10):
        usage.record(500 * MIB, 0, 0)
    for _ in range(20):
        usage.record(100 * MIB, 0, 0)
    assert usage.peak_kib() is not None
    assert usage.peak_kib() < 102 * MIB


def test_cpu_advice_is_the_p95_rate_rounded_up_within_bounds() -> None:
    sizer = Sizer(PYTHON)
    _stable(sizer, 50, cpu_ms=90, duration_ms=100)  # 900m
    assert sizer.advice().cpu_millicores == 1000  # type: ignore[union-attr]
    assert recommend_cpu(None) is None
    assert recommend_cpu(0) == 50
    assert recommend_cpu(100_000) == 8000
    short = Usage()
    for _ in range(5):
        short.record(1, 1.0, 2.0)  # too short for a rate of its own: the mean rate
    assert short.cpu_millicores() == 500


def test_unknown_peaks_and_numbers_are_not_samples_of_memory() -> None:
    usage = Usage()
    usage.record(0, -1.0, 0.0)
    assert usage.samples == 1
    assert usage.peak_samples == 0
    assert usage.peak_kib() is None
    assert usage.cpu_millicores() is None


def test_overheads_per_runtime_and_sandbox() -> None:
    assert sandbox_overhead_mib("python3.11", Isolation.GVISOR) == 30
    assert sandbox_overhead_mib("python3.12", Isolation.PROCESS) == 6
    assert sandbox_overhead_mib("nodejs20", Isolation.GVISOR) == 0
    assert sandbox_overhead_mib("nodejs20", Isolation.VM) == 64
    assert [isolation_of(s) for s in ("gvisor", "kata", "none")] == [Isolation.GVISOR, Isolation.VM, Isolation.PROCESS]


ADVICE = ResourceRecommendation(memory_mib=256, cpu_millicores=100, samples=40, peak_mib=219, reason="measured")


@pytest.mark.parametrize(
    ("resources", "advice", "memory", "reason"),
    [
        pytest.param(Resources(memory_mib=1024), ADVICE, 1024, "spec.resources.memoryMiB", id="off"),
        pytest.param(Resources(memory_mib=1024, auto_resize=True), None, 1024, "until autoResize", id="unmeasured"),
        pytest.param(Resources(memory_mib=1024, auto_resize=True), ADVICE, 256, "autoResize: measured", id="on"),
    ],
)
def test_the_applied_size(
    resources: Resources, advice: ResourceRecommendation | None, memory: int, reason: str
) -> None:
    applied = applied_resources(resources, max_memory_mib=10240, advice=advice)
    assert applied.memory_mib == memory
    assert reason in applied.reason


def test_the_applied_size_stays_within_the_policy_and_keeps_the_spec_cpu() -> None:
    resources = Resources(memory_mib=128, cpu_millicores=250, auto_resize=True)
    applied = applied_resources(resources, max_memory_mib=200, advice=ADVICE)
    assert (applied.memory_mib, applied.cpu_millicores) == (200, 250)


def test_a_report_round_trips() -> None:
    assert decode_report(encode_report(ADVICE)) == ADVICE


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(None, id="absent"),
        pytest.param("", id="empty"),
        pytest.param("{", id="not-json"),
        pytest.param("[]", id="a-list"),
        pytest.param('"256"', id="a-string"),
        pytest.param('{"memoryMiB": "lots"}', id="text-number"),
        pytest.param('{"memoryMiB": 1}', id="below-64"),
        pytest.param('{"memoryMiB": 999999}', id="above-10240"),
        pytest.param('{"memoryMiB": 256, "cpuMillicores": -5}', id="negative-cpu"),
        pytest.param('{"memoryMiB": 256, "evil": true}', id="unknown-field"),
        pytest.param('{"memoryMiB": 256, "outOfMemoryAtMiB": 0}', id="zero-oom"),
        pytest.param(json.dumps({"memoryMiB": 256, "reason": "x" * 5000}), id="too-long"),
        pytest.param("\x00\xff" * 10, id="binary"),
    ],
)
def test_a_malformed_report_is_ignored(text: str | None) -> None:
    assert decode_report(text) is None


@given(st.text(max_size=MAX_REPORT_CHARS + 10))
def test_decoding_any_text_never_raises(text: str) -> None:
    decoded = decode_report(text)
    assert decoded is None or 64 <= decoded.memory_mib <= 10240


def test_a_stored_recommendation_that_cannot_be_read_is_none() -> None:
    assert parse_recommendation({"memoryMiB": 256}) == ResourceRecommendation(memory_mib=256)
    assert parse_recommendation({"memoryMiB": "x"}) is None
    assert parse_recommendation("256") is None
    assert parse_recommendation(None) is None


def test_merging_keeps_the_largest_out_of_memory_size_of_any_activator() -> None:
    stored = ADVICE.model_copy(update={"memory_mib": 512, "out_of_memory_at_mib": 256})
    unaware = ResourceRecommendation(memory_mib=200, samples=30, reason="measured elsewhere")
    merged = merge_reports(stored, unaware, max_memory_mib=10240)
    assert (merged.memory_mib, merged.out_of_memory_at_mib) == (260, 256)
    assert "where it ran out of memory" in merged.reason
    assert merge_reports(None, unaware, max_memory_mib=10240) == unaware
    bigger = ResourceRecommendation(memory_mib=1024, out_of_memory_at_mib=512)
    assert merge_reports(stored, bigger, max_memory_mib=10240) == bigger


def test_reply_headers_are_recorded_and_garbage_is_not_a_sample_of_memory() -> None:
    usage = Usage()
    for _ in range(16):
        usage.record_reply("224512", "40.0", "100.0")
    for garbage in ("", None, "lots", "-5", "1e9", "0", "9" * 40):
        usage.record_reply(garbage, "x", "y")
    assert usage.samples == 23
    assert usage.peak_samples == 16
    assert usage.peak_kib() is not None
    assert 224512 <= usage.peak_kib() <= 224512 * 1.016
    assert 400 <= usage.cpu_millicores() <= 407, "one reply in eight has its CPU read"  # type: ignore[operator]


def test_the_texts_of_peaks_kept_are_bounded() -> None:
    usage = Usage()
    for kib in range(1, 10_001):
        usage.record_reply(str(kib), None, None)
    assert len(usage._keys) <= 256
    assert usage.samples == 10_000
    assert usage.peak_samples == 2 * usage.window, "the two windows"
