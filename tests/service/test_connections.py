"""What one client can do to the server's connections (`service/connections.py`), tried with raw sockets against a
real server: floods of connections that send nothing, connections that are all busy, keep-alive clients beyond
the limit, a client that stops reading.

Small numbers (`max_connections` 4 or 8) keep each test to a second or two (keep-alive clients racing: ~7 s).
"""

from __future__ import annotations

import contextlib
import json
import logging
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest
from benchmarks.common import free_port
from fastapi import FastAPI

from int8serve.catalog.registry import Catalog
from int8serve.engine.scheduler import Engine
from int8serve.service.app import REQUEST_ID_HEADER, create_app
from int8serve.service.connections import (
    KEEP_ALIVE_GRACE,
    REDIS_CONNECTIONS,
    REFUSAL_TIMEOUT,
    REFUSALS,
    ConnectionBudget,
    bytes_waiting,
    fds_needed,
)
from int8serve.service.inference import RequestLimits
from int8serve.service.policy import Policy
from int8serve.service.request_log import REQUEST_LOGGER

from .conftest import ACCOUNT, MODEL, SLOW_MODEL, TOKEN, TOKENS, LiveServer, stuck_reader, wait_for

RUN = f"/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}"
SEARCH = f"/client/v4/accounts/{ACCOUNT}/ai/models/search"
AUTH = f"Authorization: Bearer {TOKEN}\r\n"


@pytest.fixture(scope="module")
def small_app(catalog: Catalog, engines: dict[str, Engine]) -> Iterator[FastAPI]:
    """One engine; a body may take 5 s to arrive, so that a half-sent body keeps its connection busy."""
    policy = Policy.in_memory(rate_limits=False, cache=False)
    yield create_app(catalog, {MODEL: engines[MODEL]}, TOKENS, policy=policy, limits=RequestLimits(body_timeout=5))
    policy.close()


def _connect(live: LiveServer) -> socket.socket:
    return socket.create_connection(("127.0.0.1", live.port), timeout=10)


def _read_response(sock: socket.socket) -> tuple[str, dict[str, str], bytes]:
    """One HTTP/1.1 response with a Content-Length: its status line, headers (lower-case names) and body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status, *lines = head.decode("latin-1").split("\r\n")
    headers = {name.strip().lower(): value.strip() for name, _, value in (line.partition(":") for line in lines)}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        assert chunk, "the connection closed in the middle of a body"
        body += chunk
    return status, headers, body


def _get(sock: socket.socket, path: str) -> tuple[str, dict[str, str], bytes]:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n{AUTH}\r\n".encode())
    return _read_response(sock)


def _closed_by_server(sock: socket.socket, timeout: float = 5.0) -> bool:
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _wait(condition: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def _open_connections(live: LiveServer) -> int:
    return len(live.server.server_state.connections)


# --- a flood of connections that send nothing ---------------------------------------------------------------------


def test_connections_that_send_nothing_cannot_keep_anyone_out(small_app: FastAPI) -> None:
    """30 silent connections against a limit of 8: the oldest silent ones are closed for the newcomers, and neither
    a keep-alive connection opened before the flood nor a new client is refused."""
    with LiveServer(small_app, max_connections=8) as live, ExitStack() as stack:
        kept = stack.enter_context(_connect(live))
        assert _get(kept, "/healthz")[0] == "HTTP/1.1 200 OK"
        flood = [stack.enter_context(_connect(live)) for _ in range(30)]
        closed = [_closed_by_server(sock, timeout=2) for sock in flood[:23]]
        assert all(closed), closed  # the oldest silent connections made room, at once
        assert _get(kept, SEARCH)[0] == "HTTP/1.1 200 OK"  # the keep-alive connection is served
        assert httpx.get(f"{live.url}{SEARCH}", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
        assert not _closed_by_server(flood[-1], timeout=0.2)  # the newest silent one is still open
        assert _open_connections(live) <= 8
        small_app.state.services.metrics.watch_connections(live.server.config.http.budget)  # as `serve` does
        metrics = httpx.get(f"{live.url}/metrics").text
    assert "int8serve_open_connections 8.0" in metrics
    assert 'int8serve_connections_closed_total{reason="evicted"} 24.0' in metrics  # 23, and one for the new client


# --- every connection busy ----------------------------------------------------------------------------------------


def _busy(live: LiveServer) -> socket.socket:
    """A connection whose request is in progress: its headers are in, its body is not."""
    sock = _connect(live)
    sock.sendall(f"POST {RUN} HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Length: 100\r\n\r\n{{\"prompt\"".encode())
    return sock


def test_a_newcomer_beyond_the_limit_is_answered_429_3040_in_the_envelope(small_app: FastAPI,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """4 connections busy with requests against a limit of 4: none is closed, and a newcomer's request is answered
    429/3040 in its API's envelope (Workers AI's capacity refusal, which its SDKs retry; it was a 503), with
    Retry-After and a request id, counted in /metrics and logged; once the busy ones are gone, newcomers are served
    again."""
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    with LiveServer(small_app, max_connections=4) as live, ExitStack() as stack:
        busy = [stack.enter_context(_busy(live)) for _ in range(4)]
        _wait(lambda: small_app.state.services.lifecycle.requests == 4)  # the 4 are in the app, reading their body
        with _connect(live) as newcomer:
            body = b'{"prompt":"Once","raw":true,"max_tokens":2}'
            newcomer.sendall(f"POST {RUN} HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Length: {len(body)}\r\n\r\n".encode()
                             + body)
            status, headers, answer = _read_response(newcomer)
        assert status.startswith("HTTP/1.1 429 "), (status, answer)
        assert headers["content-type"] == "application/json"
        assert json.loads(answer) == {"success": False, "errors": [{"code": 3040, "message": "Capacity temporarily "
                                      "exceeded, please try again."}], "messages": [], "result": {}}
        assert headers["retry-after"] == "1" and headers["connection"] == "close"
        request_id = headers[REQUEST_ID_HEADER]
        with _connect(live) as newcomer:
            newcomer.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{AUTH}Content-Length: 2\r\n\r\n{{}}"
                             .encode())
            status, headers, answer = _read_response(newcomer)
        assert status.startswith("HTTP/1.1 429 ") and headers["retry-after"] == "1"
        assert json.loads(answer) == {"error": {"message": "Capacity temporarily exceeded, please try again.",
                                                "type": "capacity_error", "param": None, "code": 3040}}  # OpenAI's
        with _connect(live) as scraper:  # probes and scrapes are answered all the same
            status, _headers, metrics = _get(scraper, "/metrics")
        assert status == "HTTP/1.1 200 OK"
        assert f'int8serve_http_requests_total{{route="{RUN_ROUTE}",status="429"}} 1.0' in metrics.decode()
        assert 'int8serve_errors_total{code="3040",status="429"} 2.0' in metrics.decode()
        assert all(not _closed_by_server(sock, timeout=0.05) for sock in busy)  # none of the busy ones was closed
        for sock in busy:
            sock.close()
        _wait(lambda: _open_connections(live) == 0)
        assert httpx.get(f"{live.url}{SEARCH}", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    [line] = [r.fields for r in caplog.records if getattr(r, "fields", {}).get("request_id") == request_id]
    assert (line["status"], line["error_code"], line["route"]) == (429, 3040, RUN_ROUTE)


RUN_ROUTE = "/client/v4/accounts/{account_id}/ai/run/{model:path}"


def _post_back_to_back(url: str, requests: int, first_answered: threading.Event) -> Counter[object]:
    """`requests` small POSTs on one keep-alive client, each sent as soon as the previous answer is read: how they
    ended, as (status, code) or the transport error's name. `first_answered` is set once the first has ended."""
    outcomes: Counter[object] = Counter()
    body = {"prompt": "Once", "raw": True, "max_tokens": 1}
    with httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30) as client:
        for _ in range(requests):
            try:
                answer = client.post(url, json=body)
            except httpx.TransportError as err:
                outcomes[type(err).__name__] += 1
                continue
            finally:
                first_answered.set()
            code = None if answer.status_code == 200 else answer.json()["errors"][0]["code"]
            outcomes[answer.status_code, code] += 1
            assert answer.status_code == 200 or answer.headers["retry-after"] == "1", answer.headers
    return outcomes


def test_keep_alive_clients_beyond_the_limit_are_never_reset(small_app: FastAPI) -> None:
    """6 keep-alive clients against a limit of 4, each sending small POSTs back to back: every request is answered,
    200 or 429/3040. A newcomer closed the connection idle the longest, and a connection is idle from its answer's end
    until the event loop reads the next request, which its client sends at once: closed with that request unread, it
    was reset (a transport error on a POST the client cannot safely retry; ~1 in 6 requests at 10 clients against a
    limit of 8), and the evicted client came back to close another. The clients start one after another (each once
    the one before has its first answer), as connections that open at once are another case (see the module
    docstring of `connections.py`)."""
    with LiveServer(small_app, max_connections=4) as live, ThreadPoolExecutor(6) as pool:
        runs = []
        for _ in range(6):
            first_answered = threading.Event()
            runs.append(pool.submit(_post_back_to_back, f"{live.url}{RUN}", 150, first_answered))
            assert first_answered.wait(10)
        outcomes = sum((run.result() for run in runs), Counter())
    assert set(outcomes) <= {(200, None), (429, 3040)}, outcomes
    assert outcomes[200, None] >= 150, outcomes  # the clients that hold a connection are served


class _FakeConnection:
    """What `ConnectionBudget` asks of a connection: whether bytes wait unread on it, and to close it."""

    def __init__(self) -> None:
        self.unread = False
        self.evicted = False

    def has_unread_input(self) -> bool:
        return self.unread

    def evict(self) -> None:
        self.evicted = True


def test_a_newcomer_closes_no_connection_whose_request_is_coming_in() -> None:
    """Limit 2: a keep-alive connection idle for less than `KEEP_ALIVE_GRACE`, and one without a request head whose
    client's bytes wait unread, are not closed for a newcomer (refused instead); once the idle one has been idle
    that long, it is closed, unless bytes wait on it too."""
    budget = ConnectionBudget(2)
    idle, arriving, newcomer = _FakeConnection(), _FakeConnection(), _FakeConnection()
    assert budget.admit(idle)  # type: ignore[arg-type]
    budget.idle(idle)  # type: ignore[arg-type]
    assert budget.admit(arriving)  # type: ignore[arg-type]
    arriving.unread = True
    assert not budget.admit(newcomer)  # type: ignore[arg-type]
    time.sleep(KEEP_ALIVE_GRACE)
    idle.unread = True
    assert not budget.admit(newcomer)  # type: ignore[arg-type]
    assert not (idle.evicted or arriving.evicted) and budget.closed["evicted"] == 0
    idle.unread = False
    assert budget.admit(newcomer)  # type: ignore[arg-type]
    assert (idle.evicted, arriving.evicted, budget.open, budget.closed["evicted"]) == (True, False, 2, 1)
    arriving.unread = False  # its bytes read, its head not whole yet: the oldest without a request head goes first
    assert budget.admit(_FakeConnection())  # type: ignore[arg-type]
    assert arriving.evicted and not newcomer.evicted


def test_bytes_waiting_peeks_without_reading_or_closing() -> None:
    server, client = socket.socketpair()
    with server, client:
        server.setblocking(False)
        assert not bytes_waiting(server)
        client.sendall(b"POST / HTTP/1.1\r\n")
        _wait(lambda: bytes_waiting(server))
        assert server.recv(100) == b"POST / HTTP/1.1\r\n"  # still there, the socket still open
        client.close()
        assert not bytes_waiting(server)  # the end of the input: nothing to keep
    assert not bytes_waiting(server)  # closed
    assert not bytes_waiting(None)


def test_newcomers_beyond_the_limit_that_send_nothing_are_closed_soon(small_app: FastAPI) -> None:
    """Every connection busy: 16 newcomers wait for their request head (2 s at most), the others are closed at once,
    and the budget's count stays at the limit."""
    with LiveServer(small_app, max_connections=2, header_timeout=30) as live, ExitStack() as stack:
        busy = [stack.enter_context(_busy(live)) for _ in range(2)]
        _wait(lambda: small_app.state.services.lifecycle.requests == 2)
        newcomers = [stack.enter_context(_connect(live)) for _ in range(REFUSALS + 4)]
        started = time.monotonic()
        assert all(_closed_by_server(sock, timeout=1) for sock in newcomers[REFUSALS:])  # 16 were waiting already
        assert not any(_closed_by_server(sock, timeout=0.01) for sock in newcomers[:REFUSALS])
        assert all(_closed_by_server(sock, timeout=5) for sock in newcomers)
        assert time.monotonic() - started < REFUSAL_TIMEOUT + 1.5
        budget = live.server.config.http.budget
        assert (budget.open, budget.refusing, budget.closed["over_limit"]) == (2, 0, 4)
        assert all(not _closed_by_server(sock, timeout=0.05) for sock in busy)


# --- a client that never reads ------------------------------------------------------------------------------------


def _never_reading(live: LiveServer) -> socket.socket:
    """A connection with a 2 KiB receive buffer that has sent 150 pipelined `GET /openapi.json` and reads nothing."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.connect(("127.0.0.1", live.port))
    sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * 150)
    return sock


def test_a_client_that_reads_no_answer_is_cut_after_the_stall_timeout(small_app: FastAPI) -> None:
    """Answers that are not streamed have the stall timeout too: a client that pipelines requests and never reads
    their answers is aborted once its answers wait for it over `stall_timeout` (1 s here), not held for ever."""
    with LiveServer(small_app, stall_timeout=1.0) as live, _never_reading(live) as sock:
        budget = live.server.config.http.budget
        _wait(lambda: budget.open == 1)
        _wait(lambda: budget.open == 0, timeout=8)
        assert budget.closed["write_stalled"] == 1
        received = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                received += chunk
        assert received.count(b"HTTP/1.1 200 OK\r\n") < 150  # the rest was given up


def test_a_stream_whose_client_reads_nothing_is_cut_once(catalog: Catalog, engines: dict[str, Engine],
                                                        caplog: pytest.LogCaptureFixture) -> None:
    """The connection's stall rule and the stream's own deadline (both 1 s): the connection's comes first, the stream
    ends as for a client that left — its engine request cancelled long before its 480 tokens, one ledger row
    `aborted` — and one warning says it, not two."""
    caplog.set_level(logging.WARNING)
    policy = Policy.in_memory(rate_limits=False, cache=False)
    app = create_app(catalog, {SLOW_MODEL: engines[SLOW_MODEL]}, TOKENS, policy=policy,
                     limits=RequestLimits(stall_timeout=1.0))
    body = {"model": SLOW_MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 480, "stream": True}
    with stuck_reader(app, body, TOKEN, stall_timeout=1.0) as (live, _sock):
        wait_for(lambda: engines[SLOW_MODEL].stats().running == 1, "the stream to start")
        wait_for(lambda: engines[SLOW_MODEL].stats().running == 0, "the stream to be cut", timeout=10)
        assert live.server.config.http.budget.closed["write_stalled"] == 1
    ledger = policy.ledger
    assert ledger.flush()
    with ledger.database.connect() as conn:
        rows = conn.execute(ledger.table.select()).mappings().all()
    assert [row["outcome"] for row in rows] == ["aborted"] and 0 < rows[0]["output_tokens"] < 480
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warnings == ["aborting a connection whose client left an answer unread for 1.0 s (--stall-timeout)"]
    app.state.services.metrics.unwatch_engines()
    policy.close()


# --- file descriptors ---------------------------------------------------------------------------------------------


def _python(code: str, *args: str, nofile: tuple[int, int], timeout: float = 60, **kwargs: Any
            ) -> subprocess.CompletedProcess[str]:
    """`code` in a fresh interpreter whose limit on open files is `nofile` (soft, hard)."""
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, nofile), **kwargs)


def test_the_soft_limit_on_open_files_is_raised_to_the_hard_one() -> None:
    code = ("import resource; from int8serve.service.connections import raise_fd_limit; "
            "print(raise_fd_limit(8), *resource.getrlimit(resource.RLIMIT_NOFILE))")
    assert _python(code, nofile=(256, 2048)).stdout.split() == ["2048", "2048", "2048"]


def test_serve_refuses_a_connection_limit_beyond_the_open_files(tmp_path: Path) -> None:
    """One line, before anything else is checked (the model folder does not exist), naming what would fit."""
    code = "from int8serve.cli import main; main(['serve', '--max-connections', '5000', '--model', '/nonexistent'])"
    result = _python(code, nofile=(256, 1024), cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "int8serve serve: error: --max-connections 5000 needs up to 5400 open files (16 refused connections, 256 "
        "being accepted, 32 to Redis and 96 for the rest beside them), but this process may open 1024 (ulimit -n): "
        "raise the hard limit (ulimit -Hn, LimitNOFILE=, docker --ulimit nofile=) or lower --max-connections to "
        "624 or less"]
    assert fds_needed(5000) == 5000 + 16 + 256 + REDIS_CONNECTIONS + 96


SERVER = """
import sys
from int8serve.service.connections import ConnectionServer, uvicorn_config

async def app(scope, receive, send):
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})

config = uvicorn_config(app, host="127.0.0.1", port=int(sys.argv[1]), max_connections=1000, lifespan="off",
                        log_level="info")
ConnectionServer(config).run()
"""


def test_accept_running_out_of_file_descriptors_is_one_log_line(tmp_path: Path) -> None:
    """A connection limit beyond what the process may open (64 files): 300 idle connections. accept() fails with
    EMFILE for those beyond, and asyncio reported it with a traceback for every connection it tried — ~66,000 in
    20 s in an audit; one line now. The server still answers once connections are closed."""
    port = free_port()
    with subprocess.Popen([sys.executable, "-c", SERVER, str(port)], stderr=subprocess.PIPE, text=True,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))) as server:
        try:
            _wait(lambda: _answers(port), timeout=20)
            with ExitStack() as stack:
                for _ in range(300):
                    stack.enter_context(socket.create_connection(("127.0.0.1", port)))
                time.sleep(1.5)  # accept() fails, and is tried again after 1 s
            _wait(lambda: _answers(port), timeout=10)
        finally:
            server.send_signal(signal.SIGTERM)
            _, log = server.communicate(timeout=20)
    assert log.count("Too many open files") == 1, log[-3000:]
    # (seen once in a CI run on a Zen 5, 2026-12-07, not reproduced since: the whole traceback, to find its cause)
    assert "Traceback" not in log, log[max(0, log.find("Traceback") - 600):][:6000]
    assert "cannot accept new connections: [Errno 24] Too many open files (this process may open 64 files" in log


APP_LINE = "async def app(scope, receive, send):\n"
SLOW_SERVER = SERVER.replace(APP_LINE, """import asyncio

async def app(scope, receive, send):
    if scope["type"] == "http" and scope["path"] == "/slow":
        await asyncio.sleep(2.5)
""")


def test_a_shutdown_while_accept_waits_to_retry_logs_no_traceback() -> None:
    """asyncio retries accept() a second after it ran out of files, once for every attempt that failed; a SIGTERM
    within that second, with a request still draining, closed the listening socket first, and each retry then raised
    "Invalid file descriptor: -1" with a traceback (the cause of a flaky failure of the test above)."""
    assert APP_LINE in SERVER  # else SLOW_SERVER would answer /slow at once and no request would drain
    port = free_port()
    with subprocess.Popen([sys.executable, "-c", SLOW_SERVER, str(port)], stderr=subprocess.PIPE, text=True,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))) as server:
        try:
            _wait(lambda: _answers(port), timeout=20)
            with ThreadPoolExecutor(1) as pool:
                slow = pool.submit(httpx.get, f"http://127.0.0.1:{port}/slow", timeout=20)
                time.sleep(0.3)  # its request is in
                with ExitStack() as stack:
                    for _ in range(300):
                        stack.enter_context(socket.create_connection(("127.0.0.1", port)))
                    time.sleep(0.3)  # accept() has run out; its retries wait for a second
                    server.send_signal(signal.SIGTERM)
                    time.sleep(0.2)  # the listening socket closes; the drain waits for /slow
                assert slow.result().status_code == 200
        finally:
            if server.poll() is None:
                server.send_signal(signal.SIGTERM)
            _, log = server.communicate(timeout=20)
    assert "Too many open files" in log  # (the case happened)
    assert "Traceback" not in log, log[max(0, log.find("Traceback") - 600):][:3000]
    assert "Invalid file descriptor" not in log


def _answers(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False
