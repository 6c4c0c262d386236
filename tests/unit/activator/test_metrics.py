"""What the activator's /metrics reads at scrape time from its Versions and its pod source (pure)."""

from __future__ import annotations

from prometheus_client import generate_latest

from ember.activator.metrics import Metrics


def test_warm_pools_and_discarded_pods_are_read_at_each_scrape() -> None:
    metrics = Metrics()
    warm = {"python3.12/gvisor/128Mi/abc": 2}
    discarded = [0]
    metrics.watch_state(lambda: [], lambda: warm, lambda: discarded[0])
    first = generate_latest(metrics.registry).decode()
    assert 'ember_pool_pods{pool="python3.12/gvisor/128Mi/abc"} 2.0' in first
    assert "ember_pods_discarded_bound_total 0.0" in first
    warm["python3.12/gvisor/128Mi/abc"] = 1
    discarded[0] = 3  # three pods another client had bound first
    second = generate_latest(metrics.registry).decode()
    assert 'ember_pool_pods{pool="python3.12/gvisor/128Mi/abc"} 1.0' in second
    assert "ember_pods_discarded_bound_total 3.0" in second
