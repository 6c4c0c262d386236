"""Local mode: `ember dev [DIR]` runs the activator over local sandboxed agents; `ember invoke` calls it.

`ember dev` reads Function and SecurityPolicy manifests from DIR (default `examples/`), serves
the activator (default 127.0.0.1:8080), prints each function's invoke URL and a curl line,
and watches DIR: an edited Function becomes a new Version while the old one keeps serving
until the new one is ready; a file with mistakes is reported (one line per problem) and the
functions it defined keep running as they were. A manifest that sets fields without effect here
(not implemented yet, or not in local mode, such as egress) gets a warning line naming them,
printed again only when what it says changes. Ctrl-C stops every agent process; a second Ctrl-C
exits at once.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import os
import signal
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from aiohttp import web

from ember.activator import keys
from ember.activator.app import make_app
from ember.activator.config import ActivatorConfig
from ember.activator.registry import Registry
from ember.api.function import Function
from ember.api.manifests import ManifestError, unsupported_fields_warning
from ember.api.secrets import LocalSecret
from ember.api.security_policy import SecurityPolicy, SecurityPolicySpec
from ember.files import load_secrets, load_sourced_manifests, manifest_files
from ember.pods.local import LocalPodSource, detect_sandbox, egress
from ember.pods.services import CredentialUnavailable
from ember.resources.policy import DEFAULT_POLICY_NAME, choose_policy, limit_violations, policy_name_for
from ember.resources.portions import resolve_portions
from ember.sources.sqlite import SqliteStore
from ember.sources.store import StoreError
from ember.state.sqlite import SqliteKeyValueStore

log = logging.getLogger("ember.dev")

DEFAULT_DIR = "examples"
STATE_DIR = ".ember"  # inside DIR unless --state-dir says otherwise
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080


def invoke_url(base: str, namespace: str, name: str) -> str:
    return f"{base}/v1/namespaces/{namespace}/functions/{name}/invoke"


@dataclass
class Workspace:
    """What DIR defines now, file by file, so a broken file keeps its last good definitions."""

    root: Path
    by_file: dict[Path, list[Function | SecurityPolicy]] = field(default_factory=dict)
    secrets_by_file: dict[Path, list[LocalSecret]] = field(default_factory=dict)
    warned: set[str] = field(default_factory=set)
    routes: dict[tuple[str, str], tuple[str, ...]] | None = None  # served, as last reported (None: not yet)
    refused: set[str] = field(default_factory=set)  # last reported route conflicts

    def reload(self, report: Callable[[str], None]) -> None:
        """Re-read every manifest file; files with problems keep what they defined before."""
        files = manifest_files(self.root) if self.root.exists() else []
        fresh: dict[Path, list[Function | SecurityPolicy]] = {}
        fresh_secrets: dict[Path, list[LocalSecret]] = {}
        warnings: set[str] = set()
        for file in files:
            try:
                sourced = load_sourced_manifests(file)
                secrets = load_secrets(file)
            except ManifestError as err:
                for problem in err.problems:
                    report(f"error: {problem}")
                if file in self.by_file or file in self.secrets_by_file:
                    report(f"note: {file}: keeping its previous definitions until it is fixed")
                    fresh[file] = self.by_file.get(file, [])
                    fresh_secrets[file] = self.secrets_by_file.get(file, [])
                    warnings.update(w for w in self.warned if w.startswith((f"{file}: ", f"{file}#")))
                continue
            fresh[file] = [r for _, r in sourced if isinstance(r, Function | SecurityPolicy)]
            fresh_secrets[file] = [secret for _, secret in secrets]
            for source, resource in sourced:
                warning = unsupported_fields_warning(source, resource)
                if warning is not None:
                    warnings.add(str(warning))
        for line in sorted(warnings - self.warned):
            report(f"warning: {line}")
        self.by_file, self.secrets_by_file, self.warned = fresh, fresh_secrets, warnings

    def functions(self) -> list[tuple[Function, Path]]:
        return [(r, f.parent) for f, rs in self.by_file.items() for r in rs if isinstance(r, Function)]

    def policies(self) -> dict[tuple[str, str], SecurityPolicySpec]:
        return {r.key: r.spec for rs in self.by_file.values() for r in rs if isinstance(r, SecurityPolicy)}

    async def credential(self, namespace: str, name: str, key: str) -> str:
        """An auxiliary service's credential: `key` of Secret `namespace/name` as DIR defines it now."""
        for secrets in self.secrets_by_file.values():
            for secret in secrets:
                if (secret.namespace, secret.name) == (namespace, name):
                    if key not in secret.data:
                        raise CredentialUnavailable(f"Secret {namespace}/{name} has no key {key!r}")
                    return secret.data[key]
        raise CredentialUnavailable(f"no Secret {namespace}/{name} in {self.root}")


def sync_registry(registry: Registry, workspace: Workspace, report: Callable[[str], None]) -> list[Function]:
    """Apply the workspace to the registry: new Versions for changed functions, removal of deleted ones."""
    policies = workspace.policies()
    wanted: set[tuple[str, str]] = set()
    changed: list[Function] = []
    for fn, base_dir in workspace.functions():
        wanted.add(fn.key)
        ref = fn.spec.security_policy_ref
        # The operator's rule: the referenced policy, else the namespace's "default" one, else the built-in.
        lookup = (fn.metadata.namespace, policy_name_for(ref, DEFAULT_POLICY_NAME))
        choice = choose_policy(
            namespace=fn.metadata.namespace, ref=ref, default_name=DEFAULT_POLICY_NAME, found=policies.get(lookup)
        )
        if choice.spec is None:
            assert ref is not None
            report(
                f"error: Function {fn.metadata.namespace}/{fn.metadata.name}: spec.securityPolicyRef.name"
                f" {ref.name!r} names no SecurityPolicy in {workspace.root}; the function is not (re)loaded"
            )
            continue
        namespace = fn.metadata.namespace
        portions = resolve_portions(
            fn.spec,
            namespace=namespace,
            main_policy=choice.spec,
            main_policy_name=choice.name,
            lookup=lambda name: policies.get((namespace, name)),  # noqa: B023 (called here, at once)
        )
        problems = [*limit_violations(fn.spec, choice.spec, policy_name=choice.name), *portions.problems]
        if problems:
            for problem in problems:
                report(f"error: Function {fn.metadata.namespace}/{fn.metadata.name}: {problem}; not (re)loaded")
            continue
        version = registry.apply(fn, policy=choice.spec, base_dir=base_dir, portion_policies=portions.policies)
        if version is not None:
            changed.append(fn)
            report(f"Version {version.key.number} of {fn.metadata.namespace}/{fn.metadata.name}: loading")
    for fs in list(registry.functions()):
        if (fs.namespace, fs.name) not in wanted:
            registry.remove(fs.namespace, fs.name)
            report(f"removed {fs.label} (its manifest is gone)")
    _report_routes(registry, workspace, report)
    return changed


def _report_routes(registry: Registry, workspace: Workspace, report: Callable[[str], None]) -> None:
    """A line when a Function's served routes change, and one per route conflict (once)."""
    compiled = registry.routes
    refused = {f"Function {ns}/{name}: {p}" for (ns, name), ps in compiled.refused.items() for p in ps}
    for line in sorted(refused - workspace.refused):
        report(f"error: {line}")
    before = workspace.routes
    if before is not None:  # the first time, the banner lists them
        for key in sorted(set(before) | set(compiled.accepted)):
            now = compiled.accepted.get(key, ())
            if before.get(key, ()) != now:
                report(f"routes of {key[0]}/{key[1]}: {', '.join(now) or 'none'}")
    workspace.routes, workspace.refused = dict(compiled.accepted), refused


def banner(out: TextIO, base: str, registry: Registry, sandbox_note: str, isolated: bool) -> None:
    print(f"ember dev: activator on {base}", file=out)
    if isolated:
        print(f"ember dev: sandbox: {sandbox_note}", file=out)
    else:
        print("!" * 78, file=out)
        print(f"!! WARNING: sandbox: {sandbox_note}", file=out)
        print("!" * 78, file=out)
    if isolated and (unenforced := egress.problem()):
        print(f"ember dev: warning: egress: {unenforced}", file=out)
    for fs in registry.functions():
        url = invoke_url(base, fs.namespace, fs.name)
        print(f"  {fs.label}", file=out)
        print(f"    POST {url}", file=out)
        print(f"    curl -s -X POST {url} -H 'Content-Type: application/json' -d '{{}}'", file=out)
        print(f"    ember invoke {fs.name if fs.namespace == 'default' else fs.label} --data '{{}}'", file=out)
        for route_key in registry.routes.accepted.get((fs.namespace, fs.name), ()):
            method, _, path = route_key.partition(" ")
            print(f"    route {method} {base}{path}", file=out)
        if fs.spec is not None and fs.spec.http is not None and fs.spec.http.function_url is not None:
            print(f"    function URL {base}/v1/namespaces/{fs.namespace}/functions/{fs.name}/url/", file=out)
        for source in fs.spec.event_sources if fs.spec is not None else ():
            state = "" if source.enabled else " (disabled)"
            print(f"    event source {source.name}: {source.type} {source.stream}{state}", file=out)
    out.flush()


async def serve(
    directory: Path,
    host: str,
    port: int,
    *,
    watch: bool = True,
    config: ActivatorConfig | None = None,
    out: TextIO = sys.stdout,
    stop: asyncio.Event | None = None,
    state_dir: Path | None = None,
) -> int:
    """Run local mode until `stop` is set (or a signal arrives).

    `state_dir` (default `DIR/.ember`) keeps what outlives the process: the asynchronous
    invocations (`async.db`), so that events accepted before a crash run after the restart, and
    the Functions' key-value state (`state.db`, `ember.state`)."""

    def report(line: str) -> None:
        print(f"ember dev: {line}", file=out, flush=True)

    workspace = Workspace(directory)
    workspace.reload(report)
    sandbox = detect_sandbox()
    state = state_dir if state_dir is not None else directory / STATE_DIR
    store = SqliteStore(state / "async.db")
    key_values = SqliteKeyValueStore(state / "state.db")
    source = LocalPodSource(sandbox=sandbox, credentials=workspace.credential, volumes=state / "volumes")
    app = make_app(
        source,
        config or ActivatorConfig(),
        credentials=workspace.credential,
        store=store,
        state=key_values,
        holder="ember-dev",
    )
    registry = app[keys.REGISTRY]
    sync_registry(registry, workspace, report)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    try:
        await runner.setup()  # opens the event store
    except StoreError as err:
        await source.close()
        print(f"ember dev: {err}", file=sys.stderr)
        return 1
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as err:
        await runner.cleanup()
        await source.close()
        print(f"ember dev: cannot listen on {host}:{port}: {err.strerror}", file=sys.stderr)
        return 1
    bound = runner.addresses[0][1] if runner.addresses else port
    base = f"http://{host}:{bound}"
    banner(out, base, registry, sandbox.note, sandbox.isolated)
    report(f"asynchronous invocations are kept in {store.path}")

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            os._exit(130)  # second Ctrl-C: no more waiting
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal)

    tasks = [asyncio.create_task(_report_phases(registry, report))]
    if watch:
        tasks.append(asyncio.create_task(_watch(directory, state, workspace, registry, report)))
    try:
        await stop.wait()
    finally:
        report("stopping: draining invocations and stopping agents")
        for task in tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await runner.cleanup()
        await source.close()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)
    return 0


async def _report_phases(registry: Registry, report: Callable[[str], None]) -> None:
    """Print each Version's phase changes (Ready, Failed with the reason), and its size's: the
    memory right-sizing recommends, and the memory its new pods get (`ember.activator.sizing`)."""
    seen: dict[tuple[str, int], str] = {}
    sizes: dict[tuple[str, int], tuple[int, int | None]] = {}
    while True:
        for fs in registry.functions():
            for number, vs in fs.versions.items():
                phase = vs.phase.value
                if seen.get((fs.label, number)) != phase:
                    seen[(fs.label, number)] = phase
                    if phase == "Ready":
                        report(f"Version {number} of {fs.label}: Ready ({vs.ready_pods} pod(s)); it takes the traffic")
                    elif phase == "Failed":
                        report(f"Version {number} of {fs.label}: FAILED: {vs.message}; traffic stays where it was")
                advice = vs.sizer.current if vs.sizer is not None else None
                size = (vs.resources.memory_mib, advice.memory_mib if advice is not None else None)
                if advice is not None and sizes.get((fs.label, number)) != size:
                    report(
                        f"Version {number} of {fs.label}: recommended {advice.memory_mib} MiB ({advice.reason}); "
                        f"new pods get {vs.resources.memory_mib} MiB ({vs.resources.reason})"
                    )
                sizes[(fs.label, number)] = size
        await asyncio.sleep(0.25)


async def _watch(
    directory: Path, state: Path, workspace: Workspace, registry: Registry, report: Callable[[str], None]
) -> None:
    from watchfiles import awatch

    async for _changes in awatch(directory, debounce=200, step=50, watch_filter=_edits_outside(state)):
        workspace.reload(report)
        sync_registry(registry, workspace, report)


def _edits_outside(state: Path) -> Callable[..., bool]:
    """watchfiles' default filter, and nothing under the state folder (the event store's writes are no edits)."""
    from watchfiles import Change, DefaultFilter

    inside = os.path.abspath(state) + os.sep
    default = DefaultFilter()

    def manifests_only(change: Change, path: str) -> bool:
        return default(change, path) and not os.path.abspath(path).startswith(inside)

    return manifests_only


def dev_main(argv: list[str]) -> int:
    """`ember dev [DIR] [--host H] [--port P]`."""
    parser = argparse.ArgumentParser(prog="ember dev", description="Run Ember locally on the manifests in DIR.")
    parser.add_argument("dir", nargs="?", default=DEFAULT_DIR, type=Path, help="manifests (default: examples/)")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"listen address (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"listen port (default {DEFAULT_PORT})")
    parser.add_argument("--no-watch", action="store_true", help="do not reload when files change")
    parser.add_argument("--warm-pool", type=int, default=1, help="generic pods kept warm per pool (default 1)")
    parser.add_argument("--log-level", default="WARNING", help="Python log level (default WARNING)")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help=f"what outlives a restart: async invocations (default DIR/{STATE_DIR})",
    )
    args = parser.parse_args(argv)
    if not args.dir.exists():
        parser.error(f"{args.dir}: no such directory")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port {args.port}: must be 0-65535")
    if args.warm_pool < 0:
        parser.error(f"--warm-pool {args.warm_pool}: must not be negative")
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    config = ActivatorConfig(warm_pool_size=args.warm_pool)
    try:
        return asyncio.run(
            serve(args.dir, args.host, args.port, watch=not args.no_watch, config=config, state_dir=args.state_dir)
        )
    except ValueError as err:  # a bad EMBER_SANDBOX / EMBER_RUNSC
        print(f"ember dev: {err}", file=sys.stderr)
        return 2


def invoke_main(argv: list[str]) -> int:
    """`ember invoke NAME [--data JSON] [--async] [--qualifier Q] [--url URL]`."""
    parser = argparse.ArgumentParser(prog="ember invoke", description="Invoke a function of a running `ember dev`.")
    parser.add_argument("name", help="function name, or NAMESPACE/NAME")
    parser.add_argument("--data", "-d", default="{}", help="the event, as JSON (default {}); @FILE reads a file")
    parser.add_argument("--async", dest="is_async", action="store_true", help="invoke asynchronously (202)")
    parser.add_argument("--qualifier", "-q", help="Version number or alias")
    parser.add_argument("--url", default=f"http://{DEFAULT_HOST}:{DEFAULT_PORT}", help="where ember dev listens")
    parser.add_argument("--log", action="store_true", help="print the tail of the function's log to stderr")
    args = parser.parse_args(argv)
    namespace, _, name = args.name.rpartition("/")
    data: str = args.data
    if data.startswith("@"):
        try:
            data = Path(data[1:]).read_text()
        except OSError as err:
            parser.error(f"--data {args.data}: {err.strerror}")
    try:
        json.loads(data)
    except ValueError as err:
        parser.error(f"--data is not JSON: {err}")
    url = invoke_url(args.url.rstrip("/"), namespace or "default", name)
    if args.qualifier:
        url += "?" + urllib.parse.urlencode({"qualifier": args.qualifier})
    headers = {"Content-Type": "application/json", "X-Ember-Invocation-Type": "async" if args.is_async else "sync"}
    if args.log:
        headers["X-Ember-Log-Type"] = "Tail"
    request = urllib.request.Request(url, data=data.encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=930) as response:
            body = response.read().decode(errors="replace")
            function_error = response.headers.get("X-Ember-Function-Error")
            version = response.headers.get("X-Ember-Executed-Version")
            log_result = response.headers.get("X-Ember-Log-Result")
    except urllib.error.HTTPError as err:
        print(f"ember invoke: {err.code} {err.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        print(f"ember invoke: cannot reach {args.url} ({reason}); is `ember dev` running?", file=sys.stderr)
        return 1
    if log_result and args.log:
        sys.stderr.write(base64.b64decode(log_result).decode(errors="replace"))
    print(body)
    if function_error:
        print(f"ember invoke: function error ({function_error}) in Version {version}", file=sys.stderr)
        return 1
    return 0
