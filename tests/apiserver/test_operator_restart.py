"""The operator converges after a crash: a half-done reconcile is finished, nothing is duplicated.

Real kube-apiserver, the operator as a subprocess killed with SIGKILL (no shutdown code runs).
"""

from __future__ import annotations

from pathlib import Path

from tests.apiserver.operator_harness import (
    Ember,
    OperatorProcess,
    crds,
    ember,
    eventually,
    hello_function,
    ns,
    ready_function,
)

from ember.api.function import Function
from ember.api.security_policy import DEFAULT_POLICY
from ember.api.version import code_hash
from ember.resources.version import build_version

__all__ = ["crds", "ember", "ns"]


def test_crash_after_creating_a_version_is_finished_on_restart(ember: Ember, kubeconfig: Path, tmp_path: Path) -> None:
    # The state a crash leaves between "Version created" and "ConfigMap and status written".
    fn = ember.create("functions", hello_function())
    model = Function.model_validate({k: fn[k] for k in ("apiVersion", "kind", "metadata", "spec")})
    ember.create(
        "versions",
        build_version(model, number=1, code_hash=code_hash(model.spec, DEFAULT_POLICY), policy=DEFAULT_POLICY),
    )

    operator = OperatorProcess(kubeconfig, ember.ns, tmp_path / "operator.log")
    operator.start()
    try:
        eventually(lambda: "hello-v1-code" in ember.configmap_names(), what="code stored after restart")
        ember.serve("hello", 1)
        done = eventually(lambda: ready_function(ember, "hello"), what="Ready after restart")
        assert set(ember.versions("hello")) == {1}, "the existing Version is adopted, not duplicated"
        assert done["status"]["latestVersion"] == 1
        assert "hello-v1-code" in ember.configmap_names()
        assert len(ember.pools()) == 1
    finally:
        operator.stop()
        print(operator.log_tail())


def test_sigkill_during_a_burst_of_changes_converges(ember: Ember, kubeconfig: Path, tmp_path: Path) -> None:
    operator = OperatorProcess(kubeconfig, ember.ns, tmp_path / "operator.log")
    operator.start()
    try:
        ember.create("functions", hello_function())
        eventually(lambda: ember.versions("hello"), what="first Version")
        for n in range(2, 7):
            ember.patch("functions", "hello", {"spec": {"code": {"inline": f"def handler(e, c):\n    return {n}\n"}}})
            if n == 4:
                operator.kill()
        assert not operator.alive()
        operator.start()

        converged = eventually(
            lambda: (
                (f := ember.get("functions", "hello"))
                and (f.get("status") or {}).get("latestVersion") == max(ember.versions("hello"))
                and len(ember.versions("hello")) == 2
                and f
            ),
            timeout_s=60,
            what="convergence after SIGKILL",
        )
        ember.serve("hello", converged["status"]["latestVersion"])
        fn = eventually(lambda: ready_function(ember, "hello"), what="the newest Version Ready once loaded")
        versions = ember.versions("hello")
        newest = versions[max(versions)]
        model = Function.model_validate({k: fn[k] for k in ("apiVersion", "kind", "metadata", "spec")})
        assert newest["spec"]["codeHash"] == code_hash(model.spec, DEFAULT_POLICY), (
            "the newest Version runs the current spec"
        )
        assert newest["spec"]["function"]["code"]["inline"].endswith("return 6\n")
        hashes = [v["spec"]["codeHash"] for v in versions.values()]
        assert len(set(hashes)) == len(hashes), "no duplicate Versions of one content"
        assert {f"hello-v{n}-code" for n in versions} <= ember.configmap_names()
    finally:
        operator.stop()
        print(operator.log_tail())
