"""Reconciler tables: objects before → writes, status and events after, with injected API faults.

The reconcilers run against `FakeKube` (in memory); the same reconcilers against a real
kube-apiserver are in tests/apiserver/test_operator_*.py.
"""

from __future__ import annotations

import copy
import datetime as dt
import json
from collections.abc import Callable
from typing import Any, cast

import pytest

from ember.api import unsupported
from ember.api.function import Function, FunctionSpec
from ember.api.security_policy import DEFAULT_POLICY, policy_hash
from ember.api.version import code_hash
from ember.controller import routes
from ember.controller.function import reconcile_function
from ember.controller.kube import KubeError
from ember.controller.policy import reconcile_security_policy
from ember.controller.settings import Settings
from ember.controller.version import reconcile_version, report_version_pods
from ember.resources.labels import LOAD_ERROR_ANNOTATION as LOAD_ERROR
from ember.resources.labels import LOADED_ANNOTATION
from ember.resources.pool import pool_id, pool_name
from ember.resources.version import build_version
from tests.unit.controller.fake_kube import FakeKube

NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
SETTINGS = Settings(keep_versions=2)
NS = "ns1"
Obj = dict[str, Any]


class Events:
    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []

    def __call__(self, obj: Any, *, type: str, reason: str, message: str) -> None:
        self.seen.append((obj["metadata"]["name"], type, reason))

    @property
    def reasons(self) -> list[str]:
        return [reason for _, _, reason in self.seen]


def _fn_body(**spec: Any) -> Obj:
    base: Obj = {"runtime": "python3.12", "handler": "main.handler", "code": {"inline": "x = 1\n"}}
    base.update(spec)
    return {
        "apiVersion": "ember.run/v1alpha1",
        "kind": "Function",
        "metadata": {"name": "hello", "namespace": NS},
        "spec": base,
    }


def _with_version(kube: FakeKube, fn: Obj, number: int, *, ready: bool, spec: Obj | None = None) -> None:
    model = Function.model_validate({**fn, "spec": spec or fn["spec"]})
    body = build_version(model, number=number, code_hash=code_hash(model.spec, DEFAULT_POLICY), policy=DEFAULT_POLICY)
    if ready:
        body["status"] = {"conditions": [{"type": "Ready", "status": "True", "reason": "Ready"}]}
    kube.add("versions", body)


def _conditions(status: Obj) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


Setup = Callable[[FakeKube, Obj], None]


def _pool_ids_hidden(write: str) -> str:
    """Pool names carry a hash; the tables name them by kind only."""
    if write.startswith("create deployment/"):
        return "create deployment/"
    if write.startswith("create networkpolicy/ember-pool-"):
        return "create networkpolicy/pool"
    return write


def _nothing(kube: FakeKube, fn: Obj) -> None:
    pass


def _v1_ready(kube: FakeKube, fn: Obj) -> None:
    _with_version(kube, fn, 1, ready=True)


def _v1_ready_pool_exists(kube: FakeKube, fn: Obj) -> None:
    _with_version(kube, fn, 1, ready=True)


def _old_versions(kube: FakeKube, fn: Obj) -> None:
    for n in (1, 2, 3):
        _with_version(kube, fn, n, ready=True, spec={**fn["spec"], "code": {"inline": f"v = {n}\n"}})


def _foreign_version(kube: FakeKube, fn: Obj) -> None:
    _with_version(kube, fn, 1, ready=True)
    kube.custom[("versions", NS, "hello-v1")]["metadata"]["ownerReferences"][0]["uid"] = "uid-of-an-earlier-hello"


def _no_runtime_class(kube: FakeKube, fn: Obj) -> None:
    kube.runtime_classes.clear()


# The pool `_fn_body` needs under the built-in default policy.
POOL = pool_name(
    pool_id(runtime="python3.12", sandbox="gvisor", memory_mib=128, policy_hash=policy_hash(DEFAULT_POLICY))
)


def _foreign(name: str, **metadata: Any) -> Obj:
    """An object someone else made, under a name Ember wants."""
    return {"metadata": {"name": name, "namespace": NS, **metadata}, "spec": {"theirs": True}}


def _foreign_pool(kube: FakeKube, fn: Obj) -> None:
    kube.deployments[(NS, POOL)] = kube._stored(_foreign(POOL, labels={"app": "mine"}))


def _foreign_pool_network_policy(kube: FakeKube, fn: Obj) -> None:
    kube.network_policies[(NS, POOL)] = kube._stored(_foreign(POOL))


def _foreign_network_policy(kube: FakeKube, fn: Obj) -> None:
    kube.network_policies[(NS, "ember-fn-hello")] = kube._stored(_foreign("ember-fn-hello"))


def _network_policy_controlled_by_another(kube: FakeKube, fn: Obj) -> None:
    controller = {"apiVersion": "example.com/v1", "kind": "Tenant", "name": "t", "uid": "u", "controller": True}
    body = _foreign(
        "ember-fn-hello", labels={"app.kubernetes.io/managed-by": "ember-operator"}, ownerReferences=[controller]
    )
    kube.network_policies[(NS, "ember-fn-hello")] = kube._stored(body)


def _network_policy_of_an_earlier_hello(kube: FakeKube, fn: Obj) -> None:
    controller = {
        "apiVersion": "ember.run/v1alpha1",
        "kind": "Function",
        "name": "hello",
        "uid": "uid-of-an-earlier-hello",
        "controller": True,
    }
    body = _foreign(
        "ember-fn-hello", labels={"app.kubernetes.io/managed-by": "ember-operator"}, ownerReferences=[controller]
    )
    kube.network_policies[(NS, "ember-fn-hello")] = kube._stored(body)


def _policy(**spec: Any) -> Setup:
    def setup(kube: FakeKube, fn: Obj) -> None:
        kube.add("securitypolicies", {"metadata": {"name": "p", "namespace": NS}, "spec": spec})

    return setup


@pytest.mark.parametrize(
    ("spec", "setup", "writes", "conditions", "latest", "ready", "events"),
    [
        pytest.param(
            {},
            _nothing,
            [
                "create versions/hello-v1",
                "create deployment/",
                "create networkpolicy/pool",
                "create networkpolicy/ember-fn-hello",
            ],
            {
                "Ready": ("Unknown", "VersionLoading"),
                "VersionReady": ("Unknown", "VersionLoading"),
                "PolicyResolved": ("True", "Resolved"),
                "EgressEnforced": ("True", "Enforced"),
            },
            1,
            None,
            ["VersionCreated", "PoolCreated", "Resolved", "Enforced"],
            id="new-function",
        ),
        pytest.param(
            {},
            _v1_ready,
            ["create deployment/", "create networkpolicy/pool", "create networkpolicy/ember-fn-hello"],
            {"Ready": ("True", "Ready"), "VersionReady": ("True", "Ready")},
            1,
            1,
            ["PoolCreated", "Ready", "Resolved", "Enforced"],
            id="unchanged-spec-no-new-version",
        ),
        pytest.param(
            {"scaling": {"maxScale": 3}, "traffic": [{"latest": True, "percent": 100}]},
            _v1_ready,
            ["create deployment/", "create networkpolicy/pool", "create networkpolicy/ember-fn-hello"],
            {"Ready": ("True", "Ready")},
            1,
            1,
            ["PoolCreated", "Ready", "Resolved", "Enforced"],
            id="scaling-and-traffic-do-not-mint",
        ),
        pytest.param(
            {},
            _old_versions,
            [
                "create versions/hello-v4",
                "delete versions/hello-v1",
                "delete configmap/hello-v1-code",
                "delete versions/hello-v2",
                "delete configmap/hello-v2-code",
                "create deployment/",
                "create networkpolicy/pool",
                "create networkpolicy/ember-fn-hello",
            ],
            {"VersionReady": ("Unknown", "VersionLoading")},
            4,
            3,
            ["VersionCreated", "VersionDeleted", "VersionDeleted", "PoolCreated", "Resolved", "Enforced"],
            id="retention-keeps-ready-and-last-n",
        ),
        pytest.param(
            {},
            _foreign_version,
            [
                "delete versions/hello-v1",
                "create versions/hello-v1",
                "create deployment/",
                "create networkpolicy/pool",
                "create networkpolicy/ember-fn-hello",
            ],
            {"VersionReady": ("Unknown", "VersionLoading")},
            1,
            None,
            ["VersionCreated", "PoolCreated", "Resolved", "Enforced"],
            id="versions-of-an-earlier-function-of-the-name-removed",
        ),
        pytest.param(
            {"securityPolicyRef": {"name": "missing"}},
            _nothing,
            [],  # no policy to freeze into a Version: none is made until it exists
            {"Ready": ("False", "SecurityPolicyMissing"), "PolicyResolved": ("False", "SecurityPolicyMissing")},
            None,
            None,
            ["SecurityPolicyMissing", "SecurityPolicyMissing"],
            id="missing-policy",
        ),
        pytest.param(
            {},
            _no_runtime_class,
            ["create versions/hello-v1"],
            {"PolicyResolved": ("False", "RuntimeClassMissing")},
            1,
            None,
            ["VersionCreated", "RuntimeClassMissing", "RuntimeClassMissing"],
            id="missing-runtime-class-no-pool",
        ),
        pytest.param(
            {"securityPolicyRef": {"name": "p"}},
            _policy(egress={"mode": "allowList", "allow": [{"host": "api.example.com"}]}),
            [
                "create versions/hello-v1",
                "create deployment/",
                "create networkpolicy/pool",
                "create networkpolicy/ember-fn-hello",
            ],
            {"EgressEnforced": ("False", "HostRulesNotEnforceable")},
            1,
            None,
            ["VersionCreated", "PoolCreated", "Resolved", "HostRulesNotEnforceable"],
            id="host-egress-not-enforceable",
        ),
        pytest.param(
            {"code": {"configMapRef": {"name": "absent"}}},
            _nothing,
            ["create networkpolicy/ember-fn-hello"],  # pools serve Versions: none yet
            {"VersionReady": ("False", "CodeMissing"), "Ready": ("False", "CodeMissing")},
            None,
            None,
            ["CodeMissing", "Resolved", "Enforced"],
            id="missing-code-configmap",
        ),
        pytest.param(
            {},
            _foreign_pool,
            ["create versions/hello-v1", "create networkpolicy/ember-fn-hello"],  # nor the pool's NetworkPolicy
            {"Ready": ("False", "NotOwned"), "VersionReady": ("Unknown", "VersionLoading")},
            1,
            None,
            ["VersionCreated", "NotOwned", "Resolved", "Enforced"],
            id="pool-deployment-not-ours",
        ),
        pytest.param(
            {},
            _foreign_pool_network_policy,
            ["create versions/hello-v1", "create deployment/", "create networkpolicy/ember-fn-hello"],
            {"Ready": ("False", "NotOwned"), "EgressEnforced": ("True", "Enforced")},
            1,
            None,
            ["VersionCreated", "PoolCreated", "NotOwned", "Resolved", "Enforced"],
            id="pool-network-policy-not-ours",
        ),
        pytest.param(
            {},
            _foreign_network_policy,
            ["create versions/hello-v1", "create deployment/", "create networkpolicy/pool"],
            {"Ready": ("False", "NotOwned"), "EgressEnforced": ("False", "NotOwned")},
            1,
            None,
            ["VersionCreated", "PoolCreated", "NotOwned", "Resolved", "NotOwned"],
            id="function-network-policy-not-ours",
        ),
        pytest.param(
            {},
            _network_policy_controlled_by_another,
            ["create versions/hello-v1", "create deployment/", "create networkpolicy/pool"],
            {"Ready": ("False", "NotOwned"), "EgressEnforced": ("False", "NotOwned")},
            1,
            None,
            ["VersionCreated", "PoolCreated", "NotOwned", "Resolved", "NotOwned"],
            id="network-policy-with-another-controller-not-ours",
        ),
        pytest.param(
            {},
            _network_policy_of_an_earlier_hello,
            [
                "create versions/hello-v1",
                "create deployment/",
                "create networkpolicy/pool",
                "replace networkpolicy/ember-fn-hello",
            ],
            {"Ready": ("Unknown", "VersionLoading"), "EgressEnforced": ("True", "Enforced")},
            1,
            None,
            ["VersionCreated", "PoolCreated", "Resolved", "Enforced"],
            id="network-policy-of-a-deleted-function-adopted",
        ),
    ],
)
async def test_reconcile_function(
    spec: Obj,
    setup: Setup,
    writes: list[str],
    conditions: dict[str, tuple[str, str]],
    latest: int | None,
    ready: int | None,
    events: list[str],
) -> None:
    kube = FakeKube()
    fn = kube.add("functions", _fn_body(**spec))
    setup(kube, fn)
    kube.writes.clear()
    recorder = Events()
    status = await reconcile_function(cast(Any, kube), SETTINGS, fn, now=NOW, record=recorder)
    assert [_pool_ids_hidden(w) for w in kube.writes] == writes
    assert _conditions(status).items() >= conditions.items()
    assert (status["latestVersion"], status["readyVersion"]) == (latest, ready)
    assert status["observedGeneration"] == 1
    assert recorder.reasons == events


async def test_second_run_is_a_no_op() -> None:
    kube = FakeKube()
    fn = kube.add("functions", _fn_body())
    first = await reconcile_function(cast(Any, kube), SETTINGS, fn, now=NOW, record=Events())
    kube.writes.clear()
    fn["status"] = first
    recorder = Events()
    second = await reconcile_function(cast(Any, kube), SETTINGS, fn, now=NOW, record=recorder)
    assert kube.writes == []
    assert recorder.reasons == []
    assert _conditions(second) == _conditions(first)
    assert {k: v for k, v in second.items() if k != "conditions"} == {
        k: v for k, v in first.items() if k != "conditions"
    }


@pytest.mark.parametrize(
    ("setup", "store", "name"),
    [
        pytest.param(_foreign_pool, "deployments", POOL, id="pool-deployment"),
        pytest.param(_foreign_network_policy, "network_policies", "ember-fn-hello", id="function-network-policy"),
    ],
)
async def test_a_child_that_is_not_ours_is_left_alone_named_and_taken_once_gone(
    setup: Setup, store: str, name: str
) -> None:
    kube = FakeKube()
    fn = kube.add("functions", _fn_body())
    setup(kube, fn)
    children: dict[tuple[str, str], Obj] = getattr(kube, store)
    before = copy.deepcopy(children[(NS, name)])
    recorder = _Warnings()
    fn["status"] = await reconcile_function(cast(Any, kube), SETTINGS, fn, now=NOW, record=recorder)
    assert children[(NS, name)] == before, "untouched"
    ready = _condition(fn["status"], "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "NotOwned")
    assert name in ready["message"]
    assert "app.kubernetes.io/managed-by=ember-operator" in ready["message"]
    assert recorder.of("NotOwned")[0] == ("Warning", "NotOwned", ready["message"])

    kube.writes.clear()
    recorder = _Warnings()
    fn["status"] = await reconcile_function(cast(Any, kube), SETTINGS, fn, now=NOW, record=recorder)
    assert kube.writes == [], "level-based: nothing new to write"
    assert recorder.seen == [], "nor to say"

    del children[(NS, name)]
    fn["status"] = await reconcile_function(cast(Any, kube), SETTINGS, fn, now=NOW, record=Events())
    assert children[(NS, name)]["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "ember-operator"
    assert _conditions(fn["status"])["Ready"] == ("Unknown", "VersionLoading")


async def test_a_deleted_pool_leaves_a_network_policy_that_is_not_ours() -> None:
    kube = FakeKube()
    kube.add("securitypolicies", {"metadata": {"name": "p", "namespace": NS}, "spec": {}})
    fn = kube.add("functions", _fn_body(securityPolicyRef={"name": "p"}))
    await reconcile_function(cast(Any, kube), SETTINGS, fn, now=NOW, record=Events())
    (old_pool,) = kube.deployments
    kube.network_policies[old_pool] = kube._stored(_foreign(old_pool[1]))
    kube.custom[("securitypolicies", NS, "p")]["spec"] = {"filesystem": {"tmpSizeMiB": 32}}
    for v in ("hello-v1", "hello-v2"):
        await reconcile_function(cast(Any, kube), SETTINGS, fn, now=NOW, record=Events())
        kube.custom[("versions", NS, v)]["status"] = {"conditions": [{"type": "Ready", "status": "True"}]}
    await reconcile_function(cast(Any, kube), SETTINGS, fn, now=NOW, record=Events())
    assert old_pool not in kube.deployments, "the old pool goes once the new Version is ready"
    assert old_pool in kube.network_policies, "the NetworkPolicy of its name that is not Ember's stays"


async def test_two_functions_share_a_pool_and_it_goes_with_the_last() -> None:
    kube = FakeKube()
    a = kube.add("functions", _fn_body())
    b_body = _fn_body()
    b_body["metadata"]["name"] = "other"
    b = kube.add("functions", b_body)
    await reconcile_function(cast(Any, kube), SETTINGS, a, now=NOW, record=Events())
    await reconcile_function(cast(Any, kube), SETTINGS, b, now=NOW, record=Events())
    (pool,) = kube.deployments.values()
    assert {o["name"] for o in pool["metadata"]["ownerReferences"]} == {"hello", "other"}

    kube.add("securitypolicies", {"metadata": {"name": "p", "namespace": NS}, "spec": {"trustLevel": "trusted"}})
    a["spec"]["securityPolicyRef"] = {"name": "p"}
    await reconcile_function(cast(Any, kube), SETTINGS, a, now=NOW, record=Events())
    assert len(kube.deployments) == 2
    b["spec"]["securityPolicyRef"] = {"name": "p"}
    recorder = Events()
    await reconcile_function(cast(Any, kube), SETTINGS, b, now=NOW, record=recorder)
    (pool,) = kube.deployments.values()
    assert {o["name"] for o in pool["metadata"]["ownerReferences"]} == {"hello", "other"}
    assert "PoolDeleted" in recorder.reasons


async def test_invalid_spec_is_a_permanent_condition_without_writes() -> None:
    kube = FakeKube()
    fn = kube.add("functions", _fn_body(handler="no-dot"))
    recorder = Events()
    status = await reconcile_function(cast(Any, kube), SETTINGS, fn, now=NOW, record=recorder)
    assert _conditions(status)["Ready"] == ("False", "InvalidSpec")
    assert kube.writes == []
    assert recorder.seen == [("hello", "Warning", "InvalidSpec")]


@pytest.mark.parametrize(
    "method",
    ["list_custom", "create_custom", "get_custom", "create_deployment", "runtime_class_exists"],
)
async def test_api_faults_propagate_for_retry(method: str) -> None:
    kube = FakeKube()
    fn = kube.add("functions", _fn_body())
    kube.fail[method] = KubeError(method, 500, "Internal Server Error")
    with pytest.raises(KubeError, match="500"):
        await reconcile_function(cast(Any, kube), SETTINGS, fn, now=NOW, record=Events())


def _version(kube: FakeKube, **spec: Any) -> Obj:
    fn = kube.add("functions", _fn_body(**spec))
    _with_version(kube, fn, 1, ready=False)
    return kube.custom[("versions", NS, "hello-v1")]


async def test_version_stores_code_then_is_ready_once_a_pod_loaded_it() -> None:
    kube = FakeKube()
    version = _version(kube)
    status = await reconcile_version(cast(Any, kube), SETTINGS, version, now=NOW, record=Events())
    assert kube.configmaps[(NS, "hello-v1-code")]["data"] == {"main.py": "x = 1\n"}
    assert _conditions(status)["CodeReady"] == ("True", "CodeStored")
    assert _conditions(status)["Loaded"] == ("Unknown", "NotLoadedYet")
    assert _conditions(status)["Ready"] == ("Unknown", "NotLoadedYet")
    assert status["phase"] == "Loading"
    assert "annotate functions/hello" in kube.writes
    # What the operator writes once it counts a ready specialized pod: stays Ready at zero pods.
    version["status"] = status
    version["metadata"].setdefault("annotations", {})[LOADED_ANNOTATION] = version["spec"]["codeHash"]
    status = await reconcile_version(cast(Any, kube), SETTINGS, version, now=NOW, record=Events())
    assert _conditions(status)["Loaded"] == ("True", "Loaded")
    assert _conditions(status)["Ready"] == ("True", "Ready")
    assert status["phase"] == "Ready"


def _specialized_pod(name: str, *, ready: bool) -> Obj:
    labels = {"ember.run/function": "hello", "ember.run/version": "1", "ember.run/state": "specialized"}
    return {
        "metadata": {"name": name, "labels": labels},
        "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]},
    }


@pytest.mark.parametrize(
    ("annotations", "ready_pods", "loaded", "phase"),
    [
        pytest.param({}, 0, ("Unknown", "NotLoadedYet"), "Loading", id="not-loaded-yet"),
        pytest.param({}, 2, ("True", "Loaded"), "Ready", id="ready-pods"),
        pytest.param(
            {LOAD_ERROR: '{"codeHash": "$hash", "message": "ImportError: no numpy"}'},
            0,
            ("False", "LoadFailed"),
            "Failed",
            id="load-error",
        ),
        pytest.param(
            {LOAD_ERROR: '{"codeHash": "sha256:other", "message": "x"}'},
            0,
            ("Unknown", "NotLoadedYet"),
            "Loading",
            id="load-error-of-other-code-ignored",
        ),
        pytest.param(
            {LOAD_ERROR: '{"codeHash": "$hash", "message": "flaky"}'},
            1,
            ("True", "Loaded"),
            "Ready",
            id="a-pod-that-loaded-wins",
        ),
        pytest.param({LOAD_ERROR: "not json"}, 0, ("Unknown", "NotLoadedYet"), "Loading", id="garbled-mark"),
    ],
)
async def test_version_loaded_condition_from_the_evidence(
    annotations: dict[str, str], ready_pods: int, loaded: tuple[str, str], phase: str
) -> None:
    kube = FakeKube()
    version = _version(kube)
    digest = version["spec"]["codeHash"]
    version["metadata"]["annotations"] = {k: v.replace("$hash", digest) for k, v in annotations.items()}
    for i in range(ready_pods):
        kube.pods[(NS, f"p{i}")] = _specialized_pod(f"p{i}", ready=True)
    kube.pods[(NS, "not-ready")] = _specialized_pod("not-ready", ready=False)  # never counts
    status = await reconcile_version(cast(Any, kube), SETTINGS, version, now=NOW, record=Events())
    assert _conditions(status)["Loaded"] == loaded
    assert status["phase"] == phase
    assert "readyPods" not in status, "one writer of readyPods: report_version_pods, on pod events"
    if loaded[1] == "LoadFailed":
        ready = next(c for c in status["conditions"] if c["type"] == "Ready")
        assert "ImportError: no numpy" in ready["message"], "the import error reaches kubectl describe"


async def test_three_bad_edits_in_a_row_never_delete_the_serving_version() -> None:
    # keep_versions=2 here: v1 loaded and serves; v2, v3 and v4 failed to load. Only v1 is Ready.
    kube = FakeKube()
    fn = kube.add("functions", _fn_body(code={"inline": "v = 5\n"}))
    _with_version(kube, fn, 1, ready=True, spec={**fn["spec"], "code": {"inline": "v = 1\n"}})
    for n in (2, 3, 4):
        _with_version(kube, fn, n, ready=False, spec={**fn["spec"], "code": {"inline": f"import nope{n}\n"}})
        kube.custom[("versions", NS, f"hello-v{n}")]["status"] = {
            "conditions": [{"type": "Ready", "status": "False", "reason": "LoadFailed", "message": "ImportError"}]
        }
    status = await reconcile_function(cast(Any, kube), SETTINGS, fn, now=NOW, record=Events())
    assert ("versions", NS, "hello-v1") in kube.custom, "the Version that serves stays"
    assert status["readyVersion"] == 1
    assert status["latestVersion"] == 5
    deleted = sorted(w for w in kube.writes if w.startswith("delete versions/"))
    assert deleted == ["delete versions/hello-v2", "delete versions/hello-v3"]


async def test_policy_edit_is_a_new_version_and_the_serving_one_keeps_its_pool() -> None:
    kube = FakeKube()
    kube.add("securitypolicies", {"metadata": {"name": "p", "namespace": NS}, "spec": {}})
    fn = kube.add("functions", _fn_body(securityPolicyRef={"name": "p"}))
    await reconcile_function(cast(Any, kube), SETTINGS, fn, now=NOW, record=Events())
    v1 = kube.custom[("versions", NS, "hello-v1")]
    v1["status"] = {"conditions": [{"type": "Ready", "status": "True", "reason": "Ready"}]}
    (old_pool,) = kube.deployments
    kube.custom[("securitypolicies", NS, "p")]["spec"] = {"filesystem": {"tmpSizeMiB": 32}}
    status = await reconcile_function(cast(Any, kube), SETTINGS, fn, now=NOW, record=Events())
    v2 = kube.custom[("versions", NS, "hello-v2")]
    assert v2["spec"]["policy"]["filesystem"]["tmpSizeMiB"] == 32
    assert v2["spec"]["policyName"] == "p"
    assert v2["spec"]["codeHash"] != v1["spec"]["codeHash"]
    assert (status["latestVersion"], status["readyVersion"]) == (2, 1)
    assert len(kube.deployments) == 2
    assert old_pool in kube.deployments, "v1 serves from its pool while v2 loads"
    v2["status"] = {"conditions": [{"type": "Ready", "status": "True", "reason": "Ready"}]}
    await reconcile_function(cast(Any, kube), SETTINGS, fn, now=NOW, record=Events())
    assert old_pool not in kube.deployments, "the old pool goes once the new Version is ready"


async def test_a_spec_over_its_policy_limits_mints_no_version_and_the_serving_one_stays() -> None:
    kube = FakeKube()
    kube.add(
        "securitypolicies", {"metadata": {"name": "p", "namespace": NS}, "spec": {"limits": {"maxMemoryMiB": 256}}}
    )
    fn = kube.add("functions", _fn_body(securityPolicyRef={"name": "p"}, resources={"memoryMiB": 256}))
    await reconcile_function(cast(Any, kube), SETTINGS, fn, now=NOW, record=Events())
    kube.custom[("versions", NS, "hello-v1")]["status"] = {
        "conditions": [{"type": "Ready", "status": "True", "reason": "Ready"}]
    }
    fn["spec"]["resources"] = {"memoryMiB": 1024}
    recorder = Events()
    status = await reconcile_function(cast(Any, kube), SETTINGS, fn, now=NOW, record=recorder)
    assert ("versions", NS, "hello-v2") not in kube.custom, "no Version of a spec over the limits"
    assert (status["latestVersion"], status["readyVersion"]) == (1, 1)
    resolved = next(c for c in status["conditions"] if c["type"] == "PolicyResolved")
    assert (resolved["status"], resolved["reason"]) == ("False", "ExceedsPolicyLimits")
    assert (
        "spec.resources.memoryMiB (1024) exceeds limits.maxMemoryMiB (256) of SecurityPolicy 'p'"
        in (resolved["message"])
    )
    assert _conditions(status)["Ready"] == ("False", "ExceedsPolicyLimits")
    assert ("hello", "Warning", "ExceedsPolicyLimits") in recorder.seen
    assert len(kube.deployments) == 1, "the serving Version keeps its pool"


async def test_version_with_url_code_needs_no_configmap() -> None:
    kube = FakeKube()
    version = _version(kube, code={"url": "https://example.invalid/c.zip", "sha256": "a" * 64})
    status = await reconcile_version(cast(Any, kube), SETTINGS, version, now=NOW, record=Events())
    assert kube.configmaps == {}
    assert _conditions(status)["CodeReady"] == ("True", "CodeByUrl")


async def test_version_whose_configmap_changed_fails() -> None:
    kube = FakeKube()
    kube.configmaps[(NS, "src")] = {"metadata": {"name": "src"}, "data": {"main.py": "old"}}
    fn = kube.add("functions", _fn_body(code={"configMapRef": {"name": "src"}}))
    model = Function.model_validate(fn)
    digest = "sha256:" + "0" * 64
    kube.add(
        "versions",
        build_version(model, number=1, code_hash=code_hash(model.spec, DEFAULT_POLICY, digest), policy=DEFAULT_POLICY),
    )
    version = kube.custom[("versions", NS, "hello-v1")]
    status = await reconcile_version(cast(Any, kube), SETTINGS, version, now=NOW, record=Events())
    assert _conditions(status)["Ready"] == ("False", "VersionFailed")
    assert status["phase"] == "Failed"
    assert (NS, "hello-v1-code") not in kube.configmaps


def _code_configmap(version: Obj, data: dict[str, str], *, uid: str | None = None) -> Obj:
    owner = {"kind": "Version", "name": "hello-v1", "uid": uid or version["metadata"]["uid"], "controller": True}
    return {"metadata": {"name": "hello-v1-code", "ownerReferences": [owner]}, "data": data}


async def test_version_adopts_a_configmap_left_by_a_crash() -> None:
    kube = FakeKube()
    version = _version(kube)
    kube.configmaps[(NS, "hello-v1-code")] = _code_configmap(version, {"main.py": "x = 1\n"})
    status = await reconcile_version(cast(Any, kube), SETTINGS, version, now=NOW, record=Events())
    assert _conditions(status)["CodeReady"] == ("True", "CodeStored")
    assert not any(w.startswith("create configmap") for w in kube.writes)


@pytest.mark.parametrize(
    ("made", "problem"),
    [
        pytest.param(
            lambda v: {"metadata": {"name": "hello-v1-code"}, "data": {"main.py": "x = 1\n"}},
            "is not controlled by Version hello-v1",
            id="no-owner",
        ),
        pytest.param(
            lambda v: _code_configmap(v, {"main.py": "x = 1\n"}, uid="someone-else"),
            "is not controlled by Version hello-v1",
            id="other-owner",
        ),
        pytest.param(
            lambda v: _code_configmap(v, {"main.py": "import os; os.system('curl evil')\n"}),
            "does not hold the code of Version hello-v1",
            id="other-code",
        ),
    ],
)
async def test_a_code_configmap_made_by_someone_else_is_never_run(made: Any, problem: str) -> None:
    """Anyone who may create ConfigMaps could plant `hello-v1-code` before the operator makes it."""
    kube = FakeKube()
    version = _version(kube)
    kube.configmaps[(NS, "hello-v1-code")] = made(version)
    status = await reconcile_version(cast(Any, kube), SETTINGS, version, now=NOW, record=Events())
    ready = next(c for c in status["conditions"] if c["type"] == "CodeReady")
    assert (ready["status"], ready["reason"]) == ("False", "NotOwned")
    assert problem in ready["message"]
    assert "delete it and Ember makes the Version's own" in ready["message"]


async def test_security_policy_status_and_functions_nudged() -> None:
    kube = FakeKube()
    kube.add("functions", _fn_body(securityPolicyRef={"name": "p"}))
    other = _fn_body()
    other["metadata"]["name"] = "unrelated"
    kube.add("functions", {**other, "spec": {**other["spec"], "securityPolicyRef": {"name": "q"}}})
    policy = kube.add("securitypolicies", {"metadata": {"name": "p", "namespace": NS}, "spec": {"sandbox": "kata"}})
    status = await reconcile_security_policy(cast(Any, kube), SETTINGS, policy, now=NOW, record=Events())
    assert _conditions(status)["Ready"] == ("False", "RuntimeClassMissing")
    assert len(status["policyHash"]) == 64
    assert kube.writes == ["annotate functions/hello"]


# Unsupported: fields accepted but not implemented yet (issue #10); informational, never part of Ready.


class _Warnings:
    """Events with their messages, for the Unsupported cases."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []

    def __call__(self, obj: Any, *, type: str, reason: str, message: str) -> None:
        self.seen.append((type, reason, message))

    def of(self, reason: str) -> list[tuple[str, str, str]]:
        return [event for event in self.seen if event[1] == reason]


def _condition(status: Obj, type_: str) -> Obj:
    return next(c for c in status["conditions"] if c["type"] == type_)


@pytest.fixture
def gaps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two Function fields on the unsupported list for these tests: none is a gap in a cluster now
    (state and freeze were the last, issue #15), and the condition must still work for the next one."""
    test_gaps: tuple[unsupported.Gap[FunctionSpec], ...] = (
        unsupported.Gap("spec.state", lambda s: s.state is not None),
        unsupported.Gap("spec.freeze", lambda s: s.freeze.enabled),
    )
    monkeypatch.setattr(unsupported, "FUNCTION_GAPS", test_gaps)


@pytest.mark.usefixtures("gaps")
async def test_function_setting_unimplemented_fields_is_told_once_without_losing_ready() -> None:
    kube = FakeKube()
    fn = kube.add("functions", _fn_body(freeze={"enabled": True}, state={"keyValue": True}))
    recorder = _Warnings()
    first = await reconcile_function(cast(Any, kube), SETTINGS, fn, now=NOW, record=recorder)
    message = "spec.state, spec.freeze are accepted but not implemented yet; they have no effect."
    assert _condition(first, "Unsupported") | {"lastTransitionTime": None} == {
        "type": "Unsupported",
        "status": "True",
        "reason": "FieldsNotImplemented",
        "message": message,
        "lastTransitionTime": None,
        "observedGeneration": 1,
    }
    assert recorder.of("FieldsNotImplemented") == [("Warning", "FieldsNotImplemented", message)]

    version = kube.custom[("versions", NS, "hello-v1")]
    version["status"] = {"conditions": [{"type": "Ready", "status": "True", "reason": "Ready"}]}
    fn["status"] = first
    recorder = _Warnings()
    second = await reconcile_function(cast(Any, kube), SETTINGS, fn, now=NOW, record=recorder)
    assert _conditions(second)["Ready"] == ("True", "Ready")
    assert _conditions(second)["Unsupported"] == ("True", "FieldsNotImplemented")
    assert recorder.of("FieldsNotImplemented") == []


@pytest.mark.usefixtures("gaps")
async def test_function_is_told_again_when_the_fields_change_and_when_they_are_gone() -> None:
    kube = FakeKube()
    fn = kube.add("functions", _fn_body(freeze={"enabled": True}))
    fn["status"] = await reconcile_function(cast(Any, kube), SETTINGS, fn, now=NOW, record=_Warnings())

    fn["spec"]["state"] = {"keyValue": True}
    recorder = _Warnings()
    fn["status"] = await reconcile_function(cast(Any, kube), SETTINGS, fn, now=NOW, record=recorder)
    assert [m for _, _, m in recorder.of("FieldsNotImplemented")] == [
        "spec.state, spec.freeze are accepted but not implemented yet; they have no effect."
    ]

    del fn["spec"]["state"], fn["spec"]["freeze"]
    recorder = _Warnings()
    status = await reconcile_function(cast(Any, kube), SETTINGS, fn, now=NOW, record=recorder)
    assert _conditions(status)["Unsupported"] == ("False", "AllSupported")
    assert [(t, r) for t, r, _ in recorder.seen if r in ("AllSupported", "FieldsNotImplemented")] == [
        ("Normal", "AllSupported")
    ]


async def test_function_without_unimplemented_fields_is_all_supported_without_an_event() -> None:
    kube = FakeKube()
    fn = kube.add("functions", _fn_body(freeze={"enabled": False}))
    recorder = _Warnings()
    status = await reconcile_function(cast(Any, kube), SETTINGS, fn, now=NOW, record=recorder)
    assert _conditions(status)["Unsupported"] == ("False", "AllSupported")
    assert recorder.of("AllSupported") == []


async def test_security_policy_setting_unimplemented_fields_is_told() -> None:
    kube = FakeKube()
    policy = kube.add(
        "securitypolicies",
        {
            "metadata": {"name": "p", "namespace": NS},
            "spec": {"trustLevel": "trusted", "limits": {"pids": 64}, "sandbox": "none", "allowUnsandboxed": True},
        },
    )
    recorder = _Warnings()
    status = await reconcile_security_policy(cast(Any, kube), SETTINGS, policy, now=NOW, record=recorder)
    message = "spec.limits.pids is accepted but not implemented yet; it has no effect."
    assert _condition(status, "Unsupported")["message"] == message
    assert _conditions(status)["Ready"] == ("True", "Ready")
    assert recorder.of("FieldsNotImplemented") == [("Warning", "FieldsNotImplemented", message)]


def _portion_policies(kube: FakeKube) -> None:
    for name, spec in (
        ("main", {"trustLevel": "trusted"}),
        ("parser", {"trustLevel": "untrusted"}),
        ("payments", {"trustLevel": "trusted", "egress": {"mode": "allowList", "allow": [{"cidr": "10.9.0.0/16"}]}}),
    ):
        kube.add("securitypolicies", {"metadata": {"name": name, "namespace": NS}, "spec": spec})


PORTIONS = [
    {"name": "parse", "handler": "main.parse", "securityPolicyRef": {"name": "parser"}},
    {"name": "charge", "handler": "main.charge", "securityPolicyRef": {"name": "payments"}},
]


async def test_a_function_with_portions_freezes_their_policies_and_gets_a_pool_for_each() -> None:
    kube = FakeKube()
    _portion_policies(kube)
    fn = kube.add("functions", _fn_body(securityPolicyRef={"name": "main"}, portions=PORTIONS))
    status = await reconcile_function(cast(Any, kube), SETTINGS, fn, now=NOW, record=Events())
    assert _conditions(status)["PolicyResolved"] == ("True", "Resolved")
    version = kube.custom[("versions", NS, "hello-v1")]
    frozen = version["spec"]["portionPolicies"]
    assert (frozen["parse"]["trustLevel"], frozen["charge"]["trustLevel"]) == ("untrusted", "trusted")
    # three pools: the handler's (which calls portions), the parser's, the payments part's
    assert len(kube.deployments) == 3
    pool_policies = [np for key, np in kube.network_policies.items() if key[1].startswith("ember-pool-")]
    egress = sorted(json.dumps(np["spec"]["egress"], sort_keys=True) for np in pool_policies)
    assert any("10.9.0.0/16" in e for e in egress), egress  # the payments part's allow-list, in its own pool
    assert sum("8090" in e for e in egress) == 1, egress  # only the caller's pool reaches the activators' port
    # the Function's own NetworkPolicy does not select its portions' pods
    selector = kube.network_policies[(NS, "ember-fn-hello")]["spec"]["podSelector"]
    assert selector["matchExpressions"] == [{"key": "ember.run/portion", "operator": "DoesNotExist"}]

    # a portion's policy edit is a new Version
    kube.custom[("securitypolicies", NS, "parser")]["spec"]["limits"] = {"pids": 32}
    await reconcile_function(cast(Any, kube), SETTINGS, fn, now=NOW, record=Events())
    assert ("versions", NS, "hello-v2") in kube.custom


async def test_portions_calling_up_in_trust_mint_no_version() -> None:
    kube = FakeKube()
    _portion_policies(kube)
    fn = kube.add("functions", _fn_body(portions=PORTIONS))  # the handler: the built-in default, untrusted
    recorder = Events()
    status = await reconcile_function(cast(Any, kube), SETTINGS, fn, now=NOW, record=recorder)
    assert ("versions", NS, "hello-v1") not in kube.custom
    resolved = _condition(status, "PolicyResolved")
    assert (resolved["status"], resolved["reason"]) == ("False", "PortionPoliciesRefused")
    assert "may not call portion 'charge' (trusted, SecurityPolicy 'payments')" in resolved["message"]
    assert _conditions(status)["Ready"] == ("False", "PortionPoliciesRefused")


async def test_a_portion_that_fails_to_load_shows_on_its_version_until_a_pod_of_it_loads() -> None:
    """PortionsLoaded: an activator's report per portion makes it False with the portion and its error
    (a Warning Event), the handler's own Loaded/Ready are untouched; the operator's mark of a ready
    pod of each portion makes it True, and an error for other code is ignored."""
    kube = FakeKube()
    _portion_policies(kube)
    fn = kube.add("functions", _fn_body(securityPolicyRef={"name": "main"}, portions=PORTIONS))
    await reconcile_function(cast(Any, kube), SETTINGS, fn, now=NOW, record=Events())
    version = kube.custom[("versions", NS, "hello-v1")]
    digest = version["spec"]["codeHash"]
    version["metadata"]["annotations"] = {LOADED_ANNOTATION: digest}
    status = await reconcile_version(cast(Any, kube), SETTINGS, version, now=NOW, record=Events())
    assert _conditions(status)["PortionsLoaded"] == ("Unknown", "NotLoadedYet")
    assert "parse, charge" in _condition(status, "PortionsLoaded")["message"]

    version["status"] = status
    version["metadata"]["annotations"].update(
        {
            "load-error.ember.run/parse": json.dumps({"codeHash": digest, "message": "ImportError: no module lxml"}),
            "load-error.ember.run/charge": json.dumps({"codeHash": "sha256:older", "message": "old code"}),
        }
    )
    recorder = Events()
    status = await reconcile_version(cast(Any, kube), SETTINGS, version, now=NOW, record=recorder)
    failed = _condition(status, "PortionsLoaded")
    assert (failed["status"], failed["reason"]) == ("False", "PortionLoadFailed")
    assert "portion parse failed to load: ImportError: no module lxml" in failed["message"]
    assert "charge" not in failed["message"]  # its error is another code's
    assert ("hello-v1", "Warning", "PortionLoadFailed") in recorder.seen
    assert _conditions(status)["Ready"] == ("True", "Ready")  # the handler serves without its portions
    version["status"] = status
    again = Events()
    await reconcile_version(cast(Any, kube), SETTINGS, version, now=NOW, record=again)
    assert "PortionLoadFailed" not in again.reasons  # one Event per transition

    # a ready pod of each portion: the operator marks them (on the pods' events), then the Version is True
    for portion in ("parse", "charge"):
        pod = _specialized_pod(f"{portion}-pod", ready=True)
        pod["metadata"]["labels"]["ember.run/portion"] = portion
        kube.pods[(NS, f"{portion}-pod")] = pod
    await report_version_pods(cast(Any, kube), NS, "hello", "1")
    marked = kube.custom[("versions", NS, "hello-v1")]["metadata"]["annotations"]
    assert marked["loaded.ember.run/parse"] == marked["loaded.ember.run/charge"] == digest
    assert kube.custom[("versions", NS, "hello-v1")]["status"].get("readyPods", 0) == 0  # portions' pods are not
    version["metadata"]["annotations"].update(marked)
    status = await reconcile_version(cast(Any, kube), SETTINGS, version, now=NOW, record=Events())
    assert _conditions(status)["PortionsLoaded"] == ("True", "Loaded")


async def test_a_version_without_portions_has_no_portions_condition() -> None:
    kube = FakeKube()
    status = await reconcile_version(cast(Any, kube), SETTINGS, _version(kube), now=NOW, record=Events())
    assert "PortionsLoaded" not in _conditions(status)


def _routed(name: str, created: str, *paths: str) -> Obj:
    body = _fn_body(http={"routes": [{"path": p, "methods": ["GET"]} for p in paths]})
    body["metadata"] = {"name": name, "namespace": NS, "creationTimestamp": created}
    return body


async def test_the_later_function_of_a_route_conflict_is_told_and_the_earlier_serves() -> None:
    kube = FakeKube()
    # "zeta" is older than "alpha": creation order decides, as in the activator, not the name
    older = kube.add("functions", _routed("zeta", "2026-01-01T00:00:00Z", "/users/{id}", "/health2"))
    newer = kube.add("functions", _routed("alpha", "2026-01-02T00:00:00Z", "/users/{uid}", "/other"))
    older["status"] = await reconcile_function(cast(Any, kube), SETTINGS, older, now=NOW, record=Events())
    kube.custom[("functions", NS, "zeta")]["status"] = older["status"]
    assert _conditions(older["status"])["RoutesAccepted"] == ("True", "RoutesServed")
    assert older["status"]["routes"] == ["GET /users/{id}", "GET /health2"]
    recorder = Events()
    status = await reconcile_function(cast(Any, kube), SETTINGS, newer, now=NOW, record=recorder)
    assert _conditions(status)["RoutesAccepted"] == ("False", "RouteConflict")
    assert _condition(status, "RoutesAccepted")["message"] == (
        "route GET /users/{uid} is already served by Function ns1/zeta (GET /users/{id}); not served."
    )
    assert status["routes"] == ["GET /other"]
    # still invoked by its API: routes are not part of Ready (here waiting for its first Version to load)
    assert _conditions(status)["Ready"] == _conditions(older["status"])["Ready"]
    assert ("alpha", "Warning", "RouteConflict") in recorder.seen
    assert "annotate functions/zeta" not in kube.writes  # its stored condition is right: no nudge


async def test_a_route_change_nudges_the_function_whose_outcome_it_changes() -> None:
    kube = FakeKube()
    first = kube.add("functions", _routed("first", "2026-01-01T00:00:00Z", "/a"))
    second = kube.add("functions", _routed("second", "2026-01-02T00:00:00Z", "/a"))
    second["status"] = await reconcile_function(cast(Any, kube), SETTINGS, second, now=NOW, record=Events())
    kube.custom[("functions", NS, "second")]["status"] = second["status"]
    assert _conditions(second["status"])["RoutesAccepted"] == ("False", "RouteConflict")
    # the older Function gives the path up: the refused one must learn it without an edit of its own
    first["spec"]["http"]["routes"] = [{"path": "/b", "methods": ["GET"]}]
    kube.custom[("functions", NS, "first")] = first
    await reconcile_function(cast(Any, kube), SETTINGS, first, now=NOW, record=Events())
    assert "annotate functions/second" in kube.writes
    again = await reconcile_function(
        cast(Any, kube), SETTINGS, kube.custom[("functions", NS, "second")], now=NOW, record=Events()
    )
    assert _conditions(again)["RoutesAccepted"] == ("True", "RoutesServed")


async def test_a_deleted_function_nudges_the_ones_refused_its_routes() -> None:
    kube = FakeKube()
    refused = kube.add("functions", _routed("second", "2026-01-02T00:00:00Z", "/a"))
    refused["status"] = {"conditions": [{"type": "RoutesAccepted", "status": "False", "reason": "RouteConflict"}]}
    kube.add("functions", _routed("served", "2026-01-03T00:00:00Z", "/b"))
    await routes.function_deleted(cast(Any, kube), NS, "first", "t1")
    assert kube.writes == ["annotate functions/second"]


async def test_a_function_without_http_has_no_routes_condition() -> None:
    kube = FakeKube()
    fn = kube.add("functions", _fn_body())
    fn["status"] = {"conditions": [{"type": "RoutesAccepted", "status": "True", "reason": "RoutesServed"}]}
    status = await reconcile_function(cast(Any, kube), SETTINGS, fn, now=NOW, record=Events())
    assert "RoutesAccepted" not in _conditions(status)
    assert status["routes"] == []
