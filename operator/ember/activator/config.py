"""Settings of one activator; defaults fit local mode, tests shrink the windows."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ActivatorConfig:
    """Knobs of the activator. Times in seconds, sizes in bytes."""

    default_namespace: str = "default"
    max_body_bytes: int = 6 * 1024 * 1024
    queue_depth: int = 200  # invocations waiting per Version for a slot; one more is throttled (429)
    queue_timeout_s: float = 30.0  # longest wait for a slot; then 504
    retry_after_s: int = 1
    tick_s: float = 0.25  # autoscaler sampling and decision period
    stable_window_s: float = 60.0
    panic_window_s: float = 6.0
    panic_threshold: float = 2.0
    warm_pool_size: int = 1  # generic pods kept per pool key in use
    load_attempts: int = 3  # tries to get a first pod for a Version before it is Failed
    agent_timeout_margin_s: float = 2.0  # on top of the function's timeout
    sizing_tick_s: float = 1.0  # right-sizing's loop period (`ember.activator.sizing`)
    sizing_interval_s: float = 60.0  # a Version's advice is published, and shrinks, at most once per interval
    sizing_min_samples: int = 20  # invocations measured before right-sizing advises
    async_workers: int = 32  # asynchronous invocations run at once by this activator
    async_lease_s: float = 30.0  # a running event's lease, renewed every third of it; a dead worker's runs again after
    async_retry_base_s: float = 60.0  # wait before the first retry after a function error (Lambda: 1 min), x2 next
    predict_lead_s: float = 2.0  # scaling.predictive: a pod is prewarmed this long before an expected run
    predict_min_period_s: float = 60.0  # shortest timer period the predictor looks for

    def __post_init__(self) -> None:
        if self.queue_depth < 0:
            raise ValueError(f"queue_depth ({self.queue_depth}) must not be negative")
        if self.queue_timeout_s <= 0:
            raise ValueError(f"queue_timeout_s ({self.queue_timeout_s}) must be positive")
        if self.tick_s <= 0:
            raise ValueError(f"tick_s ({self.tick_s}) must be positive")
        if self.async_lease_s <= 0 or self.async_retry_base_s < 0:
            raise ValueError("async_lease_s must be positive and async_retry_base_s not negative")
        if self.sizing_tick_s <= 0 or self.sizing_interval_s < 0 or self.sizing_min_samples < 1:
            raise ValueError(
                f"sizing_tick_s ({self.sizing_tick_s}) must be positive, sizing_interval_s "
                f"({self.sizing_interval_s}) not negative and sizing_min_samples ({self.sizing_min_samples}) at least 1"
            )
        if self.max_body_bytes < 1:
            raise ValueError(f"max_body_bytes ({self.max_body_bytes}) must be positive")
