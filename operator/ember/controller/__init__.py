"""The operator's kopf handlers: thin, level-based reconcilers that call `ember.resources` builders.

`settings` parses configuration, `kube` is the small async API layer (kubernetes_asyncio, never
the blocking client), `reconcile` computes and applies the desired state of each kind, and
`handlers` registers kopf handlers that only wire events to `reconcile`.
"""
