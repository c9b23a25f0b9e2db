"""`int8serve serve`: put the catalog, the engines and the HTTP app together and run them under uvicorn.

This is the only module that knows all three layers. It serves every model it is given (`--model NAME=PATH`,
repeated; `model_specs.py`), each under its card with its own engine, slots and limits. Its life, as an operator
sees it:

1. before this module is imported, `startup.prepare` checks what can be checked at once (the cards and their
   templates, every model's files by their configs and headers, the serving policy's Redis and database), so that a
   wrong flag or a bad model fails in a second, not after minutes of loading, and fetches the built-in model if it is
   served and not in the cache yet (once); then `run_server` prints the effective settings;
2. listen at once, with `/healthz` 200 and `/readyz` 503 ("the model is loading") while the weights load (with a
   progress bar on a terminal) in a background thread, one model after the other; then build one engine per model
   (slots = its card's max_concurrent_requests, context = its card's limit within the model's) and the app, and
   turn ready. What only the weights tell (damaged tensor data) ends the start here, the error naming the model;
3. on SIGTERM, SIGINT or SIGHUP, drain: `/readyz` 503 at once, new API requests 503, requests in flight (streams
   included, and those received but not yet in the engine) finish for up to `shutdown_timeout` seconds, after
   which what is left is cut: a request not in the engine yet is answered 503 at once (`lifecycle.cut`), and the
   engine ends the others (those answers end, and their ledger rows are written: outcome `error`, the tokens they
   generated, 0 neurons); then the usage ledger is flushed and the process exits 0. A second signal cuts at once,
   rows still written; a third stops without waiting for them. A signal while the weights load stops the loading:
   the ledger is flushed and the process exits 0 at once, without waiting for the load thread (which may be
   minutes inside torch).
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import signal
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from .catalog.card import ModelCard
from .engine import decode_plan, kernels
from .engine.errors import CheckpointError
from .engine.int8 import Int8Linear, describe_dense, kernel_rows
from .engine.kernels import matmul as prefill_matmul
from .engine.model import Transformer
from .engine.model_cache import load_cached
from .engine.model_files import missing_tokenizer
from .engine.prefix_cache import DEFAULT_BLOCK_TOKENS, PrefixCache
from .engine.scheduler import Engine
from .engine.tokenizer import AnyTokenizer, load_tokenizer
from .prompt_templates import PromptTemplate, render_prompt, template_named
from .service.app import create_app, loading_app
from .service.connections import ConnectionBudget, ConnectionServer, uvicorn_config
from .service.inference import RequestLimits
from .service.lifecycle import Lifecycle, Phase
from .service.metrics import ServiceMetrics
from .service.policy.fairness import default_inflight_limit
from .service.request_log import configure_logging
from .settings import LoadedSettings, ServeSettings
from .startup import Prepared, ServedModel, ServeError

log = logging.getLogger("int8serve.server")

# the question of the curl line printed at start-up: SmolLM2-135M-Instruct answers "The capital of France is Paris."
FIRST_PROMPT = "What is the capital of France?"
# after the shutdown timeout the engine is stopped; the cut streams then need a moment to send their last frames
CUT_GRACE_SECONDS = 5.0


def base_url(host: str, port: int) -> str:
    """`http://host:port`, an IPv6 address in brackets (`http://[::1]:8787`: without them it is no URL)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def warm_up_thread_pool() -> None:
    """Run one parallel torch op on the main thread, before the model loads in its worker thread.

    Measured (stories260K, 2 threads, another process busy on one core): an engine whose model was loaded in a
    worker thread decoded at 90-290 ms per token when the main thread had never run a parallel op, and at 5-11 ms
    when it had (as when the model is loaded on the main thread). Which thread first starts torch's OpenMP pool
    changes how its threads wait; this keeps the behaviour of a main-thread load.
    """
    torch.mm(torch.ones(256, 256), torch.ones(256, 256))


@dataclass
class Service:
    """The loaded models behind the app."""

    app: object
    engines: list[Engine]
    summary: list[str]


def load_service(settings: ServeSettings, prepared: Prepared, tokens: dict[str, str],
                 lifecycle: Lifecycle, metrics: ServiceMetrics | None = None) -> Service:
    """Load the weights, start one engine per model and build the app (the slow part, run while the server
    listens)."""
    engines: dict[str, Engine] = {}
    inflight: dict[str, int | None] = {}
    summary: list[str] = []
    try:
        for served in prepared.models:
            try:
                engine, lines = _start_engine(settings, served)
            except Exception as err:  # e.g. damaged tensor data, which only the load reads
                raise ServeError(f"model {served.card.name}: {_failure(err)}") from err
            engines[served.card.name] = engine
            inflight[served.card.name] = _inflight_cap(settings, served.card, tokens)
            cap = inflight[served.card.name]
            summary += [*lines, f"  per account at most {cap or 'any number of'} requests in this engine"]
    except BaseException:
        for engine in engines.values():  # those already running
            engine.stop()
        raise
    limits = RequestLimits(body_timeout=settings.body_timeout, stall_timeout=settings.stall_timeout,
                           max_inflight_per_account=inflight)
    app = create_app(prepared.catalog, engines, tokens, policy=prepared.policy, limits=limits,
                     log_prompts=settings.log_prompts, lifecycle=lifecycle, metrics_token=settings.metrics_token,
                     metrics=metrics)
    if settings.dtype == "int8":
        summary[:0] = [kernels.describe(), describe_dense()]
    summary.append(f"ready: {base_url(settings.host, settings.port)}/client/v4  (health /healthz, readiness /readyz, "
                   f"metrics /metrics), serving {', '.join(engines)}")
    return Service(app=app, engines=list(engines.values()), summary=summary)


def _failure(err: Exception) -> str:
    """A model's load error as the operator reads it: the engine's own (a checkpoint, a config, a file: they name the
    file) as it is; anything else with its kind, which may be all it says (MemoryError)."""
    return str(err) if isinstance(err, ValueError | OSError) else f"{type(err).__name__}: {err}"


def _inflight_cap(settings: ServeSettings, card: ModelCard, tokens: dict[str, str]) -> int | None:
    """Requests of one account in this model's engine: the operator's cap, else the card's slots when several
    accounts share the server (`policy/fairness.py`)."""
    cap = settings.max_inflight_per_account
    if cap is None:
        cap = default_inflight_limit(card.max_concurrent_requests, len(set(tokens.values())))
    return cap or None


def _start_engine(settings: ServeSettings, served: ServedModel) -> tuple[Engine, list[str]]:
    """Load one model and start its engine; the start-up lines that describe it."""
    card = served.card
    started = time.perf_counter()
    if not sys.stderr.isatty():  # no progress bar: say what is happening
        log.info("loading %s weights of %s from %s", settings.dtype, card.name, served.model_path)
    loaded = load_cached(served.model_path, settings.dtype, progress=sys.stderr.isatty(),
                         use_cache=settings.model_cache, quantizer=settings.quantizer)
    if loaded.tokenizer_path is None:  # said before loading (model_files.py); a folder changed since, here
        raise CheckpointError(missing_tokenizer(loaded.path))
    tokenizer = load_tokenizer(loaded.tokenizer_path)  # (the card's template checked with it: startup.prepare)
    kv_cache_reason = None
    if settings.dtype == "int8":  # before the engine and the prefix cache make their caches
        kv_cache, kv_cache_reason = loaded.model.kv_cache_for(settings.kv_cache, settings.prefill_chunk,
                                                              card.max_concurrent_requests)
        loaded.model.set_kv_cache(kv_cache)
    context = min(card.context_length_limit, loaded.config.max_seq_len)
    prefix = _prefix_cache(settings, loaded.model, card.max_concurrent_requests * context)
    engine = Engine(loaded.model, tokenizer, max_slots=card.max_concurrent_requests, max_queue=settings.max_queue,
                    max_seq_len=context, prefill_chunk=settings.prefill_chunk, prefix_cache=prefix,
                    solo_prefill_tokens=settings.solo_prefill_tokens)
    warming = time.perf_counter()
    prefix_ids = template_prefix_ids(tokenizer, served.template, card.default_context) if prefix is not None else []
    warmed = engine.warm(prefix_ids) if prefix is not None else 0
    warming = time.perf_counter() - warming
    engine.start()
    # full-precision parameters (embeddings, norms) + int8 weights (of Int8Linear, packed or not)
    parameters = sum(p.numel() for p in loaded.model.parameters()) + sum(
        m.in_features * m.out_features for m in loaded.model.modules() if isinstance(m, Int8Linear))
    lines = [
        f"model: {card.name} <- {loaded.path}{' (the built-in model)' if served.builtin else ''} "
        f"({loaded.source_format} checkpoint, {settings.dtype}, {parameters / 1e6:.1f}M parameters, loaded in "
        f"{time.perf_counter() - started:.1f} s), template {served.template.name}",
        f"  limits: context {context} tokens (card {card.context_length_limit}, model {loaded.config.max_seq_len}), "
        f"max_tokens <= {card.sequence_length_limit}, {card.max_concurrent_requests} slots, "
        f"queue {settings.max_queue}, prefill chunk {settings.prefill_chunk} ({_solo_prefill(engine, settings)})",
        f"  KV cache: {_describe_kv_cache(loaded.model, engine, kv_cache_reason)}",
        f"  {decode_plan.describe(loaded.model)}",
        f"  prefix cache: {prefix.capacity_tokens} tokens ({prefix.nbytes() / 2**20:.0f} MiB), the default system "
        f"prompt's {_warmed(warmed, len(prefix_ids), context, warming)}; "
        f"{_what_is_reused(engine, settings.prefill_chunk)}"
        if prefix is not None else "  prefix cache: off",
    ]
    return engine, lines


def _describe_kv_cache(model: Transformer, engine: Engine, default_because: str | None) -> str:
    """What the cache holds and its size; for the default (--kv-cache auto), why this kind on this CPU."""
    cache = engine.cache
    if default_because is not None:
        others = " or ".join(f"--kv-cache {kind}" for kind in ("fp16", "bf16", "int8") if kind != model.kv_cache)
        what = f"{model.kv_cache} (the default here: {default_because}; {others} to choose)"
    else:
        what = {"int8": "int8 rows, an fp32 scale per 32 values (--kv-cache int8)",
                "fp16": "fp16 (--kv-cache fp16)",
                "bf16": "bf16 (--kv-cache bf16)",
                "fp32": "fp32 (the fp32 reference model's)"}.get(model.kv_cache, model.kv_cache)
    if model.kv_cache == "fp16":
        what += "; values beyond +-65504 stored as +-65504"
    return f"{what}, {cache.nbytes() / 2**30:.2f} GiB for {cache.n_slots} x {cache.max_seq_len} positions"


def _solo_prefill(engine: Engine, settings: ServeSettings) -> str:
    chunk, asked = settings.prefill_chunk, settings.solo_prefill_tokens
    if engine.solo_prefill_chunks > 1:
        return f"a prompt alone: up to {engine.solo_prefill_chunks * chunk} tokens a step"
    if not engine.model.prefill_rows_independent(chunk):
        return "one a step, a prompt alone too: this model's prefill rounds a row by the rows with it"
    if asked is None:
        return ("one a step, a prompt alone too: our int8 kernel's prefill is hardly faster in longer steps "
                "(--solo-prefill-tokens)")
    return f"one a step, a prompt alone too: --solo-prefill-tokens {asked}"


def _warmed(warmed: int, prefix_tokens: int, context: int, seconds: float) -> str:
    if prefix_tokens + 2 > context:  # (Engine.warm skipped them and said why)
        return f"{prefix_tokens} tokens not warmed: they leave no room for a prompt and its reply in the context"
    return f"{warmed} tokens warmed in {seconds:.1f} s"


def _what_is_reused(engine: Engine, prefill_chunk: int) -> str:
    if engine.row_exact_prefill:
        return "prompts and replies (row-exact prefill)"
    if prefill_matmul.int8_requested():
        return f"prompts only ({prefill_matmul.ENV}=int8: prefill's one int8 pass a row is not what decode computes)"
    if not kernels.available():
        return "prompts only (row-exact prefill needs our int8 kernel, not available here)"
    if prefill_chunk > kernel_rows():  # the usual reason: the chunks are the dense path's (or the bf16 kernel's)
        asked = "bf16" if prefill_matmul.bf16_requested() else "dense" if prefill_matmul.dense_requested() else None
        if asked:
            return f"prompts only (prefill chunks take the dense path: {prefill_matmul.ENV}={asked})"
        return (f"prompts only (prefill chunks take the faster dense path; {prefill_matmul.ENV}=row-exact keeps "
                "replies too, at slower prefill)")
    return "prompts only (row-exact prefill needs our int8 and attention kernels, and one is off here)"


def _prefix_cache(settings: ServeSettings, model: Transformer, slot_positions: int) -> PrefixCache | None:
    """The prefix cache `serve` gives its engine: `prefix_cache_tokens`, by default 1/16 of the slots' positions. Not
    for the fp32 reference, whose dense layers round a row by how many come with it (chunking.py)."""
    if not settings.prefix_cache or settings.dtype != "int8":
        return None
    tokens = settings.prefix_cache_tokens or max(DEFAULT_BLOCK_TOKENS, slot_positions // 16)
    return PrefixCache(model.config, model.cache_dtype, tokens)


def template_prefix_ids(tokenizer: AnyTokenizer, template: PromptTemplate | None = None, system: str | None = None
                        ) -> list[int]:
    """The token ids every templated `prompt` request starts with: the default system prompt's part of the model's
    template (default: Workers AI's `llama2`) with the card's `default_context` (None: the template's own), as far as
    it tokenizes the same whatever the user's prompt."""
    template = template or template_named("llama2")
    renderings = [tokenizer.encode_segments(render_prompt(template, text, False, system))
                  for text in ("Hello", "what", "1", " x", "\n")]
    common = renderings[0]
    for ids in renderings[1:]:
        common = common[:next((i for i, (a, b) in enumerate(zip(common, ids, strict=False)) if a != b),
                              min(len(common), len(ids)))]
    return common


class _Deferred:
    """The ASGI app uvicorn serves: `loading` (the lifecycle gate alone) while the model loads, then the real app."""

    def __init__(self, loading: ASGIApp) -> None:
        self.target: ASGIApp = loading

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.target(scope, receive, send)

    async def end_of_service(self) -> None:
        """The real app's lifespan end (its Redis connections, request worker, metrics' watch), on the event loop:
        uvicorn ran the lifespan once, at start, against the loading gate."""
        end = getattr(getattr(self.target, "state", None), "end_of_service", None)
        if end is not None:
            await end()


class _Server(ConnectionServer):
    """uvicorn, with int8serve's drain on the first SIGTERM/SIGINT (see the module docstring) and exit status 0
    after a clean shutdown (uvicorn would re-raise the signal and die of it)."""

    def __init__(self, config: uvicorn.Config, lifecycle: Lifecycle, shutdown_timeout: float,
                 deferred: _Deferred) -> None:
        super().__init__(config)
        self.deferred = deferred
        self.lifecycle = lifecycle
        self.shutdown_timeout = shutdown_timeout
        self.engines: list[Engine] = []
        self._draining = False
        self._cut_now = threading.Event()  # a second signal during the drain: stop waiting for requests in flight

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # SIGHUP too: a closed terminal or SSH session drains as SIGTERM does (it used to kill, without a drain)
        drained = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in drained}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    async def shutdown(self, sockets: list[Any] | None = None) -> None:
        await super().shutdown(sockets)
        await self.deferred.end_of_service()

    def handle_exit(self, sig: int, frame: object) -> None:
        if self._draining and not self._cut_now.is_set():  # a second signal: cut now, their rows still written
            log.warning("signal again: cutting the %d requests in flight now (signal once more to stop without "
                        "waiting for their ledger rows)", self.lifecycle.requests)
            self._cut_now.set()
            return
        if self._draining or self.lifecycle.phase is not Phase.READY:  # a third signal, or nothing to drain
            self.force_exit = self._draining
            self.should_exit = True
            return
        self._draining = True
        self.lifecycle.start_draining()  # from now on /readyz and new requests are 503
        threading.Thread(target=self._drain, name="int8serve-drain", daemon=True).start()

    def _drain(self) -> None:
        started = time.monotonic()
        log.info("draining: %d requests in flight, waiting up to %g s for them (signal again to stop now)",
                 self.lifecycle.requests, self.shutdown_timeout)
        # the engines take requests until the cut: those received before the signal (the gate refuses new ones)
        # may still be reading their body, being checked or tokenized, and have the drain's time to be answered
        if not self._wait_idle_unless_cut(self.shutdown_timeout):
            if not self._cut_now.is_set():
                log.warning("shutdown timeout: cutting the %d requests still in flight", self.lifecycle.requests)
            self.lifecycle.cut()  # those not in an engine (sending their body, checked, tokenized) are refused now
            for engine in self.engines:
                engine.stop()  # their answers end; their rows are written (outcome error)
            self.lifecycle.wait_idle(CUT_GRACE_SECONDS)
        log.info("drained in %.1f s (%d new requests refused)", time.monotonic() - started, self.lifecycle.refused)
        self.should_exit = True

    def _wait_idle_unless_cut(self, timeout: float) -> bool:
        """`lifecycle.wait_idle(timeout)`, given up early when a second signal comes; True if idle."""
        deadline = time.monotonic() + timeout
        while not self._cut_now.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self.lifecycle.wait_idle(min(left, 0.1)):
                return True
        return False


def run_server(loaded: LoadedSettings, tokens: dict[str, str], prepared: Prepared) -> None:
    """Serve what `startup.prepare` checked (the caller checks first: see startup.py)."""
    settings = loaded.settings
    tokens = dict(tokens)
    generated = not tokens
    if generated:
        tokens[secrets.token_urlsafe(24)] = secrets.token_hex(16)
    _print_start(loaded, prepared, tokens, generated)
    lifecycle = Lifecycle(Phase.LOADING)
    metrics = ServiceMetrics(policy=prepared.policy, lifecycle=lifecycle)  # from the start: loading's answers count
    connections = ConnectionBudget(settings.max_connections)
    metrics.watch_connections(connections)
    deferred = _Deferred(loading_app(lifecycle, metrics, settings.metrics_token))
    # JSON: uvicorn's own loggers go through the same JSON handler instead of uvicorn's default config
    log_config = None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG
    config = uvicorn_config(deferred, host=settings.host, port=settings.port, log_level=settings.log_level,
                            log_config=log_config, timeout_graceful_shutdown=CUT_GRACE_SECONDS,
                            header_timeout=settings.header_timeout, stall_timeout=settings.stall_timeout,
                            connections=connections)
    configure_logging(settings.log_format, settings.log_level)  # after uvicorn's config made its loggers
    server = _Server(config, lifecycle, settings.shutdown_timeout, deferred)
    failure: list[str] = []

    def load() -> None:
        try:
            service = load_service(settings, prepared, tokens, lifecycle, metrics)
        except Exception as err:  # reported by the main thread, which then exits 1
            log.debug("loading failed", exc_info=True)
            failure.append(str(err) if isinstance(err, ServeError) else f"{type(err).__name__}: {err}")
            server.should_exit = True
            return
        server.engines.extend(service.engines)
        deferred.target = service.app
        if lifecycle.phase is Phase.LOADING:  # not if a signal came meanwhile
            lifecycle.mark_ready()
        for line in service.summary:
            log.info("%s", line)

    warm_up_thread_pool()
    loader = threading.Thread(target=load, name="int8serve-load", daemon=True)
    loader.start()
    try:
        server.run()
    finally:
        lifecycle.start_draining()
        for engine in server.engines:
            engine.stop()
        prepared.policy.close()  # writes out the usage ledger
        log.info("usage ledger flushed; stopped")
    if failure:
        raise SystemExit(f"int8serve serve: error: {failure[0]}")
    if loader.is_alive():  # stopped while loading: the interpreter's exit would abort inside torch's threads
        log.info("stopped while loading the model")
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _print_start(loaded: LoadedSettings, prepared: Prepared, tokens: dict[str, str], generated: bool) -> None:
    """The effective settings (one block, secrets hidden), the serving policy and, for a made-up token, how to
    call the server."""
    settings = loaded.settings
    lines = ["settings (flag > INT8SERVE_* variable > config file > default):"]
    lines += [f"  {line}" for line in loaded.summary()]
    for served in prepared.models:
        lines.append(f"model {served.card.name}:")
        lines += [f"  {line}" for line in prepared.policy.describe(served.card)]
    lines.append(f"tokens: {len(tokens)} configured" if not generated else
                 "tokens: none configured, made one for this run")
    lines.append(f"listening on {base_url(settings.host, settings.port)}; loading the model"
                 f"{'s' if len(prepared.models) > 1 else ''} (/readyz is 503 until ready)")
    for line in lines:
        print(f"int8serve: {line}", file=sys.stderr)
    if generated:
        token, account = next(iter(tokens.items()))
        print(f"int8serve: API token {token} for account {account}; try:\n"
              f"  curl {base_url(settings.host, settings.port)}/client/v4/accounts/{account}/ai/run/"
              f"{prepared.models[0].card.name} -H 'Authorization: Bearer {token}' "
              f"-d '{{\"prompt\": \"{FIRST_PROMPT}\", \"stream\": true}}'", file=sys.stderr)
    sys.stderr.flush()
