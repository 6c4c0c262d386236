"""`ember` command line: one thin entry point that dispatches to the part that does the work."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ember import __version__

USAGE = """usage: ember <command> [args]

commands:
  dev [DIR]        run Ember locally: activator + sandboxed agents, functions from DIR (default examples/)
  invoke NAME      invoke a function of a running `ember dev` (see `ember invoke --help`)
  validate PATH..  check Function/Version/SecurityPolicy manifests, one line per problem or warning
  crds             write the CRDs generated from the API models (default into crds/)
  version          print Ember's version
"""


def _crds(argv: list[str]) -> int:
    from ember.api import crd
    from ember.files import write_crds

    parser = argparse.ArgumentParser(prog="ember crds", description="Generate CRD YAML from the API models.")
    parser.add_argument("--output", "-o", type=Path, default=Path("crds"), help="directory (default: crds)")
    parser.add_argument("--check", action="store_true", help="fail if the directory differs from the models")
    parser.add_argument("--stdout", action="store_true", help="print all CRDs as one YAML stream instead")
    args = parser.parse_args(argv)
    if args.stdout:
        sys.stdout.write("---\n".join(crd.render(model) for model in crd.RESOURCES))
        return 0
    if args.check:
        stale = [
            path
            for model in crd.RESOURCES
            if not (path := args.output / crd.file_name(model)).exists() or path.read_text() != crd.render(model)
        ]
        for path in stale:
            print(f"{path}: differs from the models; run `ember crds`", file=sys.stderr)
        return 1 if stale else 0
    for path in write_crds(args.output):
        print(path)
    return 0


def _validate(argv: list[str]) -> int:
    from ember.api.manifests import ManifestError, unsupported_fields_warning
    from ember.api.security_policy import SecurityPolicy
    from ember.files import load_secrets, load_sourced_manifests, manifest_files

    parser = argparse.ArgumentParser(
        prog="ember validate",
        description="Validate Ember manifests. Fields accepted but not implemented yet are warnings (exit 0).",
    )
    parser.add_argument("paths", nargs="+", type=Path, help="files or directories")
    args = parser.parse_args(argv)
    failed = False
    for path in args.paths:
        try:
            resources = load_sourced_manifests(path)
        except ManifestError as err:
            failed = True
            for problem in err.problems:
                print(problem, file=sys.stderr)
            continue
        for file in manifest_files(path):  # Secrets beside the manifests: local mode's credentials
            try:
                for _, secret in load_secrets(file):
                    print(f"ok  Secret {secret.namespace}/{secret.name}")
            except ManifestError as err:
                failed = True
                for problem in err.problems:
                    print(problem, file=sys.stderr)
        policies = {r.key: r.spec for _, r in resources if isinstance(r, SecurityPolicy)}
        for source, resource in resources:
            where = f"{resource.KIND} {resource.metadata.namespace}/{resource.metadata.name}"
            over = _over_limits(resource, policies)
            if over:
                failed = True
                for sentence in over:
                    print(f"{source}: {where}: {sentence}", file=sys.stderr)
                continue
            print(f"ok  {where}")
            warning = unsupported_fields_warning(source, resource)
            if warning is not None:
                print(f"warning: {warning}", file=sys.stderr)
        for sentence in _route_conflicts(list(resources)):
            failed = True
            print(sentence, file=sys.stderr)
    return 1 if failed else 0


def _route_conflicts(resources: list[tuple[object, object]]) -> list[str]:
    """Routes two of the Functions checked claim (in the order given, as `ember dev` reads them):
    the later one would be refused its route."""
    from ember.api.function import Function
    from ember.resources.routes import compile_routes, function_routes

    functions = [(source, r) for source, r in resources if isinstance(r, Function) and r.spec.http is not None]
    sources = {(r.metadata.namespace, r.metadata.name): source for source, r in functions}
    compiled = compile_routes(
        function_routes(r.metadata.namespace, r.metadata.name, r.spec.http) for _, r in functions if r.spec.http
    )
    return [
        f"{sources[key]}: Function {key[0]}/{key[1]}: {problem}"
        for key, problems in compiled.refused.items()
        for problem in problems
    ]


def _over_limits(resource: object, policies: Mapping[tuple[str, str], Any]) -> list[str]:
    """A Function's asks beyond the limits of its policy, when that policy is among the manifests checked
    (or it has none: the namespace's `default` one, else the built-in default); a policy kept elsewhere
    (the cluster) cannot be checked here."""
    from ember.api.function import Function
    from ember.resources.policy import DEFAULT_POLICY_NAME, choose_policy, limit_violations, policy_name_for
    from ember.resources.portions import resolve_portions

    if not isinstance(resource, Function):
        return []
    ns, ref = resource.metadata.namespace, resource.spec.security_policy_ref
    found = policies.get((ns, policy_name_for(ref, DEFAULT_POLICY_NAME)))
    choice = choose_policy(namespace=ns, ref=ref, default_name=DEFAULT_POLICY_NAME, found=found)
    if choice.spec is None:
        return []
    portions = resolve_portions(
        resource.spec,
        namespace=ns,
        main_policy=choice.spec,
        main_policy_name=choice.name,
        lookup=lambda name: policies.get((ns, name)),
    )
    # a portion's policy kept elsewhere (the cluster) cannot be checked here
    known = [p for p in portions.problems if "does not exist in namespace" not in p]
    return [*limit_violations(resource.spec, choice.spec, policy_name=choice.name), *known]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in {"-h", "--help", "help"}:
        print(USAGE)
        return 0 if args else 2
    command, rest = args[0], args[1:]
    if command == "crds":
        return _crds(rest)
    if command == "validate":
        return _validate(rest)
    if command == "version":
        print(__version__)
        return 0
    if command in {"dev", "invoke"}:
        from ember import devmode  # type: ignore[attr-defined,unused-ignore]

        entry = devmode.dev_main if command == "dev" else devmode.invoke_main
        return int(entry(rest))
    print(f"ember: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
