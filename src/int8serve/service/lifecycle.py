"""Where the server is in its life (loading → ready → draining) and which requests are still in flight.

Load balancers and orchestrators watch `/readyz` and send SIGTERM before they stop a server; what users see of
that depends on two things this module keeps: the phase, and the count of API requests being answered (a stream
counts until its last byte is sent, and the work it leaves behind until its ledger row is written).
`LifecycleMiddleware` is the gate in front of the routes:

* loading (the weights are not in memory yet): `/healthz` 200, `/readyz` 503, `/metrics` 200 with what exists
  already (the phase, the process's metrics: `metrics.LoadingMetrics`), so that a Prometheus scraper does not take
  minutes of loading for a target down; any other path 503;
* ready: everything goes to the routes, and API requests are counted in flight;
* draining (after SIGTERM/SIGINT): `/readyz` 503 at once, new API requests 503 with the error envelope of their
  route (Cloudflare's, or OpenAI's under `/v1/` and `/ai/v1/`), while the requests already in flight finish.

Whatever the phase, a request on a connection beyond the server's connection limit (`connections.py`: every other
connection has a request in progress) is answered 429/3040 "Capacity temporarily exceeded" in its route's envelope,
with `Retry-After` and `Connection: close`, but for the probes and scrapes below.

`/healthz`, `/readyz` and `/metrics` are never counted nor refused by the drain, so that probes and scrapes keep
working until the process exits. The server (`server.py`) waits with `wait_idle` for the in-flight count to reach
zero, up to its shutdown timeout; then it calls `cut`: a request that no engine has yet (still sending its body,
waiting for or in the worker process, being tokenized: what `until_cut` guards) ends at once with the drain's
refusal, and the engines end the others. Nothing of a request cut there is left waiting for a body that may never
come: the process exits as soon as the answers are sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from starlette.types import ASGIApp, Receive, Scope, Send

from .connections import OVER_LIMIT_SCOPE_KEY
from .errors import CAPACITY, NOT_READY, SHUTTING_DOWN, ApiError, error_response, json_response

__all__ = ["UNGATED_PATHS", "Lifecycle", "LifecycleMiddleware", "Phase"]

UNGATED_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
RETRY_AFTER = {"retry-after": "1"}
OVER_LIMIT_HEADERS = {**RETRY_AFTER, "connection": "close"}


class Phase(enum.Enum):
    LOADING = "loading"
    READY = "ready"
    DRAINING = "draining"


class Lifecycle:
    """The phase of one server and its API requests in flight (read from any thread)."""

    def __init__(self, phase: Phase = Phase.READY) -> None:
        self.phase = phase
        self._in_flight = 0  # HTTP requests being answered + work they left running (`track`)
        self.requests = 0  # HTTP requests being answered
        self._idle = threading.Condition()
        self.refused = 0  # requests answered 503 because of the phase
        self._cut = False
        self._until_cut: set[_Guard] = set()  # the blocks `until_cut` guards now

    @property
    def ready(self) -> bool:
        return self.phase is Phase.READY

    @property
    def in_flight(self) -> int:
        with self._idle:
            return self._in_flight

    def not_ready_reason(self) -> str:
        return "the model is loading" if self.phase is Phase.LOADING else "the server is shutting down"

    def mark_ready(self) -> None:
        self.phase = Phase.READY

    def start_draining(self) -> None:
        self.phase = Phase.DRAINING

    def wait_idle(self, timeout: float) -> bool:
        """Block until no API request is in flight or `timeout` seconds pass; True if idle."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._idle.wait(left)
        return True

    def cut(self) -> None:
        """The drain's end (its timeout, or a second signal), from any thread: every block `until_cut` guards ends
        now, and any entered from now on at once."""
        with self._idle:
            self._cut = True
            guards = list(self._until_cut)
        for guard in guards:
            with contextlib.suppress(RuntimeError):  # its event loop has closed: nothing left to end
                guard.loop.call_soon_threadsafe(self._end, guard)

    @contextlib.asynccontextmanager
    async def until_cut(self) -> AsyncIterator[None]:
        """The block, ended at the cut (cancelled where it waits) with the drain's refusal: 503/3040 "Not ready: the
        server is shutting down", `Retry-After`. For what a request does before an engine has it."""
        try:
            async with asyncio.timeout(None) as deadline:
                guard = _Guard(asyncio.get_running_loop(), deadline)
                with self._idle:
                    cut = self._cut
                    if not cut:
                        self._until_cut.add(guard)
                if cut:
                    raise ApiError(SHUTTING_DOWN, headers=RETRY_AFTER)
                try:
                    yield
                finally:
                    with self._idle:
                        self._until_cut.discard(guard)
        except TimeoutError:
            if not deadline.expired():  # not the cut's
                raise
            raise ApiError(SHUTTING_DOWN, headers=RETRY_AFTER) from None

    def _end(self, guard: _Guard) -> None:
        """On the guard's event loop: cancel its block if it is still in it."""
        with self._idle:
            inside = guard in self._until_cut
        if inside:
            guard.deadline.reschedule(guard.loop.time())

    def track(self, task: asyncio.Future[object]) -> None:
        """Count `task` in flight until it ends: work a request leaves running after its answer is sent (the
        engine finishing a stream whose client left, its ledger row), which the drain must wait for too."""
        self._enter()
        task.add_done_callback(lambda _task: self._leave())

    def _enter(self) -> None:
        with self._idle:
            self._in_flight += 1

    def _leave(self) -> None:
        with self._idle:
            self._in_flight -= 1
            if not self._in_flight:
                self._idle.notify_all()


@dataclass(frozen=True, eq=False)
class _Guard:
    """One block `until_cut` guards: its event loop, and the deadline that cancels it."""

    loop: asyncio.AbstractEventLoop
    deadline: asyncio.Timeout


class LifecycleMiddleware:
    """The gate described in the module docstring. `app` may be None while the model loads (the server has no
    routes yet): then only the gate answers, and `metrics` (if given) answers `/metrics`."""

    def __init__(self, app: ASGIApp | None, lifecycle: Lifecycle, metrics: ASGIApp | None = None) -> None:
        self.app = app
        self.lifecycle = lifecycle
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" and self.app is None:
            await _no_lifespan(receive, send)
            return
        if scope["type"] != "http":
            if self.app is not None:
                await self.app(scope, receive, send)
            return
        lifecycle = self.lifecycle
        path = scope.get("path", "")
        if scope.get(OVER_LIMIT_SCOPE_KEY) and path not in UNGATED_PATHS:  # a connection beyond the server's limit
            await error_response(path, ApiError(CAPACITY, headers=OVER_LIMIT_HEADERS))(scope, receive, send)
        elif self.app is not None and path in UNGATED_PATHS:
            await self.app(scope, receive, send)
        elif self.app is not None and lifecycle.ready:
            lifecycle._enter()
            lifecycle.requests += 1
            try:
                await self.app(scope, receive, send)
            finally:
                lifecycle.requests -= 1
                lifecycle._leave()
        elif path == "/healthz":  # alive, even while loading
            await json_response({"status": "ok"})(scope, receive, send)
        elif path == "/metrics" and scope.get("method") in ("GET", "HEAD") and self.app is None \
                and self.metrics is not None:  # scraped while loading (other methods: not ready, as elsewhere)
            await self.metrics(scope, receive, send)
        else:
            lifecycle.refused += path != "/readyz"
            error = ApiError(NOT_READY, reason=lifecycle.not_ready_reason(), headers=RETRY_AFTER)
            await error_response(path, error)(scope, receive, send)


async def _no_lifespan(receive: Receive, send: Send) -> None:
    """Answer the server's lifespan messages while there is no app behind the gate."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
