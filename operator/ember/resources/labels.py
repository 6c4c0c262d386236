"""Label and annotation keys shared by the operator, the pod source and the chart."""

from __future__ import annotations

from typing import Final

PREFIX: Final = "ember.run"
# Set on a Function (to a fresh token) to make its handler reconcile it again.
NUDGE_ANNOTATION: Final = f"{PREFIX}/nudge"
FUNCTION: Final = f"{PREFIX}/function"
VERSION: Final = f"{PREFIX}/version"
POOL: Final = f"{PREFIX}/pool"
STATE: Final = f"{PREFIX}/state"
PORTION: Final = f"{PREFIX}/portion"  # on a specialized pod of one of its Version's portions
RUNTIME: Final = f"{PREFIX}/runtime"
SANDBOX: Final = f"{PREFIX}/sandbox"
COMPONENT: Final = f"{PREFIX}/component"
MANAGED_BY: Final = "app.kubernetes.io/managed-by"
MANAGER: Final = "ember-operator"

# Values of STATE: a generic pod is in its pool's Deployment; claiming one relabels it, which
# takes it out of the Deployment's selector (the ReplicaSet starts a replacement).
STATE_GENERIC: Final = "generic"
STATE_CLAIMED: Final = "claimed"
STATE_SPECIALIZED: Final = "specialized"

CODE_HASH_ANNOTATION: Final = f"{PREFIX}/code-hash"
POLICY_HASH_ANNOTATION: Final = f"{PREFIX}/policy-hash"
POOL_KEY_ANNOTATION: Final = f"{PREFIX}/pool-key"
# On a specialized pod: its containers' restart count when it was claimed. A restart since then
# means its agent came back generic (no code, no token): the pod is no endpoint any more.
AGENT_RESTARTS_ANNOTATION: Final = f"{PREFIX}/agent-restarts"
# Written on a Version by an activator whose pod could not load its code (JSON: codeHash, message);
# the operator folds it into the Version's Loaded condition. Successful loads need no mark: the
# Version's specialized pods are the evidence.
LOAD_ERROR_ANNOTATION: Final = f"{PREFIX}/load-error"
LOAD_ERROR_MAX_CHARS: Final = 1024
# Written on a Version by an activator: its right-sizing advice (JSON, `ember.scaling.rightsize`
# encode_report), at most once per interval unless the Version ran out of memory; the operator
# folds it into status.recommendation and status.resources.
SIZING_ANNOTATION: Final = f"{PREFIX}/sizing"
# Written on a Version by the operator once a pod has loaded its code (value: the code hash), so
# the Version stays Loaded after its pods are gone (scaled to zero).
LOADED_ANNOTATION: Final = f"{PREFIX}/loaded"
# A Version's portions (`spec.portions`), one annotation each, keyed by the portion's name (a DNS
# label, so a valid name part): the same evidence as the two above, per portion. An activator whose
# portion pod could not load writes `load-error.ember.run/<portion>` (JSON: codeHash, message); the
# operator writes `loaded.ember.run/<portion>` (the code hash) once a pod of it is ready. The operator
# folds both into the Version's PortionsLoaded condition.
PORTION_LOAD_ERROR_PREFIX: Final = "load-error.ember.run/"
PORTION_LOADED_PREFIX: Final = "loaded.ember.run/"
# On each activator's Lease: the claims it made per pool over the last minute (JSON, pool id ->
# count, `ember.scaling.pool_demand`); the operator sizes the pools from the sum.
POOL_DEMAND_ANNOTATION: Final = f"{PREFIX}/pool-demand"
