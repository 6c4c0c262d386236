"""The list of accepted-but-unimplemented fields (issue #10: no silent fields) stays true and complete.

Every entry of `ember.api.unsupported` is reported when a spec sets it (and only in the modes it
names); specs that set only implemented fields get no report; and every leaf field of
FunctionSpec and SecurityPolicySpec is classified, either by an entry or in IMPLEMENTED below, so
a field added to the models must be put on one side. The operator's condition and event are in
tests/unit/controller/test_reconcile.py, the CLI's lines in tests/local/test_unsupported_fields_cli.py.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from ember.api.function import FunctionSpec
from ember.api.security_policy import SecurityPolicySpec
from ember.api.unsupported import (
    FUNCTION_GAPS,
    LOCAL_ONLY,
    POLICY_GAPS,
    Gap,
    Mode,
    local_message,
    not_implemented_message,
    unsupported_function_fields,
    unsupported_policy_fields,
    unsupported_warning,
)
from ember.files import load_manifests

ROOT = Path(__file__).resolve().parents[3]
BASE_FUNCTION: dict[str, Any] = {"runtime": "python3.12", "handler": "main.handler", "code": {"inline": "x = 1\n"}}

# Where each implemented leaf field takes effect; the evidence is the code that reads it.
BOTH = "works in a cluster and in local mode"
NOT_LOCAL = "works in a cluster only; a LOCAL_ONLY entry reports it to ember dev"
LOUD_ELSEWHERE = "works in one mode; the other rejects it with an error (not silent)"

IMPLEMENTED: dict[str, str] = {
    # FunctionSpec
    "spec.runtime": BOTH,  # pods/payload.py pool_key, resources/pool.py image, pods/local/runtimes.py agent_command
    "spec.handler": BOTH,  # pods/payload.py specialize_request
    "spec.code.inline": BOTH,  # pods/payload.py code_payload, resources/code.py version_files
    "spec.code.filename": BOTH,  # same
    "spec.code.url": BOTH,  # pods/payload.py code_payload (the agent fetches and checks)
    "spec.code.sha256": BOTH,  # same
    "spec.code.configMapRef.name": LOUD_ELSEWHERE,  # controller/function.py; local: PayloadError, Version Failed
    "spec.code.configMapRef.key": LOUD_ELSEWHERE,  # resources/code.py files_from_configmap
    "spec.code.path": LOUD_ELSEWHERE,  # pods/payload.py (local); cluster: resources/code.py CodeError
    "spec.env{}": BOTH,  # pods/payload.py specialize_request
    "spec.resources.memoryMiB": BOTH,  # resources/pool.py limits; pods/local/sandbox.py memory cgroup (runsc)
    "spec.resources.cpuMillicores": BOTH,  # resources/pool.py _container; pods/local/sandbox.py _cpu_quota
    "spec.resources.autoResize": BOTH,  # scaling/rightsize.py applied_resources: activator/sizing.py, controller
    "spec.timeoutSeconds": BOTH,  # pods/payload.py; activator/registry.py timeout_s
    "spec.concurrency": BOTH,  # activator/throttler.py capacity, scaling/autoscaler.py
    "spec.scaling.minScale": BOTH,  # activator/registry.py scaling_params
    "spec.scaling.maxScale": BOTH,  # same
    "spec.scaling.keepAliveSeconds": BOTH,  # same
    "spec.scaling.targetUtilization": BOTH,  # same
    "spec.scaling.predictive": BOTH,  # activator/registry.py FunctionState.forecast, scaler.py _forecast
    "spec.securityPolicyRef.name": BOTH,  # controller/policy.py resolve_policy, devmode.py sync_registry
    "spec.traffic[].version": BOTH,  # activator/traffic.py, resources/retention.py
    "spec.traffic[].latest": BOTH,  # same
    "spec.traffic[].percent": BOTH,  # same
    "spec.aliases{}.version": BOTH,  # same
    "spec.aliases{}.additionalVersion": BOTH,  # same
    "spec.aliases{}.additionalWeight": BOTH,  # same
    "spec.http.routes[].path": BOTH,  # resources/routes.py compile_routes; activator/gateway.py route
    "spec.http.routes[].methods[]": BOTH,  # same
    "spec.http.routes[].host": BOTH,  # same
    "spec.http.routes[].qualifier": BOTH,  # same
    "spec.http.routes[].payloadFormat": BOTH,  # same
    "spec.http.routes[].authorizer": BOTH,  # same
    "spec.http.routes[].scopes[]": BOTH,  # same
    "spec.http.functionUrl.qualifier": BOTH,  # activator/gateway.py function_url
    "spec.http.functionUrl.authorizer": BOTH,  # same
    "spec.http.cors.allowOrigins[]": BOTH,  # activator/gateway.py _cors_headers, _preflight
    "spec.http.cors.allowMethods[]": BOTH,  # same
    "spec.http.cors.allowHeaders[]": BOTH,  # same
    "spec.http.cors.exposeHeaders[]": BOTH,  # same
    "spec.http.cors.maxAge": BOTH,  # same
    "spec.http.cors.allowCredentials": BOTH,  # same
    "spec.http.authorizers{}.jwt.issuer": BOTH,  # activator/authorizer.py JwtVerifier.verify
    "spec.http.authorizers{}.jwt.audiences[]": BOTH,  # same
    "spec.http.authorizers{}.jwt.jwksSecretRef.name": BOTH,  # same
    "spec.http.authorizers{}.jwt.jwksSecretRef.key": BOTH,  # same
    "spec.http.authorizers{}.jwt.algorithms[]": BOTH,  # same
    "spec.http.authorizers{}.jwt.leewaySeconds": BOTH,  # same
    "spec.async.maxRetries": BOTH,  # activator/async_invoke.py _run
    "spec.async.maxEventAgeSeconds": BOTH,  # same, and _system_retry
    "spec.async.onSuccess.function": BOTH,  # activator/async_invoke.py _send
    "spec.async.onFailure.function": BOTH,  # same
    **{
        f"spec.async.{kind}.{leaf}": BOTH  # activator/async_invoke.py _send, sources/publish.py
        for kind in ("onSuccess", "onFailure")
        for leaf in ("stream", "type", "connectionSecretRef.name", "connectionSecretRef.key")
    },
    "spec.eventSources[].type": BOTH,  # Poller._connect: sources/redis_stream_source.py or nats_source.py
    "spec.eventSources[].name": BOTH,  # activator/event_sources.py EventSources.desired (redis-stream)
    "spec.eventSources[].connectionSecretRef.name": BOTH,  # Poller._connect
    "spec.eventSources[].connectionSecretRef.key": BOTH,  # same
    "spec.eventSources[].stream": BOTH,  # sources/redis_stream_source.py StreamConsumer
    "spec.eventSources[].consumerGroup": BOTH,  # same
    "spec.eventSources[].batchSize": BOTH,  # Poller._poll
    "spec.eventSources[].batchWindowMs": BOTH,  # StreamConsumer.take
    "spec.eventSources[].maxConcurrency": BOTH,  # Poller._room
    "spec.eventSources[].maxRetries": BOTH,  # Poller._poison
    "spec.eventSources[].deadLetterStream": BOTH,  # Poller._bury
    "spec.eventSources[].enabled": BOTH,  # EventSources.desired
    "spec.portions[].name": BOTH,  # activator/registry.py _add_portions; controller/pools.py _pools_of
    "spec.portions[].handler": BOTH,  # resources/portions.py portion_spec
    "spec.portions[].securityPolicyRef.name": BOTH,  # resources/portions.py resolve_portions
    "spec.portions[].calls[]": BOTH,  # resources/portions.py callees -> activator/portions.py
    "spec.state.keyValue": BOTH,  # pods/payload.py PoolKey.key_value -> pods/services.py STATE -> ember/state
    "spec.state.volume.mountPath": BOTH,  # resources/state_volume.py; pods/local/sandbox.py bind mount
    "spec.state.volume.sizeMiB": NOT_LOCAL,  # resources/state_volume.py claim; a local folder is unbounded
    "spec.state.volume.storageClassName": NOT_LOCAL,  # same
    "spec.freeze.enabled": BOTH,  # activator/freezer.py Freezer.due
    "spec.freeze.idleSeconds": BOTH,  # same
    # SecurityPolicySpec
    "spec.allowUnsandboxed": BOTH,  # api/security_policy.py: the gate on sandbox none (model and CEL)
    "spec.sandbox": NOT_LOCAL,  # resources/pool.py runtimeClassName; local: pods/local/sandbox.py detect_sandbox
    "spec.runtimeClassName": NOT_LOCAL,  # same
    "spec.egress.mode": BOTH,  # resources/network_policy.py; pods/payload.py Isolation.network (local netns)
    "spec.egress.allow[].cidr": BOTH,  # resources/network_policy.py; pods/local/egress.py output_rules
    "spec.egress.allow[].host": NOT_LOCAL,  # denied and reported as EgressEnforced=False in a cluster
    "spec.egress.allow[].ports[]": BOTH,  # same
    "spec.filesystem.readOnlyRoot": NOT_LOCAL,  # resources/pool.py securityContext; local roots are read-only
    "spec.filesystem.tmpSizeMiB": BOTH,  # resources/pool.py emptyDir sizeLimit; pods/local/sandbox.py tmpfs
    "spec.limits.maxMemoryMiB": BOTH,  # resources/policy.py limit_violations: controller/function.py, devmode, validate
    "spec.limits.maxTimeoutSeconds": BOTH,  # same
    "spec.services[].name": BOTH,  # pods/payload.py Isolation.services -> pods/services.py ServiceProxy
    "spec.services[].url": BOTH,  # same: where calls go
    "spec.services[].credentialsSecretRef.name": BOTH,  # devmode.py Workspace.credential; pods/kubernetes/secrets.py
    "spec.services[].credentialsSecretRef.key": BOTH,  # same
    "spec.services[].header": BOTH,  # pods/services.py _handle
    "spec.services[].methods[]": BOTH,  # same
    "spec.services[].pathPrefixes[]": BOTH,  # pods/services.py path_problem
    "spec.trustLevel": BOTH,  # resources/portions.py may_call: activator/portions.py, devmode, controller
}

# A spec fragment setting exactly the entry's field, per entry.
FUNCTION_SAMPLES: dict[str, dict[str, Any]] = {
    "spec.state.volume.sizeMiB": {"state": {"volume": {"sizeMiB": 2048}}},
    "spec.state.volume.storageClassName": {"state": {"volume": {"storageClassName": "nfs"}}},
}
POLICY_SAMPLES: dict[str, dict[str, Any]] = {
    "spec.limits.pids": {"limits": {"pids": 64}, "sandbox": "none", "allowUnsandboxed": True},
    "spec.sandbox": {"sandbox": "kata"},
    "spec.runtimeClassName": {"runtimeClassName": "gvisor-systrap"},
    "spec.egress.allow[].host": {"egress": {"mode": "allowList", "allow": [{"host": "api.example.com"}]}},
    "spec.filesystem.readOnlyRoot": {"filesystem": {"readOnlyRoot": False}},
}


def _leaves(annotation: Any, path: str) -> Iterator[str]:
    """Leaf field paths under a model: `[]` marks list items, `{}` map values."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        for name, field in annotation.model_fields.items():
            yield from _leaves(field.annotation, f"{path}.{field.alias or name}")
    elif origin in (typing.Union, types.UnionType):
        for arg in args:
            if arg is not type(None):
                yield from _leaves(arg, path)
    elif origin is list:
        yield from _leaves(args[0], f"{path}[]")
    elif origin is dict:
        yield from _leaves(args[1], f"{path}{{}}")
    else:
        yield path


LEAVES = sorted({*_leaves(FunctionSpec, "spec"), *_leaves(SecurityPolicySpec, "spec")})
GAPS: list[Gap[Any]] = [*FUNCTION_GAPS, *POLICY_GAPS]


def _covers(gap: Gap[Any], leaf: str) -> bool:
    return leaf == gap.path or (leaf.startswith(gap.path) and leaf[len(gap.path)] in ".[{")


def _function(**fragment: Any) -> FunctionSpec:
    return FunctionSpec.model_validate({**BASE_FUNCTION, **fragment})


def test_every_leaf_field_is_classified_once() -> None:
    unclassified, twice = [], []
    for leaf in LEAVES:
        everywhere = any(_covers(g, leaf) for g in GAPS if g.modes != LOCAL_ONLY)
        if everywhere == (leaf in IMPLEMENTED):
            (twice if everywhere else unclassified).append(leaf)
    assert unclassified == [], "add each new field to ember.api.unsupported or to IMPLEMENTED here"
    assert twice == [], "a field is either implemented or on the unsupported list"
    assert set(IMPLEMENTED) <= set(LEAVES), "IMPLEMENTED names fields the models no longer have"


def test_local_only_entries_are_exactly_the_fields_that_work_in_a_cluster_only() -> None:
    local_only = {leaf for leaf in LEAVES if any(_covers(g, leaf) for g in GAPS if g.modes == LOCAL_ONLY)}
    assert local_only == {leaf for leaf, where in IMPLEMENTED.items() if where == NOT_LOCAL}


def test_every_entry_names_a_field_of_the_models() -> None:
    assert [g.path for g in GAPS if not any(_covers(g, leaf) for leaf in LEAVES)] == []
    assert len({g.path for g in GAPS}) == len(GAPS)


def test_about_forty_leaf_fields_do_nothing_in_a_cluster() -> None:
    cluster = [leaf for leaf in LEAVES if any(_covers(g, leaf) for g in GAPS if Mode.CLUSTER in g.modes)]
    # 42 before the policy limits on memory and timeout were enforced, 40 after, 35 once
    # auxiliary services worked (7 fields with methods and pathPrefixes), 31 with portions, 26 with
    # HTTP routes (their CORS, function URL and authorizer fields were added implemented), 23 with
    # durable async invocations (maxEventAgeSeconds and Function destinations; stream ones are not),
    # 12 with event sources (Redis Streams and NATS JetStream), 10 with stream destinations, 9 with
    # the predictor (scaling.predictive), 7 with right-sizing (resources.autoResize, cpuMillicores), 1
    # with shared state and freezing (state.*, freeze.*)
    assert len(cluster) == 1


@pytest.mark.parametrize("gap", FUNCTION_GAPS, ids=lambda g: g.path)
def test_a_function_setting_an_entry_is_told_in_its_modes(gap: Gap[FunctionSpec]) -> None:
    spec = _function(**FUNCTION_SAMPLES[gap.path])
    for mode in Mode:
        assert unsupported_function_fields(spec, mode) == ((gap.path,) if mode in gap.modes else ())


@pytest.mark.parametrize("gap", POLICY_GAPS, ids=lambda g: g.path)
def test_a_policy_setting_an_entry_is_told_in_its_modes(gap: Gap[SecurityPolicySpec]) -> None:
    spec = SecurityPolicySpec.model_validate(POLICY_SAMPLES[gap.path])
    for mode in Mode:  # a sample may set another entry too (pids needs sandbox none, a local gap)
        assert (gap.path in unsupported_policy_fields(spec, mode)) == (mode in gap.modes)


def test_a_pids_limit_is_a_gap_only_where_pods_share_the_nodes_kernel() -> None:
    for sandbox in ("gvisor", "kata"):
        spec = SecurityPolicySpec.model_validate({"limits": {"pids": 64}, "sandbox": sandbox})
        assert "spec.limits.pids" not in unsupported_policy_fields(spec, Mode.CLUSTER)
    assert "spec.limits.pids" not in unsupported_policy_fields(
        SecurityPolicySpec.model_validate({"limits": {"pids": 64}}), Mode.LOCAL
    )


def test_every_entry_has_a_sample() -> None:
    assert set(FUNCTION_SAMPLES) == {g.path for g in FUNCTION_GAPS}
    assert set(POLICY_SAMPLES) == {g.path for g in POLICY_GAPS}


def test_a_function_of_implemented_fields_and_written_defaults_is_not_told() -> None:
    spec = _function(
        code={"inline": "x = 1\n", "filename": "main.py"},
        env={"GREETING": "hi"},
        resources={"memoryMiB": 256, "autoResize": False},
        timeoutSeconds=10,
        concurrency=4,
        scaling={"minScale": 1, "maxScale": 5, "keepAliveSeconds": 60, "targetUtilization": 0.5, "predictive": False},
        securityPolicyRef={"name": "strict"},
        traffic=[{"version": 1, "percent": 90}, {"latest": True, "percent": 10}],
        aliases={"prod": {"version": 1, "additionalVersion": 2, "additionalWeight": 10}},
        http={"routes": []},
        eventSources=[],
        state={},
        portions=[],
        freeze={"enabled": False, "idleSeconds": 30},
        **{"async": {"maxRetries": 1, "maxEventAgeSeconds": 21600}},
    )
    assert unsupported_function_fields(spec, Mode.CLUSTER) == ()
    assert unsupported_function_fields(spec, Mode.LOCAL) == ()
    assert unsupported_warning(spec) is None


def test_a_policy_that_works_in_a_cluster_is_told_only_about_local_mode() -> None:
    spec = SecurityPolicySpec.model_validate(
        {
            "sandbox": "none",
            "allowUnsandboxed": True,
            "egress": {"mode": "allowList", "allow": [{"cidr": "10.0.0.0/8", "ports": [443]}]},
            "filesystem": {"readOnlyRoot": False},
            "limits": {"pids": 256},
            "trustLevel": "untrusted",
        }
    )
    assert unsupported_policy_fields(spec, Mode.CLUSTER) == ()
    assert unsupported_policy_fields(spec, Mode.LOCAL) == ("spec.sandbox", "spec.filesystem.readOnlyRoot")
    assert unsupported_policy_fields(SecurityPolicySpec(), Mode.LOCAL) == ()
    # egress `none`, a read-only root (the only one local mode offers) and a sized /tmp work there too
    written = {"egress": {"mode": "none"}, "filesystem": {"readOnlyRoot": True, "tmpSizeMiB": 16}}
    assert unsupported_policy_fields(SecurityPolicySpec.model_validate(written), Mode.LOCAL) == ()


def test_messages_name_every_field_and_agree_in_number() -> None:
    assert (
        not_implemented_message(["spec.state", "spec.freeze"])
        == "spec.state, spec.freeze are accepted but not implemented yet; they have no effect"
    )
    assert (
        not_implemented_message(["spec.freeze"]) == "spec.freeze is accepted but not implemented yet; it has no effect"
    )
    assert local_message(["spec.egress"]) == (
        "spec.egress is accepted but not implemented in local mode (ember dev); it has no effect there"
    )


def test_the_examples_are_told_what_they_set_in_vain() -> None:
    warnings = {r.metadata.name: unsupported_warning(r.spec) for r in load_manifests(ROOT / "examples")}
    assert warnings["hello-python"] is None
    assert warnings["greeter"] is None
    assert warnings["strict"] is None
