"""The usage ledger: one durable SQL row per request that reached the engine or the cache.

A row holds the request id (the `cf-ai-req-id` of the answer), its time (UTC), account, model, billed input and
output tokens, neurons, whether it came from the cache, its outcome (`ok`, `aborted`, `error`) and its latency.
The table (`int8serve_usage` by default) is made by SQLAlchemy: a SQLite file in the data directory by default, any
SQLAlchemy URL with `--database-url` (PostgreSQL when replicas share one ledger); `request_id` is its primary key,
and rows are inserted with "on conflict do nothing", so writing a row twice is harmless.

No database I/O ever happens on the event loop's thread. One writer thread owns the writes:

1. `await ledger.record(row)` hands the row to the thread, which appends it to the durable spool (`spool.py`,
   fsync) and only then lets the request be acknowledged;
2. the thread then inserts every spooled row, in order, and empties the spool after the commit;
3. if the database is unreachable, rows stay in the spool (one warning per outage, counted in `outages`), the thread
   tries again every `retry_seconds`, and replays them in order when it returns; the spool also survives a restart.
   When the spool passes `spool_alarm_rows` rows a warning says so (and `/metrics` shows its size).

Reads (the usage endpoint, the daily allocation) run on reader threads beside the writer, so a slow report never
delays metering; they add the rows still in the spool to what the database holds (leaving those rows out of the
query, so that a row flushed meanwhile counts once), and a client sees its own requests in its usage at once.
While the database is away the usage endpoint answers 503, and the daily allocation counts the last total it read
plus what this process recorded since (other replicas' rows of that time are counted once the database is back).
No statement runs longer than the statement timeout (5 s): a database that hangs is a database that is away.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import itertools
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import StaticPool

from .fallback import Outage
from .settings import DEFAULT_LEDGER_TABLE
from .spool import Spool

__all__ = [
    "Ledger",
    "LedgerUnavailableError",
    "NeuronsReading",
    "UsageGroup",
    "UsageRow",
    "make_database",
    "short_error",
    "usage_table",
    "utc_now",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
INSERT_CHUNK = 500
OUTCOMES = ("ok", "aborted", "error")
DEFAULT_STATEMENT_TIMEOUT = 5.0  # seconds
DEFAULT_SPOOL_ALARM_ROWS = 10_000


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
class NeuronsReading:
    """An account's neurons of one day as the ledger read them (`Ledger.neurons_reading`)."""

    ledger: Ledger
    account: str
    day: str  # YYYY-MM-DD
    total: float  # the database's sum and the spooled rows, as last read
    recorded_then: float  # what this process had recorded when `total` was read

    def now(self) -> float:
        """The total plus what this process recorded since it was read: no I/O, safe on the event loop."""
        return self.total + (self.ledger.recorded_neurons(self.account, self.day) - self.recorded_then)


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


def make_database(url: str, statement_timeout: float = DEFAULT_STATEMENT_TIMEOUT) -> sa.Engine:
    """A SQLAlchemy engine for the ledger: in-memory SQLite shared by threads, file SQLite in WAL mode, or a
    server database whose connections fail fast and are checked before reuse. No statement runs longer than
    `statement_timeout` seconds (PostgreSQL's `statement_timeout`; on SQLite, waiting for a lock and running are
    both bounded)."""
    parsed = sa.make_url(url)
    if parsed.get_backend_name() == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            engine = sa.create_engine(url, poolclass=StaticPool, connect_args={"check_same_thread": False})
        else:
            engine = sa.create_engine(url, connect_args={"timeout": statement_timeout})
            sa.event.listen(engine, "connect", _sqlite_wal)
        _sqlite_statement_timeout(engine, statement_timeout)
        return engine
    connect_args: dict[str, Any] = {}
    if parsed.get_backend_name() == "postgresql":
        options = " ".join(filter(None, [str(parsed.query.get("options", "")),  # the URL's own options stay
                                         f"-c statement_timeout={int(statement_timeout * 1000)}"]))
        connect_args = {"connect_timeout": 3, "keepalives": 1, "keepalives_idle": 5, "keepalives_interval": 2,
                        "keepalives_count": 2, "options": options}
    return sa.create_engine(url, pool_pre_ping=True, pool_size=3, max_overflow=2, connect_args=connect_args)


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


class LedgerUnavailableError(Exception):
    """The ledger's database cannot be read right now."""


class _Job(enum.Enum):
    WRITE = "write"
    FLUSH = "flush"
    STOP = "stop"


@dataclass
class _Task:
    job: _Job
    done: concurrent.futures.Future[Any]
    row: UsageRow | None = None


class Ledger:
    """The durable usage ledger, its writer thread and its readers (see the module docstring)."""

    def __init__(self, database: sa.Engine, spool: Spool, table_name: str = DEFAULT_LEDGER_TABLE,
                 retry_seconds: float = 1.0, spool_name: str = "memory",
                 spool_alarm_rows: int = DEFAULT_SPOOL_ALARM_ROWS) -> None:
        self.database = database
        self.metadata = sa.MetaData()
        self.table = usage_table(table_name, self.metadata)
        self.spool = spool
        self.spool_name = spool_name
        self.spool_alarm_rows = spool_alarm_rows
        self.outage = Outage("the ledger database", f"rows are kept in the spool {spool_name} and replayed when "
                             "it returns", retry_seconds, logger=log)
        self._tasks: queue.Queue[_Task] = queue.Queue()
        self._lock = threading.Lock()  # guards _unflushed and _recorded, read by the reader threads
        self._unflushed = _rows_from_spool(spool.read())  # left by a previous run: replayed first
        if self._unflushed:
            log.warning("replaying %d ledger rows left in %s", len(self._unflushed), spool_name)
        self._recorded: Counter[tuple[str, str]] = Counter()  # neurons this process recorded, by (account, day)
        self._db_sums: dict[tuple[str, datetime], tuple[float, float, float]] = {}  # -> (sum, recorded, read at)
        self._alarmed = False
        self._writer = threading.Thread(target=self._run, name="int8serve-ledger", daemon=True)
        self._readers = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="int8serve-ledger-read")
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
            if self._writer.ident is None:
                self._writer.start()
        return self

    @property
    def healthy(self) -> bool:
        return self.outage.healthy

    @property
    def outages(self) -> int:
        return self.outage.outages

    @property
    def pending(self) -> int:
        """Rows in the spool, not yet in the database."""
        with self._lock:
            return len(self._unflushed)

    # ---- event-loop side ----

    async def record(self, row: UsageRow) -> None:
        """Return once `row` is durable (spooled, or in the database); raises LedgerUnavailableError if neither."""
        await asyncio.wrap_future(self._put(_Job.WRITE, row))

    async def usage(self, account: str, since: datetime, until: datetime) -> tuple[list[UsageGroup], list[UsageGroup]]:
        """(by model, by day) totals of `account` for `since` <= time < `until`, spooled rows included; read beside
        the writer, so that reading never delays metering. LedgerUnavailableError while the database is away."""
        return await self._read(lambda: self._usage(account, since, until))

    async def neurons_used(self, account: str, since: datetime, max_age: float = 1.0) -> float:
        """Neurons metered to `account` since `since`, spooled rows included. The database is read at most every
        `max_age` seconds per account; in between, and while it is away, the last total read plus what this
        process recorded since."""
        return (await self.neurons_reading(account, since, max_age)).now()

    async def neurons_reading(self, account: str, since: datetime, max_age: float = 1.0) -> NeuronsReading:
        """`neurons_used`, as a reading whose `now()` adds what this process recorded up to the moment it is
        called, without I/O: a check on the event loop sees every row recorded before it, even one recorded
        while the database was being read (the daily allocation relies on it)."""
        total, recorded_then = await self._read(lambda: self._neurons_used(account, since, max_age))
        return NeuronsReading(self, account, since.date().isoformat(), total, recorded_then)

    def recorded_neurons(self, account: str, day: str) -> float:
        """Neurons of `account` this process recorded for `day` (YYYY-MM-DD) since it started."""
        with self._lock:
            return self._recorded[(account, day)]

    # ---- any other thread (start-up, shutdown, tests) ----

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until every row recorded so far is in the database; False if it is not reachable in time."""
        try:
            return bool(self._put(_Job.FLUSH).result(timeout))
        except (concurrent.futures.TimeoutError, LedgerUnavailableError):
            return False

    def close(self, timeout: float = 10.0) -> None:
        """Write what can be written, stop the threads, release the spool (rows left there are replayed at the
        next start)."""
        if self._closed:
            return
        if self._writer.is_alive():
            stopped = self._put(_Job.STOP)
            with contextlib.suppress(concurrent.futures.TimeoutError):
                stopped.result(timeout)
            self._writer.join(timeout)
        self._closed = True
        self._readers.shutdown(wait=False, cancel_futures=True)
        if self._unflushed:
            log.warning("%d ledger rows stay in %s until the next start", len(self._unflushed), self.spool_name)
        self.spool.close()
        self.database.dispose()

    # ---- plumbing ----

    def _put(self, job: _Job, row: UsageRow | None = None) -> concurrent.futures.Future[Any]:
        if self._closed:
            raise LedgerUnavailableError("the ledger is closed")
        self.start()  # a no-op once started; lazily for ledgers made without an explicit start
        task = _Task(job, concurrent.futures.Future(), row)
        self._tasks.put(task)
        return task.done

    async def _read(self, read: Callable[[], T]) -> T:
        if self._closed:
            raise LedgerUnavailableError("the ledger is closed")
        return await asyncio.wrap_future(self._readers.submit(read))

    # ---- the writer thread ----

    def _run(self) -> None:
        while True:
            tasks = self._next_tasks()
            try:
                if self._process(tasks):
                    return
            except Exception:  # a bug must not leave requests waiting forever on a dead writer
                log.exception("the ledger writer failed on a batch of %d jobs", len(tasks))
                for task in tasks:
                    if not task.done.done():
                        task.done.set_exception(LedgerUnavailableError("the ledger writer failed"))
                if any(task.job is _Job.STOP for task in tasks):
                    return

    def _process(self, tasks: Sequence[_Task]) -> bool:
        """One batch: writes first (spooled, acknowledged), then the database, then flushes and a stop. True when
        the thread should end."""
        writes = [t for t in tasks if t.job is _Job.WRITE]
        if writes:
            self._spool_rows(writes)
        if self._unflushed and self.outage.should_try():
            self._flush()
        stop = None
        for task in tasks:
            if task.job is _Job.FLUSH:
                if self._unflushed and self.healthy:
                    self._flush()
                task.done.set_result(not self._unflushed)
            elif task.job is _Job.STOP:
                stop = task
        if stop is None:
            return False
        if self._unflushed:
            self._flush()
        stop.done.set_result(True)
        return True

    def _next_tasks(self) -> list[_Task]:
        timeout = self.outage.seconds_to_retry if self._unflushed else None
        try:
            tasks = [self._tasks.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                tasks.append(self._tasks.get_nowait())
            except queue.Empty:
                return tasks

    def _spool_rows(self, writes: Sequence[_Task]) -> None:
        rows = [task.row for task in writes if task.row is not None]
        try:
            self.spool.append([row.to_json() for row in rows])
        except OSError as err:
            log.error("cannot append to the ledger spool %s (%s): writing to the database directly",
                      self.spool_name, err)
            error = self._insert_now(rows)
            for task in writes:
                task.done.set_exception(error) if error else task.done.set_result(None)
            return
        with self._lock:
            self._unflushed.extend(rows)
            for row in rows:
                self._recorded[(row.account, row.day)] += row.neurons
        self._check_spool_size()
        for task in writes:
            task.done.set_result(None)

    def _insert_now(self, rows: Sequence[UsageRow]) -> LedgerUnavailableError | None:
        try:
            with self.database.begin() as conn:
                self._insert_ignore(conn, rows)
        except SQLAlchemyError as err:
            self.outage.failed(err)
            return LedgerUnavailableError("neither the spool nor the database can take ledger rows")
        with self._lock:
            for row in rows:
                self._recorded[(row.account, row.day)] += row.neurons
        return None

    def _flush(self) -> None:
        rows = list(self._unflushed)
        try:
            with self.database.begin() as conn:
                for start in range(0, len(rows), INSERT_CHUNK):
                    self._insert_ignore(conn, rows[start:start + INSERT_CHUNK])
        except (SQLAlchemyError, OSError) as err:
            self.outage.failed(err)
            return
        with self._lock:
            self._unflushed = self._unflushed[len(rows):]
        try:
            self.spool.clear()
        except OSError as err:  # the rows are in the database: replaying them later is harmless
            log.error("cannot empty the ledger spool %s: %s", self.spool_name, err)
        self.outage.recovered(f"{len(rows)} spooled rows replayed")
        self._check_spool_size()

    def _check_spool_size(self) -> None:
        """The spool's alarm: one warning when it passes `spool_alarm_rows`, one when it is back under."""
        pending = len(self._unflushed)
        if pending >= self.spool_alarm_rows and not self._alarmed:
            self._alarmed = True
            log.warning("the ledger spool %s holds %d rows (alarm at %d): the database has not taken rows for "
                        "a while", self.spool_name, pending, self.spool_alarm_rows)
        elif pending < self.spool_alarm_rows and self._alarmed:
            self._alarmed = False
            log.warning("the ledger spool %s is back under %d rows", self.spool_name, self.spool_alarm_rows)

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

    # ---- reader threads ----

    def _pending_rows(self, account: str, since: datetime, until: datetime | None = None) -> list[UsageRow]:
        with self._lock:
            return [r for r in self._unflushed
                    if r.account == account and r.time >= since and (until is None or r.time < until)]

    def _query(self, query: Callable[[sa.Connection], T]) -> T:
        if not self.outage.should_try():
            raise LedgerUnavailableError("the ledger database is unreachable")
        try:
            with self.database.connect() as conn:
                result = query(conn)
        except (SQLAlchemyError, OSError) as err:
            self.outage.failed(err)
            raise LedgerUnavailableError("the ledger database is unreachable") from None
        return result

    def _usage(self, account: str, since: datetime, until: datetime) -> tuple[list[UsageGroup], list[UsageGroup]]:
        # the spooled rows first, then the database without them: a row flushed meanwhile is counted once
        pending = self._pending_rows(account, since, until)
        skip = [r.request_id for r in pending]
        by_model, by_day = self._query(lambda conn: self._db_usage(conn, account, since, until, skip))
        return (_merge(by_model, pending, lambda r: r.model), _merge(by_day, pending, lambda r: r.day))

    def _neurons_used(self, account: str, since: datetime, max_age: float) -> tuple[float, float]:
        """(the total as last read, what this process had recorded when it was read): the total now is the first
        plus what this process recorded since (`NeuronsReading`)."""
        key, day = (account, since), since.date().isoformat()
        with self._lock:
            recorded = self._recorded[(account, day)]
        cached = self._db_sums.get(key)
        fresh = cached is not None and time.monotonic() - cached[2] < max_age
        if not fresh:
            pending = self._pending_rows(account, since)
            skip = [r.request_id for r in pending]
            try:
                total = self._query(lambda conn: self._db_neurons(conn, account, since, skip))
                self._db_sums[key] = cached = (total + sum(r.neurons for r in pending), recorded, time.monotonic())
            except LedgerUnavailableError:
                if cached is None:  # never read: what this process recorded today
                    return 0.0, 0.0
        assert cached is not None
        total, recorded_then, _read_at = cached
        return total, recorded_then

    def _db_neurons(self, conn: sa.Connection, account: str, since: datetime, skip: Sequence[str]) -> float:
        t = self.table
        total = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(t.c.neurons), 0.0))
                             .where(t.c.account == account, t.c.time >= since, t.c.request_id.not_in(skip))
                             ).scalar_one()
        return float(total)

    def _db_usage(self, conn: sa.Connection, account: str, since: datetime, until: datetime, skip: Sequence[str]
                  ) -> tuple[list[UsageGroup], list[UsageGroup]]:
        t = self.table
        totals = (
            sa.func.count().label("requests"),
            sa.func.coalesce(sa.func.sum(sa.case((t.c.cached, 1), else_=0)), 0).label("cached_requests"),
            sa.func.coalesce(sa.func.sum(t.c.input_tokens), 0).label("input_tokens"),
            sa.func.coalesce(sa.func.sum(t.c.output_tokens), 0).label("output_tokens"),
            sa.func.coalesce(sa.func.sum(t.c.neurons), 0.0).label("neurons"),
        )
        where = (t.c.account == account, t.c.time >= since, t.c.time < until, t.c.request_id.not_in(skip))

        def grouped(column: sa.Column[Any]) -> list[UsageGroup]:
            rows = conn.execute(sa.select(column, *totals).where(*where).group_by(column).order_by(column))
            return [UsageGroup(name=str(r[0]), requests=int(r.requests), cached_requests=int(r.cached_requests),
                               input_tokens=int(r.input_tokens), output_tokens=int(r.output_tokens),
                               neurons=round(float(r.neurons), 6)) for r in rows]

        return grouped(t.c.model), grouped(t.c.day)


def _merge(groups: Sequence[UsageGroup], rows: Sequence[UsageRow], name_of: Callable[[UsageRow], str]
           ) -> list[UsageGroup]:
    """`groups` with the totals of `rows` added, by name, sorted by name."""
    merged = {g.name: g for g in groups}
    for row in rows:
        name = name_of(row)
        old = merged.get(name, UsageGroup(name, 0, 0, 0, 0, 0.0))
        merged[name] = UsageGroup(name, old.requests + 1, old.cached_requests + int(row.cached),
                                  old.input_tokens + row.input_tokens, old.output_tokens + row.output_tokens,
                                  round(old.neurons + row.neurons, 6))
    return [merged[name] for name in sorted(merged)]


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
