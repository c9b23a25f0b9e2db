"""The lifecycle gate: what clients see while the model loads and while the server drains (in-process; the real
SIGTERM path is in tests/test_server.py)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from prometheus_client.parser import text_string_to_metric_families

from int8serve.catalog.registry import Catalog
from int8serve.engine.scheduler import Engine
from int8serve.service.app import create_app, loading_app
from int8serve.service.errors import INTERNAL, SHUTTING_DOWN, ApiError
from int8serve.service.lifecycle import Lifecycle, LifecycleMiddleware, Phase
from int8serve.service.metrics import LoadingMetrics, ServiceMetrics
from int8serve.service.policy import Policy

from .conftest import ACCOUNT, MODEL, SLOW_MODEL, TOKENS, LiveServer
from .test_errors import assert_error


@pytest.fixture
def loading_url() -> Iterator[str]:
    with LiveServer(LifecycleMiddleware(None, Lifecycle(Phase.LOADING))) as live:
        yield live.url


def test_while_loading_only_healthz_is_200(loading_url: str) -> None:
    assert httpx.get(f"{loading_url}/healthz").json() == {"status": "ok"}
    ready = httpx.get(f"{loading_url}/readyz")
    assert ready.status_code == 503 and ready.headers["retry-after"] == "1"
    assert ready.json()["errors"] == [{"code": 3040, "message": "Not ready: the model is loading"}]
    run = httpx.post(f"{loading_url}/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}", json={"prompt": "x"})
    assert run.status_code == 503 and run.json()["errors"][0]["code"] == 3040
    openai = httpx.post(f"{loading_url}/v1/chat/completions", json={})
    assert openai.status_code == 503
    assert openai.json()["error"] == {"message": "Not ready: the model is loading", "type": "capacity_error",
                                      "param": None, "code": 3040}


@pytest.mark.parametrize("metrics_token", [None, "scrape-secret"])
def test_while_loading_metrics_answer_200_and_say_so(metrics_token: str | None) -> None:
    """A 7B loads for minutes: a Prometheus scraper given 503s meanwhile marks the target down and alerts. /metrics
    answers what exists (the phase, the process, the ledger), behind the same --metrics-token; /readyz stays 503."""
    lifecycle = Lifecycle(Phase.LOADING)
    policy = Policy.in_memory()
    metrics = LoadingMetrics(ServiceMetrics(policy=policy, lifecycle=lifecycle), metrics_token)
    headers = {"Authorization": f"Bearer {metrics_token}"} if metrics_token else {}
    try:
        with LiveServer(LifecycleMiddleware(None, lifecycle, metrics=metrics)) as live:
            scraped = httpx.get(f"{live.url}/metrics", headers=headers)
            readyz = httpx.get(f"{live.url}/readyz")
            posted = httpx.post(f"{live.url}/metrics", headers=headers)  # only a scrape's methods, as once ready
            refused = httpx.get(f"{live.url}/metrics", headers={"Authorization": "Bearer wrong"})
            lifecycle.start_draining()  # a signal while loading
            draining = httpx.get(f"{live.url}/metrics", headers=headers)
    finally:
        policy.close()
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain")
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for family in text_string_to_metric_families(scraped.text) for s in family.samples}
    assert [labels for (name, labels), v in samples.items() if name == "int8serve_phase" and v == 1] == \
        [(("phase", "loading"),)]
    assert samples[("int8serve_phase", (("phase", "ready"),))] == 0
    assert samples[("process_resident_memory_bytes", ())] > 0
    assert samples[("int8serve_ledger_spooled_rows", ())] == 0
    assert readyz.status_code == 503 and readyz.json()["errors"][0]["message"] == "Not ready: the model is loading"
    assert posted.status_code == 503 and posted.json()["errors"][0]["message"] == "Not ready: the model is loading"
    assert refused.status_code == (401 if metrics_token else 200)
    if metrics_token:
        assert refused.json()["errors"][0]["code"] == 10000
    assert draining.status_code == 200 and 'int8serve_phase{phase="draining"} 1.0' in draining.text


def test_answers_while_loading_are_counted_and_the_app_counts_on(catalog: Catalog, engines: dict[str, Engine]) -> None:
    """Found by an audit: the gate's answers while the model loaded were counted nowhere (no metrics middleware,
    and metrics the app never saw). `loading_app` counts them, with request ids, in the metrics `create_app` then
    goes on counting in."""
    lifecycle = Lifecycle(Phase.LOADING)
    policy = Policy.in_memory()
    metrics = ServiceMetrics(policy=policy, lifecycle=lifecycle)
    scraper = {"Authorization": "Bearer scrape-secret"}
    run = f"/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}"
    try:
        with LiveServer(loading_app(lifecycle, metrics, "scrape-secret")) as live:  # type: ignore[arg-type]
            answers = [httpx.get(f"{live.url}/readyz"), httpx.post(f"{live.url}{run}", json={"prompt": "x"}),
                       httpx.get(f"{live.url}/metrics")]
            loading = counted(httpx.get(f"{live.url}/metrics", headers=scraper).text)
        app = create_app(catalog, engines, TOKENS, policy=policy, lifecycle=lifecycle, metrics=metrics,
                         metrics_token="scrape-secret")
        lifecycle.mark_ready()
        with LiveServer(app) as live:
            ready = counted(httpx.get(f"{live.url}/metrics", headers=scraper).text)
        app.state.services.metrics.unwatch_engines()
    finally:
        policy.close()
    assert [a.status_code for a in answers] == [503, 503, 401]
    assert all(a.headers["cf-ai-req-id"] for a in answers)
    run_route = "/client/v4/accounts/{account_id}/ai/run/{model:path}"
    expected = {("int8serve_http_requests_total", (("route", "/readyz"), ("status", "503"))): 1,
                ("int8serve_http_requests_total", (("route", run_route), ("status", "503"))): 1,
                ("int8serve_http_requests_total", (("route", "/metrics"), ("status", "401"))): 1,
                ("int8serve_errors_total", (("code", "3040"), ("status", "503"))): 2,
                ("int8serve_errors_total", (("code", "10000"), ("status", "401"))): 1}
    assert {key: loading.get(key) for key in expected} == expected
    assert {key: ready.get(key) for key in expected} == expected  # the same metrics, once ready
    assert ready[("int8serve_http_requests_total", (("route", "/metrics"), ("status", "200")))] == 1  # loading's scrape
    assert ready[("int8serve_slots", (("model", MODEL),))] == 4


def counted(exposition: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(exposition) for s in family.samples}


def test_a_ready_server_says_its_phase_in_metrics(http: httpx.Client) -> None:
    scraped = http.get("/metrics").text
    assert 'int8serve_phase{phase="ready"} 1.0' in scraped and 'int8serve_phase{phase="loading"} 0.0' in scraped
    assert "process_cpu_seconds_total" in scraped


@pytest.fixture
def draining(app: FastAPI) -> Iterator[Lifecycle]:
    lifecycle: Lifecycle = app.state.services.lifecycle
    yield lifecycle
    lifecycle.mark_ready()


def test_drain_lets_a_stream_finish_and_refuses_new_requests(http: httpx.Client, auth: dict[str, str],
                                                             draining: Lifecycle) -> None:
    url = f"/client/v4/accounts/{ACCOUNT}/ai/run/{SLOW_MODEL}"  # ~25 ms per token: 40 tokens last ~1 s
    with http.stream("POST", url, headers=auth, json={"prompt": "Once upon a time", "raw": True, "stream": True,
                                                      "max_tokens": 40}) as streamed:
        lines = streamed.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        assert draining.in_flight == 2  # the HTTP exchange, and the engine request it follows (to its ledger row)
        draining.start_draining()
        idle = threading.Event()
        waiter = threading.Thread(target=lambda: draining.wait_idle(30) and idle.set())
        waiter.start()
        refused = http.post(f"/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}", headers=auth, json={"prompt": "x"})
        refused_openai = http.post("/v1/completions", headers=auth, json={"model": MODEL, "prompt": "x"})
        probes = [http.get(path).status_code for path in ("/healthz", "/readyz", "/metrics")]
        assert not idle.is_set()  # the stream is still in flight
        frames = [line for line in lines if line.startswith("data: ")]
    waiter.join(30)
    assert idle.is_set() and draining.in_flight == 0
    assert frames[-1] == "data: [DONE]" and '"completion_tokens":40' in frames[-2]
    assert_error(refused, 503, 3040, "Not ready: the server is shutting down", ai=False)
    assert refused.headers["retry-after"] == "1"
    assert refused_openai.status_code == 503 and refused_openai.json()["error"]["code"] == 3040
    assert probes == [200, 503, 200]


def test_the_cut_ends_what_no_engine_has_yet(catalog: Catalog, engines: dict[str, Engine], auth: dict[str, str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """The drain's end (`Lifecycle.cut`): a request whose large body the worker process is still checking ends at
    once with the drain's refusal, and a request that comes after it is refused at once, in its route's shape (a
    body still being sent: tests/test_server.py)."""
    lifecycle = Lifecycle()
    policy = Policy.in_memory()
    app = create_app(catalog, engines, TOKENS, policy=policy, lifecycle=lifecycle)
    in_worker, release = threading.Event(), threading.Event()

    def slow_worker(*args: Any) -> Any:  # the worker process, taking its time over a body
        in_worker.set()
        release.wait(30)
        raise ApiError(INTERNAL)

    monkeypatch.setattr(app.state.services.inference.workers, "_call", slow_worker)
    body = json.dumps({"prompt": "Once upon a time", "raw": True, "max_tokens": 4})
    large = (body[:-1] + " " * 70_000 + "}").encode()  # over 64 KiB: checked in the worker process
    answers: list[httpx.Response] = []
    try:
        with LiveServer(app) as live:
            def send() -> None:
                answers.append(httpx.post(f"{live.url}/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}", headers=auth,
                                          content=large, timeout=30))

            sender = threading.Thread(target=send)
            sender.start()
            assert in_worker.wait(30), "the body never reached the worker"
            cut = time.monotonic()
            lifecycle.cut()
            sender.join(30)
            waited = time.monotonic() - cut
            after = httpx.post(f"{live.url}/v1/completions", headers=auth, json={"model": MODEL, "prompt": "x"},
                               timeout=30)
    finally:
        release.set()
        app.state.services.metrics.unwatch_engines()
        policy.close()
    assert waited < 1, waited  # not when the worker is done with it
    (answer,) = answers
    assert_error(answer, 503, 3040, "Not ready: the server is shutting down", ai=False)
    assert answer.headers["retry-after"] == "1"
    assert after.status_code == 503 and after.headers["retry-after"] == "1"
    assert after.json()["error"] == {"message": "Not ready: the server is shutting down", "type": "capacity_error",
                                     "param": None, "code": 3040}


def test_until_cut_ends_its_block_at_the_cut_and_refuses_after_it() -> None:
    """A block waiting when another thread calls `cut` ends with the drain's refusal; one entered after it is refused
    at once; a TimeoutError of the block's own is left as it is."""
    lifecycle = Lifecycle()

    async def blocks() -> list[object]:
        async def guarded(seconds: float, timeout: float | None = None) -> object:
            try:
                async with lifecycle.until_cut(), asyncio.timeout(timeout):
                    await asyncio.sleep(seconds)
            except (ApiError, TimeoutError) as err:
                return err
            return None

        assert isinstance(await guarded(10, timeout=0.01), TimeoutError)
        waiting = asyncio.create_task(guarded(10))
        await asyncio.sleep(0.05)
        threading.Thread(target=lifecycle.cut).start()
        return [await asyncio.wait_for(waiting, 5), await guarded(0)]

    for refusal in asyncio.run(blocks()):
        assert isinstance(refusal, ApiError) and refusal.kind is SHUTTING_DOWN, refusal
        assert refusal.headers == {"retry-after": "1"}


def test_wait_idle_times_out_with_requests_in_flight() -> None:
    lifecycle = Lifecycle()
    lifecycle._enter()
    assert lifecycle.wait_idle(0.05) is False
    lifecycle._leave()
    assert lifecycle.wait_idle(0.05) is True


@pytest.mark.parametrize("path", ["/v1/chat/completions", f"/client/v4/accounts/{ACCOUNT}/ai/v1/completions"])
def test_wrong_method_on_openai_routes_gets_an_openai_error(http: httpx.Client, path: str) -> None:
    resp = http.get(path)
    assert resp.status_code == 405 and "POST" in resp.headers["allow"]
    assert resp.json()["error"] == {"message": "Method GET not allowed here", "type": "invalid_request_error",
                                    "param": None, "code": 7000}
    unknown = http.get("/v1/nothing-here")
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "not_found_error"
