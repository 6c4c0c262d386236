"""Keep-alive policies (pure): the hybrid histogram anchor and Ember's predictor on constructed series."""

from __future__ import annotations

import itertools
import random

import pytest

from ember.scaling.predictor import (
    FixedKeepAlive,
    HybridHistogram,
    Plan,
    Policy,
    Predictor,
)


def replay(policy: Policy, arrivals: list[float], duration_s: float = 0.5) -> list[bool]:
    """Whether each arrival found a warm instance (the first never does), one instance, plan after each."""
    warm: list[bool] = []
    plan: Plan | None = None
    for at in arrivals:
        warm.append(plan is not None and plan.warm_at(at))
        policy.invoked(at)
        plan = policy.plan(at + duration_s)
    return warm


def timer(period: float, count: int, *, start: float = 1000.0, jitter: float = 0.0, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    return [start + k * period + rng.uniform(-jitter, jitter) for k in range(count)]


def test_plan_windows_and_next_start() -> None:
    plan = Plan(((10.0, 20.0), (30.0, 40.0)), "test")
    assert plan.warm_at(10.0)
    assert plan.warm_at(35.0)
    assert not plan.warm_at(20.0)
    assert not plan.warm_at(25.0)
    assert plan.next_start(0.0) == 10.0
    assert plan.next_start(15.0) == 15.0
    assert plan.next_start(25.0) == 30.0
    assert plan.next_start(40.0) is None


def test_fixed_keep_alive_refuses_a_negative_time() -> None:
    with pytest.raises(ValueError, match="keep_s"):
        FixedKeepAlive(-1)
    assert FixedKeepAlive(600).plan(5.0).windows == ((5.0, 605.0),)


def test_a_timer_with_jitter_is_found_and_each_tick_is_warm_with_little_idle_time() -> None:
    predictor = Predictor(lead_s=2.0)
    arrivals = timer(300.0, 40, jitter=1.5)
    warm = replay(predictor, arrivals)
    assert all(warm[4:]), f"cold after the timer was learned: {[i for i, w in enumerate(warm) if not w]}"
    assert predictor.periods == (pytest.approx(300.0, abs=2.0),)
    plan = predictor.plan(arrivals[-1] + 0.5)
    rest, first = plan.windows[0], plan.windows[1]
    assert plan.reason == "timers"
    assert rest[1] < arrivals[-1] + 10, "after a run only what is left of its tick's window (a second run may follow)"
    assert first[0] > arrivals[-1] + 250, "no keep-alive after a timer's run: the instance goes until the next tick"
    assert first[1] - first[0] < 30, f"window {first} is far wider than the jitter needs"


def test_two_timers_of_unrelated_periods_are_both_found() -> None:
    arrivals = sorted(timer(300.0, 96, jitter=0.5) + timer(3600.0 + 17, 8, start=1100.0, seed=2))
    predictor = Predictor()
    warm = replay(predictor, arrivals)
    assert predictor.periods == (pytest.approx(300.0, abs=2.0), pytest.approx(3617.0, abs=5.0))
    late = [i for i, at in enumerate(arrivals) if at > arrivals[0] + 5.5 * 3617]  # five hourly runs: found, trusted
    assert all(warm[i] for i in late), "both timers' ticks are warm once both are known"


def test_two_timers_that_tick_together_are_both_warm() -> None:
    # every minute, and every ten minutes half a second later: at each tenth tick two runs come
    minute = timer(60.0, 200, jitter=0.2)
    ten = timer(600.0, 20, start=1000.5, jitter=0.2, seed=4)
    arrivals = sorted(minute + ten)
    warm = replay(Predictor(), arrivals, duration_s=0.1)
    late = [i for i, at in enumerate(arrivals) if at > 4000]
    assert all(warm[i] for i in late), [round(arrivals[i], 1) for i in late if not warm[i]]


def test_random_arrivals_start_no_timer_that_lasts() -> None:
    rng = random.Random(7)
    at, arrivals = 0.0, []
    for _ in range(300):
        at += rng.expovariate(1 / 900)
        arrivals.append(at)
    predictor = Predictor()
    replay(predictor, arrivals)
    assert len(predictor.periods) <= 1, f"Poisson arrivals kept timers {predictor.periods}"
    plan = predictor.plan(arrivals[-1] + 1)
    assert "histogram" in plan.reason or "keep-alive" in plan.reason


def test_a_period_that_changes_is_learned_again() -> None:
    first = timer(120.0, 20, jitter=0.3)
    second = timer(600.0, 20, start=first[-1] + 600.0, jitter=0.3, seed=3)
    predictor = Predictor()
    warm = replay(predictor, first + second)
    assert predictor.periods == (pytest.approx(600.0, abs=2.0),), "the old timer missed its ticks and ended"
    assert all(warm[-12:]), "the new period's ticks are warm again"


def test_a_skipped_run_is_still_warm_at_the_tick_after_it() -> None:
    arrivals = timer(600.0, 30, jitter=0.2)
    del arrivals[20]
    warm = replay(Predictor(), arrivals)
    assert warm[20], "the tick after a skipped run was prewarmed too"


def test_windows_widen_after_the_timer_misses_an_arrival() -> None:
    predictor = Predictor(lead_s=0.0)
    arrivals = timer(300.0, 30, jitter=0.0)
    replay(predictor, arrivals)
    narrow = predictor.plan(arrivals[-1] + 0.5).windows[1]
    late = arrivals[-1] + 300.0 + 2.5  # inside the timer's tolerance (3 s), outside its window (1 s)
    assert not Plan((narrow,), "").warm_at(late)
    predictor.invoked(late)
    wide = predictor.plan(late + 0.5).windows[1]
    assert wide[1] - wide[0] > narrow[1] - narrow[0], f"{wide} did not widen after missing at {late}"


def test_hybrid_histogram_prewarms_at_the_head_and_keeps_to_the_tail() -> None:
    histogram = HybridHistogram()
    for idle in [600.0 + k for k in range(30)]:  # every idle time in the 10-minute bin
        histogram.add_idle(idle)
    assert histogram.representative()
    plan = histogram.plan(0.0)
    assert plan.reason == "histogram"
    assert plan.windows == ((pytest.approx(540.0), pytest.approx(660.0 * 1.1)),)


def test_hybrid_histogram_without_a_peak_falls_back_to_its_range() -> None:
    histogram = HybridHistogram()
    for idle in range(0, 4 * 3600, 60):  # one idle time in every bin: flat, CV 0
        histogram.add_idle(float(idle))
    assert not histogram.representative()
    assert histogram.plan(0.0).windows == ((0.0, 4 * 3600.0),)
    assert HybridHistogram().plan(5.0).reason.startswith("not representative"), "no data: fixed keep-alive"


def test_hybrid_histogram_forecasts_when_most_idle_times_are_out_of_range() -> None:
    histogram = HybridHistogram()
    for _ in range(10):
        histogram.add_idle(6 * 3600.0)
    plan = histogram.plan(0.0)
    assert plan.reason == "forecast"
    assert plan.windows == ((pytest.approx(0.85 * 6 * 3600), pytest.approx(1.15 * 6 * 3600)),)


def test_predictor_is_warm_through_a_burst_and_not_long_after_it() -> None:
    bursts = [day * 86_400.0 + k * 2.0 for day in range(6) for k in range(50)]
    predictor = Predictor()
    warm = replay(predictor, bursts)
    assert sum(warm) >= len(bursts) - 8, "inside a burst the instance stays warm"
    plan = predictor.plan(bursts[-1] + 1)
    assert plan.windows[0][1] - bursts[-1] < 3600, "and it is not kept for hours after the burst"


@pytest.mark.parametrize("policy", [FixedKeepAlive(600), HybridHistogram(), Predictor()], ids=lambda p: p.name)
def test_plans_are_sorted_disjoint_and_start_no_earlier_than_idle(policy: Policy) -> None:
    rng = random.Random(3)
    at = 0.0
    for _ in range(500):
        at += rng.choice([rng.expovariate(1 / 30), 300 + rng.uniform(-1, 1), rng.uniform(0, 20_000)])
        policy.invoked(at)
        plan = policy.plan(at + 0.2)
        windows = plan.windows
        assert all(start < end for start, end in windows), windows
        assert all(a[1] < b[0] for a, b in itertools.pairwise(windows)), windows
        assert not windows or windows[0][0] >= at + 0.2
