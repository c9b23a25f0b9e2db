"""Client-side deadlines for database work: a database that hangs is a database that is away.

PostgreSQL's `statement_timeout` is enforced by the server, and TCP keepalives and `tcp_user_timeout` by the
kernels at both ends; none of them helps when the TCP connection is fine but nothing ever comes back (a frozen
database host, a proxy or load balancer that keeps the connection open and forwards nothing). A blocked driver
call then waits forever. So the ledger runs each piece of database work inside `deadline(seconds)`:

* the connections the work checks out of the pool are noted (`watch(engine)` adds the pool hooks);
* when the deadline passes, a watchdog thread shuts those sockets down (`shutdown(2)` on a duplicate of the
  driver's descriptor): the blocked call returns at once with a "server closed the connection" error, the pool
  throws the connection away, and the next attempt connects afresh;
* the work then raises `DatabaseTimeoutError`, which callers treat as the database being away.

A pooled connection is pinged (inside the same deadline) before it is handed out, instead of SQLAlchemy's
`pool_pre_ping`, which would wait unbounded before our hooks run; a connection that fails the ping is replaced by a
fresh one, whose connect is bounded by libpq's `connect_timeout`. Databases without sockets (SQLite) are bounded
in `ledger.make_database` instead.

No deadline can stop the watchdog: it waits at most `threading.TIMEOUT_MAX` at a time (a wait of 1e300 s raised
OverflowError in its thread, after which no deadline fired), and a deadline of NaN seconds is refused where it is
asked for (the watchdog would wake without end for it).
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

__all__ = ["DatabaseTimeoutError", "deadline", "expire", "watch"]

_FRESH = "int8serve_fresh"  # connection_record.info: connected for this checkout, no ping needed


class DatabaseTimeoutError(sa.exc.SQLAlchemyError):
    """Database work did not finish within its deadline: the database is treated as away."""


@dataclass(eq=False)
class _Work:
    seconds: float
    ends: float
    expired: bool = False
    sockets: list[socket.socket] = field(default_factory=list)


class _Watchdog:
    """One thread for the whole process: it wakes at the earliest deadline and cuts that work's sockets."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._work: dict[int, _Work] = {}  # by thread id: a thread does one piece of database work at a time
        self._thread: threading.Thread | None = None

    @contextlib.contextmanager
    def deadline(self, seconds: float) -> Iterator[_Work]:
        if math.isnan(seconds):
            raise ValueError(f"a database deadline is a number of seconds, got {seconds}")
        ident = threading.get_ident()
        work = _Work(seconds, time.monotonic() + seconds)
        with self._lock:
            if ident in self._work:
                raise RuntimeError("database work inside database work on the same thread")
            self._work[ident] = work
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="int8serve-db-deadline", daemon=True)
                self._thread.start()
            self._lock.notify()
        try:
            yield work
        except Exception as err:
            if work.expired:
                raise DatabaseTimeoutError(f"no answer from the database within {seconds:g} s") from err
            raise
        finally:
            with self._lock:
                del self._work[ident]
                sockets, work.sockets = work.sockets, []
            for sock in sockets:
                sock.close()

    def current(self) -> _Work | None:
        with self._lock:
            return self._work.get(threading.get_ident())

    def adopt(self, dbapi_connection: Any) -> None:
        """Note the connection's socket for this thread's work (cut at once if its deadline already passed)."""
        fileno = getattr(dbapi_connection, "fileno", None)
        if fileno is None:
            return
        with self._lock:
            work = self._work.get(threading.get_ident())
            if work is None:
                return
            try:
                duplicate = os.dup(fileno())
            except Exception:  # a closed connection: nothing to cut
                return
            try:
                sock = socket.socket(fileno=duplicate)
            except OSError:
                os.close(duplicate)
                return
            work.sockets.append(sock)
            if work.expired:
                _cut(sock)

    def expire(self, ident: int | None = None) -> None:
        """End the work of thread `ident` (of every thread when None) now, as if its deadline had passed."""
        with self._lock:
            for key, work in self._work.items():
                if ident is None or key == ident:
                    work.ends = 0.0
            self._lock.notify()

    def _run(self) -> None:
        with self._lock:
            while True:
                now = time.monotonic()
                pending = []
                for work in self._work.values():
                    if work.expired:
                        continue
                    if work.ends <= now:
                        work.expired = True
                        for sock in work.sockets:
                            _cut(sock)
                    else:
                        pending.append(work.ends)
                self._lock.wait(min(min(pending) - now, threading.TIMEOUT_MAX) if pending else None)


def _cut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


_WATCHDOG = _Watchdog()
_WATCHED: weakref.WeakSet[sa.Engine] = weakref.WeakSet()


def deadline(seconds: float) -> contextlib.AbstractContextManager[Any]:
    """Run the database work of the `with` block within `seconds`, or raise `DatabaseTimeoutError` (see the
    module docstring). The engines used must be `watch`ed."""
    return _WATCHDOG.deadline(seconds)


def expire(ident: int | None = None) -> None:
    """Cut the database work of thread `ident` (every thread's when None) now: for a shutdown that cannot wait."""
    _WATCHDOG.expire(ident)


def watch(engine: sa.Engine, ping: bool = False) -> sa.Engine:
    """Add the hooks that let `deadline` cut `engine`'s connections (idempotent); with `ping`, a pooled connection
    is also pinged, within the deadline, before it is handed out (for engines made without `pool_pre_ping`)."""
    if engine in _WATCHED:
        return engine
    _WATCHED.add(engine)
    dialect = engine.dialect

    def on_checkout(dbapi_connection: Any, record: Any, _proxy: Any) -> None:
        _on_checkout(dialect if ping else None, dbapi_connection, record)

    sa.event.listen(engine, "connect", _on_connect)
    sa.event.listen(engine, "checkout", on_checkout)
    sa.event.listen(engine, "do_connect", _on_do_connect)
    return engine


def _on_connect(_dbapi_connection: Any, record: Any) -> None:
    record.info[_FRESH] = True


def _on_do_connect(dialect: Any, _record: Any, _cargs: Any, _cparams: Any) -> None:
    work = _WATCHDOG.current()
    if work is not None and work.expired:
        raise DatabaseTimeoutError(f"no answer from the database within {work.seconds:g} s")


def _on_checkout(dialect: Any, dbapi_connection: Any, record: Any) -> None:
    if getattr(dbapi_connection, "fileno", None) is None:  # SQLite: nothing to cut, nothing to ping
        return
    _WATCHDOG.adopt(dbapi_connection)
    if record.info.pop(_FRESH, False) or dialect is None:
        return
    try:
        dialect.do_ping(dbapi_connection)
    except Exception as err:  # the pool replaces it with a fresh connection (one attempt)
        raise sa.exc.InvalidatePoolError(f"ping failed: {type(err).__name__}") from err
