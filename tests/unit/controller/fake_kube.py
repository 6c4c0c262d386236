"""An in-memory stand-in for `ember.controller.kube.Kube`, for the reconciler table tests only.

It records every write (the "creates, updates, deletes" columns of a Knative-style table test)
and can be told to fail a method, to test how reconcilers handle API faults. The real API
server is used in tests/apiserver.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ember.controller.kube import Conflict, KubeError

Obj = dict[str, Any]


@dataclass
class FakeKube:
    custom: dict[tuple[str, str, str], Obj] = field(default_factory=dict)
    configmaps: dict[tuple[str, str], Obj] = field(default_factory=dict)
    deployments: dict[tuple[str, str], Obj] = field(default_factory=dict)
    network_policies: dict[tuple[str, str], Obj] = field(default_factory=dict)
    runtime_classes: set[str] = field(default_factory=lambda: {"gvisor"})
    pods: dict[tuple[str, str], Obj] = field(default_factory=dict)
    leases: list[Obj] = field(default_factory=list)
    writes: list[str] = field(default_factory=list)
    fail: dict[str, KubeError] = field(default_factory=dict)
    _rv: int = 0

    def _check(self, method: str) -> None:
        if method in self.fail:
            raise self.fail[method]

    def _stored(self, body: Obj) -> Obj:
        self._rv += 1
        out = copy.deepcopy(body)
        meta = out.setdefault("metadata", {})
        meta.setdefault("uid", f"uid-{meta['name']}")
        meta["resourceVersion"] = str(self._rv)
        meta.setdefault("generation", 1)
        return out

    def add(self, plural: str, body: Obj) -> Obj:
        stored = self._stored(body)
        self.custom[(plural, stored["metadata"]["namespace"], stored["metadata"]["name"])] = stored
        return stored

    async def list_custom(self, plural: str, namespace: str, *, label_selector: str = "") -> list[Obj]:
        self._check("list_custom")
        wanted = dict(part.split("=", 1) for part in label_selector.split(",") if part)
        return [
            copy.deepcopy(o)
            for (p, ns, _), o in sorted(self.custom.items())
            if p == plural and ns == namespace and wanted.items() <= o["metadata"].get("labels", {}).items()
        ]

    async def list_pods(self, namespace: str, *, label_selector: str = "") -> list[Obj]:
        self._check("list_pods")
        parts = [part for part in label_selector.split(",") if part]
        wanted = dict(part.split("=", 1) for part in parts if "=" in part)
        absent = {part[1:] for part in parts if part.startswith("!")}  # `!key`: no such label
        present = {part for part in parts if "=" not in part and not part.startswith("!")}  # `key`: any value
        return [
            copy.deepcopy(o)
            for (ns, _), o in sorted(self.pods.items())
            if ns == namespace
            and wanted.items() <= o["metadata"].get("labels", {}).items()
            and not absent & set(o["metadata"].get("labels", {}))
            and present <= set(o["metadata"].get("labels", {}))
        ]

    async def get_custom(self, plural: str, namespace: str, name: str) -> Obj | None:
        self._check("get_custom")
        found = self.custom.get((plural, namespace, name))
        return copy.deepcopy(found) if found else None

    async def create_custom(self, plural: str, body: Obj) -> Obj:
        self._check("create_custom")
        key = (plural, body["metadata"]["namespace"], body["metadata"]["name"])
        if key in self.custom:
            raise Conflict(f"create {plural}", 409, "AlreadyExists")
        self.writes.append(f"create {plural}/{key[2]}")
        return self.add(plural, body)

    async def delete_custom(self, plural: str, namespace: str, name: str) -> bool:
        self._check("delete_custom")
        self.writes.append(f"delete {plural}/{name}")
        return self.custom.pop((plural, namespace, name), None) is not None

    async def annotate_custom(self, plural: str, namespace: str, name: str, annotations: Mapping[str, str]) -> None:
        self._check("annotate_custom")
        self.writes.append(f"annotate {plural}/{name}")
        found = self.custom.get((plural, namespace, name))
        if found:
            found["metadata"].setdefault("annotations", {}).update(annotations)

    async def patch_custom_status(self, plural: str, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        self._check("patch_custom_status")
        self.writes.append(f"status {plural}/{name}")
        found = self.custom.get((plural, namespace, name))
        if found:
            found.setdefault("status", {}).update(copy.deepcopy(dict(status)))

    async def get_configmap(self, namespace: str, name: str) -> Obj | None:
        self._check("get_configmap")
        return copy.deepcopy(self.configmaps.get((namespace, name)))

    async def create_configmap(self, body: Obj) -> None:
        self._check("create_configmap")
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if key in self.configmaps:
            raise Conflict("create configmap", 409, "AlreadyExists")
        self.writes.append(f"create configmap/{key[1]}")
        self.configmaps[key] = self._stored(body)

    async def delete_configmap(self, namespace: str, name: str) -> bool:
        self._check("delete_configmap")
        self.writes.append(f"delete configmap/{name}")
        return self.configmaps.pop((namespace, name), None) is not None

    async def get_deployment(self, namespace: str, name: str) -> Obj | None:
        self._check("get_deployment")
        return copy.deepcopy(self.deployments.get((namespace, name)))

    async def list_deployments(self, namespace: str, *, label_selector: str) -> list[Obj]:
        self._check("list_deployments")
        wanted = dict(part.split("=", 1) for part in label_selector.split(",") if part)
        return [
            copy.deepcopy(d)
            for (ns, _), d in sorted(self.deployments.items())
            if ns == namespace and wanted.items() <= d["metadata"].get("labels", {}).items()
        ]

    async def create_deployment(self, body: Obj) -> None:
        self._check("create_deployment")
        self.writes.append(f"create deployment/{body['metadata']['name']}")
        self.deployments[(body["metadata"]["namespace"], body["metadata"]["name"])] = self._stored(body)

    async def replace_deployment(self, body: Obj) -> None:
        self._check("replace_deployment")
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if self.deployments[key]["metadata"]["resourceVersion"] != body["metadata"].get("resourceVersion"):
            raise Conflict("replace deployment", 409, "Conflict")
        self.writes.append(f"replace deployment/{key[1]}")
        self.deployments[key] = self._stored(body)

    async def scale_deployment(self, namespace: str, name: str, replicas: int) -> None:
        self._check("scale_deployment")
        self.writes.append(f"scale deployment/{name}={replicas}")
        found = self.deployments.get((namespace, name))
        if found:
            found["spec"]["replicas"] = replicas

    async def list_leases(self, namespace: str, *, label_selector: str) -> list[Obj]:
        self._check("list_leases")
        wanted = dict(part.split("=", 1) for part in label_selector.split(",") if part)
        return [
            copy.deepcopy(o)
            for o in self.leases
            if o["metadata"].get("namespace") == namespace and wanted.items() <= o["metadata"].get("labels", {}).items()
        ]

    async def delete_deployment(self, namespace: str, name: str) -> bool:
        self._check("delete_deployment")
        self.writes.append(f"delete deployment/{name}")
        return self.deployments.pop((namespace, name), None) is not None

    async def get_network_policy(self, namespace: str, name: str) -> Obj | None:
        self._check("get_network_policy")
        return copy.deepcopy(self.network_policies.get((namespace, name)))

    async def create_network_policy(self, body: Obj) -> None:
        self._check("create_network_policy")
        self.writes.append(f"create networkpolicy/{body['metadata']['name']}")
        self.network_policies[(body["metadata"]["namespace"], body["metadata"]["name"])] = self._stored(body)

    async def replace_network_policy(self, body: Obj) -> None:
        self._check("replace_network_policy")
        self.writes.append(f"replace networkpolicy/{body['metadata']['name']}")
        self.network_policies[(body["metadata"]["namespace"], body["metadata"]["name"])] = self._stored(body)

    async def delete_network_policy(self, namespace: str, name: str) -> bool:
        self._check("delete_network_policy")
        self.writes.append(f"delete networkpolicy/{name}")
        return self.network_policies.pop((namespace, name), None) is not None

    async def runtime_class_exists(self, name: str) -> bool:
        self._check("runtime_class_exists")
        return name in self.runtime_classes
