"""A row the ledger's database refuses for its data (here an account id longer than the `account` column, which
PostgreSQL refuses with a DataError; on SQLite, which stores any length, a NaN that it turns into NULL) is moved to
the dead-letter file next to the spool, with the reason, and logged as an error; the rows around it are written. So
is a row with a value SQLAlchemy cannot even send (a StatementError raised in Python, before the driver). A
database that is away is not a refusal: then every row waits in the spool."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import sys
from datetime import datetime
from pathlib import Path

import pytest
import sqlalchemy as sa
from benchmarks.backends import PostgresSchema, TcpProxy

from int8serve.service.policy import Policy, PolicySettings
from int8serve.service.policy.ledger import Ledger, UsageRow, make_database, utc_now
from int8serve.service.policy.policy import PolicyStartupError
from int8serve.service.policy.spool import DEAD_LETTER_FILE, FileSpool

from ..conftest import MODEL

LONG_ACCOUNT = "L" * 130  # the column holds 128 characters


def _row(request_id: str, account: str = "acct-a", neurons: float = 2.754) -> UsageRow:
    return UsageRow(request_id, utc_now(), account, MODEL, 10, 5, neurons, False, "ok", 12.5)


def _record(ledger: Ledger, rows: list[UsageRow]) -> None:
    async def record() -> None:
        for row in rows:
            await ledger.record(row)

    asyncio.run(record())


def _dead_letters(folder: Path) -> list[dict]:
    path = folder / DEAD_LETTER_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _errors(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The ledger's database: a SQLite file in the test's folder, or a PostgreSQL schema of the test's own."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'usage.sqlite3'}"
    return request.getfixturevalue("pg_schema").server_url()


def _stored_ids(ledger: Ledger) -> list[str]:
    with ledger.database.connect() as conn:
        return list(conn.execute(sa.select(ledger.table.c.request_id).order_by(ledger.table.c.request_id)).scalars())


def test_a_row_postgresql_refuses_does_not_hold_up_the_others(pg_schema: PostgresSchema, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="int8serve.service.policy.ledger")
    spool = tmp_path / "ledger-spool.jsonl"
    ledger = Ledger(make_database(pg_schema.server_url()), FileSpool(spool), spool_name=str(spool))
    ledger.create_schema()
    rows = [_row("ok-1"), _row("long-1", LONG_ACCOUNT), _row("ok-2"), _row("ok-3", "acct-b")]
    _record(ledger, rows)
    assert ledger.flush(timeout=10)
    assert sorted(r["request_id"] for r in pg_schema.rows()) == ["ok-1", "ok-2", "ok-3"]
    (dead,) = _dead_letters(tmp_path)
    assert dead["row"]["request_id"] == "long-1" and dead["row"]["account"] == LONG_ACCOUNT
    assert "DataError" in dead["reason"] and "too long" in dead["reason"]
    assert spool.read_bytes() == b"" and ledger.pending == 0 and ledger.rejected == 1
    assert ledger.healthy and ledger.outages == 0  # a refusal is not an outage
    (error,) = _errors(caplog)
    assert "long-1" in error and "refused" in error and DEAD_LETTER_FILE in error

    _record(ledger, [_row("ok-4")])  # and the ledger carries on
    assert ledger.flush() and len(pg_schema.rows()) == 4
    ledger.close()


def test_a_refused_row_left_in_the_spool_by_an_earlier_run(pg_schema: PostgresSchema, tmp_path: Path) -> None:
    """The spool of a server that ran with the long account (and could not write anything since) is replayed at the
    next start: the refused row first, then the others, which are all written."""
    spool_path = tmp_path / "ledger-spool.jsonl"
    spool = FileSpool(spool_path)
    spool.append([_row("long-1", LONG_ACCOUNT).to_json()] + [_row(f"ok-{n}").to_json() for n in range(1, 2_501)])
    spool.close()  # more rows than one flush transaction takes
    ledger = Ledger(make_database(pg_schema.server_url()), FileSpool(spool_path))
    ledger.create_schema()
    assert ledger.flush(timeout=20)
    assert len(pg_schema.rows()) == 2_500
    assert [d["row"]["request_id"] for d in _dead_letters(tmp_path)] == ["long-1"]
    assert spool_path.read_bytes() == b""
    ledger.close()


def test_a_database_away_is_not_a_refusal(pg_schema: PostgresSchema, pg_proxy: TcpProxy, tmp_path: Path) -> None:
    """While the database is cut off nothing is moved aside, whatever the rows; when it is back the good rows are
    written and the refused one is moved aside."""
    spool = tmp_path / "ledger-spool.jsonl"
    ledger = Ledger(make_database(pg_schema.server_url(pg_proxy.port)), FileSpool(spool), retry_seconds=0.2)
    ledger.create_schema()
    pg_proxy.cut()
    _record(ledger, [_row("ok-1"), _row("long-1", LONG_ACCOUNT), _row("ok-2")])
    assert not ledger.flush(timeout=2)
    assert ledger.pending == 3 and len(spool.read_text().splitlines()) == 3 and _dead_letters(tmp_path) == []
    pg_proxy.restore()
    assert ledger.flush(timeout=10)
    assert sorted(r["request_id"] for r in pg_schema.rows()) == ["ok-1", "ok-2"]
    assert [d["row"]["request_id"] for d in _dead_letters(tmp_path)] == ["long-1"]
    ledger.close()


def test_a_row_sqlite_refuses_does_not_hold_up_the_others(tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="int8serve.service.policy.ledger")
    spool = tmp_path / "ledger-spool.jsonl"
    ledger = Ledger(make_database(f"sqlite:///{tmp_path / 'usage.sqlite3'}"), FileSpool(spool))
    ledger.create_schema()
    _record(ledger, [_row("ok-1"), _row("nan-1", neurons=math.nan), _row("ok-2"), _row("long-1", LONG_ACCOUNT)])
    assert ledger.flush()
    with ledger.database.connect() as conn:
        ids = conn.execute(sa.select(ledger.table.c.request_id).order_by(ledger.table.c.request_id)).scalars().all()
    assert ids == ["long-1", "ok-1", "ok-2"]  # SQLite stores a long account; a NaN it turns into NULL: refused
    (dead,) = _dead_letters(tmp_path)
    assert dead["row"]["request_id"] == "nan-1" and "IntegrityError" in dead["reason"]
    assert spool.read_bytes() == b"" and ledger.rejected == 1 and ledger.healthy
    assert any("nan-1" in e for e in _errors(caplog))
    ledger.close()


def test_a_value_sqlalchemy_cannot_send_is_a_refusal_not_an_outage(database_url: str, tmp_path: Path) -> None:
    """A bool column given "yes" fails in Python, while SQLAlchemy builds the statement: a StatementError that no
    retry will change, not the database away (which held up every row behind it, forever)."""
    spool = tmp_path / "ledger-spool.jsonl"
    ledger = Ledger(make_database(database_url), FileSpool(spool), retry_seconds=0.2)
    ledger.create_schema()
    bad = dataclasses.replace(_row("bad-1"), cached="yes")  # a row of the wrong type, which only a bug could make
    _record(ledger, [_row("ok-1"), bad, _row("ok-2")])
    assert ledger.flush(timeout=10)
    assert _stored_ids(ledger) == ["ok-1", "ok-2"]
    (dead,) = _dead_letters(tmp_path)
    assert dead["row"]["request_id"] == "bad-1" and dead["row"]["cached"] == "yes"
    assert "StatementError" in dead["reason"] and "Not a boolean value" in dead["reason"]
    assert ledger.healthy and ledger.outages == 0 and ledger.rejected == 1 and spool.read_bytes() == b""
    ledger.close()


def _spooled(request_id: str, **fields: object) -> dict:
    return {**_row(request_id).to_json(), **fields}


UNREADABLE = [  # spooled records that are not ledger rows: (request id, the record, what the reason names)
    ("bad-bool", _spooled("bad-bool", cached="yes"), "cached"),
    ("bad-count", _spooled("bad-count", input_tokens="10"), "input_tokens"),  # SQLite would store it as it is
    ("bad-big", _spooled("bad-big", output_tokens=2**63), "output_tokens"),
    ("bad-time", _spooled("bad-time", time="yesterday"), "yesterday"),
    ("bad-null", _spooled("bad-null", neurons=None), "neurons"),
    ("bad-huge", _spooled("bad-huge", latency_ms=10**400), "latency_ms"),  # beyond any float
    ("bad-infinite", _spooled("bad-infinite", neurons=float("inf")), "neurons"),  # json writes, reads Infinity
    ("bad-negative", _spooled("bad-negative", latency_ms=-1.0), "latency_ms"),
    ("bad-offset", _spooled("bad-offset", time="9999-12-31T23:30:00-01:00"), "out of range"),  # past 9999 in UTC
    ("bad-text", _spooled("bad-text", account="\ud800"), "surrogate"),
    ("bad-fields", {**_spooled("bad-fields"), "extra": 1}, "extra"),
]


def test_an_unreadable_spooled_row_is_set_aside_at_replay(database_url: str, tmp_path: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """A spooled record with a field of the wrong type (a damaged or hand-edited spool) goes to the dead-letter
    file when the spool is read; the rows around it are written, and the database is not taken for away."""
    caplog.set_level(logging.WARNING, logger="int8serve.service.policy.ledger")
    spool = tmp_path / "ledger-spool.jsonl"
    records = [_spooled("ok-1"), *(record for _, record, _ in UNREADABLE), [1, 2], _spooled("ok-2")]
    spool.write_text("".join(json.dumps(record) + "\n" for record in records))
    ledger = Ledger(make_database(database_url), FileSpool(spool), retry_seconds=0.2)
    assert ledger.pending == 2 and ledger.rejected == len(UNREADABLE) + 1
    assert len(spool.read_text().splitlines()) == 2  # the spool holds the rows alone already
    ledger.create_schema()
    assert ledger.flush(timeout=10)
    assert _stored_ids(ledger) == ["ok-1", "ok-2"]
    dead = _dead_letters(tmp_path)
    assert [d["row"] for d in dead] == records[1:-1]
    for (_, _, named), entry in zip(UNREADABLE, dead, strict=False):
        assert named in entry["reason"]
    assert "JSON object" in dead[-1]["reason"]
    assert ledger.healthy and ledger.outages == 0 and spool.read_bytes() == b""
    assert sum("unreadable ledger row" in e for e in _errors(caplog)) == len(UNREADABLE) + 1
    ledger.close()


def test_a_spooled_row_reads_back_as_it_was_written() -> None:
    row = _row("ok-1")
    assert UsageRow.from_json(json.loads(json.dumps(row.to_json()))) == row
    aware = UsageRow.from_json(_spooled("ok-2", time="2026-06-15T12:00:00+02:00", neurons=3))
    assert aware.time == datetime(2026, 6, 15, 10, 0) and aware.neurons == 3.0 and type(aware.neurons) is float


def test_a_table_of_the_ledgers_name_with_other_columns_is_refused_at_start(database_url: str,
                                                                             tmp_path: Path) -> None:
    """Someone else's (or an older) `int8serve_usage` table: every row would be refused and the ledger would take
    the database for away, forever, while it answers (the server ready, usage 503). Said at start instead."""
    with make_database(database_url).begin() as conn:
        conn.execute(sa.text("CREATE TABLE int8serve_usage (request_id VARCHAR(64) PRIMARY KEY, account TEXT)"))
    with pytest.raises(PolicyStartupError) as refused:
        Policy.build(PolicySettings(database_url=database_url, data_dir=tmp_path / "data"))
    message = str(refused.value)
    assert message.startswith("cannot use the ledger database")
    assert "int8serve_usage exists with other columns" in message
    assert "missing: time, day, model" in message
    Policy.build(PolicySettings(database_url=database_url, data_dir=tmp_path / "data", ledger_table="other")).close()


def test_a_missing_postgresql_driver_names_the_extra_that_installs_it(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """psycopg is not a dependency of int8serve but of its `postgres` extra: without it a PostgreSQL URL was
    "invalid database URL ...: No module named 'psycopg'", and nothing said how to get it."""
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as where it is not installed: importing it fails
    with pytest.raises(PolicyStartupError) as refused:
        Policy.build(PolicySettings(database_url="postgresql+psycopg://app@db.internal/usage", data_dir=tmp_path))
    message = str(refused.value)
    assert message.startswith("invalid database URL 'postgresql+psycopg://app@db.internal/usage': ")
    assert message.endswith("(the driver comes with the 'postgres' extra: pip install 'int8serve[postgres]')")
    with pytest.raises(PolicyStartupError) as unknown:  # a URL no extra helps with says no such thing
        Policy.build(PolicySettings(database_url="nosuchdb://x", data_dir=tmp_path))
    assert str(unknown.value).startswith("invalid database URL") and "pip install" not in str(unknown.value)


@pytest.mark.parametrize("folder", ["q?1", "e%41f"])
def test_the_sqlite_ledger_is_in_the_data_dir_whatever_its_name(folder: str, tmp_path: Path) -> None:
    """A `?` began a URL query (two data dirs `q?1`, `q?2` shared one ledger `q`, outside both) and `%41` was
    decoded (a valid folder refused): the ledger is `<data dir>/usage.sqlite3`, and the start-up line says so."""
    data_dir = tmp_path / folder
    policy = Policy.build(PolicySettings(data_dir=data_dir))
    try:
        assert policy.database == f"sqlite:///{data_dir.resolve()}/usage.sqlite3"
    finally:
        policy.close()
    assert (data_dir / "usage.sqlite3").is_file() and sorted(p.name for p in tmp_path.iterdir()) == [folder]
