"""Label and annotation keys shared by the operator, the pod source and the chart."""

from __future__ import annotations

from typing import Final

PREFIX: Final = "ember.run"
FUNCTION: Final = f"{PREFIX}/function"
VERSION: Final = f"{PREFIX}/version"
POOL: Final = f"{PREFIX}/pool"
STATE: Final = f"{PREFIX}/state"
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
