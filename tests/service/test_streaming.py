"""SSE: the exact bytes on the wire, UTF-8 never split, and a client that goes away frees its engine slot."""

from __future__ import annotations

import json
import socket
import time

import httpx
from fastapi import FastAPI

from int8serve.engine.scheduler import Engine

from .conftest import ACCOUNT, SCRIPT_PIECES, SCRIPT_TEXT, SCRIPTED_MODEL, SLOW_MODEL, TOKEN, wait_for

SCRIPTED_URL = f"/client/v4/accounts/{ACCOUNT}/ai/run/{SCRIPTED_MODEL}"
RAW_REPLY = " " + SCRIPT_TEXT  # after a raw prompt the script's first piece, "▁H", keeps its space
SLOW_URL = f"/client/v4/accounts/{ACCOUNT}/ai/run/{SLOW_MODEL}"


def test_sse_bytes_exactly(http: httpx.Client, auth: dict[str, str]) -> None:
    """Frames for every completed character only (the tokens holding part of a character send nothing), UTF-8 as
    is, the usage frame with the request's neurons, [DONE], and the exact content type."""
    body = {"prompt": "Once", "raw": True, "stream": True, "temperature": 0.7}
    with http.stream("POST", SCRIPTED_URL, headers=auth, json=body) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "text/event-stream"
        assert "content-length" not in resp.headers
        raw = resp.read()
    assert len(SCRIPT_PIECES) == 15
    expected = (
        'data: {"response":" H"}\n\n'
        'data: {"response":"é"}\n\n'
        'data: {"response":" "}\n\n'
        'data: {"response":"🙂"}\n\n'
        'data: {"response":" "}\n\n'
        'data: {"response":"世"}\n\n'
        'data: {"response":"界"}\n\n'
        'data: {"response":"","usage":{"prompt_tokens":2,"completion_tokens":15,"total_tokens":17,'
        '"neurons":3.1212}}\n\n'  # 17 tokens x 0.1836 neurons (the card)
        "data: [DONE]\n\n"
    ).encode()  # UTF-8 as is, never \\u escapes
    assert raw == expected


def test_sse_chunks_hold_whole_characters(http: httpx.Client, auth: dict[str, str]) -> None:
    body = {"prompt": "Once", "raw": True, "stream": True}
    with http.stream("POST", SCRIPTED_URL, headers=auth, json=body) as resp:
        chunks = list(resp.iter_raw())
    for chunk in chunks:
        chunk.decode("utf-8")  # strict: no chunk ends inside a character
    deltas = [json.loads(line[6:])["response"] for line in b"".join(chunks).decode().split("\n\n")
              if line.startswith("data: {")]
    assert "".join(deltas) == RAW_REPLY
    assert all(d for d in deltas[:-1]) and deltas[-1] == ""  # no empty delta before the usage frame
    collected = http.post(SCRIPTED_URL, headers=auth, json={"prompt": "Once", "raw": True}).json()
    assert collected["result"]["response"] == RAW_REPLY


def test_emoji_and_cjk_prompt_on_the_real_model(http: httpx.Client, run_url: str, auth: dict[str, str]) -> None:
    """A raw prompt full of byte-fallback tokens and the hottest allowed sampler make the real model emit byte
    tokens (broken sequences and whole multi-byte characters alike): every chunk on the wire is valid UTF-8, no
    frame is empty, and the frames concatenated equal the collected answer, U+FFFD included."""
    body = {"prompt": "Lily 🙂 saw 世界 and 😀 café", "raw": True, "max_tokens": 200, "temperature": 5.0, "seed": 3}
    collected = http.post(run_url, headers=auth, json=body).json()["result"]["response"]
    assert any(ord(ch) > 0x7F and ch != "\ufffd" for ch in collected)  # the test exercises multi-byte output
    with http.stream("POST", run_url, headers=auth, json={**body, "stream": True}) as resp:
        chunks = list(resp.iter_raw())
    for chunk in chunks:
        chunk.decode("utf-8")  # strict
    frames = b"".join(chunks).decode("utf-8").split("\n\n")
    deltas = [json.loads(f[6:])["response"] for f in frames if f.startswith("data: {")]
    assert all(deltas[:-1]) and deltas[-1] == ""
    assert "".join(deltas) == collected
    assert not any(0xD800 <= ord(ch) <= 0xDFFF for ch in collected)


def test_frames_are_flushed_as_produced(base_url: str, auth: dict[str, str]) -> None:
    """On the slow engine (~25 ms a step) the first frame arrives long before the last one."""
    body = {"prompt": "Once upon a time", "raw": True, "stream": True, "max_tokens": 40, "temperature": 0}
    arrivals = []
    with httpx.Client(base_url=base_url, timeout=30) as own, \
            own.stream("POST", SLOW_URL, headers=auth, json=body) as resp:
        for line in resp.iter_lines():
            if line.startswith("data: "):
                arrivals.append(time.monotonic())
    assert len(arrivals) > 10
    assert arrivals[-1] - arrivals[0] > 0.5  # 40 steps: ~1 s of generation, seen frame by frame


def _wait_idle(engine: Engine, what: str) -> None:
    """Poll until `engine` runs and queues nothing (a generous deadline: the 400-token answer would take ~10 s,
    and whether it was cut is read from its row, not from the clock)."""
    deadline = time.monotonic() + 30
    while engine.stats().running or engine.stats().waiting:
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def _row(app: FastAPI, request_id: str | None = None) -> dict[str, object]:
    """The ledger row of `request_id` (None: the slow model's latest). Polled for a while: a cancelled request's
    row is recorded when its handler sees the client gone, which can come after the engine has freed its slot (a
    CI run on a Sapphire Rapids, 2026-12-05, found it missing right after the slot was free)."""
    ledger = app.state.services.policy.ledger
    table = ledger.table
    query = (table.select().where(table.c.request_id == request_id) if request_id is not None else
             table.select().where(table.c.model == SLOW_MODEL).order_by(table.c.time.desc()).limit(1))

    def read() -> dict[str, object] | None:
        assert ledger.flush()
        with ledger.database.connect() as conn:
            found = conn.execute(query).mappings().first()
        return dict(found) if found is not None else None

    wait_for(lambda: read() is not None, f"the ledger row of request {request_id}", timeout=10)
    row = read()
    assert row is not None
    return row


def test_disconnected_stream_frees_its_slot(http: httpx.Client, base_url: str, auth: dict[str, str],
                                            engines: dict[str, Engine], app: FastAPI) -> None:
    """400 tokens at ~25 ms a step would take 10 s; closing the connection after the first frame cancels the
    request: its slot is freed and its row is `aborted`, with fewer tokens than asked for."""
    body = {"prompt": "Once upon a time", "raw": True, "stream": True, "max_tokens": 400, "temperature": 0}
    with httpx.Client(base_url=base_url, timeout=30) as own, \
            own.stream("POST", SLOW_URL, headers=auth, json=body) as resp:
        assert resp.status_code == 200
        request_id = resp.headers["cf-ai-req-id"]
        lines = resp.iter_lines()  # kept: a dropped line iterator closes the connection (httpcore), and the
        first = next(lines)        # request could be cancelled before /readyz answers (it flaked 1 run in ~5)
        assert first.startswith('data: {"response":')
        assert http.get("/readyz").json()["models"][SLOW_MODEL]["running"] == 1
    _wait_idle(engines[SLOW_MODEL], "the slot was not freed after the client left")
    assert engines[SLOW_MODEL].stats().free_slots == 1
    row = _row(app, request_id)
    assert row["outcome"] == "aborted" and 1 <= row["output_tokens"] < 400  # type: ignore[operator]


def test_disconnected_running_collect_is_cancelled(base_url: str, auth: dict[str, str],
                                                   engines: dict[str, Engine], app: FastAPI) -> None:
    """A non-streamed request whose client leaves while it runs is cancelled too: slot freed, row `aborted`.
    (A request whose client leaves while it is still queued: `test_abort.py`.)"""
    payload = json.dumps({"prompt": "Once upon a time", "raw": True, "max_tokens": 400}).encode()
    host, port = base_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f"POST {SLOW_URL} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
                     f"Content-Length: {len(payload)}\r\n\r\n".encode() + payload)
        deadline = time.monotonic() + 30
        while engines[SLOW_MODEL].stats().running == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
    _wait_idle(engines[SLOW_MODEL], "the slot was not freed after the client left")
    row = _row(app)
    assert row["outcome"] == "aborted" and row["output_tokens"] < 400  # type: ignore[operator]
