"""Local mode picks a Function's SecurityPolicy by the operator's rule, and a policy edit is a new Version.

`ember dev`'s sync from manifest files (a real Workspace on disk) into a real Registry: a Function
without `securityPolicyRef` runs under the namespace's SecurityPolicy named `default` when there is
one, as in a cluster, and editing that policy mints a new Version with its own pool. Serving under
load while the policy changes is tests/local/activator/test_policy_rollout.py.
"""

from __future__ import annotations

from pathlib import Path

from ember.activator.config import ActivatorConfig
from ember.activator.metrics import Metrics
from ember.activator.registry import Registry
from ember.devmode import Workspace, sync_registry

FUNCTION = """\
apiVersion: ember.run/v1alpha1
kind: Function
metadata: {name: hello}
spec:
  runtime: python3.12
  handler: main.handler
  code: {inline: "def handler(event, context):\\n    return 1\\n"}
"""


def _policy(tmp_s: int) -> str:
    return f"""\
apiVersion: ember.run/v1alpha1
kind: SecurityPolicy
metadata: {{name: default}}
spec: {{sandbox: kata, filesystem: {{tmpSizeMiB: {tmp_s}}}}}
"""


def _sync(registry: Registry, root: Path) -> list[str]:
    lines: list[str] = []
    workspace = Workspace(root)
    workspace.reload(lines.append)
    sync_registry(registry, workspace, lines.append)
    return lines


def test_namespace_default_policy_applies_and_its_edit_is_a_new_version(tmp_path: Path) -> None:
    (tmp_path / "fn.yaml").write_text(FUNCTION)
    registry = Registry(ActivatorConfig(), Metrics())
    _sync(registry, tmp_path)
    v1 = registry.get("default", "hello").versions[1]
    assert v1.pool.sandbox == "gvisor", "no SecurityPolicy in the folder: the built-in default"

    (tmp_path / "policy.yaml").write_text(_policy(32))
    lines = _sync(registry, tmp_path)
    fs = registry.get("default", "hello")
    assert sorted(fs.versions) == [1, 2], lines
    assert fs.versions[2].pool.sandbox == "kata", "the namespace's policy named default, as the operator picks it"

    (tmp_path / "policy.yaml").write_text(_policy(64))
    _sync(registry, tmp_path)
    assert sorted(fs.versions) == [1, 2, 3], "a policy edit is a new Version"
    assert fs.versions[3].pool != fs.versions[2].pool
    assert fs.versions[2].pool.policy_hash != fs.versions[3].pool.policy_hash
    _sync(registry, tmp_path)
    assert 4 not in fs.versions, "an unchanged folder makes no Version"
