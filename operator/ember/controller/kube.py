"""The operator's Kubernetes API calls, asynchronous (kubernetes_asyncio), returning plain dicts.

Only the calls the reconcilers make live here, so the RBAC in the chart can be read off this
file. Every object comes back as the API server's JSON (camelCase dicts); a missing object is
`None` on reads and not an error on deletes. Other API errors become `KubeError`, which the
handlers turn into `kopf.TemporaryError` (retried with backoff).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

from kubernetes_asyncio import client, config
from kubernetes_asyncio.client.exceptions import ApiException

from ember.api.common import GROUP, VERSION
from ember.resources.objects import Obj as Obj  # re-exported: the controller's modules import it from here


class KubeError(Exception):
    """An API call failed for a reason other than a missing object."""

    def __init__(self, action: str, status: int, reason: str) -> None:
        self.status = status
        super().__init__(f"{action}: API server answered {status} {reason}")


class Conflict(KubeError):
    """The object changed (resourceVersion) or already exists: re-read and retry."""


async def connect() -> client.ApiClient:
    """An API client from the pod's service account, else from KUBECONFIG / ~/.kube/config."""
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except config.ConfigException:
        await config.load_kube_config()
    return client.ApiClient()


def _fail(action: str, err: ApiException) -> KubeError:
    kind = Conflict if err.status == 409 else KubeError
    return kind(action, int(err.status or 0), str(err.reason))


class Kube:
    """Typed-enough wrappers over the API groups the operator uses."""

    def __init__(self, api: client.ApiClient) -> None:
        # Typed as Any: bodies go in as plain dicts, which the client serializes as they are.
        self._api: Any = api
        self._custom: Any = client.CustomObjectsApi(api)
        self._core: Any = client.CoreV1Api(api)
        self._apps: Any = client.AppsV1Api(api)
        self._net: Any = client.NetworkingV1Api(api)
        self._node: Any = client.NodeV1Api(api)
        self._coordination: Any = client.CoordinationV1Api(api)

    async def close(self) -> None:
        """Close the HTTP session."""
        await self._api.close()

    def _plain(self, obj: Any) -> Obj:
        return cast(Obj, self._api.sanitize_for_serialization(obj))

    # Ember's own resources.

    async def list_custom(self, plural: str, namespace: str, *, label_selector: str = "") -> list[Obj]:
        """Objects of an Ember kind in a namespace."""
        try:
            out = await self._custom.list_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, label_selector=label_selector
            )
        except ApiException as err:
            raise _fail(f"list {plural} in {namespace}", err) from err
        return cast(list[Obj], out.get("items", []))

    async def get_custom(self, plural: str, namespace: str, name: str) -> Obj | None:
        """One Ember object, or None."""
        try:
            return cast(Obj, await self._custom.get_namespaced_custom_object(GROUP, VERSION, namespace, plural, name))
        except ApiException as err:
            if err.status == 404:
                return None
            raise _fail(f"get {plural} {namespace}/{name}", err) from err

    async def create_custom(self, plural: str, body: Obj) -> Obj:
        """Create an Ember object."""
        ns = body["metadata"]["namespace"]
        try:
            return cast(Obj, await self._custom.create_namespaced_custom_object(GROUP, VERSION, ns, plural, body))
        except ApiException as err:
            raise _fail(f"create {plural} {ns}/{body['metadata']['name']}", err) from err

    async def delete_custom(self, plural: str, namespace: str, name: str) -> bool:
        """Delete an Ember object; False when it was already gone."""
        try:
            await self._custom.delete_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name, propagation_policy="Background"
            )
        except ApiException as err:
            if err.status == 404:
                return False
            raise _fail(f"delete {plural} {namespace}/{name}", err) from err
        return True

    async def annotate_custom(self, plural: str, namespace: str, name: str, annotations: Mapping[str, str]) -> None:
        """Merge annotations into an Ember object (a change kopf sees as an update)."""
        patch = {"metadata": {"annotations": dict(annotations)}}
        try:
            await self._custom.patch_namespaced_custom_object(
                GROUP, VERSION, namespace, plural, name, patch, _content_type="application/merge-patch+json"
            )
        except ApiException as err:
            if err.status == 404:
                return
            raise _fail(f"annotate {plural} {namespace}/{name}", err) from err

    async def patch_custom_status(self, plural: str, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """Merge fields into an Ember object's status (its status subresource); a missing object is fine."""
        try:
            await self._custom.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                namespace,
                plural,
                name,
                {"status": dict(status)},
                _content_type="application/merge-patch+json",
            )
        except ApiException as err:
            if err.status == 404:
                return
            raise _fail(f"patch status of {plural} {namespace}/{name}", err) from err

    # Pods (read only: activators claim and release them; the operator counts them for Version status).

    async def list_pods(self, namespace: str, *, label_selector: str) -> list[Obj]:
        """Pods of a namespace matching a label selector."""
        try:
            found = await self._core.list_namespaced_pod(namespace, label_selector=label_selector)
        except ApiException as err:
            raise _fail(f"list pods {namespace} ({label_selector})", err) from err
        return [self._plain(p) for p in found.items]

    # ConfigMaps (code).

    async def get_configmap(self, namespace: str, name: str) -> Obj | None:
        """A ConfigMap, or None."""
        try:
            return self._plain(await self._core.read_namespaced_config_map(name, namespace))
        except ApiException as err:
            if err.status == 404:
                return None
            raise _fail(f"get configmap {namespace}/{name}", err) from err

    async def create_configmap(self, body: Obj) -> None:
        """Create a ConfigMap."""
        ns = body["metadata"]["namespace"]
        try:
            await self._core.create_namespaced_config_map(ns, body)
        except ApiException as err:
            raise _fail(f"create configmap {ns}/{body['metadata']['name']}", err) from err

    async def delete_configmap(self, namespace: str, name: str) -> bool:
        """Delete a ConfigMap; False when it was already gone."""
        try:
            await self._core.delete_namespaced_config_map(name, namespace)
        except ApiException as err:
            if err.status == 404:
                return False
            raise _fail(f"delete configmap {namespace}/{name}", err) from err
        return True

    # Deployments (pools).

    async def get_deployment(self, namespace: str, name: str) -> Obj | None:
        """A Deployment, or None."""
        try:
            return self._plain(await self._apps.read_namespaced_deployment(name, namespace))
        except ApiException as err:
            if err.status == 404:
                return None
            raise _fail(f"get deployment {namespace}/{name}", err) from err

    async def list_deployments(self, namespace: str, *, label_selector: str) -> list[Obj]:
        """Deployments in a namespace matching a selector."""
        try:
            out = await self._apps.list_namespaced_deployment(namespace, label_selector=label_selector)
        except ApiException as err:
            raise _fail(f"list deployments in {namespace}", err) from err
        return [self._plain(item) for item in out.items]

    async def create_deployment(self, body: Obj) -> None:
        """Create a Deployment."""
        ns = body["metadata"]["namespace"]
        try:
            await self._apps.create_namespaced_deployment(ns, body)
        except ApiException as err:
            raise _fail(f"create deployment {ns}/{body['metadata']['name']}", err) from err

    async def replace_deployment(self, body: Obj) -> None:
        """Replace a Deployment; its metadata.resourceVersion makes this fail on a concurrent change."""
        ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
        try:
            await self._apps.replace_namespaced_deployment(name, ns, body)
        except ApiException as err:
            raise _fail(f"replace deployment {ns}/{name}", err) from err

    async def scale_deployment(self, namespace: str, name: str, replicas: int) -> None:
        """Set a Deployment's replicas (its scale subresource); a missing Deployment is fine."""
        try:
            await self._apps.patch_namespaced_deployment_scale(name, namespace, {"spec": {"replicas": replicas}})
        except ApiException as err:
            if err.status == 404:
                return
            raise _fail(f"scale deployment {namespace}/{name}", err) from err

    # Leases (read only: each activator holds one and publishes its pool demand on it).

    async def list_leases(self, namespace: str, *, label_selector: str) -> list[Obj]:
        """Leases of a namespace matching a label selector."""
        try:
            found = await self._coordination.list_namespaced_lease(namespace, label_selector=label_selector)
        except ApiException as err:
            raise _fail(f"list leases {namespace} ({label_selector})", err) from err
        return [self._plain(item) for item in found.items]

    async def delete_deployment(self, namespace: str, name: str) -> bool:
        """Delete a Deployment and its pods; False when it was already gone."""
        try:
            await self._apps.delete_namespaced_deployment(name, namespace, propagation_policy="Background")
        except ApiException as err:
            if err.status == 404:
                return False
            raise _fail(f"delete deployment {namespace}/{name}", err) from err
        return True

    # NetworkPolicies (egress).

    async def get_network_policy(self, namespace: str, name: str) -> Obj | None:
        """A NetworkPolicy, or None."""
        try:
            return self._plain(await self._net.read_namespaced_network_policy(name, namespace))
        except ApiException as err:
            if err.status == 404:
                return None
            raise _fail(f"get networkpolicy {namespace}/{name}", err) from err

    async def create_network_policy(self, body: Obj) -> None:
        """Create a NetworkPolicy."""
        ns = body["metadata"]["namespace"]
        try:
            await self._net.create_namespaced_network_policy(ns, body)
        except ApiException as err:
            raise _fail(f"create networkpolicy {ns}/{body['metadata']['name']}", err) from err

    async def replace_network_policy(self, body: Obj) -> None:
        """Replace a NetworkPolicy (resourceVersion precondition in the body)."""
        ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
        try:
            await self._net.replace_namespaced_network_policy(name, ns, body)
        except ApiException as err:
            raise _fail(f"replace networkpolicy {ns}/{name}", err) from err

    async def delete_network_policy(self, namespace: str, name: str) -> bool:
        """Delete a NetworkPolicy; False when it was already gone."""
        try:
            await self._net.delete_namespaced_network_policy(name, namespace)
        except ApiException as err:
            if err.status == 404:
                return False
            raise _fail(f"delete networkpolicy {namespace}/{name}", err) from err
        return True

    # PersistentVolumeClaims (a Function's `state.volume`).

    async def get_persistent_volume_claim(self, namespace: str, name: str) -> Obj | None:
        """A PersistentVolumeClaim, or None."""
        try:
            return self._plain(await self._core.read_namespaced_persistent_volume_claim(name, namespace))
        except ApiException as err:
            if err.status == 404:
                return None
            raise _fail(f"get persistentvolumeclaim {namespace}/{name}", err) from err

    async def create_persistent_volume_claim(self, body: Obj) -> None:
        """Create a PersistentVolumeClaim."""
        ns = body["metadata"]["namespace"]
        try:
            await self._core.create_namespaced_persistent_volume_claim(ns, body)
        except ApiException as err:
            raise _fail(f"create persistentvolumeclaim {ns}/{body['metadata']['name']}", err) from err

    async def patch_persistent_volume_claim(self, namespace: str, name: str, patch: Mapping[str, Any]) -> None:
        """Merge a patch into a PersistentVolumeClaim (its storage request, its owner)."""
        try:
            await self._core.patch_namespaced_persistent_volume_claim(
                name, namespace, dict(patch), _content_type="application/merge-patch+json"
            )
        except ApiException as err:
            raise _fail(f"patch persistentvolumeclaim {namespace}/{name}", err) from err

    # RuntimeClasses (sandboxes).

    async def runtime_class_exists(self, name: str) -> bool:
        """Whether a RuntimeClass exists (cluster-scoped)."""
        try:
            await self._node.read_runtime_class(name)
        except ApiException as err:
            if err.status == 404:
                return False
            raise _fail(f"get runtimeclass {name}", err) from err
        return True
