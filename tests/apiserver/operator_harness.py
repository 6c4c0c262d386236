"""Helpers of the apiserver-tier operator tests: CRDs applied, the operator as a real subprocess, polling.

The operator runs as `python -m ember.operator_main` against the session's real kube-apiserver, so
a test can SIGKILL it mid-reconcile and start it again. It is stopped by pid, even on failure,
and its log is printed when a test fails.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml
from kubernetes import client
from kubernetes.client.exceptions import ApiException

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"
GROUP, VERSION = "ember.run", "v1alpha1"
T = TypeVar("T")


def eventually(check: Callable[[], T | None], *, timeout_s: float = 30.0, what: str = "condition") -> T:
    """Poll `check` until it returns a truthy value; fail naming `what` and the last value seen."""
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except AssertionError as err:
            last = err
        else:
            if last:
                return last
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; last: {last!r}")


def apply_crds(api: client.ApiClient) -> None:
    """Create (or replace) Ember's CRDs from crds/ and wait until they are Established."""
    ext = client.ApiextensionsV1Api(api)
    names = []
    for path in sorted(CRDS.glob("*.yaml")):
        body = yaml.safe_load(path.read_text())
        names.append(body["metadata"]["name"])
        try:
            ext.create_custom_resource_definition(body)
        except ApiException as err:
            if err.status != 409:
                raise
            current = ext.read_custom_resource_definition(body["metadata"]["name"])
            body["metadata"]["resourceVersion"] = current.metadata.resource_version
            ext.replace_custom_resource_definition(body["metadata"]["name"], body)

    def established() -> bool:
        for name in names:
            crd = ext.read_custom_resource_definition(name)
            conds = {c.type: c.status for c in (crd.status.conditions or [])}
            if conds.get("Established") != "True":
                return False
        return True

    eventually(established, what="CRDs established")


@contextlib.contextmanager
def namespace(api: client.ApiClient) -> Iterator[str]:
    """A fresh namespace, deleted afterwards."""
    core = client.CoreV1Api(api)
    name = f"t-{uuid.uuid4().hex[:8]}"
    core.create_namespace({"metadata": {"name": name}})
    try:
        yield name
    finally:
        with contextlib.suppress(ApiException):
            core.delete_namespace(name)


class OperatorProcess:
    """`python -m ember.operator_main` as a subprocess watching one namespace."""

    def __init__(self, kubeconfig: Path, ns: str, log: Path, **env: str) -> None:
        self.kubeconfig = kubeconfig
        self.ns = ns
        self.log = log
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "EMBER_NAMESPACES": self.ns,
            "EMBER_KEEP_VERSIONS": "2",
            "EMBER_ACTIVATOR_URL": "http://activator.test:8080",
            "PYTHONUNBUFFERED": "1",
            **self.env,
        }
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ember.operator_main"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                start_new_session=True,
            )

    def kill(self) -> None:
        """SIGKILL: no cleanup, as a crash or an evicted pod."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 10 s."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 60) -> str:
        if not self.log.exists():
            return "(no log)"
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


class Ember:
    """Small accessors for the objects the tests read and write in one namespace."""

    def __init__(self, api: client.ApiClient, ns: str) -> None:
        self.ns = ns
        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.apps = client.AppsV1Api(api)
        self.net = client.NetworkingV1Api(api)
        self.coordination = client.CoordinationV1Api(api)

    def create(self, plural: str, body: dict[str, Any]) -> dict[str, Any]:
        body.setdefault("apiVersion", f"{GROUP}/{VERSION}")
        body["metadata"].setdefault("namespace", self.ns)
        out: dict[str, Any] = self.custom.create_namespaced_custom_object(GROUP, VERSION, self.ns, plural, body)
        return out

    def get(self, plural: str, name: str) -> dict[str, Any] | None:
        try:
            out: dict[str, Any] = self.custom.get_namespaced_custom_object(GROUP, VERSION, self.ns, plural, name)
        except ApiException as err:
            if err.status == 404:
                return None
            raise
        return out

    def patch(self, plural: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = self.custom.patch_namespaced_custom_object(GROUP, VERSION, self.ns, plural, name, patch)
        return out

    def versions(self, function: str) -> dict[int, dict[str, Any]]:
        items = self.custom.list_namespaced_custom_object(
            GROUP, VERSION, self.ns, "versions", label_selector=f"ember.run/function={function}"
        )["items"]
        return {item["spec"]["number"]: item for item in items}

    def configmap_names(self) -> set[str]:
        return {cm.metadata.name for cm in self.core.list_namespaced_config_map(self.ns).items}

    def pools(self) -> dict[str, Any]:
        items = self.apps.list_namespaced_deployment(self.ns, label_selector="ember.run/component=pool").items
        return {d.metadata.name: d for d in items}

    def version_pod(self, name: str, *, function: str, version: str, state: str, ready: bool) -> None:
        """A pod as an activator leaves it (labels) and a kubelet reports it (status), written by hand.

        No controller-manager or kubelet runs in this tier, so the namespace's default
        ServiceAccount is made here and the pod's status is written through the status subresource."""
        with contextlib.suppress(ApiException):  # 409: made by an earlier call
            self.core.create_namespaced_service_account(self.ns, {"metadata": {"name": "default"}})
        labels = {"ember.run/function": function, "ember.run/version": version, "ember.run/state": state}
        body = {
            "metadata": {"name": name, "labels": labels},
            "spec": {"containers": [{"name": "agent", "image": "localhost/ember-runtime-python3.12:dev"}]},
        }
        self.core.create_namespaced_pod(self.ns, body)
        condition_ = {"type": "Ready", "status": "True" if ready else "False"}
        self.core.patch_namespaced_pod_status(
            name, self.ns, {"status": {"phase": "Running", "conditions": [condition_]}}
        )

    def serve(self, function: str, number: int) -> None:
        """What an activator and a kubelet do once a pod has loaded a Version: a ready specialized pod.

        A Version is Ready only when stored *and* loaded; this is the evidence the operator reads."""
        self.version_pod(
            f"{function}-v{number}-pod", function=function, version=str(number), state="specialized", ready=True
        )

    def events(self, involved: str) -> list[Any]:
        items = self.core.list_namespaced_event(self.ns).items
        return [e for e in items if e.involved_object.name == involved]


def condition(obj: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    """A condition of an object's status ({} when absent)."""
    for cond in ((obj or {}).get("status") or {}).get("conditions", []):
        if cond["type"] == type_:
            return dict(cond)
    return {}


def hello_function(name: str = "hello", **spec: Any) -> dict[str, Any]:
    """A minimal valid Function body; `spec` entries replace the defaults."""
    defaults = {"inline": "def handler(event, context):\n    return 'hi'\n"}
    body: dict[str, Any] = {
        "kind": "Function",
        "metadata": {"name": name},
        "spec": {"runtime": "python3.12", "handler": "main.handler", "code": defaults, **spec},
    }
    return body


# Fixtures, imported by name into the test modules (tests/apiserver/conftest.py belongs to the cluster harness).


@pytest.fixture(scope="session")
def crds(api_client: client.ApiClient) -> client.ApiClient:
    apply_crds(api_client)
    node = client.NodeV1Api(api_client)
    try:
        node.create_runtime_class({"metadata": {"name": "gvisor"}, "handler": "runsc"})
    except client.exceptions.ApiException as err:
        if err.status != 409:
            raise
    return api_client


@pytest.fixture
def ns(crds: client.ApiClient) -> Iterator[str]:
    with namespace(crds) as name:
        yield name


@pytest.fixture
def ember(crds: client.ApiClient, ns: str) -> Ember:
    return Ember(crds, ns)


@pytest.fixture
def operator(kubeconfig: Path, ns: str, tmp_path: Path) -> Iterator[OperatorProcess]:
    proc = OperatorProcess(kubeconfig, ns, tmp_path / "operator.log")
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
        # Captured output is shown only when the test fails.
        print(f"--- operator log ({proc.log}) ---\n{proc.log_tail()}")


def ready_function(ember: Ember, name: str, *, generation: int | None = None) -> dict[str, Any] | None:
    fn = ember.get("functions", name)
    if fn is None or condition(fn, "Ready").get("status") != "True":
        return None
    if fn["status"].get("observedGeneration") != (generation or fn["metadata"]["generation"]):
        return None
    return fn
