"""The route table, pure parts: templates, matching priority, methods, hosts, conflicts, and the
registry keeping the table as Functions come and go. Real requests are
tests/local/activator/test_http_routes.py."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from ember.activator.config import ActivatorConfig
from ember.activator.metrics import Metrics
from ember.activator.registry import Registry
from ember.api.function import Function
from ember.api.http import Http, HttpRoute, parse_template
from ember.resources.routes import FunctionRoutes, Match, MethodNotAllowed, compile_routes, split_path


def _routes(*routes: dict[str, Any], name: str = "fn", namespace: str = "default") -> FunctionRoutes:
    return FunctionRoutes(namespace, name, [HttpRoute.model_validate(r) for r in routes])


def _match(table: Any, method: str, path: str, host: str | None = None) -> Any:
    return table.match(host, method, split_path(path))


def test_literals_beat_parameters_which_beat_greedy_parameters() -> None:
    table = compile_routes(
        [
            _routes({"path": "/pets/dog", "methods": ["GET"]}, name="dog"),
            _routes({"path": "/pets/{kind}"}, name="kind"),
            _routes({"path": "/pets/{proxy+}"}, name="rest"),
        ]
    ).table
    dog = _match(table, "GET", "/pets/dog")
    assert isinstance(dog, Match)
    assert (dog.target.name, dog.path_parameters) == ("dog", {})
    cat = _match(table, "GET", "/pets/cat")
    assert (cat.target.name, cat.path_parameters) == ("kind", {"kind": "cat"})
    # a POST to /pets/dog: the literal route is GET only, so the parameter route (ANY) takes it
    assert _match(table, "POST", "/pets/dog").target.name == "kind"
    deep = _match(table, "DELETE", "/pets/cat/toys/1")
    assert (deep.target.name, deep.path_parameters) == ("rest", {"proxy": "cat/toys/1"})
    assert deep.target.route_key == "ANY /pets/{proxy+}"


def test_a_greedy_parameter_takes_one_segment_or_more_but_not_none() -> None:
    table = compile_routes([_routes({"path": "/files/{proxy+}"})]).table
    assert _match(table, "GET", "/files") is None
    assert _match(table, "GET", "/files/a").path_parameters == {"proxy": "a"}
    assert _match(table, "GET", "/files/a/b/c.txt").path_parameters == {"proxy": "a/b/c.txt"}


def test_backtracking_finds_a_route_behind_a_literal_that_leads_nowhere() -> None:
    table = compile_routes([_routes({"path": "/a/b/c"}, name="abc"), _routes({"path": "/a/{x}/d"}, name="xd")]).table
    found = _match(table, "GET", "/a/b/d")
    assert (found.target.name, found.path_parameters) == ("xd", {"x": "b"})


def test_a_path_with_routes_of_other_methods_only_is_405_naming_them() -> None:
    table = compile_routes([_routes({"path": "/users/{id}", "methods": ["GET", "PUT"]})]).table
    found = _match(table, "DELETE", "/users/1")
    assert isinstance(found, MethodNotAllowed)
    assert found.allowed == ("GET", "PUT")
    assert _match(table, "GET", "/users") is None
    assert _match(table, "GET", "/users/1/extra") is None


def test_root_and_trailing_slashes() -> None:
    table = compile_routes([_routes({"path": "/", "methods": ["GET"]}, name="root"), _routes({"path": "/a/"})]).table
    assert _match(table, "GET", "/").target.name == "root"
    assert _match(table, "GET", "/a").target.route_key == "ANY /a/"
    assert _match(table, "GET", "/a/").target.route_key == "ANY /a/"


def test_an_empty_segment_is_no_parameter_value() -> None:
    table = compile_routes([_routes({"path": "/u/{id}/x"})]).table
    assert _match(table, "GET", "/u//x") is None


def test_host_routes_come_before_routes_on_any_host() -> None:
    table = compile_routes(
        [
            _routes({"path": "/x"}, name="anyhost"),
            _routes({"path": "/x", "host": "API.example.com"}, name="api"),
        ]
    ).table
    assert _match(table, "GET", "/x", host="api.example.com").target.name == "api"
    assert _match(table, "GET", "/x", host="other.example.com").target.name == "anyhost"
    assert _match(table, "GET", "/x").target.name == "anyhost"


def test_the_later_function_of_a_conflict_is_refused_and_the_earlier_keeps_serving() -> None:
    compiled = compile_routes(
        [
            _routes({"path": "/users/{id}", "methods": ["GET"]}, name="first"),
            _routes({"path": "/users/{uid}", "methods": ["GET", "POST"]}, {"path": "/other"}, name="second"),
        ]
    )
    assert compiled.refused == {
        ("default", "second"): (
            "route GET /users/{uid} is already served by Function default/first (GET /users/{id}); not served",
        )
    }
    assert compiled.accepted == {("default", "first"): ("GET /users/{id}",), ("default", "second"): ("ANY /other",)}
    assert _match(compiled.table, "GET", "/users/1").target.name == "first"
    # the refused route is refused whole: its POST is not served either
    assert isinstance(_match(compiled.table, "POST", "/users/1"), MethodNotAllowed)


def test_a_method_route_and_an_any_route_on_one_path_do_not_conflict() -> None:
    compiled = compile_routes(
        [_routes({"path": "/a", "methods": ["GET"]}, name="get"), _routes({"path": "/a"}, name="any")]
    )
    assert compiled.refused == {}
    assert _match(compiled.table, "GET", "/a").target.name == "get"
    assert _match(compiled.table, "PATCH", "/a").target.name == "any"


def test_the_same_path_on_another_host_is_no_conflict() -> None:
    compiled = compile_routes(
        [
            _routes({"path": "/a", "host": "one.test"}, name="one"),
            _routes({"path": "/a", "host": "two.test"}, name="two"),
        ]
    )
    assert compiled.refused == {}


def test_a_function_conflicting_with_itself_is_told_so() -> None:
    compiled = compile_routes([_routes({"path": "/a", "methods": ["GET"]}, {"path": "/a", "methods": ["GET"]})])
    assert compiled.refused[("default", "fn")] == (
        "route GET /a is already served by this Function (GET /a); not served",
    )


@pytest.mark.parametrize(
    ("path", "problem"),
    [
        ("/a/{proxy+}/b", "must be the last segment"),
        ("/a/{id}/{id}", "appears twice"),
        ("/a/x{id}", "must be a literal or a whole parameter"),
        ("/a//b", "empty segment"),
        ("/v1/namespaces/x", "the activator's own"),
        ("/2015-03-31/functions/{name}", "the activator's own"),
        ("/healthz", "the activator's own"),
        ("/a/{}", "must be a literal or a whole parameter"),
    ],
)
def test_bad_templates_are_refused_naming_what_is_wrong(path: str, problem: str) -> None:
    with pytest.raises(ValidationError, match=problem):
        HttpRoute.model_validate({"path": path})


def test_paths_near_the_reserved_ones_are_free() -> None:
    for path in ("/v1/users", "/healthzz", "/metrics/{name}", "/v1/{proxy+}"):
        parse_template(path)
    assert _match(compile_routes([_routes({"path": "/v1/{proxy+}"})]).table, "GET", "/v1/users") is not None


def test_authorizers_and_scopes_must_be_declared() -> None:
    with pytest.raises(ValidationError, match="no authorizer named 'auth'"):
        Http.model_validate({"routes": [{"path": "/a", "authorizer": "auth"}]})
    with pytest.raises(ValidationError, match="scopes needs an authorizer"):
        Http.model_validate({"routes": [{"path": "/a", "scopes": ["read"]}]})
    with pytest.raises(ValidationError, match="allowCredentials cannot be used with allowOrigins"):
        Http.model_validate({"cors": {"allowOrigins": ["*"], "allowCredentials": True}})
    with pytest.raises(ValidationError, match="jwksSecretRef"):
        Http.model_validate({"authorizers": {"a": {"jwt": {"issuer": "i", "audiences": ["x"]}}}})


@given(
    st.lists(st.text(alphabet="abcxyz", min_size=1, max_size=3), min_size=0, max_size=6),
    st.sampled_from(["GET", "POST", "DELETE"]),
)
def test_matching_agrees_with_a_linear_scan(segments: list[str], method: str) -> None:
    """Against a reference: the most specific route, segment by segment, that allows the method."""
    templates = ["/a/{x}", "/a/b/{y}", "/{p}/c", "/a/{proxy+}", "/x/y/z", "/{q}/{r}/{s}", "/b/{proxy+}"]
    functions = [
        _routes({"path": t, "methods": ["GET"] if i % 2 else ["ANY"]}, name=f"f{i}") for i, t in enumerate(templates)
    ]
    table = compile_routes(functions).table

    def rank(template: str) -> tuple[int, ...] | None:
        parts = split_path(template)
        greedy = parts and parts[-1].endswith("+}")
        if greedy:
            if len(segments) < len(parts):
                return None
        elif len(segments) != len(parts):
            return None
        key = []
        for i, part in enumerate(parts):
            if part.endswith("+}"):
                key.append(2)
                break
            if part.startswith("{"):
                key.append(1)
            elif part == segments[i]:
                key.append(0)
            else:
                return None
        return tuple(key)

    ranked = sorted(
        (r, i) for i, t in enumerate(templates) if (r := rank(t)) is not None and (i % 2 == 0 or method == "GET")
    )
    found = table.match(None, method, segments)
    if ranked:
        assert isinstance(found, Match)
        assert found.target.name == f"f{ranked[0][1]}"
    else:
        assert not isinstance(found, Match)


def _function(name: str, **http: Any) -> Function:
    spec = {"runtime": "python3.12", "handler": "m.h", "code": {"inline": "x"}, "http": http}
    return Function.model_validate({"metadata": {"name": name}, "spec": spec})


def test_the_registry_recompiles_when_functions_come_change_and_go() -> None:
    registry = Registry(ActivatorConfig(), Metrics())
    registry.follow(_function("first", routes=[{"path": "/a", "methods": ["GET"]}]))
    registry.follow(_function("second", routes=[{"path": "/a", "methods": ["GET"]}, {"path": "/b"}]))
    assert ("default", "second") in registry.routes.refused
    assert _match(registry.routes.table, "GET", "/a").target.name == "first"
    # an edit of the earlier Function does not hand its place to the later one
    registry.follow(_function("first", routes=[{"path": "/a", "methods": ["GET"]}, {"path": "/c"}]))
    assert _match(registry.routes.table, "GET", "/c").target.name == "first"
    assert ("default", "second") in registry.routes.refused
    registry.remove("default", "first")
    assert registry.routes.refused == {}
    assert _match(registry.routes.table, "GET", "/a").target.name == "second"
    assert _match(registry.routes.table, "GET", "/c") is None
