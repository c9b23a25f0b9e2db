"""The ledger's database: its table (`usage_table`) and the SQLAlchemy engine it runs on (`make_database`), with
the per-backend set-up that bounds every statement (PostgreSQL's statement timeout, SQLite's WAL mode and progress
handler).

It is apart from `ledger.py` because it is set-up, done once before there is a ledger (`Policy.build` makes the
engine and hands it to the `Ledger`), and has nothing to do with the ledger's threads.
"""

from __future__ import annotations

import math
import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.pool import StaticPool

from int8serve.accounts import MAX_ACCOUNT_ID_LENGTH

from .deadline import watch
from .settings import DEFAULT_DATABASE_TIMEOUT, DEFAULT_LEDGER_TABLE

__all__ = ["DEFAULT_STATEMENT_TIMEOUT", "LedgerSchemaError", "make_database", "usage_table"]

DEFAULT_STATEMENT_TIMEOUT = DEFAULT_DATABASE_TIMEOUT


def usage_table(name: str = DEFAULT_LEDGER_TABLE, metadata: sa.MetaData | None = None) -> sa.Table:
    return sa.Table(
        name, metadata if metadata is not None else sa.MetaData(),
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("time", sa.DateTime(), nullable=False),  # naive UTC
        sa.Column("day", sa.String(10), nullable=False),  # YYYY-MM-DD (UTC), for grouping on any database
        sa.Column("account", sa.String(MAX_ACCOUNT_ID_LENGTH), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("input_tokens", sa.Integer(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("neurons", sa.Float(), nullable=False),
        sa.Column("cached", sa.Boolean(), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Index(f"ix_{name}_account_time", "account", "time"),
    )


def make_database(url: str, statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT) -> sa.Engine:
    """A SQLAlchemy engine for the ledger: in-memory SQLite shared by threads, file SQLite in WAL mode, or a
    server database whose connections fail fast and are checked before reuse. No statement runs longer than
    `statement_timeout` seconds (PostgreSQL's `statement_timeout`; on SQLite, waiting for a lock and running are
    both bounded). A server that stops answering altogether is the business of `deadline.py`, whose hooks the
    engine has (`watch`): the ledger runs all its database work within a deadline."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            engine = sa.create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
        else:
            engine = sa.create_engine(url, connect_args={"timeout": statement_timeout})
            sa.event.listen(engine, "connect", _sqlite_wal)
        _sqlite_statement_timeout(engine, statement_timeout)
        return watch(engine, ping=False)
    if parsed.get_backend_name() != "postgresql":
        return watch(sa.create_engine(url, pool_pre_ping=True, pool_size=3, max_overflow=2,
                                      pool_timeout=statement_timeout), ping=False)
    options = " ".join(filter(None, [str(parsed.query.get("options", "")),  # the URL's own options stay
                                     f"-c statement_timeout={int(statement_timeout * 1000)}"]))
    connect_args: dict[str, Any] = {
        # libpq's connect_timeout is whole seconds, at least 2
        "connect_timeout": min(3, max(2, math.ceil(statement_timeout))),
        "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2, "keepalives_count": 2, "options": options}
    if _libpq_version(parsed.get_driver_name()) >= 120000:  # unacknowledged data: the peer is gone
        connect_args["tcp_user_timeout"] = int(statement_timeout * 1000)
    # pooled connections are pinged by `watch` within the work's deadline, not by pool_pre_ping (unbounded)
    engine = sa.create_engine(url, pool_pre_ping=False, pool_size=3, max_overflow=2, pool_timeout=statement_timeout,
                              connect_args=connect_args)
    return watch(engine, ping=True)


def _libpq_version(driver: str) -> int:
    try:
        if driver == "psycopg":
            import psycopg

            return int(psycopg.pq.version())
        if driver == "psycopg2":
            import psycopg2.extensions

            return int(psycopg2.extensions.libpq_version())
    except (ImportError, AttributeError):
        pass
    return 0


def _sqlite_wal(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def _sqlite_statement_timeout(engine: sa.Engine, seconds: float) -> None:
    """Interrupt a SQLite statement that runs longer than `seconds` (SQLite has no statement timeout of its own)."""

    def on_connect(dbapi_connection: Any, record: Any) -> None:
        deadline = record.info["deadline"] = [float("inf")]
        dbapi_connection.set_progress_handler(lambda: int(time.monotonic() > deadline[0]), 10_000)

    def before(conn: sa.Connection, *_args: Any) -> None:
        conn.connection.info["deadline"][0] = time.monotonic() + seconds

    def after(conn: sa.Connection, *_args: Any) -> None:
        conn.connection.info["deadline"][0] = float("inf")

    sa.event.listen(engine, "connect", on_connect)
    sa.event.listen(engine, "before_cursor_execute", before)
    sa.event.listen(engine, "after_cursor_execute", after)


class LedgerSchemaError(Exception):
    """The database holds a table of the ledger's name that is not the ledger's."""
