"""The Helm chart: CRDs identical to the generated ones, every value documented, lint and render with a real helm.

helm is built from the Go module proxy by charts/build-helm.sh (cached under ~/.cache/ember); the
chart's behaviour on a real API server is tested in tests/apiserver/test_helm_chart.py.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from ember.activator_main import parse_args
from ember.api import crd
from ember.controller.settings import from_env
from ember.resources.pool import SERVICES_PORT

ROOT = Path(__file__).resolve().parents[3]
CHART = ROOT / "charts" / "ember"
INVOKE_POD = "templates/tests/invoke-pod.yaml"


@pytest.fixture(scope="module")
def helm() -> str:
    out = subprocess.run(
        ["bash", str(ROOT / "charts" / "build-helm.sh")], capture_output=True, text=True, timeout=1800, check=True
    )
    return out.stdout.strip().splitlines()[-1]


def _render(helm: str, *args: str) -> list[dict[str, Any]]:
    out = subprocess.run(
        [helm, "template", "t", str(CHART), "--kube-version", "1.34.0", "--namespace", "ember-system", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.mark.parametrize("model", crd.RESOURCES, ids=lambda m: m.KIND)
def test_chart_ships_exactly_the_generated_crds(model: Any) -> None:
    shipped = CHART / "crds" / crd.file_name(model)
    assert shipped.read_text() == crd.render(model), f"{shipped} drifted: cp crds/*.yaml charts/ember/crds/"


def test_chart_has_no_other_crds() -> None:
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == sorted(crd.file_name(m) for m in crd.RESOURCES)


def _undocumented(lines: list[str]) -> list[str]:
    """Keys in values.yaml whose preceding comment does not start with the key's name."""
    missing = []
    for i, line in enumerate(lines):
        match = re.match(r"^(\s*)([A-Za-z][A-Za-z0-9]*):", line)
        if not match or line.lstrip().startswith("-"):
            continue
        key = match.group(2)
        previous = lines[i - 1].strip() if i else ""
        if not previous.startswith(f"# {key} "):
            missing.append(f"line {i + 1}: {key}")
    return missing


def test_every_value_is_documented_by_a_comment_starting_with_its_key() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    # requests/limits/cpu/memory under resources are Kubernetes' own fields.
    k8s_fields = {"requests", "limits", "cpu", "memory"}
    missing = [m for m in _undocumented(lines) if m.rsplit(": ", 1)[1] not in k8s_fields]
    assert missing == []


def test_documentation_check_catches_an_undocumented_key() -> None:
    assert _undocumented(["# a is documented", "a: 1", "b: 2"]) == ["line 3: b"]


def test_schema_covers_every_top_level_value() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert set(values) <= set(schema["properties"])
    assert schema["additionalProperties"] is False


def test_helm_lint_strict(helm: str) -> None:
    out = subprocess.run([helm, "lint", "--strict", str(CHART)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize(
    ("values", "message"),
    [
        pytest.param(["--set", "operator.keepVersions=0"], "keepVersions", id="keep-versions-zero"),
        pytest.param(["--set", "unknownValue=1"], "unknownValue", id="unknown-value"),
        pytest.param(["--set", "image.pullPolicy=Sometimes"], "pullPolicy", id="bad-pull-policy"),
        pytest.param(["--set", "runtimes.poolSizes.ruby=1"], "ruby", id="unknown-runtime"),
        pytest.param(["--set", "activator.replicas=0"], "replicas", id="no-activator"),
        pytest.param(
            ["--set", "activator.gateway.httpRoute.enabled=true"], "parentRefs", id="http-route-without-gateway"
        ),
        pytest.param(["--set", "activator.gateway.ingress.hosts[0]=Bad_Host.example"], "hosts", id="ingress-bad-host"),
        pytest.param(["--set", "activator.gateway.port=0"], "port", id="gateway-port-zero"),
        pytest.param(["--set", "asyncStore.redis.persistence.size=lots"], "size", id="redis-size"),
    ],
)
def test_schema_rejects_bad_values(helm: str, values: list[str], message: str) -> None:
    out = subprocess.run(
        [helm, "template", "t", str(CHART), "--kube-version", "1.34.0", *values], capture_output=True, text=True
    )
    assert out.returncode != 0
    assert message in out.stderr


def test_render_defaults(helm: str) -> None:
    docs = _render(helm, "--skip-tests")
    kinds = sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs)
    assert kinds == [
        "ClusterRole/t-ember-activator",
        "ClusterRole/t-ember-operator",
        "ClusterRoleBinding/t-ember-activator",
        "ClusterRoleBinding/t-ember-operator",
        "Deployment/t-ember-activator",
        "Deployment/t-ember-operator",
        "Deployment/t-ember-redis",
        "NetworkPolicy/t-ember-redis",
        "Role/t-ember-activator-secrets",
        "RoleBinding/t-ember-activator-secrets",
        "Secret/t-ember-redis",
        "Service/t-ember-activator",
        "Service/t-ember-redis",
        "ServiceAccount/t-ember-activator",
        "ServiceAccount/t-ember-operator",
    ]
    operator = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "t-ember-operator")
    pod = operator["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "localhost/ember-operator:0.1.0"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["EMBER_ACTIVATOR_URL"] == "http://t-ember-activator.ember-system.svc:8080"
    assert env["EMBER_KEEP_VERSIONS"] == "3"
    # the pools' NetworkPolicies admit exactly this release's activator pods
    activator = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "t-ember-activator")
    activator_labels = activator["spec"]["template"]["metadata"]["labels"]
    assert env["EMBER_ACTIVATOR_NAMESPACE"] == activator["metadata"]["namespace"] == "ember-system"
    wanted = dict(pair.split("=", 1) for pair in env["EMBER_ACTIVATOR_POD_LABELS"].split(","))
    assert wanted == {"app.kubernetes.io/name": "ember-activator", "app.kubernetes.io/instance": "t"}
    assert wanted.items() <= activator_labels.items()
    peer = from_env({k: v for k, v in env.items() if v is not None}).activators
    assert (peer.namespace, dict(peer.pod_labels)) == ("ember-system", wanted)
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}


def test_render_options(helm: str) -> None:
    docs = _render(
        helm,
        "--set",
        "runtimeClasses.gvisor.create=true",
        "--set",
        "runtimeClasses.kata.create=true",
        "--set",
        "image.registry=registry.example/ember",
        "--set",
        "image.tag=1.2.3",
        "--set",
        "runtimes.poolSizes.python3\\.12=4",
        "--set",
        "runtimes.poolSizes.nodejs20=0",
    )
    classes = {d["metadata"]["name"]: d["handler"] for d in docs if d["kind"] == "RuntimeClass"}
    assert classes == {"gvisor": "runsc", "kata": "kata"}
    operator = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "t-ember-operator")
    container = operator["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == "registry.example/ember/ember-operator:1.2.3"
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["EMBER_POOL_SIZES"] == "nodejs20=0,python3.12=4"


def test_helm_test_hooks_deploy_and_invoke_a_function(helm: str) -> None:
    out = subprocess.run(
        [
            helm,
            "template",
            "t",
            str(CHART),
            "--kube-version",
            "1.34.0",
            "--show-only",
            "templates/tests/invoke-pod.yaml",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    pod = yaml.safe_load(out.stdout)
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    url = next(e["value"] for e in pod["spec"]["containers"][0]["env"] if e["name"] == "URL")
    assert url == "http://t-ember-activator.default.svc:8080/v1/namespaces/default/functions/t-ember-hello-test/invoke"


def test_the_activators_tuning_values_reach_its_settings(helm: str) -> None:
    """Pool demand and right-sizing are set in values, and the activator reads what the chart renders."""
    sets = ["activator.poolDemandWindowSeconds=120", "activator.sizing.intervalSeconds=30"]
    docs = _render(helm, "--skip-tests", *[a for pair in sets for a in ("--set", pair)])
    activator = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "t-ember-activator")
    (container,) = activator["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    args = parse_args([], env | {"POD_NAME": "t-ember-activator-0", "EMBER_ASYNC_STORE": "redis://r:6379/0"})
    assert (args.pool_demand_window_s, args.sizing_interval_s, args.sizing_min_samples) == (120, 30, 20)


@pytest.mark.parametrize(
    ("value", "key"),
    [
        ("activator.sizing.minSamples=0", "minSamples"),
        ("activator.sizing.intervalSeconds=-1", "intervalSeconds"),
        ("activator.poolDemandWindowSeconds=0", "poolDemandWindowSeconds"),
    ],
)
def test_bad_tuning_values_are_refused_by_the_schema(helm: str, value: str, key: str) -> None:
    out = subprocess.run(
        [helm, "template", "t", str(CHART), "--kube-version", "1.34.0", "--set", value], capture_output=True, text=True
    )
    assert out.returncode != 0
    assert key in out.stderr


def test_node_port_is_rendered_and_checked(helm: str) -> None:
    docs = _render(
        helm, "--skip-tests", "--set", "activator.service.type=NodePort", "--set", "activator.service.nodePort=30080"
    )
    service = next(d for d in docs if d["kind"] == "Service")
    assert service["spec"]["ports"][0]["nodePort"] == 30080
    out = subprocess.run(
        [helm, "template", "t", str(CHART), "--kube-version", "1.34.0", "--set", "activator.service.nodePort=80"],
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0
    assert "nodePort" in out.stderr


def test_kind_config_registers_runsc_and_labels_sandboxed_nodes() -> None:
    config = yaml.safe_load((ROOT / "kind-config.yaml").read_text())
    assert config["kind"] == "Cluster"
    assert config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    (patch,) = config["containerdConfigPatches"]
    assert "containerd.runtimes.runsc]" in patch
    assert 'runtime_type = "io.containerd.runsc.v1"' in patch
    for node in config["nodes"]:
        assert node["labels"]["ember.run/gvisor"] == "true"
        mounted = {m["containerPath"] for m in node["extraMounts"]}
        assert {"/usr/local/bin/runsc", "/usr/local/bin/containerd-shim-runsc-v1"} <= mounted
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["runtimeClasses"]["gvisor"]["handler"] == "runsc"


def test_the_activator_reads_secrets_only_in_the_namespace_it_serves(helm: str) -> None:
    """Auxiliary services' credentials: get, on Secrets, in that one namespace; never cluster-wide."""
    docs = _render(helm, "--skip-tests", "--set", "activator.namespace=team-a")
    role = next(d for d in docs if d["kind"] == "Role")
    binding = next(d for d in docs if d["kind"] == "RoleBinding")
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == "team-a"
    assert role["rules"] == [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get"]}]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "t-ember-activator", "namespace": "ember-system"}]
    cluster_roles = [d for d in docs if d["kind"] == "ClusterRole"]
    assert all("secrets" not in rule["resources"] for d in cluster_roles for rule in d["rules"])
    activator = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "t-ember-activator")
    (container,) = activator["spec"]["template"]["spec"]["containers"]
    pod_ip = next(e for e in container["env"] if e["name"] == "POD_IP")
    assert pod_ip["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert {"name": "services", "containerPort": SERVICES_PORT} in container["ports"]


def _by_kind(docs: list[dict[str, Any]], kind: str, name: str = "t-ember-activator") -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


def test_the_public_listener_is_a_port_of_its_own_on_the_activator(helm: str) -> None:
    """Routes and function URLs are served on `gateway`; the invoke API and /metrics stay on `http`."""
    docs = _render(
        helm, "--skip-tests", "--set", "activator.gateway.port=9443", "--set", "activator.gateway.servicePort=80"
    )
    activator = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "t-ember-activator")
    (container,) = activator["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["EMBER_GATEWAY_PORT"] == "9443"
    assert {"name": "gateway", "containerPort": 9443} in container["ports"]
    ports = {p["name"]: p for p in _by_kind(docs, "Service")["spec"]["ports"]}
    assert (ports["gateway"]["port"], ports["gateway"]["targetPort"]) == (80, "gateway")
    assert ports["http"]["targetPort"] == "http"
    assert not [d for d in docs if d["kind"] in ("Ingress", "HTTPRoute")]  # off by default


def test_the_ingress_sends_its_hosts_to_the_public_listener_only(helm: str) -> None:
    docs = _render(
        helm,
        "--skip-tests",
        "--set",
        "activator.gateway.ingress.enabled=true",
        "--set",
        "activator.gateway.ingress.className=nginx",
        "--set",
        "activator.gateway.ingress.hosts={api.example.com,*.apps.example.com}",
        "--set",
        "activator.gateway.ingress.tls[0].secretName=api-tls",
        "--set",
        "activator.gateway.ingress.tls[0].hosts[0]=api.example.com",
        "--set",
        "activator.gateway.ingress.annotations.cert-manager\\.io/cluster-issuer=letsencrypt",
    )
    ingress = _by_kind(docs, "Ingress")
    assert ingress["metadata"]["namespace"] == "ember-system"
    assert ingress["metadata"]["annotations"] == {"cert-manager.io/cluster-issuer": "letsencrypt"}
    spec = ingress["spec"]
    assert spec["ingressClassName"] == "nginx"
    assert spec["tls"] == [{"hosts": ["api.example.com"], "secretName": "api-tls"}]
    assert [r["host"] for r in spec["rules"]] == ["api.example.com", "*.apps.example.com"]
    for rule in spec["rules"]:
        (path,) = rule["http"]["paths"]
        assert (path["path"], path["pathType"]) == ("/", "Prefix")
        assert path["backend"]["service"] == {"name": "t-ember-activator", "port": {"name": "gateway"}}
    every_host = _by_kind(_render(helm, "--skip-tests", "--set", "activator.gateway.ingress.enabled=true"), "Ingress")
    assert "rules" not in every_host["spec"]
    assert every_host["spec"]["defaultBackend"]["service"] == {"name": "t-ember-activator", "port": {"name": "gateway"}}


def test_the_http_route_attaches_to_the_named_gateway(helm: str) -> None:
    docs = _render(
        helm,
        "--skip-tests",
        "--set",
        "activator.gateway.httpRoute.enabled=true",
        "--set",
        "activator.gateway.httpRoute.parentRefs[0].name=public",
        "--set",
        "activator.gateway.httpRoute.parentRefs[0].namespace=gateways",
        "--set",
        "activator.gateway.httpRoute.hostnames={api.example.com}",
    )
    route = _by_kind(docs, "HTTPRoute")
    assert route["apiVersion"] == "gateway.networking.k8s.io/v1"
    spec = route["spec"]
    assert spec["parentRefs"] == [{"name": "public", "namespace": "gateways"}]
    assert spec["hostnames"] == ["api.example.com"]
    (rule,) = spec["rules"]
    assert rule["matches"] == [{"path": {"type": "PathPrefix", "value": "/"}}]
    assert rule["backendRefs"] == [{"name": "t-ember-activator", "port": 8081}]


def test_the_async_store_is_the_charts_redis_reachable_only_from_the_activators(helm: str) -> None:
    docs = _render(helm, "--skip-tests")
    secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "t-ember-redis")
    password = secret["stringData"]["password"]
    assert len(password) == 32
    assert secret["stringData"]["url"] == f"redis://:{password}@t-ember-redis.ember-system.svc:6379/0"
    redis = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "t-ember-redis")
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    args = container["args"]
    assert args[args.index("--appendfsync") + 1] == "always"  # the reply to a put follows the fsync
    assert args[args.index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert container["env"][0]["valueFrom"]["secretKeyRef"] == {"name": "t-ember-redis", "key": "password"}
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert redis["spec"]["template"]["spec"]["volumes"] == [{"name": "data", "emptyDir": {}}]
    policy = next(d for d in docs if d["kind"] == "NetworkPolicy")
    assert policy["spec"]["ingress"] == [
        {
            "from": [
                {
                    "podSelector": {
                        "matchLabels": {"app.kubernetes.io/name": "ember-activator", "app.kubernetes.io/instance": "t"}
                    }
                }
            ],
            "ports": [{"port": 6379, "protocol": "TCP"}],
        }
    ]
    activator = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "t-ember-activator")
    env = {e["name"]: e for e in activator["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["EMBER_ASYNC_STORE"]["valueFrom"]["secretKeyRef"] == {"name": "t-ember-redis", "key": "url"}


def test_an_existing_redis_replaces_the_charts(helm: str) -> None:
    docs = _render(
        helm,
        "--skip-tests",
        "--set",
        "asyncStore.existingSecret=shared-redis",
        "--set",
        "asyncStore.existingSecretKey=u",
    )
    assert not [d for d in docs if "redis" in d["metadata"]["name"]]
    activator = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "t-ember-activator")
    env = {e["name"]: e for e in activator["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["EMBER_ASYNC_STORE"]["valueFrom"]["secretKeyRef"] == {"name": "shared-redis", "key": "u"}


def test_redis_persistence_claims_a_volume_kept_on_uninstall(helm: str) -> None:
    docs = _render(
        helm,
        "--skip-tests",
        "--set",
        "asyncStore.redis.persistence.enabled=true",
        "--set",
        "asyncStore.redis.persistence.storageClassName=fast",
    )
    claim = _by_kind(docs, "PersistentVolumeClaim", "t-ember-redis")
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert (claim["spec"]["storageClassName"], claim["spec"]["resources"]["requests"]["storage"]) == ("fast", "1Gi")
    redis = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "t-ember-redis")
    assert redis["spec"]["template"]["spec"]["volumes"] == [
        {"name": "data", "persistentVolumeClaim": {"claimName": "t-ember-redis"}}
    ]
