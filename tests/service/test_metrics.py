"""`GET /metrics` and the per-request log line: values move as requests happen, on real servers.

The shared server (tests/service/conftest.py: no rate limit, no cache) is used for the request, token, error,
timing and slot metrics; `policy_app` is a server of its own with a rate limit of 2 a minute, the response cache
and `log_prompts=True`, each test calling it as an account of its own. Every assertion is on a difference between
two scrapes, since other tests share the session's server.
"""

from __future__ import annotations

import json
import logging
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from int8serve.catalog.registry import Catalog
from int8serve.engine.scheduler import Engine
from int8serve.service.app import create_app
from int8serve.service.metrics import ServiceMetrics
from int8serve.service.policy import Policy
from int8serve.service.request_log import REQUEST_LOGGER, JsonFormatter, TextFormatter

from .conftest import ACCOUNT, MODEL, OTHER_ACCOUNT, SLOW_MODEL, TOKEN, LiveServer, wait_for, wait_idle

RUN_ROUTE = "/client/v4/accounts/{account_id}/ai/run/{model:path}"
STORY = "Once upon a time, there was a little"
SECRET_PROMPT = "Once upon a time a purple zebra named Quillfeather"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(client: httpx.Client) -> Samples:
    resp = client.get("/metrics")  # no Authorization header
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(resp.text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def delta(before: Samples, after: Samples, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture
def auth() -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKEN}"}


def run_url(model: str = MODEL, account: str = ACCOUNT) -> str:
    return f"/client/v4/accounts/{account}/ai/run/{model}"


# --- the endpoint -------------------------------------------------------------------------------------------------


def test_metrics_need_no_token_and_are_valid_exposition(http: httpx.Client) -> None:
    resp = http.get("/metrics")
    assert resp.status_code == 200
    families = {f.name: f.type for f in text_string_to_metric_families(resp.text)}
    expected = {
        "int8serve_http_requests": "counter", "int8serve_errors": "counter",
        "int8serve_num_requests_running": "gauge", "int8serve_num_requests_waiting": "gauge",
        "int8serve_slots": "gauge", "int8serve_slot_usage_ratio": "gauge",
        "int8serve_request_queue_time_seconds": "histogram", "int8serve_time_to_first_token_seconds": "histogram",
        "int8serve_time_per_output_token_seconds": "histogram", "int8serve_e2e_request_latency_seconds": "histogram",
        "int8serve_prompt_tokens": "counter", "int8serve_generation_tokens": "counter",
        "int8serve_neurons": "counter", "int8serve_cache_hits": "counter", "int8serve_cache_misses": "counter",
        "int8serve_rate_limited_requests": "counter", "int8serve_fallback_outages": "counter",
        "int8serve_fallback_local_operations": "counter", "int8serve_engine_step_duration_seconds": "histogram",
        "int8serve_engine_step_rows": "histogram",
    }
    assert {name: families.get(name) for name in expected} == expected
    samples = scrape(http)
    assert value(samples, "int8serve_slots", model=MODEL) == 4
    assert value(samples, "int8serve_slots", model=SLOW_MODEL) == 1


def test_every_served_model_has_its_series_from_the_start(engines: dict[str, Engine]) -> None:
    """Found by an audit: a model's counters and histograms appeared with their first event, so two replicas exposed
    different series and a ratio over them had no data. Each starts at 0 when the engine is served."""
    metrics = ServiceMetrics(engines)
    try:
        samples = {(s.name, frozenset(s.labels.items())): s.value
                   for family in text_string_to_metric_families(metrics.exposition().body.decode())
                   for s in family.samples}
    finally:
        metrics.unwatch_engines()
    for model in engines:
        for name in ("int8serve_prompt_tokens_total", "int8serve_generation_tokens_total",
                     "int8serve_cache_hits_total", "int8serve_cache_misses_total",
                     "int8serve_request_queue_time_seconds_count", "int8serve_time_to_first_token_seconds_count",
                     "int8serve_time_per_output_token_seconds_count", "int8serve_e2e_request_latency_seconds_count"):
            assert samples.get((name, frozenset({"model": model}.items()))) == 0, (name, model)
        for code in ("3021", "3036"):
            labels = frozenset({"model": model, "code": code}.items())
            assert samples.get(("int8serve_rate_limited_requests_total", labels)) == 0, (code, model)


def test_an_engine_watched_again_has_its_steps_timed_once(catalog: Catalog, engines: dict[str, Engine]) -> None:
    """Metrics made with the engines, then given to create_app (which watches every engine it serves): each engine
    keeps one step callback, so its step histograms count each step once (found by review: twice)."""
    before = {name: len(engine.on_step) for name, engine in engines.items()}
    metrics = ServiceMetrics(engines)
    app = create_app(catalog, engines, {TOKEN: ACCOUNT}, metrics=metrics)
    try:
        assert {name: len(engine.on_step) for name, engine in engines.items()} == {
            name: count + 1 for name, count in before.items()}
    finally:
        app.state.services.metrics.unwatch_engines()
        app.state.services.policy.close()
    assert {name: len(engine.on_step) for name, engine in engines.items()} == before


# --- a request moves its counters and histograms -----------------------------------------------------------------


def test_a_request_moves_its_counters_and_histograms(http: httpx.Client, auth: dict[str, str]) -> None:
    before = scrape(http)
    resp = http.post(run_url(), headers=auth, json={"prompt": STORY, "raw": True, "max_tokens": 8, "temperature": 0})
    assert resp.status_code == 200
    usage = resp.json()["result"]["usage"]
    after = scrape(http)
    assert delta(before, after, "int8serve_http_requests_total", route=RUN_ROUTE, status="200") == 1
    assert delta(before, after, "int8serve_prompt_tokens_total", model=MODEL) == usage["prompt_tokens"]
    assert delta(before, after, "int8serve_generation_tokens_total", model=MODEL) == usage["completion_tokens"]
    assert delta(before, after, "int8serve_neurons_total", account=ACCOUNT, model=MODEL) == pytest.approx(
        float(resp.headers["cf-ai-neurons"]), abs=1e-3)
    for name in ("int8serve_e2e_request_latency_seconds", "int8serve_time_to_first_token_seconds",
                 "int8serve_request_queue_time_seconds"):
        assert delta(before, after, name + "_count", model=MODEL) == 1, name
        assert delta(before, after, name + "_sum", model=MODEL) >= 0, name
    if usage["completion_tokens"] > 1:
        assert delta(before, after, "int8serve_time_per_output_token_seconds_count", model=MODEL) == 1
    for kind in ("prefill", "decode"):
        assert delta(before, after, "int8serve_engine_step_duration_seconds_count", model=MODEL, kind=kind) >= 1
    # the histogram's +Inf bucket holds every observation
    assert value(after, "int8serve_e2e_request_latency_seconds_bucket", model=MODEL, le="+Inf") == value(
        after, "int8serve_e2e_request_latency_seconds_count", model=MODEL)


def test_stream_token_counters_equal_the_usage_frame(http: httpx.Client, auth: dict[str, str]) -> None:
    before = scrape(http)
    body = {"prompt": STORY, "raw": True, "max_tokens": 12, "temperature": 0, "stream": True}
    with http.stream("POST", run_url(), headers=auth, json=body) as resp:
        assert resp.status_code == 200
        frames = [line[6:] for line in resp.iter_lines() if line.startswith("data: ")]
    usage = json.loads(frames[-2])["usage"]
    after = scrape(http)
    assert delta(before, after, "int8serve_prompt_tokens_total", model=MODEL) == usage["prompt_tokens"]
    assert delta(before, after, "int8serve_generation_tokens_total", model=MODEL) == usage["completion_tokens"]
    assert delta(before, after, "int8serve_neurons_total", account=ACCOUNT, model=MODEL) == pytest.approx(
        usage["neurons"], abs=1e-3)
    assert delta(before, after, "int8serve_time_to_first_token_seconds_count", model=MODEL) == 1
    assert delta(before, after, "int8serve_e2e_request_latency_seconds_count", model=MODEL) == 1


def test_a_400_counts_its_code(http: httpx.Client, auth: dict[str, str]) -> None:
    before = scrape(http)
    resp = http.post(run_url(), headers=auth, json={"prompt": STORY, "max_tokens": "many"})
    assert (resp.status_code, resp.json()["errors"][0]["code"]) == (400, 5006)
    missing = http.get("/no/such/route")
    assert missing.status_code == 404
    after = scrape(http)
    assert delta(before, after, "int8serve_errors_total", code="5006", status="400") == 1
    assert delta(before, after, "int8serve_http_requests_total", route=RUN_ROUTE, status="400") == 1
    assert delta(before, after, "int8serve_errors_total", code="7000", status="404") == 1
    assert delta(before, after, "int8serve_http_requests_total", route="unmatched", status="404") == 1
    # a refused request produces no tokens
    assert delta(before, after, "int8serve_prompt_tokens_total", model=MODEL) == 0


def test_head_and_non_api_routes_count_under_their_route(http: httpx.Client, auth: dict[str, str]) -> None:
    """A HEAD counts under its GET's route with its error code; `/openapi.json` and `/docs` by their path."""
    before = scrape(http)
    assert http.head("/healthz").status_code == 200
    refused = http.head(f"/client/v4/accounts/{OTHER_ACCOUNT}/ai/models/search", headers=auth)
    assert (refused.status_code, refused.content) == (403, b"")  # a token of another account: 403/10000
    assert http.get("/openapi.json").status_code == 200 and http.get("/docs").status_code == 200
    assert http.get("/openapi.json/nowhere").status_code == 404
    after = scrape(http)
    assert delta(before, after, "int8serve_http_requests_total", route="/healthz", status="200") == 1
    search = "/client/v4/accounts/{account_id}/ai/models/search"
    assert delta(before, after, "int8serve_http_requests_total", route=search, status="403") == 1
    assert delta(before, after, "int8serve_errors_total", code="10000", status="403") == 1
    assert delta(before, after, "int8serve_errors_total", code="none", status="403") == 0
    assert delta(before, after, "int8serve_http_requests_total", route="/openapi.json", status="200") == 1
    assert delta(before, after, "int8serve_http_requests_total", route="/docs", status="200") == 1
    assert delta(before, after, "int8serve_http_requests_total", route="unmatched", status="200") == 0
    assert delta(before, after, "int8serve_http_requests_total", route="unmatched", status="404") == 1


def test_refusals_while_draining_count_under_their_route(app: FastAPI, http: httpx.Client,
                                                        auth: dict[str, str]) -> None:
    """The lifecycle gate answers before the router runs: its 503s count under the route that would have answered
    (found by an audit: `unmatched`, which is for a path no route answers)."""
    lifecycle = app.state.services.lifecycle
    before = scrape(http)
    lifecycle.start_draining()
    try:
        search = http.get(f"/client/v4/accounts/{ACCOUNT}/ai/models/search", headers=auth)
        chat = http.post("/v1/chat/completions", headers=auth, json={"model": MODEL, "messages": []})
        nowhere = http.get("/no/such/route")
        after = scrape(http)
    finally:
        lifecycle.mark_ready()
    assert [search.status_code, chat.status_code, nowhere.status_code] == [503, 503, 503]
    route = "/client/v4/accounts/{account_id}/ai/models/search"
    assert delta(before, after, "int8serve_http_requests_total", route=route, status="503") == 1
    assert delta(before, after, "int8serve_http_requests_total", route="/v1/chat/completions", status="503") == 1
    assert delta(before, after, "int8serve_http_requests_total", route="unmatched", status="503") == 1
    assert delta(before, after, "int8serve_errors_total", code="3040", status="503") == 3


def test_slot_gauges_during_a_slow_stream(http: httpx.Client, base_url: str, auth: dict[str, str],
                                          engines: dict[str, Engine]) -> None:
    body = {"prompt": STORY, "raw": True, "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.Client(base_url=base_url, timeout=30) as streamer, \
            streamer.stream("POST", run_url(SLOW_MODEL), headers=auth, json=body) as resp:
        assert resp.status_code == 200
        next(line for line in resp.iter_lines() if line.startswith("data: "))  # generating now
        during = scrape(http)
    # leaving the `with` closed the stream early: the slot is freed at the next step
    wait_idle(engines)
    after = scrape(http)
    assert value(during, "int8serve_num_requests_running", model=SLOW_MODEL) == 1
    assert value(during, "int8serve_slot_usage_ratio", model=SLOW_MODEL) == 1.0
    assert value(after, "int8serve_num_requests_running", model=SLOW_MODEL) == 0
    assert value(after, "int8serve_num_requests_waiting", model=SLOW_MODEL) == 0
    assert value(after, "int8serve_slot_usage_ratio", model=SLOW_MODEL) == 0.0


# --- rate limits, the cache, prompts in logs: a server of our own -------------------------------------------------


@pytest.fixture(scope="module")
def policy_app(catalog: Catalog, engines: dict[str, Engine]) -> Iterator[tuple[FastAPI, httpx.Client]]:
    tokens = {f"tok-{name}": f"acct-{name}" for name in ("limit", "cache", "log", "replay")}
    policy = Policy.in_memory(default_rpm=2)
    app = create_app(catalog, engines, tokens, policy=policy, log_prompts=True)
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=30) as client:
        yield app, client
    app.state.services.metrics.unwatch_engines()
    policy.close()


def as_account(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer tok-{name}"}


def test_a_429_counts_3021_and_the_rate_limited_counter(policy_app: tuple[FastAPI, httpx.Client]) -> None:
    _app, client = policy_app
    before = scrape(client)
    url = run_url(account="acct-limit")
    codes = []
    for seed in (1, 2, 3):
        resp = client.post(url, headers=as_account("limit"), json={"prompt": STORY, "max_tokens": 2, "seed": seed})
        codes.append(resp.status_code if resp.status_code == 200 else resp.json()["errors"][0]["code"])
    assert codes == [200, 200, 3021]
    after = scrape(client)
    assert delta(before, after, "int8serve_errors_total", code="3021", status="429") == 1
    assert delta(before, after, "int8serve_rate_limited_requests_total", model=MODEL, code="3021") == 1
    assert delta(before, after, "int8serve_http_requests_total", route=RUN_ROUTE, status="429") == 1
    assert delta(before, after, "int8serve_http_requests_total", route=RUN_ROUTE, status="200") == 2
    assert delta(before, after, "int8serve_cache_misses_total", model=MODEL) == 2


def test_a_streamed_cache_hit_is_logged_as_a_stream(policy_app: tuple[FastAPI, httpx.Client],
                                                    caplog: pytest.LogCaptureFixture) -> None:
    """Found by an audit: the replay of a cache hit was logged with `stream: false`."""
    _app, client = policy_app
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    body = {"prompt": STORY, "max_tokens": 3, "seed": 11, "raw": True, "stream": True}
    ids, statuses = [], []
    for _ in range(2):
        with client.stream("POST", run_url(account="acct-replay"), headers=as_account("replay"), json=body) as resp:
            resp.read()
        ids.append(resp.headers["cf-ai-req-id"])
        statuses.append(resp.headers["cf-aig-cache-status"])
    assert statuses == ["MISS", "HIT"]
    wait_for(lambda: all(request_records(caplog, i) for i in ids), "both log lines")
    fields = [request_records(caplog, i)[0].fields for i in ids]  # type: ignore[attr-defined]
    assert [(f["cached"], f["stream"]) for f in fields] == [(False, True), (True, True)]


def test_cache_hits_and_misses(policy_app: tuple[FastAPI, httpx.Client]) -> None:
    _app, client = policy_app
    before = scrape(client)
    body = {"prompt": STORY, "max_tokens": 3, "seed": 7, "raw": True}
    first = client.post(run_url(account="acct-cache"), headers=as_account("cache"), json=body)
    second = client.post(run_url(account="acct-cache"), headers=as_account("cache"), json=body)
    assert [first.headers["cf-aig-cache-status"], second.headers["cf-aig-cache-status"]] == ["MISS", "HIT"]
    after = scrape(client)
    assert delta(before, after, "int8serve_cache_misses_total", model=MODEL) == 1
    assert delta(before, after, "int8serve_cache_hits_total", model=MODEL) == 1
    # the hit was answered (latency observed) but the engine generated nothing for it
    assert delta(before, after, "int8serve_e2e_request_latency_seconds_count", model=MODEL) == 2
    usage = first.json()["result"]["usage"]
    assert delta(before, after, "int8serve_generation_tokens_total", model=MODEL) == usage["completion_tokens"]
    assert value(after, "int8serve_fallback_outages_total") == 0  # no Redis: never lost


# --- the request log line -----------------------------------------------------------------------------------------


def request_records(caplog: pytest.LogCaptureFixture, request_id: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == REQUEST_LOGGER and request_id in r.getMessage()]


def test_one_log_line_per_request_without_the_prompt(http: httpx.Client, auth: dict[str, str],
                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    resp = http.post(run_url(), headers=auth, json={"prompt": SECRET_PROMPT, "max_tokens": 6, "seed": 3})
    assert resp.status_code == 200
    request_id = resp.headers["cf-ai-req-id"]
    records = request_records(caplog, request_id)
    assert len(records) == 1
    fields: dict[str, Any] = records[0].fields  # type: ignore[attr-defined]
    usage = resp.json()["result"]["usage"]
    assert fields["request_id"] == request_id
    assert (fields["account"], fields["model"], fields["status"], fields["error_code"]) == (ACCOUNT, MODEL, 200, None)
    assert (fields["prompt_tokens"], fields["completion_tokens"]) == (usage["prompt_tokens"],
                                                                      usage["completion_tokens"])
    assert fields["neurons"] == pytest.approx(float(resp.headers["cf-ai-neurons"]), abs=1e-3)
    assert fields["cached"] is False and fields["outcome"] == "ok"
    assert fields["queue_s"] >= 0 and 0 <= fields["ttft_s"] <= fields["total_s"]
    response_text = resp.json()["result"]["response"]
    for record in caplog.records:  # no logger at all saw the prompt or the answer
        text = record.getMessage() + json.dumps(getattr(record, "fields", {}), default=str)
        assert "Quillfeather" not in text
        assert not response_text.strip() or response_text not in text
    # both formats: a readable key=value line, or one JSON object
    line = TextFormatter().format(records[0])
    assert f"request_id={request_id}" in line and "status=200" in line
    parsed = json.loads(JsonFormatter().format(records[0]))
    assert parsed["request_id"] == request_id and parsed["logger"] == REQUEST_LOGGER
    assert "prompt" not in parsed and "response" not in parsed


def test_errors_are_logged_with_their_code_as_json(http: httpx.Client, auth: dict[str, str],
                                                   caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    resp = http.post(run_url(), headers=auth, json={"prompt": SECRET_PROMPT, "max_tokens": "many"})
    assert resp.status_code == 400
    [record] = request_records(caplog, resp.headers["cf-ai-req-id"])
    lines = JsonFormatter().format(record).splitlines()
    assert len(lines) == 1
    parsed = json.loads(lines[0])
    assert (parsed["status"], parsed["error_code"], parsed["outcome"]) == (400, 5006, "rejected")
    assert "Quillfeather" not in lines[0]


def test_every_answer_has_one_log_line_with_its_request_id(http: httpx.Client, auth: dict[str, str],
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """Found by an audit: the request ids of 401, 403 and 404 answers were in no log line (only inference requests
    had one). Each answer has exactly one, an inference request still one."""
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    search = f"/client/v4/accounts/{ACCOUNT}/ai/models/search"
    answers = {  # the inference request first: a second line of it would be written by the time the others' are
        "run": http.post(run_url(), headers=auth, json={"prompt": STORY, "max_tokens": 2}),
        "401": http.get(search, headers={"Authorization": "Bearer not-a-known-token"}),
        "403": http.get(f"/client/v4/accounts/{OTHER_ACCOUNT}/ai/models/search", headers=auth),
        "404": http.get("/no/such/route", headers=auth),
        "200": http.get(search, headers=auth),
    }
    ids = {name: resp.headers["cf-ai-req-id"] for name, resp in answers.items()}
    wait_for(lambda: all(request_records(caplog, i) for i in ids.values()), "the log lines")  # (written after)
    lines = {name: request_records(caplog, i) for name, i in ids.items()}
    assert {name: len(records) for name, records in lines.items()} == dict.fromkeys(answers, 1)
    fields = {name: records[0].fields for name, records in lines.items()}  # type: ignore[attr-defined]
    route = "/client/v4/accounts/{account_id}/ai/models/search"
    assert {k: fields["401"][k] for k in ("route", "status", "error_code", "outcome", "account")} == {
        "route": route, "status": 401, "error_code": 10000, "outcome": "rejected", "account": None}
    assert (fields["403"]["status"], fields["403"]["error_code"]) == (403, 10000)
    assert (fields["404"]["route"], fields["404"]["status"], fields["404"]["error_code"]) == ("unmatched", 404, 7000)
    assert (fields["200"]["account"], fields["200"]["status"], fields["200"]["outcome"]) == (ACCOUNT, 200, "ok")
    assert all(f["total_s"] >= 0 for f in fields.values())
    assert (fields["run"]["model"], fields["run"]["status"]) == (MODEL, 200)  # the inference line, not a second one
    assert [r.levelno for r in lines["401"]] == [logging.INFO]


def test_probes_are_logged_at_debug_only(http: httpx.Client, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=REQUEST_LOGGER)
    ids = [http.get(path).headers["cf-ai-req-id"] for path in ("/healthz", "/readyz", "/metrics")]
    wait_for(lambda: all(request_records(caplog, i) for i in ids), "the log lines")  # (written after the answer)
    levels = [[r.levelno for r in request_records(caplog, i)] for i in ids]
    assert levels == [[logging.DEBUG]] * 3


def test_a_client_that_leaves_is_logged_aborted_at_info_and_no_frame_is_counted(
        http: httpx.Client, base_url: str, server: LiveServer, auth: dict[str, str], engines: dict[str, Engine],
        caplog: pytest.LogCaptureFixture) -> None:
    """Found by an audit: a client leaving mid-stream was logged WARNING 200/3008 and counted as an error frame
    never sent, and one leaving mid-body as an answered 400/3003. Both are the client gone: outcome aborted, 3008,
    INFO, as a client leaving a collected request; a stream's missing frame is not counted."""
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    before = scrape(http)
    body = {"prompt": STORY, "raw": True, "max_tokens": 200, "temperature": 0, "stream": True}
    with httpx.Client(base_url=base_url, timeout=30) as streamer, \
            streamer.stream("POST", run_url(SLOW_MODEL), headers=auth, json=body) as resp:
        request_id = resp.headers["cf-ai-req-id"]
        next(line for line in resp.iter_lines() if line.startswith("data: "))  # generating now: leave
    payload = json.dumps({"prompt": STORY, "max_tokens": 4}).encode()
    with socket.create_connection(("127.0.0.1", server.port)) as sock:  # the body is never all sent
        sock.sendall(f"POST {run_url()} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                     f"Content-Length: {len(payload) + 10}\r\n\r\n".encode() + payload)
        time.sleep(0.2)
    wait_for(lambda: request_records(caplog, request_id), "the stream's log line")
    wait_for(lambda: [r for r in caplog.records if getattr(r, "fields", {}).get("status") == 408], "the body's")
    wait_idle(engines)
    after = scrape(http)
    stream_line = request_records(caplog, request_id)
    (body_line,) = [r for r in caplog.records if getattr(r, "fields", {}).get("status") == 408]
    for record, status in ((stream_line[0], 200), (body_line, 408)):
        fields = record.fields  # type: ignore[attr-defined]
        assert (record.levelno, fields["status"], fields["error_code"], fields["outcome"]) == (
            logging.INFO, status, 3008, "aborted")
    assert len(stream_line) == 1 and stream_line[0].fields["stream"] is True  # type: ignore[attr-defined]
    assert delta(before, after, "int8serve_errors_total", code="3008", status="200") == 0
    assert delta(before, after, "int8serve_errors_total", code="3003", status="400") == 0
    assert delta(before, after, "int8serve_errors_total", code="3008", status="408") == 1


def test_log_prompts_adds_prompt_and_response(policy_app: tuple[FastAPI, httpx.Client],
                                              caplog: pytest.LogCaptureFixture) -> None:
    _app, client = policy_app
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    body = {"prompt": SECRET_PROMPT, "max_tokens": 4, "seed": int(uuid.uuid4().int % 1000) + 1}
    resp = client.post(run_url(account="acct-log"), headers=as_account("log"), json=body)
    assert resp.status_code == 200
    [record] = request_records(caplog, resp.headers["cf-ai-req-id"])
    parsed = json.loads(JsonFormatter().format(record))
    assert parsed["prompt"] == SECRET_PROMPT
    assert parsed["response"] == resp.json()["result"]["response"]


def test_serve_flags_and_json_log_lines(capsys: pytest.CaptureFixture[str]) -> None:
    from int8serve.cli import serve_settings
    from int8serve.service.request_log import configure_logging, log_request

    defaults = serve_settings([]).settings
    assert (defaults.log_format, defaults.log_prompts) == ("text", False)  # prompts are never logged by default
    args = serve_settings(["--log-format", "json", "--log-prompts"]).settings
    assert (args.log_format, args.log_prompts) == ("json", True)
    logger = logging.getLogger("int8serve")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    try:
        configure_logging("json", "info")
        log_request({"request_id": "r-1", "status": 200, "error_code": None})
        logging.getLogger("int8serve.engine").warning("plain %s", "message")
    finally:
        logger.handlers, logger.level, logger.propagate = saved
    lines = capsys.readouterr().err.splitlines()
    parsed = [json.loads(line) for line in lines]
    assert parsed[0]["request_id"] == "r-1" and parsed[0]["logger"] == REQUEST_LOGGER
    assert parsed[1]["message"] == "plain message" and parsed[1]["level"] == "WARNING"
