"""The request pipeline every inference route goes through, in DESIGN.md's order, with the card's serving policy.

    authenticate → find the model → read + parse the body → validate (wire format) → admit (daily allocation,
    then the rate limit) → template, tokenize, check the context window → response cache → queue for the engine
    → stream or collect → meter neurons + write the ledger row → respond

A route only picks its wire format (`formats.py`): `/ai/run` calls `pipeline.run(request, account, model,
WORKERS_AI)`, and an OpenAI-compatible route calls the same with its own format, so the same limits, cache,
metering and ledger apply to both.

What each step does to the answer:

* every answer gets `cf-aig-cache-status` (HIT or MISS) and, once the account's limit is known, the
  `x-ratelimit-*-requests` headers — errors included (an answer that does not count shows the window unchanged);
* admission refuses with 429/3036 (allocation used up) or 429/3021 (`Retry-After`); neither is counted;
* a cache hit costs 0 neurons, still counted by the limiter, and is replayed as the original's frames;
* a complete answer is metered (`cf-ai-neurons` header, or `neurons` in the final usage frame), its ledger row is
  durable before the answer is released, and then it is stored in the cache;
* an aborted or failed request is metered by `metering.billed_neurons` and written to the ledger as `aborted` /
  `error`; nothing of it is cached.

Everything that can fail with a status is checked before the first byte of a 200.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime

from starlette.requests import Request
from starlette.responses import Response

from int8serve.catalog.card import ModelCard
from int8serve.catalog.registry import Catalog
from int8serve.engine.scheduler import Engine, EngineStoppedError, GenerationRequest, QueueFullError, RequestHandle

from .auth import authenticate
from .errors import (
    BAD_INPUT,
    CAPACITY,
    INTERNAL,
    NO_SUCH_MODEL,
    RATE_LIMITED,
    REQUEST_ABORTED,
    UNAVAILABLE,
    ApiError,
    ErrorKind,
    json_response,
)
from .formats import WireFormat
from .inputs import RunRequest, parse_json_body, read_body, tokenize_run
from .metrics import RequestObservation, ServiceMetrics
from .policy import NEURONS_HEADER, LedgerUnavailableError, Outcome, Policy, UsageRow, billed_neurons, format_neurons
from .policy.cache import CACHE_STATUS_HEADER, CacheDirectives, cache_key
from .policy.ledger import utc_now
from .streaming import ABORTED, Answer, AnswerBuilder, EventStreamResponse, collect

__all__ = ["REQUEST_ID_SCOPE_KEY", "InferencePipeline"]

log = logging.getLogger(__name__)

REQUEST_ID_SCOPE_KEY = "int8serve.request_id"
DRAIN_SECONDS = 10.0  # how long an aborted request's remaining engine events are awaited for billing


@dataclass
class _Context:
    """One request on its way through the pipeline."""

    request_id: str
    received: datetime  # naive UTC, the ledger's time
    obs: RequestObservation  # metrics and the request log line (metrics.py)
    started: float = field(default_factory=time.monotonic)
    account: str = ""
    headers: dict[str, str] = field(default_factory=lambda: {CACHE_STATUS_HEADER: "MISS"})

    def latency_ms(self) -> float:
        return round((time.monotonic() - self.started) * 1000, 3)


@dataclass
class _Stream:
    """What the SSE generator and the response's close hook share."""

    builder: AnswerBuilder
    recorded: bool = False


class InferencePipeline:
    """The pipeline over `engines` (model name → Engine), for `tokens` (API token → account), under `policy`."""

    def __init__(self, catalog: Catalog, engines: Mapping[str, Engine], tokens: Mapping[str, str], policy: Policy,
                 max_body_bytes: int, retry_headers: Mapping[str, str], metrics: ServiceMetrics | None = None) -> None:
        self.catalog = catalog
        self.engines = dict(engines)
        self.tokens = dict(tokens)
        self.policy = policy
        self.max_body_bytes = max_body_bytes
        self.retry_headers = dict(retry_headers)
        self._background: set[asyncio.Task[None]] = set()
        self.metrics = metrics if metrics is not None else ServiceMetrics(engines, policy.fallbacks)

    def served_card(self, name: str) -> tuple[ModelCard, Engine]:
        if name not in self.catalog:
            raise ApiError(NO_SUCH_MODEL, model=name, note="")
        if name not in self.engines:
            raise ApiError(NO_SUCH_MODEL, model=name, note=" (the model is in the catalog but not served here)")
        return self.catalog.get(name), self.engines[name]

    async def run(self, request: Request, account_id: str, model: str | None, fmt: WireFormat) -> Response:
        """Answer one inference request of `account_id` for `model` in wire format `fmt`. `model` None: the
        format reads it from the body (`fmt.model_in_body`, e.g. OpenAI's `"model"`)."""
        request_id = request.scope.get(REQUEST_ID_SCOPE_KEY) or str(uuid.uuid4())
        obs = self.metrics.observe(request_id)
        ctx = _Context(request_id=request_id, received=utc_now(), obs=obs)
        obs.fields.update(account=account_id, model=model)
        try:
            response = await self._run(ctx, request, account_id, model, fmt)
        except ApiError as err:
            err.headers = {**ctx.headers, **err.headers}
            obs.finish(err.status, err.code)
            raise
        except Exception:
            obs.finish(INTERNAL.status, INTERNAL.code)
            raise
        if not obs.deferred:  # a live stream is observed when it ends (`_stream`, `_record_aborted`)
            obs.finish(response.status_code)
        return response

    async def _run(self, ctx: _Context, request: Request, account_id: str, model: str | None,
                   fmt: WireFormat) -> Response:
        ctx.account = authenticate(request.headers, account_id, self.tokens)
        served = self.served_card(model) if model is not None else None
        try:
            body = parse_json_body(await read_body(request, self.max_body_bytes))
            if served is None:
                served = self.served_card(fmt.model_in_body(body))
            card, engine = served
            ctx.obs.input(ctx.account, card.name, body)
            checked = fmt.validate(body, card)
        except ApiError:
            if served is not None:  # a refused body does not count, but the answer says where the window stands
                await self._show_window(ctx, served[0])
            raise
        await self._admit(ctx, card)
        run = tokenize_run(checked, engine.tokenizer, min(card.context_length_limit, engine.max_seq_len))
        directives = CacheDirectives.from_headers(request.headers)
        key = cache_key(card.name, run) if self.policy.caches(card) else None
        if key is not None:
            hit = await self.policy.cache.get(key, directives)
            ctx.obs.cache(card.name, hit is not None)
            if hit is not None:
                answer = Answer(hit.deltas, hit.prompt_tokens, hit.completion_tokens, hit.finish_reason)
                return await self._from_cache(ctx, card, fmt, run, answer)
        # wrapped to note first/last token times (metrics.TimedHandle: same request/events/cancel)
        handle = ctx.obs.timed(self._submit(engine, run, ctx.request_id), run.checked.stream)
        watch = getattr(fmt, "watch", None)  # optional format hook on the engine request (OpenAI stop sequences)
        if watch is not None:
            handle = watch(handle)
        if run.checked.stream:
            state = _Stream(AnswerBuilder(prompt_tokens=run.prompt_tokens))
            frames = self._stream(ctx, card, fmt, handle, state, key, directives)
            return EventStreamResponse(frames, on_close=lambda: self._closed(ctx, card, handle, state),
                                       headers=ctx.headers)
        answer = await collect(handle, request.receive)
        return await self._respond(ctx, card, fmt, answer, key, directives)

    # ---- admission ----

    async def _admit(self, ctx: _Context, card: ModelCard) -> None:
        """The daily allocation (3036), then one hit on the account's window (3021); only an admitted request
        counts."""
        if self.policy.allocation is not None:
            try:
                await self.policy.allocation.check(ctx.account)
            except ApiError:
                await self._show_window(ctx, card)
                raise
        status = await self.policy.limiter.acquire(card, ctx.account)
        if status is None:
            return
        headers = status.headers()
        retry_after = headers.pop("retry-after", None)
        ctx.headers.update(headers)
        if not status.allowed:
            raise ApiError(RATE_LIMITED, headers={"retry-after": retry_after or "1"})

    async def _show_window(self, ctx: _Context, card: ModelCard) -> None:
        status = await self.policy.limiter.describe(card, ctx.account)
        if status is not None:
            ctx.headers.update({k: v for k, v in status.headers().items() if k != "retry-after"})

    # ---- the engine ----

    def _submit(self, engine: Engine, run: RunRequest, request_id: str) -> RequestHandle:
        generation = GenerationRequest(prompt_ids=list(run.prompt_ids), max_tokens=run.checked.max_tokens,
                                       params=run.checked.params, request_id=request_id)
        try:
            return engine.submit(generation, reject_if_busy=run.checked.reject_if_busy)
        except QueueFullError:
            raise ApiError(CAPACITY, headers=self.retry_headers) from None
        except EngineStoppedError:
            raise ApiError(UNAVAILABLE, headers=self.retry_headers) from None
        except ValueError as err:  # the engine's own sanity checks; ours should have caught it first
            raise ApiError(BAD_INPUT, detail=str(err)) from None

    # ---- answers ----

    async def _from_cache(self, ctx: _Context, card: ModelCard, fmt: WireFormat, run: RunRequest,
                          answer: Answer) -> Response:
        ctx.headers[CACHE_STATUS_HEADER] = "HIT"
        await self._record(ctx, card, answer, Outcome.OK, 0.0, cached=True)
        if run.checked.stream:
            frames = [fmt.delta_frame(d) for d in answer.deltas] + list(fmt.final_frames(answer, 0.0))
            return EventStreamResponse(_replay(frames), on_close=_nothing, headers=ctx.headers)
        ctx.headers[NEURONS_HEADER] = format_neurons(0.0)
        return json_response(fmt.json_body(answer), headers=ctx.headers)

    async def _respond(self, ctx: _Context, card: ModelCard, fmt: WireFormat, answer: Answer, key: str | None,
                       directives: CacheDirectives) -> Response:
        outcome = _outcome(answer)
        neurons = billed_neurons(card, outcome, answer.prompt_tokens, answer.completion_tokens,
                                 started=answer.started)
        await self._record(ctx, card, answer, outcome, neurons)
        if outcome is not Outcome.OK:
            raise ApiError(self._failure(ctx, answer))
        await self._store(key, directives, answer)
        ctx.headers[NEURONS_HEADER] = format_neurons(neurons)
        return json_response(fmt.json_body(answer), headers=ctx.headers)

    async def _stream(self, ctx: _Context, card: ModelCard, fmt: WireFormat, handle: RequestHandle, state: _Stream,
                      key: str | None, directives: CacheDirectives) -> AsyncIterator[bytes]:
        try:
            async for event in handle.events():
                state.builder.add(event)
                if event.text:
                    yield fmt.delta_frame(event.text)
                if event.finish_reason is None:
                    continue
                answer = state.builder.answer()
                outcome = _outcome(answer)
                neurons = billed_neurons(card, outcome, answer.prompt_tokens, answer.completion_tokens,
                                         started=answer.started)
                state.recorded = True
                if outcome is not Outcome.OK:
                    self._record_nowait(ctx, card, answer, outcome, neurons)
                    failure = self._failure(ctx, answer)
                    ctx.obs.finish(200, failure.code, in_stream=True)
                    yield fmt.error_frame(failure)
                    return
                try:
                    await self._record(ctx, card, answer, outcome, neurons)
                except ApiError as err:  # the ledger cannot take the row: the answer is not acknowledged
                    ctx.obs.finish(200, err.kind.code, in_stream=True)
                    yield fmt.error_frame(err.kind)
                    return
                await self._store(key, directives, answer)
                ctx.obs.finish(200)
                for frame in fmt.final_frames(answer, neurons):
                    yield frame
                return
        finally:
            self._closed(ctx, card, handle, state)

    def _closed(self, ctx: _Context, card: ModelCard, handle: RequestHandle, state: _Stream) -> None:
        """The stream's response ended (however): cancel the engine request and, if the client left before the
        end, bill what the engine generated once its last event is in."""
        handle.cancel()
        if state.recorded:
            return
        state.recorded = True
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # finalized outside the loop (interpreter exit): bill what was seen
            self._record_aborted(ctx, card, state.builder)
            return
        task = loop.create_task(self._bill_aborted(ctx, card, handle, state.builder))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _bill_aborted(self, ctx: _Context, card: ModelCard, handle: RequestHandle,
                            builder: AnswerBuilder) -> None:
        if not builder.finished:
            try:
                async with asyncio.timeout(DRAIN_SECONDS):
                    async for event in handle.events():
                        builder.add(event)
            except TimeoutError:
                log.warning("request %s: no final engine event after the client left", ctx.request_id)
        self._record_aborted(ctx, card, builder)

    def _record_aborted(self, ctx: _Context, card: ModelCard, builder: AnswerBuilder) -> None:
        answer = builder.answer(aborted=True)
        neurons = billed_neurons(card, Outcome.ABORTED, answer.prompt_tokens, answer.completion_tokens,
                                 started=answer.started)
        self._record_nowait(ctx, card, answer, Outcome.ABORTED, neurons)
        ctx.obs.finish(200)

    def _failure(self, ctx: _Context, answer: Answer) -> ErrorKind:
        if answer.finish_reason == ABORTED:
            return REQUEST_ABORTED
        if answer.finish_reason == "cancelled":  # dropped by the engine: it is shutting down
            return UNAVAILABLE
        log.error("request %s failed in the engine: %s", ctx.request_id, answer.error)
        return INTERNAL

    # ---- metering, the ledger and the cache ----

    def _row(self, ctx: _Context, card: ModelCard, answer: Answer, outcome: Outcome, neurons: float,
             cached: bool) -> UsageRow:
        return UsageRow(request_id=ctx.request_id, time=ctx.received, account=ctx.account, model=card.name,
                        input_tokens=answer.prompt_tokens, output_tokens=answer.completion_tokens,
                        neurons=neurons, cached=cached, outcome=outcome.value, latency_ms=ctx.latency_ms())

    async def _record(self, ctx: _Context, card: ModelCard, answer: Answer, outcome: Outcome, neurons: float,
                      cached: bool = False) -> None:
        """Write the ledger row durably; an answer whose row cannot be kept is not acknowledged (500)."""
        self._observe(ctx, card, answer, outcome, neurons, cached)
        try:
            await self.policy.ledger.record(self._row(ctx, card, answer, outcome, neurons, cached))
        except LedgerUnavailableError:
            log.error("request %s: the usage ledger cannot take its row; answering 500", ctx.request_id)
            raise ApiError(INTERNAL) from None

    def _record_nowait(self, ctx: _Context, card: ModelCard, answer: Answer, outcome: Outcome,
                       neurons: float) -> None:
        self._observe(ctx, card, answer, outcome, neurons, cached=False)
        try:
            self.policy.ledger.record_nowait(self._row(ctx, card, answer, outcome, neurons, cached=False))
        except LedgerUnavailableError:
            log.error("request %s: the usage ledger is closed; its row is lost", ctx.request_id)

    def _observe(self, ctx: _Context, card: ModelCard, answer: Answer, outcome: Outcome, neurons: float,
                 cached: bool) -> None:
        ctx.obs.answer(ctx.account, card.name, answer.prompt_tokens, answer.completion_tokens, neurons,
                       outcome.value, cached, answer.text)

    async def _store(self, key: str | None, directives: CacheDirectives, answer: Answer) -> None:
        if key is None or not answer.complete:
            return
        entry = self.policy.cache.answer(answer.deltas, answer.prompt_tokens, answer.completion_tokens,
                                         answer.finish_reason)
        await self.policy.cache.put(key, entry, directives)


def _outcome(answer: Answer) -> Outcome:
    if answer.complete:
        return Outcome.OK
    if answer.finish_reason == ABORTED:
        return Outcome.ABORTED
    return Outcome.ERROR


async def _replay(frames: Sequence[bytes]) -> AsyncIterator[bytes]:
    for frame in frames:
        yield frame


def _nothing() -> None:
    pass
