"""When will a Function be invoked next? Keep-alive and prewarm windows learned from its arrivals.

Pure: no I/O, every time is passed in, so the live scaler and the trace replay (`bench/replay.py`)
drive the same code, one with the event loop's clock and one with a simulated one.

A policy sees two things of one Function: `invoked(at)` when an invocation arrives, and
`plan(idle_from)` when its invocations have all ended and it goes idle. The `Plan` it returns is a
few windows of time in which one instance should be warm; outside them none is kept. Four policies
share that shape:

- `FixedKeepAlive`: warm for a fixed time after each invocation (Lambda's 10 minutes, Knative's
  scale to zero after 60 s). What Ember does without `scaling.predictive`.
- `HybridHistogram`: the policy of "Serverless in the Wild" (Shahrad et al., USENIX ATC 2020),
  kept faithful as the anchor. Idle times (from the end of one invocation to the next arrival) go
  into a histogram of 1-minute bins over 4 hours. When the bin counts' coefficient of variation is
  at least 2 (a histogram with clear peaks), it prewarms at the 5th percentile minus 10 % and keeps
  the instance until the 99th percentile plus 10 %; a head in the first bin means "do not unload".
  When most idle times fall outside the range, it forecasts the next idle time from the recent
  ones (the paper fits ARIMA; this keeps a mean of the last ten, in log space, which is what ARIMA
  amounts to on series this short) and keeps 85 %..115 % of it. Otherwise (no data, or a flat
  histogram) a fixed keep-alive of the whole range.
- `Predictor`: Ember's policy, used with `scaling.predictive`. It adds to the hybrid histogram
  what the histogram cannot see:
  * **timers.** Three arrivals evenly spaced (within 1 % of the gap or a second) start a `_Timer`
    of that period (30 s or more: below, the histogram keeps the instance anyway). Each arrival is
    the run of at most one timer, the one whose next tick it is nearest, so the runs of a busy
    timer do not pull a slower one's ticks towards them; a run moves its timer's tick and period
    part of the way to it (much while the timer is young, then a fifth and a fiftieth), ticks
    that pass without one are misses, three in a row end the timer. Only arrivals that are no
    timer's run are searched for new timers, so several may run at once (a Function called every
    minute, every hour and every two hours) and their periods need not divide one another; a new
    one whose ticks an older one already has (a multiple of its period, in phase) is not made.
    Two timers may tick together (every minute, and every ten minutes on the minute): a second
    arrival on the tick a timer's run just had is a repeat of it, and the window around that tick
    stays open to its end.
  * **trust.** A timer that hit once more, with runs on average closer to its ticks than the
    slack that found it (random arrivals that line up hit anywhere within the tolerance), is
    trusted: the plan warms an instance around each of its next three ticks (so a skipped run is
    no cold start), `lead_s` early for the start-up, five times its rms error wide on each side.
  * **its own misses.** A run its window missed widens that timer's windows by half; each one
    inside narrows them by 2 % back. An arrival that no trusted timer explains goes to the
    histogram, and for the next ten arrivals the histogram's windows are kept beside the timers'.
    When trusted timers explained each of the last ten, the plan is their ticks alone: no
    keep-alive after a timer's run.
  * **the start.** After the first invocation it waits as long as the histogram reaches (4 hours,
    as the anchor does with no data); afterwards its "unsure" fallback is the Function's
    `keepAliveSeconds` (10 minutes in the replay), not the anchor's 4 hours.

The windows are absolute times, sorted; `Plan.warm_at(t)` says whether an instance should be warm
at `t`. Each call costs a few microseconds (a Fenwick tree finds the percentiles; the arrival
history is bounded), so a replay of a million invocations takes seconds.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass
from typing import Final, Protocol

BIN_S: Final = 60.0
RANGE_S: Final = 4 * 3600.0
HEAD_PERCENTILE: Final = 5.0
TAIL_PERCENTILE: Final = 99.0
CV_THRESHOLD: Final = 2.0
OOB_THRESHOLD: Final = 0.5  # more than half the idle times out of range: forecast instead
MARGIN: Final = 0.1
FORECAST_WINDOW: Final = 10  # idle times the out-of-range forecast averages
FALLBACK_KEEP_S: Final = 600.0  # Ember's keep-alive when it cannot tell (Lambda's)

HISTORY: Final = 64  # arrivals kept for timer detection
LOOK_BACK: Final = 8  # earlier arrivals a new one is paired with to find a period
MIN_PERIOD_S: Final = 30.0  # below it the histogram's keep-alive covers the gaps anyway (tests shrink it)
MAX_TIMERS: Final = 4
MAX_MISSES: Final = 3  # ticks in a row without an arrival end a timer
TICKS_AHEAD: Final = 3
EXPLAINED_WINDOW: Final = 10  # the plan is the timers' ticks alone when they explained this many arrivals in a row
PHASE_GAIN: Final = 0.2
JITTER_GAIN: Final = 0.1  # weight of the latest run in a timer's rms error
TRUST_HITS: Final = 1  # runs on its ticks after the three arrivals that found it
DETECT_TOLERANCE: Final = 0.01  # of the period: how evenly spaced three arrivals must be
MAX_JITTER: Final = 0.05  # of the period: a timer whose runs' rms error is larger is none
MAX_TOLERANCE: Final = 0.1  # of the period: farther from a tick, an arrival is not the timer's


@dataclass(frozen=True, slots=True)
class Plan:
    """When one instance of a Function should be warm: sorted, disjoint windows of absolute time."""

    windows: tuple[tuple[float, float], ...]
    reason: str

    def warm_at(self, t: float) -> bool:
        """Whether `t` falls in one of the windows."""
        return any(start <= t < end for start, end in self.windows)

    def next_start(self, after: float) -> float | None:
        """The first time at or after `after` an instance should be warm (None: never, per this plan)."""
        for start, end in self.windows:
            if end > after:
                return max(start, after)
        return None


class Policy(Protocol):
    """What the scaler and the trace replay ask of a keep-alive policy (one instance per Function)."""

    name: str

    def invoked(self, at: float) -> None:
        """An invocation arrived at `at`."""
        ...

    def plan(self, idle_from: float) -> Plan:
        """Every invocation ended by `idle_from`: when to keep an instance warm from then on."""
        ...


class FixedKeepAlive:
    """Warm for `keep_s` after each invocation, then nothing until the next one."""

    def __init__(self, keep_s: float, name: str | None = None) -> None:
        if keep_s < 0:
            raise ValueError(f"keep_s ({keep_s}) must not be negative")
        self.keep_s = keep_s
        self.name = name or f"fixed keep-alive {keep_s:g} s"

    def invoked(self, at: float) -> None:
        pass

    def plan(self, idle_from: float) -> Plan:
        return Plan(((idle_from, idle_from + self.keep_s),), "fixed keep-alive")


class _Fenwick:
    """Counts per bin with prefix sums and "the bin holding the k-th sample" in O(log bins)."""

    __slots__ = ("_size", "_step", "_tree")

    def __init__(self, size: int) -> None:
        self._size = size
        self._tree = [0] * (size + 1)
        self._step = 1 << (size.bit_length() - 1)

    def add(self, index: int) -> None:
        i = index + 1
        while i <= self._size:
            self._tree[i] += 1
            i += i & -i

    def find(self, k: int) -> int:
        """The smallest bin index whose prefix count reaches `k` (1-based)."""
        pos = 0
        step = self._step
        while step:
            nxt = pos + step
            if nxt <= self._size and self._tree[nxt] < k:
                pos = nxt
                k -= self._tree[nxt]
            step >>= 1
        return pos


class HybridHistogram:
    """The anchor: the hybrid histogram policy of "Serverless in the Wild" (see the module docstring)."""

    def __init__(
        self,
        *,
        bin_s: float = BIN_S,
        range_s: float = RANGE_S,
        fallback_keep_s: float = RANGE_S,
        name: str = "hybrid histogram",
    ) -> None:
        if bin_s <= 0 or range_s < bin_s:
            raise ValueError(f"need 0 < bin_s ({bin_s}) <= range_s ({range_s})")
        self.name = name
        self.bin_s = bin_s
        self.range_s = range_s
        self.fallback_keep_s = fallback_keep_s
        self._bins = math.ceil(range_s / bin_s)
        self._counts = [0] * self._bins
        self._tree = _Fenwick(self._bins)
        self._total = 0  # idle times in range
        self._squares = 0  # sum of squared bin counts, for the coefficient of variation
        self._out_of_range = 0
        self._recent: deque[float] = deque(maxlen=FORECAST_WINDOW)
        self._idle_from: float | None = None

    @property
    def samples(self) -> int:
        """Idle times seen, in range or not."""
        return self._total + self._out_of_range

    def invoked(self, at: float) -> None:
        if self._idle_from is not None and at >= self._idle_from:
            self.add_idle(at - self._idle_from)
        self._idle_from = None

    def add_idle(self, idle_s: float) -> None:
        """One idle time, in seconds."""
        self._recent.append(idle_s)
        if idle_s >= self.range_s:
            self._out_of_range += 1
            return
        index = int(idle_s / self.bin_s)
        count = self._counts[index]
        self._counts[index] = count + 1
        self._squares += 2 * count + 1
        self._total += 1
        self._tree.add(index)

    def representative(self) -> bool:
        """Whether the bin counts have clear peaks: coefficient of variation at least `CV_THRESHOLD`."""
        if self._total == 0:
            return False
        mean = self._total / self._bins
        variance = max(0.0, self._squares / self._bins - mean * mean)
        return math.sqrt(variance) / mean >= CV_THRESHOLD

    def plan(self, idle_from: float) -> Plan:
        self._idle_from = idle_from
        return self.windows(idle_from)

    def windows(self, idle_from: float) -> Plan:
        """The plan from `idle_from` on, without marking the Function idle (for `Predictor`)."""
        samples = self.samples
        if samples and self._out_of_range / samples > OOB_THRESHOLD:
            logs = [math.log(max(idle, 1.0)) for idle in self._recent]
            forecast = math.exp(sum(logs) / len(logs))
            return Plan(((idle_from + 0.85 * forecast, idle_from + 1.15 * forecast),), "forecast")
        if not self.representative():
            return Plan(((idle_from, idle_from + self.fallback_keep_s),), "not representative: fixed keep-alive")
        head_bin = self._tree.find(max(1, math.ceil(self._total * HEAD_PERCENTILE / 100)))
        tail_bin = self._tree.find(max(1, math.ceil(self._total * TAIL_PERCENTILE / 100)))
        prewarm = head_bin * self.bin_s * (1 - MARGIN)
        keep_until = (tail_bin + 1) * self.bin_s * (1 + MARGIN)
        return Plan(((idle_from + prewarm, idle_from + keep_until),), "histogram")


class _Timer:
    """One periodic source of invocations: its period, its next tick, how much it jitters."""

    __slots__ = ("hits", "jitter", "last", "misses", "next", "period", "widen")

    def __init__(self, period: float, last: float, jitter: float) -> None:
        self.period = period
        self.last = last  # the tick its latest run was on
        self.next = last + period
        self.jitter = jitter
        self.hits = 0
        self.misses = 0
        self.widen = 1.0

    def tolerance(self) -> float:
        """How far from a tick an arrival still counts as the tick: wider while the timer is young
        (its period is known to a slack per tick) and for each tick it skipped since its last hit."""
        young = 2.0 if self.hits < 3 else 1.0
        base = max(young * _slack(self.period), 6 * self.jitter)
        return min(base * (1 + self.misses), MAX_TOLERANCE * self.period)

    def half_width(self) -> float:
        """Half of a warm window around one tick."""
        return max(min(1.0, 0.05 * self.period), 5 * self.jitter) * self.widen

    def catch_up(self, at: float) -> float | None:
        """Count the ticks that passed before `at` without an arrival (misses); then how far `at`
        is from the next tick, in half windows (None: beyond the tolerance, not this timer's run)."""
        while self.next + self.tolerance() < at:
            self.next += self.period
            self.misses += 1
        distance = abs(at - self.next)
        return None if self.dead or distance > self.tolerance() else distance / self.half_width()

    def hit(self, at: float) -> None:
        """`at` is this timer's run (`catch_up` found it near a tick)."""
        error = at - self.next
        self.last = self.next
        if abs(error) > self.half_width():
            self.widen = min(8.0, self.widen * 1.5)  # the window missed it: wider next time
        else:
            self.widen = max(1.0, self.widen * 0.98)
        self.jitter = math.sqrt(self.jitter**2 + JITTER_GAIN * (error * error - self.jitter**2))  # rms error
        # The tick moves part of the way to the arrival (the phase of a timer that jitters is its
        # runs' average, not its last run) and the period follows: much at first, when the three
        # arrivals that found it are all it knows, then a fifth and a fiftieth (a slow drift).
        self.period += max(0.02, 1 / (self.hits + 3)) * error / (self.misses + 1)
        self.next += max(PHASE_GAIN, 1 / (self.hits + 2)) * error + self.period
        self.hits += 1
        self.misses = 0

    def covers(self, at: float, period: float) -> bool:
        """Whether a timer of `period` with a run at `at` would add nothing to this one: its period
        is a multiple of this one's and `at` is on this one's ticks."""
        multiple = round(period / self.period)
        tolerance = self.tolerance()
        if multiple < 1 or abs(period - multiple * self.period) > tolerance * multiple:
            return False
        offset = (at - self.next) % self.period
        return min(offset, self.period - offset) <= tolerance

    @property
    def dead(self) -> bool:
        """It skipped too many ticks, or its arrivals jitter too much to be a timer."""
        return self.misses >= MAX_MISSES or self.jitter > MAX_JITTER * self.period

    @property
    def trusted(self) -> bool:
        """It hit, and its runs keep closer to its ticks than the slack that found it (arrivals that
        line up by chance hit anywhere within the tolerance)."""
        return self.hits >= TRUST_HITS and self.jitter <= _slack(self.period)

    def repeats(self, at: float) -> bool:
        """Whether `at` is a second run on the tick its latest run was on (two timers of the
        Function tick together: one run is each one's, the other a repeat)."""
        return abs(at - self.last) <= self.tolerance()

    def ticks(self, after: float, lead_s: float) -> list[tuple[float, float]]:
        """Warm windows around the tick of its latest run (what is left of it: a second run may
        follow) and the next `TICKS_AHEAD` ticks after `after`."""
        tick = self.next
        while tick + self.tolerance() < after:
            tick += self.period
        half = self.half_width()
        ticks = [self.last, *(tick + k * self.period for k in range(TICKS_AHEAD))]
        return [(t - half - lead_s, t + half) for t in ticks]


class Predictor:
    """Ember's policy: timers with jitter, learned from its own misses, over a hybrid histogram."""

    def __init__(
        self, *, lead_s: float = 2.0, fallback_keep_s: float = FALLBACK_KEEP_S, min_period_s: float = MIN_PERIOD_S
    ) -> None:
        if lead_s < 0 or fallback_keep_s < 0 or min_period_s <= 0:
            raise ValueError(
                f"need lead_s ({lead_s}) and fallback_keep_s ({fallback_keep_s}) >= 0,"
                f" min_period_s ({min_period_s}) > 0"
            )
        self.name = "ember predictor"
        self.lead_s = lead_s
        self.min_period_s = min_period_s
        self._histogram = HybridHistogram(fallback_keep_s=fallback_keep_s)
        self._arrivals: list[float] = []  # the recent arrivals no timer explained
        self._timers: list[_Timer] = []
        self._explained: deque[bool] = deque(maxlen=EXPLAINED_WINDOW)
        self._idle_from: float | None = None

    @property
    def fallback_keep_s(self) -> float:
        """The keep-alive when it cannot tell (its Function's `keepAliveSeconds`, which may change)."""
        return self._histogram.fallback_keep_s

    @fallback_keep_s.setter
    def fallback_keep_s(self, value: float) -> None:
        self._histogram.fallback_keep_s = value

    @property
    def periods(self) -> tuple[float, ...]:
        """Periods of the trusted timers, in seconds (for status and tests)."""
        return tuple(sorted(t.period for t in self._timers if t.trusted))

    def invoked(self, at: float) -> None:
        idle = None if self._idle_from is None or at < self._idle_from else at - self._idle_from
        self._idle_from = None
        # each arrival is one timer's run at most: the one whose tick it is nearest (in half windows),
        # so a busy timer's runs do not pull a slower one's ticks towards them
        nearest: tuple[float, _Timer] | None = None
        for timer in self._timers:
            distance = timer.catch_up(at)
            if distance is not None and (nearest is None or distance < nearest[0]):
                nearest = (distance, timer)
        if nearest is not None:
            nearest[1].hit(at)
            explained = nearest[1].trusted  # else the histogram learns it too
        else:
            repeated = next((t for t in self._timers if t.repeats(at)), None)
            explained = repeated is not None and repeated.trusted
        self._timers = [t for t in self._timers if not t.dead]
        if nearest is None and not explained:  # no timer's run: maybe the third of a new one
            self._detect(at)
            self._arrivals.append(at)
            if len(self._arrivals) > 2 * HISTORY:
                del self._arrivals[:HISTORY]
        if not explained and idle is not None:
            self._histogram.add_idle(idle)
        self._explained.append(explained)

    def _detect(self, at: float) -> None:
        """Three evenly spaced arrivals ending at `at` start a timer of that period. Only arrivals no
        timer explains count, so a second timer is found beside a first, busier one."""
        arrivals = self._arrivals
        for back in range(1, min(LOOK_BACK, len(arrivals)) + 1):
            previous = arrivals[-back]
            period = at - previous
            if period < self.min_period_s:
                continue
            tolerance = _slack(period)
            target = previous - period
            i = bisect.bisect_left(arrivals, target - tolerance)
            if i >= len(arrivals) or arrivals[i] > target + tolerance:
                continue
            if any(t.covers(at, period) for t in self._timers):
                continue
            if len(self._timers) >= MAX_TIMERS:
                self._timers.remove(min(self._timers, key=lambda t: t.hits))
            jitter = abs((at - previous) - (previous - arrivals[i])) / 2
            self._timers.append(_Timer(period, at, jitter))
            return

    def plan(self, idle_from: float) -> Plan:
        self._idle_from = idle_from
        windows = [w for timer in self._timers if timer.trusted for w in timer.ticks(idle_from, self.lead_s)]
        explained = self._explained
        if windows and len(explained) == EXPLAINED_WINDOW and all(explained):
            return Plan(_merged(windows, idle_from), "timers")
        if self._histogram.samples == 0:  # one invocation so far: wait as long as the histogram reaches
            return Plan(((idle_from, idle_from + self._histogram.range_s),), "first invocation")
        histogram = self._histogram.windows(idle_from)
        if not windows:
            return histogram
        return Plan(_merged(windows + list(histogram.windows), idle_from), f"timers + {histogram.reason}")


def _slack(period: float) -> float:
    """How far apart a timer's runs may be from even spacing: 1 % of the period, a second at
    least (a twentieth of the period for the short periods tests use)."""
    return max(min(1.0, 0.05 * period), DETECT_TOLERANCE * period)


def _merged(windows: list[tuple[float, float]], after: float) -> tuple[tuple[float, float], ...]:
    """Sorted, overlapping windows joined, everything before `after` cut off."""
    out: list[tuple[float, float]] = []
    for start, end in sorted(windows):
        if end <= after:
            continue
        start = max(start, after)
        if out and start <= out[-1][1]:
            if end > out[-1][1]:
                out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return tuple(out)


class Forecast:
    """A policy fed by the live scaler: one per predictive Function, sampled every scaling step.

    The scaler does not call the policy per invocation (that is the data path); each step it
    passes the Function's latest request time and what it has in flight and queued. A request
    newer than the last step's, while the Function was idle, is an arrival (`invoked`, at that
    request's time: within one step of the first); nothing in flight or queued after it is the
    Function going idle (`plan`). So a Function busy without pause is one long invocation, as in
    the trace replay's one-instance model.
    """

    def __init__(self, policy: Predictor) -> None:
        self.policy = policy
        self.plan: Plan | None = None
        self._busy = False
        self._seen = -math.inf

    def observe(self, now: float, *, last_request_at: float, demand: int) -> None:
        """One scaling step: the Function's newest request time and its invocations in flight plus queued."""
        if last_request_at > self._seen:
            self._seen = last_request_at
            if not self._busy:
                self.policy.invoked(last_request_at)
                self._busy = True
        if self._busy and demand == 0:
            self._busy = False
            self.plan = self.policy.plan(now)

    def wants_warm(self, now: float) -> bool:
        """Whether one instance should be warm now: busy, or in a window of the plan."""
        return self._busy or (self.plan is not None and self.plan.warm_at(now))

    def starts_within(self, now: float, horizon_s: float) -> bool:
        """Whether the plan warms an instance between now and `horizon_s` from now (a claim to expect)."""
        if self.plan is None:
            return False
        start = self.plan.next_start(now)
        return start is not None and start <= now + horizon_s
