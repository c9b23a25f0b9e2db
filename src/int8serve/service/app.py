"""The FastAPI application: Workers AI routes over the engines, built by `create_app`.

Routes (contract §0; all `/client/v4/accounts/{account_id}/...` routes need a token of that account):

* `POST /client/v4/accounts/{account_id}/ai/run/{model}`: text generation. The model name keeps its raw `@` and
  `/` (`.../ai/run/@cf/meta/llama-2-7b-chat-int8`); `%40`/`%2F`-encoded names work too, since the server decodes
  the path before routing. Unknown query parameters are ignored.
* `GET  /client/v4/accounts/{account_id}/ai/models/search`: the served models, filtered and paginated.
* `GET  /client/v4/accounts/{account_id}/ai/models/schema?model=...`: a served model's input/output schemas.
* `GET  /client/v4/accounts/{account_id}/ai/usage?since=&until=`: the account's own metered usage, from the ledger
  (`policy/usage.py`).
* `GET  /` (no auth): the playground page, and `GET /client/v4/accounts`: the token's account (`playground/`).
* `GET  /metrics`: Prometheus metrics (text exposition, no auth; names in `metrics.py`).
* `GET  /healthz` (always 200) and `GET /readyz` (200 with per-model engine load, or 503 while loading or
  draining), without auth. While draining, new API requests get 503 (`lifecycle.py`).

A run request goes through the inference pipeline (`pipeline.py`), which applies the card's serving policy
(`policy/`: rate limits, response cache, neuron metering, usage ledger) in DESIGN.md's order: authenticate → find
the model → read and parse the body → validate → rate limit → template, tokenize, check limits → cache → submit
to the engine → stream or collect → meter → answer. Every error uses the Cloudflare envelope with a non-2xx status
(`errors.py`); an unexpected exception is logged with its traceback and answered 500/3043.

Every answer carries a fresh `cf-ai-req-id` (uuid4), which is also the engine request id in the logs; with
`demo=True` (the built-in random-weight model) every answer also says `x-int8serve-demo-model: random weights,
output is meaningless`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Mapping

from fastapi import FastAPI, Request
from starlette.datastructures import MutableHeaders
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from int8serve.catalog.card import ModelCard
from int8serve.catalog.registry import Catalog
from int8serve.engine.scheduler import Engine

from .auth import authenticate, is_valid_token
from .errors import (
    BAD_QUERY,
    NOT_READY,
    USAGE_UNAVAILABLE,
    ApiError,
    install_error_handlers,
    internal_error_response,
    json_response,
    success_body,
)
from .formats import WORKERS_AI
from .inputs import DEFAULT_MAX_BODY_BYTES
from .lifecycle import Lifecycle, LifecycleMiddleware
from .metrics import MetricsMiddleware, ServiceMetrics
from .openai import openai_router
from .pipeline import REQUEST_ID_SCOPE_KEY, InferencePipeline
from .playground import playground_router
from .policy import LedgerUnavailableError, Policy
from .policy.usage import parse_period, usage_result

__all__ = [
    "DEFAULT_PER_PAGE",
    "DEMO_HEADER",
    "MAX_PER_PAGE",
    "REQUEST_ID_HEADER",
    "RequestContextMiddleware",
    "create_app",
]

log = logging.getLogger(__name__)

API_PREFIX = "/client/v4/accounts/{account_id}/ai"
REQUEST_ID_HEADER = "cf-ai-req-id"
DEMO_HEADER = ("x-int8serve-demo-model", "random weights, output is meaningless")
DEFAULT_PER_PAGE = 20
MAX_PER_PAGE = 1000
DEFAULT_RETRY_AFTER_SECONDS = 1


class RequestContextMiddleware:
    """Gives every HTTP request a fresh uuid4 id, adds the `cf-ai-req-id` (and demo) header to every answer, and
    turns an exception that escaped the routes into a logged 500 envelope (or, if the answer had already
    started, lets it propagate so the server drops the connection)."""

    def __init__(self, app: ASGIApp, demo: bool = False) -> None:
        self.app = app
        self.demo = demo

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = str(uuid.uuid4())
        scope[REQUEST_ID_SCOPE_KEY] = request_id
        extra = {REQUEST_ID_HEADER: request_id}
        if self.demo:
            extra[DEMO_HEADER[0]] = DEMO_HEADER[1]
        started = False

        async def send_with_headers(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                headers = MutableHeaders(scope=message)
                for name, value in extra.items():
                    headers[name] = value
            await send(message)

        try:
            await self.app(scope, receive, send_with_headers)
        except Exception:
            log.exception("unhandled error in %s %s (request %s)", scope.get("method"), scope.get("path"),
                          request_id)
            if started:
                raise
            await internal_error_response(extra)(scope, receive, send)


def create_app(catalog: Catalog, engines: Mapping[str, Engine], tokens: Mapping[str, str], demo: bool = False,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, *,
               retry_after_seconds: int = DEFAULT_RETRY_AFTER_SECONDS, policy: Policy | None = None,
               log_prompts: bool = False, lifecycle: Lifecycle | None = None) -> FastAPI:
    """The HTTP API over `engines` (model name → started Engine; every name must be a card of `catalog`).

    `tokens` maps API token → account id. `demo` marks every answer as coming from the random-weight demo model.
    `max_body_bytes` bounds request bodies (413/3006). `retry_after_seconds` is the `Retry-After` of 429/3040 and
    503 answers. `policy` is the serving policy (rate limits, cache, ledger); without one, the card's policy with
    everything in memory (`Policy.in_memory()`), closed when the app's lifespan ends. `lifecycle` (default: a new
    one, ready) is the phase behind `/readyz` and the gate that refuses new requests while draining
    (`lifecycle.py`); it is also `app.state.lifecycle`. `log_prompts` adds prompt and response text to the
    per-request log line (`int8serve.request`); off by default.
    """
    for name in engines:
        if name not in catalog:
            raise ValueError(f"engine for {name!r} has no card in the catalog (known: {', '.join(catalog.names())})")
    if max_body_bytes < 1:
        raise ValueError("max_body_bytes must be at least 1")
    if not all(is_valid_token(t) for t in tokens):
        raise ValueError("API tokens must be non-empty strings of visible ASCII characters (no spaces)")
    engines = dict(engines)
    tokens = dict(tokens)
    retry_headers = {"retry-after": str(retry_after_seconds)}
    owned = policy is None
    policy = policy if policy is not None else Policy.in_memory()
    metrics = ServiceMetrics(engines, policy.fallbacks, log_prompts=log_prompts)  # this app's registry (metrics.py)
    pipeline = InferencePipeline(catalog, engines, tokens, policy, max_body_bytes, retry_headers, metrics=metrics)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        metrics.unwatch_engines()
        if owned:  # writes out the ledger: never on the event loop's thread
            await asyncio.to_thread(policy.close)

    app = FastAPI(title="int8serve", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    app.router.redirect_slashes = False  # an API: unknown paths are 404 envelopes, not redirects
    lifecycle = lifecycle if lifecycle is not None else Lifecycle()
    app.state.lifecycle = lifecycle
    app.state.engines = engines
    app.state.catalog = catalog
    app.state.policy = policy
    app.state.pipeline = pipeline
    app.state.metrics = metrics
    install_error_handlers(app)
    app.add_middleware(LifecycleMiddleware, lifecycle=lifecycle)  # inside the two below: its 503s are counted
    app.add_middleware(RequestContextMiddleware, demo=demo)
    app.add_middleware(MetricsMiddleware, metrics=metrics)  # outermost: sees every answer's final status

    @app.post(API_PREFIX + "/run/{model:path}")
    async def run_model(account_id: str, model: str, request: Request) -> Response:
        return await pipeline.run(request, account_id, model, WORKERS_AI)

    @app.get(API_PREFIX + "/usage")
    async def usage(account_id: str, request: Request) -> Response:
        account = authenticate(request.headers, account_id, tokens)
        since, until = parse_period(request.query_params.get("since"), request.query_params.get("until"))
        try:
            by_model, by_day = await policy.ledger.usage(account, since, until)
            allocation = None
            if policy.allocation is not None:
                used = round(await policy.allocation.used_today(account), 6)
                per_day = policy.allocation.neurons_per_day
                allocation = {"neurons_per_day": per_day, "used_today": used,
                              "remaining_today": round(max(0.0, per_day - used), 6)}
        except LedgerUnavailableError:
            raise ApiError(USAGE_UNAVAILABLE, headers=retry_headers) from None
        return json_response(success_body(usage_result(account, since, until, by_model, by_day, allocation)))

    @app.get(API_PREFIX + "/models/search")
    async def search_models(account_id: str, request: Request) -> Response:
        authenticate(request.headers, account_id, tokens)
        query = request.query_params  # `+` and %20 are already spaces
        page = _int_param(query.get("page"), "page", default=1, low=1)
        per_page = _int_param(query.get("per_page"), "per_page", default=DEFAULT_PER_PAGE, low=1, high=MAX_PER_PAGE)
        source = _source_param(query.get("source"))
        hide_experimental = _bool_param(query.get("hide_experimental"), "hide_experimental")
        cards = [card for card in catalog.search(task=query.get("task"), search=query.get("search"),
                                                  author=query.get("author"), source=source)
                 if card.name in engines and not (hide_experimental and _experimental(card))]
        items = cards[(page - 1) * per_page:page * per_page]  # past the end: [] so SDK pagination stops
        info = {"count": len(items), "page": page, "per_page": per_page, "total_count": len(cards)}
        return json_response(success_body([card.to_search_result() for card in items], info))

    @app.get(API_PREFIX + "/models/schema")
    async def model_schema(account_id: str, request: Request) -> Response:
        authenticate(request.headers, account_id, tokens)
        name = request.query_params.get("model")
        if not name:
            raise ApiError(BAD_QUERY, name="model", problem="a model name is required")
        card, _engine = pipeline.served_card(name)
        return json_response(success_body(card.to_schema_result()))

    app.include_router(openai_router(pipeline))  # OpenAI-compatible routes (openai.py)
    app.include_router(playground_router(tokens))  # the playground page at / and GET /client/v4/accounts

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:  # Prometheus text exposition, no auth (like /healthz)
        return metrics.exposition()

    @app.get("/healthz")
    async def healthz() -> Response:
        return json_response({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        models = {}
        for name, engine in engines.items():
            stats = engine.stats()
            models[name] = {"running": stats.running, "waiting": stats.waiting, "slots": stats.slots,
                            "free_slots": stats.free_slots, "max_queue": stats.max_queue}
        if not lifecycle.ready:
            raise ApiError(NOT_READY, reason=lifecycle.not_ready_reason(), headers=retry_headers)
        if not engines or not all(e.accepting for e in engines.values()):
            reason = "no model is served" if not engines else "the server is starting or shutting down"
            raise ApiError(NOT_READY, reason=reason, headers=retry_headers)
        return json_response({"status": "ready", "models": models})

    return app


# --- query parameters -------------------------------------------------------------------------------------------


def _int_param(raw: str | None, name: str, *, default: int, low: int, high: int | None = None) -> int:
    if raw is None or raw == "":
        return default
    text = raw.strip()
    if not (text.isascii() and text.isdigit()):
        raise ApiError(BAD_QUERY, name=name, problem=f"expected an integer, got {raw!r}")
    value = int(text)
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise ApiError(BAD_QUERY, name=name, problem=f"must be {bound}, got {value}")
    return value


def _source_param(raw: str | None) -> int | None:
    """The source id; the SDK types it as a float, so `1.0` means 1."""
    if raw is None or raw.strip() == "":
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not value.is_integer():
        raise ApiError(BAD_QUERY, name="source", problem=f"expected a source id (1 for @cf, 2 for @hf), got {raw!r}")
    return int(value)


def _bool_param(raw: str | None, name: str) -> bool:
    if raw is None or raw == "":
        return False
    lowered = raw.strip().lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise ApiError(BAD_QUERY, name=name, problem=f"expected true or false, got {raw!r}")


def _experimental(card: ModelCard) -> bool:
    """Experimental = marked beta in its properties, or tagged experimental."""
    beta = str(card.properties.get("beta", "")).strip().lower() == "true"
    return beta or any(tag.lower() == "experimental" for tag in card.tags)
