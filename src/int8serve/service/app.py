"""The FastAPI application: the Workers AI and OpenAI-compatible APIs over the engines, built by `create_app`.

Routes live in `routes/` (one router per API, one for operations), requests and answers in `protocol/`, the one
inference request lifecycle in `inference.py`, the card's serving policy in `policy/`. This module puts them
together with the app-wide pieces:

* one exception handler (`errors.py`) answering every error in the envelope of the route's API;
* middleware, outermost first: an absolute-form request target (`GET http://host/healthz`) routed by its path
  (`framing.py`), `HEAD` answered as `GET` without a body (outside the metrics, which then count a HEAD under the
  GET's route and read the error code from its body), metrics (every answer's final status), the request id
  (`cf-ai-req-id`, a fresh uuid4 on every answer, also the engine request id in the logs; unexpected exceptions
  become a logged 500/3043), the refusal of a request whose body length is ambiguous or that uvicorn's HTTP parser
  refused (`framing.py`: 400/6003, the connection closed after it), and the lifecycle gate (`lifecycle.py`: 503
  while loading or draining);
* the OpenAPI document at `/openapi.json`, with the request bodies, which routes parse themselves (JSON whatever
  the Content-Type, in a worker thread), added to its components. FastAPI's `/docs` and `/redoc` are off: they
  load code from a CDN onto this origin (where the playground may keep a token); `routes/ops.py` serves a page of
  our own at `/docs`.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic.json_schema import models_json_schema
from starlette.datastructures import MutableHeaders
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from int8serve.catalog.registry import Catalog
from int8serve.engine.scheduler import Engine

from ..accounts import ACCOUNT_ID_RULE, TOKEN_RULE, is_valid_account, is_valid_token
from .auth import TokenTable
from .deps import AppServices
from .errors import install_error_handlers, internal_error_response
from .framing import AbsoluteFormMiddleware, AmbiguousLengthMiddleware
from .inference import Inference, RequestLimits
from .lifecycle import Lifecycle, LifecycleMiddleware
from .metrics import LoadingMetrics, MetricsMiddleware, ServiceMetrics
from .policy import Policy
from .policy.fairness import default_inflight_limit
from .protocol.openai import ChatCompletionRequest, CompletionRequest
from .protocol.run import RunBody
from .request_log import REQUEST_ID_SCOPE_KEY
from .routes import openai, ops, workers_ai

__all__ = ["REQUEST_ID_HEADER", "RequestContextMiddleware", "create_app", "loading_app", "route_table"]

log = logging.getLogger(__name__)

REQUEST_ID_HEADER = "cf-ai-req-id"
BODY_MODELS = (RunBody, ChatCompletionRequest, CompletionRequest)
ROUTERS = (workers_ai.router, openai.router, ops.router)


class RequestContextMiddleware:
    """Gives every HTTP request a fresh uuid4 id, adds the `cf-ai-req-id` header to every answer, and
    turns an exception that escaped the routes into a logged 500 envelope (or, if the answer had already
    started, lets it propagate so the server drops the connection)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = str(uuid.uuid4())
        scope[REQUEST_ID_SCOPE_KEY] = request_id
        extra = {REQUEST_ID_HEADER: request_id}
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


class HeadAsGetMiddleware:
    """Answers `HEAD` as the same `GET` without its body (RFC 9110 section 9.3.2), as load balancers' and uptime
    monitors' probes expect: FastAPI's routes register the methods they name only."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "HEAD":
            await self.app(scope, receive, send)
            return

        async def send_headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, send_headers_only)


def create_app(catalog: Catalog, engines: Mapping[str, Engine], tokens: Mapping[str, str], *,
               policy: Policy | None = None, limits: RequestLimits | None = None, log_prompts: bool = False,
               lifecycle: Lifecycle | None = None, metrics_token: str | None = None,
               metrics: ServiceMetrics | None = None) -> FastAPI:
    """The HTTP API over `engines` (model name → started Engine; every name must be a card of `catalog`).

    `tokens` maps API token → account id.
    `policy` is the serving policy (rate limits, cache, ledger); without one, the card's policy with everything in
    memory (`Policy.in_memory()`), closed when the app's lifespan ends; a policy given is the caller's to close
    (`close()` after the event loop), but its Redis connections end with the lifespan, on the loop. `limits` bounds
    what a request may cost (`RequestLimits`; each model's per-account share of its engine defaults to
    `policy/fairness.py`'s).
    `lifecycle` (default: a new one, ready) is the phase behind `/readyz` and the gate that refuses new requests
    while draining.
    `log_prompts` adds prompt and response text to the per-request log line. `metrics_token`: `/metrics` answers
    only this bearer token. `metrics` (default: new ones): those `loading_app` counted in while the models loaded,
    made with the same `policy` and `lifecycle`; the app goes on counting in them.
    """
    for name in engines:
        if name not in catalog:
            raise ValueError(f"engine for {name!r} has no card in the catalog (known: {', '.join(catalog.names())})")
    if not all(is_valid_token(t) for t in tokens):
        raise ValueError(f"an API token is {TOKEN_RULE}")
    if metrics_token is not None and not is_valid_token(metrics_token):
        raise ValueError(f"the metrics token is {TOKEN_RULE}")
    if not all(is_valid_account(a) for a in tokens.values()):
        raise ValueError(f"an account id is {ACCOUNT_ID_RULE}")
    owned = policy is None
    policy = policy if policy is not None else Policy.in_memory()
    limits = limits or RequestLimits(max_inflight_per_account=_inflight_limit(catalog, engines, tokens))
    lifecycle = lifecycle if lifecycle is not None else Lifecycle()
    if metrics is None:
        metrics = ServiceMetrics(policy=policy, lifecycle=lifecycle)  # this app's own
    metrics.log_prompts = log_prompts
    for name, engine in engines.items():
        metrics.watch_engine(name, engine)
    services = AppServices(catalog=catalog, engines=dict(engines), tokens=TokenTable(tokens), policy=policy,
                           metrics=metrics, lifecycle=lifecycle, metrics_token=metrics_token,
                           inference=Inference(catalog, engines, policy, metrics, lifecycle, limits),
                           retry_headers={"retry-after": str(limits.retry_after_seconds)})

    async def end_of_service() -> None:
        """What the app opened, ended on its event loop; twice is once. The lifespan's end runs it, and `serve`,
        whose server ran the lifespan against the loading gate before this app existed (server.py), itself."""
        metrics.unwatch_engines()
        services.inference.workers.close()
        # the Redis connections and the allocation's tasks are this loop's: ended here, the caller's policy's too
        # (its close() writes out the ledger only, and once the loop has ended nobody can close them)
        if owned:
            await policy.aclose()
        else:
            await policy.end_shared_state()

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await end_of_service()

    app = FastAPI(title="int8serve", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="The Workers AI HTTP API (and the OpenAI one) for self-hosted models.")
    app.router.redirect_slashes = False  # an API: unknown paths are 404 envelopes, not redirects
    app.state.services = services
    app.state.end_of_service = end_of_service
    install_error_handlers(app)
    app.add_middleware(LifecycleMiddleware, lifecycle=lifecycle)  # inside the three below: its 503s are counted
    app.add_middleware(AmbiguousLengthMiddleware)  # before anything reads a body; its 400s are counted and logged
    app.add_middleware(RequestContextMiddleware)
    app.add_middleware(MetricsMiddleware, metrics=metrics, routes=route_table())  # sees every answer's final status
    # outside the metrics: the scope it passes on is the one the router writes the route into and the metrics read,
    # and the body it strips is past the metrics, which read an error's code from it
    app.add_middleware(HeadAsGetMiddleware)
    app.add_middleware(AbsoluteFormMiddleware)  # before anything reads the path
    for router in ROUTERS:
        app.include_router(router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]
    return app


def loading_app(lifecycle: Lifecycle, metrics: ServiceMetrics, metrics_token: str | None = None) -> ASGIApp:
    """What answers while the models load, before `create_app` can make the app: the lifecycle gate alone (`/healthz`
    200, `/readyz` and the API 503, `/metrics` with what `metrics` holds, behind `metrics_token`), inside the same
    middleware as the app's, so that its answers have request ids, log lines and are counted in `metrics` (give
    the same to `create_app`: the counts go on)."""
    gate = LifecycleMiddleware(None, lifecycle, metrics=LoadingMetrics(metrics, metrics_token))
    framed = AmbiguousLengthMiddleware(gate)
    counted = MetricsMiddleware(RequestContextMiddleware(framed), metrics, routes=route_table())
    return AbsoluteFormMiddleware(HeadAsGetMiddleware(counted))


def route_table() -> list[BaseRoute]:
    """The routes of every app `create_app` makes, with their templates: FastAPI's own (`/openapi.json`), then the
    routers'. The metrics label an answer the router did not give (the lifecycle gate's) with the one that matches."""
    bare = FastAPI(docs_url=None, redoc_url=None)
    return [*bare.routes, *(route for router in ROUTERS for route in router.routes)]


def _inflight_limit(catalog: Catalog, engines: Mapping[str, Engine], tokens: Mapping[str, str]
                    ) -> dict[str, int | None]:
    """Each model's default share per account: its card's max_concurrent_requests when several accounts share the
    server (as `serve` gives it)."""
    accounts = len(set(tokens.values()))
    return {name: default_inflight_limit(catalog.get(name).max_concurrent_requests, accounts) for name in engines}


def _openapi(app: FastAPI) -> dict[str, Any]:
    """FastAPI's document, plus the request bodies the inference routes parse themselves."""
    if app.openapi_schema is None:
        document = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        _refs, bodies = models_json_schema([(m, "validation") for m in BODY_MODELS],
                                           ref_template="#/components/schemas/{model}")
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        schemas.update(bodies.get("$defs", {}))
        for name in ("HTTPValidationError", "ValidationError"):  # parameters that do not validate are 400s here
            schemas.pop(name, None)
        for operation in (op for path in document["paths"].values() for op in path.values()):
            operation.get("responses", {}).pop("422", None)
        app.openapi_schema = document
    return app.openapi_schema


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("int8serve")
    except PackageNotFoundError:
        return "0.0.0"
