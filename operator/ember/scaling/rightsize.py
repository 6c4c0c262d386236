"""Right-sizing: the memory and CPU a Version needs, from what its invocations used. Pure: no I/O, no clock.

The agents answer every invocation with the peak resident memory of the worker that ran it
(`X-Ember-Max-Rss-Kib`; Python: the worker process's peak since it started, Node: the agent
process's) and the CPU it used (`X-Ember-Cpu-Ms`) over its duration (`X-Ember-Duration-Ms`). The
activator hands each reply's header values to the Version's `Sizer` (`usage.record_reply`: a dict
lookup by the peak's text and a count, CPU parsed for one reply in eight; bench/rightsize.py
measures it), and tells it when the Version ran out of memory (`out_of_memory`: the agent's
`Runtime.OutOfMemory`, or its sandbox killed at the memory bound).

**Bounded memory.** Peaks go into a log-bucketed histogram (`Histogram`: 64 buckets per doubling,
so a bucket is at most 1/64 = 1.6 % wide, and a Version whose use is stable fills one or two);
so do CPU rates. Two histograms take turns (`Usage`): the current one and the one before it,
each holding `WINDOW_SAMPLES` invocations, so the advice follows the last 1,000 to 2,000
invocations (a Version whose use changes is re-measured, not averaged over its whole life).

**Memory.** The pod's memory limit bounds the whole sandbox, not only the worker the agent
measures: the agent and the template the worker is forked from, and under gVisor the Sentry
(gVisor's kernel, which runs in the pod's cgroup in a cluster and in the sandbox's cgroup in
local mode; `ember.pods.local.sandbox`). That overhead is `sandbox_overhead_mib`, measured here:
a Python function allocating 0, 50, 100, 200 and 400 MiB in Debian's runsc (2022-12) peaked in
its memory cgroup 26, 28, 27, 29 and 29 MiB above the worker's own peak (the figure is 30); under
bubblewrap 5 MiB above (the figure is 6). Node's workers are threads of the agent, so the peak it
reports is the whole process's; under gVisor it reads ~80 MiB *above* the cgroup's charge (V8's
reservations count as resident there), so its figure is 0 and its advice errs on the large side.
Python runs one worker process per concurrent invocation, each with its own peak: its need is
counted `concurrency` times (their shared template pages too, which errs large). The advice:

    need   = overhead + workers * p99(worker peak)
    memory = need * (1 + MEMORY_HEADROOM), rounded up to MEMORY_STEP_MIB, within [64, the policy's maxMemoryMiB]

4 MiB steps and 2 % headroom keep it within 10 % above what the sandbox really peaked at for a
stable function (bench/rightsize.py measures it). Advice needs `min_samples` invocations; it
follows growth at once and a shrink only past two steps (no churn over one bucket).

**Out of memory.** An out-of-memory kill at size S raises the advice at once to 2 x S (within the
policy's limit), whatever the samples said: the sizes above S have not been measured yet. Once
`min_samples` invocations have run since, the measured advice rules again, but never at or below
S (`out_of_memory_at_mib` is kept: a size that was killed is not offered again). A Version that is
killed at the policy's limit stays there, and the reason says so.

**CPU** is advice only: `p95` of each invocation's CPU rate (cpu ms / duration ms, in millicores,
over invocations of at least `CPU_MIN_DURATION_MS`, where the agents' 10 ms CPU clock is precise
enough; the average rate over all when none is that long), plus 10 %, rounded up to 50m, within
50..8000. A bound set from it would throttle a Version's bursts, so `autoResize` applies memory
only; `resources.cpuMillicores` applies a bound when a user sets one.

**Applied size** (`applied_resources`), one rule for the operator (cluster) and the activator (local
mode): `autoResize` off, the spec's `memoryMiB`; on, the advice once there is one, else the spec's.
The activator publishes its advice (`encode_report`, on the Version's `ember.run/sizing`
annotation in a cluster, at most once per interval unless memory ran out); the operator reads it
back (`decode_report`: anything malformed is ignored, it is a hint), keeps the largest size ever
killed across activators (`merge_reports`), and writes both into the Version's status.
"""

from __future__ import annotations

import contextlib
import enum
import json
import math
from dataclasses import dataclass
from typing import Final

from pydantic import ValidationError

from ember.api.function import Resources
from ember.api.version import ResourceRecommendation, VersionResources

MIN_MEMORY_MIB: Final = 64
MAX_MEMORY_MIB: Final = 10240
MEMORY_STEP_MIB: Final = 4
MEMORY_HEADROOM: Final = 0.02
MEMORY_QUANTILE: Final = 0.99
SHRINK_STEPS: Final = 2  # advice shrinks only when it falls at least this many steps

MIN_CPU_MILLICORES: Final = 50
MAX_CPU_MILLICORES: Final = 8000
CPU_STEP_MILLICORES: Final = 50
CPU_HEADROOM: Final = 0.10
CPU_QUANTILE: Final = 0.95
CPU_MIN_DURATION_MS: Final = 20.0

MIN_SAMPLES: Final = 20
CPU_SAMPLE_MASK: Final = 7  # one reply in 8 has its CPU parsed (`Usage.record_reply`)
PEAK_KEYS: Final = 256  # peak texts whose bucket is remembered
WINDOW_SAMPLES: Final = 1000
MAX_REPORT_CHARS: Final = 2048  # the published advice; a longer annotation is not ours

SUB_BUCKET_BITS: Final = 6  # 64 buckets per doubling: at most 1.6 % wide


class Isolation(enum.Enum):
    """What wraps a pod's agent, as far as its memory goes."""

    GVISOR = "gvisor"  # runsc: gVisor's Sentry shares the sandbox's bound
    PROCESS = "process"  # plain processes in a cgroup: runc, bubblewrap, none
    VM = "vm"  # Kata: a guest kernel


# (runtime family, isolation) -> MiB the sandbox takes beyond the worker's peak (module docstring).
_OVERHEAD_MIB: Final[dict[tuple[str, Isolation], int]] = {
    ("python", Isolation.GVISOR): 30,
    ("python", Isolation.PROCESS): 6,
    ("nodejs", Isolation.GVISOR): 0,
    ("nodejs", Isolation.PROCESS): 6,
}
# Not measured here (no Kata on the machines this was built on): a guest kernel and its agent;
# an out-of-memory kill corrects a figure that is too small.
VM_OVERHEAD_MIB: Final = 64


def runtime_family(runtime: str) -> str:
    """`python` or `nodejs` of a runtime name (python3.12 -> python)."""
    return "nodejs" if runtime.startswith("nodejs") else "python"


def sandbox_overhead_mib(runtime: str, isolation: Isolation) -> int:
    """MiB a sandbox of `isolation` running `runtime` takes beyond its worker's peak."""
    if isolation is Isolation.VM:
        return VM_OVERHEAD_MIB
    return _OVERHEAD_MIB[(runtime_family(runtime), isolation)]


def isolation_of(sandbox: str) -> Isolation:
    """The isolation of a SecurityPolicy's `sandbox` (gvisor, kata, none) in a cluster."""
    return {"gvisor": Isolation.GVISOR, "kata": Isolation.VM}.get(sandbox, Isolation.PROCESS)


def round_up(value: float, step: int) -> int:
    """`value` rounded up to a multiple of `step`."""
    return math.ceil(value / step - 1e-9) * step


def grown_after_oom(size_mib: int, cap_mib: int) -> int:
    """The size after an out-of-memory kill at `size_mib`: twice it, within the cap."""
    return max(MIN_MEMORY_MIB, min(cap_mib, round_up(2 * size_mib, MEMORY_STEP_MIB)))


def above_oom(size_mib: int, cap_mib: int) -> int:
    """The smallest size offered once `size_mib` was killed: one step above it, within the cap."""
    return max(MIN_MEMORY_MIB, min(cap_mib, size_mib + MEMORY_STEP_MIB))


def _bucket(value: int) -> int:
    """The lower bound of the bucket holding `value` (exact below 128)."""
    shift = value.bit_length() - SUB_BUCKET_BITS - 1
    return value if shift <= 0 else (value >> shift) << shift


def _bucket_top(lower: int) -> int:
    """The largest value in the bucket whose lower bound is `lower`."""
    shift = lower.bit_length() - SUB_BUCKET_BITS - 1
    return lower if shift <= 0 else lower + (1 << shift) - 1


class Histogram:
    """Counts of non-negative integers in log-sized buckets (module docstring)."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0

    def add(self, value: int) -> None:
        shift = value.bit_length() - SUB_BUCKET_BITS - 1
        key = value if shift <= 0 else (value >> shift) << shift
        counts = self.counts
        counts[key] = counts.get(key, 0) + 1
        self.total += 1


def quantile_top(histograms: tuple[Histogram, ...], q: float) -> int | None:
    """The top of the bucket holding the `q` quantile of the histograms together (None when empty):
    never below the true quantile, at most 1.6 % above it."""
    total = sum(h.total for h in histograms)
    if total == 0:
        return None
    merged: dict[int, int] = {}
    for h in histograms:
        for key, count in h.counts.items():
            merged[key] = merged.get(key, 0) + count
    rank = max(1, math.ceil(q * total))
    seen = 0
    for key in sorted(merged):
        seen += merged[key]
        if seen >= rank:
            return _bucket_top(key)
    return _bucket_top(max(merged))  # not reached: the counts sum to total


class Usage:
    """What a Version's recent invocations used: peaks (KiB) and CPU rates (millicores), two windows."""

    __slots__ = (
        "_cpu",
        "_cpu_ms",
        "_duration_ms",
        "_keys",
        "_old_cpu",
        "_old_peaks",
        "_peaks",
        "samples",
        "window",
    )

    def __init__(self, *, window: int = WINDOW_SAMPLES) -> None:
        if window < 1:
            raise ValueError(f"window ({window}) must be at least 1")
        self.window = window
        self._peaks = Histogram()
        self._old_peaks = Histogram()
        self._cpu = Histogram()
        self._old_cpu = Histogram()
        self._cpu_ms = 0.0
        self._duration_ms = 0.0
        self._keys: dict[str, int] = {}  # a reply's peak header -> its bucket (-1: not a peak)
        self.samples = 0  # invocations recorded since the start (or `reset`)

    def record(self, peak_kib: int, cpu_ms: float, duration_ms: float) -> None:
        """One invocation: its worker's peak (KiB; 0 when unknown) and its CPU over its duration."""
        self.samples += 1
        if peak_kib > 0:
            self._count_peak(_bucket(peak_kib))
        self._record_cpu(cpu_ms, duration_ms)

    def record_reply(self, peak_kib: str | None, cpu_ms: str | None, duration_ms: str | None) -> None:
        """`record` from an agent reply's header values, as cheaply as the data path needs.

        A worker's peak is the same text reply after reply (it is the peak of the worker's life), so
        its bucket is looked up by that text, parsed once (at most `PEAK_KEYS` texts are kept). CPU is
        sampled: one reply in 8 (`CPU_SAMPLE_MASK`) is parsed (advice, not a bound: a sample does)."""
        samples = self.samples = self.samples + 1
        if peak_kib:
            key = self._keys.get(peak_kib)
            if key is None:
                key = self._parse_peak(peak_kib)
            if key >= 0:
                self._count_peak(key)
        if not samples & CPU_SAMPLE_MASK and cpu_ms and duration_ms:
            with contextlib.suppress(ValueError):  # not our agent's numbers: nothing to learn
                self._record_cpu(float(cpu_ms), float(duration_ms))

    def _parse_peak(self, text: str) -> int:
        keys = self._keys
        if len(keys) >= PEAK_KEYS:
            keys.clear()
        key = -1
        if text.isdigit() and len(text) < 12:
            value = int(text)
            key = _bucket(value) if value > 0 else -1
        keys[text] = key
        return key

    def _count_peak(self, key: int) -> None:
        peaks = self._peaks
        if peaks.total >= self.window:
            self._old_peaks, peaks = peaks, Histogram()
            self._peaks = peaks
        counts = peaks.counts
        counts[key] = counts.get(key, 0) + 1
        peaks.total += 1

    def _record_cpu(self, cpu_ms: float, duration_ms: float) -> None:
        if duration_ms > 0 and cpu_ms >= 0:
            self._cpu_ms += cpu_ms
            self._duration_ms += duration_ms
            if duration_ms >= CPU_MIN_DURATION_MS:
                cpu = self._cpu
                if cpu.total >= self.window:
                    self._old_cpu, cpu = cpu, Histogram()
                    self._cpu = cpu
                cpu.add(int(cpu_ms * 1000.0 / duration_ms))

    def reset(self) -> None:
        """Forget every sample (the Version ran out of memory: what it used before is no guide)."""
        self._peaks, self._old_peaks, self._cpu, self._old_cpu = Histogram(), Histogram(), Histogram(), Histogram()
        self._cpu_ms = self._duration_ms = 0.0
        self.samples = 0
        self._keys.clear()

    @property
    def peak_samples(self) -> int:
        """Invocations in the windows that reported a peak."""
        return self._peaks.total + self._old_peaks.total

    def peak_kib(self, q: float = MEMORY_QUANTILE) -> int | None:
        """The `q` quantile of the peaks in the windows (bucket top), None when none was reported."""
        return quantile_top((self._old_peaks, self._peaks), q)

    def cpu_millicores(self, q: float = CPU_QUANTILE) -> int | None:
        """The `q` quantile of the CPU rates, or the mean rate when no invocation was long enough."""
        rate = quantile_top((self._old_cpu, self._cpu), q)
        if rate is None and self._duration_ms > 0:
            rate = int(self._cpu_ms * 1000.0 / self._duration_ms)
        return rate


@dataclass(frozen=True, slots=True)
class SizingFacts:
    """What a Version's advice depends on besides its samples."""

    runtime: str
    overhead_mib: int  # `sandbox_overhead_mib` of where its pods run
    concurrency: int = 1
    max_memory_mib: int = MAX_MEMORY_MIB  # its policy's limits.maxMemoryMiB
    min_samples: int = MIN_SAMPLES

    @property
    def workers(self) -> int:
        """Processes whose peaks add up in one pod: Python's workers; Node's one process."""
        return self.concurrency if runtime_family(self.runtime) == "python" else 1

    @property
    def cap_mib(self) -> int:
        return max(MIN_MEMORY_MIB, min(MAX_MEMORY_MIB, self.max_memory_mib))


def recommend_memory(peak_kib: int, facts: SizingFacts) -> tuple[int, str]:
    """The memory for a p99 worker peak of `peak_kib`, and why (module docstring)."""
    peak_mib = math.ceil(peak_kib / 1024)
    workers = facts.workers
    need = facts.overhead_mib + workers * peak_mib
    wanted = round_up(need * (1 + MEMORY_HEADROOM), MEMORY_STEP_MIB)
    memory = max(MIN_MEMORY_MIB, min(facts.cap_mib, wanted))
    times = f"{workers} x " if workers > 1 else ""
    why = f"p99 peak {times}{peak_mib} MiB + {facts.overhead_mib} MiB sandbox + {MEMORY_HEADROOM:.0%}"
    if wanted > facts.cap_mib:
        why += f"; capped at limits.maxMemoryMiB {facts.cap_mib}"
    elif wanted < MIN_MEMORY_MIB:
        why += f"; at least {MIN_MEMORY_MIB} MiB"
    return memory, why


def recommend_cpu(millicores: int | None) -> int | None:
    """The CPU advice for a p95 rate of `millicores` (None without samples)."""
    if millicores is None:
        return None
    wanted = round_up(max(1, millicores) * (1 + CPU_HEADROOM), CPU_STEP_MILLICORES)
    return max(MIN_CPU_MILLICORES, min(MAX_CPU_MILLICORES, wanted))


class Sizer:
    """One Version's right-sizing: its usage, the largest size it ran out of memory at, its advice.

    `record` is on the data path (every reply); the rest runs on the activator's sizing loop."""

    __slots__ = ("_advice", "_samples_at_oom", "facts", "oom_at_mib", "usage")

    def __init__(self, facts: SizingFacts, *, window: int = WINDOW_SAMPLES) -> None:
        self.facts = facts
        self.usage = Usage(window=window)
        self.oom_at_mib: int | None = None
        self._samples_at_oom = 0
        self._advice: ResourceRecommendation | None = None

    def record(self, peak_kib: int, cpu_ms: float, duration_ms: float) -> None:
        """One invocation's use (see `Usage.record`)."""
        self.usage.record(peak_kib, cpu_ms, duration_ms)

    @property
    def current(self) -> ResourceRecommendation | None:
        """The advice as `advice` last gave it (read-only: for views)."""
        return self._advice

    def out_of_memory(self, size_mib: int) -> bool:
        """A pod of `size_mib` ran out of memory; True when that is news (a larger size than any before)."""
        if self.oom_at_mib is not None and size_mib <= self.oom_at_mib:
            return False
        self.oom_at_mib = size_mib
        self.usage.reset()  # peaks measured before were below what it needs now
        self._samples_at_oom = 0
        return True

    def learn_oom(self, size_mib: int | None) -> None:
        """Another activator saw the Version run out of memory at `size_mib` (its published status)."""
        if size_mib is not None and (self.oom_at_mib is None or size_mib > self.oom_at_mib):
            self.oom_at_mib = size_mib
            self._samples_at_oom = self.usage.samples

    def advice(self) -> ResourceRecommendation | None:
        """The advice now (None: not enough samples and no out-of-memory kill yet).

        Its memory follows growth at once and a shrink only past `SHRINK_STEPS` steps; within
        them it stays as it was (new CPU advice and counts are taken)."""
        fresh = self._compute()
        old = self._advice
        if fresh is None:
            return old
        if (
            old is None
            or fresh.memory_mib > old.memory_mib
            or fresh.memory_mib <= old.memory_mib - SHRINK_STEPS * MEMORY_STEP_MIB
            or fresh.out_of_memory_at_mib != old.out_of_memory_at_mib
        ):
            self._advice = fresh
        else:
            self._advice = old.model_copy(
                update={"cpu_millicores": fresh.cpu_millicores, "samples": fresh.samples, "peak_mib": fresh.peak_mib}
            )
        return self._advice

    def _compute(self) -> ResourceRecommendation | None:
        facts, usage, oom = self.facts, self.usage, self.oom_at_mib
        samples = usage.samples
        measured = usage.peak_samples >= facts.min_samples and samples - self._samples_at_oom >= facts.min_samples
        peak = usage.peak_kib() if measured else None
        cpu = recommend_cpu(usage.cpu_millicores()) if samples >= facts.min_samples else None
        if peak is None:
            if oom is None:
                return None
            memory = grown_after_oom(oom, facts.cap_mib)
            why = f"out of memory at {oom} MiB: doubled"
            if memory <= oom:
                why = f"out of memory at {oom} MiB, the policy's limits.maxMemoryMiB: cannot grow"
            return ResourceRecommendation(
                memory_mib=memory, cpu_millicores=cpu, samples=samples, out_of_memory_at_mib=oom, reason=why
            )
        memory, why = recommend_memory(peak, facts)
        if oom is not None:
            floor = above_oom(oom, facts.cap_mib)
            if memory < floor:
                memory, why = floor, f"{why}; above {oom} MiB, where it ran out of memory"
            else:
                why = f"{why} (out of memory once at {oom} MiB)"
        return ResourceRecommendation(
            memory_mib=memory,
            cpu_millicores=cpu,
            samples=usage.peak_samples,
            peak_mib=math.ceil(peak / 1024),
            out_of_memory_at_mib=oom,
            reason=why,
        )


def applied_resources(
    resources: Resources, *, max_memory_mib: int, advice: ResourceRecommendation | None
) -> VersionResources:
    """The memory and CPU a Version's new pods get, and why (module docstring)."""
    cpu = resources.cpu_millicores
    if not resources.auto_resize:
        return VersionResources(memory_mib=resources.memory_mib, cpu_millicores=cpu, reason="spec.resources.memoryMiB")
    if advice is None:
        return VersionResources(
            memory_mib=resources.memory_mib,
            cpu_millicores=cpu,
            reason="spec.resources.memoryMiB, until autoResize has measured enough invocations",
        )
    cap = max(MIN_MEMORY_MIB, min(MAX_MEMORY_MIB, max_memory_mib))
    memory = max(MIN_MEMORY_MIB, min(cap, advice.memory_mib))
    return VersionResources(memory_mib=memory, cpu_millicores=cpu, reason=f"autoResize: {advice.reason}"[:1024])


def parse_recommendation(raw: object) -> ResourceRecommendation | None:
    """A stored `status.recommendation`, None when absent or unreadable."""
    if not isinstance(raw, dict):
        return None
    try:
        return ResourceRecommendation.model_validate(raw)
    except ValidationError:
        return None


def encode_report(advice: ResourceRecommendation) -> str:
    """The published form of one activator's advice (compact JSON)."""
    return json.dumps(advice.to_wire(), separators=(",", ":"), sort_keys=True)


def decode_report(text: str | None) -> ResourceRecommendation | None:
    """An activator's published advice; None when absent or malformed (a hint, never a command)."""
    if not text or len(text) > MAX_REPORT_CHARS:
        return None
    try:
        return ResourceRecommendation.model_validate_json(text)
    except (ValidationError, ValueError):
        return None


def merge_reports(
    stored: ResourceRecommendation | None, reported: ResourceRecommendation, *, max_memory_mib: int
) -> ResourceRecommendation:
    """The advice to store: `reported`, never at or below the largest size either one ran out of memory
    at (several activators report, each from its own invocations; one that saw no kill must not undo
    another's)."""
    known = [s.out_of_memory_at_mib for s in (stored, reported) if s is not None and s.out_of_memory_at_mib]
    if not known:
        return reported
    oom = max(known)
    cap = max(MIN_MEMORY_MIB, min(MAX_MEMORY_MIB, max_memory_mib))
    floor = above_oom(oom, cap)
    if reported.memory_mib >= floor and reported.out_of_memory_at_mib == oom:
        return reported
    memory = max(reported.memory_mib, floor)
    reason = reported.reason
    if memory > reported.memory_mib:
        reason = f"{reason}; above {oom} MiB, where it ran out of memory"[:1024]
    return reported.model_copy(update={"memory_mib": memory, "out_of_memory_at_mib": oom, "reason": reason})
