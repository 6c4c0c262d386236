"""Secret manifests as local mode reads them (`ember.api.secrets`): values, and errors that name
the field but never the value."""

from __future__ import annotations

import base64

import pytest

from ember.api.manifests import ManifestError, parse_manifests
from ember.api.secrets import parse_secrets

SECRET_DOC = """
apiVersion: v1
kind: Secret
metadata: {{name: payments, namespace: team-a}}
data: {{token: {b64}, other: {b64}}}
stringData: {{other: from-string-data}}
"""


def _one(text: str) -> dict[str, str]:
    [(_, secret)] = parse_secrets([("s.yaml", text)])
    return dict(secret.data)


def test_data_is_decoded_and_string_data_wins() -> None:
    text = SECRET_DOC.format(b64=base64.b64encode(b"Bearer abc").decode())
    [(source, secret)] = parse_secrets([("s.yaml", text)])
    assert (source, secret.namespace, secret.name) == ("s.yaml", "team-a", "payments")
    assert dict(secret.data) == {"token": "Bearer abc", "other": "from-string-data"}
    assert "Bearer abc" not in repr(secret)


def test_the_namespace_defaults_and_other_documents_are_skipped() -> None:
    text = (
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: c}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: s}\n"
    )
    [(_, secret)] = parse_secrets([("s.yaml", text)])
    assert (secret.namespace, secret.name, dict(secret.data)) == ("default", "s", {})


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        (
            "metadata: {name: s}\ndata: {token: 'no*base64-c2VjcmV0'}",
            "s.yaml: data.token: must be base64 of UTF-8 text",
        ),
        ("metadata: {name: s}\nstringData: {token: 5}", "s.yaml: stringData.token: must be a string"),
        ("metadata: {name: s}\ndata: [c2VjcmV0]", "s.yaml: data: must be a mapping of keys to values (got list)"),
        ("metadata: {name: s}\nstringData: {'bad key': x}", "s.yaml: stringData.bad key: keys may hold only"),
        ("metadata: {name: Bad_Name}", "s.yaml: metadata.name: must be a DNS subdomain name (got 'Bad_Name')"),
        ("data: {}", "s.yaml: metadata: required field is missing"),
    ],
)
def test_a_bad_secret_names_the_field_and_not_the_value(document: str, problem: str) -> None:
    with pytest.raises(ManifestError) as err:
        parse_secrets([("s.yaml", f"apiVersion: v1\nkind: Secret\n{document}\n")])
    assert str(err.value).startswith(problem), str(err.value)
    assert "c2VjcmV0" not in str(err.value)
    assert "secret" not in str(err.value)


def test_a_secret_defined_twice_is_a_problem_at_the_second_place() -> None:
    doc = "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n"
    with pytest.raises(ManifestError, match=r"b.yaml: metadata.name: Secret default/s is also defined in a.yaml"):
        parse_secrets([("a.yaml", doc), ("b.yaml", doc)])


def test_ember_manifests_beside_a_secret_do_not_trip_over_it() -> None:
    text = "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n"
    assert parse_manifests([("one-file.yaml", text)], only_ember=False) == []
