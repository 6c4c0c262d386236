"""`ember dev` serving HTTP routes as a user runs it: the example as its comment says, a route
conflict reported for the later Function while the earlier keeps serving (then handed over when
the earlier one is deleted), and a JWT authorizer whose keys are a Secret manifest beside them.
In local mode "earlier" is the order files are read at start (by name), then the order of arrival."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from tests.local.activator.test_devmode import Dev, dev_in

pytestmark = [pytest.mark.local, pytest.mark.timeout(180)]
ROOT = Path(__file__).resolve().parents[3]
KEY = ec.generate_private_key(ec.SECP256R1())
JWKS = json.dumps({"keys": [{**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(KEY.public_key())), "kid": "dev"}]})

COPYCAT = """
apiVersion: ember.run/v1alpha1
kind: Function
metadata:
  name: copycat
spec:
  runtime: python3.11
  handler: main.handler
  code:
    inline: |
      def handler(event, context):
          return {"copycat": event["pathParameters"]["name"], "claims": event["requestContext"].get("authorizer")}
  http:
    routes:
      - path: /greet/{name}
        methods: [GET]
      - path: /secure/{name}
        methods: [GET]
        authorizer: dev
    authorizers:
      dev:
        jwt:
          issuer: https://dev.test
          audiences: [ember]
          jwksSecretRef: {name: dev-keys, key: jwks.json}
---
apiVersion: v1
kind: Secret
metadata:
  name: dev-keys
stringData:
  jwks.json: '%s'
"""


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[Dev]:
    shutil.copy(ROOT / "examples" / "http-route.yaml", tmp_path / "http-route.yaml")
    shutil.copy(ROOT / "examples" / "strict-policy.yaml", tmp_path / "strict-policy.yaml")
    (tmp_path / "zz-copycat.yaml").write_text(COPYCAT % JWKS)
    yield from dev_in(tmp_path)


def test_the_example_serves_its_route_and_a_conflict_waits_its_turn(dev: Dev, tmp_path: Path) -> None:
    dev.wait_for(r"route GET http://127\.0\.0\.1:\d+/greet/\{name\}")
    dev.wait_for(
        r"error: Function default/copycat: route GET /greet/\{name\} is already served by Function"
        r" default/greeter \(GET /greet/\{name\}\); not served"
    )
    dev.wait_for(r"Version 1 of default/greeter: Ready")
    dev.wait_for(r"Version 1 of default/copycat: Ready")
    status, body = _get(f"{dev.url}/greet/ada")
    assert (status, json.loads(body)) == (200, {"greeting": "hello, ada"})

    token = jwt.encode(
        {"iss": "https://dev.test", "aud": "ember", "sub": "me", "exp": int(time.time()) + 60},
        KEY,
        algorithm="ES256",
        headers={"kid": "dev"},
    )
    assert _get(f"{dev.url}/secure/x")[0] == 401
    status, body = _get(f"{dev.url}/secure/x", {"Authorization": f"Bearer {token}"})
    assert status == 200, body
    assert json.loads(body)["claims"]["jwt"]["claims"]["sub"] == "me"

    (tmp_path / "http-route.yaml").unlink()
    dev.wait_for(r"routes of default/copycat: GET /greet/\{name\}, GET /secure/\{name\}")
    status, body = _get(f"{dev.url}/greet/ada")
    assert (status, json.loads(body)["copycat"]) == (200, "ada")


def test_validate_refuses_a_route_two_functions_claim(tmp_path: Path) -> None:
    shutil.copy(ROOT / "examples" / "http-route.yaml", tmp_path / "a.yaml")
    (tmp_path / "b.yaml").write_text((ROOT / "examples" / "http-route.yaml").read_text().replace("greeter", "rival"))
    out = subprocess.run(
        [sys.executable, "-m", "ember.cli", "validate", str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 1, out.stdout + out.stderr
    assert (
        f"{tmp_path / 'b.yaml'}: Function default/rival: route GET /greet/{{name}} is already served by"
        " Function default/greeter (GET /greet/{name}); not served"
    ) in out.stderr
    (tmp_path / "b.yaml").unlink()
    alone = subprocess.run(
        [sys.executable, "-m", "ember.cli", "validate", str(tmp_path / "a.yaml")], capture_output=True, text=True
    )
    assert "already served" not in alone.stderr
