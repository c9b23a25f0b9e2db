"""The playground page in a real headless Chromium against live servers of the stories260K int8 model.

The browser is Debian's `/usr/bin/chromium`, driven by Playwright (which never downloads a browser here). Without
it these tests fail, loudly: they are the only check that the page works at all.

What is checked: connecting with only a token (account from `GET /client/v4/accounts`, models from
`models/search`, parameter limits from the card's schema, those of the model picked last however late the answers
come), a streamed answer that grows on screen before it ends, its figures (tokens, time to first token, tokens/s,
neurons) against the API's own answer, the conversation sent back with each turn (and none after New chat, even one
clicked mid-answer), the token sent nowhere but this origin's `Authorization` header, readable messages for a wrong
token, a rate limit (429/3021), too many requests at once (429/3040), a context overflow (413/5021) and stream
failures, and model output shown as text, never as HTML. `/docs`, the API's page in the same package, lists the
routes with nothing from elsewhere.

Set `INT8SERVE_TEST_PLAYGROUND_SCREENSHOT=docs/playground.png` to refresh the documentation's screenshot.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from fastapi import FastAPI
from playwright.sync_api import Browser, Page, Request, Route, expect, sync_playwright

from int8serve.catalog.registry import Catalog
from int8serve.engine.scheduler import Engine
from int8serve.service.app import create_app
from int8serve.service.inference import RequestLimits
from int8serve.service.policy import Policy

from .conftest import ACCOUNT, MODEL, SLOW_MODEL, TOKEN, TOKENS, UNSERVED_MODEL, LiveServer

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
SCREENSHOT_ENV = "INT8SERVE_TEST_PLAYGROUND_SCREENSHOT"
TIMEOUT_MS = 20_000
CARD_NEURON_COST = 0.1836
SYSTEM_PROMPT = "You are a storyteller for small children."
FIRST_QUESTION = "Tell me a story about a little cat."
SECOND_QUESTION = "What happened next?"


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: the playground's browser tests need Debian's chromium "
                    "(`apt-get install chromium`; .ci/run installs it)", pytrace=False)
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


class Playground:
    """One browser tab on the playground page of the server at `base_url`, recording what the page asks for."""

    def __init__(self, page: Page, base_url: str) -> None:
        self.page = page
        self.base_url = base_url
        self.requests: list[Request] = []
        self.console_errors: list[str] = []
        page.on("request", lambda request: self.requests.append(request))
        page.on("pageerror", lambda err: self.console_errors.append(str(err)))
        page.on("console", self._console)
        page.set_default_timeout(TIMEOUT_MS)

    def _console(self, message: Any) -> None:
        # a refused API call logs "Failed to load resource: ... 401": expected; anything else is a page error
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            self.console_errors.append(message.text)

    def open(self) -> Playground:
        self.page.goto(self.base_url + "/")
        expect(self.page.locator("html")).to_have_attribute("data-ready", "true")
        return self

    def connect(self, token: str) -> None:
        self.page.get_by_label("API token").fill(token)
        self.page.get_by_role("button", name="Connect").click()

    def connected(self) -> None:
        expect(self.page.locator("#connect-status")).to_have_text(f"Connected: account {ACCOUNT}.")
        expect(self.page.get_by_role("button", name="Send")).to_be_enabled()

    def parameter(self, name: str) -> Any:
        return self.page.get_by_label(name, exact=True)

    def send(self, text: str) -> None:
        self.page.get_by_label("Message").fill(text)
        self.page.get_by_role("button", name="Send").click()

    @property
    def answer(self) -> Any:
        return self.page.locator("#history .turn.assistant").last

    def wait_answer(self, state: str = "done") -> Any:
        expect(self.answer).to_have_attribute("data-state", state)
        return self.answer

    def figure(self, name: str) -> Any:
        return self.answer.locator(f'[data-figure="{name}"]')

    def figure_value(self, name: str) -> float:
        return float(self.figure(name).get_attribute("data-value") or "nan")

    def run_bodies(self) -> list[dict[str, Any]]:
        return [json.loads(r.post_data or "null") for r in self.requests if "/ai/run/" in r.url]


@pytest.fixture
def open_playground(browser: Browser) -> Iterator[Any]:
    contexts = []
    tabs: list[Playground] = []

    def open_on(base_url: str) -> Playground:
        context = browser.new_context(viewport={"width": 1280, "height": 860})
        contexts.append(context)
        tab = Playground(context.new_page(), base_url)
        tabs.append(tab)
        return tab.open()

    yield open_on
    for context in contexts:
        context.close()
    for tab in tabs:
        assert tab.console_errors == [], tab.console_errors


def api_answer(base_url: str, body: dict[str, Any]) -> httpx.Response:
    with httpx.Client(base_url=base_url, timeout=30) as client:
        resp = client.post(f"/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}", json=body,
                           headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status_code == 200, resp.text
    return resp


# --- a conversation ------------------------------------------------------------------------------------------------


def test_conversation_streams_answers_with_their_figures(open_playground: Any, base_url: str, tmp_path: Path,
                                                         engines: dict[str, Engine]) -> None:
    tab: Playground = open_playground(base_url)
    page = tab.page
    expect(page.get_by_role("button", name="Send")).to_be_disabled()
    tab.connect(TOKEN)
    tab.connected()

    # the picker lists the served models (not the card without an engine), the limits come from the card
    options = page.locator("#model option").all_text_contents()
    assert sorted(options) == sorted(engines) and UNSERVED_MODEL not in options
    page.get_by_label("Model", exact=True).select_option(MODEL)
    max_tokens = tab.parameter("max_tokens")
    expect(max_tokens).to_have_attribute("max", "1800")  # the card's sequence_length_limit
    expect(max_tokens).to_have_attribute("placeholder", "256")  # the card schema's default
    expect(page.locator("#param-max_tokens-range")).to_have_text("1 – 1800, default 256")
    expect(tab.parameter("temperature")).to_have_attribute("max", "5")
    expect(tab.parameter("top_k")).to_have_attribute("step", "1")

    page.get_by_label("System prompt").fill(SYSTEM_PROMPT)
    max_tokens.fill("48")
    tab.parameter("temperature").fill("0")
    tab.send(FIRST_QUESTION)
    answer = tab.wait_answer()
    first_text = answer.locator(".content").text_content() or ""
    assert first_text.strip()

    # the figures, checked against the API's own (non-streamed) answer to the same greedy request
    first_body = {"messages": [{"role": "system", "content": SYSTEM_PROMPT},
                               {"role": "user", "content": FIRST_QUESTION}], "max_tokens": 48, "temperature": 0}
    reference = api_answer(base_url, first_body)
    result = reference.json()["result"]
    assert first_text == result["response"]
    tokens = tab.figure_value("tokens")
    assert tokens == result["usage"]["completion_tokens"] > 0
    expect(tab.figure("tokens")).to_have_text(f"{int(tokens)} tokens")
    expect(tab.figure("ttft")).to_have_text(re.compile(r"^TTFT \d+ ms$"))
    assert tab.figure_value("ttft") >= 0
    expect(tab.figure("rate")).to_have_text(re.compile(r"^\d+(\.\d)? tok/s$"))
    assert tab.figure_value("rate") > 0
    neurons = tab.figure_value("neurons")
    assert neurons == pytest.approx(float(reference.headers["cf-ai-neurons"]))
    assert neurons == pytest.approx(result["usage"]["total_tokens"] * CARD_NEURON_COST, rel=1e-3)
    expect(tab.figure("neurons")).to_have_text(f"{neurons:.2f} neurons")

    # the second turn carries the conversation; the answer is appended below the first
    tab.send(SECOND_QUESTION)
    tab.wait_answer()
    assert page.locator("#history .turn").count() == 4
    bodies = tab.run_bodies()
    assert bodies[0] == {**first_body, "stream": True}
    assert bodies[1]["messages"] == [*first_body["messages"], {"role": "assistant", "content": first_text},
                                     {"role": "user", "content": SECOND_QUESTION}]
    assert tab.figure_value("tokens") > 0

    # the token went nowhere but this origin's Authorization header
    for request in tab.requests:
        assert request.url.startswith(base_url + "/") or request.url.startswith("data:"), request.url
        assert TOKEN not in request.url and TOKEN not in (request.post_data or "")
        authorization = request.headers.get("authorization")
        assert authorization is None or authorization == f"Bearer {TOKEN}"
    api_calls = [r for r in tab.requests if "/client/v4/" in r.url]
    assert api_calls and all(r.headers.get("authorization") == f"Bearer {TOKEN}" for r in api_calls)
    assert page.evaluate("() => localStorage.length") == 0  # not remembered unless asked

    shot = page.screenshot(path=str(tmp_path / "playground.png"), full_page=True)
    assert shot[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get(SCREENSHOT_ENV):
        Path(os.environ[SCREENSHOT_ENV]).write_bytes(shot)


def test_answer_appears_while_it_streams_and_can_be_stopped(open_playground: Any, base_url: str) -> None:
    """On the slowed model (~25 ms a token), text is on screen before the answer is done; Stop ends it."""
    tab: Playground = open_playground(base_url)
    tab.connect(TOKEN)
    tab.connected()
    tab.page.get_by_label("Model", exact=True).select_option(SLOW_MODEL)
    tab.parameter("max_tokens").fill("60")
    tab.parameter("temperature").fill("0")
    tab.send("Once upon a time")
    streaming = tab.page.wait_for_function(
        """() => {
            const turn = document.querySelector('#history .turn.assistant:last-child');
            const text = turn && turn.querySelector('.content').textContent;
            return turn.dataset.state === 'streaming' && text.length > 0 ? text : null;
        }""")
    partial = streaming.json_value()
    expect(tab.page.get_by_role("button", name="Stop")).to_be_enabled()
    final = tab.wait_answer().locator(".content").text_content() or ""
    assert final.startswith(partial) and len(final) > len(partial)
    assert tab.figure_value("tokens") > 1

    tab.parameter("max_tokens").fill("300")  # ~8 s on the slowed model (fits the 512 context with the template)
    tab.send("Once upon a time there was")
    tab.page.wait_for_function(
        "() => document.querySelector('#history .turn.assistant:last-child .content').textContent.length > 0")
    tab.page.get_by_role("button", name="Stop").click()
    stopped = tab.wait_answer("stopped")
    expect(stopped.get_by_role("alert")).to_have_text("Stopped.")
    expect(tab.page.get_by_role("button", name="Send")).to_be_enabled()


def test_new_chat_while_an_answer_streams_starts_from_nothing(open_playground: Any, base_url: str) -> None:
    """New chat stops the answer; the stopped turn, ended after the conversation was cleared, stays out of it."""
    tab: Playground = open_playground(base_url)
    tab.connect(TOKEN)
    tab.connected()
    tab.page.get_by_label("Model", exact=True).select_option(SLOW_MODEL)
    tab.parameter("max_tokens").fill("300")  # ~8 s on the slowed model
    tab.parameter("temperature").fill("0")
    tab.send(FIRST_QUESTION)
    tab.page.wait_for_function(
        "() => document.querySelector('#history .turn.assistant:last-child .content').textContent.length > 0")
    tab.page.get_by_role("button", name="New chat").click()
    expect(tab.page.get_by_role("button", name="Send")).to_be_enabled()  # the stopped send has ended
    assert tab.page.locator("#history .turn").count() == 0

    tab.page.get_by_label("Model", exact=True).select_option(MODEL)
    tab.parameter("max_tokens").fill("8")
    tab.send(SECOND_QUESTION)
    tab.wait_answer()
    assert tab.page.locator("#history .turn").count() == 2
    assert tab.run_bodies()[-1]["messages"] == [{"role": "user", "content": SECOND_QUESTION}]


# --- errors, as people read them -------------------------------------------------------------------------------------


def test_wrong_token_is_explained(open_playground: Any, base_url: str) -> None:
    tab: Playground = open_playground(base_url)
    status = tab.page.locator("#connect-status")
    tab.connect("not-the-right-token")
    expect(status).to_have_attribute("role", "alert")
    expect(status).to_contain_text("The API token was not recognised. Check it and connect again.")
    expect(status).to_contain_text("(HTTP 401, code 10000: Authentication error)")
    expect(tab.page.get_by_role("button", name="Send")).to_be_disabled()
    assert tab.page.locator("#model option").count() == 0
    # caught in the page, before any request
    calls = len(tab.requests)
    tab.connect("tökén with spaces")
    expect(status).to_have_text("An API token is made of visible ASCII characters, without spaces.")
    tab.connect("")
    expect(status).to_have_text("Enter an API token.")
    assert len(tab.requests) == calls
    # the right token then works
    tab.connect(TOKEN)
    tab.connected()


def test_bad_requests_are_explained(open_playground: Any, base_url: str) -> None:
    tab: Playground = open_playground(base_url)
    tab.connect(TOKEN)
    tab.connected()
    tab.page.get_by_label("Model", exact=True).select_option(MODEL)
    # out of the card's range: refused in the page, nothing sent
    tab.parameter("temperature").fill("9")
    tab.send("Hello")
    expect(tab.page.locator("#compose-status")).to_have_text("temperature must be at least 0 and at most 5.")
    assert tab.run_bodies() == []
    # within the card's limit but beyond this engine's context window (512): the server's 413/5021
    tab.parameter("temperature").fill("")
    tab.parameter("max_tokens").fill("1800")
    tab.page.get_by_role("button", name="Send").click()
    error = tab.wait_answer("error").get_by_role("alert")
    expect(error).to_contain_text("The conversation is too long for the model's context window")
    expect(error).to_contain_text("(HTTP 413, code 5021: AiError: Ai: The estimated number of input and maximum "
                                  "output tokens")
    expect(tab.page.get_by_label("Message")).to_have_value("Hello")  # ready to send again


@pytest.fixture
def one_request_a_minute(catalog: Catalog, engines: dict[str, Engine]) -> Iterator[str]:
    """A server whose policy allows each account one request a minute per model."""
    policy = Policy.in_memory(default_rpm=1, cache=False)
    app: FastAPI = create_app(catalog, engines, TOKENS, policy=policy)
    try:
        with LiveServer(app) as live:
            yield live.url
    finally:
        policy.close()


def test_rate_limit_is_explained(open_playground: Any, one_request_a_minute: str) -> None:
    tab: Playground = open_playground(one_request_a_minute)
    tab.connect(TOKEN)  # listing the account, models and schema does not count against the limit
    tab.connected()
    tab.page.get_by_label("Model", exact=True).select_option(MODEL)
    tab.parameter("max_tokens").fill("8")
    tab.send("Hello")
    tab.wait_answer()
    tab.send("Hello again")
    error = tab.wait_answer("error").get_by_role("alert")
    expect(error).to_contain_text(re.compile(
        r"^Rate limit reached: this account may send 1 request a minute to this model\. Try again in \d+ s\."))
    expect(error).to_contain_text("(HTTP 429, code 3021: rate limiting: inference request per min rate reached)")
    assert tab.page.locator("#history .turn.assistant").count() == 2


@pytest.fixture
def one_request_at_a_time(catalog: Catalog, engines: dict[str, Engine]) -> Iterator[str]:
    """A server that lets each account have one request at a time in a model's engine."""
    policy = Policy.in_memory(rate_limits=False, cache=False)
    app: FastAPI = create_app(catalog, engines, TOKENS, policy=policy,
                              limits=RequestLimits(max_inflight_per_account=1))
    try:
        with LiveServer(app) as live:
            yield live.url
    finally:
        policy.close()


def test_too_many_requests_at_once_is_explained(open_playground: Any, one_request_at_a_time: str) -> None:
    """429/3040 answers an account over its share of the engine (here: its queue has room) as it answers a full
    engine, with the same words: the sentence is true of both."""
    tab: Playground = open_playground(one_request_at_a_time)
    tab.connect(TOKEN)
    tab.connected()
    tab.page.get_by_label("Model", exact=True).select_option(SLOW_MODEL)
    tab.parameter("max_tokens").fill("8")
    with httpx.Client(base_url=one_request_at_a_time, timeout=30) as http, \
            http.stream("POST", f"/client/v4/accounts/{ACCOUNT}/ai/run/{SLOW_MODEL}",
                        headers={"Authorization": f"Bearer {TOKEN}"},
                        json={"prompt": "Once upon a time", "max_tokens": 300, "stream": True}) as held:
        assert held.status_code == 200  # the account's one request, admitted: ~8 s on the slowed model
        tab.send("Hello")
        error = tab.wait_answer("error").get_by_role("alert")
        expect(error).to_have_text("Too many requests at once: this account already has as many requests in progress "
                                   "as the server allows it, or the server is full. Try again in a moment. "
                                   "(HTTP 429, code 3040: Capacity temporarily exceeded, please try again.)")
    expect(tab.page.get_by_label("Message")).to_have_value("Hello")  # ready to send again


# --- what the page does with odd streams (served by the browser's request interception) --------------------------

HOSTILE_TEXT = '<img src=x onerror="window.__pwned = 1"><script>window.__pwned = 2</script> & <b>bold</b>'


def _sse(*payloads: Any) -> str:
    return "".join(f"data: {p if isinstance(p, str) else json.dumps(p)}\n\n" for p in payloads)


USAGE = {"response": "", "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8, "neurons": 1.4688}}


@pytest.mark.parametrize(("stream", "state", "shown", "message"), [
    (_sse({"response": HOSTILE_TEXT}, USAGE, "[DONE]"), "done", HOSTILE_TEXT, None),
    (_sse({"response": "Once"}, {"response": "", "errors": [{"code": 3043, "message": "Internal server error"}]}),
     "error", "Once", "The server failed while answering (internal error). Try again. "
                      "(in the stream, code 3043: Internal server error)"),
    (_sse({"response": "Once"}, {"response": " upon"}), "error", "Once upon",
     "The answer was cut off: the stream ended before the server finished."),
    (_sse({"response": "Once"}, {"response": "", "errors": [{"code": 3040, "message": "Not ready: the server is "
                                                                                      "shutting down"}]}),
     "error", "Once", "The server is shutting down and ended this answer before it finished. Try again in a moment. "
                      "(in the stream, code 3040: Not ready: the server is shutting down)"),
], ids=["html-is-text", "error-frame", "cut-off", "drain-frame"])
def test_stream_contents_are_shown_as_text(open_playground: Any, base_url: str, stream: str, state: str,
                                           shown: str, message: str | None) -> None:
    tab: Playground = open_playground(base_url)
    tab.connect(TOKEN)
    tab.connected()

    def fake_stream(route: Route) -> None:
        route.fulfill(status=200, headers={"content-type": "text/event-stream"}, body=stream)

    tab.page.route(re.compile(r".*/ai/run/.*"), fake_stream)
    tab.send("Say something")
    answer = tab.wait_answer(state)
    expect(answer.locator(".content")).to_have_text(shown)
    assert answer.locator(".content *").count() == 0  # no element made from the text
    assert tab.page.evaluate("() => window.__pwned") is None
    if message is None:
        assert tab.figure_value("tokens") == 3 and tab.figure_value("neurons") == pytest.approx(1.4688)
    else:
        expect(answer.get_by_role("alert")).to_have_text(message)


# counts the API answers whose body the page has read, each once all that the page does with it (its promise
# continuations) has run: a later count proves that an answer was applied, or dropped
COUNT_ANSWERS_READ = """
    window.__answersRead = 0;
    for (const method of ["json", "text"]) {
        const read = Response.prototype[method];
        Response.prototype[method] = function () {
            const reading = read.call(this);
            const counted = () => setTimeout(() => { window.__answersRead += 1; });
            reading.then(counted, counted);
            return reading;
        };
    }
"""
LATE_LIMITS = {"type": "integer", "minimum": 1, "maximum": 7, "default": 3}


@pytest.mark.parametrize(("status", "late_answer"), [
    (200, {"success": True, "errors": [], "messages": [],
           "result": {"input": {"type": "object", "properties": {"max_tokens": LATE_LIMITS}}, "output": {}}}),
    (500, {"success": False, "errors": [{"code": 3043, "message": "Internal server error"}], "messages": [],
           "result": None}),
], ids=["other-limits", "failure"])
def test_limits_are_those_of_the_model_picked_last(open_playground: Any, base_url: str, status: int,
                                                   late_answer: dict[str, Any]) -> None:
    """A model's schema (or its failure) that arrives after another model was picked changes nothing."""
    tab: Playground = open_playground(base_url)
    tab.page.add_init_script(COUNT_ANSWERS_READ)
    tab.open()
    tab.connect(TOKEN)
    tab.connected()
    held: list[Route] = []

    def hold_slow_schema(route: Route) -> None:
        if parse_qs(urlsplit(route.request.url).query)["model"] == [SLOW_MODEL]:
            held.append(route)
        else:
            route.continue_()

    tab.page.route(re.compile(r".*/ai/models/schema\?.*"), hold_slow_schema)
    read = tab.page.evaluate("() => window.__answersRead")
    picker = tab.page.get_by_label("Model", exact=True)
    picker.select_option(SLOW_MODEL)
    picker.select_option(MODEL)
    tab.page.wait_for_function("read => window.__answersRead === read + 1", arg=read)  # the picked model's
    range_shown = tab.page.locator("#param-max_tokens-range")
    expect(range_shown).to_have_text("1 – 1800, default 256")
    assert len(held) == 1
    held[0].fulfill(status=status, json=late_answer)  # the slow model's, late
    tab.page.wait_for_function("read => window.__answersRead === read + 2", arg=read)
    expect(range_shown).to_have_text("1 – 1800, default 256")
    expect(tab.parameter("max_tokens")).to_have_attribute("max", "1800")
    expect(tab.page.locator("#connect-status")).to_have_text(f"Connected: account {ACCOUNT}.")
    tab.parameter("max_tokens").fill("8")  # beyond the late schema's 7: checked against the picked model's limit
    tab.send("Hello")
    tab.wait_answer()
    assert tab.run_bodies()[-1]["max_tokens"] == 8


def test_remembered_token_reconnects(open_playground: Any, base_url: str) -> None:
    tab: Playground = open_playground(base_url)
    tab.page.get_by_label("Remember the token on this device").check()
    tab.connect(TOKEN)
    tab.connected()
    assert tab.page.evaluate("() => Object.values(localStorage)") == [TOKEN]
    tab.page.reload()
    expect(tab.page.get_by_label("API token")).to_have_value(TOKEN)
    tab.connected()
    tab.page.get_by_label("Remember the token on this device").uncheck()
    assert tab.page.evaluate("() => localStorage.length") == 0


# --- behind a reverse proxy that serves the server under a path prefix -------------------------------------------

PREFIX = "/int8serve"
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "date", "server"}


class PrefixProxy:
    """`upstream` served under `PREFIX`, the prefix stripped (nginx's `location /int8serve/ { proxy_pass
    http://upstream/; }`); anything outside the prefix is 404. `PREFIX` alone, without its slash, is forwarded as
    `/`, as Traefik's StripPrefix and Caddy's `handle_path /int8serve*` do (nginx answers it with a redirect of its
    own). Answers are streamed on, chunk by chunk.
    `cut_streams`: the connection of an `/ai/run` answer is closed after its first chunk, as a network failure
    would (the browser then reads a chunked body that never ends)."""

    def __init__(self, upstream: str, cut_streams: bool = False) -> None:
        client = httpx.Client(base_url=upstream, timeout=60)

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def forward(self) -> None:
                path, mark, query = self.path.partition("?")
                if path != PREFIX and not path.startswith(PREFIX + "/"):
                    self.send_error(404)
                    return
                upstream_path = (path[len(PREFIX):] or "/") + mark + query
                size = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(size) if size else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                with client.stream(self.command, upstream_path, content=body, headers=headers) as answer:
                    self.send_response(answer.status_code)
                    for name, value in answer.headers.items():
                        if name.lower() not in HOP_BY_HOP:
                            self.send_header(name, value)
                    self.send_header("transfer-encoding", "chunked")
                    self.end_headers()
                    for chunk in answer.iter_raw():
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        self.wfile.flush()
                        if cut_streams and "/ai/run/" in self.path:
                            self.connection.shutdown(socket.SHUT_RDWR)
                            self.close_connection = True
                            return
                    self.wfile.write(b"0\r\n\r\n")

            do_GET = do_POST = forward

            def log_message(self, *args: Any) -> None:
                pass

        self.client = client
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{PREFIX}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="prefix-proxy", daemon=True)

    def __enter__(self) -> PrefixProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.client.close()


def test_the_playground_works_under_a_path_prefix(open_playground: Any, base_url: str) -> None:
    with PrefixProxy(base_url) as proxy:
        tab: Playground = open_playground(proxy.url)  # the page at /int8serve/, its data-ready set by its script
        tab.connect(TOKEN)
        tab.connected()
        tab.page.get_by_label("Model", exact=True).select_option(MODEL)
        tab.parameter("max_tokens").fill("8")
        tab.send("Hello")
        tab.wait_answer()
        assert tab.figure_value("tokens") > 0
        assert all(r.url.startswith(proxy.url + "/") or r.url.startswith("data:") for r in tab.requests), \
            [r.url for r in tab.requests]
        tab.page.goto(proxy.url + "/docs")  # the API's page too
        expect(tab.page.locator("html")).to_have_attribute("data-ready", "true")
        expect(tab.page.locator(".operation", has_text="/healthz")).to_contain_text("GET")


def test_the_playground_without_its_trailing_slash_under_a_path_prefix_moves_to_it(open_playground: Any,
                                                                                  base_url: str) -> None:
    """`https://example.com/int8serve` (no slash) reaches the server as `/`, as `/int8serve/` does, so only the page
    can tell: its relative URLs would resolve outside the prefix (`/playground/playground.js`), and it would stay
    dead. It moves itself to the URL with the slash (query and fragment kept), and works there."""
    with PrefixProxy(base_url) as proxy:
        tab: Playground = open_playground(proxy.url)
        tab.requests.clear()
        tab.page.goto(proxy.url + "?from=bookmark#top")
        expect(tab.page).to_have_url(proxy.url + "/?from=bookmark#top")
        expect(tab.page.locator("html")).to_have_attribute("data-ready", "true")
        tab.connect(TOKEN)
        tab.connected()
        # before the page moved, the browser's preload scanner may have asked for its assets outside the prefix
        # (404s, never applied: the page errors nothing, `open_playground` checks); everything else is inside
        outside = {r.url for r in tab.requests if not r.url.startswith(proxy.url + "/") and r.url != proxy.url +
                   "?from=bookmark"}
        assert outside <= {f"{proxy.url.removesuffix(PREFIX)}/playground/{name}"
                           for name in ("playground.css", "playground.js")}, outside
        assert [r.url for r in tab.requests if r.resource_type == "document"] == [
            proxy.url + "?from=bookmark", proxy.url + "/?from=bookmark"]


def test_a_connection_lost_mid_answer_is_explained(open_playground: Any, base_url: str) -> None:
    with PrefixProxy(base_url, cut_streams=True) as proxy:
        tab: Playground = open_playground(proxy.url)
        tab.connect(TOKEN)
        tab.connected()
        tab.page.get_by_label("Model", exact=True).select_option(SLOW_MODEL)
        tab.parameter("max_tokens").fill("60")
        tab.send("Once upon a time")
        error = tab.wait_answer("error").get_by_role("alert")
        expect(error).to_contain_text(re.compile(r"^The connection was lost while the answer streamed: the answer "
                                                 r"is incomplete\. .* \(.+\)$"))
        expect(error).not_to_contain_text("Unexpected error")


# --- /docs: the API's routes, under the same rules ----------------------------------------------------------------


def test_docs_page_lists_the_routes_with_nothing_from_elsewhere(browser: Browser, base_url: str) -> None:
    context = browser.new_context()
    try:
        page = context.new_page()
        requested: list[str] = []
        errors: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        page.on("pageerror", lambda err: errors.append(str(err)))
        page.goto(base_url + "/docs")
        expect(page.locator("html")).to_have_attribute("data-ready", "true", timeout=TIMEOUT_MS)
        run = page.locator(".operation", has_text="/client/v4/accounts/{account_id}/ai/run/{model}")
        expect(run.locator(".method")).to_have_text("POST")
        expect(run.locator(".answers")).to_contain_text("429: rate limit (3021)")
        expect(page.locator(".operation", has_text="/metrics")).to_contain_text("200: the Prometheus text")
        assert errors == [] and requested
        assert all(url.startswith(base_url + "/") or url.startswith("data:") for url in requested), requested
    finally:
        context.close()
