"""The usage ledger: one durable SQL row per request that reached the engine or the cache.

A row holds the request id (the `cf-ai-req-id` of the answer), its time (UTC), account, model, billed input and
output tokens, neurons, whether it came from the cache, its outcome (`ok`, `aborted`, `error`) and its latency.
The table (`int8serve_usage` by default) is made by SQLAlchemy: a SQLite file in the data directory by default, any
SQLAlchemy URL with `--database-url` (PostgreSQL when replicas share one ledger); `request_id` is its primary key,
and rows are inserted with "on conflict do nothing", so writing a row twice is harmless.

No database I/O ever happens on the event loop's thread. One writer thread owns the database:

1. `await ledger.record(row)` hands the row to the thread, which appends it to the durable spool (`spool.py`,
   fsync) and only then lets the request be acknowledged;
2. the thread then inserts every spooled row, in order, and empties the spool after the commit;
3. if the database is unreachable, rows stay in the spool (one warning per outage, counted in `outages`), the thread
   tries again every `retry_seconds`, and replays them in order when it returns; the spool also survives a restart.

Reads (the usage endpoint, the daily allocation) run on the same thread after the writes queued before them, so a
client sees its own requests in its usage at once. While the database is away the usage endpoint answers 503, and
the daily allocation counts the last total it read plus the spooled rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import StaticPool

from .settings import DEFAULT_LEDGER_TABLE
from .spool import Spool

__all__ = [
    "Ledger",
    "LedgerUnavailableError",
    "UsageGroup",
    "UsageRow",
    "make_database",
    "short_error",
    "usage_table",
    "utc_now",
]

log = logging.getLogger(__name__)

INSERT_CHUNK = 500
OUTCOMES = ("ok", "aborted", "error")


def utc_now() -> datetime:
    """Now in UTC, without tzinfo: the ledger stores naive UTC times (SQLite has no time zones)."""
    return datetime.now(UTC).replace(tzinfo=None)


@dataclass(frozen=True)
class UsageRow:
    request_id: str
    time: datetime  # naive UTC
    account: str
    model: str
    input_tokens: int
    output_tokens: int
    neurons: float
    cached: bool
    outcome: str  # ok | aborted | error
    latency_ms: float

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {self.outcome!r}")

    @property
    def day(self) -> str:
        return self.time.date().isoformat()

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "time": self.time.isoformat()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> UsageRow:
        return cls(**{**data, "time": datetime.fromisoformat(data["time"])})

    def to_db(self) -> dict[str, Any]:
        return {**asdict(self), "day": self.day}


@dataclass(frozen=True)
class UsageGroup:
    """Totals of one model or one day."""

    name: str
    requests: int
    cached_requests: int
    input_tokens: int
    output_tokens: int
    neurons: float


def usage_table(name: str = DEFAULT_LEDGER_TABLE, metadata: sa.MetaData | None = None) -> sa.Table:
    return sa.Table(
        name, metadata if metadata is not None else sa.MetaData(),
        sa.Column("request_id", sa.String(64), primary_key=True),
        sa.Column("time", sa.DateTime(), nullable=False),  # naive UTC
        sa.Column("day", sa.String(10), nullable=False),  # YYYY-MM-DD (UTC), for grouping on any database
        sa.Column("account", sa.String(128), nullable=False),
        sa.Column("model", sa.String(256), nullable=False),
        sa.Column("input_tokens", sa.Integer(), nullable=False),
        sa.Column("output_tokens", sa.Integer(), nullable=False),
        sa.Column("neurons", sa.Float(), nullable=False),
        sa.Column("cached", sa.Boolean(), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("latency_ms", sa.Float(), nullable=False),
        sa.Index(f"ix_{name}_account_time", "account", "time"),
    )


def make_database(url: str) -> sa.Engine:
    """A SQLAlchemy engine for the ledger: in-memory SQLite shared by threads, file SQLite in WAL mode, or a
    server database whose connections fail fast and are checked before reuse."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            return sa.create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
        engine = sa.create_engine(url, connect_args={"timeout": 10})
        sa.event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    connect_args: dict[str, Any] = {}
    if parsed.get_backend_name() == "postgresql":
        connect_args = {"connect_timeout": 3, "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
                        "keepalives_count": 2}
    return sa.create_engine(url, pool_pre_ping=True, pool_size=2, max_overflow=2, connect_args=connect_args)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


class LedgerUnavailableError(Exception):
    """The ledger's database cannot be read right now."""


class _Reply:
    """The answer to one job, delivered to an event loop (a future) or to a blocked thread (an event)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None) -> None:
        self.loop = loop
        self.future: asyncio.Future[Any] | None = loop.create_future() if loop is not None else None
        self.event = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None

    def set(self, value: Any = None, error: BaseException | None = None) -> None:
        self.value, self.error = value, error
        self.event.set()
        if self.loop is not None:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody waits any more
                self.loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        if self.future is None or self.future.done():
            return
        if self.error is not None:
            self.future.set_exception(self.error)
        else:
            self.future.set_result(self.value)


@dataclass
class _Job:
    kind: str  # "write", "read", "flush", "stop"
    reply: _Reply | None = None
    row: UsageRow | None = None
    read: Callable[[sa.Connection], Any] | None = None
    unavailable: Callable[[], Any] | None = None  # a read's answer while the database is away (else: error)


class Ledger:
    """The durable usage ledger and its writer thread (see the module docstring)."""

    def __init__(self, database: sa.Engine, spool: Spool, table_name: str = DEFAULT_LEDGER_TABLE,
                 retry_seconds: float = 1.0, spool_name: str = "memory") -> None:
        self.database = database
        self.metadata = sa.MetaData()
        self.table = usage_table(table_name, self.metadata)
        self.spool = spool
        self.spool_name = spool_name
        self.retry_seconds = retry_seconds
        self.healthy = True
        self.outages = 0
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._unflushed = _rows_from_spool(spool.read())  # left by a previous run: replayed first
        if self._unflushed:
            log.warning("replaying %d ledger rows left in %s", len(self._unflushed), spool_name)
        self._next_try = 0.0
        self._db_sums: dict[tuple[str, datetime], float] = {}
        self._thread = threading.Thread(target=self._run, name="int8serve-ledger", daemon=True)
        self._start_lock = threading.Lock()
        self._closed = False

    # ---- set-up (start-up thread) ----

    def create_schema(self) -> None:
        """Create the table and its index if missing; raises SQLAlchemyError when the database is unreachable."""
        for attempt in itertools.count():
            try:
                self.metadata.create_all(self.database, checkfirst=True)
                return
            except (sa.exc.IntegrityError, sa.exc.ProgrammingError):
                if attempt >= 2:  # a replica starting at the same moment may have won the race; else a real error
                    raise
                time.sleep(0.2)

    def start(self) -> Ledger:
        with self._start_lock:
            if self._thread.ident is None:
                self._thread.start()
        return self

    @property
    def pending(self) -> int:
        """Rows in the spool, not yet in the database."""
        return len(self._unflushed)

    # ---- event-loop side ----

    async def record(self, row: UsageRow) -> None:
        """Return once `row` is durable (spooled, or in the database); raises LedgerUnavailableError if neither."""
        await self._submit(_Job("write", row=row))

    def record_nowait(self, row: UsageRow) -> None:
        """Queue `row` without waiting (for requests nobody waits on any more, e.g. an aborted stream)."""
        self._put(_Job("write", row=row))

    async def usage(self, account: str, since: datetime, until: datetime) -> tuple[list[UsageGroup], list[UsageGroup]]:
        """(by model, by day) totals of `account` for `since` <= time < `until`."""
        return await self._submit(_Job("read", read=lambda conn: self._usage(conn, account, since, until)))

    async def neurons_used(self, account: str, since: datetime) -> float:
        """Neurons metered to `account` since `since`, spooled rows included; while the database is away, the
        last total read from it plus the spooled rows."""
        key = (account, since)

        def read(conn: sa.Connection) -> float:
            self._db_sums[key] = self._db_neurons(conn, account, since)
            return self._db_sums[key] + self._pending_neurons(account, since)

        def unavailable() -> float:
            return self._db_sums.get(key, 0.0) + self._pending_neurons(account, since)

        return await self._submit(_Job("read", read=read, unavailable=unavailable))

    # ---- any other thread (start-up, shutdown, tests) ----

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until every row recorded so far is in the database; False if it is not reachable in time."""
        reply = _Reply(None)
        self._put(_Job("flush", reply=reply))
        return reply.event.wait(timeout) and bool(reply.value)

    def close(self, timeout: float = 10.0) -> None:
        """Write what can be written, stop the thread, release the spool (rows left there are replayed at the
        next start)."""
        if self._closed:
            return
        if self._thread.is_alive():
            reply = _Reply(None)
            self._put(_Job("stop", reply=reply))
            reply.event.wait(timeout)
            self._thread.join(timeout)
        self._closed = True
        if self._unflushed:
            log.warning("%d ledger rows stay in %s until the next start", len(self._unflushed), self.spool_name)
        self.spool.close()
        self.database.dispose()

    # ---- plumbing ----

    def _put(self, job: _Job) -> None:
        if self._closed:
            raise LedgerUnavailableError("the ledger is closed")
        self.start()  # a no-op once started; lazily for ledgers made without an explicit start
        self._jobs.put(job)

    async def _submit(self, job: _Job) -> Any:
        job.reply = _Reply(asyncio.get_running_loop())
        self._put(job)
        assert job.reply.future is not None
        return await job.reply.future

    # ---- the writer thread ----

    def _run(self) -> None:
        while True:
            jobs = self._next_jobs()
            try:
                if self._process(jobs):
                    return
            except Exception:  # a bug must not leave requests waiting forever on a dead writer
                log.exception("the ledger writer failed on a batch of %d jobs", len(jobs))
                for job in jobs:
                    if job.reply is not None and not job.reply.event.is_set():
                        job.reply.set(error=LedgerUnavailableError("the ledger writer failed"))
                if any(job.kind == "stop" for job in jobs):
                    return

    def _process(self, jobs: Sequence[_Job]) -> bool:
        """Handle one batch: writes first (spooled, acknowledged), then the database, then reads, flushes and a
        stop. True when the thread should end."""
        writes = [j for j in jobs if j.kind == "write"]
        if writes:
            self._spool_rows(writes)
        if self._unflushed and self._due():
            self._flush()
        stop = None
        for job in jobs:
            if job.kind == "read":
                self._read(job)
            elif job.kind == "flush":
                if self._unflushed:
                    self._flush()
                job.reply.set(not self._unflushed)  # type: ignore[union-attr]
            elif job.kind == "stop":
                stop = job
        if stop is None:
            return False
        if self._unflushed:
            self._flush()
        stop.reply.set(True)  # type: ignore[union-attr]
        return True

    def _next_jobs(self) -> list[_Job]:
        timeout = None
        if self._unflushed:
            timeout = max(0.0, self._next_try - time.monotonic())
        try:
            jobs = [self._jobs.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                jobs.append(self._jobs.get_nowait())
            except queue.Empty:
                return jobs

    def _due(self) -> bool:
        return self.healthy or time.monotonic() >= self._next_try

    def _spool_rows(self, writes: Sequence[_Job]) -> None:
        rows = [job.row for job in writes if job.row is not None]
        try:
            self.spool.append([row.to_json() for row in rows])
        except OSError as err:
            log.error("cannot append to the ledger spool %s (%s): writing to the database directly",
                      self.spool_name, err)
            error = self._insert_now(rows)
            for job in writes:
                if job.reply is not None:
                    job.reply.set(error=error)
            return
        self._unflushed.extend(rows)
        for job in writes:
            if job.reply is not None:
                job.reply.set()

    def _insert_now(self, rows: Sequence[UsageRow]) -> LedgerUnavailableError | None:
        try:
            with self.database.begin() as conn:
                self._insert_ignore(conn, rows)
        except SQLAlchemyError as err:
            self._lost(err)
            return LedgerUnavailableError("neither the spool nor the database can take ledger rows")
        return None

    def _flush(self) -> None:
        rows = self._unflushed
        try:
            with self.database.begin() as conn:
                for start in range(0, len(rows), INSERT_CHUNK):
                    self._insert_ignore(conn, rows[start:start + INSERT_CHUNK])
        except (SQLAlchemyError, OSError) as err:
            self._lost(err)
            return
        self._unflushed = []
        try:
            self.spool.clear()
        except OSError as err:  # the rows are in the database: replaying them later is harmless
            log.error("cannot empty the ledger spool %s: %s", self.spool_name, err)
        if not self.healthy:
            self.healthy = True
            log.warning("the ledger database is reachable again: %d spooled rows replayed", len(rows))

    def _lost(self, err: BaseException) -> None:
        self._next_try = time.monotonic() + self.retry_seconds
        if self.healthy:
            self.healthy = False
            self.outages += 1
            log.warning("the ledger database is unreachable (%s): rows are kept in the spool %s and replayed "
                        "when it returns", short_error(err), self.spool_name)

    def _read(self, job: _Job) -> None:
        assert job.reply is not None and job.read is not None
        if self._due():
            try:
                with self.database.connect() as conn:
                    job.reply.set(job.read(conn))
                return
            except (SQLAlchemyError, OSError) as err:
                self._lost(err)
        if job.unavailable is not None:
            job.reply.set(job.unavailable())
        else:
            job.reply.set(error=LedgerUnavailableError("the ledger database is unreachable"))

    def _insert_ignore(self, conn: sa.Connection, rows: Sequence[UsageRow]) -> None:
        if not rows:
            return
        values = [row.to_db() for row in rows]
        dialect = conn.dialect.name
        if dialect in ("postgresql", "sqlite"):
            insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
            conn.execute(insert(self.table).on_conflict_do_nothing(index_elements=["request_id"]), values)
            return
        for value in values:  # other databases: skip ids already there
            exists = conn.execute(sa.select(self.table.c.request_id)
                                  .where(self.table.c.request_id == value["request_id"])).first()
            if exists is None:
                conn.execute(sa.insert(self.table), [value])

    def _pending_neurons(self, account: str, since: datetime) -> float:
        return sum(r.neurons for r in self._unflushed if r.account == account and r.time >= since)

    def _db_neurons(self, conn: sa.Connection, account: str, since: datetime) -> float:
        t = self.table
        total = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(t.c.neurons), 0.0))
                             .where(t.c.account == account, t.c.time >= since)).scalar_one()
        return float(total)

    def _usage(self, conn: sa.Connection, account: str, since: datetime, until: datetime
               ) -> tuple[list[UsageGroup], list[UsageGroup]]:
        t = self.table
        totals = (
            sa.func.count().label("requests"),
            sa.func.coalesce(sa.func.sum(sa.case((t.c.cached, 1), else_=0)), 0).label("cached_requests"),
            sa.func.coalesce(sa.func.sum(t.c.input_tokens), 0).label("input_tokens"),
            sa.func.coalesce(sa.func.sum(t.c.output_tokens), 0).label("output_tokens"),
            sa.func.coalesce(sa.func.sum(t.c.neurons), 0.0).label("neurons"),
        )
        where = (t.c.account == account, t.c.time >= since, t.c.time < until)

        def grouped(column: sa.Column[Any]) -> list[UsageGroup]:
            rows = conn.execute(sa.select(column, *totals).where(*where).group_by(column).order_by(column))
            return [UsageGroup(name=str(r[0]), requests=int(r.requests), cached_requests=int(r.cached_requests),
                               input_tokens=int(r.input_tokens), output_tokens=int(r.output_tokens),
                               neurons=round(float(r.neurons), 6)) for r in rows]

        return grouped(t.c.model), grouped(t.c.day)


def _rows_from_spool(records: Sequence[dict[str, Any]]) -> list[UsageRow]:
    rows = []
    for record in records:
        try:
            rows.append(UsageRow.from_json(record))
        except (TypeError, ValueError, KeyError) as err:
            log.error("skipping an unreadable spooled ledger row %r: %s", record, err)
    return rows


def short_error(err: BaseException) -> str:
    text = " ".join(str(getattr(err, "orig", None) or err).split())
    return f"{type(err).__name__}: {text[:200]}"
