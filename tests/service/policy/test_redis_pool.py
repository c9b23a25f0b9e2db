"""The server's Redis connections are bounded: however many requests are in flight, the process holds at most the
pool's connections to Redis (the descriptor budget counts them), and a call that waits too long for one is served
in this process, as when Redis is lost.

Sockets are counted as the kernel sees them: this process's descriptors (/proc/self/fd) whose TCP peer
(/proc/net/tcp) is Redis' port."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from int8serve.catalog.registry import Catalog
from int8serve.service.connections import REDIS_CONNECTIONS
from int8serve.service.policy import Policy, PolicySettings, PolicyStartupError
from int8serve.service.policy.ratelimit import RateLimitStatus
from int8serve.service.policy.redis_state import RedisTarget

from ..conftest import MODEL
from .conftest import REDIS_URL, PolicyServer, auth_for

BODY = {"raw": True, "max_tokens": 2, "temperature": 0}
REDIS_PORT = urlsplit(REDIS_URL).port or 6379
PROC_TCP = [Path("/proc/net/tcp"), Path("/proc/net/tcp6")]


def redis_sockets(port: int = REDIS_PORT) -> set[int]:
    """The inodes of this process's sockets connected to Redis' port (`port`)."""
    mine = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            link = fd.readlink().name
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:["):
            mine.add(int(link[len("socket:["):-1]))
    connected = set()
    for table in (t for t in PROC_TCP if t.exists()):
        for line in table.read_text().splitlines()[1:]:
            fields = line.split()
            if int(fields[2].rpartition(":")[2], 16) == port and int(fields[9]) in mine:
                connected.add(int(fields[9]))
    return connected


class SocketPeak:
    """The most Redis sockets this process held at once beyond those of `before`, sampled while the block runs and
    once after it (a pool keeps the connections it made)."""

    def __init__(self) -> None:
        self.before = redis_sockets()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="redis-socket-peak", daemon=True)

    def __enter__(self) -> SocketPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)
        self._take()

    def _take(self) -> None:
        self.peak = max(self.peak, len(redis_sockets() - self.before))

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._take()
            time.sleep(0.002)


def send_at_once(server: PolicyServer, accounts: list[str], each: int) -> list[tuple[str, httpx.Response]]:
    """`each` requests of every account in `accounts`, all sent at once (each its own prompt: no cache hits)."""

    async def together() -> list[tuple[str, httpx.Response]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            calls = [(a, client.post(server.run_url(a), headers=auth_for(a), json={**BODY, "prompt": f"{a} {n}"}))
                     for a in accounts for n in range(each)]
            answers = await asyncio.gather(*(call for _, call in calls))
        return [(a, r) for (a, _), r in zip(calls, answers, strict=True)]

    return asyncio.run(together())


def test_redis_sockets_stay_within_the_pool_bound(policy_server: Callable[..., PolicyServer],
                                                  redis_prefix: str) -> None:
    """24 requests at once, each calling Redis for its rate limit, cache lookup and store, and daily allocation:
    the process never holds more than the URL's `max_connections` (4) sockets to Redis, the calls waiting for a
    free one, and every answer is Redis' own: 4 of 6 admitted per account (16 in all: the engine's 4 slots and queue
    of 16 take them), a ledger row each, no fallback. (It held 8: redis-py took the 4 for a pool of its own that
    refused the calls beyond them, which fell back to this process as if Redis were lost, and the allocation had a
    second pool of 4.)"""
    accounts = ["acct-a", "acct-b", "acct-c", "acct-d"]
    server = policy_server(redis_url=f"{REDIS_URL}?key_prefix={redis_prefix}&max_connections=4",
                           account_rpm=dict.fromkeys(accounts, 4), daily_neurons=1e6)
    with SocketPeak() as sockets:
        answers = send_at_once(server, accounts, 6)
    assert 1 <= sockets.peak <= 4
    for account in accounts:
        statuses = sorted(r.status_code for a, r in answers if a == account)
        assert statuses == [200] * 4 + [429] * 2, account
    assert all(r.json()["errors"][0]["code"] == 3021 for _, r in answers if r.status_code == 429)
    assert all(r.headers["cf-aig-cache-status"] == "MISS" for _, r in answers if r.status_code == 200)
    assert server.policy.shared_state is not None and server.policy.shared_state.healthy
    assert server.policy.fallbacks.snapshot() == {"outages": 0, "local_operations": {}}
    assert len(server.wait_rows(16)) == 16


def test_calls_at_once_share_the_default_bound(tmp_path: Path, catalog: Catalog, redis_prefix: str) -> None:
    """Without `max_connections` the bound is the one the descriptor budget counts (`REDIS_CONNECTIONS`, 32):
    100 admissions awaited at once on the event loop (it had 100 sockets to Redis, one per call in flight) hold at
    most 32, all shared by the limiter, the cache, the replica count and the allocation, and each is Redis' own."""
    policy = Policy.build(PolicySettings(data_dir=tmp_path, redis_url=f"{REDIS_URL}?key_prefix={redis_prefix}",
                                         account_rpm={"acct-a": 100}, daily_neurons=1e6))
    card, loop = catalog.get(MODEL), asyncio.new_event_loop()

    async def at_once() -> list[RateLimitStatus | None]:
        return list(await asyncio.gather(*(policy.limiter.acquire(card, "acct-a") for _ in range(100))))

    try:
        with SocketPeak() as sockets:
            statuses = loop.run_until_complete(at_once())
        assert 1 <= sockets.peak <= REDIS_CONNECTIONS
        pool = policy.redis_pool
        assert pool is not None and pool.max_connections == REDIS_CONNECTIONS == 32
        assert sorted(s.remaining for s in statuses if s is not None and s.allowed) == list(range(100))
        assert policy.fallbacks.snapshot() == {"outages": 0, "local_operations": {}}
        assert policy.allocation is not None and policy.allocation.shared is not None
        assert policy.allocation.shared.client.connection_pool is pool
    finally:
        if policy.redis_pool is not None:
            loop.run_until_complete(policy.redis_pool.disconnect())
        loop.close()
        policy.close()


def test_a_call_that_waits_too_long_for_a_connection_is_served_in_process(
        policy_server: Callable[..., PolicyServer], redis_prefix: str, caplog: pytest.LogCaptureFixture) -> None:
    """Every connection taken (1 here) for longer than `backend_timeout`: the request waits that long, then is
    served as while Redis is lost (one warning, the in-process window and cache, a ledger row each, no 500), and
    Redis is used again once a connection is free."""
    caplog.set_level(logging.WARNING, logger="int8serve.service.policy.fallback")
    server = policy_server(redis_url=f"{REDIS_URL}?key_prefix={redis_prefix}&max_connections=1",
                           account_rpm={"acct-a": 2}, backend_timeout=0.3, retry_seconds=0.3)
    guard, pool = server.policy.shared_state, server.policy.redis_pool
    assert guard is not None and pool is not None
    held = asyncio.run_coroutine_threadsafe(pool.get_connection(), server.loop).result(5)
    try:
        started = time.monotonic()
        answers = [server.post("acct-a", {**BODY, "prompt": f"Tale {n}"}) for n in range(3)]
        waited = time.monotonic() - started
    finally:
        asyncio.run_coroutine_threadsafe(pool.release(held), server.loop).result(5)
    assert [r.status_code for r in answers] == [200, 200, 429]
    assert answers[2].json()["errors"][0]["code"] == 3021
    assert waited >= 0.3 and not guard.healthy
    assert server.policy.fallbacks.snapshot()["local_operations"]["ratelimit"] >= 3
    assert len(server.wait_rows(2)) == 2
    warnings = [r.getMessage() for r in caplog.records if "is unreachable" in r.getMessage()]
    assert len(warnings) == 1 and "No connection available" in warnings[0]

    deadline = time.monotonic() + 10
    while not guard.healthy:  # a free connection: Redis answers the next probe
        assert time.monotonic() < deadline, "Redis was not used again"
        assert server.post("acct-b", {**BODY, "prompt": "again"}).status_code == 200
        time.sleep(0.1)
    assert server.policy.fallbacks.snapshot()["outages"] == 1


def test_a_url_may_lower_the_bound_but_not_raise_it() -> None:
    target = RedisTarget.parse("redis://127.0.0.1:6379/14?max_connections=4&key_prefix=p&socket_keepalive=true")
    assert (target.url, target.key_prefix, target.max_connections) == (
        "redis://127.0.0.1:6379/14?socket_keepalive=true", "p", 4)
    assert RedisTarget.parse("redis://127.0.0.1:6379/14").max_connections == REDIS_CONNECTIONS
    for value in ("33", "0", "-1", "many", "4.0", ""):
        with pytest.raises(ValueError, match=f"max_connections must be 1 to 32 .* got '{value}'"):
            RedisTarget.parse(f"redis://127.0.0.1:6379/14?max_connections={value}")
    with pytest.raises(PolicyStartupError, match="max_connections must be 1 to 32"):
        Policy.build(PolicySettings(redis_url=f"{REDIS_URL}?max_connections=1000"))
