"""A hostile outside user against a live server: huge numbers, slow and stuck clients, one account taking every
slot, `/metrics` read by anyone, control characters in logs. Each finding of issue 11 is a test here (the cache
across accounts is in `policy/test_cache.py`, the bodies that stall the event loop in `test_hostile_bodies.py`)."""

from __future__ import annotations

import json
import logging
import socket
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import ExitStack
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from int8serve.catalog.registry import Catalog
from int8serve.engine.loader import LoadedModel
from int8serve.engine.scheduler import Engine
from int8serve.engine.tokenizer import Tokenizer
from int8serve.service import auth
from int8serve.service.app import REQUEST_ID_HEADER, create_app
from int8serve.service.auth import check_metrics_token
from int8serve.service.errors import ApiError
from int8serve.service.inference import RequestLimits
from int8serve.service.policy import Policy
from int8serve.service.request_log import (
    REQUEST_LOGGER,
    EscapeControls,
    JsonFormatter,
    TextFormatter,
    configure_logging,
    escape_controls,
    log_request,
)

from .conftest import (
    ACCOUNT,
    MODEL,
    OTHER_ACCOUNT,
    OTHER_TOKEN,
    SLOW_MODEL,
    TOKEN,
    TOKENS,
    LiveServer,
    SlowModel,
    stuck_reader,
)

BIG = "1" + "0" * 400
HUGE = "9" * 5000
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OTHER_AUTH = {"Authorization": f"Bearer {OTHER_TOKEN}"}
RUN = f"/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}"
SLOW_RUN = f"/client/v4/accounts/{ACCOUNT}/ai/run/{SLOW_MODEL}"
LONG = {"prompt": "Once upon a time", "raw": True, "max_tokens": 480, "temperature": 0}
METRICS_TOKEN = "metrics-secret-0001"


@pytest.fixture(scope="module")
def wide_slow_engine(stories_int8: LoadedModel, stories_tokenizer: Tokenizer) -> Iterator[Engine]:
    """The real model at ~20 ms a step, with 4 slots: 480 tokens take ~10 s."""
    engine = Engine(SlowModel(stories_int8.model, 0.02), stories_tokenizer, max_slots=4,  # type: ignore[arg-type]
                    max_queue=8, max_seq_len=512).start()
    yield engine
    engine.stop()


@pytest.fixture(scope="module")
def hardened(catalog: Catalog, engines: dict[str, Engine], wide_slow_engine: Engine) -> Iterator[FastAPI]:
    """Short deadlines, at most 2 requests per account in the engines, a metrics token."""
    policy = Policy.in_memory(rate_limits=False, cache=False)
    limits = RequestLimits(body_timeout=0.5, stall_timeout=1.0, max_inflight_per_account=2)
    yield create_app(catalog, {MODEL: engines[MODEL], SLOW_MODEL: wide_slow_engine}, TOKENS, policy=policy,
                     limits=limits, metrics_token=METRICS_TOKEN)
    policy.close()


@pytest.fixture(scope="module")
def live(hardened: FastAPI) -> Iterator[LiveServer]:
    with LiveServer(hardened, header_timeout=0.5, max_connections=64) as server:
        yield server


@pytest.fixture
def client(live: LiveServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=30) as http:
        yield http


def _code(resp: httpx.Response) -> int:
    body = resp.json()
    return body["errors"][0]["code"] if "errors" in body else body["error"]["code"]


def _wait(condition: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# --- numbers of any size ----------------------------------------------------------------------------------------

NUMERIC = ["max_tokens", "seed", "temperature", "top_p", "top_k", "repetition_penalty", "frequency_penalty",
           "presence_penalty"]


@pytest.mark.parametrize("field", NUMERIC)
@pytest.mark.parametrize("number", [BIG, f"-{BIG}", HUGE, "1e400", "-1e400", "1.5e308"])
def test_numbers_of_any_size_are_400_on_run(client: httpx.Client, field: str, number: str) -> None:
    resp = client.post(RUN, headers=AUTH, content=f'{{"prompt": "x", "{field}": {number}}}')
    assert (resp.status_code, _code(resp)) == (400, 5006), resp.text


@pytest.mark.parametrize("field", ["max_tokens", "max_completion_tokens", "seed", "temperature", "top_k"])
def test_numbers_of_any_size_are_400_on_openai_routes(client: httpx.Client, field: str) -> None:
    for path, body in (("/v1/chat/completions", '"messages": [{"role": "user", "content": "x"}]'),
                       ("/v1/completions", '"prompt": "x"')):
        resp = client.post(path, headers=AUTH, content=f'{{"model": "{MODEL}", {body}, "{field}": {BIG}}}')
        assert (resp.status_code, _code(resp)) == (400, 5006), resp.text


@pytest.mark.parametrize("path", ["/v1/completions", RUN])
def test_values_nested_hundreds_deep_are_400_in_large_bodies_too(client: httpx.Client, path: str) -> None:
    """JSON nests at most 64 deep. A body over 64 KiB is checked in a request worker process and its checked body
    comes back pickled: a value nested 500 deep in a field the OpenAI routes accept and ignore (`metadata`) failed
    to pickle there, a 500/3043 with a traceback, where a small body was answered 200."""
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 1, "user": "x" * 70_000}
    for depth, status in ((500, 400), (64, 200)):
        deep = json.dumps({**body, "metadata": [[]]}).replace("[[]]", "[" * (depth - 1) + "]" * (depth - 1))
        resp = client.post(path, headers=AUTH, content=deep)
        assert resp.status_code == status, (depth, resp.text)
        if status == 400:
            assert _code(resp) == 5006 and "more than 64 deep" in resp.text, resp.text


EXTREMES = [{"temperature": 1e-320}, {"temperature": 1e-39}, {"temperature": 1e-39, "top_p": 0.001},
            {"temperature": 0.7, "repetition_penalty": 1e-320},
            {"temperature": 5, "repetition_penalty": 2, "frequency_penalty": 2, "top_k": 50}]


def test_the_smallest_admitted_numbers_sample_and_harm_nobody_else(client: httpx.Client, live: LiveServer) -> None:
    """Found by an audit: a temperature or repetition penalty of 1e-320 (within the schema's ranges) overflowed the
    sampler to NaN, and the engine then ended every running request of every account with a 500."""
    other = httpx.Client(base_url=live.url, timeout=60)
    with other, other.stream("POST", f"/client/v4/accounts/{OTHER_ACCOUNT}/ai/run/{SLOW_MODEL}",
                             headers=OTHER_AUTH, json={**LONG, "max_tokens": 300, "stream": True}) as victim:  # ~6 s
        assert victim.status_code == 200
        lines = victim.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # the victim is running
        for extreme in EXTREMES:
            for body in ({"prompt": "Once upon a time", "raw": True, "max_tokens": 8, **extreme},
                         {"messages": [{"role": "user", "content": "Tell me a story"}], "max_tokens": 8, **extreme}):
                resp = client.post(SLOW_RUN, headers=AUTH, content=json.dumps(body))  # the victim's engine
                assert resp.status_code == 200, (extreme, resp.text)
                assert resp.json()["result"]["usage"]["completion_tokens"] > 0
        frames = [json.loads(line[6:]) for line in lines if line.startswith("data: {")]
    assert "errors" not in frames[-1] and frames[-1]["usage"]["completion_tokens"] == 300


SEARCH = f"/client/v4/accounts/{ACCOUNT}/ai/models/search"
USAGE = f"/client/v4/accounts/{ACCOUNT}/ai/usage"


@pytest.mark.parametrize(("path", "query", "status"), [
    (SEARCH, {"page": HUGE}, 400), (SEARCH, {"per_page": HUGE}, 400), (SEARCH, {"page": "-" + BIG}, 400),
    (SEARCH, {"source": BIG}, 400), (SEARCH, {"source": "1e400"}, 400), (SEARCH, {"source": "nan"}, 400),
    (USAGE, {"since": HUGE}, 400), (USAGE, {"until": "9" * 12}, 400), (USAGE, {"since": "1e400"}, 400),
    (USAGE, {"until": "99999999999"}, 200),  # the year 5138: a period, if an odd one
    (USAGE, {"until": "0001-01-01"}, 200), (USAGE, {"since": "9999-12-30", "until": "9999-12-31"}, 200),
    ("/client/v4/accounts", {"page": HUGE}, 400), ("/client/v4/accounts", {"per_page": BIG}, 400),
])
def test_query_numbers_of_any_size(client: httpx.Client, path: str, query: dict[str, str], status: int) -> None:
    resp = client.get(path, headers=AUTH, params=query)
    assert resp.status_code == status, resp.text
    if status == 400:
        assert _code(resp) == 1001


def test_header_numbers_of_any_size(client: httpx.Client, live: LiveServer) -> None:
    body = {"prompt": "Once", "raw": True, "max_tokens": 2}
    assert client.post(RUN, headers={**AUTH, "cf-aig-cache-ttl": HUGE}, json=body).status_code == 200
    answer = _raw(live, f"POST {RUN} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                        f"Content-Length: {HUGE}\r\n\r\n")
    assert answer.startswith((b"HTTP/1.1 400 ", b"HTTP/1.1 413 ")), answer[:200]


def _raw(live: LiveServer, request: str, timeout: float = 10.0) -> bytes:
    with socket.create_connection(("127.0.0.1", live.port), timeout=timeout) as sock:
        sock.sendall(request.encode())
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer and answer.rstrip().endswith((b"}", b"Error")):
                break
    return answer


# --- fair share -------------------------------------------------------------------------------------------------


def test_one_account_cannot_take_every_slot(live: LiveServer, client: httpx.Client,
                                            wide_slow_engine: Engine) -> None:
    """At most 2 requests of one account in a model's engine (this app's setting): its 3rd is 429/3040 at once,
    while another account is served beside it, and the same account still has its share of the other model's
    engine."""
    with ExitStack() as stack:
        for _ in range(2):
            http = stack.enter_context(httpx.Client(base_url=live.url, timeout=30))
            resp = stack.enter_context(http.stream("POST", SLOW_RUN, headers=AUTH, json={**LONG, "stream": True}))
            assert resp.status_code == 200
        _wait(lambda: wide_slow_engine.stats().running == 2)
        third = client.post(SLOW_RUN, headers=AUTH, json=LONG)
        assert (third.status_code, _code(third)) == (429, 3040)
        assert third.headers["retry-after"] == "1"
        other = client.post(f"/client/v4/accounts/{OTHER_ACCOUNT}/ai/run/{SLOW_MODEL}", headers=OTHER_AUTH,
                            json={**LONG, "max_tokens": 3})
        assert other.status_code == 200
        assert client.post(RUN, headers=AUTH, json={**LONG, "max_tokens": 2}).status_code == 200  # another engine
    _wait(lambda: wide_slow_engine.stats().running == 0)  # the two streams were cut when their clients left
    assert client.post(RUN, headers=AUTH, json={**LONG, "max_tokens": 2}).status_code == 200  # shares given back


# --- slow and stuck clients -------------------------------------------------------------------------------------


def test_headers_sent_slowly_are_cut(live: LiveServer) -> None:
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
        sock.sendall(b"POST " + RUN.encode() + b" HTTP/1.1\r\nHost: x\r\n")  # ... and never the rest
        started = time.monotonic()
        assert sock.recv(1024) == b""  # closed by the server
        assert time.monotonic() - started < 5


def test_a_body_sent_slowly_is_408_3007(live: LiveServer) -> None:
    with socket.create_connection(("127.0.0.1", live.port), timeout=10) as sock:
        sock.sendall(f"POST {RUN} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                     "Content-Length: 100\r\n\r\n{\"prompt\": ".encode())
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.rstrip().endswith(b"}"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 ")
        assert json.loads(body)["errors"] == [{"code": 3007, "message": "Request timeout"}]
        # the body's unsent rest would be read as the next request: the server closes the connection (it kept it
        # open, and the client's next request on it went unanswered)
        assert b"\r\nconnection: close" in head.lower()
        assert sock.recv(1) == b""


def test_a_client_that_stops_reading_is_cut_and_its_usage_recorded(hardened: FastAPI,
                                                                  wide_slow_engine: Engine) -> None:
    """A stream whose client reads nothing: the server's buffers fill, the stream is cut after the stall timeout
    (1 s here), the engine slot is freed long before the 480 tokens would have ended, and the ledger has its row."""
    body = {"model": SLOW_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 480, "stream": True}
    with stuck_reader(hardened, body, TOKEN):
        _wait(lambda: wide_slow_engine.stats().running == 1)
        _wait(lambda: wide_slow_engine.stats().running == 0)  # cut (the row says so: fewer than 480 tokens)
    ledger = hardened.state.services.policy.ledger
    assert ledger.flush()
    rows = _rows(hardened, SLOW_MODEL)
    assert rows[-1]["outcome"] == "aborted" and 0 < rows[-1]["output_tokens"] < 480


def test_the_row_is_written_when_the_engine_ends_whether_or_not_the_client_reads(live: LiveServer,
                                                                                 hardened: FastAPI) -> None:
    """A client that sends its request and never reads: the answer is complete in the engine, and its ledger row
    (outcome ok) is there although the client has not read the final frame. The row is found by its request id
    (the response header, read from the socket; the body stays unread): counting rows would also count a row that an
    earlier test's request writes late."""
    with socket.create_connection(("127.0.0.1", live.port)) as sock:
        body = json.dumps({"prompt": "Once", "raw": True, "max_tokens": 20, "stream": True}).encode()
        sock.sendall(f"POST {RUN} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                     f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        request_id = _response_header(sock, REQUEST_ID_HEADER)
        _wait(lambda: any(r["request_id"] == request_id for r in _rows(hardened, MODEL)))
        row = next(r for r in _rows(hardened, MODEL) if r["request_id"] == request_id)
        assert row["outcome"] == "ok" and row["output_tokens"] >= 1


def _response_header(sock: socket.socket, name: str) -> str:
    """Read from `sock` only as far as the end of the response's headers; return the header `name`'s value."""
    head = b""
    while b"\r\n\r\n" not in head:
        chunk = sock.recv(1)
        assert chunk, f"the connection closed before the headers ended: {head!r}"
        head += chunk
    for line in head.decode("latin-1").split("\r\n")[1:]:
        key, _, value = line.partition(":")
        if key.strip().lower() == name.lower():
            return value.strip()
    raise AssertionError(f"no {name} header in {head!r}")


def _rows(app: FastAPI, model: str) -> list[dict[str, Any]]:
    ledger = app.state.services.policy.ledger
    assert ledger.flush()
    with ledger.database.connect() as conn:
        rows = conn.execute(ledger.table.select().where(ledger.table.c.model == model)
                            .order_by(ledger.table.c.time)).mappings().all()
    return [dict(r) for r in rows]


# --- tokens -------------------------------------------------------------------------------------------------------


def test_a_token_is_found_without_comparing_it_with_every_configured_one(catalog: Catalog,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A token's account was found by comparing it with every configured token, on the event loop before anything
    else: with 100,001 tokens a wrong token's 401 took 16.5 ms (2 tokens: 1.9 ms), and 16 clients sending bad tokens
    took /healthz to 110 ms. Now one comparison at most, whatever the number of tokens."""
    tokens = {f"tok-{n:06d}": f"acct-{n % 4}" for n in range(100_000)} | TOKENS
    compared: list[int] = []
    compare_digest = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: compared.append(1) or compare_digest(a, b))
    with LiveServer(create_app(catalog, {}, tokens)) as live:
        for token, status in ((TOKEN, 200), ("tok-099999", 200), ("tok-100000", 401), ("tok-0", 401)):
            compared.clear()
            answer = httpx.get(f"{live.url}/v1/models", headers={"Authorization": f"Bearer {token}"})
            assert answer.status_code == status, answer.text
            assert len(compared) <= 1, f"{len(compared)} comparisons for one request"


# --- metrics, logs ----------------------------------------------------------------------------------------------


def test_metrics_need_their_token(client: httpx.Client) -> None:
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers=AUTH).status_code == 401  # an API token is not the metrics token
    scraped = client.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert scraped.status_code == 200 and "int8serve_http_requests_total" in scraped.text


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "bEaReR"])
def test_the_metrics_token_scheme_is_read_in_any_case(client: httpx.Client, scheme: str) -> None:
    """As the API's tokens are (`auth.py`): RFC 9110 makes the scheme case-insensitive; the token is not."""
    assert client.get("/metrics", headers={"Authorization": f"{scheme} {METRICS_TOKEN}"}).status_code == 200
    assert client.get("/metrics", headers={"Authorization": f"{scheme} {METRICS_TOKEN.upper()}"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": METRICS_TOKEN}).status_code == 401


def test_a_metrics_bearer_that_is_not_ascii_is_a_401(client: httpx.Client) -> None:
    """Never a 500, whose traceback would show a character of the token being compared."""
    for sent in ["Bearer mé".encode(), b"Bearer \xff\xfe", f"Bearer {METRICS_TOKEN}\u00e9".encode()]:
        refused = client.get("/metrics", headers={"Authorization": sent})
        assert (refused.status_code, _code(refused)) == (401, 10000), sent
    with pytest.raises(ApiError) as refused_here:  # nor a configured token no header can carry (settings refuse it)
        check_metrics_token("Bearer m\u00e9", "m\u00e9")
    assert refused_here.value.status == 401


def test_control_characters_from_urls_are_escaped_in_logs(client: httpx.Client,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="int8serve.request")
    resp = client.post(f"/client/v4/accounts/{ACCOUNT}/ai/run/%1b[2Jevil", headers=AUTH, json={"prompt": "x"})
    assert (resp.status_code, _code(resp)) == (400, 5007)
    resp = client.post("/v1/completions", headers=AUTH, json={"model": "\x1b[2J\nforged=1", "prompt": "x"})
    assert (resp.status_code, _code(resp)) == (404, 5007)
    lines = [TextFormatter().format(r) for r in caplog.records if r.name == "int8serve.request"]
    assert lines and all("\x1b" not in line and "\n" not in line for line in lines)
    assert any("model=\\x1b[2Jevil" in line for line in lines)
    assert any('model="\\u001b[2J\\nforged=1"' in line for line in lines)  # quoted (it has a space) as JSON


# what str.splitlines() (and many log viewers) take for line ends, and C1 CSI, which terminals act on
FORGING = "x y\u2028forged=1\x85forged=2\x9b2J\r\nforged=3\u2029\x7f"
RAW_CONTROLS = set("\u2028\u2029\x85\x9b\r\n\x7f")


def _one_clean_line(text: str) -> str:
    [line] = text.splitlines()
    assert not RAW_CONTROLS & set(line), line
    return line


def test_line_ends_and_c1_controls_from_clients_cannot_forge_log_lines(client: httpx.Client,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    in_url = "@cf/" + FORGING.replace("\r\n", "")  # a route's path never matches a line end: 404 unlogged
    resp = client.post(f"/client/v4/accounts/{ACCOUNT}/ai/run/" + urllib.parse.quote(in_url, safe="/@"),
                       headers=AUTH, json={"prompt": "x"})
    assert (resp.status_code, _code(resp)) == (400, 5007)
    resp = client.post("/v1/completions", headers=AUTH, json={"model": FORGING, "prompt": "x"})
    assert (resp.status_code, _code(resp)) == (404, 5007)
    for model in (in_url, FORGING):
        [record] = [r for r in caplog.records if getattr(r, "fields", {}).get("model") == model]
        EscapeControls().filter(record)
        text_line = _one_clean_line(TextFormatter().format(record))
        assert 'y\\u2028forged=1\\u0085forged=2\\u009b2J' in text_line
        assert json.loads(_one_clean_line(JsonFormatter().format(record)))["model"] == model


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_prompts_and_messages_without_arguments_are_escaped(log_format: str,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """With --log-prompts, and for a record logged without arguments (`args == ()`), whatever the format."""
    logger = logging.getLogger("int8serve")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    messages = [{"role": "user", "content": FORGING}]
    try:
        configure_logging(log_format, "info")
        log_request({"request_id": "r-1", "model": FORGING, "prompt": messages, "response": FORGING})
        logging.getLogger("int8serve.engine").warning("no arguments: " + FORGING)
    finally:
        logger.handlers, logger.level, logger.propagate = saved
    request_line, plain_line = capsys.readouterr().err.splitlines()
    for line in (request_line, plain_line):
        _one_clean_line(line)
    if log_format == "json":
        request = json.loads(request_line)
        assert (request["model"], request["prompt"], request["response"]) == (FORGING, messages, FORGING)
        assert json.loads(plain_line)["message"] == "no arguments: " + escape_controls(FORGING)
    else:
        assert "\\u2028forged=1" in request_line and "no arguments: x y\\u2028forged=1\\x85" in plain_line


def test_escape_controls() -> None:
    assert escape_controls("a\x1b[31mb\nc\u2028 é 世\t") == "a\\x1b[31mb\\nc\\u2028 é 世\\t"
