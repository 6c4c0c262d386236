"""The operator's kopf handlers: thin, level-based reconcilers that call `ember.resources` builders.

Each `reconcile_*` reads what exists, asks `ember.resources` what should exist, converges
(create what is missing, replace what differs, delete what is no longer wanted) and returns the
status to write. Nothing depends on having seen an event: running one twice, or after a restart
in the middle of a previous run, gives the same result. Transient API faults surface as
`KubeError` (the handler retries); invalid specs become `Ready=False, reason=InvalidSpec`.

One concern per module: `function` (a Function's Versions, retention, conditions), `version` (a
Version's code ConfigMap, Loaded/Ready, pod counts), `policy` (policy resolution, SecurityPolicy
status, nudging Functions), `pools` (the warm pools of the serving Versions and their
NetworkPolicies), `pool_size` (pool replicas from demand), `children` (writing a child object),
`status` (conditions and Events), `kube` (the small async API layer: kubernetes_asyncio, never the
blocking client), `settings` (configuration), and `handlers`, which registers kopf handlers that
only wire events to the reconcilers.

Who triggers whom: a Version that changes phase annotates its Function, and a SecurityPolicy
that changes annotates the Functions that use it; annotations are updates kopf hands to the
Function's handler; so do code ConfigMaps, RuntimeClasses and deleted pools (see handlers).
"""
