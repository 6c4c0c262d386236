"""Local pods: runtime-agent processes on this machine, each in a gVisor sandbox when possible.

`source` is the pod source (pools, claim, specialize, release); `process` is one agent process;
`sandbox` picks runsc, bwrap or none and wraps a command line in it; `egress` gives a sandbox
under an egress allow-list a network namespace enforcing it; `runtimes` builds the agent's
command line per runtime.
"""

from ember.pods.local.runtimes import agent_command
from ember.pods.local.sandbox import Sandbox, SandboxChoice, detect_sandbox, sandboxed
from ember.pods.local.source import LocalPodSource, agent_session

__all__ = [
    "LocalPodSource",
    "Sandbox",
    "SandboxChoice",
    "agent_command",
    "agent_session",
    "detect_sandbox",
    "sandboxed",
]
