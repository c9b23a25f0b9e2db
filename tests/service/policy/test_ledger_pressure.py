"""The ledger under pressure: statements that cannot hang, reports that never delay metering, a spool that says
when it grows, and a daily allocation that stays right while the database is away."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from benchmarks.backends import PostgresSchema, TcpProxy

from int8serve.service.policy.ledger import Ledger, make_database
from int8serve.service.policy.spool import MemorySpool

from .conftest import POSTGRES_URL, PolicyServer
from .test_faults import BODY


def test_a_sqlite_statement_that_runs_too_long_is_interrupted(tmp_path: Path) -> None:
    database = make_database(f"sqlite:///{tmp_path / 'slow.sqlite3'}", statement_timeout=0.2)
    endless = sa.text("WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) SELECT count(*) FROM n")
    started = time.monotonic()
    with pytest.raises(sa.exc.OperationalError, match="interrupted"), database.connect() as conn:
        conn.execute(endless)
    assert time.monotonic() - started < 5
    with database.connect() as conn:  # the connection is usable again at once: only that statement had a deadline
        assert conn.execute(sa.text("SELECT 1")).scalar_one() == 1
    database.dispose()


def test_a_postgresql_statement_that_runs_too_long_is_cancelled() -> None:
    database = make_database(POSTGRES_URL, statement_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(sa.exc.OperationalError, match="statement timeout"), database.connect() as conn:
        conn.execute(sa.text("SELECT pg_sleep(5)"))
    assert time.monotonic() - started < 3
    database.dispose()


def test_usage_reports_never_delay_metering(policy_server: Callable[..., PolicyServer],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """A usage report held in its query (until the test lets it go) runs beside the writer: answers, and their
    ledger rows, keep coming meanwhile."""
    server = policy_server(rate_limits=False, cache=False)
    ledger = server.policy.ledger
    real = ledger._db_usage
    reading, release = threading.Event(), threading.Event()

    def slow(*args: Any) -> Any:
        reading.set()
        assert release.wait(60)
        return real(*args)

    monkeypatch.setattr(ledger, "_db_usage", slow)
    report: list[Any] = []
    reader = threading.Thread(target=lambda: report.append(server.usage("acct-a")))
    reader.start()
    assert reading.wait(10)
    answers = [server.post("acct-a", {**BODY, "seed": n}) for n in range(1, 4)]
    assert all(a.status_code == 200 for a in answers)
    assert ledger.flush(timeout=30) and len(server.rows()) == 3
    assert reader.is_alive() and not report  # all of it while the report was still held
    release.set()
    reader.join(30)
    assert report[0].status_code == 200


def test_the_spool_says_when_it_grows(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    database = make_database("postgresql+psycopg://nobody@127.0.0.1:1/none")  # nothing listens on port 1
    ledger = Ledger(database, MemorySpool(), retry_seconds=0.05, spool_alarm_rows=3)
    from int8serve.service.policy.ledger import UsageRow, utc_now

    async def record(n: int) -> None:
        await ledger.record(UsageRow(f"r{n}", utc_now(), "acct", "m", 1, 1, 0.5, False, "ok", 1.0))

    import asyncio

    for n in range(5):
        asyncio.run(record(n))
    assert ledger.pending == 5
    deadline = time.monotonic() + 5
    while ledger.healthy:  # the flusher, on its own thread, finds the database away
        assert time.monotonic() < deadline
        time.sleep(0.01)
    alarms = [r for r in caplog.records if "holds" in r.getMessage() and "alarm at 3" in r.getMessage()]
    assert len(alarms) == 1  # once, not once per row
    ledger.close(timeout=1)


def test_the_allocation_counts_rows_spooled_during_an_outage(pg_schema: PostgresSchema, pg_proxy: TcpProxy,
                                                              policy_server: Callable[..., PolicyServer]) -> None:
    """With the database cut off, the account's usage keeps growing from the rows this server records: the daily
    allocation refuses (429/3036) as soon as the spooled requests use it up, as it would with the database."""
    server = policy_server(database_url=pg_schema.server_url(pg_proxy.port), rate_limits=False, cache=False,
                           daily_neurons=4.0, retry_seconds=0.3)
    first = server.post("acct-a", {**BODY, "max_tokens": 1, "seed": 1})  # ~6 prompt+output tokens: ~1.1 neurons
    assert first.status_code == 200 and server.policy.ledger.flush()
    pg_proxy.cut()
    statuses = [server.post("acct-a", {**BODY, "max_tokens": 1, "seed": n}).status_code for n in range(2, 8)]
    assert not server.policy.ledger.healthy
    used = float(first.headers["cf-ai-neurons"])
    allowed = 1 + next(i for i in range(1, 10) if used * (i + 1) >= 4.0)  # requests until 4 neurons are used
    assert statuses[:allowed - 1] == [200] * (allowed - 1) and set(statuses[allowed - 1:]) == {429}
    pg_proxy.restore()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_a_spool_of_more_rows_than_a_statement_has_parameters_is_read(backend: str, tmp_path: Path,
                                                                       request: pytest.FixtureRequest) -> None:
    """After a long outage an account may have 70,000 rows in the spool, two of them written already: the usage
    and the allocation's total count each row once (the spooled ids went as one bind parameter each, past
    PostgreSQL's 65,535: every read failed and marked the database away)."""
    import asyncio
    from datetime import timedelta

    from int8serve.service.policy.ledger import UsageRow, utc_now

    url = (f"sqlite:///{tmp_path / 'ledger.sqlite3'}" if backend == "sqlite"
           else request.getfixturevalue("pg_schema").server_url())
    now = utc_now()
    rows = [UsageRow(f"r{n}", now, "acct", "m", 3, 2, 0.5, False, "ok", 1.0) for n in range(70_000)]
    spool = MemorySpool()
    spool.append([r.to_json() for r in rows])
    ledger = Ledger(make_database(url), spool)
    ledger.create_schema()  # the flusher is not started: the rows stay pending, as while a long spool drains
    written_only = UsageRow("db-only", now, "acct", "m", 3, 2, 0.25, False, "ok", 1.0)
    with ledger.database.begin() as conn:  # two spooled rows written already, and one not in the spool
        conn.execute(sa.insert(ledger.table), [r.to_db() for r in (rows[0], rows[1], written_only)])

    async def read() -> tuple[Any, float]:
        by_model, _by_day = await ledger.usage("acct", now - timedelta(days=1), now + timedelta(days=1))
        return by_model, await ledger.neurons_used("acct", now - timedelta(hours=1), wait=30)

    (group,), used = asyncio.run(read())
    assert (group.requests, group.input_tokens, group.neurons) == (70_001, 210_003, 35_000.25)
    assert used == pytest.approx(35_000.25) and ledger.healthy
    ledger.close(timeout=1)
