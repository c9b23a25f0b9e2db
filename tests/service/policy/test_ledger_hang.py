"""A ledger database that hangs: the TCP connection stays open and nothing ever comes back (a frozen host; here a
proxy in front of the real PostgreSQL in "blackhole" mode), or a SQLite file that another process keeps locked.

No request may wait for it (docs/policy.md: "a database that hangs is treated as a database that is away"): every
answer comes at once, a stream's final usage frame included, because the row only has to reach the spool; the
usage endpoint answers 503/1002 within the database timeout; a shutdown takes bounded time and leaves every
acknowledged row in the spool, replayed at the next start."""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from benchmarks.backends import PostgresSchema, TcpProxy

from int8serve.service.policy.ledger import Ledger, UsageRow, make_database, utc_now
from int8serve.service.policy.policy import LEDGER_FILE, SPOOL_FILE
from int8serve.service.policy.spool import FileSpool, SpoolLockedError

from ..conftest import MODEL
from . import test_crash
from .conftest import PolicyServer, auth_for, sse_data
from .test_crash import ACCOUNT, TOKEN, Server, spooled_ids, start_server
from .test_faults import BODY

TIMEOUT = 2.0  # the database timeout these tests give the ledger
servers = test_crash.servers  # the fixture: the `serve` processes a test started, killed at its end
QUICK = 1.5  # an answer that did not wait for the database (admission may wait 0.5 s for the daily allocation)


def _timed(call: Callable[[], httpx.Response]) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    resp = call()
    return resp, time.monotonic() - started


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(1 for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage())


def test_a_hung_database_holds_up_no_request(pg_schema: PostgresSchema, pg_proxy: TcpProxy,
                                             policy_server: Callable[..., PolicyServer], tmp_path: Path,
                                             caplog: pytest.LogCaptureFixture) -> None:
    """With the database frozen, JSON answers and streams (their final usage frame too) come at once, the daily
    allocation does not hold admission, and the usage endpoint says 503/1002 within the timeout; the rows wait in
    the spool (one warning) and reach the database, once each, when it answers again."""
    caplog.set_level(logging.WARNING, logger="int8serve.service.policy.ledger")
    data_dir = tmp_path / "replica"
    server = policy_server(database_url=pg_schema.server_url(pg_proxy.port), data_dir=data_dir,
                           rate_limits=False, cache=False, daily_neurons=10_000, retry_seconds=0.3,
                           database_timeout=TIMEOUT)
    ledger = server.policy.ledger
    first = server.post("acct-a", {**BODY, "seed": 1})
    assert first.status_code == 200 and ledger.flush() and server.usage("acct-a").status_code == 200
    acknowledged = [first.headers["cf-ai-req-id"]]

    pg_proxy.blackhole()  # the pooled connections stay open; nothing comes back on them, nor on new ones
    for n in range(2, 7):
        resp, took = _timed(lambda n=n: server.http.post(server.run_url("acct-a"), headers=auth_for("acct-a"),
                                                         json={**BODY, "seed": n}, timeout=3 * TIMEOUT))
        assert resp.status_code == 200 and took < QUICK, (n, resp.status_code, took)
        acknowledged.append(resp.headers["cf-ai-req-id"])
        time.sleep(0.2)  # so that some requests come while a flush hangs, and the allocation's reading ages
    started = time.monotonic()
    with server.http.stream("POST", server.run_url("acct-a"), headers=auth_for("acct-a"),
                            json={**BODY, "seed": 50, "stream": True}, timeout=3 * TIMEOUT) as streamed:
        raw = streamed.read()
    assert time.monotonic() - started < QUICK
    frames = sse_data(raw)
    assert frames[-1] == "[DONE]" and "usage" in frames[-2]  # the final usage frame is not held back
    acknowledged.append(streamed.headers["cf-ai-req-id"])

    unavailable, took = _timed(lambda: server.http.get("/client/v4/accounts/acct-a/ai/usage",
                                                       headers=auth_for("acct-a"), timeout=3 * TIMEOUT))
    assert unavailable.status_code == 503 and unavailable.json()["errors"][0]["code"] == 1002
    assert took < TIMEOUT + 1.2  # the read's deadline (or a connection's connect_timeout), then 503
    deadline = time.monotonic() + 3 * TIMEOUT
    while ledger.healthy:  # the flush that hangs is given up after TIMEOUT
        assert time.monotonic() < deadline, "the hung flush was never given up"
        time.sleep(0.05)
    assert set(acknowledged[1:]) <= set(spooled_ids(data_dir))  # every acknowledged row is durable meanwhile
    assert _warnings(caplog, "ledger database is unreachable") == 1

    pg_proxy.restore()
    deadline = time.monotonic() + 15
    while not ledger.flush(timeout=2):
        assert time.monotonic() < deadline, "the spool was not replayed"
    rows = pg_schema.rows()
    assert sorted(r["request_id"] for r in rows) == sorted(acknowledged)  # none missing, none twice
    assert (data_dir / SPOOL_FILE).read_bytes() == b""
    assert ledger.healthy and ledger.outages == 1
    assert server.usage("acct-a").json()["result"]["totals"]["requests"] == len(acknowledged)


def _row(n: int) -> UsageRow:
    return UsageRow(f"hang-{n}", utc_now(), "acct", MODEL, 10, 5, 2.754, False, "ok", 12.5)


def test_a_hung_database_at_close(pg_schema: PostgresSchema, pg_proxy: TcpProxy, tmp_path: Path) -> None:
    """The ledger on its own: with the database frozen, each row is acknowledged as soon as it is spooled, a flush
    gives up within the timeout, and close() returns in bounded time with every row in the spool; the next start
    (database back) replays them."""
    spool_path = tmp_path / SPOOL_FILE
    ledger = Ledger(make_database(pg_schema.server_url(pg_proxy.port), TIMEOUT), FileSpool(spool_path),
                    retry_seconds=0.3, spool_name=str(spool_path), timeout=TIMEOUT)
    ledger.create_schema()

    async def record(row: UsageRow) -> float:
        started = time.monotonic()
        await asyncio.wait_for(ledger.record(row), 3 * TIMEOUT)
        return time.monotonic() - started

    assert asyncio.run(record(_row(0))) < QUICK and ledger.flush()
    pg_proxy.blackhole()
    rows = [_row(n) for n in range(1, 6)]
    for row in rows:
        assert asyncio.run(record(row)) < QUICK
        time.sleep(0.1)
    started = time.monotonic()
    assert not ledger.flush(timeout=3 * TIMEOUT)
    assert time.monotonic() - started < TIMEOUT + 1.2 and not ledger.healthy
    started = time.monotonic()
    ledger.close(timeout=3 * TIMEOUT)
    assert time.monotonic() - started < 3 * TIMEOUT
    assert [json.loads(line)["request_id"] for line in spool_path.read_text().splitlines()] == [
        r.request_id for r in rows]

    pg_proxy.restore()
    again = Ledger(make_database(pg_schema.server_url()), FileSpool(spool_path))
    assert again.flush()
    assert sorted(r["request_id"] for r in pg_schema.rows()) == sorted(["hang-0", *(r.request_id for r in rows)])
    assert spool_path.read_bytes() == b""
    again.close()


def test_a_locked_sqlite_ledger_holds_up_no_request(policy_server: Callable[..., PolicyServer],
                                                    tmp_path: Path) -> None:
    """Another process holds the SQLite ledger's write lock: the flushes wait for it (at most the timeout each,
    on the flusher's thread), the answers do not; the rows are written once the lock is released."""
    data_dir = tmp_path / "data"
    server = policy_server(data_dir=data_dir, rate_limits=False, cache=False, retry_seconds=0.2,
                           database_timeout=TIMEOUT)
    assert server.post("acct-a", {**BODY, "seed": 1}).status_code == 200 and server.policy.ledger.flush()
    blocker = sqlite3.connect(data_dir / LEDGER_FILE, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # the write lock, until rolled back
    try:
        for n in range(2, 7):
            resp, took = _timed(lambda n=n: server.http.post(server.run_url("acct-a"), headers=auth_for("acct-a"),
                                                             json={**BODY, "seed": n}, timeout=20))
            assert resp.status_code == 200 and took < QUICK, (n, took)
            time.sleep(0.2)
        assert server.policy.ledger.pending >= 5
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert len(server.wait_rows(6)) == 6


def test_sigterm_with_a_hung_database(stories_hf: Path, tmp_path: Path, servers: list[Server],
                                      pg_schema: PostgresSchema, pg_proxy: TcpProxy) -> None:
    """`serve` on a frozen database: streams get their final usage frame, SIGTERM ends the process within a few
    seconds, and their rows are in the spool, which the next start (database back) writes."""
    data_dir = tmp_path / "data"
    servers.append(first := start_server(stories_hf, data_dir, "--database-url",
                                         pg_schema.server_url(pg_proxy.port), "--database-timeout", str(TIMEOUT)))
    headers = {"Authorization": f"Bearer {TOKEN}"}
    body = {"prompt": "Once upon a time", "raw": True, "max_tokens": 8}
    assert httpx.post(first.run_url, json=body, headers=headers, timeout=10).status_code == 200
    pg_proxy.blackhole()
    ids = []
    for n in range(3):
        with httpx.stream("POST", first.run_url, json={**body, "seed": n + 1, "stream": True}, headers=headers,
                          timeout=3 * TIMEOUT) as resp:
            every = list(resp.iter_lines())
            lines = [line for line in every if line.startswith("data: {")]
            assert lines and '"usage"' in lines[-1], (resp.status_code, every)
            ids.append(resp.headers["cf-ai-req-id"])
    started = time.monotonic()
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(15) == 0
    assert time.monotonic() - started < 3 * TIMEOUT + 2
    assert set(ids) <= set(spooled_ids(data_dir))

    pg_proxy.restore()  # the next start replays the spool
    again = Ledger(make_database(pg_schema.server_url()), FileSpool(data_dir / SPOOL_FILE))
    assert again.flush()
    again.close()
    rows = pg_schema.rows()
    assert set(ids) <= {r["request_id"] for r in rows} and {r["account"] for r in rows} == {ACCOUNT}
    assert (data_dir / SPOOL_FILE).read_bytes() == b""


def test_rows_spooled_while_a_flush_runs_stay_in_the_spool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Spooling no longer waits for flushes, so rows are appended while one runs: when it ends, only the rows it
    wrote may leave the spool file (rewritten atomically, and still locked); the others stay there, durable, until
    they are written too."""
    from int8serve.service.policy import ledger as ledger_module

    monkeypatch.setattr(ledger_module, "SPOOL_COMPACT_ROWS", 1)  # rewrite the file as soon as it may
    spool_path = tmp_path / SPOOL_FILE
    ledger = Ledger(make_database(f"sqlite:///{tmp_path / LEDGER_FILE}"), FileSpool(spool_path))
    ledger.create_schema()
    real_write = ledger._write
    writes: queue.Queue[list[str]] = queue.Queue()
    first, second = threading.Event(), threading.Event()
    gates = iter([first, second])

    def held_write(rows: list[UsageRow], seconds: float) -> None:  # each flush waits for its gate
        writes.put([r.request_id for r in rows])
        assert next(gates).wait(10)
        real_write(rows, seconds)

    monkeypatch.setattr(ledger, "_write", held_write)

    def spooled() -> list[str]:
        return [json.loads(line)["request_id"] for line in spool_path.read_text().splitlines()]

    asyncio.run(ledger.record(_row(1)))
    assert writes.get(timeout=10) == ["hang-1"]  # the flusher holds row 1 in a transaction
    asyncio.run(ledger.record(_row(2)))
    assert spooled() == ["hang-1", "hang-2"]
    first.set()
    assert writes.get(timeout=10) == ["hang-2"]  # row 1 is written, the next flush is held
    assert spooled() == ["hang-2"]  # as many rows done as waiting: the file was rewritten
    with pytest.raises(SpoolLockedError):  # the rewritten file is locked as the old one was
        FileSpool(spool_path)
    second.set()
    assert ledger.flush() and spool_path.read_bytes() == b""
    with ledger.database.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(ledger.table)).scalar_one() == 2
    ledger.close()


def test_a_long_spool_is_rewritten_a_few_times_not_once_a_batch(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Replaying 10,000 rows left by an outage (5 batches of 2,000) rewrites the spool when the rows done are as
    many as the rows left — with 4,000 and 2,000 rows: 6,000 rows written in all, not 20,000 — and empties it at
    the end."""
    spool_path = tmp_path / SPOOL_FILE
    spool = FileSpool(spool_path)
    spool.append([_row(n).to_json() for n in range(10_000)])
    spool.close()
    replaced: list[int] = []
    real_replace = FileSpool.replace

    def counted(self: FileSpool, rows: Any) -> None:
        replaced.append(len(rows))
        real_replace(self, rows)

    monkeypatch.setattr(FileSpool, "replace", counted)
    ledger = Ledger(make_database(f"sqlite:///{tmp_path / LEDGER_FILE}"), FileSpool(spool_path))
    ledger.create_schema()
    assert ledger.flush(timeout=30)
    assert replaced == [4_000, 2_000] and spool_path.read_bytes() == b""
    ledger.close()
