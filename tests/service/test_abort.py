"""Abort paths, exactly: what a cut stream, a stuck reader, an engine failure mid-stream, a client that leaves
while queued and a request whose place in the full queue goes to another account cost, and what they leave in the
engine and the ledger.

The engine here is the real stories260K engine with one slot, driven step by step: each engine step waits for a
permit from the test (`GatedEngine`), so the test knows how many tokens the engine generated when it cuts — no
timing is involved. Its model records the prompts it prefilled and can be made to fail (`Breakable`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
import torch
from prometheus_client.parser import text_string_to_metric_families

from int8serve.catalog.registry import Catalog
from int8serve.engine.loader import LoadedModel
from int8serve.engine.scheduler import Engine, GenerationRequest, RequestHandle
from int8serve.engine.tokenizer import Tokenizer
from int8serve.service.app import create_app
from int8serve.service.inference import InferenceCall, RequestLimits
from int8serve.service.policy import Policy
from int8serve.service.request_log import REQUEST_LOGGER
from int8serve.service.streaming import UNSENT_ANSWER_BYTES

from .conftest import (
    ACCOUNT,
    CONTEXT,
    MODEL,
    OTHER_ACCOUNT,
    OTHER_TOKEN,
    TOKEN,
    TOKENS,
    LiveServer,
    stuck_reader,
    wait_for,
)

RUN = f"/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NEURON_COST = 0.1836  # per input and output token (the built-in card)
LONG = {"prompt": "Once upon a time", "raw": True, "max_tokens": 400, "temperature": 0}


class Breakable:
    """The real model; remembers the prompts it prefilled (a forward from position 0); raises while `broken`;
    sleeps `delay` seconds before each forward (a pace, for the stuck reader)."""

    def __init__(self, model: Any) -> None:
        self.model, self.config = model, model.config
        self.broken = threading.Event()
        self.delay = 0.0
        self.prefilled: list[list[int]] = []
        self.forwards = 0

    def new_cache(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.new_cache(*args, **kwargs)

    def __call__(self, tokens: torch.Tensor, cache: Any, slots: list[int], starts: list[int], **kw: Any
                 ) -> torch.Tensor:
        if self.broken.is_set():
            raise RuntimeError("injected failure")
        if starts == [0]:
            self.prefilled.append(tokens[0].tolist())
        self.forwards += 1
        time.sleep(self.delay)
        return self.model(tokens, cache, slots, starts, **kw)


class GatedEngine(Engine):
    """An engine whose every step first takes a permit (`allow(n)`; `open()` for good), and which keeps the
    handles it was given."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.permits = threading.Semaphore(0)
        self.opened = threading.Event()
        self.handles: list[RequestHandle] = []
        self.steps_done = 0

    def allow(self, steps: int = 1) -> None:
        self.permits.release(steps)

    def run_steps(self, steps: int) -> None:
        """Let `steps` more steps run, and wait until they have."""
        target = self.steps_done + steps
        self.allow(steps)
        wait_for(lambda: self.steps_done >= target, f"{steps} engine steps")

    def open(self) -> None:
        self.opened.set()
        self.permits.release(1)

    def step(self) -> None:
        if not self.opened.is_set():
            self.permits.acquire()
        super().step()
        self.steps_done += 1

    def submit(self, request: GenerationRequest, reject_if_busy: bool = False) -> RequestHandle:
        handle = super().submit(request, reject_if_busy)
        self.handles.append(handle)
        return handle


@pytest.fixture
def gated(stories_int8: LoadedModel, stories_tokenizer: Tokenizer) -> Iterator[GatedEngine]:
    engine = GatedEngine(Breakable(stories_int8.model), stories_tokenizer,  # type: ignore[arg-type]
                         max_slots=1, max_queue=2, max_seq_len=CONTEXT).start()
    yield engine
    engine.open()
    engine.stop()


@pytest.fixture
def served(catalog: Catalog, gated: GatedEngine) -> Iterator[tuple[LiveServer, Policy]]:
    """The gated engine as MODEL, with an in-memory ledger, no rate limit, no cache, a 1 s stall timeout."""
    policy = Policy.in_memory(rate_limits=False, cache=False)
    app = create_app(catalog, {MODEL: gated}, TOKENS, policy=policy, limits=RequestLimits(stall_timeout=1.0))
    with LiveServer(app) as live:
        yield live, policy
    policy.close()


def row_of(policy: Policy, request_id: str) -> dict[str, Any]:
    """The ledger row of `request_id`, once written."""
    table = policy.ledger.table

    def read() -> list[Any]:
        assert policy.ledger.flush()
        with policy.ledger.database.connect() as conn:
            return list(conn.execute(sa.select(table).where(table.c.request_id == request_id)).mappings())

    wait_for(read, f"the ledger row of {request_id}")
    (row,) = read()
    return dict(row)


def prompt_tokens_counted(live: LiveServer) -> float:
    """`int8serve_prompt_tokens_total` of MODEL, scraped."""
    scraped = httpx.get(f"{live.url}/metrics", timeout=30).text
    return next((sample.value for family in text_string_to_metric_families(scraped) for sample in family.samples
                 if sample.name == "int8serve_prompt_tokens_total" and sample.labels == {"model": MODEL}), 0.0)


def neurons(input_tokens: int, output_tokens: int) -> float:
    return round((input_tokens + output_tokens) * NEURON_COST, 6)


def data_frames(lines: Iterator[str], count: int) -> list[dict[str, Any]]:
    """The next `count` data frames of an SSE line iterator."""
    frames: list[dict[str, Any]] = []
    while len(frames) < count:
        line = next(lines)
        if line.startswith("data: "):
            frames.append(json.loads(line[6:]))
    return frames


def test_a_cut_stream_is_billed_exactly_the_tokens_it_was_sent(served: tuple[LiveServer, Policy],
                                                                gated: GatedEngine) -> None:
    """Three engine steps, then the engine waits: the client reads every frame of the tokens generated so far (one
    a token, one token a forward) and leaves; the request is cancelled before another token, its slot is freed,
    and its row has exactly the tokens the client was sent."""
    live, policy = served
    gated.allow()  # the step that takes the request into the slot: its 200 comes then
    with httpx.Client(base_url=live.url, timeout=30) as http, \
            http.stream("POST", RUN, headers=AUTH, json={**LONG, "stream": True}) as resp:
        request_id, lines = resp.headers["cf-ai-req-id"], resp.iter_lines()
        wait_for(lambda: gated.steps_done == 1, "the first step")
        gated.run_steps(2)
        sent = gated.model.forwards  # type: ignore[attr-defined]
        frames = data_frames(lines, sent)
        assert all(f["response"] and "usage" not in f for f in frames)
    wait_for(lambda: gated.handles[0].cancelled.is_set(), "the server to cancel the request")
    gated.open()
    wait_for(lambda: gated.stats().running == 0, "the slot to be freed")
    row = row_of(policy, request_id)
    prompt = len(gated.handles[0].request.prompt_ids)
    assert (row["outcome"], row["output_tokens"], row["input_tokens"]) == ("aborted", sent, prompt)
    assert row["neurons"] == neurons(prompt, sent) and gated.model.forwards == sent  # type: ignore[attr-defined]


def test_a_stuck_reader_is_cut_and_billed_what_the_engine_generated(catalog: Catalog,
                                                                    served: tuple[LiveServer, Policy],
                                                                    gated: GatedEngine) -> None:
    """A client that sends its request and reads nothing (OpenAI chat frames, ~150 bytes each; small socket
    buffers): once the server cannot send for the 1 s stall timeout the stream is cut, the request cancelled, its
    slot freed, and its row has every token the engine generated — no more, no fewer — far fewer than asked for
    (480 tokens at 20 ms a step would take ~10 s)."""
    _, policy = served
    app = create_app(catalog, {MODEL: gated}, TOKENS, policy=policy, limits=RequestLimits(stall_timeout=1.0))
    gated.model.delay = 0.02  # type: ignore[attr-defined]
    gated.open()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 480, "stream": True}
    with stuck_reader(app, body, TOKEN):
        wait_for(lambda: gated.handles and gated.handles[0].cancelled.is_set(), "the stalled stream to be cut")
        wait_for(lambda: gated.stats().running == 0, "the slot to be freed")
    handle = gated.handles[0]
    row = row_of(policy, handle.request.request_id)
    generated = gated.model.forwards  # type: ignore[attr-defined]  # one prefill chunk, then one token a step
    assert row["outcome"] == "aborted" and row["output_tokens"] == generated < 480
    assert row["neurons"] == neurons(len(handle.request.prompt_ids), generated)


def test_a_stuck_reader_holds_at_most_the_bound_of_unsent_answer(catalog: Catalog,
                                                                   served: tuple[LiveServer, Policy],
                                                                   gated: GatedEngine) -> None:
    """A client that reads nothing, the stall timeout far away (30 s): the frames waiting for its connection pass
    UNSENT_ANSWER_BYTES long before the 480 tokens, and the stream is cut there as a stall is — the request
    cancelled, the connection closed, the row `aborted` with every token generated. Found by an audit: the frames
    piled up in an unbounded queue (~100 KB) and the engine generated until the stall timeout. What the server never
    handed to the connection (the frames of the same answer, replayed to a reading client, less what this client
    got) is the bound at most, and two frames that were never kept: the one that would have passed it, and the
    token the engine was generating when the request was cancelled."""
    live, policy = served
    app = create_app(catalog, {MODEL: gated}, TOKENS, policy=policy, limits=RequestLimits(stall_timeout=30.0))
    gated.model.delay = 0.01  # type: ignore[attr-defined]
    gated.open()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 480, "stream": True,
            "temperature": 0}
    with stuck_reader(app, body, TOKEN) as (_, sock):
        started = time.monotonic()
        wait_for(lambda: gated.handles and gated.handles[0].cancelled.is_set(), "the stream to be cut", timeout=15)
        received = _read_to_the_end(sock)
        assert time.monotonic() - started < 15  # cut and closed long before the stall timeout
    handle = gated.handles[0]
    row = row_of(policy, handle.request.request_id)
    generated = gated.model.forwards  # type: ignore[attr-defined]  # one prefill chunk, then one token a step
    assert row["outcome"] == "aborted" and row["output_tokens"] == generated < 400
    assert row["neurons"] == neurons(len(handle.request.prompt_ids), generated)
    with httpx.Client(base_url=live.url, timeout=30) as http:  # the same answer, read, as far as the cut
        replayed = http.post("/v1/chat/completions", headers=AUTH, json={**body, "max_tokens": generated}).content
    frames = [len(frame) for frame in _delta_frames(replayed)]
    unsent = sum(frames) - sum(len(frame) for frame in _delta_frames(received))
    assert UNSENT_ANSWER_BYTES < unsent <= UNSENT_ANSWER_BYTES + 2 * max(frames)


def _read_to_the_end(sock: socket.socket) -> bytes:
    """Everything the server sent on `sock`, until it closes the connection."""
    sock.settimeout(10)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def _delta_frames(raw: bytes) -> list[bytes]:
    """The whole chat delta frames in `raw` (an HTTP response, chunked or not): data frames with a `delta`."""
    return [frame for frame in re.findall(rb"data: [^\n]*\n\n", raw) if b'"delta":{' in frame
            and b'"finish_reason":null' in frame]


def test_an_engine_failure_mid_stream(served: tuple[LiveServer, Policy], gated: GatedEngine) -> None:
    """Two steps' tokens sent, then a step fails: the stream ends with the 3043 error frame and no [DONE], the slot
    is free, the row says `error` with the generated tokens and 0 neurons, and the engine serves the next request."""
    live, policy = served
    gated.allow()  # the step that takes the request into the slot: its 200 comes then
    with httpx.Client(base_url=live.url, timeout=30) as http:
        with http.stream("POST", RUN, headers=AUTH, json={**LONG, "stream": True}) as resp:
            request_id, lines = resp.headers["cf-ai-req-id"], resp.iter_lines()
            wait_for(lambda: gated.steps_done == 1, "the first step")
            gated.run_steps(1)
            sent = gated.model.forwards  # type: ignore[attr-defined]
            data_frames(lines, sent)
            gated.model.broken.set()  # type: ignore[attr-defined]
            gated.allow()
            rest = [line for line in lines if line]
        assert [json.loads(line[6:]) for line in rest] == [
            {"response": "", "errors": [{"code": 3043, "message": "Internal server error"}]}]
        assert gated.stats().running == 0
        row = row_of(policy, request_id)
        assert (row["outcome"], row["output_tokens"], row["neurons"]) == ("error", sent, 0.0)
        gated.model.broken.clear()  # type: ignore[attr-defined]
        gated.open()
        again = http.post(RUN, headers=AUTH, json={**LONG, "max_tokens": 4})
        assert again.status_code == 200 and again.json()["result"]["response"]


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "collect"])
def test_a_request_that_leaves_while_queued_never_reaches_the_engine(served: tuple[LiveServer, Policy],
                                                                     gated: GatedEngine, stream: bool) -> None:
    """The one slot is taken; a second request waits in the queue and its client leaves: it is dropped from the
    queue, never prefilled, its row is `aborted` with 0 tokens and 0 neurons, and the metrics count none of its prompt
    tokens as processed (found by an audit: they were); the first request is unaffected."""
    live, policy = served
    before = prompt_tokens_counted(live)
    gated.allow()  # the first request takes the slot (its 200 comes then) and holds it
    with httpx.Client(base_url=live.url, timeout=30) as http, \
            http.stream("POST", RUN, headers=AUTH, json={**LONG, "max_tokens": 8, "stream": True}) as first:
        wait_for(lambda: gated.steps_done == 1, "the first step")
        queued = {"prompt": "A different story about a cat", "raw": True, "max_tokens": 8, "stream": stream}
        with socket.create_connection(("127.0.0.1", live.port)) as sock:
            payload = json.dumps(queued).encode()
            sock.sendall(f"POST {RUN} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                         f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
            wait_for(lambda: gated.stats().waiting == 1, "the second request to queue")
        wait_for(lambda: gated.handles[1].cancelled.is_set(), "the server to cancel the queued request")
        gated.open()
        first_body = first.read()
    assert first_body.endswith(b"data: [DONE]\n\n")
    second = gated.handles[1]
    row = row_of(policy, second.request.request_id)
    assert (row["outcome"], row["output_tokens"], row["neurons"]) == ("aborted", 0, 0.0)
    assert second.started_at == 0.0
    assert gated.model.prefilled == [gated.handles[0].request.prompt_ids]  # type: ignore[attr-defined]
    row_of(policy, gated.handles[0].request.request_id)  # (written after its metrics)
    assert prompt_tokens_counted(live) - before == len(gated.handles[0].request.prompt_ids)
    wait_for(lambda: gated.stats().running == gated.stats().waiting == 0, "the engine to be idle")


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "collect"])
def test_a_request_queued_at_a_forced_exit_still_writes_its_request_line(
        served: tuple[LiveServer, Policy], gated: GatedEngine, stream: bool, caplog: pytest.LogCaptureFixture) -> None:
    """A forced exit (uvicorn's, after a second signal, when the engine has not ended the requests first) cancels
    the tasks of a request still waiting for its slot and of a running stream's observer: neither wrote its request
    line (the ledger's rows come from the engine's side)."""
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    live, _policy = served
    gated.allow()  # the first request takes the slot and holds it
    with socket.create_connection(("127.0.0.1", live.port)) as first, \
            socket.create_connection(("127.0.0.1", live.port)) as second:
        for count, (sock, body) in enumerate(((first, {**LONG, "max_tokens": 8, "stream": True}),
                                              (second, {"prompt": "A cat", "raw": True, "max_tokens": 8,
                                                        "stream": stream})), start=1):
            payload = json.dumps(body).encode()
            sock.sendall(f"POST {RUN} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                         f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
            wait_for(lambda n=count: len(gated.handles) == n, "the request to reach the engine")
        wait_for(lambda: gated.stats().waiting == 1, "the second request to queue")
        live.server.force_exit = True
        live.server.should_exit = True
        live.thread.join(20)
        assert not live.thread.is_alive()
    ids = [handle.request.request_id for handle in gated.handles]
    lines = [r.fields for r in caplog.records if r.name == REQUEST_LOGGER and r.fields.get("request_id") in ids]
    assert sorted(line["request_id"] for line in lines) == sorted(ids), lines  # one line each
    (running,) = [line for line in lines if line["request_id"] == ids[0]]
    assert (running["status"], running["error_code"], running["outcome"]) == (200, 3040, "error"), running
    (queued,) = [line for line in lines if line["request_id"] == ids[1]]
    assert (queued["status"], queued["error_code"]) == (500, 3043), queued


def _post(url: str, token: str, account: str, body: dict[str, Any]) -> httpx.Response:
    """One request on a client of its own (for a thread): its answer, read whole."""
    with httpx.Client(base_url=url, timeout=30) as http:
        return http.post(f"/client/v4/accounts/{account}/ai/run/{MODEL}", headers={"Authorization": f"Bearer {token}"},
                         json=body)


def test_a_newcomer_account_takes_the_place_of_the_newest_waiting_request_of_the_account_holding_most(
        catalog: Catalog, gated: GatedEngine) -> None:
    """One slot and a queue of 2, all held by one account: another account's stream is still taken, and the first
    account's newest waiting request — a stream — is answered 429/3040 at once (no engine step runs meanwhile),
    before any byte of a 200, exactly as a full queue refuses: no ledger row, its reservation given back. The
    newcomer is served; the first account's retry is refused as by a full queue. An audit found the
    newcomer refused on every try (the SDK's 3 attempts) while the others each stayed within their share."""
    policy = Policy.in_memory(rate_limits=False, cache=False, daily_neurons=10_000)
    app = create_app(catalog, {MODEL: gated}, TOKENS, policy=policy, limits=RequestLimits(stall_timeout=1.0))
    allocation = policy.allocation
    assert allocation is not None
    body = {**LONG, "max_tokens": 4}
    with LiveServer(app) as live, ThreadPoolExecutor(4) as pool:
        gated.allow()  # the first request takes the slot
        first = pool.submit(_post, live.url, TOKEN, ACCOUNT, {**body, "stream": True})
        wait_for(lambda: gated.stats().running == 1, "the first request to take the slot")
        queued = []
        for waiting, stream in ((1, False), (2, True)):  # the stream is the newer
            queued.append(pool.submit(_post, live.url, TOKEN, ACCOUNT, {**body, "stream": stream}))
            wait_for(lambda n=waiting: gated.stats().waiting == n, "a request to queue")
        wait_for(lambda: allocation.reserved(ACCOUNT) > 0 and len(gated.handles) == 3, "three reservations")
        held = allocation.reserved(ACCOUNT)
        steps = gated.steps_done
        newcomer = pool.submit(_post, live.url, OTHER_TOKEN, OTHER_ACCOUNT, {**body, "stream": True})
        displaced = queued[1].result(timeout=20)
        assert (displaced.status_code, displaced.json()["errors"][0]["code"]) == (429, 3040)
        assert displaced.headers["retry-after"] == "1" and displaced.headers["content-type"] == "application/json"
        retry = _post(live.url, TOKEN, ACCOUNT, {**body, "stream": True})
        assert (retry.status_code, retry.json()["errors"][0]["code"]) == (429, 3040)
        assert gated.steps_done == steps and gated.stats().waiting == 2
        wait_for(lambda: allocation.reserved(ACCOUNT) == pytest.approx(held * 2 / 3), "the reservation released")
        gated.open()
        answers = [first.result(timeout=30), queued[0].result(timeout=30), newcomer.result(timeout=30)]
    assert [a.status_code for a in answers] == [200, 200, 200]
    assert answers[2].text.endswith("data: [DONE]\n\n")
    first_handle, older, refused, other = gated.handles
    assert refused.started_at == 0.0 and refused.request.request_id == displaced.headers["cf-ai-req-id"]
    for handle in (first_handle, older, other):
        assert row_of(policy, handle.request.request_id)["outcome"] == "ok"
    with policy.ledger.database.connect() as conn:
        ids = set(conn.execute(sa.select(policy.ledger.table.c.request_id)).scalars())
    assert ids == {h.request.request_id for h in (first_handle, older, other)}  # none for the two refused
    assert allocation.reserved(ACCOUNT) == allocation.reserved(OTHER_ACCOUNT) == 0
    policy.close()


def test_frames_that_wait_only_for_the_event_loop_are_not_cut() -> None:
    """The engine's tokens of an event-loop pause reach the stream together: past UNSENT_ANSWER_BYTES while nothing
    is being sent, they are no client's fault and are kept; the same frames while a send waits on the connection
    cut the stream (found by review: the bound counted both alike, so a reading client could be cut)."""
    frame = b"x" * 200
    for sending in (False, True):
        handle = SimpleNamespace(cancelled=False)
        handle.cancel = lambda handle=handle: setattr(handle, "cancelled", True)
        call = SimpleNamespace(_cut=asyncio.Event(), _unsent=0, _response=SimpleNamespace(sending=sending))
        sink: asyncio.Queue[bytes] = asyncio.Queue()
        count = 2 * UNSENT_ANSWER_BYTES // len(frame)
        for _ in range(count):
            InferenceCall._queue_frame(call, handle, sink, frame)  # type: ignore[arg-type]
        kept = sink.qsize() * len(frame)
        if sending:
            assert handle.cancelled and call._cut.is_set() and UNSENT_ANSWER_BYTES - len(frame) < kept
            assert kept <= UNSENT_ANSWER_BYTES
        else:
            assert not handle.cancelled and not call._cut.is_set() and kept == count * len(frame)
