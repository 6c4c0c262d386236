"""The Kubernetes pod source: generic pods of the operator's pool Deployments, claimed by relabelling.

`source` claims, specializes, relabels and releases pods; `cache` holds the watch-fed pods;
`leases` names claim holders, keeps this activator's Lease and sweeps the pods of dead ones;
`code` reads a Version's uid and code once.
"""

from ember.pods.kubernetes.leases import CLAIMED_AT, CLAIMED_BY, holder_name, lease_name
from ember.pods.kubernetes.source import KubernetesPodSource, pool_id_of

__all__ = ["CLAIMED_AT", "CLAIMED_BY", "KubernetesPodSource", "holder_name", "lease_name", "pool_id_of"]
