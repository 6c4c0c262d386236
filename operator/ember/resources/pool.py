"""Pool key → the generic warm pool Deployment: runtime agent pods that hold no code yet.

A pool is keyed by (runtime, sandbox, memory, policy hash) inside one namespace: pods are
interchangeable only within it. Its pods carry `ember.run/pool=<id>` and
`ember.run/state=generic`; the Deployment selects on both, so relabelling a pod's state (a
claim) takes it out of the Deployment and its ReplicaSet starts a replacement.

Pods run with restricted pod security whatever the sandbox: non-root, read-only root, every
capability dropped, seccomp RuntimeDefault, no service-account token. `limits.pids` is the agent's
RLIMIT_NPROC (`EMBER_AGENT_PIDS_LIMIT`, `pids_limit`): Kubernetes has no per-pod pids limit, but under
gVisor or Kata the pod's uid has a kernel of its own, so the rlimit counts exactly the pod's tasks.
The only writable places
are two emptyDirs: /tmp (sized by the policy) and the code directory, and, in the pools of a
Function with `state.volume`, that Function's claim (`ember.resources.state_volume`: the volume is
part of the key, since a generic pod cannot be given a volume once it runs).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Final

from ember.api.security_policy import SecurityPolicySpec
from ember.resources import labels
from ember.resources.meta import managed_labels
from ember.resources.state_volume import StateMount, pod_volume, volume_mount

CODE_DIR: Final = "/var/ember/code"
# Lambda gives one vCPU per 1769 MB; a pool's CPU request follows its memory the same way.
MIB_PER_CPU: Final = 1769
MIN_CPU_MILLICORES: Final = 50
# The CPU limit lets a pod burst above its share, to one CPU by default. A limit at the share
# throttles the sandbox itself (gVisor's Sentry runs in the pod's cgroup): with 128 MiB (72m) a warm
# invoke took 24.9 ms p50 against 2.2 ms at 339m, and loading code was throttled the same way.
# A burst of 0 puts the limit at the share (Guaranteed QoS; quotas on limits.cpu last longer).
# A Function that sets `resources.cpuMillicores` gets exactly that as request and limit, in pools of
# its own (`pool_id`): the user asked for a bound, throttled Sentry included.
BURST_CPU_MILLICORES: Final = 1000

AGENT_PORT: Final = 8080  # the runtime agent's port in a pool pod
SERVICES_PORT: Final = 8090  # the activators' services proxy (pods/services.py), for pools whose policy lists services
NAMESPACE_NAME_LABEL: Final = "kubernetes.io/metadata.name"  # set on every namespace by the API server


@dataclass(frozen=True, slots=True)
class ActivatorPeer:
    """The pods allowed to reach a pool's agents: the activators, by namespace and labels."""

    namespace: str = "ember-system"
    pod_labels: tuple[tuple[str, str], ...] = (("app.kubernetes.io/name", "ember-activator"),)

    def ingress_rule(self) -> dict[str, Any]:
        """The one NetworkPolicy ingress rule of a pool: these pods, to the agent's port."""
        return {"from": [self._peer()], "ports": [{"protocol": "TCP", "port": AGENT_PORT}]}

    def services_egress_rule(self) -> dict[str, Any]:
        """The NetworkPolicy egress rule of a pool whose policy lists auxiliary services: to these
        pods' services proxy only (the services themselves are the activators' to reach)."""
        return {"to": [self._peer()], "ports": [{"protocol": "TCP", "port": SERVICES_PORT}]}

    def _peer(self) -> dict[str, Any]:
        return {
            "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: self.namespace}},
            "podSelector": {"matchLabels": dict(self.pod_labels)},
        }


@dataclass(frozen=True, slots=True)
class PoolSpec:
    """Everything a pool Deployment is built from (the key plus how to run it)."""

    namespace: str
    runtime: str
    memory_mib: int
    policy: SecurityPolicySpec
    policy_hash: str
    image: str
    replicas: int
    image_pull_policy: str = "IfNotPresent"
    run_as_user: int = 65532
    cpu_burst_millicores: int = BURST_CPU_MILLICORES
    activators: ActivatorPeer = field(default_factory=ActivatorPeer)  # who may reach its agents
    calls: bool = False  # its pods' code calls portions: they reach the activators' port for it
    cpu_millicores: int | None = None  # `resources.cpuMillicores`: request and limit (None: follows memory)
    key_value: bool = False  # `state.keyValue`: its pods reach the activators' port for the Function's state
    volume: StateMount | None = None  # `state.volume`: its pods mount the Function's claim

    @property
    def sandbox(self) -> str:
        """Sandbox of the pool's pods."""
        return self.policy.sandbox

    @property
    def id(self) -> str:
        """Short stable id of the pool key, used as label value and name suffix."""
        return pool_id(
            runtime=self.runtime,
            sandbox=self.sandbox,
            memory_mib=self.memory_mib,
            policy_hash=self.policy_hash,
            calls=self.calls,
            cpu_millicores=self.cpu_millicores,
            key_value=self.key_value,
            volume=self.volume,
        )

    @property
    def name(self) -> str:
        """Name of the pool's Deployment."""
        return pool_name(self.id)


def pool_id(
    *,
    runtime: str,
    sandbox: str,
    memory_mib: int,
    policy_hash: str,
    calls: bool = False,
    cpu_millicores: int | None = None,
    key_value: bool = False,
    volume: StateMount | None = None,
) -> str:
    """16 hex digits identifying a pool key; equal keys give equal ids. Pods whose code calls
    portions (`calls`) have pools of their own: only theirs may reach the activators for it; so do
    pods with a CPU bound of their own (`cpu_millicores`), pods whose code uses the Function's
    key-value state (`key_value`: they reach the activators for it), and the pods of a Function
    with a volume (`volume`: they mount its claim)."""
    key = f"{runtime}/{sandbox}/{memory_mib}/{policy_hash}" + ("/calls" if calls else "")
    if cpu_millicores is not None:
        key += f"/cpu={cpu_millicores}"
    if key_value:
        key += "/kv"
    if volume is not None:
        key += f"/volume={volume}"
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def pool_name(pool_id_: str) -> str:
    """Deployment name of a pool."""
    return f"ember-pool-{pool_id_}"


def pool_selector(pool_id_: str) -> dict[str, str]:
    """Labels that select a pool's generic pods (the Deployment's selector)."""
    return {labels.POOL: pool_id_, labels.STATE: labels.STATE_GENERIC}


def cpu_millicores(memory_mib: int) -> int:
    """CPU that goes with an amount of memory."""
    return max(MIN_CPU_MILLICORES, memory_mib * 1000 // MIB_PER_CPU)


# Sandboxes with a kernel per pod, where RLIMIT_NPROC counts the pod's tasks and no one else's. Under
# `none` it would count every container of that uid on the node, so it is not set there, and
# `ember.api.unsupported` says so.
OWN_KERNEL_SANDBOXES: Final = frozenset({"gvisor", "kata"})


def pids_limit(policy: SecurityPolicySpec) -> int | None:
    """The agent's task bound (`EMBER_AGENT_PIDS_LIMIT`) under `policy`, or None where it cannot be per pod."""
    return policy.limits.pids if policy.sandbox in OWN_KERNEL_SANDBOXES else None


def _container(spec: PoolSpec) -> dict[str, Any]:
    if spec.cpu_millicores is not None:
        request = limit = spec.cpu_millicores
    else:
        request = cpu_millicores(spec.memory_mib)
        limit = max(request, spec.cpu_burst_millicores)
    requests = {"memory": f"{spec.memory_mib}Mi", "cpu": f"{request}m"}
    limits = {"memory": f"{spec.memory_mib}Mi", "cpu": f"{limit}m"}
    return {
        "name": "agent",
        "image": spec.image,
        "imagePullPolicy": spec.image_pull_policy,
        "env": [
            {"name": "EMBER_AGENT_PORT", "value": str(AGENT_PORT)},
            {"name": "EMBER_AGENT_CODE_DIR", "value": CODE_DIR},
            {"name": "EMBER_RUNTIME", "value": spec.runtime},
            *_pids_env(spec.policy),
        ],
        "ports": [{"name": "agent", "containerPort": AGENT_PORT, "protocol": "TCP"}],
        "readinessProbe": {
            "httpGet": {"path": "/healthz", "port": "agent"},
            "periodSeconds": 2,
            "timeoutSeconds": 1,
            "failureThreshold": 2,
        },
        "resources": {"requests": requests, "limits": limits},
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": spec.run_as_user,
            "runAsGroup": spec.run_as_user,
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": spec.policy.filesystem.read_only_root,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "volumeMounts": [
            {"name": "tmp", "mountPath": "/tmp"},
            {"name": "code", "mountPath": CODE_DIR},
            *([volume_mount(spec.volume)] if spec.volume is not None else []),
        ],
    }


def _pids_env(policy: SecurityPolicySpec) -> list[dict[str, str]]:
    limit = pids_limit(policy)
    return [] if limit is None else [{"name": "EMBER_AGENT_PIDS_LIMIT", "value": str(limit)}]


def pool_deployment(spec: PoolSpec) -> dict[str, Any]:
    """The Deployment keeping `spec.replicas` generic pods of a pool warm."""
    if spec.replicas < 0:
        raise ValueError(f"pool {spec.id}: replicas must not be negative (got {spec.replicas})")
    pod_labels = managed_labels(
        **pool_selector(spec.id), **{labels.RUNTIME: spec.runtime, labels.SANDBOX: spec.sandbox}
    )
    annotations = {
        labels.POLICY_HASH_ANNOTATION: spec.policy_hash,
        labels.POOL_KEY_ANNOTATION: f"{spec.runtime}/{spec.sandbox}/{spec.memory_mib}Mi"
        + (f"/{spec.cpu_millicores}m" if spec.cpu_millicores is not None else "")
        + (f"/{spec.volume}" if spec.volume is not None else ""),
    }
    pod_spec: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 5,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": spec.run_as_user,
            "runAsGroup": spec.run_as_user,
            "fsGroup": spec.run_as_user,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [_container(spec)],
        "volumes": [
            {"name": "tmp", "emptyDir": {"sizeLimit": f"{spec.policy.filesystem.tmp_size_mib}Mi"}},
            {"name": "code", "emptyDir": {"sizeLimit": "256Mi"}},
            *([pod_volume(spec.volume)] if spec.volume is not None else []),
        ],
    }
    if spec.volume is not None:
        # fsGroup makes the volume's files the pod user's; checking only its root keeps a large
        # volume from being walked at every pod start (a cold start of the pool's next pod)
        pod_spec["securityContext"]["fsGroupChangePolicy"] = "OnRootMismatch"
    runtime_class = spec.policy.runtime_class
    if runtime_class is not None:
        pod_spec["runtimeClassName"] = runtime_class
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {
            "name": spec.name,
            "namespace": spec.namespace,
            "labels": managed_labels(**{labels.POOL: spec.id, labels.COMPONENT: "pool", labels.RUNTIME: spec.runtime}),
            "annotations": dict(annotations),
        },
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": pool_selector(spec.id)},
            "template": {"metadata": {"labels": pod_labels, "annotations": annotations}, "spec": pod_spec},
        },
    }
