"""One invocation, in order: Version → pod slot → agent → reply; shared by every API.

Every API reaches it through `dispatch` (a sync invocation) and the async workers call it
for each queued event, always with a resolved Version. A pod that cannot be reached is
taken out of routing and the invocation retried once on another (it was never delivered);
a pod that dies while running it gives an `Unhandled` function error, as in Lambda. The
invoker does not know the scaler: it tells the Version (`VersionState.pod_lost`) and pokes the
injected `Wake` so that the scaling loop replaces the pod without waiting for its tick. Every
reply's measured memory and CPU go to the Version's right-sizing (`VersionState.record_usage`).
A frozen pod is thawed by its invocation (`ember.activator.freezer`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import time
from dataclasses import dataclass

from ember.activator.agent_client import AgentClient, AgentLost, AgentReply, AgentUnreachable
from ember.activator.errors import (
    ActivatorError,
    CapacityTimeout,
    InvalidContent,
    PayloadTooLarge,
    PodFailed,
    Throttled,
)
from ember.activator.freezer import Freezer, needs_thaw
from ember.activator.registry import Registry
from ember.activator.throttler import PodSlots
from ember.activator.version_state import VersionState
from ember.activator.wake import Wake
from ember.pods.base import PodId

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Result:
    """What the APIs map to a reply: the agent's answer and the Version that ran it."""

    version: VersionState
    reply: AgentReply
    request_id: str


def new_request_id() -> str:
    """A random (version 4) UUID as text; faster than `str(uuid.uuid4())` on the hot path."""
    h = os.urandom(16).hex()
    return f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{'89ab'[int(h[16], 16) & 3]}{h[17:20]}-{h[20:32]}"


def _error_body(error_type: str, message: str) -> bytes:
    return json.dumps({"errorType": error_type, "errorMessage": message}).encode()


@dataclass(frozen=True, slots=True)
class Call:
    """One invocation whose code may call portions: its Version, the pod running it, and when its
    time is up (`time.monotonic`): the portions it calls must be done by then."""

    caller: VersionState
    pod: PodId
    deadline: float


class CallTokens:
    """The open call tokens (`ember.activator.portions`), one per invocation in flight on a pod
    whose code calls portions; closed when the invocation ends."""

    def __init__(self) -> None:
        self._open: dict[str, Call] = {}

    def open(self, caller: VersionState, pod: PodId, within_s: float) -> str:
        token = secrets.token_urlsafe(24)
        self._open[token] = Call(caller, pod, time.monotonic() + within_s)
        return token

    def close(self, token: str) -> None:
        self._open.pop(token, None)

    def get(self, token: str) -> Call | None:
        return self._open.get(token)


class Invoker:
    """Runs invocations against the registry's Versions."""

    def __init__(self, registry: Registry, client: AgentClient, wake: Wake, freezer: Freezer) -> None:
        self.registry = registry
        self.tokens = CallTokens()  # of invocations in flight whose code may call portions
        self._client = client
        self._wake = wake
        self._freezer = freezer

    def resolve(self, namespace: str, name: str, qualifier: str | None) -> VersionState:
        """The Version that serves; FunctionNotFound / NotReady name what is missing."""
        vs = self.registry.route(namespace, name, qualifier)
        vs.mark_requested(time.monotonic(), qualified=bool(qualifier))
        return vs

    async def invoke(
        self, vs: VersionState, body: bytes, *, request_id: str, log_tail: bool = False, by: float | None = None
    ) -> Result:
        """Run one invocation on a pod of the Version; raises ActivatorError for what the caller must map.

        `by` (`time.monotonic`): it must be done then, sooner than the function's own timeout would
        say (a portion called by an invocation with less time left); the wait for a pod counts."""
        started = time.perf_counter()
        try:
            reply = await self._run(vs, body, request_id, log_tail, by)
        except Throttled:
            vs.count("throttled")
            raise
        except ActivatorError:
            vs.count("error")
            raise
        vs.duration.observe(time.perf_counter() - started)
        vs.count("function_error" if reply.function_error else "success")
        return Result(vs, reply, request_id)

    async def _run(
        self, vs: VersionState, body: bytes, request_id: str, log_tail: bool, by: float | None
    ) -> AgentReply:
        for attempt in (1, 2):
            if by is None:
                pod = await vs.throttler.acquire()
            else:
                try:
                    async with asyncio.timeout_at(_loop_time(by)):
                        pod = await vs.throttler.acquire()
                except TimeoutError:
                    raise CapacityTimeout(f"{vs.fs.label}: no pod free before the caller's time was up") from None
            # a frozen pod (`ember.activator.freezer`): the invocation thaws it
            thaw = needs_thaw(pod) and await self._freezer.before_invoke(pod)
            timeout_s, function_s, function_ms = vs.timeout_s, float(vs.spec.timeout_seconds), None
            if by is not None and (within_s := by - time.monotonic()) < function_s:
                timeout_s, function_s = timeout_s - function_s + within_s, within_s
                function_ms = max(1, int(within_s * 1000))
            call = self.tokens.open(vs, pod.handle.id, function_s) if vs.callees else None
            try:
                reply = await self._client.invoke(
                    pod,
                    body,
                    request_id=request_id,
                    timeout_s=timeout_s,
                    log_tail=log_tail,
                    call_token=call,
                    function_timeout_ms=function_ms,
                    thaw=thaw,
                )
            except AgentUnreachable as err:
                log.warning(
                    "pod unreachable function=%s pod=%s attempt=%d error=%s", vs.fs.label, pod.handle.id, attempt, err
                )
                self._pod_lost(vs, pod)
                continue
            except AgentLost as err:
                self._pod_lost(vs, pod)
                return _unhandled("Runtime.ExitError", f"the function's sandbox stopped during the invocation: {err}")
            except TimeoutError:  # the agent answers its own timeouts: this one is the pod's silence
                log.warning("no reply function=%s pod=%s request_id=%s timeout_s=%g", vs.fs.label, pod.handle.id,
                            request_id, timeout_s)  # fmt: skip
                return _unhandled("Sandbox.Timedout", f"no reply within {timeout_s:g} s")
            finally:
                vs.throttler.release(pod)
                if call is not None:
                    self.tokens.close(call)
            if thaw and self._freezer.after_invoke(vs, pod, reply):
                self._wake.poke()
                continue  # its thaw failed and it left routing; the invocation goes to another pod
            status = reply.status
            if status == 200:
                vs.record_usage(reply, pod.handle.pool.memory_mib)
                return reply
            if status == 503 and attempt == 1:  # agent not specialized: restarted under us
                vs.pod_lost(pod)
                self._wake.poke()
                continue
            message = _agent_message(reply.body)
            if status == 400:
                raise InvalidContent(message or "the request body is not valid JSON")
            if status == 413:
                raise PayloadTooLarge(message or "the request body is too large for the function")
            if status == 429:
                raise Throttled(f"{vs.fs.label}: pod refused the invocation: {message}")
            raise PodFailed(f"{vs.fs.label}: pod answered {status}: {message}")
        raise PodFailed(f"{vs.fs.label}: no reachable pod after a retry")

    def _pod_lost(self, vs: VersionState, pod: PodSlots) -> None:
        vs.pod_lost(pod)
        self._wake.poke()
        self._client.forget(pod.address)


def _loop_time(monotonic: float) -> float:
    """A `time.monotonic` instant on the running loop's clock."""
    return asyncio.get_running_loop().time() + monotonic - time.monotonic()


def _agent_message(body: bytes) -> str:
    try:
        parsed = json.loads(body)
    except ValueError:
        return body[:200].decode(errors="replace")
    if isinstance(parsed, dict):
        return str(parsed.get("errorMessage", ""))
    return ""


def _unhandled(error_type: str, message: str) -> AgentReply:
    return AgentReply(
        status=200,
        body=_error_body(error_type, message),
        function_error="Unhandled",
        log_result=None,
        duration_ms=None,
        max_rss_kib=None,
    )
