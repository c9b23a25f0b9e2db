"""Policy fixtures: servers of the real engines (stories260K int8, from tests/service/conftest.py), each with a
serving policy of its own, so that rate-limit windows, cached answers and ledger rows of one test never leak into
another.

`policy_server(**settings)` starts one: a fresh `Policy` (its ledger a SQLite file in the test's tmp dir, unless the
settings say otherwise) behind a live uvicorn server on a loopback port. `PolicyServer` has small helpers to call it
as one of the test accounts.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import sqlalchemy as sa
from fastapi import FastAPI

from int8serve.catalog.registry import Catalog
from int8serve.engine.scheduler import Engine
from int8serve.service.app import create_app
from int8serve.service.policy import Policy, PolicySettings

from ..conftest import MODEL, SLOW_MODEL, TOKENS, LiveServer

CARD_NEURON_COST = 0.1836  # the built-in card's input and output token cost
STAGING_ACCOUNT = "32118455"  # the card gives it 60 requests a minute
ACCOUNTS = {"acct-a": "tok-acct-a", "acct-b": "tok-acct-b", "acct-c": "tok-acct-c", "acct-d": "tok-acct-d",
            "acct-e": "tok-acct-e", STAGING_ACCOUNT: "tok-staging"}
POLICY_TOKENS = {**TOKENS, **{token: account for account, token in ACCOUNTS.items()}}

# Redis and PostgreSQL for the tests that need real ones (override with these variables elsewhere)
REDIS_URL = os.environ.get("INT8SERVE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_URL = os.environ.get("INT8SERVE_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def auth_for(account: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {ACCOUNTS[account]}"}


@contextlib.contextmanager
def collected_request(server: PolicyServer, max_tokens: int) -> Iterator[None]:
    """A non-streamed request of acct-a on the slow engine, sent on a raw connection kept open until the block ends:
    then its client leaves while it runs."""
    payload = json.dumps({"prompt": "Once upon a time", "raw": True, "max_tokens": max_tokens, "temperature": 0})
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(f"POST {server.run_url('acct-a', SLOW_MODEL)} HTTP/1.1\r\nHost: x\r\n"
                     f"Authorization: Bearer {ACCOUNTS['acct-a']}\r\nContent-Length: {len(payload)}\r\n\r\n"
                     f"{payload}".encode())
        yield


class PolicyServer:
    """A live server with its own policy."""

    def __init__(self, live: LiveServer, app: FastAPI, policy: Policy) -> None:
        self.url = live.url
        self.app = app
        self.policy = policy
        self.http = httpx.Client(base_url=live.url, timeout=30)

    def run_url(self, account: str, model: str = MODEL) -> str:
        return f"/client/v4/accounts/{account}/ai/run/{model}"

    def post(self, account: str, body: Any, headers: dict[str, str] | None = None,
             model: str = MODEL) -> httpx.Response:
        return self.http.post(self.run_url(account, model), headers={**auth_for(account), **(headers or {})},
                              json=body)

    def stream(self, account: str, body: dict[str, Any], headers: dict[str, str] | None = None,
               model: str = MODEL) -> tuple[httpx.Response, bytes]:
        with self.http.stream("POST", self.run_url(account, model), headers={**auth_for(account), **(headers or {})},
                              json={**body, "stream": True}) as resp:
            return resp, resp.read()

    def usage(self, account: str, as_account: str | None = None, **query: str) -> httpx.Response:
        return self.http.get(f"/client/v4/accounts/{account}/ai/usage", params=query,
                             headers=auth_for(as_account or account))

    def rows(self) -> list[dict[str, Any]]:
        """Every ledger row, once all recorded rows are written."""
        assert self.policy.ledger.flush(), "the ledger could not write its rows"
        return ledger_rows(self.policy)

    def wait_rows(self, count: int, timeout: float = 10.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(rows := self.rows()) < count:
            assert time.monotonic() < deadline, f"expected {count} ledger rows, have {rows}"
            time.sleep(0.05)
        return rows


def ledger_rows(policy: Policy) -> list[dict[str, Any]]:
    table = policy.ledger.table
    with policy.ledger.database.connect() as conn:
        return [dict(r._mapping) for r in conn.execute(sa.select(table).order_by(table.c.time))]


@pytest.fixture
def policy_server(tmp_path: Path, catalog: Catalog, engines: dict[str, Engine]
                  ) -> Iterator[Callable[..., PolicyServer]]:
    numbers = itertools.count()
    with contextlib.ExitStack() as stack:

        def start(clock: Callable[[], float] = time.time, monotonic: Callable[[], float] = time.monotonic,
                  **settings: Any) -> PolicyServer:
            settings.setdefault("data_dir", tmp_path / f"data{next(numbers)}")
            policy = Policy.build(PolicySettings(**settings), clock=clock, monotonic=monotonic)
            stack.callback(policy.close)
            app = create_app(catalog, engines, POLICY_TOKENS, policy=policy)
            live = stack.enter_context(LiveServer(app))
            server = PolicyServer(live, app, policy)
            stack.callback(server.http.close)
            return server

        yield start


class FakeClock:
    """Unix seconds that move only when told to (`advance`): cache ages without sleeping."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class UtcClock:
    """A naive-UTC clock standing in for `ledger.utc_now` wherever the service reads it (`utc_clock` fixture):
    each reading is one microsecond after the last, so rows keep their order, and the day is the test's choice."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        self.now += timedelta(microseconds=1)
        return self.now

    def set(self, now: datetime) -> None:
        self.now = now


@pytest.fixture
def utc_clock(monkeypatch: pytest.MonkeyPatch) -> UtcClock:
    """The service's UTC clock at noon of a fixed day, so that no test straddles midnight by accident."""
    from int8serve.service import inference
    from int8serve.service.policy import allocation, ledger, usage

    clock = UtcClock(datetime(2026, 6, 15, 12, 0, 0))
    for module in (inference, allocation, ledger, usage):
        monkeypatch.setattr(module, "utc_now", clock)
    return clock


def sse_data(raw: bytes) -> list[Any]:
    """The JSON payloads of an SSE body ("[DONE]" as a string)."""
    out = []
    for frame in raw.decode("utf-8").split("\n\n"):
        if frame.startswith("data: "):
            payload = frame[6:]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- real backends: a private redis-server, a cuttable TCP proxy, a PostgreSQL schema of our own ------------------


class RedisServer:
    """A private `redis-server` on a loopback port (no persistence), which a test can kill and restart."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> RedisServer:
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.exceptions.ConnectionError:
                assert self.process.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        client.close()
        return self

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis(port=self.port)


class TcpProxy:
    """Forwards a loopback port to `upstream`; `cut()` drops every connection and refuses new ones (they are
    accepted and closed at once) until `restore()`; `blackhole()` keeps every connection open, accepts new ones,
    and forwards nothing until `restore()` — a database host that froze: TCP is fine, no answer ever comes."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)  # so that stop() is noticed
        self.port = self.listener.getsockname()[1]
        self.cut_off = threading.Event()
        self.blackholed = threading.Event()
        self.stopped = threading.Event()
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, name="tcp-proxy", daemon=True)

    def start(self) -> TcpProxy:
        self.thread.start()
        return self

    def cut(self) -> None:
        self.cut_off.set()
        self._drop_all()

    def blackhole(self) -> None:
        self.blackholed.set()

    def restore(self) -> None:
        self.cut_off.clear()
        self.blackholed.clear()

    def stop(self) -> None:
        self.stopped.set()
        self.listener.close()
        self._drop_all()
        self.thread.join(5)

    def _drop_all(self) -> None:
        with self.lock:
            sockets, self.sockets = self.sockets, []
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            client.settimeout(None)
            if self.cut_off.is_set():
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self.lock:
                self.sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                while self.blackholed.is_set() and not self.stopped.is_set():  # held, not lost
                    time.sleep(0.02)
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, which it may kill."""
    server = RedisServer(free_port()).start()
    yield server
    server.kill()


def postgres_url(schema: str, port: int | None = None) -> str:
    """The test database's URL with `schema` as the only search path (so the ledger table is made there)."""
    url = sa.make_url(POSTGRES_URL)
    if port is not None:
        url = url.set(port=port)
    return url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)


@pytest.fixture
def pg_schema() -> Iterator[str]:
    """A fresh PostgreSQL schema for this test, dropped afterwards."""
    schema = f"int8serve_test_{uuid.uuid4().hex[:12]}"
    engine = sa.create_engine(POSTGRES_URL)
    with engine.begin() as conn:
        conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
    try:
        yield schema
    finally:
        with engine.begin() as conn:
            conn.execute(sa.text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        engine.dispose()


def pg_rows(schema: str, table: str = "int8serve_usage") -> list[dict[str, Any]]:
    engine = sa.create_engine(POSTGRES_URL)
    try:
        with engine.connect() as conn:
            result = conn.execute(sa.text(f'SELECT * FROM "{schema}"."{table}" ORDER BY time'))
            return [dict(r._mapping) for r in result]
    finally:
        engine.dispose()


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of our own in the shared Redis; its keys are deleted afterwards."""
    prefix = f"int8serve-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture(params=["local", "shared"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The policy's backends, for `policy_server(**backend, ...)`: "local" is the in-process limiter and cache
    with the SQLite ledger; "shared" is the machine's real Redis (a key prefix of this test's) and PostgreSQL (a
    schema of this test's)."""
    if request.param == "local":
        return {}
    prefix, schema = request.getfixturevalue("redis_prefix"), request.getfixturevalue("pg_schema")
    return {"redis_url": f"{REDIS_URL}?key_prefix={prefix}", "database_url": postgres_url(schema)}


@pytest.fixture
def pg_proxy() -> Iterator[TcpProxy]:
    """A TCP proxy in front of the machine's PostgreSQL that a test can cut and restore."""
    url = sa.make_url(POSTGRES_URL)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432)).start()
    yield proxy
    proxy.stop()
