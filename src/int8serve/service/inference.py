"""One inference request, from its body to its ledger row: `Inference.run` and the `InferenceCall` it makes.

Every inference route (`/ai/run`, OpenAI's `chat/completions` and `completions`) goes through the same steps; a
route only picks its wire format (`formats.py`):

    read the body (bounded in size and time) → parse and check it against the card, in a worker thread → admit
    (daily allocation, requests per minute) → tokenize and check the context window, in a worker thread →
    response cache → the account's share of the engine → engine → answer (JSON, or SSE frames) → `finish`

`InferenceCall.finish` is the one place a request ends, however it ends (complete, cut, failed, from the cache): it
meters neurons, writes the ledger row durably, stores a complete answer in the cache and records metrics. For an
engine request it runs when the engine ends the request, in a task of its own, whether or not the client reads
the last frame: usage is never left unrecorded by a client that stopped reading, and the account's share of the
engine is given back at that moment. The drain on shutdown waits for these tasks (`lifecycle.py`).

What each step does to the answer:

* every answer (authentication has passed: the route's dependency answers its failures, without these headers)
  gets `cf-aig-cache-status` (HIT or MISS) and, once the account's limit is known, the
  `x-ratelimit-*-requests` headers — errors included (an answer that does not count shows the window unchanged);
* admission refuses with 429/3036 (allocation used up) or 429/3021 (`Retry-After`); neither is counted. An admitted
  request holds its worst case against the daily allocation until `finish` (or until it leaves before the engine
  has it): at most one request crosses the line (`policy/allocation.py`);
* a cache hit costs 0 neurons, still counts for the limiter, and is replayed as the original's frames, with a live
  stream's deadline: cut when its client stops reading, stopped when it leaves (its log line then says `aborted`);
* a complete answer is metered (`cf-ai-neurons` header, or `neurons` in the final usage frame) and its ledger row
  is durable before the answer (or the final frame) is released;
* a request the client left or stopped reading is `aborted`, a failed one `error`; nothing of either is cached;
* a full engine queue refuses with 429/3040 (counted, no ledger row, the reservation given back), at once or later:
  a waiting request whose place goes to another account's (`Engine.submit`) gets that same answer, so a stream's
  200 goes out only once the engine has taken its request into a slot.

Everything that can fail with a status is checked before the first byte of a 200.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Awaitable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from int8serve.catalog.card import ModelCard
from int8serve.catalog.registry import Catalog
from int8serve.engine.scheduler import (
    Engine,
    EngineStoppedError,
    FinishReason,
    GenerationRequest,
    QueueFullError,
    RequestHandle,
)

from .connections import DEFAULT_STALL_TIMEOUT
from .errors import (
    BAD_INPUT,
    CAPACITY,
    INTERNAL,
    RATE_LIMITED,
    REQUEST_ABORTED,
    REQUEST_TIMEOUT,
    SHUTTING_DOWN,
    ApiError,
    ErrorKind,
    answered_status,
    json_response,
)
from .formats import WireFormat
from .lifecycle import Lifecycle
from .metrics import ServiceMetrics
from .policy import NEURONS_HEADER, LedgerUnavailableError, Outcome, Policy, UsageRow, billed_neurons, format_neurons
from .policy.allocation import Reservation
from .policy.cache import CACHE_STATUS_HEADER, CachedAnswer, CacheDirectives, CacheKey
from .policy.fairness import InflightLimiter
from .policy.usage_rows import utc_now
from .protocol.body import CLOSE, DEFAULT_MAX_BODY_BYTES, read_body
from .protocol.run import RunRequest, ValidatedRun
from .request_log import REQUEST_ID_SCOPE_KEY
from .streaming import UNSENT_ANSWER_BYTES, Answer, AnswerBuilder, EventStreamResponse, watch_disconnect
from .workers import RequestWorkers, Resolver

__all__ = ["Inference", "InferenceCall", "RequestLimits", "Served"]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RequestLimits:
    """What one request may cost the server before and while it is answered."""

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES  # 413/3006 beyond
    body_timeout: float = 30.0  # seconds to receive the whole body: 408/3007 beyond
    stall_timeout: float = DEFAULT_STALL_TIMEOUT  # a stream whose client reads nothing for this long is cut
    # requests of one account in a model's engine: one cap for every model, or a cap per model name; None: no cap
    max_inflight_per_account: int | Mapping[str, int | None] | None = None
    parse_threads: int = 2  # threads checking and tokenizing small bodies at once (large ones: `workers.py`)
    retry_after_seconds: int = 1  # `Retry-After` of 429/3040 and 503 answers

    def inflight_cap(self, model: str) -> int | None:
        """The cap on one account's requests in `model`'s engine (None: no cap)."""
        cap = self.max_inflight_per_account
        return cap.get(model) if isinstance(cap, Mapping) else cap

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1 or self.body_timeout <= 0 or self.stall_timeout <= 0 or self.parse_threads < 1:
            raise ValueError("request limits must be positive")


class Served(NamedTuple):
    card: ModelCard
    engine: Engine


@dataclass(frozen=True)
class Finished:
    """How a request ended: its answer, its neurons, and the error its client gets instead (None: complete)."""

    answer: Answer
    neurons: float
    failure: ErrorKind | None


class Inference:
    """Runs the inference requests of an app over `engines` (model name → Engine) under `policy`."""

    def __init__(self, catalog: Catalog, engines: Mapping[str, Engine], policy: Policy, metrics: ServiceMetrics,
                 lifecycle: Lifecycle, limits: RequestLimits | None = None) -> None:
        self.engines = dict(engines)
        self.policy = policy
        self.metrics = metrics
        self.lifecycle = lifecycle
        self.limits = limits or RequestLimits()
        self.retry_headers = {"retry-after": str(self.limits.retry_after_seconds)}
        # each model's engine has its own slots, so each its own share per account
        self.inflight = {name: InflightLimiter(self.limits.inflight_cap(name), self.retry_headers) for name in engines}
        self.resolve = Resolver({name: catalog.get(name) for name in engines}, frozenset(catalog.names()))
        self.workers = RequestWorkers(self.resolve, {name: e.tokenizer for name, e in engines.items()},
                                      threads=self.limits.parse_threads, keep_prompts=metrics.log_prompts)
        self._tasks: set[asyncio.Task[Any]] = set()

    def served(self, name: str) -> Served:
        return Served(self.resolve(name), self.engines[name])

    async def run(self, request: Request, account: str, fmt: WireFormat, model: str | None = None) -> Response:
        """Answer one inference request of `account` in wire format `fmt`, for `model` (None: the format reads
        it from the body, as OpenAI's `"model"`)."""
        return await InferenceCall(self, request, account, fmt).answer(model)

    def spawn(self, work: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run `work` to its end whatever happens to the HTTP exchange; the drain waits for it."""
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        self.lifecycle.track(task)
        return task


class InferenceCall:
    """One inference request on its way through `Inference`."""

    def __init__(self, inference: Inference, request: Request, account: str, fmt: WireFormat) -> None:
        self.inference = inference
        self.policy = inference.policy
        self.request = request
        self.account = account
        self.fmt = fmt
        self.request_id: str = request.scope.get(REQUEST_ID_SCOPE_KEY) or str(uuid.uuid4())
        self.admitted_at = utc_now()  # naive UTC, the ledger's time and its day: set again at admission (`answer`)
        self.obs = inference.metrics.observe(self.request_id, request.scope)
        self.obs.fields["account"] = account
        self.headers: dict[str, str] = {CACHE_STATUS_HEADER: "MISS"}
        self.served: Served | None = None
        self.cache_key: CacheKey | None = None
        self.directives = CacheDirectives()
        self._streaming = False  # a live stream: observed when it ends, not when the route returns
        self._closed = False
        self.reservation: Reservation | None = None  # its worst case held against the daily allocation
        self._unsent = 0  # bytes of the stream's frames not yet handed to the connection (in `sink`, or being sent)
        self._cut = asyncio.Event()  # set once they grew past UNSENT_ANSWER_BYTES: the stream is cut
        self._response: EventStreamResponse | None = None  # the stream's, once made

    async def answer(self, model: str | None) -> Response:
        try:
            response = await self._answer(model)
        except ApiError as err:
            err.headers = {**self.headers, **err.headers}
            self.obs.finish(answered_status(self.request.url.path, err), err.code)
            raise
        except (Exception, asyncio.CancelledError):  # a fault; or a forced exit ended the route's task (queued,
            self.obs.finish(INTERNAL.status, INTERNAL.code)  # or collecting), which uvicorn answers 500 if it can
            raise
        if not self._streaming:
            self.obs.finish(response.status_code)
        return response

    async def _answer(self, model: str | None) -> Response:
        if model is not None:
            self.obs.fields["model"] = model
            self.served = self.inference.served(model)
        try:  # until the engine has the request, every way out gives its reservation (if it has one) back
            async with self.inference.lifecycle.until_cut():  # the drain's end refuses what no engine has yet
                run, hit = await self._before_the_engine()
            self.obs.fields["stream"] = run.checked.stream  # a cache hit's replay too
            if hit is not None:
                return await self._replay(run, hit)
            handle = self._submit(self._served().engine, run)
            sink: asyncio.Queue[bytes | Finished] | None = asyncio.Queue() if run.checked.stream else None
            ended = self.inference.spawn(self._follow(handle, sink))  # from here on, `finish` releases it
        except BaseException:
            self._release_soon()
            raise
        if sink is not None:
            await self._until_placed(handle, ended)
            return self._stream(handle, ended, sink)
        return await self._collected(handle, ended)

    async def _before_the_engine(self) -> tuple[RunRequest, CachedAnswer | None]:
        """The body checked, the request admitted and tokenized; the response cache's answer, if it has one."""
        checked = await self._checked_body()
        card, engine = self._served()
        window = min(card.context_length_limit, engine.max_seq_len)
        await self._admit(card, checked, window)
        run = await self.inference.workers.tokenize(self.account, card.name, checked, window)
        if self.reservation is not None and self.policy.allocation is not None:
            worst = card.policy.neurons(run.prompt_tokens, run.checked.max_tokens)
            await self.policy.allocation.resize(self.reservation, worst)
        hit = None
        if self.policy.caches(card):
            self.directives = self.policy.cache.directives(self.request.headers)
            self.cache_key = self.policy.cache.key(self.account, card.name, run, engine.fingerprint)
            hit = await self.policy.cache.get(self.cache_key, self.directives)
            self.obs.cache(card.name, hit is not None)
        return run, hit

    def _served(self) -> Served:
        assert self.served is not None
        return self.served

    # ---- the body ----

    async def _checked_body(self) -> ValidatedRun:
        limits = self.inference.limits
        model = self.served.card.name if self.served is not None else None
        try:
            try:
                async with asyncio.timeout(limits.body_timeout):
                    raw = await read_body(self.request, limits.max_body_bytes)
            except TimeoutError:
                raise ApiError(REQUEST_TIMEOUT, headers=CLOSE) from None
            checked = await self.inference.workers.check(self.account, self.fmt, raw, model)
        except ApiError as err:
            model = model or err.fields.get("model")
            self.obs.fields["model"] = model
            if model in self.inference.engines:  # a refused body does not count, but the answer shows the window
                await self._show_window(self.inference.served(model).card)
            raise
        self.fmt, self.served = checked.fmt, self.inference.served(checked.model)
        self.obs.input(self.account, checked.model, checked.prompt)
        return checked.run

    # ---- admission ----

    async def _admit(self, card: ModelCard, checked: ValidatedRun, window: int) -> None:
        """The daily allocation (3036), then one hit on the account's window (3021); only an admitted request
        counts. The allocation holds the request's worst case (prompt + `max_tokens`, the prompt bounded by its
        bytes until it is tokenized) until the request ends: `finish`, or `_release_soon` on the way out before
        the engine has it. The request's time (its ledger row's, and the day it counts to) is taken here, once its
        body is in, not when its headers came: a body that arrives across midnight is admitted in the new day, and
        counts to it."""
        self.admitted_at = utc_now()
        if self.policy.allocation is not None:
            worst = max(card.policy.neurons(prompt, generated)
                        for prompt, generated in checked.worst_cases(checked.prompt_tokens_bound(), window))
            try:
                self.reservation = await self.policy.allocation.reserve(self.account, worst, self.admitted_at)
            except ApiError:
                await self._show_window(card)
                raise
        try:
            status = await self.policy.limiter.acquire(card, self.account)
        except BaseException:
            self._release_soon()
            raise
        if status is None:
            return
        headers = status.headers()
        retry_after = headers.pop("retry-after", None)
        self.headers.update(headers)
        if not status.allowed:
            self._release_soon()
            raise ApiError(RATE_LIMITED, headers={"retry-after": retry_after or "1"})

    def _release_soon(self, neurons: float = 0.0) -> None:
        """Give the request's reservation back where it cannot wait for Redis (an exception, a cancelled task);
        `neurons`: what its ledger row records (none when it ends before the engine ran it)."""
        if self.reservation is not None and self.policy.allocation is not None:
            task = self.policy.allocation.release_soon(self.reservation, neurons)
            if task is not None:
                self.inference.lifecycle.track(task)  # the drain waits for Redis' part

    async def _show_window(self, card: ModelCard) -> None:
        status = await self.policy.limiter.describe(card, self.account)
        if status is not None:
            self.headers.update({k: v for k, v in status.headers().items() if k != "retry-after"})

    def _submit(self, engine: Engine, run: RunRequest) -> RequestHandle:
        """The request into the engine, within the account's share of it."""
        retry = self.inference.retry_headers
        inflight = self.inference.inflight[self._served().card.name]
        inflight.acquire(self.account)
        generation = GenerationRequest(prompt_ids=list(run.prompt_ids), max_tokens=run.checked.max_tokens,
                                       params=run.checked.params, request_id=self.request_id, owner=self.account,
                                       continues_prompt=run.checked.raw)
        try:
            return engine.submit(generation, reject_if_busy=run.checked.reject_if_busy)
        except (QueueFullError, EngineStoppedError, ValueError) as err:
            inflight.release(self.account)
            if isinstance(err, QueueFullError):
                raise ApiError(CAPACITY, headers=retry) from None
            if isinstance(err, EngineStoppedError):
                raise ApiError(SHUTTING_DOWN, headers=retry) from None
            raise ApiError(BAD_INPUT, detail=str(err)) from None  # the engine's own checks; ours come first
        except BaseException:
            inflight.release(self.account)
            raise

    # ---- the engine's answer ----

    async def _follow(self, handle: RequestHandle, sink: asyncio.Queue[bytes | Finished] | None = None) -> Finished:
        """Task: the engine's events into an answer (text deltas also into `sink`, as frames), then `finish`."""
        builder = AnswerBuilder(prompt_tokens=len(handle.request.prompt_ids))
        try:
            async for event in handle.events():
                builder.add(event)
                self.obs.token(event)
                if event.text and sink is not None:
                    self._queue_frame(handle, sink, self.fmt.delta_frame(event.text))
        except BaseException:  # not the engine's answer (a bug, a cancelled task): no row, the reservation goes
            self._release_soon()
            raise
        finally:
            self.inference.inflight[self._served().card.name].release(self.account)
        answer = builder.answer()
        if answer.finish_reason is FinishReason.REFUSED:  # its place went to another account's request: refused
            self._release_soon()  # as by a full queue (`_submit`), without a row
            finished = Finished(answer, 0.0, CAPACITY)
        else:
            finished = await self.finish(answer)
        if sink is not None:
            sink.put_nowait(finished)
        return finished

    def _queue_frame(self, handle: RequestHandle, sink: asyncio.Queue[bytes | Finished], frame: bytes) -> None:
        """`frame` into `sink`, unless the frames waiting there would pass UNSENT_ANSWER_BYTES while the connection
        cannot take the one being sent: the client does not read, so the engine request is cancelled and the stream
        cut, as a stall is (`EventStreamResponse`). Frames that only wait for the event loop (the engine's tokens of
        a pause arrive together) are no client's fault: they are kept."""
        if self._cut.is_set():
            return
        blocked = self._response is not None and self._response.sending
        if blocked and self._unsent and self._unsent + len(frame) > UNSENT_ANSWER_BYTES:
            handle.cancel()
            self._cut.set()
            return
        self._unsent += len(frame)
        sink.put_nowait(frame)

    async def _collected(self, handle: RequestHandle, ended: asyncio.Task[Finished]) -> Response:
        watcher = asyncio.create_task(watch_disconnect(self.request.receive, handle.cancel))
        try:
            finished = await asyncio.shield(ended)
        finally:
            watcher.cancel()
        self._raise_failure(finished)
        self.headers[NEURONS_HEADER] = format_neurons(finished.neurons)
        return json_response(self.fmt.json_body(finished.answer), headers=self.headers)

    async def _until_placed(self, handle: RequestHandle, ended: asyncio.Task[Finished]) -> None:
        """A stream's 200 waits until the engine takes the request into a slot: until then it may still end with
        a status, as a collected request does (429/3040 when its place in the full queue went to another account's
        request, 503/3040 when the server stops)."""
        watcher = asyncio.create_task(watch_disconnect(self.request.receive, handle.cancel))
        try:
            await handle.placed()
        except asyncio.CancelledError:  # the exchange is over: so is the request
            handle.cancel()
            raise
        finally:
            watcher.cancel()
        if not handle.started_at:  # ended without a slot
            self._raise_failure(await asyncio.shield(ended))

    def _raise_failure(self, finished: Finished) -> None:
        if finished.failure is not None:
            retry = finished.failure is SHUTTING_DOWN or finished.failure is CAPACITY
            raise ApiError(finished.failure, headers=self.inference.retry_headers if retry else None)

    def _stream(self, handle: RequestHandle, ended: asyncio.Task[Finished], sink: asyncio.Queue[bytes | Finished]
                ) -> EventStreamResponse:
        self._streaming = True

        async def frames() -> Any:
            while isinstance(item := await sink.get(), bytes):
                yield item
                self._unsent -= len(item)  # handed to the connection
            if item.failure is not None:
                yield self.fmt.error_frame(item.failure)
            else:
                for frame in self.fmt.final_frames(item.answer, item.neurons):
                    yield frame

        def closed() -> None:  # the response ended, however (also called when the client leaves)
            handle.cancel()  # nothing if the engine finished it
            if not self._closed:
                self._closed = True
                self.inference.spawn(self._observe_stream(ended))

        self._response = EventStreamResponse(frames(), on_close=closed, headers=self.headers,
                                             send_timeout=self.inference.limits.stall_timeout, cut=self._cut)
        return self._response

    async def _observe_stream(self, ended: Awaitable[Finished]) -> None:
        try:
            finished = await ended
        except asyncio.CancelledError:  # a forced exit before the engine ended it: the stream was cut at shutdown
            self.obs.finish(200, SHUTTING_DOWN.code, in_stream=True)
            raise
        code = finished.failure.code if finished.failure is not None else None
        self.obs.finish(200, code, in_stream=True)

    async def _replay(self, run: RunRequest, hit: CachedAnswer) -> Response:
        self.headers[CACHE_STATUS_HEADER] = "HIT"
        answer = Answer(hit.deltas, hit.prompt_tokens, hit.completion_tokens, FinishReason(hit.finish_reason))
        finished = await self.finish(answer, cached=True)
        if finished.failure is not None:
            raise ApiError(finished.failure)
        if run.checked.stream:
            frames = [self.fmt.delta_frame(d) for d in answer.deltas] + list(self.fmt.final_frames(answer, 0.0))
            return self._replayed_stream(frames)
        self.headers[NEURONS_HEADER] = format_neurons(0.0)
        return json_response(self.fmt.json_body(answer), headers=self.headers)

    def _replayed_stream(self, frames: Sequence[bytes]) -> EventStreamResponse:
        """A cached answer's frames, sent as a live stream's are: cut after `stall_timeout` seconds without a
        frame taken, stopped once the client leaves, and observed when it ends (a cut one as `aborted`, 3008). Its
        ledger row is written already (`_replay`): a hit costs nothing, cut or not."""
        self._streaming = True
        delivered = False  # every frame was handed to the connection

        async def replay() -> Any:
            nonlocal delivered
            for frame in frames:
                # the server's send returns at once while the connection takes bytes: without a pause the whole
                # answer would go out in one tick, into the transport of a client that reset it meanwhile
                await asyncio.sleep(0)
                if self._closed:  # the client left
                    return
                yield frame
            delivered = True

        def closed() -> None:  # the response ended, however (also called when the client leaves)
            if not self._closed:
                self._closed = True
                self.obs.finish(200, None if delivered else REQUEST_ABORTED.code, in_stream=True)

        return EventStreamResponse(replay(), on_close=closed, headers=self.headers,
                                   send_timeout=self.inference.limits.stall_timeout)

    # ---- the end ----

    async def finish(self, answer: Answer, cached: bool = False) -> Finished:
        """Meter, write the ledger row (durable before returning), release the request's reservation, cache a
        complete answer, record metrics."""
        try:
            return await self._finish(answer, cached)
        except BaseException:  # whatever failed, the reservation does not outlive the request
            self._release_soon()
            raise

    async def _finish(self, answer: Answer, cached: bool) -> Finished:
        card = self._served().card
        outcome = _outcome(answer)
        neurons = billed_neurons(card, outcome, answer.prompt_tokens, answer.completion_tokens,
                                 started=answer.started, cached=cached)
        self.obs.answer(self.account, card.name, answer.prompt_tokens, answer.completion_tokens, neurons,
                        outcome.value, cached, answer.text, started=answer.started)
        row = UsageRow(request_id=self.request_id, time=self.admitted_at, account=self.account, model=card.name,
                       input_tokens=answer.prompt_tokens, output_tokens=answer.completion_tokens, neurons=neurons,
                       cached=cached, outcome=outcome.value, latency_ms=round(self.obs.elapsed() * 1000, 3))
        failure = None if outcome is Outcome.OK else self._failure(answer)
        recorded = neurons
        try:
            await self.policy.ledger.record(row)
        except LedgerUnavailableError:
            log.error("request %s: the usage ledger cannot take its row; the answer is not acknowledged",
                      self.request_id)
            failure, recorded = INTERNAL, 0.0
        except BaseException:  # cancelled while the row was being written: the writer writes it all the same
            self._release_soon(neurons)
            raise
        # the row counts as used now: the reservation goes, after the row, so that the request always counts
        if self.reservation is not None and self.policy.allocation is not None:
            await self.policy.allocation.release(self.reservation, recorded)
        if failure is None and not cached and self.cache_key is not None:
            entry = self.policy.cache.answer(answer.deltas, answer.prompt_tokens, answer.completion_tokens,
                                             answer.finish_reason)
            await self.policy.cache.put(self.cache_key, entry, self.directives)
        return Finished(answer, neurons, failure)

    def _failure(self, answer: Answer) -> ErrorKind:
        if answer.finish_reason is FinishReason.CANCELLED:
            return REQUEST_ABORTED
        if answer.finish_reason is FinishReason.SHUTDOWN:
            return SHUTTING_DOWN
        log.error("request %s failed in the engine: %s", self.request_id, answer.error)
        return INTERNAL


def _outcome(answer: Answer) -> Outcome:
    if answer.complete:
        return Outcome.OK
    return Outcome.ABORTED if answer.finish_reason is FinishReason.CANCELLED else Outcome.ERROR


