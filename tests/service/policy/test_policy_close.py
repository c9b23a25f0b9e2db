"""A policy's Redis connections end on its event loop: `Policy.aclose()` (or `end_shared_state()`, which the app's
lifespan runs) closes them and stops the daily allocation's tasks, so that a process making many policies (tests, a
library user) does not keep a set of Redis clients open for each, as long as it runs.

Redis' own list of clients (CLIENT LIST) tells: the policy's URL names its connections (`client_name`, unique to
the test), in a database of the shared Redis that the other tests do not use."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from benchmarks.backends import RedisServer, delete_keys
from fastapi.testclient import TestClient

from int8serve.catalog.card import ModelCard
from int8serve.catalog.registry import Catalog
from int8serve.engine.scheduler import Engine
from int8serve.server import _Deferred, _Server
from int8serve.service.app import create_app, loading_app
from int8serve.service.connections import uvicorn_config
from int8serve.service.lifecycle import Lifecycle, Phase
from int8serve.service.metrics import ServiceMetrics
from int8serve.service.policy import Policy, PolicySettings
from int8serve.service.policy.cache import CacheKey

from ..conftest import MODEL
from .conftest import POLICY_TOKENS, REDIS_URL, auth_for
from .test_redis_pool import redis_sockets

CLOSING_DB = 9  # a database of the shared Redis for these tests alone (the others use db 0)
BACKEND_TIMEOUT = 0.5
LEASE_SECONDS = 0.3  # renewed every 0.1 s: a renewal left running after the close would connect again at once


class NamedClients:
    """A policy's URL in the shared Redis whose connections carry a client name of their own, and how many of them
    Redis lists."""

    def __init__(self) -> None:
        self.name = f"int8serve-close-{uuid.uuid4().hex[:12]}"
        self.server_url = f"{REDIS_URL.split('?')[0].rsplit('/', 1)[0]}/{CLOSING_DB}"
        self.url = f"{self.server_url}?key_prefix={self.name}&client_name={self.name}"
        self.admin = redis.Redis.from_url(self.server_url)

    def count(self) -> int:
        return sum(client["name"] == self.name for client in self.admin.client_list())

    def settle(self, expected: int, timeout: float = 5.0) -> int:
        """The count once it is `expected`, or after `timeout` seconds (Redis drops a closed client when it reads
        the end of its connection, a moment after it is closed)."""
        deadline = time.monotonic() + timeout
        while (count := self.count()) != expected and time.monotonic() < deadline:
            time.sleep(0.02)
        return count


@pytest.fixture
def named_clients() -> Iterator[NamedClients]:
    clients = NamedClients()
    yield clients
    clients.admin.close()
    delete_keys(clients.server_url, clients.name)


def redis_policy(tmp_path: Path, url: str) -> Policy:
    """Rate limits, the response cache and the daily allocation, all in Redis at `url`."""
    return Policy.build(PolicySettings(data_dir=tmp_path, redis_url=url, account_rpm={"acct-a": 100},
                                       daily_neurons=1e6, backend_timeout=BACKEND_TIMEOUT,
                                       allocation_lease_seconds=LEASE_SECONDS))


async def use_everything(policy: Policy, card: ModelCard) -> None:
    """Rate-limit admissions (20 at once: several connections), a cached answer stored and read, and a reservation
    of the daily allocation held (a task of the loop renews its lease) and one released (in a task of the loop)."""
    await asyncio.gather(*(policy.limiter.acquire(card, "acct-a") for _ in range(20)))
    key, directives = CacheKey("acct-a", uuid.uuid4().hex), policy.cache.directives({})
    await policy.cache.put(key, policy.cache.answer(("once",), 1, 1, "stop"), directives)
    assert await policy.cache.get(key, directives) is not None
    assert policy.allocation is not None
    await policy.allocation.reserve("acct-a", 1.0)
    policy.allocation.release_soon(await policy.allocation.reserve("acct-a", 2.0), 2.0)
    assert policy.shared_state is not None and policy.shared_state.healthy


def test_aclose_closes_the_policys_redis_connections(tmp_path: Path, catalog: Catalog,
                                                     named_clients: NamedClients) -> None:
    """Redis lists the policy's clients while it is used and none after `aclose()` (close() only wrote out the
    ledger: each policy a process made kept its clients until the process ended), nor while its loop runs on (the
    allocation's lease renewals stopped first); again changes nothing."""
    assert named_clients.count() == 0
    policy = redis_policy(tmp_path, named_clients.url)
    counts = []

    async def main() -> None:
        await use_everything(policy, catalog.get(MODEL))
        counts.append(named_clients.count())
        await policy.aclose()
        counts.append(named_clients.settle(0))
        await asyncio.sleep(3 * LEASE_SECONDS)  # the loop runs on: no renewal connects again
        counts.append(named_clients.count())
        await policy.aclose()
        counts.append(named_clients.count())

    asyncio.run(main())
    assert counts[0] >= 2
    assert counts[1:] == [0, 0, 0]
    # and no call of Redis (a renewal under way as its connection closed) failed over to this process
    assert policy.fallbacks.snapshot() == {"outages": 0, "local_operations": {}}
    policy.close()  # the ledger is written out already: a no-op


def test_the_pool_connects_again_after_end_shared_state(tmp_path: Path, catalog: Catalog,
                                                        named_clients: NamedClients) -> None:
    """`end_shared_state()` (what the app's lifespan runs for a policy it does not own) closes the connections
    without closing the policy: used again on its loop, it reaches Redis again (no fallback to this process)."""
    policy = redis_policy(tmp_path, named_clients.url)
    card = catalog.get(MODEL)
    counts = []

    async def main() -> None:
        await use_everything(policy, card)
        await policy.end_shared_state()
        counts.append(named_clients.settle(0))
        status = await policy.limiter.acquire(card, "acct-a")
        assert status is not None and status.remaining == 100 - 21  # Redis' window: the 20 before count
        counts.append(named_clients.count())
        await policy.aclose()

    try:
        asyncio.run(main())
    finally:
        policy.close()
    assert counts[0] == 0 and counts[1] >= 1
    assert policy.fallbacks.snapshot() == {"outages": 0, "local_operations": {}}
    assert named_clients.settle(0) == 0


def test_aclose_with_redis_gone_is_quick_and_no_error(tmp_path: Path, catalog: Catalog,
                                                      private_redis: RedisServer) -> None:
    """Redis killed after the policy used it (a reservation's lease being renewed): aclose takes no longer than a
    Redis call may, raises nothing, and leaves no socket to it."""
    policy = redis_policy(tmp_path, private_redis.url)
    took = []

    async def main() -> None:
        await use_everything(policy, catalog.get(MODEL))
        assert redis_sockets(private_redis.port)
        private_redis.kill()
        started = time.monotonic()
        await policy.aclose()
        took.append(time.monotonic() - started)
        assert not redis_sockets(private_redis.port)
        await policy.aclose()

    try:
        asyncio.run(main())
    finally:
        policy.close()
    assert took[0] < 3 * BACKEND_TIMEOUT + 1.0


def test_the_apps_lifespan_ends_the_redis_connections(tmp_path: Path, catalog: Catalog, engines: dict[str, Engine],
                                                      named_clients: NamedClients) -> None:
    """A server app given a Redis policy (as `int8serve serve` and library users give it, to close it themselves):
    once its lifespan has ended Redis lists none of the policy's clients, though the caller's close() after the
    loop only writes out the ledger (they stayed open until the process ended)."""
    policy = redis_policy(tmp_path, named_clients.url)
    app = create_app(catalog, engines, POLICY_TOKENS, policy=policy)
    body = {"raw": True, "max_tokens": 2, "temperature": 0, "prompt": "Once upon a time"}
    try:
        with TestClient(app) as client:  # runs the lifespan: its end on the loop the requests ran on
            answers = [client.post(f"/client/v4/accounts/acct-a/ai/run/{MODEL}", headers=auth_for("acct-a"),
                                   json=body) for _ in range(2)]
            used = named_clients.count()
        assert [a.status_code for a in answers] == [200, 200]
        assert [a.headers["cf-aig-cache-status"] for a in answers] == ["MISS", "HIT"]  # the cache in Redis
        assert used >= 1
        assert named_clients.settle(0) == 0
    finally:
        policy.close()
    assert policy.fallbacks.snapshot() == {"outages": 0, "local_operations": {}}


def test_serves_server_ends_the_redis_connections_of_the_app_it_swapped_in(
        tmp_path: Path, catalog: Catalog, engines: dict[str, Engine], named_clients: NamedClients) -> None:
    """`int8serve serve`'s server runs the lifespan at start against the loading gate, before the real app exists
    (server.py, `_Deferred`): the app's end (its Redis connections, request worker, metrics' watch) never ran, and
    the connections stayed open until the process ended. The server's shutdown runs it now, on the loop."""
    lifecycle = Lifecycle(Phase.LOADING)
    metrics = ServiceMetrics(lifecycle=lifecycle)
    deferred = _Deferred(loading_app(lifecycle, metrics))
    config = uvicorn_config(deferred, host="127.0.0.1", port=0, log_level="warning")
    server = _Server(config, lifecycle, shutdown_timeout=1.0, deferred=deferred)
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]  # (signals: the main thread's)
    thread = threading.Thread(target=server.run, daemon=True)
    policy = redis_policy(tmp_path, named_clients.url)
    try:
        thread.start()
        while not server.started:
            assert thread.is_alive(), "the server did not start"
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        deferred.target = create_app(catalog, engines, POLICY_TOKENS, policy=policy, lifecycle=lifecycle,
                                     metrics=metrics)
        lifecycle.mark_ready()
        body = {"raw": True, "max_tokens": 2, "temperature": 0, "prompt": "Once upon a time"}
        answers = [httpx.post(f"http://127.0.0.1:{port}/client/v4/accounts/acct-a/ai/run/{MODEL}",
                              headers=auth_for("acct-a"), json=body, timeout=30) for _ in range(2)]
        assert [a.headers["cf-aig-cache-status"] for a in answers] == ["MISS", "HIT"]  # the cache in Redis
        assert named_clients.count() >= 1
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive()
        assert named_clients.settle(0) == 0
    finally:
        server.should_exit = True
        thread.join(30)
        policy.close()
