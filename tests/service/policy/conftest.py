"""Policy fixtures: servers of the real engines (stories260K int8, from tests/service/conftest.py), each with a
serving policy of its own, so that rate-limit windows, cached answers and ledger rows of one test never leak into
another.

`policy_server(**settings)` starts one: a fresh `Policy` (its ledger a SQLite file in the test's tmp dir, unless the
settings say otherwise) behind a live uvicorn server on a loopback port. `PolicyServer` has small helpers to call it
as one of the test accounts.

The real backends some tests need (`private_redis`, `pg_proxy`, `pg_schema`) are benchmarks/backends.py's, which
benchmarks/load.py takes away mid-run too.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from benchmarks.backends import PostgresSchema, RedisServer, TcpProxy, delete_keys
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
        self.loop = live.server.servers[0].get_loop()  # the server's event loop, which its policy belongs to
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


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of this test's own, which it may kill."""
    server = RedisServer().start()
    yield server
    server.kill()


@pytest.fixture
def pg_schema() -> Iterator[PostgresSchema]:
    """A fresh PostgreSQL schema for this test, dropped afterwards."""
    schema = PostgresSchema(POSTGRES_URL, prefix="int8serve_test_").create()
    try:
        yield schema
    finally:
        schema.drop()


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A key prefix of our own in the shared Redis; its keys are deleted afterwards."""
    prefix = f"int8serve-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    delete_keys(REDIS_URL, prefix)


@pytest.fixture(params=["local", "shared"])
def backend(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The policy's backends, for `policy_server(**backend, ...)`: "local" is the in-process limiter and cache
    with the SQLite ledger; "shared" is the machine's real Redis (a key prefix of this test's) and PostgreSQL (a
    schema of this test's)."""
    if request.param == "local":
        return {}
    prefix, schema = request.getfixturevalue("redis_prefix"), request.getfixturevalue("pg_schema")
    return {"redis_url": f"{REDIS_URL}?key_prefix={prefix}", "database_url": schema.server_url()}


@pytest.fixture
def pg_proxy() -> Iterator[TcpProxy]:
    """A TCP proxy in front of the machine's PostgreSQL that a test can cut and restore."""
    url = sa.make_url(POSTGRES_URL)
    proxy = TcpProxy((url.host or "127.0.0.1", url.port or 5432)).start()
    yield proxy
    proxy.stop()
