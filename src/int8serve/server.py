"""`int8serve serve`: put the catalog, the engine and the HTTP app together and run them under uvicorn.

This is the only module that knows all three layers: it loads the card and the weights, sizes the engine from the
card (slots = max_concurrent_requests, context = the card's limit within the model's), builds the card's serving
policy with the operator's overrides and backends (rate limits, cache, ledger: checked before the weights are
loaded, so a wrong Redis or database URL fails fast), makes sure auth is never off, prints what it is serving, and
stops the engine and writes out the ledger when uvicorn shuts down.
"""

from __future__ import annotations

import contextlib
import secrets
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
import uvicorn

from .catalog.card import CardError
from .catalog.registry import Catalog, UnknownModelError
from .engine.demo import DEMO_WARNING, demo_model_dir
from .engine.loader import load_model
from .engine.scheduler import Engine
from .engine.tokenizer import Tokenizer
from .service.app import create_app
from .service.policy import Policy, PolicySettings, PolicyStartupError
from .service.policy.settings import DEFAULT_CACHE_TTL_SECONDS
from .service.request_log import configure_logging


class ServeError(Exception):
    """A start-up problem the operator can fix (printed without a traceback)."""


@dataclass
class ServeOptions:
    model: Path | None = None
    dtype: str = "int8"
    cards: list[Path] = field(default_factory=list)
    served_model_name: str = "@cf/meta/llama-2-7b-chat-int8"
    host: str = "127.0.0.1"
    port: int = 8787
    tokens: dict[str, str] = field(default_factory=dict)
    max_queue: int = 32
    prefill_chunk: int = 128
    log_level: str = "info"
    log_format: str = "text"  # "text" or "json" (service/request_log.py)
    log_prompts: bool = False  # prompt and response text in the request log lines
    # serving policy (issue 4): backends and the operator's overrides of the card
    redis_url: str | None = None
    database_url: str | None = None
    data_dir: Path = Path("data")
    rpm: int | None = None
    account_rpm: dict[str, int] = field(default_factory=dict)
    cache: bool = True
    cache_ttl: int = DEFAULT_CACHE_TTL_SECONDS
    daily_neurons: float | None = None

    def policy_settings(self) -> PolicySettings:
        return PolicySettings(default_rpm=self.rpm, account_rpm=dict(self.account_rpm), cache=self.cache,
                              cache_ttl=self.cache_ttl, daily_neurons=self.daily_neurons, redis_url=self.redis_url,
                              database_url=self.database_url, data_dir=self.data_dir)


@dataclass
class Service:
    """Everything `serve` built, for run_server and for tests that start a server in-process."""

    app: object
    engine: Engine
    policy: Policy
    tokens: dict[str, str]
    generated_token: bool
    summary: list[str]


def build_service(options: ServeOptions) -> Service:
    try:
        catalog = Catalog.load(options.cards)
        card = catalog.get(options.served_model_name)
    except (CardError, UnknownModelError) as err:
        raise ServeError(str(err)) from err
    try:
        policy = Policy.build(options.policy_settings())
    except (ValueError, PolicyStartupError) as err:
        raise ServeError(str(err)) from err
    try:
        demo = options.model is None
        path = demo_model_dir() if demo else options.model
        loaded = load_model(path, options.dtype, progress=sys.stderr.isatty())
        if loaded.tokenizer_path is None:
            raise ServeError(f"{loaded.path}: no tokenizer.model in the folder or its parent")
        tokenizer = Tokenizer(loaded.tokenizer_path)
    except BaseException:
        policy.close()
        raise
    context = min(card.context_length_limit, loaded.config.max_seq_len)
    engine = Engine(loaded.model, tokenizer, max_slots=card.max_concurrent_requests, max_queue=options.max_queue,
                    max_seq_len=context, prefill_chunk=options.prefill_chunk).start()
    tokens = dict(options.tokens)
    generated = not tokens
    if generated:
        tokens[secrets.token_urlsafe(24)] = secrets.token_hex(16)
    app = create_app(catalog, {card.name: engine}, tokens, demo=demo, policy=policy, log_prompts=options.log_prompts)
    # full-precision parameters (embeddings, norms) + int8 weights (buffers of Int8Linear)
    parameters = sum(p.numel() for p in loaded.model.parameters()) + sum(
        b.numel() for b in loaded.model.buffers() if b.dtype == torch.int8)
    summary = [
        f"model: {card.name} <- {loaded.path} ({loaded.source_format} checkpoint, {options.dtype}, "
        f"{parameters / 1e6:.1f}M parameters)" + (f"  ** {DEMO_WARNING} **" if demo else ""),
        f"limits: context {context} tokens (card {card.context_length_limit}, model {loaded.config.max_seq_len}), "
        f"max_tokens <= {card.sequence_length_limit}, {card.max_concurrent_requests} slots, queue {options.max_queue}, "
        f"prefill chunk {options.prefill_chunk}",
        f"listening: http://{options.host}:{options.port}/client/v4  (health /healthz, readiness /readyz, "
        "metrics /metrics)",
        *policy.describe(card),
        f"tokens: {len(tokens)} configured" if not generated else "tokens: none configured, made one for this run",
    ]
    return Service(app=app, engine=engine, policy=policy, tokens=tokens, generated_token=generated,
                   summary=summary)


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, so the process would die of the signal;
    a server that shut down cleanly exits 0 instead."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


def run_server(options: ServeOptions) -> None:
    try:
        service = build_service(options)
    except ServeError as err:
        raise SystemExit(f"int8serve serve: error: {err}") from None
    for line in service.summary:
        print(f"int8serve: {line}", file=sys.stderr)
    if service.generated_token:
        token, account = next(iter(service.tokens.items()))
        print(f"int8serve: API token {token} for account {account}; try:\n"
              f"  curl http://{options.host}:{options.port}/client/v4/accounts/{account}/ai/run/"
              f"{options.served_model_name} -H 'Authorization: Bearer {token}' "
              "-d '{\"prompt\": \"Where is New York?\", \"stream\": true}'", file=sys.stderr, flush=True)
    configure_logging(options.log_format, options.log_level)
    # JSON: uvicorn's own loggers go through the same JSON handler instead of uvicorn's default config
    log_config = None if options.log_format == "json" else uvicorn.config.LOGGING_CONFIG
    config = uvicorn.Config(service.app, host=options.host, port=options.port, log_level=options.log_level,
                            log_config=log_config)
    try:
        _Server(config).run()
    finally:
        service.app.state.ready = False
        service.engine.stop()
        service.policy.close()
