"""The usage ledger: one durable SQL row per request that reached the engine or the cache.

A row holds the request id (the `cf-ai-req-id` of the answer), its time (UTC), account, model, billed input and
output tokens, neurons, whether it came from the cache, its outcome (`ok`, `aborted`, `error`) and its latency.
The table (`int8serve_usage` by default) is made by SQLAlchemy: a SQLite file in the data directory by default, any
SQLAlchemy URL with `--database-url` (PostgreSQL when replicas share one ledger); `request_id` is its primary key,
and rows are inserted with "on conflict do nothing", so writing a row twice is harmless.

No database I/O ever happens on the event loop's thread, and a request never waits for the database:

1. `await ledger.record(row)` hands the row to the writer thread, which appends it to the durable spool
   (`spool.py`, fsync) and only then lets the request be acknowledged. The writer never touches the database
   (unless the spool itself cannot be written: then it inserts the row directly, within the deadline below);
2. the flusher thread, on its own, inserts the spooled rows in order (at most `FLUSH_BATCH` a transaction) and takes
   them out of the spool after the commit. A row the database refuses for its data (`DataError`,
   `IntegrityError`: a value it cannot store, not an outage; or a `StatementError` of SQLAlchemy's own, raised
   before the driver saw the statement: a value it cannot even send) is found by splitting the batch, moved to the
   dead-letter file next to the spool and logged as an error; the other rows are written;
3. every piece of database work has a client-side deadline (`timeout`, 5 s; `deadline.py`): a flush, a read or a
   connection that gets no answer in time counts as the database being away, however healthy the TCP connection
   looks. While it is away, rows stay in the spool (one warning per outage, counted in `outages`), the flusher
   tries again every `retry_seconds` with a fresh connection, and replays them in order when it returns; the spool
   also survives a restart. When the spool passes `spool_alarm_rows` rows a warning says so (and `/metrics` shows
   its size). A record in the spool that is not a ledger row (a field of the wrong type, or a line that is not JSON
   at all: a damaged or hand-edited spool) is moved to the dead-letter file when the spool is read at start-up,
   like a refused row: sent to the database, it could be stored as it is (SQLite) or fail every batch it is in, and
   skipped, it would be lost at the spool's next rewrite.

Reads (the usage endpoint, the daily allocation) run on reader threads beside the writer and the flusher, so a slow
report never delays metering; they add the rows still in the spool to what the database holds (leaving those rows
out of the query, so that a row flushed meanwhile counts once), and a client sees its own requests in its usage at
once. While the database is away reads fail at once: the usage endpoint answers 503, and the daily allocation
counts the last total it read plus what this process recorded since (other replicas' rows of that time are counted
once the database is back). Admission waits at most `ALLOCATION_READ_WAIT` for a fresh total; a slower read
finishes in the background and the last total is used meanwhile.

`close()` is bounded too: the spooled rows are written if the database answers within the time given, and
otherwise stay in the spool, to be replayed at the next start.

The row types (`UsageRow`, `UsageGroup`, `NeuronsReading`) are in `usage_rows.py`, the table and the engine
(`usage_table`, `make_database`) in `ledger_db.py`; this module still exports them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import enum
import functools
import itertools
import json
import logging
import queue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import SQLAlchemyError

from .deadline import deadline, expire, watch
from .fallback import Outage
from .ledger_db import LedgerSchemaError, make_database, usage_table
from .settings import DEFAULT_DATABASE_TIMEOUT, DEFAULT_LEDGER_TABLE
from .spool import Spool, UnreadableLine
from .usage_rows import NeuronsReading, UsageGroup, UsageRow, utc_now

__all__ = [
    "DEFAULT_DATABASE_TIMEOUT",
    "Ledger",
    "LedgerSchemaError",
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
FLUSH_BATCH = 2_000  # rows in one flush transaction, so that a flush fits its deadline
DEFAULT_SPOOL_ALARM_ROWS = 10_000
ALLOCATION_READ_WAIT = 0.5  # seconds admission waits for a fresh daily total before using the last one
DAY = timedelta(days=1)  # the period of a daily total: `since` <= time < `since` + DAY
SPOOL_COMPACT_ROWS = 1_000  # rows already written that may stay in the spool file before it is rewritten
REJECTED = (sa.exc.DataError, sa.exc.IntegrityError)  # the database refuses the row itself: no retry will help


def _refused(err: BaseException) -> bool:
    """Is `err` a refusal of the rows themselves, which no retry will change (rather than the database away)? The
    database's `REJECTED` errors, and a `StatementError` that is not the driver's (`DBAPIError`): SQLAlchemy raised
    it in Python, building the statement, for a value it cannot send (`Not a boolean value: 'yes'`)."""
    if isinstance(err, REJECTED):
        return True
    return isinstance(err, sa.exc.StatementError) and not isinstance(err, sa.exc.DBAPIError)


class LedgerUnavailableError(Exception):
    """The ledger's database cannot be read right now."""


class _Job(enum.Enum):
    WRITE = "write"
    STOP = "stop"


@dataclass
class _Task:
    job: _Job
    done: concurrent.futures.Future[Any]
    row: UsageRow | None = None


@dataclass(frozen=True)
class _Spooled:
    """A row in the spool, numbered in the order it was spooled."""

    seq: int
    row: UsageRow


class Ledger:
    """The durable usage ledger, its writer, flusher and reader threads (see the module docstring)."""

    def __init__(self, database: sa.Engine, spool: Spool, table_name: str = DEFAULT_LEDGER_TABLE,
                 retry_seconds: float = 1.0, spool_name: str = "memory",
                 spool_alarm_rows: int = DEFAULT_SPOOL_ALARM_ROWS,
                 timeout: float = DEFAULT_DATABASE_TIMEOUT) -> None:
        self.database = watch(database)
        self.timeout = timeout
        self.metadata = sa.MetaData()
        self.table = usage_table(table_name, self.metadata)
        self.spool = spool
        self.spool_name = spool_name
        self.spool_alarm_rows = spool_alarm_rows
        self.outage = Outage("the ledger database", f"rows are kept in the spool {spool_name} and replayed when "
                             "it returns", retry_seconds, logger=log)
        self.rejected = 0  # rows the database refused for their data, moved to the dead-letter file
        self._tasks: queue.Queue[_Task] = queue.Queue()
        # locks: _spool_lock (every spool operation, so that the file and _unflushed change together), _lock
        # (_unflushed, _recorded, _db_sums, _refreshing, also read by the reader threads) and _flushing (the flusher's
        # state, and its waiters). _lock may be taken inside either of the others, and nothing is taken inside _lock
        self._spool_lock = threading.Lock()
        self._lock = threading.Lock()
        self._flushing = threading.Condition()
        self._seq = itertools.count(1)
        rows, unreadable = _rows_from_spool(spool.read())
        self._unflushed = [_Spooled(next(self._seq), row) for row in rows]
        self._last_seq = self._unflushed[-1].seq if self._unflushed else 0
        if self._unflushed:  # left by a previous run: replayed first
            log.warning("replaying %d ledger rows left in %s", len(self._unflushed), spool_name)
        self._stale = 0  # rows still in the spool file that are in the database already
        # the state of each account and day: only yesterday's and today's are kept (`_forget_past_days_locked`)
        self._recorded: Counter[tuple[str, str]] = Counter()  # neurons this process recorded, by (account, day)
        self._db_sums: dict[tuple[str, datetime], tuple[float, float, float]] = {}  # -> (sum, recorded, read at)
        self._refreshing: dict[tuple[str, datetime], concurrent.futures.Future[None]] = {}  # the reads running
        self._today: date | None = None  # the clock's day when that state was last trimmed
        self._forgets = 0  # how many times it was, so that a read across a trim stores nothing forgotten
        self._alarmed = False
        self._failures = 0  # failed flush attempts, for `flush()`
        self._closing = False
        self._close_by = 0.0
        self._writer = threading.Thread(target=self._run, name="int8serve-ledger", daemon=True)
        self._flusher = threading.Thread(target=self._flush_loop, name="int8serve-ledger-flush", daemon=True)
        self._readers = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="int8serve-ledger-read")
        self._start_lock = threading.Lock()
        self._closed = False
        self._spool_closed = False
        if unreadable:
            self._set_aside(unreadable)

    # ---- set-up (start-up thread) ----

    def _set_aside(self, unreadable: Sequence[tuple[Any, str]]) -> None:
        """Move the spooled records that are not ledger rows (with the reason) to the dead-letter file, as the
        database's refusals are, and out of the spool."""
        entries = [{**_dead_letter_entry(record, reason), "time": utc_now().isoformat()}
                   for record, reason in unreadable]
        with self._spool_lock:
            try:
                self.spool.dead_letter(entries)
            except OSError as err:  # in the log at least: the spool is rewritten without them sooner or later
                log.error("cannot write %d unreadable ledger rows of %s to %s (%s); they were: %s", len(entries),
                          self.spool_name, self.spool.dead_letter_name, err, entries)
                return
            with self._lock:
                self.rejected += len(entries)
            self._stale += len(entries)
            self._compact(1)
        for record, reason in unreadable:
            shown = record.data if isinstance(record, UnreadableLine) else record
            log.error("an unreadable ledger row in %s (%s): %.300r; moved to %s", self.spool_name, reason, shown,
                      self.spool.dead_letter_name)

    def create_schema(self) -> None:
        """Create the table and its index if missing; raises SQLAlchemyError when the database is unreachable (or
        does not answer within the timeout)."""
        for attempt in itertools.count():
            try:
                with deadline(self.timeout):
                    self.metadata.create_all(self.database, checkfirst=True)
                    self._check_columns()
                return
            except (sa.exc.IntegrityError, sa.exc.ProgrammingError):
                if attempt >= 2:  # a replica starting at the same moment may have won the race; else a real error
                    raise
                time.sleep(0.2)

    def _check_columns(self) -> None:
        """A table of that name made by something else (or by another version) would refuse every row: the ledger
        would take the database for away, forever, while it answers. Said at start instead (LedgerSchemaError)."""
        with self.database.connect() as conn:
            found = {column["name"] for column in sa.inspect(conn).get_columns(self.table.name)}
        missing = [column.name for column in self.table.columns if column.name not in found]
        if missing:
            raise LedgerSchemaError(f"its table {self.table.name} exists with other columns than the ledger's "
                                    f"(missing: {', '.join(missing)}): give the ledger a database of its own, or "
                                    "rename that table")

    def start(self) -> Ledger:
        with self._start_lock:
            if self._writer.ident is None and not self._closed:
                self._writer.start()
                self._flusher.start()
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
        """Return once `row` is durable (spooled, or in the database); raises LedgerUnavailableError if neither.
        Never waits for the database while the spool can be written. Cancelling the caller does not cancel the
        write: the row is written all the same, and the other rows of its batch are acknowledged as usual."""
        await asyncio.shield(asyncio.wrap_future(self._put(_Job.WRITE, row)))

    async def usage(self, account: str, since: datetime, until: datetime) -> tuple[list[UsageGroup], list[UsageGroup]]:
        """(by model, by day) totals of `account` for `since` <= time < `until`, spooled rows included; read beside
        the writer, so that reading never delays metering. LedgerUnavailableError while the database is away, or
        when it does not answer within the timeout."""
        return await self._read(lambda: self._usage(account, since, until))

    async def neurons_used(self, account: str, since: datetime, max_age: float = 1.0,
                           wait: float = ALLOCATION_READ_WAIT) -> float:
        """Neurons metered to `account` in the day from `since` (`since` <= time < `since` + 1 day; with `since` at
        00:00, that UTC day: a later day's rows, another replica's whose clock is ahead, never count), spooled rows
        included. The database is read at most every `max_age` seconds per account, and waited for at most `wait`
        seconds (the read goes on in the background); in between, and while it is away, the last total read plus
        what this process recorded since."""
        return (await self.neurons_reading(account, since, max_age, wait)).now()

    async def neurons_reading(self, account: str, since: datetime, max_age: float = 1.0,
                              wait: float = ALLOCATION_READ_WAIT) -> NeuronsReading:
        """`neurons_used`, as a reading whose `now()` adds what this process recorded up to the moment it is
        called, without I/O: a check on the event loop sees every row recorded before it, even one recorded
        while the database was being read (the daily allocation relies on it)."""
        key = (account, since)
        with self._lock:
            self._forget_past_days_locked()
        if not self._closed and self.healthy and not self._fresh(key, max_age):
            refresh = self._refresh(key)
            if refresh is not None:  # never raises; left running when slower than `wait`
                await asyncio.wait([asyncio.wrap_future(refresh)], timeout=wait)
        total, recorded_then = self._last_read(account, since)
        return NeuronsReading(self, account, since.date().isoformat(), total, recorded_then)

    def recorded_neurons(self, account: str, day: str) -> float:
        """Neurons of `account` this process recorded for `day` (YYYY-MM-DD) since it started."""
        with self._lock:
            return self._recorded[(account, day)]

    # ---- any other thread (start-up, shutdown, tests) ----

    def flush(self, timeout: float = 10.0) -> bool:
        """Block until every row recorded so far is in the database (or, refused for its data, in the dead-letter
        file); False if it is not reachable in time, or a flush attempt failed meanwhile."""
        if self._closed:
            return self.pending == 0
        self.start()
        ends = time.monotonic() + timeout
        with self._lock:
            target = self._last_seq
        with self._flushing:
            failures = self._failures
            self._flushing.notify_all()
            while not self._settled_through(target):
                left = ends - time.monotonic()
                if self._failures > failures or left <= 0 or not self._flusher.is_alive():
                    return False
                self._flushing.wait(left)
            return True

    def close(self, timeout: float = 10.0) -> None:
        """Stop taking rows, write what the database takes within `timeout` seconds (nothing more is tried while it
        is away), stop the threads and release the spool: rows left there are replayed at the next start."""
        with self._start_lock:
            if self._closed:
                return
            self._closed = True  # no write is queued behind the stop
            stopped = self._put_task(_Job.STOP) if self._writer.is_alive() else None
        ends = time.monotonic() + timeout
        if stopped is not None:
            with contextlib.suppress(concurrent.futures.TimeoutError):
                stopped.result(max(0.0, ends - time.monotonic()))
            self._writer.join(max(0.0, ends - time.monotonic()))
        if self._flusher.is_alive():
            with self._flushing:
                self._closing, self._close_by = True, ends
                self._flushing.notify_all()
            self._flusher.join(max(0.0, ends - time.monotonic()))
            if self._flusher.is_alive() and self._flusher.ident is not None:  # in a flush past the time given
                expire(self._flusher.ident)
                self._flusher.join(2.0)
        self._readers.shutdown(wait=False, cancel_futures=True)
        with self._spool_lock:
            self._compact(1)  # the next start replays only the rows still waiting
            self._spool_closed = True
            if self._unflushed:
                log.warning("%d ledger rows stay in %s until the next start", len(self._unflushed), self.spool_name)
            self.spool.close()
        self.database.dispose()

    # ---- plumbing ----

    def _put(self, job: _Job, row: UsageRow | None = None) -> concurrent.futures.Future[Any]:
        self.start()  # a no-op once started; lazily for ledgers made without an explicit start
        with self._start_lock:
            if self._closed:
                raise LedgerUnavailableError("the ledger is closed")
            return self._put_task(job, row)

    def _put_task(self, job: _Job, row: UsageRow | None = None) -> concurrent.futures.Future[Any]:
        task = _Task(job, concurrent.futures.Future(), row)
        self._tasks.put(task)
        return task.done

    async def _read(self, read: Callable[[], T]) -> T:
        if self._closed:
            raise LedgerUnavailableError("the ledger is closed")
        try:
            future = self._readers.submit(read)
        except RuntimeError:  # shut down meanwhile
            raise LedgerUnavailableError("the ledger is closed") from None
        try:  # the read has its own deadline; this one only guards against a reader stuck elsewhere
            return await asyncio.wait_for(asyncio.wrap_future(future), self.timeout + 1.0)
        except TimeoutError:
            raise LedgerUnavailableError("the ledger database did not answer in time") from None

    def _wake(self) -> None:
        with self._flushing:
            self._flushing.notify_all()

    def _settled_through(self, seq: int) -> bool:
        with self._lock:
            return not self._unflushed or self._unflushed[0].seq > seq

    # ---- the writer thread: the spool ----

    def _run(self) -> None:
        while True:
            tasks = self._next_tasks()
            writes = [t for t in tasks if t.job is _Job.WRITE]
            try:
                if writes:
                    self._spool_rows(writes)
            except Exception:  # a bug must not leave requests waiting forever on a dead writer
                log.exception("the ledger writer failed on a batch of %d rows", len(writes))
                for task in writes:
                    _answer(task.done, LedgerUnavailableError("the ledger writer failed"))
            for task in tasks:
                if task.job is _Job.STOP:
                    task.done.set_result(True)
                    return

    def _next_tasks(self) -> list[_Task]:
        tasks = [self._tasks.get()]
        while True:
            try:
                tasks.append(self._tasks.get_nowait())
            except queue.Empty:
                return tasks

    def _spool_rows(self, writes: Sequence[_Task]) -> None:
        rows = [task.row for task in writes if task.row is not None]
        try:
            with self._spool_lock:
                self.spool.append([row.to_json() for row in rows])
                with self._lock:
                    self._forget_past_days_locked()
                    for row in rows:
                        spooled = _Spooled(next(self._seq), row)
                        self._unflushed.append(spooled)
                        self._last_seq = spooled.seq
                        self._recorded[(row.account, row.day)] += row.neurons
        except OSError as err:
            log.error("cannot append to the ledger spool %s (%s): writing to the database directly",
                      self.spool_name, err)
            error = self._insert_now(rows)
            for task in writes:
                _answer(task.done, error)
            return
        for task in writes:
            _answer(task.done, None)
        self._wake()
        self._check_spool_size()

    def _insert_now(self, rows: Sequence[UsageRow]) -> LedgerUnavailableError | None:
        if not self.healthy:  # no waiting for a database known to be away
            return LedgerUnavailableError("neither the spool nor the database can take ledger rows")
        try:
            self._write(rows, self.timeout)
        except SQLAlchemyError as err:
            self.outage.failed(err)
            self._wake()
            return LedgerUnavailableError("neither the spool nor the database can take ledger rows")
        with self._lock:
            self._forget_past_days_locked()
            for row in rows:
                self._recorded[(row.account, row.day)] += row.neurons
        return None

    # ---- the flusher thread: spool -> database ----

    def _flush_loop(self) -> None:
        while True:
            with self._flushing:
                while not self._closing:
                    if self.outage.healthy:
                        if self.pending:
                            break
                        self._flushing.wait()
                    elif (wait := self.outage.seconds_to_retry) > 0:
                        self._flushing.wait(wait)
                    else:
                        break
                closing = self._closing
            try:
                if closing:
                    self._final_flush()
                    return
                if not self.outage.should_try():  # a reader found it away meanwhile
                    continue
                if self.pending:
                    self._flush_batch(self.timeout)
                else:
                    self._probe()
            except Exception as err:  # a bug: counted as a failed attempt, tried again later
                log.exception("the ledger flusher failed")
                self._failed(err)
                if closing:
                    return

    def _final_flush(self) -> None:
        """At close: what the database takes before `_close_by`, if it is not known to be away."""
        while self.pending and self.healthy:
            left = self._close_by - time.monotonic()
            if left <= 0 or not self._flush_batch(min(self.timeout, left)):
                return

    def _probe(self) -> None:
        """While the database is away and no row waits: is it back?"""
        try:
            with deadline(self.timeout), self.database.connect() as conn:
                conn.exec_driver_sql("SELECT 1").all()
        except (SQLAlchemyError, OSError) as err:
            self._failed(err)
            return
        self.outage.recovered()

    def _failed(self, err: BaseException) -> None:
        self.outage.failed(err)
        with self._flushing:
            self._failures += 1
            self._flushing.notify_all()

    def _flush_batch(self, seconds: float) -> bool:
        """Insert the oldest spooled rows (at most FLUSH_BATCH) within `seconds`; rows the database refuses for
        their data go to the dead-letter file. False when the database is away."""
        with self._lock:
            batch = self._unflushed[:FLUSH_BATCH]
        if not batch:
            return True
        error: BaseException | None = None
        try:
            self._write([s.row for s in batch], seconds)
            inserted, dead = list(batch), []
        except (SQLAlchemyError, OSError) as err:
            inserted, dead, error = self._sift(batch, err, seconds) if _refused(err) else ([], [], err)
        if self._settle(inserted, dead):  # refused rows that could not be moved aside: not in a tight loop
            with self._flushing:
                self._flushing.wait(self.outage.retry_seconds)
        if error is not None:
            self._failed(error)
            return False
        self.outage.recovered(f"{len(inserted)} spooled rows replayed")
        self._wake()
        self._check_spool_size()
        return True

    def _sift(self, batch: Sequence[_Spooled], err: BaseException, seconds: float
              ) -> tuple[list[_Spooled], list[tuple[_Spooled, str]], BaseException | None]:
        """The batch was refused: insert it in halves, each in its own transaction, down to the rows that are
        refused alone (about 2 log2(n) transactions per bad row) -> (inserted, refused with the reason, the
        error that stopped it if the database went away meanwhile)."""
        inserted: list[_Spooled] = []
        dead: list[tuple[_Spooled, str]] = []

        def sift(part: Sequence[_Spooled], failure: BaseException | None) -> None:
            if failure is None:
                try:
                    self._write([s.row for s in part], seconds)
                    inserted.extend(part)
                    return
                except SQLAlchemyError as err:
                    if not _refused(err):
                        raise
                    failure = err
            if len(part) == 1:
                dead.append((part[0], short_error(failure)))
                return
            half = len(part) // 2
            sift(part[:half], None)
            sift(part[half:], None)

        try:
            sift(batch, err)
        except (SQLAlchemyError, OSError) as lost:
            return inserted, dead, lost
        return inserted, dead, None

    def _write(self, rows: Sequence[UsageRow], seconds: float) -> None:
        """One transaction, within `seconds`."""
        with deadline(seconds), self.database.begin() as conn:
            for start in range(0, len(rows), INSERT_CHUNK):
                self._insert_ignore(conn, rows[start:start + INSERT_CHUNK])

    def _settle(self, inserted: Sequence[_Spooled], dead: Sequence[tuple[_Spooled, str]]) -> int:
        """Take rows written (or refused and dead-lettered) out of the spool: empty it when nothing is left; else
        rewrite it with what is left once the rows done linger in it in numbers (at least SPOOL_COMPACT_ROWS, and
        at least as many as the rows left, so that replaying a long spool rewrites it a few times, not once a
        batch). -> the number of refused rows that stay in the spool (the dead-letter file could not be written)."""
        if not inserted and not dead:
            return 0
        kept = 0
        with self._spool_lock:
            if dead and not self._spool_closed:
                entries = [{"row": s.row.to_json(), "reason": reason, "time": utc_now().isoformat()}
                           for s, reason in dead]
                try:
                    self.spool.dead_letter(entries)
                except OSError as err:
                    log.error("cannot write %d refused ledger rows to %s (%s): they stay in the spool",
                              len(dead), self.spool.dead_letter_name, err)
                    kept, dead = len(dead), []
            done = {s.seq for s in inserted} | {s.seq for s, _ in dead}
            with self._lock:
                self._unflushed = [s for s in self._unflushed if s.seq not in done]
                self.rejected += len(dead)
            self._stale += len(done)
            self._compact(max(SPOOL_COMPACT_ROWS, self.pending))
        for spooled, reason in dead:
            row = spooled.row
            log.error("the ledger database refused row %s (account %r, model %r): %s; moved to %s", row.request_id,
                      row.account[:200], row.model[:200], reason, self.spool.dead_letter_name)
        return kept

    def _compact(self, stale_rows: int) -> None:
        """With `_spool_lock` held: rewrite the spool with the rows still waiting once `stale_rows` rows that are
        done linger in it (empty it when none is waiting)."""
        if self._spool_closed or not self._stale:
            return
        with self._lock:
            left = list(self._unflushed)
        try:
            if not left:
                self.spool.clear()
            elif self._stale >= stale_rows:
                self.spool.replace([s.row.to_json() for s in left])
            else:
                return
            self._stale = 0
        except OSError as err:  # the rows are in the database (or the dead-letter file): replaying is harmless
            log.error("cannot rewrite the ledger spool %s: %s", self.spool_name, err)

    def _check_spool_size(self) -> None:
        """The spool's alarm: one warning when it passes `spool_alarm_rows`, one when it is back under."""
        with self._lock:
            pending = len(self._unflushed)
            over = pending >= self.spool_alarm_rows
            changed = over != self._alarmed
            self._alarmed = over
        if changed and over:
            log.warning("the ledger spool %s holds %d rows (alarm at %d): the database has not taken rows for "
                        "a while", self.spool_name, pending, self.spool_alarm_rows)
        elif changed:
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
            return self._pending_rows_locked(account, since, until)

    def _pending_rows_locked(self, account: str, since: datetime, until: datetime | None = None) -> list[UsageRow]:
        """`_pending_rows` for a caller that holds `_lock`."""
        return [s.row for s in self._unflushed
                if s.row.account == account and s.row.time >= since and (until is None or s.row.time < until)]

    def _query(self, query: Callable[[sa.Connection], T]) -> T:
        if not self.healthy:  # the flusher finds out when it is back; a read never waits for that
            raise LedgerUnavailableError("the ledger database is unreachable")
        try:
            with deadline(self.timeout), self.database.connect() as conn:
                result = query(conn)
        except (SQLAlchemyError, OSError) as err:
            self.outage.failed(err)
            self._wake()
            raise LedgerUnavailableError("the ledger database is unreachable") from None
        return result

    def _usage(self, account: str, since: datetime, until: datetime) -> tuple[list[UsageGroup], list[UsageGroup]]:
        # the spooled rows first, then the database without them: a row flushed meanwhile is counted once
        pending = self._pending_rows(account, since, until)
        skip = [r.request_id for r in pending]
        by_model, by_day = self._query(lambda conn: self._db_usage(conn, account, since, until, skip))
        return (_merge(by_model, pending, lambda r: r.model), _merge(by_day, pending, lambda r: r.day))

    def _forget_past_days_locked(self) -> None:
        """With `_lock` held, once a day by the clock: drop the state of every (account, day) but today's and
        yesterday's (a request that arrived before midnight may still run, and its row counts to its day), so that
        it does not grow with accounts x days. A day forgotten is read again from the database when asked for: its
        total and what this process recorded of it go together, the one is never kept without the other."""
        today = utc_now().date()
        if today == self._today:
            return
        self._today, self._forgets = today, self._forgets + 1
        self._recorded = Counter({key: n for key, n in self._recorded.items() if self._kept_locked(key[1])})
        self._db_sums = {key: v for key, v in self._db_sums.items() if self._kept_locked(key[1].date().isoformat())}

    def _kept_locked(self, day: str) -> bool:
        """Is the state of `day` (YYYY-MM-DD) kept after the last trim: today's or yesterday's?"""
        if self._today is None:
            return True
        return day in (self._today.isoformat(), (self._today - DAY).isoformat())

    def _fresh(self, key: tuple[str, datetime], max_age: float) -> bool:
        with self._lock:
            cached = self._db_sums.get(key)
        return cached is not None and time.monotonic() - cached[2] < max_age

    def _refresh(self, key: tuple[str, datetime]) -> concurrent.futures.Future[None] | None:
        """The read of `key`'s database total in flight, or a new one; None once the readers are shut down."""
        with self._lock:
            running = self._refreshing.get(key)
            if running is not None and not running.done():
                return running
            try:
                future = self._refreshing[key] = self._readers.submit(self._read_sum, *key)
            except RuntimeError:
                return None
        future.add_done_callback(functools.partial(self._refreshed, key))  # outside `_lock`: it may run at once
        return future

    def _refreshed(self, key: tuple[str, datetime], future: concurrent.futures.Future[None]) -> None:
        """A read of `key`'s total ended: it is no longer running (unless another one took its place)."""
        with self._lock:
            if self._refreshing.get(key) is future:
                del self._refreshing[key]

    def _read_sum(self, account: str, since: datetime) -> None:
        day = since.date().isoformat()
        with self._lock:  # one snapshot: a row spooled between the two would count twice (`NeuronsReading.now`)
            recorded, forgets = self._recorded[(account, day)], self._forgets
            pending = self._pending_rows_locked(account, since, _day_after(since))
        skip = [r.request_id for r in pending]
        try:
            total = self._query(lambda conn: self._db_neurons(conn, account, since, skip))
        except LedgerUnavailableError:
            return
        with self._lock:
            if forgets != self._forgets and not self._kept_locked(day):  # `recorded` was forgotten meanwhile
                return
            self._db_sums[(account, since)] = (total + sum(r.neurons for r in pending), recorded, time.monotonic())

    def _last_read(self, account: str, since: datetime) -> tuple[float, float]:
        """(the total as last read, what this process had recorded when it was read); (0, 0) when never read, so
        that the total now is what this process recorded (`NeuronsReading.now`)."""
        with self._lock:
            cached = self._db_sums.get((account, since))
        if cached is None:
            return 0.0, 0.0
        total, recorded_then, _read_at = cached
        return total, recorded_then

    def _db_neurons(self, conn: sa.Connection, account: str, since: datetime, skip: Sequence[str]) -> float:
        """The database's neurons of `account` for `since` <= time < `since` + DAY, but the rows `skip`."""
        t = self.table
        total = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(t.c.neurons), 0.0))
                             .where(t.c.account == account, t.c.time >= since, t.c.time < _day_after(since),
                                    _none_of(conn, t.c.request_id, skip))).scalar_one()
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
        where = (t.c.account == account, t.c.time >= since, t.c.time < until,
                 _none_of(conn, t.c.request_id, skip))

        def grouped(column: sa.Column[Any]) -> list[UsageGroup]:
            rows = conn.execute(sa.select(column, *totals).where(*where).group_by(column).order_by(column))
            return [UsageGroup(name=str(r[0]), requests=int(r.requests), cached_requests=int(r.cached_requests),
                               input_tokens=int(r.input_tokens), output_tokens=int(r.output_tokens),
                               neurons=round(float(r.neurons), 6)) for r in rows]

        return grouped(t.c.model), grouped(t.c.day)


def _day_after(since: datetime) -> datetime:
    """The end of a daily total's period: `since` + DAY (the calendar's end for its last day)."""
    return since + DAY if since < datetime.max - DAY else datetime.max


def _none_of(conn: sa.Connection, column: sa.Column[str], values: Sequence[str]) -> sa.ColumnElement[bool]:
    """`column NOT IN values`, with the values as one JSON parameter on PostgreSQL and SQLite: one parameter per
    value would fail past PostgreSQL's 65,535 (SQLite's 32,766) — a spool holding a long outage's rows."""
    if not values:
        return sa.true()
    if conn.dialect.name == "postgresql":
        ids = sa.bindparam("spooled_ids", list(values), type_=postgresql.JSONB)
        elements = sa.func.jsonb_array_elements_text(ids).table_valued("value")
    elif conn.dialect.name == "sqlite":
        elements = sa.func.json_each(json.dumps(list(values))).table_valued("value")
    else:
        return column.not_in(values)
    return column.not_in(sa.select(elements.c.value))


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


def _rows_from_spool(records: Sequence[Any]) -> tuple[list[UsageRow], list[tuple[Any, str]]]:
    """(the spooled records that are ledger rows, as rows; the others, with the reason)."""
    rows, unreadable = [], []
    for record in records:
        if isinstance(record, UnreadableLine):
            unreadable.append((record, record.reason))
            continue
        try:
            rows.append(UsageRow.from_json(record))
        except (TypeError, ValueError) as err:
            unreadable.append((record, short_error(err)))
    return rows, unreadable


def _dead_letter_entry(record: Any, reason: str) -> dict[str, Any]:
    """A spooled record that is not a ledger row, for the dead-letter file: `{"row": ...}` for a JSON value,
    `{"line": ...}` (or `"line_base64"`) for a line that is not JSON, byte for byte."""
    if isinstance(record, UnreadableLine):
        return record.dead_letter_entry()
    return {"row": record, "reason": reason}


def short_error(err: BaseException) -> str:
    text = " ".join(str(getattr(err, "orig", None) or err).split())
    return f"{type(err).__name__}: {text[:200]}"


def _answer(done: concurrent.futures.Future[Any], error: BaseException | None) -> None:
    """Tell a writer's caller how its row went, unless nobody waits any more (a future cancelled meanwhile)."""
    with contextlib.suppress(concurrent.futures.InvalidStateError):
        if error is None:
            done.set_result(None)
        else:
            done.set_exception(error)
