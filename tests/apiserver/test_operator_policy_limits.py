"""A Function over its SecurityPolicy's limits is refused by the operator, against a real kube-apiserver.

`PolicyResolved=False, reason=ExceedsPolicyLimits` names the field, the value and the limit, a
Warning Event says the same, no Version is made of that spec, and the Version that serves stays
`readyVersion`; back within the limits, the edit rolls out as a new Version. The check itself is
`ember.resources.policy.limit_violations` (unit tier); local mode and `ember validate` are
tests/local/test_policy_limits.py.
"""

from __future__ import annotations

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

__all__ = ["crds", "ember", "ns", "operator"]


def test_a_function_over_its_policy_limits_is_refused_and_the_serving_version_stays(
    ember: Ember, operator: OperatorProcess
) -> None:
    limits = {"maxMemoryMiB": 256, "maxTimeoutSeconds": 10}
    ember.create("securitypolicies", {"kind": "SecurityPolicy", "metadata": {"name": "p"}, "spec": {"limits": limits}})
    ember.create("functions", hello_function(securityPolicyRef={"name": "p"}, resources={"memoryMiB": 128}))
    ember.serve("hello", 1)
    eventually(lambda: ready_function(ember, "hello"), what="hello Ready on Version 1")

    patched = ember.patch("functions", "hello", {"spec": {"resources": {"memoryMiB": 4096}, "timeoutSeconds": 900}})
    fn = eventually(
        lambda: (
            (f := ready_function(ember, "hello") or ember.get("functions", "hello"))
            and condition(f, "PolicyResolved").get("reason") == "ExceedsPolicyLimits"
            and f["status"].get("observedGeneration") == patched["metadata"]["generation"]
            and f
        ),
        what="PolicyResolved False with ExceedsPolicyLimits",
    )
    message = condition(fn, "PolicyResolved")["message"]
    assert "spec.resources.memoryMiB (4096) exceeds limits.maxMemoryMiB (256) of SecurityPolicy 'p'" in message
    assert "spec.timeoutSeconds (900) exceeds limits.maxTimeoutSeconds (10) of SecurityPolicy 'p'" in message
    assert condition(fn, "Ready")["status"] == "False"
    assert set(ember.versions("hello")) == {1}, "no Version of a spec over the limits"
    assert fn["status"]["readyVersion"] == 1
    eventually(
        lambda: any(e.reason == "ExceedsPolicyLimits" and e.type == "Warning" for e in ember.events("hello")),
        what="a Warning Event naming the limits",
    )

    ember.patch("functions", "hello", {"spec": {"resources": {"memoryMiB": 256}, "timeoutSeconds": 10}})
    eventually(lambda: 2 in ember.versions("hello"), what="Version 2 once within the limits")
    ember.serve("hello", 2)
    eventually(
        lambda: (f := ready_function(ember, "hello")) and f["status"]["readyVersion"] == 2,
        what="Version 2 ready",
    )
