"""A Function asking for more than its SecurityPolicy's limits is refused in local mode and by `ember validate`.

Real files, the real `ember validate` process, and local mode's sync into a real Registry: the
Function over the limit gets no Version (the one that serves stays) and the error names the field,
the value and the limit. The operator's side is tests/unit/controller/test_reconcile.py and
tests/apiserver/test_operator_policy_limits.py.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ember.activator.config import ActivatorConfig
from ember.activator.metrics import Metrics
from ember.activator.registry import Registry
from ember.devmode import Workspace, sync_registry

POLICY = """\
apiVersion: ember.run/v1alpha1
kind: SecurityPolicy
metadata: {name: strict}
spec: {limits: {maxMemoryMiB: 512, maxTimeoutSeconds: 30}}
"""


def _function(memory_mib: int, timeout_s: int) -> str:
    return f"""\
apiVersion: ember.run/v1alpha1
kind: Function
metadata: {{name: greedy}}
spec:
  runtime: python3.12
  handler: main.handler
  code: {{inline: "def handler(event, context):\\n    return 1\\n"}}
  resources: {{memoryMiB: {memory_mib}}}
  timeoutSeconds: {timeout_s}
  securityPolicyRef: {{name: strict}}
"""


def test_validate_refuses_a_function_over_its_policy_limits(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(POLICY)
    (tmp_path / "fn.yaml").write_text(_function(4096, 900))
    result = subprocess.run(
        [sys.executable, "-m", "ember.cli", "validate", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1, result
    assert "spec.resources.memoryMiB (4096) exceeds limits.maxMemoryMiB (512) of SecurityPolicy 'strict'" in (
        result.stderr
    )
    assert "spec.timeoutSeconds (900) exceeds limits.maxTimeoutSeconds (30) of SecurityPolicy 'strict'" in result.stderr
    assert "ok  SecurityPolicy default/strict" in result.stdout
    assert "ok  Function default/greedy" not in result.stdout

    (tmp_path / "fn.yaml").write_text(_function(512, 30))  # at the limits is within them
    ok = subprocess.run(
        [sys.executable, "-m", "ember.cli", "validate", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert ok.returncode == 0, ok.stderr
    assert "ok  Function default/greedy" in ok.stdout


def test_local_mode_keeps_serving_the_last_version_within_the_limits(tmp_path: Path) -> None:
    (tmp_path / "policy.yaml").write_text(POLICY)
    (tmp_path / "fn.yaml").write_text(_function(256, 10))
    registry = Registry(ActivatorConfig(), Metrics())
    workspace = Workspace(tmp_path)
    lines: list[str] = []
    workspace.reload(lines.append)
    sync_registry(registry, workspace, lines.append)
    assert sorted(registry.get("default", "greedy").versions) == [1]

    (tmp_path / "fn.yaml").write_text(_function(4096, 10))
    workspace.reload(lines.append)
    sync_registry(registry, workspace, lines.append)
    assert sorted(registry.get("default", "greedy").versions) == [1], "no Version of a spec over the limits"
    assert any("memoryMiB (4096) exceeds limits.maxMemoryMiB (512) of SecurityPolicy 'strict'" in ln for ln in lines)


PORTION_POLICIES = """\
apiVersion: ember.run/v1alpha1
kind: SecurityPolicy
metadata: {name: payments}
spec: {trustLevel: trusted}
---
apiVersion: ember.run/v1alpha1
kind: SecurityPolicy
metadata: {name: parser}
spec: {trustLevel: untrusted, limits: {maxMemoryMiB: 128}}
"""

SHOP = """\
apiVersion: ember.run/v1alpha1
kind: Function
metadata: {name: shop}
spec:
  runtime: python3.12
  handler: main.handler
  code: {inline: "def handler(event, context):\\n    return 1\\n"}
  resources: {memoryMiB: 128}
  portions:
    - {name: parse, handler: main.parse, securityPolicyRef: {name: parser}%s}
    - {name: charge, handler: main.charge, securityPolicyRef: {name: payments}}
"""


def test_portions_calling_up_in_trust_are_refused_in_local_mode_and_by_validate(tmp_path: Path) -> None:
    """The Function's handler runs under the built-in default policy (untrusted): calling the
    trusted charge portion goes up in trust, and so does parse calling it."""
    (tmp_path / "policies.yaml").write_text(PORTION_POLICIES)
    (tmp_path / "fn.yaml").write_text(SHOP % ", calls: [charge]")
    registry = Registry(ActivatorConfig(), Metrics())
    workspace = Workspace(tmp_path)
    lines: list[str] = []
    workspace.reload(lines.append)
    sync_registry(registry, workspace, lines.append)
    assert "default/shop" not in {fs.label for fs in registry.functions()}
    refused = [ln for ln in lines if ln.startswith("error: Function default/shop")]
    assert refused == [
        "error: Function default/shop: the Function's handler (untrusted, the built-in default policy) may not call "
        "portion 'charge' (trusted, SecurityPolicy 'payments'): a call goes only to portions at the caller's "
        "trustLevel or below; not (re)loaded",
        "error: Function default/shop: portion 'parse' (untrusted, SecurityPolicy 'parser') may not call portion "
        "'charge' (trusted, SecurityPolicy 'payments'): a call goes only to portions at the caller's trustLevel "
        "or below; not (re)loaded",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "ember.cli", "validate", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1, result
    assert "portion 'parse' (untrusted, SecurityPolicy 'parser') may not call portion 'charge'" in result.stderr

    # a trusted handler may call both; the parser calls nothing
    trusted = (SHOP % "").replace("  portions:", "  securityPolicyRef: {name: payments}\n  portions:")
    (tmp_path / "fn.yaml").write_text(trusted)
    workspace.reload(lines.append)
    sync_registry(registry, workspace, lines.append)
    vs = registry.get("default", "shop").versions[1]
    assert sorted(vs.portions) == ["charge", "parse"]
