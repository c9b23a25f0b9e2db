"""Real backends to serve with, and to take away: a private `redis-server`, a TCP proxy that cuts or freezes the
connections to a server behind it (PostgreSQL), a PostgreSQL schema of one's own, and a Redis key prefix's cleanup.

`benchmarks/load.py` stops and restarts them mid-run (`--fault`); the policy tests make fixtures of them
(tests/service/policy/conftest.py). What cannot be set up raises `BackendError`.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import redis
import sqlalchemy as sa
from redis.backoff import NoBackoff
from redis.retry import Retry

from benchmarks.common import free_port

LEDGER_TABLE = "int8serve_usage"  # the usage ledger's table (int8serve.service.policy.ledger)


class BackendError(RuntimeError):
    """A backend could not be set up: not installed, not started, or it refused."""


class RedisServer:
    """A `redis-server` of its own on a loopback port, saving nothing (a restart starts empty), which its user may
    stop (SIGTERM) or kill (SIGKILL) and start again on the same port. Its output goes to `log_path`, appended."""

    def __init__(self, port: int | None = None, log_path: Path | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise BackendError("redis-server is not installed")
        self.binary = binary
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 10.0) -> RedisServer:
        """Start it; return once it answers PING (BackendError if it exits first or stays silent)."""
        command = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                   "--daemonize", "no"]
        with self.log_path.open("ab") if self.log_path else contextlib.nullcontext() as log:
            self.process = subprocess.Popen(command, stdout=log or subprocess.DEVNULL, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not self.pings():
            if self.process.poll() is not None:
                raise BackendError(f"redis-server exited with {self.process.returncode} at start{self._log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise BackendError(f"redis-server did not answer PING on port {self.port} within {timeout:.0f} s")
            time.sleep(0.05)
        return self

    def pings(self) -> bool:
        """Whether it answers PING now."""
        client = self.client(socket_connect_timeout=0.2, socket_timeout=1, retry=Retry(NoBackoff(), 0))  # once
        try:
            return bool(client.ping())
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError):
            return False
        finally:
            client.close()

    def client(self, **options: Any) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, **options)

    def stop(self) -> None:
        """SIGTERM (SIGKILL after 10 s), and reap."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()

    def kill(self) -> None:
        """SIGKILL, and reap: Redis lost at once."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def _log_tail(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return ":\n" + self.log_path.read_text(errors="replace")[-2000:]


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


class PostgresSchema:
    """A schema of its own (`prefix` and 12 hex digits) in the PostgreSQL database at `url`: a server given
    `server_url()` makes its tables there (its only search path); `drop()` removes it with everything in it."""

    def __init__(self, url: str, prefix: str) -> None:
        self.url = sa.make_url(url)
        if not self.url.drivername.startswith("postgresql"):
            raise BackendError(f"a PostgreSQL URL is needed, got {self.url.drivername}")
        self.name = f"{prefix}{uuid.uuid4().hex[:12]}"
        self.created = False

    def create(self) -> PostgresSchema:
        try:
            self._execute(f'CREATE SCHEMA "{self.name}"')
        except (sa.exc.SQLAlchemyError, ImportError) as exc:
            raise BackendError(f"cannot create a schema in PostgreSQL at {self.url!r}: {exc}") from exc
        self.created = True
        return self

    def server_url(self, port: int | None = None) -> str:
        """The database's URL with this schema as the only search path; given `port`, through a proxy listening
        there on loopback (`TcpProxy`)."""
        url = self.url if port is None else self.url.set(host="127.0.0.1", port=port)
        return url.update_query_dict({"options": f"-csearch_path={self.name}"}).render_as_string(hide_password=False)

    def rows(self, table: str = LEDGER_TABLE) -> list[dict[str, Any]]:
        """Every row of the ledger table (or `table`) in this schema, oldest first."""
        return read_rows(self.url.render_as_string(hide_password=False), f'"{self.name}"."{table}"')

    def drop(self) -> None:
        if self.created:
            self._execute(f'DROP SCHEMA IF EXISTS "{self.name}" CASCADE')
            self.created = False

    def _execute(self, statement: str) -> None:
        engine = sa.create_engine(self.url)
        try:
            with engine.begin() as conn:
                conn.execute(sa.text(statement))
        finally:
            engine.dispose()


def read_rows(url: str, table: str) -> list[dict[str, Any]]:
    """Every row of the ledger table `table` (quoted as needed) in the database at `url`, oldest first."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            return [dict(row._mapping) for row in conn.execute(sa.text(f"SELECT * FROM {table} ORDER BY time"))]
    finally:
        engine.dispose()


def delete_keys(url: str, prefix: str) -> None:
    """Delete the keys `prefix:*` of the Redis at `url` (its own query, such as a key prefix, left out)."""
    client = redis.Redis.from_url(url.split("?")[0])
    try:
        keys = list(client.scan_iter(match=f"{prefix}:*", count=500))
        if keys:
            client.delete(*keys)
    finally:
        client.close()
