"""Continuous batching: one engine thread runs the model for up to `max_slots` sequences at once.

The only crossing between the HTTP service and the engine is here: a `GenerationRequest` (token ids and sampling
parameters) goes in through `Engine.submit`, and a stream of `TokenEvent`s comes out of the returned
`RequestHandle` (as an async iterator for the service, or a blocking one for scripts and tests).

Each engine step:
1. drops cancelled sequences (their slot is free for the next step);
2. admits waiting requests into free slots, the request of the owner with the fewest running sequences first (FIFO
   among equals), so that one owner (the service passes the account) cannot keep the others waiting behind it;
3. runs one prefill chunk for one admitted request (so a long prompt never freezes the running streams); the prompts
   being prefilled take turns, a chunk each (one that has had none goes first), so a short prompt admitted beside
   long ones waits for at most one chunk of each, not for their whole prefills; a prompt alone in the engine
   (nothing else running or waiting) takes up to `solo_prefill_tokens` of whole chunks in that step, where the model
   computes them with the same bits as one by one (`Transformer.prefill_rows_independent`, chunking.py), by default
   where that is faster (`solo_prefill_chunks`);
4. decodes one token for every running sequence in ONE batched forward.

The waiting queue holds at most `max_queue` requests beyond the free slots. When it is full, a request whose owner
holds fewer requests in the engine (running and waiting) than another owner, even with this one, takes the place of
that owner's newest waiting request, which ends at once with `FinishReason.REFUSED` (the service answers it as a
full queue: 429); otherwise the newcomer is refused (`QueueFullError`). Owners that each stay within a fair share
therefore cannot keep out one that has nothing in the engine.

Outputs do not depend on the batch: each sequence samples with its own seeded generator, prompts are chunked the
same way whatever else runs, and the decode kernel computes each row independently of the others
(tests/engine/test_scheduler.py checks this). Stop strings (`SamplingParams.stop`) are applied to the decoded text
(`stops.py`): the text of a stop string is never emitted.

With a prefix cache (`prefix_cache.py`), each prefill step first copies into the slot the cached blocks that
continue the prompt (another sequence may have prefilled them a step ago), and stores the blocks it computed. Prefill
chunks end at multiples of `prefill_chunk` counted from the start of the prompt, whatever was reused, and are computed
as their whole aligned chunk would be (`chunking.py`), so a token is computed by the same operations with or without
the cache: its keys, values and logits are the same bits.

Where the model computes prefill row-exact (`Transformer.row_exact_prefill`, decided once here: our int8 kernel for
whole chunks and the attention kernel: every chunk on CPUs with AVX2 only, elsewhere chunks of up to 32 rows, or the
default 128 on AVX-512 VNNI CPUs with INT8SERVE_PREFILL_MATMUL=row-exact), the keys and values a decode step writes
are the ones prefill would write, so a finished sequence also stores its generated tokens (`_finish`): the next chat
turn, which resends the reply, reuses it instead of prefilling it again. Elsewhere only prompts are stored.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from enum import StrEnum

import torch

from .chunking import aligned_chunk
from .detokenizer import ByteDetokenizer, IncrementalDetokenizer
from .fingerprint import model_fingerprint
from .model import KVCache, Transformer
from .prefix_cache import PUBLIC, PrefixCache
from .sampling import Sampler
from .sampling_params import SamplingParams
from .stops import StopMatcher
from .tokenizer import AnyTokenizer

log = logging.getLogger(__name__)

DEFAULT_PREFILL_CHUNK = 128
# Prompt tokens one prefill step may take when the prompt is alone in the engine, by default where it pays
# (`Transformer.prefill_makes_tiles`: the bf16 prefill kernel makes each weight's tiles once for the 512 rows instead
# of once per 128). A 512-token prompt of the 7B shape (benchmarks/vs_llamacpp.py, 32 layers, 2 threads, Sapphire
# Rapids, 2026-12-05): 127.6 / 148.1 tok/s against 106.2 / 115.0 one chunk a step (1.20x / 1.29x). What it costs: a
# request that arrives meanwhile waits for that step to end.
DEFAULT_SOLO_PREFILL_TOKENS = 512


def row_exact_prefill(model: object, prefill_chunk: int, max_slots: int) -> bool:
    """Whether an engine of `max_slots` slots computes `model`'s prefill chunks of `prefill_chunk` rows row-exact
    (`Transformer.row_exact_prefill`; a test double that cannot say keeps prefill's own numerics)."""
    row_exact = getattr(model, "row_exact_prefill", None)
    return bool(row_exact is not None and row_exact(prefill_chunk, max_slots))


def solo_prefill_chunks(model: object, prefill_chunk: int, solo_prefill_tokens: int | None = None) -> int:
    """The aligned chunks a prompt alone in the engine takes in one prefill step: as many as `solo_prefill_tokens`
    hold where the model computes each row of a chunk on its own (`Transformer.prefill_rows_independent`; a test
    double that cannot say takes one), else one. None: DEFAULT_SOLO_PREFILL_TOKENS where several chunks a forward
    pay (`Transformer.prefill_makes_tiles`), else one chunk."""
    rows_independent = getattr(model, "prefill_rows_independent", None)
    if rows_independent is None or not rows_independent(prefill_chunk):
        return 1
    if solo_prefill_tokens is None:
        pays = getattr(model, "prefill_makes_tiles", None)
        solo_prefill_tokens = DEFAULT_SOLO_PREFILL_TOKENS if pays is not None and pays(prefill_chunk) else 0
    return max(1, solo_prefill_tokens // prefill_chunk)


class FinishReason(StrEnum):
    """Why a sequence ended (the `finish_reason` of its final event)."""

    STOP = "stop"  # end of sequence token, or a stop string
    LENGTH = "length"  # max_tokens, or the end of the context
    CANCELLED = "cancelled"  # the submitter cancelled it (`RequestHandle.cancel`)
    REFUSED = "refused"  # never started: its place in the full queue went to another owner's request (`submit`)
    SHUTDOWN = "shutdown"  # the engine stopped before it could finish
    ERROR = "error"  # a step failed

    @property
    def complete(self) -> bool:
        return self in (FinishReason.STOP, FinishReason.LENGTH)


class QueueFullError(Exception):
    """No slot is free and the waiting queue is full (or the request asked not to wait)."""


class EngineStoppedError(Exception):
    """The engine was stopped (`Engine.stop`) and takes no new requests."""


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    request_id: str = ""
    owner: str = ""  # who asked (the service passes the account): free slots go to the owner with fewest running
    continues_prompt: bool = False  # the reply continues the prompt's text (a raw prompt): decoded as its end


@dataclass(frozen=True)
class TokenEvent:
    """One step of a sequence: a new token and its text, or the end of the sequence."""

    text: str  # text delta; "" when a token completes no character yet (and at the end, what was held back)
    token_id: int | None  # None on the final event
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason | None = None  # None while running
    error: str | None = None
    # timings (seconds, time.monotonic) for metrics
    queued_at: float = 0.0
    started_at: float = 0.0
    cached_tokens: int = 0  # prompt tokens whose keys and values came from the prefix cache


@dataclass
class EngineStats:
    running: int
    waiting: int
    slots: int
    free_slots: int
    steps: int
    max_queue: int


class RequestHandle:
    """What the submitter holds: the event stream of one request, and the way to cancel it."""

    def __init__(self, request: GenerationRequest, loop: asyncio.AbstractEventLoop | None) -> None:
        self.request = request
        self._loop = loop
        self._async_queue: asyncio.Queue[TokenEvent] | None = asyncio.Queue() if loop else None
        self._placed: asyncio.Event | None = asyncio.Event() if loop else None  # taken into a slot, or ended
        self._sync_queue: queue.SimpleQueue[TokenEvent] = queue.SimpleQueue()
        self.cancelled = threading.Event()
        self.queued_at = time.monotonic()
        self.started_at = 0.0

    def cancel(self) -> None:
        """Ask the engine to drop this request; its slot is freed at the next step."""
        self.cancelled.set()

    def _emit(self, event: TokenEvent) -> None:  # called from the engine thread (or `Engine.submit`'s)
        if self._loop is not None:
            self._call_in_loop(self._deliver, event)
        else:
            self._sync_queue.put(event)

    def _place(self) -> None:  # called from the engine thread: the request was taken into a slot
        if self._loop is not None and self._placed is not None:
            self._call_in_loop(self._placed.set)

    def _call_in_loop(self, callback: Callable[..., object], *args: object) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:  # the event loop is closed: nobody listens any more
            self.cancel()

    def _deliver(self, event: TokenEvent) -> None:  # in the event loop
        assert self._async_queue is not None and self._placed is not None
        self._async_queue.put_nowait(event)
        if event.finish_reason is not None:
            self._placed.set()

    async def placed(self) -> None:
        """Wait until the engine takes the request into a slot (`started_at` is then set) or ends it without one
        (its final event is then in `events()`)."""
        assert self._placed is not None, "submitted outside an event loop"
        await self._placed.wait()

    async def events(self) -> AsyncIterator[TokenEvent]:
        """Events until (and including) the final one, which has a finish_reason."""
        assert self._async_queue is not None, "submitted outside an event loop: use iter_events()"
        while True:
            event = await self._async_queue.get()
            yield event
            if event.finish_reason is not None:
                return

    def iter_events(self, timeout: float | None = None) -> Iterator[TokenEvent]:
        assert self._async_queue is None, "submitted inside an event loop: use events()"
        while True:
            event = self._sync_queue.get(timeout=timeout)
            yield event
            if event.finish_reason is not None:
                return


@dataclass
class _Sequence:
    """Engine-thread state of one admitted request."""

    handle: RequestHandle
    slot: int
    sampler: Sampler
    detokenizer: IncrementalDetokenizer | ByteDetokenizer
    stops: StopMatcher | None = None
    prefilled: int = 0  # prompt tokens already in the KV cache
    reused: int = 0  # of which copied from the prefix cache
    prefill_turn: int = 0  # the engine step of its last prefill chunk (0: none yet)
    generated: int = 0
    generated_ids: list[int] = field(default_factory=list)  # the sampled tokens (the last is in the KV cache once
    # the next decode step has run)
    cached: int = 0  # tokens in the KV cache: the next one is written at this position
    last_token: int = -1  # sampled but not yet in the cache: the input of the next decode
    public_prefix: bool = False  # its prompt's blocks are reusable by every owner (the warmed system prompt)

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request

    @property
    def decoding(self) -> bool:
        return self.prefilled >= len(self.request.prompt_ids)


class Engine:
    """Owns the model, its KV cache and the engine thread."""

    def __init__(self, model: Transformer, tokenizer: AnyTokenizer, max_slots: int = 4, max_queue: int = 32,
                 max_seq_len: int | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
                 prefix_cache: PrefixCache | None = None, solo_prefill_tokens: int | None = None) -> None:
        if max_slots < 1 or max_queue < 0 or prefill_chunk < 1 or (solo_prefill_tokens or 0) < 0:
            raise ValueError("max_slots and prefill_chunk must be >= 1, max_queue and solo_prefill_tokens >= 0")
        if prefix_cache is not None and prefill_chunk % prefix_cache.block_tokens:
            raise ValueError(f"prefill_chunk ({prefill_chunk}) must be a multiple of the prefix cache's block of "
                             f"{prefix_cache.block_tokens} tokens")
        self.prefix_cache = prefix_cache
        # Decided once, from what the model can do: with row-exact prefill, generated tokens go into the prefix cache
        # too (see the module's docstring).
        self.row_exact_prefill = row_exact_prefill(model, prefill_chunk, max_slots)
        # ... and how many chunks a prompt alone may take in one step
        self.solo_prefill_chunks = solo_prefill_chunks(model, prefill_chunk, solo_prefill_tokens)
        self.prefilled_tokens = 0  # prompt tokens computed by prefill (the rest came from the prefix cache)
        self.model = model
        self.tokenizer = tokenizer
        self.fingerprint = model_fingerprint(model)  # the weights and numerics, for the response cache's key
        self.stop_ids = frozenset(tokenizer.stop_ids)  # EOS and the model's end-of-turn tokens
        self.max_slots = max_slots
        self.max_queue = max_queue
        self.max_seq_len = min(max_seq_len or model.config.max_seq_len, model.config.max_seq_len)
        self.prefill_chunk = prefill_chunk
        self.cache: KVCache = model.new_cache(max_slots, self.max_seq_len)
        self._waiting: collections.deque[RequestHandle] = collections.deque()
        self._running: dict[int, _Sequence] = {}  # slot -> sequence
        self._wake = threading.Condition()
        self._stopping = False
        self._accepting = True
        self._steps = 0
        self._ids = itertools.count()
        self._thread = threading.Thread(target=self._loop, name="int8serve-engine", daemon=True)
        self.on_step: list = []  # callbacks(kind: str, seconds: float, rows: int) for metrics

    # ---- submitter side (any thread) ----

    def start(self) -> Engine:
        self._thread.start()
        return self

    def warm(self, prompt_ids: list[int]) -> int:
        """Before `start`: prefill `prompt_ids` into a slot so that the prefix cache keeps their full blocks (e.g.
        the default system prompt of the served card's template). Returns the tokens now cached.

        A prefix that leaves no room in the context window for one more prompt token and one generated token is not
        warmed (no request that starts with it fits: each gets 413), and the log says so once."""
        if self._thread.ident is not None:
            raise RuntimeError("warm the prefix cache before the engine starts")
        if self.prefix_cache is None or not prompt_ids:
            return 0
        if len(prompt_ids) + 2 > self.max_seq_len:
            log.info("prefix cache: not warming the %d tokens every templated prompt starts with: they leave no room "
                     "for a prompt and its reply in the context of %d tokens", len(prompt_ids), self.max_seq_len)
            return 0
        seq = _Sequence(handle=RequestHandle(GenerationRequest(list(prompt_ids), 1), None), slot=0,
                        sampler=Sampler(SamplingParams(temperature=0), self.model.config.vocab_size),
                        detokenizer=self.tokenizer.detokenizer(), public_prefix=True)
        while not seq.decoding:
            self._prefill_chunk(seq, self.solo_prefill_chunks)
        return self.prefix_cache.lookup(prompt_ids, len(prompt_ids), count=False).tokens  # no request's hit

    def submit(self, request: GenerationRequest, reject_if_busy: bool = False) -> RequestHandle:
        """Queue a request. Raises QueueFullError when it cannot be taken, EngineStoppedError once `stop` was
        called. A full queue still takes the request of an owner that holds fewer than another (see
        `_displaceable`): that other's newest waiting request then ends at once, `FinishReason.REFUSED`."""
        self._check(request)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        handle = RequestHandle(request, loop)
        with self._wake:
            if not self._accepting:
                raise EngineStoppedError("the engine is shutting down")
            if reject_if_busy and len(self._running) + len(self._waiting) >= self.max_slots:
                raise QueueFullError("no free slot")
            displaced = None
            if len(self._waiting) >= self.max_queue + max(0, self.max_slots - len(self._running)):
                displaced = self._displaceable(request.owner)
                if displaced is None:
                    raise QueueFullError("the waiting queue is full")
                self._waiting.remove(displaced)
            self._waiting.append(handle)
            self._wake.notify()
        if displaced is not None:
            displaced._emit(self._final(displaced, 0, FinishReason.REFUSED))
        return handle

    def _displaceable(self, owner: str) -> RequestHandle | None:
        """With the queue full: the newest waiting request of the owner holding the most requests (running and
        waiting) among the owners with a request waiting, if `owner`, with one more, would still hold fewer than
        that owner; else None (the newcomer is refused). So a full queue refuses the owners with the most in the
        engine, never one that holds little."""
        held = collections.Counter(seq.request.owner for seq in self._running.values())
        held.update(h.request.owner for h in self._waiting)
        most = max(reversed(self._waiting), key=lambda h: held[h.request.owner], default=None)  # newest of equals
        if most is None or held[owner] + 1 >= held[most.request.owner]:
            return None
        return most

    def stats(self) -> EngineStats:
        with self._wake:
            return EngineStats(running=len(self._running), waiting=len(self._waiting), slots=self.max_slots,
                               free_slots=self.max_slots - len(self._running), steps=self._steps,
                               max_queue=self.max_queue)

    @property
    def accepting(self) -> bool:
        """True while the engine thread runs and takes new requests."""
        with self._wake:
            return self._accepting and self._thread.is_alive()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel everything and end the engine thread."""
        with self._wake:
            self._accepting = False
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _check(self, request: GenerationRequest) -> None:
        if not request.prompt_ids:
            raise ValueError("the prompt has no tokens")
        if request.max_tokens < 1:
            raise ValueError("max_tokens must be at least 1")
        if len(request.prompt_ids) + request.max_tokens > self.max_seq_len:
            raise ValueError(f"{len(request.prompt_ids)} prompt tokens + {request.max_tokens} max_tokens exceed "
                             f"the context of {self.max_seq_len}")
        vocab = self.model.config.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt_ids):
            raise ValueError(f"prompt token ids must be in [0, {vocab})")

    # ---- engine thread ----

    def _loop(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._running and not self._waiting:
                    self._wake.wait()
                if self._stopping:
                    break
            try:
                self.step()
            except Exception as err:  # a bug or OOM in a step must not kill the server: fail those requests
                log.exception("engine step failed")
                self._fail_all(f"{type(err).__name__}: {err}", reason=FinishReason.ERROR)
        self._fail_all("the engine stopped", reason=FinishReason.SHUTDOWN)

    def step(self) -> None:
        """One scheduling step (public so tests can drive an engine without its thread)."""
        self._steps += 1
        self._drop_cancelled()
        self._admit()
        self._prefill_one()
        self._decode_all()

    def _drop_cancelled(self) -> None:
        with self._wake:
            waiting = [h for h in self._waiting if h.cancelled.is_set()]
            for handle in waiting:
                self._waiting.remove(handle)
        for handle in waiting:
            handle._emit(self._final(handle, 0, FinishReason.CANCELLED))
        for seq in list(self._running.values()):
            if seq.handle.cancelled.is_set():
                self._finish(seq, FinishReason.CANCELLED)

    def _admit(self) -> None:
        with self._wake:
            free = [s for s in range(self.max_slots) if s not in self._running]
            while free and self._waiting:
                handle = self._next_waiting()
                slot = free.pop(0)
                handle.started_at = time.monotonic()
                handle._place()
                request = handle.request
                stops = StopMatcher(request.params.stop) if request.params.stop else None
                self._running[slot] = _Sequence(
                    handle=handle, slot=slot, stops=stops,
                    detokenizer=self.tokenizer.detokenizer(request.prompt_ids if request.continues_prompt else ()),
                    sampler=Sampler(request.params, self.model.config.vocab_size, request.prompt_ids))

    def _next_waiting(self) -> RequestHandle:
        """Take the waiting request whose owner has the fewest running sequences; the oldest among equals."""
        running = collections.Counter(seq.request.owner for seq in self._running.values())
        chosen = min(self._waiting, key=lambda h: running[h.request.owner])  # min() keeps the first of equals
        self._waiting.remove(chosen)
        return chosen

    def _prefill_one(self) -> None:
        # the prompts being prefilled take turns, one chunk each (several if nothing else runs or waits): first one
        # that has had no chunk yet (the oldest first), else the one whose last chunk is the oldest
        pending = [seq for seq in self._running.values() if not seq.decoding]
        if not pending:
            return
        seq = min(pending, key=lambda s: (s.prefill_turn, s.handle.queued_at))
        seq.prefill_turn = self._steps
        with self._wake:
            alone = len(self._running) == 1 and not self._waiting
        logits = self._prefill_chunk(seq, self.solo_prefill_chunks if alone else 1)
        if seq.decoding:
            self._advance(seq, logits)

    def _prefill_chunk(self, seq: _Sequence, chunks: int = 1) -> torch.Tensor:
        """Reuse what the prefix cache holds of the prompt, then prefill `chunks` aligned chunks (fewer at its end);
        -> the last logits."""
        prompt = seq.request.prompt_ids
        self._reuse_prefix(seq)
        end, how = aligned_chunk(seq.prefilled, len(prompt), self.prefill_chunk, self.max_seq_len,
                                 row_exact=self.row_exact_prefill, chunks=chunks)
        chunk = prompt[seq.prefilled:end]
        started = time.perf_counter()
        logits = self.model(torch.tensor([chunk]), self.cache, [seq.slot], [seq.prefilled], prefill=how)[0]
        self._report("prefill", time.perf_counter() - started, len(chunk))
        seq.prefilled = seq.cached = end
        self.prefilled_tokens += len(chunk)
        if self.prefix_cache is not None:
            self.prefix_cache.store(prompt, self.cache, seq.slot, seq.prefilled, final=seq.decoding,
                                    owner=self._prefix_owner(seq))
        return logits

    @staticmethod
    def _prefix_owner(seq: _Sequence) -> str | None:
        return PUBLIC if seq.public_prefix else seq.request.owner

    def _reuse_prefix(self, seq: _Sequence) -> None:
        """Copy into the slot the cached blocks that continue the prompt beyond what it holds (at least the last
        prompt token is always computed: its logits give the first token)."""
        if self.prefix_cache is None:
            return
        prompt = seq.request.prompt_ids
        hit = self.prefix_cache.lookup(prompt, limit=len(prompt) - 1, held=seq.prefilled, owner=seq.request.owner)
        if hit.tokens > seq.prefilled:
            self.prefix_cache.load(hit, self.cache, seq.slot)
            seq.reused += hit.tokens - seq.prefilled
            seq.prefilled = seq.cached = hit.tokens

    def _decode_all(self) -> None:
        # every sequence with a sampled token not yet in the cache, including one whose first token came out of this
        # step's prefill: it is decoded in this same step
        ready = [seq for seq in self._running.values() if seq.decoding and seq.last_token >= 0]
        if not ready:
            return
        tokens = torch.tensor([[seq.last_token] for seq in ready])
        started = time.perf_counter()
        logits = self.model(tokens, self.cache, [s.slot for s in ready], [s.cached for s in ready])
        self._report("decode", time.perf_counter() - started, len(ready))
        for row, seq in enumerate(ready):
            seq.cached += 1
            self._advance(seq, logits[row])

    def _advance(self, seq: _Sequence, logits: torch.Tensor) -> None:
        """Sample the next token of `seq` from `logits` and emit it, or finish the sequence."""
        try:
            token = seq.sampler.sample(logits)
        except Exception as err:  # this sequence's own sampling (its parameters, its logits): it alone fails
            log.exception("sampling failed for request %s", seq.request.request_id)
            self._finish(seq, FinishReason.ERROR, f"{type(err).__name__}: {err}")
            return
        if token in self.stop_ids:
            self._finish(seq, FinishReason.STOP)
            return
        seq.sampler.observe(token)
        seq.generated += 1
        seq.generated_ids.append(token)
        seq.last_token = token
        text, stopped = seq.detokenizer.push(token), False
        if seq.stops is not None:
            text, stopped = seq.stops.push(text)
        seq.handle._emit(TokenEvent(text=text, token_id=token, prompt_tokens=len(seq.request.prompt_ids),
                                    completion_tokens=seq.generated, queued_at=seq.handle.queued_at,
                                    started_at=seq.handle.started_at, cached_tokens=seq.reused))
        if stopped:
            self._finish(seq, FinishReason.STOP, held_text=False)
        elif seq.generated >= seq.request.max_tokens or seq.cached >= self.max_seq_len:
            self._finish(seq, FinishReason.LENGTH)

    def _finish(self, seq: _Sequence, reason: FinishReason, error: str | None = None, held_text: bool = True
                ) -> None:
        """End `seq` with its final event, which carries the text still held back (unless a stop string cut it)."""
        self._running.pop(seq.slot, None)
        self._store_reply(seq, reason)
        text = seq.detokenizer.flush() if held_text else ""
        if seq.stops is not None and held_text:
            text, stopped = seq.stops.push(text)
            if stopped:
                reason = FinishReason.STOP if reason.complete else reason
            else:
                text += seq.stops.flush()
        seq.handle._emit(self._final(seq.handle, seq.generated, reason, error, text, seq.reused))

    def _store_reply(self, seq: _Sequence, reason: FinishReason) -> None:
        """Keep in the prefix cache the blocks of the prompt and of the tokens generated after it that are in the
        slot (all but the last sampled one), when decode wrote them with prefill's numbers (row-exact prefill)."""
        if self.prefix_cache is None or not self.row_exact_prefill or not seq.decoding or \
                reason not in (FinishReason.STOP, FinishReason.LENGTH, FinishReason.CANCELLED):
            return  # a failed step may have left the slot half written
        tokens = [*seq.request.prompt_ids, *seq.generated_ids]
        if seq.cached > len(seq.request.prompt_ids):
            self.prefix_cache.store(tokens, self.cache, seq.slot, seq.cached, final=True, owner=seq.request.owner)

    def _final(self, handle: RequestHandle, generated: int, reason: FinishReason, error: str | None = None,
               text: str = "", cached_tokens: int = 0) -> TokenEvent:
        return TokenEvent(text=text, token_id=None, prompt_tokens=len(handle.request.prompt_ids),
                          completion_tokens=generated, finish_reason=reason, error=error,
                          queued_at=handle.queued_at, started_at=handle.started_at, cached_tokens=cached_tokens)

    def _fail_all(self, message: str, reason: FinishReason) -> None:
        for seq in list(self._running.values()):
            self._finish(seq, reason, message)
        with self._wake:
            waiting, self._waiting = list(self._waiting), collections.deque()
        for handle in waiting:
            handle._emit(self._final(handle, 0, reason, message))

    def _report(self, kind: str, seconds: float, rows: int) -> None:
        for callback in self.on_step:
            callback(kind, seconds, rows)
