"""The activator: Ember's data plane.

One invocation reads top to bottom: an API handler (`ember_api`, `lambda_api`) parses the
request → `invoke.Invoker` resolves the function and Version (`registry`, `traffic`) → the
Version's `throttler` hands out a pod slot (or queues, or throttles) → `agent_client` calls the
pod's runtime agent → the handler maps the reply. `scaler` claims, specializes and releases
pods through a `ember.pods.base.PodSource`, following `ember.scaling.autoscaler` decisions.
"""
