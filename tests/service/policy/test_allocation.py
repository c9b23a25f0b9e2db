"""The daily neuron allocation under concurrency: a request in flight holds its worst case (prompt + `max_tokens`)
against the allocation until its ledger row is recorded, so that at most one request crosses the line however many
arrive at once; the reservation goes back however a request ends; with Redis the replicas share their reservations,
renew them while they run, and a dead replica's reservations lapse."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import redis.asyncio
from benchmarks.backends import PostgresSchema, RedisServer

from int8serve.engine.scheduler import Engine
from int8serve.service.errors import ApiError
from int8serve.service.policy import Policy, PolicySettings, UsageRow
from int8serve.service.policy.allocation import IN_FLIGHT_RETRY_SECONDS, Reservation, SharedReservations
from int8serve.service.policy.ledger import utc_now

from ..conftest import MODEL, SLOW_MODEL
from .conftest import (
    CARD_NEURON_COST,
    REDIS_URL,
    PolicyServer,
    UtcClock,
    auth_for,
    collected_request,
)

SMALL = {"prompt": "Once upon a time", "raw": True, "max_tokens": 4, "temperature": 0}
# a slow stream: ~25 ms a token, and a worst case of (prompt + 300) x 0.1836, about 56 neurons
LONG_STREAM = {"prompt": "Once upon a time", "raw": True, "max_tokens": 300, "temperature": 0, "stream": True}


def code(resp: httpx.Response) -> int | None:
    return resp.json()["errors"][0]["code"] if resp.status_code != 200 else None


def burst(server: PolicyServer, account: str, bodies: list[dict[str, Any]], model: str = MODEL
          ) -> list[httpx.Response]:
    """The bodies posted at once, each on a connection of its own."""

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            return list(await asyncio.gather(*(client.post(server.run_url(account, model), json=body,
                                                           headers=auth_for(account)) for body in bodies)))

    return asyncio.run(main())


def held_in_redis(server: PolicyServer, account: str, day: str) -> tuple[int, int]:
    """(leases, amounts) of `account`'s reservations in Redis, as another replica would find them."""
    shared = server.policy.allocation.shared  # type: ignore[union-attr]
    assert shared is not None
    leases, amounts, _used = shared.keys(account, day)
    client = redis.Redis.from_url(REDIS_URL)
    try:
        return int(client.zcard(leases)), int(client.hlen(amounts))
    finally:
        client.close()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def wait_running(engine: Engine) -> None:
    wait_for(lambda: engine.stats().running > 0, "the request did not start")


@pytest.mark.parametrize("requests", [4])
def test_concurrent_requests_cross_the_line_at_most_once(policy_server: Callable[..., PolicyServer],
                                                         utc_clock: UtcClock, backend: dict[str, Any],
                                                         requests: int) -> None:
    """An allocation of 20 neurons and 4 requests of one account at once, each costing about 12.5: the first
    is admitted, the second too (used + reserved, 12.5-15, is below 20) and crosses the line, every other one is
    refused with 3036 — and so is the next request. Counting only finished requests, all 4 were served (50
    neurons, 2.5 times the allocation)."""
    allocation = 20.0
    server = policy_server(daily_neurons=allocation, rate_limits=False, cache=False, **backend)
    bodies = [{"prompt": f"Once upon a time {n}", "raw": True, "max_tokens": 60, "temperature": 0}
              for n in range(requests)]
    answers = burst(server, "acct-a", bodies)
    served = [float(r.headers["cf-ai-neurons"]) for r in answers if r.status_code == 200]
    refused = [(r.status_code, code(r)) for r in answers if r.status_code != 200]
    assert served and refused == [(429, 3036)] * (requests - len(served)), [r.text for r in answers]
    # whatever the order, the requests admitted before the last one cost less than the allocation: only the last
    # one admitted crossed the line
    assert sum(served) - max(served) < allocation, served
    assert sum(served) >= allocation  # it did cross: the line was reached by the request that crossed it
    after = server.post("acct-a", SMALL)
    assert (after.status_code, code(after)) == (429, 3036)
    assert server.policy.allocation is not None and server.policy.allocation.reserved("acct-a") == 0
    assert server.post("acct-b", SMALL).status_code == 200  # per account
    used = server.usage("acct-a").json()["result"]["daily_allocation"]["used_today"]
    assert used == pytest.approx(sum(served), abs=1e-4)


def test_a_request_in_flight_holds_its_worst_case_until_it_ends(policy_server: Callable[..., PolicyServer],
                                                                engines: dict[str, Engine], utc_clock: UtcClock,
                                                                backend: dict[str, Any]) -> None:
    """A stream of up to 300 tokens (worst case ~56 neurons) against an allocation of 50: while it runs, the
    account's next request is refused, although nothing is used yet. The client leaves mid-stream: the row records
    the few tokens generated, the reservation is released, and the account is served again."""
    server = policy_server(daily_neurons=50, rate_limits=False, cache=False, **backend)
    allocation = server.policy.allocation
    assert allocation is not None
    with server.http.stream("POST", server.run_url("acct-a", SLOW_MODEL), headers=auth_for("acct-a"),
                            json=LONG_STREAM) as streamed:
        assert streamed.status_code == 200
        lines = streamed.iter_lines()  # kept: an iterator dropped closes the connection
        next(lines)
        worst = allocation.reserved("acct-a")
        refused = server.post("acct-a", SMALL)
        assert (refused.status_code, code(refused)) == (429, 3036)
        # nothing is used yet: room may come back when the stream ends, so the SDK may retry soon
        assert refused.headers["retry-after"] == str(IN_FLIGHT_RETRY_SECONDS)
        assert "x-should-retry" not in refused.headers
        reading = server.usage("acct-a").json()["result"]["daily_allocation"]
        assert reading["used_today"] == 0 and reading["reserved_in_flight"] == pytest.approx(worst)
        assert reading["remaining_today"] == pytest.approx(max(0.0, 50 - worst))
        if backend:
            assert held_in_redis(server, "acct-a", "2026-06-15") == (1, 1)
    (row,) = server.wait_rows(1)
    assert row["outcome"] == "aborted" and row["neurons"] < 20
    assert worst == pytest.approx((row["input_tokens"] + 300) * CARD_NEURON_COST)  # prompt + max_tokens
    wait_for(lambda: allocation.reserved("acct-a") == 0, "the aborted stream's reservation was never released")
    assert server.post("acct-a", SMALL).status_code == 200
    if backend:
        assert held_in_redis(server, "acct-a", "2026-06-15") == (0, 0)


def _abort_collected(server: PolicyServer, engine: Engine) -> None:
    """A non-streamed request on the slow engine whose client leaves while it runs."""
    with collected_request(server, max_tokens=300):
        wait_running(engine)


def test_every_way_a_request_ends_gives_its_reservation_back(policy_server: Callable[..., PolicyServer],
                                                             engines: dict[str, Engine], utc_clock: UtcClock,
                                                             backend: dict[str, Any]) -> None:
    """Served, answered from the cache, over the context window (413, after admission), refused for capacity
    (3040), a stream and a collected request whose clients left, refused by the rate limiter (3021, after the
    allocation admitted it): none of them leaves a reservation behind, in this process or in Redis."""
    server = policy_server(daily_neurons=10_000, account_rpm={"acct-a": 8}, **backend)
    allocation = server.policy.allocation
    assert allocation is not None
    assert server.post("acct-a", SMALL).status_code == 200
    hit = server.post("acct-a", SMALL)
    assert hit.headers["cf-aig-cache-status"] == "HIT"
    too_long = server.post("acct-a", {**SMALL, "max_tokens": 1800})
    assert (too_long.status_code, code(too_long)) == (413, 5021)
    with server.http.stream("POST", server.run_url("acct-a", SLOW_MODEL), headers=auth_for("acct-a"),
                            json=LONG_STREAM) as streamed:
        lines = streamed.iter_lines()  # kept: an iterator dropped closes the connection
        next(lines)
        assert allocation.reserved("acct-a") > 50
        busy = server.post("acct-a", {**SMALL, "options": {"rejectIfBusy": True}}, model=SLOW_MODEL)
        assert (busy.status_code, code(busy)) == (429, 3040)
    server.wait_rows(3)  # ok, hit, the stream (aborted)
    _abort_collected(server, engines[SLOW_MODEL])
    server.wait_rows(4)
    for _ in range(8):  # the rest of the window (per account and model), then the limit
        if code(limited := server.post("acct-a", {**SMALL, "max_tokens": 1})) is not None:
            break
    assert (limited.status_code, code(limited)) == (429, 3021)
    wait_for(lambda: allocation.reserved("acct-a") == 0, "a reservation was left behind")
    if backend:
        wait_for(lambda: held_in_redis(server, "acct-a", "2026-06-15") == (0, 0), "Redis kept a reservation")
    rows = server.rows()
    assert sorted(r["outcome"] for r in rows) == ["aborted", "aborted"] + ["ok"] * (len(rows) - 2)


def test_replicas_share_their_reservations_through_redis(policy_server: Callable[..., PolicyServer],
                                                         engines: dict[str, Engine], pg_schema: PostgresSchema,
                                                         redis_prefix: str, utc_clock: UtcClock) -> None:
    """Two replicas, one Redis, one PostgreSQL ledger, an allocation of 50 and leases of 0.5 s. A streams a request
    whose worst case (~56 neurons) reaches the allocation: B refuses the account at once, nothing being used yet —
    and still does after 1.2 s, A renewing its lease. When A's client leaves, A releases the reservation and B
    serves the account again. Then A serves a request that crosses the line, and B refuses at once: the cost came
    with the release, before B reads the ledger again."""
    shared = {"daily_neurons": 50, "rate_limits": False, "cache": False, "database_url": pg_schema.server_url(),
              "redis_url": f"{REDIS_URL}?key_prefix={redis_prefix}", "allocation_lease_seconds": 0.5}
    a, b = policy_server(**shared), policy_server(**shared)
    with a.http.stream("POST", a.run_url("acct-a", SLOW_MODEL), headers=auth_for("acct-a"),
                       json=LONG_STREAM) as streamed:
        lines = streamed.iter_lines()  # kept: an iterator dropped closes the connection
        next(lines)
        refused = b.post("acct-a", SMALL)
        assert (refused.status_code, code(refused)) == (429, 3036)
        assert refused.headers["retry-after"] == str(IN_FLIGHT_RETRY_SECONDS)  # B knows nothing is used yet
        assert b.usage("acct-a").json()["result"]["daily_allocation"]["reserved_in_flight"] > 50  # A's, via Redis
        time.sleep(1.2)
        refused = b.post("acct-a", SMALL)
        assert (refused.status_code, code(refused)) == (429, 3036)
        assert b.post("acct-b", SMALL).status_code == 200
    wait_for(lambda: held_in_redis(a, "acct-a", "2026-06-15") == (0, 0), "A never released its reservation")
    served = b.post("acct-a", SMALL)
    assert served.status_code == 200, served.text
    # B has just read the ledger (it reads it again in a second); A serves a request that crosses the line: its
    # cost reaches Redis with its release, so B refuses the account at once, not a second later
    assert b.usage("acct-a").json()["result"]["daily_allocation"]["remaining_today"] > 40
    crossing = a.post("acct-a", {**SMALL, "max_tokens": 300})
    assert crossing.status_code == 200 and float(crossing.headers["cf-ai-neurons"]) > 50
    refused = b.post("acct-a", SMALL)
    assert (refused.status_code, code(refused)) == (429, 3036)
    assert refused.headers["x-should-retry"] == "false" and int(refused.headers["retry-after"]) > 3600  # midnight


def test_a_dead_replicas_reservation_lapses(policy_server: Callable[..., PolicyServer], redis_prefix: str,
                                            utc_clock: UtcClock) -> None:
    """A replica reserved 100 neurons of acct-a's 50 and died: nobody renews its lease (1 s here), so the account
    is refused until it lapses, then served."""
    server = policy_server(daily_neurons=50, rate_limits=False, redis_url=f"{REDIS_URL}?key_prefix={redis_prefix}")
    day = utc_clock().date().isoformat()

    async def dead_replica() -> None:
        client = redis.asyncio.Redis.from_url(REDIS_URL)
        try:
            shared = SharedReservations(client, f"{redis_prefix}:allocation", lease_seconds=1.0)
            assert await shared.admit(Reservation("acct-a", day, 100.0), 0.0, 50.0, ttl=3600)
            assert await shared.reserved("acct-a", day) == 100.0
        finally:
            await client.aclose()

    asyncio.run(dead_replica())
    refused = server.post("acct-a", SMALL)
    assert (refused.status_code, code(refused)) == (429, 3036)
    time.sleep(1.1)
    assert server.post("acct-a", SMALL).status_code == 200


def test_while_redis_is_away_each_replica_carries_on_alone(policy_server: Callable[..., PolicyServer],
                                                          private_redis: RedisServer, utc_clock: UtcClock) -> None:
    """Redis dies: no request fails, and the replica still lets at most one request cross the line, on its own
    reservations and the ledger."""
    server = policy_server(daily_neurons=20, rate_limits=False, cache=False, retry_seconds=60,
                           redis_url=f"redis://127.0.0.1:{private_redis.port}/0?key_prefix=alloc")
    assert server.post("acct-b", SMALL).status_code == 200
    private_redis.kill()
    bodies = [{"prompt": f"Once upon a time {n}", "raw": True, "max_tokens": 60, "temperature": 0} for n in range(4)]
    answers = burst(server, "acct-a", bodies)
    served = [float(r.headers["cf-ai-neurons"]) for r in answers if r.status_code == 200]
    assert served and all(code(r) == 3036 for r in answers if r.status_code != 200)
    assert sum(served) - max(served) < 20
    assert server.policy.fallbacks.snapshot()["local_operations"]["allocation"] > 0  # type: ignore[index]
    assert server.policy.allocation is not None and server.policy.allocation.reserved("acct-a") == 0


@pytest.fixture
def allocation_policy(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Policy]:
    settings: dict[str, Any] = {"daily_neurons": 50, "data_dir": tmp_path / "data"}
    if request.param == "redis":
        settings["redis_url"] = f"{REDIS_URL}?key_prefix={request.getfixturevalue('redis_prefix')}"
    policy = Policy.build(PolicySettings(**settings))
    yield policy
    policy.close()


@pytest.mark.parametrize("allocation_policy", ["local", "redis"], indirect=True)
def test_reservations_narrow_freely_and_widen_only_if_there_is_room(allocation_policy: Policy) -> None:
    """Admission is `used + reserved < allocation`; a reservation narrowed once the prompt is tokenized frees room
    at once; one that must widen (a prompt longer than its bound) is admitted again, and refused if the others now
    reach the allocation (it then keeps what it held)."""
    allocation = allocation_policy.allocation
    assert allocation is not None

    async def scenario() -> None:
        when = utc_now()
        first = await allocation.reserve("acct", 10.0, when)
        second = await allocation.reserve("acct", 30.0, when)  # 10 < 50
        third = await allocation.reserve("acct", 5.0, when)  # 40 < 50: crosses nothing yet (45)
        await allocation.resize(first, 60.0)  # the others hold 35 < 50: admitted again, and crosses (95)
        with pytest.raises(ApiError) as refused:
            await allocation.reserve("acct", 1.0, when)
        assert refused.value.code == 3036
        with pytest.raises(ApiError):
            await allocation.resize(second, 40.0)  # the others hold 65
        assert allocation.reserved("acct", when) == 95.0
        await allocation.resize(first, 1.0)  # narrowed: 36 held
        assert allocation.reserved("acct", when) == 36.0
        fourth = await allocation.reserve("acct", 13.0, when)  # 36 < 50
        for reservation in (first, second, third, fourth):
            await allocation.release(reservation, 0.0)
            await allocation.release(reservation, 0.0)  # twice is harmless
        assert allocation.reserved("acct", when) == 0.0
        if allocation.shared is not None:
            assert await allocation.shared.reserved("acct", when.date().isoformat()) == 0.0

    asyncio.run(scenario())


@pytest.mark.parametrize("allocation_policy", ["local", "redis"], indirect=True)
def test_the_state_of_past_days_is_dropped(allocation_policy: Policy, utc_clock: UtcClock) -> None:
    """Found by an audit: the ledger kept each account's state of each day (the neurons it recorded, the last total
    it read, the reads it made) forever: about 2.9 KB per account and day, 35 MB after 60 days of 200 accounts.
    Only today's and yesterday's (a request that arrived before midnight may still run) are kept: the state of 40
    accounts stays that of two days however many days pass, and a request across midnight counts to its day."""
    allocation, ledger = allocation_policy.allocation, allocation_policy.ledger
    assert allocation is not None
    accounts = [f"acct-{n}" for n in range(40)]

    async def request(account: str, when: datetime | None = None) -> None:
        reservation = await allocation.reserve(account, 10.0, when)
        row_time = when or utc_clock()
        await ledger.record(UsageRow(f"{account}-{row_time}", row_time, account, MODEL, 1, 1, 0.5, False, "ok", 1.0))
        await allocation.release(reservation, 0.5)

    async def scenario() -> None:
        for day in range(1, 13):
            utc_clock.set(datetime(2026, 6, day, 12))
            for account in accounts:
                await request(account)
            assert len(ledger._recorded) <= 2 * len(accounts) and len(ledger._db_sums) <= 2 * len(accounts)
        utc_clock.set(datetime(2026, 6, 12, 23, 59, 59))
        late = utc_clock()
        utc_clock.set(datetime(2026, 6, 13, 0, 0, 1))
        await request("acct-1")  # the first request of the day, then one that arrived yesterday ends
        await request("acct-0", late)
        assert await ledger.neurons_used("acct-0", datetime(2026, 6, 12)) == 1.0
        assert await allocation.used_today("acct-0") == 0.0

    asyncio.run(scenario())
    wait_for(lambda: not ledger._refreshing, "the ledger keeps the reads it made")
    assert len(ledger._recorded) <= 2 * len(accounts) and len(ledger._db_sums) <= 2 * len(accounts)


@pytest.mark.parametrize("allocation_policy", ["local", "redis"], indirect=True)
def test_a_refusal_for_a_day_already_over_is_not_final(allocation_policy: Policy, utc_clock: UtcClock) -> None:
    """Found by an audit: a request admitted just before midnight whose check ends after it (the ledger read, Redis)
    was refused for a day already over with `x-should-retry: false` and `Retry-After: 1` (the time to that midnight,
    negative, made 1): the SDK then gives up at once although the new day has room. It is retried now: a retry
    is admitted against the new day."""
    allocation, ledger = allocation_policy.allocation, allocation_policy.ledger
    assert allocation is not None

    async def scenario() -> None:
        utc_clock.set(datetime(2026, 6, 15, 23, 59, 59, 900_000))
        when = utc_clock()
        await ledger.record(UsageRow("used-up", when, "acct", MODEL, 1, 1, 50.0, False, "ok", 1.0))
        utc_clock.set(datetime(2026, 6, 16, 0, 0, 0, 100_000))  # the day ended during the check
        with pytest.raises(ApiError) as refused:
            await allocation.reserve("acct", 1.0, when)
        assert refused.value.code == 3036 and refused.value.headers == {"retry-after": "1"}
        await allocation.release(await allocation.reserve("acct", 1.0), 0.0)

    asyncio.run(scenario())
