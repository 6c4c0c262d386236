"""Ember's API contract: pydantic models of the `ember.run/v1alpha1` resources.

The models are the single source of truth. `ember.api.crd` turns them into the CRD YAML in
`crds/`; the cross-field rules live twice on purpose, once as pydantic validators (so local
mode and the operator reject bad specs with the same words) and once as CEL
`x-kubernetes-validations` (so the API server rejects them before anything is stored).
"""

from ember.api.common import API_VERSION, GROUP, VERSION, Condition, ObjectMeta
from ember.api.function import Function, FunctionSpec, FunctionStatus
from ember.api.security_policy import SecurityPolicy, SecurityPolicySpec, SecurityPolicyStatus
from ember.api.version import Version, VersionSpec, VersionStatus, code_hash

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "Condition",
    "Function",
    "FunctionSpec",
    "FunctionStatus",
    "ObjectMeta",
    "SecurityPolicy",
    "SecurityPolicySpec",
    "SecurityPolicyStatus",
    "Version",
    "VersionSpec",
    "VersionStatus",
    "code_hash",
]
