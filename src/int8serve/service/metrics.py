"""Prometheus metrics of one app (`GET /metrics`, text exposition, no auth) and the per-request log line.

Names follow vLLM's (`vllm:num_requests_running`, `vllm:time_to_first_token_seconds`, ...) and TGI's
(`tgi_batch_forward_duration{method}`), in Prometheus' own style: prefix `int8serve_`, snake case, unit suffix,
`_total` on counters (colons are reserved for recording rules, so vLLM's `vllm:` form is not used). Every app has
its own `CollectorRegistry`, so several apps in one process (tests) never collide.

`/metrics` answers from the moment the server listens, while the model loads too (`LoadingMetrics`): a scraper
that got 503s for the minutes a 7B takes to load would mark the target down and alert. Then it holds what exists
already: the phase, the process's own metrics, the ledger's spool, and the answers given meanwhile (`/readyz` and
the API's 503s: the server's metrics are made before loading, `app.loading_app` counts in them and the app goes on
doing so); the engines' metrics appear once they run.

Counters (`_total`), gauges and histograms, with their labels:

* `int8serve_phase{phase}`: 1 for the phase the server is in (`loading`, `ready`, `draining`), 0 for the others;
  `/readyz` is 200 only in `ready` (and when every engine accepts requests)
* `process_cpu_seconds_total`, `process_resident_memory_bytes`, `process_virtual_memory_bytes`,
  `process_open_fds`, `process_start_time_seconds`, ...: prometheus_client's process metrics (Linux)
* `int8serve_http_requests_total{route,status}`: every HTTP answer (a HEAD under its GET's route); route = the route
  template, `/openapi.json` and the pages by their path, `unmatched` for a path no route answers (404s); the
  lifecycle gate's refusals (503 while loading or draining, 429 on a connection beyond the limit) count under the
  route that would have answered
* `int8serve_errors_total{code,status}`: error codes answered (`errors[0].code`, on the OpenAI routes `error.code`:
  the same Workers AI code but where OpenAI has its own, a context overflow being `context_length_exceeded`
  with status 400 there and 5021 with 413 on `/ai/run`); status 200 = a stream's error frame. A client that left
  (its body half-sent, or waiting for its answer) is answered 408/3008, which nobody receives; a stream whose client
  left is sent no frame and is not counted here (its log line and ledger row say `aborted`)
* `int8serve_num_requests_running{model}`, `int8serve_num_requests_waiting{model}`, `int8serve_slots{model}`,
  `int8serve_slot_usage_ratio{model}`: gauges read from `Engine.stats()` at scrape time
* `int8serve_request_queue_time_seconds{model}`: engine queue → slot
* `int8serve_time_to_first_token_seconds{model}`: request received → first generated token
* `int8serve_time_per_output_token_seconds{model}`: (last token − first token) / (generated tokens − 1)
* `int8serve_e2e_request_latency_seconds{model}`: request received → answer complete (answered requests; cache
  hits included)
* `int8serve_prompt_tokens_total{model}`, `int8serve_generation_tokens_total{model}`: tokens the engine processed and
  generated (of the requests it took into a slot, aborted ones included; not of cache hits, nor of a request whose
  client left while it was queued)
* `int8serve_neurons_total{account,model}`: neurons billed (an account's series appears with its first request; every
  other series labelled by model only starts at 0 when its engine is served, so that replicas expose the same ones)
* `int8serve_cache_hits_total{model}`, `int8serve_cache_misses_total{model}`: response cache lookups
* `int8serve_rate_limited_requests_total{model,code}`: refused at admission, 3021 (rate limit) or 3036 (allocation)
* `int8serve_fallback_outages_total`, `int8serve_fallback_local_operations_total{component}`: shared state (Redis)
  lost, and operations served in-process meanwhile (the policy's `FallbackCounter`, read at scrape time)
* `int8serve_ledger_spooled_rows`, `int8serve_ledger_outages_total`, `int8serve_ledger_rejected_rows_total`: ledger
  rows waiting in the spool, times the ledger's database was lost (or hung), and rows it refused for their data
  (moved to the dead-letter file)
* `int8serve_prompt_tokens_prefilled_total{model}`, `int8serve_prefix_cache_hits_total{model}`,
  `int8serve_prefix_cache_reused_tokens_total{model}`, `int8serve_prefix_cache_evicted_blocks_total{model}`,
  `int8serve_prefix_cache_tokens{model}`: prompt tokens computed, and what the prefix cache saved (the start-up
  warm-up's tokens are prefilled, and no hit)
* `int8serve_open_connections`, `int8serve_connections_closed_total{reason}`: the connections counted against
  `--max-connections`, and those the server closed (`connections.py`): `evicted` (idle, closed for a new one),
  `over_limit` (closed at once: no connection could be closed for it and `REFUSALS` newcomers were waiting for
  their 429 already), `header_timeout`, `write_stalled` (aborted: its client left an answer unread for
  `--stall-timeout`); the 429s of connections beyond the limit are counted as answers (status
  429, code 3040)
* `int8serve_engine_step_duration_seconds{model,kind}`, `int8serve_engine_step_rows{model,kind}`: one engine forward
  (kind `prefill`: one chunk, rows = its tokens; `decode`: one batch, rows = its sequences), from `Engine.on_step`
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.datastructures import Headers
from starlette.responses import Response
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from int8serve.engine.scheduler import Engine, TokenEvent

from .auth import check_metrics_token
from .connections import ConnectionBudget
from .errors import REQUEST_ABORTED, ApiError, error_response
from .lifecycle import UNGATED_PATHS, Lifecycle, Phase
from .policy import Policy
from .request_log import ACCOUNT_SCOPE_KEY, OBSERVED_SCOPE_KEY, REQUEST_ID_SCOPE_KEY, log_request

__all__ = ["PREFIX", "LoadingMetrics", "MetricsMiddleware", "RequestObservation", "ServiceMetrics"]

PREFIX = "int8serve_"

# CPU inference: a 7B int8 model decodes at ~0.1-1 s per token, prefill of a long prompt takes tens of seconds
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)
TPOT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
MAX_ERROR_BODY = 65536


class _StateCollector(Collector):
    """Gauges read at scrape time: the phase, engine slots and queues, the policy's fallback counter and the
    ledger's spool."""

    def __init__(self, engines: Mapping[str, Engine], policy: Policy | None, lifecycle: Lifecycle | None) -> None:
        self.engines = engines
        self.fallbacks = policy.fallbacks if policy is not None else None
        self.ledger = policy.ledger if policy is not None else None
        self.lifecycle = lifecycle
        self.connections: ConnectionBudget | None = None

    def collect(self) -> Iterable[Metric]:
        if self.lifecycle is not None:
            phase = GaugeMetricFamily(PREFIX + "phase", "1 for the phase the server is in (loading, ready, "
                                      "draining), 0 for the others.", labels=["phase"])
            current = self.lifecycle.phase
            for each in Phase:
                phase.add_metric([each.value], 1.0 if each is current else 0.0)
            yield phase
        running = GaugeMetricFamily(PREFIX + "num_requests_running", "Requests in an engine slot.", labels=["model"])
        waiting = GaugeMetricFamily(PREFIX + "num_requests_waiting", "Requests waiting for a slot.", labels=["model"])
        slots = GaugeMetricFamily(PREFIX + "slots", "Engine slots (concurrent sequences).", labels=["model"])
        usage = GaugeMetricFamily(PREFIX + "slot_usage_ratio", "Fraction of the engine slots in use.",
                                  labels=["model"])
        for name, engine in self.engines.items():
            stats = engine.stats()
            running.add_metric([name], stats.running)
            waiting.add_metric([name], stats.waiting)
            slots.add_metric([name], stats.slots)
            usage.add_metric([name], stats.running / stats.slots if stats.slots else 0.0)
        yield from (running, waiting, slots, usage)
        yield from self._prefill()
        outages = CounterMetricFamily(PREFIX + "fallback_outages", "Times shared state (Redis) was lost.")
        local = CounterMetricFamily(PREFIX + "fallback_local_operations",
                                    "Operations served from in-process state while shared state was lost.",
                                    labels=["component"])
        if self.fallbacks is not None:
            snap = self.fallbacks.snapshot()
            outages.add_metric([], float(snap["outages"]))  # type: ignore[arg-type]
            for component, count in dict(snap["local_operations"]).items():  # type: ignore[call-overload]
                local.add_metric([component], float(count))
        else:
            outages.add_metric([], 0.0)
        yield from (outages, local)
        if self.ledger is not None:
            spooled = GaugeMetricFamily(PREFIX + "ledger_spooled_rows", "Ledger rows in the spool, not yet in the "
                                        "database (they wait there while it is away).")
            spooled.add_metric([], float(self.ledger.pending))
            lost = CounterMetricFamily(PREFIX + "ledger_outages", "Times the ledger's database was lost.")
            lost.add_metric([], float(self.ledger.outages))
            rejected = CounterMetricFamily(PREFIX + "ledger_rejected_rows", "Ledger rows the database refused for "
                                           "their data, moved to the dead-letter file.")
            rejected.add_metric([], float(self.ledger.rejected))
            yield from (spooled, lost, rejected)
        if self.connections is not None:
            yield from self._connections(self.connections)

    @staticmethod
    def _connections(budget: ConnectionBudget) -> Iterable[Metric]:
        """The connections counted against the limit, and those the server closed, by reason."""
        counted = GaugeMetricFamily(PREFIX + "open_connections", "Connections counted against --max-connections.")
        counted.add_metric([], float(budget.open))
        closed = CounterMetricFamily(PREFIX + "connections_closed", "Connections the server closed: evicted (idle, "
                                     "for a new one), over_limit (at once), header_timeout, write_stalled.",
                                     labels=["reason"])
        for reason, count in budget.closed.items():
            closed.add_metric([reason], float(count))
        yield from (counted, closed)

    def _prefill(self) -> Iterable[Metric]:
        """Prompt tokens prefilled, and what the prefix cache saved (engine counters, read at scrape time)."""
        families = {
            "prefill": CounterMetricFamily(PREFIX + "prompt_tokens_prefilled", "Prompt tokens computed by prefill.",
                                           labels=["model"]),
            "hits": CounterMetricFamily(PREFIX + "prefix_cache_hits", "Prefill steps that reused cached blocks.",
                                        labels=["model"]),
            "reused": CounterMetricFamily(PREFIX + "prefix_cache_reused_tokens", "Prompt tokens taken from the "
                                          "prefix cache instead of prefilled.", labels=["model"]),
            "evicted": CounterMetricFamily(PREFIX + "prefix_cache_evicted_blocks", "Blocks evicted from the prefix "
                                           "cache (least recently used first).", labels=["model"]),
            "cached": GaugeMetricFamily(PREFIX + "prefix_cache_tokens", "Prompt tokens the prefix cache holds.",
                                        labels=["model"]),
        }
        for name, engine in self.engines.items():
            families["prefill"].add_metric([name], float(engine.prefilled_tokens))
            prefix = engine.prefix_cache
            if prefix is not None:
                stats = prefix.stats
                families["hits"].add_metric([name], float(stats.hits))
                families["reused"].add_metric([name], float(stats.reused_tokens))
                families["evicted"].add_metric([name], float(stats.evicted_blocks))
                families["cached"].add_metric([name], float(prefix.cached_tokens))
        yield from families.values()


class ServiceMetrics:
    """The metrics of one app, in their own registry; `observe` starts one request's observation."""

    def __init__(self, engines: Mapping[str, Engine] | None = None, policy: Policy | None = None,
                 log_prompts: bool = False, lifecycle: Lifecycle | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.log_prompts = log_prompts
        r = self.registry
        ProcessCollector(registry=r)
        self.http_requests = Counter(PREFIX + "http_requests", "HTTP answers by route template and status.",
                                     ["route", "status"], registry=r)
        self.errors = Counter(PREFIX + "errors", "Error codes answered (status 200: a stream's error frame; a stream "
                              "whose client left is sent none and not counted).", ["code", "status"], registry=r)
        self.queue_time = Histogram(PREFIX + "request_queue_time_seconds", "Time waiting for an engine slot.",
                                    ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram(PREFIX + "time_to_first_token_seconds", "Request received to first generated token.",
                              ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram(PREFIX + "time_per_output_token_seconds", "Mean time per output token after the "
                              "first.", ["model"], buckets=TPOT_BUCKETS, registry=r)
        self.e2e = Histogram(PREFIX + "e2e_request_latency_seconds", "Request received to answer complete.",
                             ["model"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "Prompt tokens processed by the engine.", ["model"],
                                     registry=r)
        self.generation_tokens = Counter(PREFIX + "generation_tokens", "Tokens generated by the engine.", ["model"],
                                         registry=r)
        self.neurons = Counter(PREFIX + "neurons", "Neurons billed.", ["account", "model"], registry=r)
        self.cache_hits = Counter(PREFIX + "cache_hits", "Response cache hits.", ["model"], registry=r)
        self.cache_misses = Counter(PREFIX + "cache_misses", "Response cache misses.", ["model"], registry=r)
        self.rate_limited = Counter(PREFIX + "rate_limited_requests", "Requests refused at admission (3021 rate "
                                    "limit, 3036 daily allocation).", ["model", "code"], registry=r)
        self.step_duration = Histogram(PREFIX + "engine_step_duration_seconds", "One engine forward, by kind.",
                                       ["model", "kind"], buckets=STEP_BUCKETS, registry=r)
        self.step_rows = Histogram(PREFIX + "engine_step_rows", "Prefill chunk tokens / decode batch sequences.",
                                   ["model", "kind"], buckets=ROW_BUCKETS, registry=r)
        self._engines: dict[str, Engine] = {}
        self._callbacks: list[tuple[Engine, Any]] = []
        self._state = _StateCollector(self._engines, policy, lifecycle)
        self.registry.register(self._state)
        for name, engine in (engines or {}).items():
            self.watch_engine(name, engine)

    def watch_engine(self, model: str, engine: Engine) -> None:
        """Scrape `engine`'s slots and time its steps (through its `on_step` callbacks); the model's series start at
        0, so that every server serving it exposes the same ones from the start. Watched once: an engine already
        watched (metrics made with it, then given to create_app) is left as it is, its steps timed once."""
        if self._engines.get(model) is engine:
            return
        self._engines[model] = engine
        for family in (self.queue_time, self.ttft, self.tpot, self.e2e, self.prompt_tokens, self.generation_tokens,
                       self.cache_hits, self.cache_misses):
            family.labels(model)
        for code in ("3021", "3036"):
            self.rate_limited.labels(model, code)
        duration = {kind: self.step_duration.labels(model, kind) for kind in ("prefill", "decode")}
        rows = {kind: self.step_rows.labels(model, kind) for kind in ("prefill", "decode")}

        def on_step(kind: str, seconds: float, n: int) -> None:  # engine thread; prometheus_client is thread-safe
            if kind in duration:
                duration[kind].observe(seconds)
                rows[kind].observe(n)

        engine.on_step.append(on_step)
        self._callbacks.append((engine, on_step))

    def watch_connections(self, budget: ConnectionBudget) -> None:
        """Expose the server's connections (`connections.py`), read at scrape time."""
        self._state.connections = budget

    def unwatch_engines(self) -> None:
        """Remove this app's step callbacks (engines may outlive the app, e.g. in tests)."""
        for engine, callback in self._callbacks:
            if callback in engine.on_step:
                engine.on_step.remove(callback)
        self._callbacks.clear()

    def exposition(self) -> Response:
        return Response(generate_latest(self.registry), media_type=CONTENT_TYPE_LATEST)

    def observe(self, request_id: str, scope: Scope | None = None) -> RequestObservation:
        """One inference request's observation; its line replaces the one `MetricsMiddleware` writes for `scope`."""
        if scope is not None:
            scope[OBSERVED_SCOPE_KEY] = True
        return RequestObservation(self, request_id)

    def count_error(self, code: int | str, status: int) -> None:
        self.errors.labels(str(code), str(status)).inc()


class LoadingMetrics:
    """`GET /metrics` while the model loads, before the app and its route exist (the lifecycle gate's `metrics`):
    what `metrics` holds then (the phase, the process, the ledger), behind the same `--metrics-token`."""

    def __init__(self, metrics: ServiceMetrics, metrics_token: str | None = None) -> None:
        self.metrics = metrics
        self.metrics_token = metrics_token

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            check_metrics_token(Headers(scope=scope).get("authorization"), self.metrics_token)
            response = self.metrics.exposition()
        except ApiError as error:
            response = error_response(scope.get("path", ""), error)
        await response(scope, receive, send)


class RequestObservation:
    """What is known of one inference request; `finish` (once) updates the metrics and writes the log line."""

    def __init__(self, metrics: ServiceMetrics, request_id: str) -> None:
        self.metrics = metrics
        self.started = time.monotonic()
        self.fields: dict[str, Any] = {
            "request_id": request_id, "account": None, "model": None, "status": None, "error_code": None,
            "outcome": None, "prompt_tokens": 0, "completion_tokens": 0, "neurons": 0.0, "cached": False,
            "stream": False, "cached_prompt_tokens": 0, "queue_s": None, "ttft_s": None, "total_s": None}
        self.first_token_at: float | None = None
        self.last_token_at: float | None = None
        self.queued_at = 0.0
        self.started_at = 0.0
        self.engine_tokens = False
        self.finished = False
        self._prompt: Any = None
        self._response: str | None = None

    # ---- what the pipeline learns ----

    def input(self, account: str, model: str | None, prompt: Any) -> None:
        """The request's account and model, and (logged only with --log-prompts) its prompt or messages."""
        self.fields["account"], self.fields["model"] = account, model
        if self.metrics.log_prompts:
            self._prompt = prompt

    def cache(self, model: str, hit: bool) -> None:
        (self.metrics.cache_hits if hit else self.metrics.cache_misses).labels(model).inc()

    def elapsed(self) -> float:
        """Seconds since the request was received."""
        return time.monotonic() - self.started

    def token(self, event: TokenEvent) -> None:
        """An engine event of this request (first and last token times, for TTFT and TPOT)."""
        if event.token_id is not None:
            self.last_token_at = time.monotonic()
            self.first_token_at = self.first_token_at or self.last_token_at
        self.queued_at, self.started_at = event.queued_at, event.started_at
        self.fields["cached_prompt_tokens"] = event.cached_tokens

    def answer(self, account: str, model: str, prompt_tokens: int, completion_tokens: int, neurons: float,
               outcome: str, cached: bool, text: str, started: bool = True) -> None:
        """How the request ended; `started`: the engine took it into a slot (else it processed none of its prompt:
        its client left while it was queued)."""
        f = self.fields
        f.update(account=account, model=model, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                 neurons=neurons, outcome=outcome, cached=cached)
        if self.metrics.log_prompts:
            self._response = text
        if not self.engine_tokens:  # once per request: the aborted path may see the answer again
            self.engine_tokens = True
            m = self.metrics
            m.neurons.labels(account, model).inc(neurons)
            if started and not cached:
                m.prompt_tokens.labels(model).inc(prompt_tokens)
                m.generation_tokens.labels(model).inc(completion_tokens)

    # ---- the end ----

    def finish(self, status: int, error_code: int | None = None, in_stream: bool = False) -> None:
        if self.finished:
            return
        self.finished = True
        m, f = self.metrics, self.fields
        now = time.monotonic()
        f["status"], f["error_code"] = status, error_code
        f["total_s"] = round(now - self.started, 6)
        if error_code == REQUEST_ABORTED.code:  # the client left: whatever it was sent, it received no more
            f["outcome"] = "aborted"
        if f["outcome"] is None:
            f["outcome"] = "ok" if status < 400 else "rejected"
        if error_code is not None and f["outcome"] == "ok":
            f["outcome"] = "error"
        if in_stream and error_code is not None and f["outcome"] != "aborted":  # an error frame was sent
            m.count_error(error_code, status)
        if error_code in (3021, 3036) and status == 429 and f["model"]:
            m.rate_limited.labels(f["model"], str(error_code)).inc()
        model = f["model"]
        if model is not None and self.started_at:
            queue = max(0.0, self.started_at - self.queued_at)
            f["queue_s"] = round(queue, 6)
            m.queue_time.labels(model).observe(queue)
        if model is not None and self.first_token_at is not None and self.last_token_at is not None:
            ttft = self.first_token_at - self.started
            f["ttft_s"] = round(ttft, 6)
            m.ttft.labels(model).observe(ttft)
            tokens = f["completion_tokens"]
            if tokens > 1:
                m.tpot.labels(model).observe((self.last_token_at - self.first_token_at) / (tokens - 1))
        if model is not None and f["outcome"] == "ok" and status < 400:
            m.e2e.labels(model).observe(now - self.started)
        fields = dict(f)
        if m.log_prompts:
            fields["prompt"], fields["response"] = self._prompt, self._response
        log_request(fields)


class MetricsMiddleware:
    """Counts every HTTP answer by route template and status, and the error code of every error envelope (read
    from the answer's JSON body: `errors[0].code` for Cloudflare envelopes, `error.code` / `error.type` for
    OpenAI-style ones); writes the log line of every answer no `RequestObservation` writes one for (all but the
    inference requests': `request_log.py`)."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics, routes: Sequence[BaseRoute] = ()) -> None:
        self.app = app
        self.metrics = metrics
        self.routes = routes  # the app's (`app.route_table`): labels of answers the router did not give

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.monotonic()
        status = 0
        code = "none"
        body: list[bytes] = []
        size = 0
        metrics = self.metrics

        async def counting_send(message: Message) -> None:
            # counted before the message goes out, so a client that got its answer sees it in /metrics
            nonlocal status, size, code
            if message["type"] == "http.response.start":
                status = int(message["status"])
                metrics.http_requests.labels(_route_label(scope, self.routes), str(status)).inc()
            elif message["type"] == "http.response.body" and status >= 400:
                if size <= MAX_ERROR_BODY:
                    chunk = message.get("body", b"")
                    body.append(chunk)
                    size += len(chunk)
                if not message.get("more_body", False):
                    code = _error_code(b"".join(body))
                    metrics.count_error(code, status)
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            if not status:  # nothing was answered: the server sends a bare 500
                metrics.http_requests.labels(_route_label(scope, self.routes), "500").inc()
                metrics.count_error("none", 500)
            if not scope.get(OBSERVED_SCOPE_KEY):
                self._log(scope, status or 500, code, time.monotonic() - started)

    def _log(self, scope: Scope, status: int, code: str, seconds: float) -> None:
        """The log line of an answer no `RequestObservation` observed (DEBUG for a probe answered as expected)."""
        path = scope.get("path", "")
        probe = path in UNGATED_PATHS and (status < 400 or (path == "/readyz" and status == 503))
        log_request({"request_id": scope.get(REQUEST_ID_SCOPE_KEY), "account": scope.get(ACCOUNT_SCOPE_KEY),
                     "route": _route_label(scope, self.routes), "status": status,
                     "error_code": _logged_code(code),
                     "outcome": "ok" if status < 400 else "rejected", "total_s": round(seconds, 6)},
                    logging.DEBUG if probe else None)


def _route_label(scope: Scope, routes: Sequence[BaseRoute]) -> str:
    """The template of the route that answered (`/client/v4/accounts/{account_id}/ai/run/{model:path}`), or
    `unmatched`: labels come from the app's routes only, never from a path a client made up.

    FastAPI's routes put themselves in `scope["route"]` before the endpoint runs. An answer without one (FastAPI's
    own `/openapi.json`, a plain Starlette route; an answer given before the router ran: the lifecycle gate's 503
    while draining or loading, its 429 beyond the connection limit) is labelled with the route of `routes` (the
    app's, `app.route_table`) that answers its path and method, as the router matches."""
    route = scope.get("route") or _matching_route(scope, routes)
    return getattr(route, "path", None) or "unmatched"


def _matching_route(scope: Scope, routes: Sequence[BaseRoute]) -> BaseRoute | None:
    """The route the router would take for `scope`: the first full match, else the first partial one."""
    partial = None
    for route in routes:
        match, _child = route.matches(scope)
        if match is Match.FULL:
            return route
        if match is Match.PARTIAL and partial is None:
            partial = route
    return partial


def _logged_code(code: str) -> int | str | None:
    """An error code as a request line has it: a number, OpenAI's word (`context_length_exceeded`) or null."""
    if code == "none":
        return None
    return int(code) if code.isdigit() else code


def _error_code(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return "none"
    if isinstance(data, dict):
        errors = data.get("errors")
        if isinstance(errors, list) and errors and isinstance(errors[0], dict) and "code" in errors[0]:
            return str(errors[0]["code"])
        error = data.get("error")
        if isinstance(error, dict):
            code = error.get("code") or error.get("type")
            if code is not None:
                return str(code)
    return "none"
