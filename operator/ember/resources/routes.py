"""The route table: every Function's `spec.http.routes` compiled into one trie, and its conflicts.

`compile_routes` takes the Functions in the order they were made (oldest first) and gives each
route a place in a trie of path segments, one trie per `host` plus one for routes on any host.
Two routes conflict when they have the same host, the same template up to parameter names
(`/users/{id}` and `/users/{uid}` are one path) and a method in common (`ANY` only meets
`ANY`: a route naming its method is more specific and wins). The later Function's route is
refused, named in `Compiled.refused` (the operator's `RoutesAccepted=False, RouteConflict`
condition, a line from `ember dev`), and the earlier one keeps serving. The operator and the
activator compute the same table from the same Functions, so they agree on what is served.

`RouteTable.match` walks the trie once per request: at each segment a literal child, then a
parameter child, then a greedy parameter, backtracking only when a deeper step finds nothing
for the method (API Gateway's priority: `GET /pets/dog` beats `ANY /pets/{proxy+}` for GET, and a
POST to `/pets/dog` goes to the greedy route). Its cost grows with the path's depth, never with
the number of routes. A path that matches routes of other methods only is a `MethodNotAllowed`
(405 with `Allow`); nothing at all is None (404).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ember.api.http import Cors, Http, HttpRoute, JwtAuthorizer, Segment, parse_template

ANY = "ANY"


@dataclass(frozen=True, slots=True)
class Target:
    """Where one matched route sends the request, and how."""

    namespace: str
    name: str
    route_key: str  # "GET /users/{id}", as API Gateway names it
    params: tuple[str, ...]  # parameter names in path order; the last is greedy when `greedy`
    greedy: bool
    qualifier: str | None
    payload_format: str
    authorizer: JwtAuthorizer | None
    scopes: tuple[str, ...]
    cors: Cors | None


@dataclass(frozen=True, slots=True)
class Match:
    target: Target
    path_parameters: dict[str, str]


@dataclass(frozen=True, slots=True)
class MethodNotAllowed:
    allowed: tuple[str, ...]
    cors: Cors | None  # of a route on the path: a preflight is answered from it


@dataclass(frozen=True, slots=True)
class FunctionRoutes:
    """One Function's routes as the table takes them."""

    namespace: str
    name: str
    routes: Sequence[HttpRoute]
    cors: Cors | None = None
    authorizers: dict[str, JwtAuthorizer] = field(default_factory=dict)


def function_routes(namespace: str, name: str, http: Http) -> FunctionRoutes:
    """A Function's `spec.http` as the table takes it."""
    return FunctionRoutes(namespace, name, http.routes, http.cors, {n: a.jwt for n, a in http.authorizers.items()})


class _Node:
    __slots__ = ("greedy", "literal", "methods", "param")

    def __init__(self) -> None:
        self.literal: dict[str, _Node] = {}
        self.param: _Node | None = None
        self.greedy: dict[str, Target] = {}  # method → target of a {name+} ending here
        self.methods: dict[str, Target] = {}  # method → target of a route ending here


@dataclass(frozen=True, slots=True)
class Compiled:
    table: RouteTable
    accepted: dict[tuple[str, str], tuple[str, ...]]  # (namespace, name) → route keys served
    refused: dict[tuple[str, str], tuple[str, ...]]  # (namespace, name) → one sentence per refused route


class RouteTable:
    """Routes by host, then by path segment; see the module docstring for the matching rules."""

    def __init__(self) -> None:
        self._hosts: dict[str, _Node] = {}
        self._any_host = _Node()
        self.size = 0

    def __bool__(self) -> bool:
        return self.size > 0

    def match(self, host: str | None, method: str, segments: Sequence[str]) -> Match | MethodNotAllowed | None:
        """The route for a request (`segments`: the path's segments, percent-decoded); see the module docstring."""
        allowed: dict[str, Target] = {}
        roots = (self._hosts[host], self._any_host) if host is not None and host in self._hosts else (self._any_host,)
        for root in roots:
            values: list[str] = []
            found = _walk(root, segments, 0, method, values, allowed)
            if found is not None:
                target, vals = found
                return Match(target, dict(zip(target.params, vals, strict=True)))
        if allowed:
            methods = {ANY} if ANY in allowed else set(allowed)
            first = next(iter(allowed.values()))
            return MethodNotAllowed(tuple(sorted(methods)), first.cors)
        return None

    def _root(self, host: str | None) -> _Node:
        if host is None:
            return self._any_host
        return self._hosts.setdefault(host, _Node())


def _walk(
    node: _Node, segments: Sequence[str], i: int, method: str, values: list[str], allowed: dict[str, Target]
) -> tuple[Target, list[str]] | None:
    if i == len(segments):
        target = node.methods.get(method) or node.methods.get(ANY)
        if target is not None:
            return target, list(values)
        allowed.update(node.methods)
        return None
    child = node.literal.get(segments[i])
    if child is not None:
        found = _walk(child, segments, i + 1, method, values, allowed)
        if found is not None:
            return found
    if node.param is not None and segments[i] != "":
        values.append(segments[i])
        found = _walk(node.param, segments, i + 1, method, values, allowed)
        values.pop()
        if found is not None:
            return found
    if node.greedy:
        target = node.greedy.get(method) or node.greedy.get(ANY)
        if target is not None:
            return target, [*values, "/".join(segments[i:])]
        allowed.update(node.greedy)
    return None


def _shape(host: str | None, segments: Sequence[Segment]) -> str:
    """A template up to parameter names, for conflicts."""
    path = "/" + "/".join(s.literal if s.literal is not None else ("{+}" if s.greedy else "{}") for s in segments)
    return f"{host or '*'} {path}"


def compile_routes(functions: Iterable[FunctionRoutes]) -> Compiled:
    """The table of the routes of `functions` (oldest first: on a conflict the earlier one keeps its route)."""
    table = RouteTable()
    owners: dict[tuple[str, str], tuple[str, str, str]] = {}  # (shape, method) → (namespace, name, route key)
    accepted: dict[tuple[str, str], tuple[str, ...]] = {}
    refused: dict[tuple[str, str], tuple[str, ...]] = {}
    for fn in functions:
        key = (fn.namespace, fn.name)
        served: list[str] = []
        problems: list[str] = []
        for route in fn.routes:
            segments = parse_template(route.path)
            shape = _shape(route.host, segments)
            methods = [ANY] if ANY in route.methods else sorted(set(route.methods))
            taken = [(m, owners[(shape, m)]) for m in methods if (shape, m) in owners]
            if taken:
                method, (ns, name, other) = taken[0]
                on = f" on host {route.host}" if route.host else ""
                where = "this Function" if (ns, name) == key else f"Function {ns}/{name}"
                problems.append(f"route {method} {route.path}{on} is already served by {where} ({other}); not served")
                continue
            node = table._root(route.host)
            for seg in segments:
                if seg.literal is not None:
                    node = node.literal.setdefault(seg.literal, _Node())
                elif not seg.greedy:
                    node.param = node.param or _Node()
                    node = node.param
            ends = node.greedy if segments and segments[-1].greedy else node.methods
            for method in methods:
                route_key = f"{method} {route.path}"
                ends[method] = Target(
                    namespace=fn.namespace,
                    name=fn.name,
                    route_key=route_key,
                    params=tuple(s.param for s in segments if s.param is not None),
                    greedy=bool(segments) and segments[-1].greedy,
                    qualifier=route.qualifier,
                    payload_format=route.payload_format,
                    authorizer=fn.authorizers.get(route.authorizer) if route.authorizer else None,
                    scopes=tuple(route.scopes),
                    cors=fn.cors,
                )
                owners[(shape, method)] = (fn.namespace, fn.name, route_key)
                served.append(route_key)
                table.size += 1
        if served:
            accepted[key] = tuple(served)
        if problems:
            refused[key] = tuple(problems)
    return Compiled(table, accepted, refused)


def split_path(raw_path: str) -> list[str]:
    """The segments of a request path as the table matches them (before percent-decoding; the
    caller decodes each). `/a/b/` is `/a/b`, as for templates; `/` has none."""
    path = raw_path[1:] if raw_path.startswith("/") else raw_path
    path = path.removesuffix("/")
    return path.split("/") if path else []
