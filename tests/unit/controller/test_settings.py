"""Operator settings from EMBER_* variables: defaults, overrides, and every malformed value named."""

from __future__ import annotations

import pytest

from ember.controller.settings import Settings, SettingsError, from_env


def test_defaults() -> None:
    settings = from_env({})
    assert settings == Settings()
    assert settings.image_for("python3.12") == "localhost/ember-runtime-python3.12:dev"
    assert settings.image_for("nodejs20") == "localhost/ember-runtime-nodejs20:dev"
    assert settings.pool_size_for("python3.11") == 1


def test_overrides() -> None:
    settings = from_env(
        {
            "EMBER_KEEP_VERSIONS": "5",
            "EMBER_IMAGE_REGISTRY": "registry.example/e",
            "EMBER_IMAGE_TAG": "1.0",
            "EMBER_RUNTIME_IMAGES": "nodejs20=img/node:20",
            "EMBER_POOL_SIZE": "2",
            "EMBER_POOL_SIZES": "python3.12=4, nodejs20=0",
            "EMBER_NAMESPACES": "a, b,",
            "EMBER_ACTIVATOR_URL": "http://act:9/",
            "EMBER_POOL_CPU_BURST_MILLICORES": "0",
            "EMBER_ACTIVATOR_NAMESPACE": "edge",
            "EMBER_ACTIVATOR_POD_LABELS": "app.kubernetes.io/name=ember-activator, tier=",
        }
    )
    assert settings.activators.namespace == "edge"
    assert settings.activators.pod_labels == (("app.kubernetes.io/name", "ember-activator"), ("tier", ""))
    assert settings.pool_cpu_burst_millicores == 0
    assert settings.keep_versions == 5
    assert settings.image_for("python3.11") == "registry.example/e/ember-runtime-python3.11:1.0"
    assert settings.image_for("nodejs20") == "img/node:20"
    assert (settings.pool_size_for("python3.12"), settings.pool_size_for("nodejs20")) == (4, 0)
    assert settings.pool_size_for("python3.11") == 2
    assert settings.namespaces == ("a", "b")
    assert settings.function_url("ns", "fn") == "http://act:9/v1/namespaces/ns/functions/fn/invoke"


@pytest.mark.parametrize(
    ("env", "message"),
    [
        pytest.param({"EMBER_KEEP_VERSIONS": "0"}, "EMBER_KEEP_VERSIONS=0 must be at least 1", id="keep-zero"),
        pytest.param({"EMBER_KEEP_VERSIONS": "three"}, "EMBER_KEEP_VERSIONS='three' is not an integer", id="keep-nan"),
        pytest.param({"EMBER_POOL_SIZE": "-1"}, "EMBER_POOL_SIZE=-1 must be at least 0", id="pool-negative"),
        pytest.param({"EMBER_POOL_SIZES": "python3.12"}, "'python3.12' is not runtime=value", id="pair-no-equals"),
        pytest.param({"EMBER_POOL_SIZES": "ruby=1"}, "unknown runtime 'ruby'", id="unknown-runtime"),
        pytest.param({"EMBER_POOL_SIZES": "nodejs20=x"}, "nodejs20='x' is not a non-negative", id="size-nan"),
        pytest.param({"EMBER_RUNTIME_IMAGES": "python3.12="}, "is not runtime=value", id="empty-image"),
        pytest.param({"EMBER_RUN_AS_USER": "0"}, "EMBER_RUN_AS_USER=0 must be at least 1", id="root"),
        pytest.param(
            {"EMBER_ACTIVATOR_NAMESPACE": "Ember_System"},
            "EMBER_ACTIVATOR_NAMESPACE='Ember_System' is not a namespace name",
            id="activator-namespace",
        ),
        pytest.param(
            {"EMBER_ACTIVATOR_POD_LABELS": "app=ok,=x"},
            "EMBER_ACTIVATOR_POD_LABELS: '=x' is not label-key=label-value",
            id="label-no-key",
        ),
        pytest.param(
            {"EMBER_ACTIVATOR_POD_LABELS": "app"},
            "EMBER_ACTIVATOR_POD_LABELS: 'app' is not label-key=label-value",
            id="label-no-equals",
        ),
        pytest.param(
            {"EMBER_ACTIVATOR_POD_LABELS": "app=bad value"},
            "EMBER_ACTIVATOR_POD_LABELS: 'app=bad value' is not label-key=label-value",
            id="label-bad-value",
        ),
        pytest.param(
            {"EMBER_POOL_CPU_BURST_MILLICORES": "-5"},
            "EMBER_POOL_CPU_BURST_MILLICORES=-5 must be at least 0",
            id="burst-negative",
        ),
    ],
)
def test_bad_values_are_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace("(", r"\(")):
        from_env(env)
