"""One meaning of Ready: a Version is Ready when its code is stored *and* a pod has loaded it.

The operator runs as a subprocess against the session's real kube-apiserver. Loads are reported as
the activator reports them: a load error through the real `KubernetesPodSource.report_load_failure`
(an annotation on the Version), a successful load by a ready specialized pod (written by hand, as an
activator and a kubelet would leave it: no kubelet runs in this tier). Retention and the Function's
`readyVersion` follow that meaning; the activator's side (the scaler calling the report when a
specialize fails on bad code) is tested in the unit and cluster tiers.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from kubernetes_asyncio import client as aclient
from kubernetes_asyncio import config as aconfig
from tests.apiserver.operator_harness import (  # the fixtures are used by name
    Ember,
    OperatorProcess,
    condition,
    crds,
    ember,
    eventually,
    hello_function,
    ns,
    operator,
    ready_function,
)

from ember.pods.base import VersionKey
from ember.pods.kubernetes import KubernetesPodSource

__all__ = ["crds", "ember", "ns", "operator"]


def _report_load_failure(kubeconfig: Path, ember: Ember, number: int, message: str) -> None:
    """What an activator does when a pod refuses the Version's code: the real pod source's report."""
    code_hash = ember.versions("hello")[number]["spec"]["codeHash"]

    async def report() -> None:
        configuration = aclient.Configuration()
        await aconfig.load_kube_config(config_file=str(kubeconfig), client_configuration=configuration)
        async with aclient.ApiClient(configuration) as api:
            source = KubernetesPodSource(api, namespace=ember.ns, holder="test-activator")
            await source.report_load_failure(
                VersionKey(ember.ns, "hello", number), code_hash=code_hash, message=message
            )

    asyncio.run(report())


def test_three_bad_edits_in_a_row_never_delete_the_serving_version(
    ember: Ember, operator: OperatorProcess, kubeconfig: Path
) -> None:
    ember.create("functions", hello_function())
    ember.serve("hello", 1)
    eventually(lambda: ready_function(ember, "hello"), what="hello Ready on Version 1")

    # keep_versions is 2 for this operator: with Ready meaning "stored", the third bad edit deleted v1.
    for n in (2, 3, 4):
        ember.patch("functions", "hello", {"spec": {"code": {"inline": f"import missing_module_{n}\n"}}})
        eventually(lambda n=n: n in ember.versions("hello"), what=f"Version {n}")
        _report_load_failure(kubeconfig, ember, n, f"ImportError: No module named 'missing_module_{n}'")
        version = eventually(
            lambda n=n: (v := ember.versions("hello").get(n)) and condition(v, "Ready").get("status") == "False" and v,
            what=f"Version {n} Ready=False",
        )
        assert version["status"]["phase"] == "Failed"
        assert condition(version, "Loaded")["reason"] == "LoadFailed"
        assert f"missing_module_{n}" in condition(version, "Ready")["message"], "the error reaches kubectl describe"

    fn = eventually(
        lambda: (
            (f := ember.get("functions", "hello"))
            and (f.get("status") or {}).get("latestVersion") == 4
            and condition(f, "VersionReady").get("reason") == "VersionFailed"
            and f
        ),
        what="VersionReady False for Version 4",
    )
    assert fn["status"]["readyVersion"] == 1, "Version 1 is still the one that serves"
    assert "Version 1 serves meanwhile" in condition(fn, "VersionReady")["message"]
    eventually(lambda: set(ember.versions("hello")) == {1, 3, 4}, what="v2 collected, the serving v1 kept")
    assert "hello-v1-code" in ember.configmap_names()
    reasons = {(e.reason, e.type) for e in ember.events("hello-v4")}
    assert ("LoadFailed", "Warning") in reasons, "kubectl describe version shows why"


def test_a_load_error_of_other_code_does_not_fail_a_version(
    ember: Ember, operator: OperatorProcess, kubeconfig: Path
) -> None:
    ember.create("functions", hello_function())
    eventually(lambda: 1 in ember.versions("hello"), what="Version 1")
    # A mark whose code hash is not this Version's (e.g. copied by hand) is not evidence.
    ember.patch(
        "versions",
        "hello-v1",
        {"metadata": {"annotations": {"ember.run/load-error": '{"codeHash": "sha256:other", "message": "x"}'}}},
    )
    version = eventually(
        lambda: (v := ember.get("versions", "hello-v1")) and condition(v, "Loaded").get("reason") and v,
        what="Loaded condition",
    )
    assert condition(version, "Loaded")["status"] == "Unknown"
    ember.serve("hello", 1)
    eventually(lambda: ready_function(ember, "hello"), what="hello Ready once a pod loaded it")
