"""benchmarks/backends.py: the private redis-server, the TCP proxy and the PostgreSQL schema that benchmarks/load.py
and the policy tests take away and give back. They need `redis-server` and the machine's PostgreSQL (127.0.0.1:5432,
database `test`, or $INT8SERVE_TEST_DATABASE_URL); without them they fail, never skip."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from benchmarks.backends import BackendError, PostgresSchema, RedisServer, TcpProxy
from benchmarks.common import free_port

POSTGRES_URL = os.environ.get("INT8SERVE_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


def test_a_private_redis_stopped_and_started_again_is_empty() -> None:
    server = RedisServer().start()
    try:
        client = server.client()
        client.set("key", "value")
        assert server.pings() and client.get("key") == b"value"
        server.stop()
        assert not server.pings() and server.process is not None and server.process.returncode == 0
        server.start()  # the same port: the URL a server was given holds
        assert server.pings() and client.get("key") is None  # nothing was saved
        client.close()
        server.kill()
        assert not server.pings() and server.process.returncode == -9
    finally:
        server.kill()


def test_a_redis_server_that_cannot_start_says_why(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        server = RedisServer(taken.getsockname()[1], log_path=tmp_path / "redis.log")
        with pytest.raises(BackendError, match=r"(?s)redis-server exited with 1 at start:.*already in use"):
            server.start()


@pytest.fixture
def echo_port() -> Iterator[int]:
    """A loopback server that sends back what it receives, on each connection."""
    listener = socket.create_server(("127.0.0.1", 0))

    def echo(conn: socket.socket) -> None:
        with conn:
            while data := conn.recv(1024):
                conn.sendall(data)

    def accept() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            threading.Thread(target=echo, args=(conn,), daemon=True).start()

    threading.Thread(target=accept, daemon=True).start()
    yield listener.getsockname()[1]
    listener.close()


def connect(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.settimeout(2)
    return sock


def test_the_proxy_forwards_cuts_freezes_and_restores(echo_port: int) -> None:
    proxy = TcpProxy(("127.0.0.1", echo_port)).start()
    try:
        sock = connect(proxy.port)
        sock.sendall(b"one")
        assert sock.recv(16) == b"one"
        proxy.cut()  # the open connection dropped, new ones closed at once
        assert sock.recv(16) == b""
        with connect(proxy.port) as refused:
            assert refused.recv(16) == b""
        proxy.restore()
        with connect(proxy.port) as again:
            again.sendall(b"two")
            assert again.recv(16) == b"two"
            proxy.blackhole()  # open, but nothing comes back
            again.sendall(b"three")
            again.settimeout(0.5)
            with pytest.raises(TimeoutError):
                again.recv(16)
            proxy.restore()  # held, not lost
            again.settimeout(2)
            assert again.recv(16) == b"three"
    finally:
        proxy.stop()


def test_a_schema_of_its_own_holds_a_servers_tables_until_dropped() -> None:
    schema = PostgresSchema(POSTGRES_URL, prefix="int8serve_test_").create()
    try:
        assert schema.name.startswith("int8serve_test_") and len(schema.name) == len("int8serve_test_") + 12
        url = sa.make_url(schema.server_url(port=free_port()))
        assert (url.host, url.query["options"]) == ("127.0.0.1", f"-csearch_path={schema.name}")
        engine = sa.create_engine(schema.server_url())  # as a server is given it: unqualified names land there
        with engine.begin() as conn:
            conn.execute(sa.text("CREATE TABLE int8serve_usage (request_id text, time timestamp)"))
            conn.execute(sa.text("INSERT INTO int8serve_usage VALUES ('b', '2026-01-02'), ('a', '2026-01-01')"))
        engine.dispose()
        assert [row["request_id"] for row in schema.rows()] == ["a", "b"]  # oldest first
    finally:
        schema.drop()
    with sa.create_engine(POSTGRES_URL).connect() as conn:
        names = conn.execute(sa.text("SELECT schema_name FROM information_schema.schemata")).scalars().all()
    assert schema.name not in names


def test_a_schema_needs_a_postgresql_url() -> None:
    with pytest.raises(BackendError, match="a PostgreSQL URL is needed, got sqlite"):
        PostgresSchema("sqlite:///ledger.sqlite3", prefix="int8serve_test_")
