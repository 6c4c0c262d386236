"""`scaling.predictive` live: a Function called on a timer is prewarmed for each call and holds no pod between them.

A real activator over real sandboxed agents (gVisor where runsc is installed), with the period shrunk
to seconds (the predictor's windows and lead are config; the logic is the one the replay measures).
Two Functions with the same code and the same 60 s keep-alive are called on the same timer: the
fixed keep-alive keeps its pod the whole time, the predictive one has a pod only around each call
once it has learned the period, and still finds it warm when the call comes.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from ember.activator.registry import Registry

from .helpers import FAST, function, run_activator

PERIOD_S = 3.0
CALLS = 18
LEARNED_AFTER = 13  # three calls find the timer, the fourth trusts it, then the last ten it explains
CONFIG = dataclasses.replace(FAST, predict_lead_s=0.6, predict_min_period_s=1.0, warm_pool_size=1)
CODE = """
def handler(event, context):
    return {"n": event["n"]}
"""


def ready_pods(registry: Registry, name: str) -> int:
    fs = registry.get("default", name)
    return sum(vs.ready_pods for vs in fs.versions.values())


async def test_a_timer_is_warm_at_each_call_once_learned_with_less_idle_pod_time_than_a_fixed_keep_alive() -> None:
    async with run_activator(CONFIG) as act:
        for name, predictive in (("fixed", False), ("predicted", True)):
            act.registry.apply(function(name, CODE, scaling={"keepAliveSeconds": 60, "predictive": predictive}))
        idle_pod_s = {"fixed": 0.0, "predicted": 0.0}
        warm: dict[str, list[bool]] = {"fixed": [], "predicted": []}
        measuring = False

        async def sample() -> None:
            while True:
                await asyncio.sleep(0.05)
                if measuring:
                    for name in idle_pod_s:
                        fs = act.registry.get("default", name)
                        busy = sum(vs.in_flight for vs in fs.versions.values())
                        idle_pod_s[name] += max(0, ready_pods(act.registry, name) - busy) * 0.05

        async def call(name: str, n: int) -> None:
            warm[name].append(ready_pods(act.registry, name) > 0)
            async with act.http.post(act.invoke_url(name), json={"n": n}) as response:
                assert response.status == 200, await response.text()
                assert await response.json() == {"n": n}

        sampler = asyncio.create_task(sample())
        start = time.monotonic() + 1.0
        try:
            for n in range(CALLS):
                await asyncio.sleep(max(0.0, start + n * PERIOD_S - time.monotonic()))
                measuring = n >= LEARNED_AFTER
                await asyncio.gather(call("fixed", n), call("predicted", n))
            await asyncio.sleep(PERIOD_S - 0.2)
        finally:
            sampler.cancel()
        forecast = act.registry.get("default", "predicted").forecast
        assert forecast is not None
        assert forecast.policy.periods, "the predictor found the timer"
        assert abs(forecast.policy.periods[0] - PERIOD_S) < 0.2, forecast.policy.periods
        assert all(warm["predicted"][LEARNED_AFTER:]), f"cold calls once learned: {warm['predicted']}"
        assert all(warm["fixed"][1:]), "the fixed keep-alive spans the period"
        assert idle_pod_s["fixed"] > 0.9 * (CALLS - LEARNED_AFTER) * PERIOD_S * 0.9, idle_pod_s
        print(f"idle pod-seconds over the last {CALLS - LEARNED_AFTER} periods: {idle_pod_s}")
        assert idle_pod_s["predicted"] < 0.6 * idle_pod_s["fixed"], idle_pod_s
