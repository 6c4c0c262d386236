"""Prometheus metrics of the activator, on a registry of its own (one per app, so tests can run several).

Counters and histograms are updated on the hot path through label children cached per
Version; gauges (in flight, queued, pods by state, warm pool) are read at scrape time by a
collector, so invocations pay nothing for them. The collector is given a function that lists
each Version's `VersionGauges` (the registry's `gauges`), so this module knows no activator state.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900)
COLD_BUCKETS = (0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)


@dataclass(frozen=True, slots=True)
class VersionGauges:
    """One Version's gauges at scrape time."""

    function: str
    version: str
    in_flight: int
    queued: int
    ready: int
    starting: int
    draining: int
    phase: str


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
        self.async_events = Counter(
            "ember_async_events",
            "Asynchronous invocations by function and outcome (succeeded, retried, failed).",
            ["function", "outcome"],
            registry=self.registry,
        )
        self.async_delay = Histogram(
            "ember_async_delay_seconds",
            "Time from an asynchronous invocation's 202 to the start of its first attempt, by function.",
            ["function"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.async_depth = Gauge(
            "ember_async_depth",
            "Asynchronous invocations in the store, waiting or running (all functions; shared by the replicas).",
            registry=self.registry,
        )
        self.async_parked = Gauge(
            "ember_async_parked",
            "Asynchronous invocations set aside in the store while their Function runs at its capacity, by function"
            " (its backlog; shared by the replicas).",
            ["function"],
            registry=self.registry,
        )
        self.async_destinations = Counter(
            "ember_async_destination_records",
            "Destination records of asynchronous invocations by function, destination (onSuccess, onFailure)"
            " and outcome (sent; failed: a stream unreachable for DESTINATION_RETRY_S, the record dropped).",
            ["function", "destination", "outcome"],
            registry=self.registry,
        )
        self.freezes = Counter(
            "ember_pod_freezes",
            "Freezes and thaws of idle specialized pods by function and outcome"
            " (frozen, thawed, busy: an invocation came first, failed: the agent refused or was unreachable).",
            ["function", "outcome"],
            registry=self.registry,
        )
        self.thaw_wait = Histogram(
            "ember_thaw_wait_seconds",
            "Time an invocation on a frozen (or freezing) pod waited for a freeze under way to end"
            " before it was sent with its thaw.",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.source_messages = Counter(
            "ember_event_source_messages",
            "Messages of event sources by function, source and outcome"
            " (acked, retried, dead_lettered, dropped: dead-lettered without a dead-letter stream).",
            ["function", "source", "outcome"],
            registry=self.registry,
        )
        self.source_delay = Histogram(
            "ember_event_source_delay_seconds",
            "Time from a message entering its stream to the start of its first invocation.",
            ["function", "source"],
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.source_backlog = Gauge(
            "ember_event_source_backlog",
            "Messages of an event source's group not acked yet (waiting in the broker, or running).",
            ["function", "source"],
            registry=self.registry,
        )

    def watch_state(
        self,
        versions: Callable[[], Iterable[VersionGauges]],
        warm_pods: Callable[[], Mapping[str, int]],
        discarded_bound: Callable[[], int] = lambda: 0,
    ) -> None:
        """Export what is read at scrape time from the live Versions and the pod source: its warm
        pools, and the pods it discarded because someone else had bound their agent (an attack:
        function code reaching other agents where nothing isolates them)."""
        self.registry.register(_StateCollector(versions, warm_pods, discarded_bound))


class _StateCollector(Collector):
    def __init__(
        self,
        versions: Callable[[], Iterable[VersionGauges]],
        warm_pods: Callable[[], Mapping[str, int]],
        discarded_bound: Callable[[], int],
    ) -> None:
        self._versions = versions
        self._warm = warm_pods
        self._discarded_bound = discarded_bound

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
        for v in self._versions():
            labels = [v.function, v.version]
            in_flight.add_metric(labels, v.in_flight)
            queued.add_metric(labels, v.queued)
            pods.add_metric([*labels, "ready"], v.ready)
            pods.add_metric([*labels, "starting"], v.starting)
            pods.add_metric([*labels, "draining"], v.draining)
            phase.add_metric([*labels, v.phase], 1)
        warm = GaugeMetricFamily("ember_pool_pods", "Warm generic pods by pool.", labels=["pool"])
        for pool, count in self._warm().items():
            warm.add_metric([pool], count)
        discarded = CounterMetricFamily(
            "ember_pods_discarded_bound",
            "Pods discarded because another client had bound their agent before the activator.",
            value=self._discarded_bound(),
        )
        return [in_flight, queued, pods, phase, warm, discarded]
