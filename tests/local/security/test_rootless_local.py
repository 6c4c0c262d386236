"""`ember dev` run by a user who is not root (issue #11): what the sandboxes still enforce.

Without root an egress allow-list cannot be enforced (no `ip netns`, no iptables of the host's):
a sandbox under one gets no network at all rather than the host's (fail closed), and `ember dev`
says so at start. runsc does not start an agent without root (`ember.pods.local.sandbox`), so
bubblewrap is the sandbox then, and `EMBER_SANDBOX=runsc` is refused with the reason.

A real `ember dev` as uid 54321 (no user of this machine has it), with runsc and bwrap installed, and
real TCP servers on the host: one on the host's loopback, one on an address of its own added to
`lo` that the allow-list names with its port. The interpreter is this test run's own, bound
where that user can reach it (a private mount namespace: root's home is not open to others).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from tests.local.activator.test_devmode import Dev, running_dev

import ember

UID = 54321
ADDRESS = "198.18.0.7"  # TEST-NET (RFC 2544), added to lo for the test

PROBE = """
import socket

def handler(event, context):
    out = {}
    for name, (host, port) in event.items():
        try:
            with socket.create_connection((host, port), timeout=3) as s:
                out[name] = "reached: " + s.recv(16).decode(errors="replace")
        except OSError as e:
            out[name] = repr(e)
    return out
"""


def _manifests(port: int) -> str:
    code = textwrap.indent(PROBE.strip("\n"), " " * 8)
    allow = [{"cidr": f"{ADDRESS}/32", "ports": [port]}, {"cidr": "127.0.0.1/32"}]
    return f"""
apiVersion: ember.run/v1alpha1
kind: SecurityPolicy
metadata:
  name: listed
spec:
  egress: {json.dumps({"mode": "allowList", "allow": allow})}
---
apiVersion: ember.run/v1alpha1
kind: Function
metadata:
  name: prober
spec:
  runtime: python3.11
  handler: main.handler
  securityPolicyRef: {{name: listed}}
  code:
    inline: |
{code}
"""


def _serve(host: str) -> tuple[socket.socket, int]:
    server = socket.socket()
    server.bind((host, 0))
    server.listen(8)

    def accept() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                conn.sendall(b"host")

    threading.Thread(target=accept, daemon=True).start()
    return server, server.getsockname()[1]


@pytest.fixture
def not_root_dir() -> Iterator[Path]:
    """A folder the user owns, outside pytest's (root-only) temporary folders."""
    directory = Path(tempfile.mkdtemp(prefix="ember-rootless-", dir="/tmp"))
    directory.chmod(0o755)
    os.chown(directory, UID, UID)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _as_user(directory: Path) -> list[str]:
    """The command prefix running a program as `UID` with this interpreter's prefix bound at
    `directory/python` (it is a mount point the user can reach), in a private mount namespace;
    its libpython is found there too (its rpath names the prefix the user cannot reach), and the
    `ember` package is this test's."""
    mount_point = directory / "python"
    mount_point.mkdir()
    switch = (
        'mount --bind "$1" "$2" && shift 2 && exec setpriv '
        f"--reuid={UID} --regid={UID} --clear-groups --inh-caps=-all --bounding-set=-all "
        f'env -i PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME="{directory}" PYTHONUNBUFFERED=1 '
        f'LD_LIBRARY_PATH="{mount_point}/lib" PYTHONPATH="{Path(ember.__file__).parents[1]}" '
        f'EMBER_SANDBOX="$EMBER_SANDBOX" "$@"'
    )
    python = mount_point / Path(sys.executable).relative_to(sys.prefix)
    return [
        "unshare",
        "--mount",
        "--propagation",
        "private",
        "--",
        "sh",
        "-c",
        switch,
        "sh",
        sys.prefix,
        str(mount_point),
        str(python),
    ]


def _invoke(dev: Dev, name: str, event: object) -> dict[str, str]:
    request = urllib.request.Request(
        f"{dev.url}/v1/namespaces/default/functions/{name}/invoke", data=json.dumps(event).encode(), method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return dict(json.loads(response.read()))
    except urllib.error.HTTPError as err:
        raise AssertionError(f"{err.code} {err.read().decode()}; ember dev said:\n{''.join(dev.lines)}") from err


@pytest.fixture
def test_address() -> Iterator[str]:
    subprocess.run(["ip", "addr", "add", f"{ADDRESS}/32", "dev", "lo"], check=True)
    try:
        yield ADDRESS
    finally:
        subprocess.run(["ip", "addr", "del", f"{ADDRESS}/32", "dev", "lo"], check=False)


def test_without_root_an_allow_list_gives_no_network_and_bwrap_is_the_sandbox(
    not_root_dir: Path, test_address: str
) -> None:
    assert os.geteuid() == 0, "the test needs root to add an address and switch to another user"
    assert shutil.which("runsc"), "runsc must be installed (make system-deps)"
    assert shutil.which("bwrap"), "bwrap must be installed (make system-deps)"
    listed, port = _serve(test_address)
    loopback, loopback_port = _serve("127.0.0.1")
    with listed, loopback:
        # control: the servers answer the host
        with socket.create_connection((test_address, port), timeout=3) as s:
            assert s.recv(16) == b"host"
        functions = not_root_dir / "functions"
        functions.mkdir()
        (functions / "prober.yaml").write_text(_manifests(port))
        os.chown(functions, UID, UID)
        with running_dev([*_as_user(not_root_dir), "-m", "ember.cli", "dev", str(functions), "--port", "0"]) as dev:
            # runsc is installed, but needs root: bubblewrap, and the banner says why
            dev.wait_for(r"sandbox: bubblewrap \(.*not root, so no memory or process bound.*run as root for gVisor")
            dev.wait_for(r"egress: not root: allow-lists cannot be enforced, so a sandbox under one gets no network")
            event = {"listed": [test_address, port], "loopback": ["127.0.0.1", loopback_port]}
            seen = _invoke(dev, "prober", event)
    # fail closed: nothing at all, the listed address included (no network rather than the host's)
    assert not any(result.startswith("reached") for result in seen.values()), seen
    assert "Network is unreachable" in seen["listed"], seen  # ENETUNREACH: a network with loopback only
    assert "ConnectionRefused" in seen["loopback"], seen  # its own loopback, not the host's


def test_without_root_runsc_is_refused_with_the_reason(not_root_dir: Path) -> None:
    functions = not_root_dir / "functions"
    functions.mkdir()
    os.chown(functions, UID, UID)
    argv = [*_as_user(not_root_dir), "-m", "ember.cli", "dev", str(functions), "--port", "0"]
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=60, env={**os.environ, "EMBER_SANDBOX": "runsc"}
    )
    assert done.returncode != 0, done.stdout + done.stderr
    assert "EMBER_SANDBOX=runsc needs root" in done.stdout + done.stderr, done.stdout + done.stderr
