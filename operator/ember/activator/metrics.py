"""Prometheus metrics of the activator, on a registry of its own (one per app, so tests can run several).

Counters and histograms are updated on the hot path through label children cached per
Version; gauges (in flight, queued, pods by state, warm pool) are read at scrape time by a
collector, so invocations pay nothing for them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ember.activator.registry import Registry

DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
COLD_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)


class Metrics:
    """Every metric the activator exports."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.invocations = Counter(
            "ember_invocations",
            "Invocations by function, Version and outcome (success, function_error, throttled, error, timeout).",
            ["function", "version", "outcome"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "ember_invocation_duration_seconds",
            "Time from the activator receiving an invocation to its reply, by function and Version.",
            ["function", "version"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.cold_starts = Counter(
            "ember_cold_starts",
            "Pods specialized for a Version, by function and kind"
            " (pool_hit: a warm generic pod; pool_miss: started on demand).",
            ["function", "kind"],
            registry=self.registry,
        )
        self.cold_start_duration = Histogram(
            "ember_cold_start_duration_seconds",
            "Claim plus specialize time of one pod, by kind.",
            ["kind"],
            buckets=COLD_BUCKETS,
            registry=self.registry,
        )
        self.version_failures = Counter(
            "ember_version_load_failures",
            "Versions that failed to load, by function.",
            ["function"],
            registry=self.registry,
        )

    def watch_state(self, registry: Registry, warm_pods: Callable[[], Mapping[str, int]]) -> None:
        """Export gauges read from the live registry and pod source at scrape time."""
        self.registry.register(_StateCollector(registry, warm_pods))


class _StateCollector(Collector):
    def __init__(self, registry: Registry, warm_pods: Callable[[], Mapping[str, int]]) -> None:
        self._registry = registry
        self._warm = warm_pods

    def collect(self) -> Iterable[Metric]:
        in_flight = GaugeMetricFamily("ember_in_flight", "Invocations running on pods.", labels=["function", "version"])
        queued = GaugeMetricFamily(
            "ember_queue_depth", "Invocations waiting for a pod slot.", labels=["function", "version"]
        )
        pods = GaugeMetricFamily(
            "ember_pods",
            "Specialized pods by state (ready, starting, draining).",
            labels=["function", "version", "state"],
        )
        phase = GaugeMetricFamily(
            "ember_version_phase", "1 for the phase each Version is in.", labels=["function", "version", "phase"]
        )
        for fs in self._registry.functions():
            for vs in fs.versions.values():
                labels = [fs.label, str(vs.key.number)]
                in_flight.add_metric(labels, vs.throttler.in_flight)
                queued.add_metric(labels, vs.throttler.queued)
                pods.add_metric([*labels, "ready"], len(vs.throttler.pods))
                pods.add_metric([*labels, "starting"], vs.starting)
                pods.add_metric([*labels, "draining"], len(vs.draining))
                phase.add_metric([*labels, vs.phase.value], 1)
        warm = GaugeMetricFamily("ember_pool_pods", "Warm generic pods by pool.", labels=["pool"])
        for pool, count in self._warm().items():
            warm.add_metric([pool], count)
        return [in_flight, queued, pods, phase, warm]
