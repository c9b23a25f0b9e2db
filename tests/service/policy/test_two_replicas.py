"""Two replicas in one process (two policies, two live servers, the same engines) sharing real backends: the daily
allocation over one PostgreSQL ledger, and the rate limit while their Redis is away (each replica admits its share
of the limit, so that together they never admit more than the limit)."""

from __future__ import annotations

import time
from collections.abc import Callable

from benchmarks.backends import PostgresSchema, RedisServer

from .conftest import REDIS_URL, PolicyServer

BODY = {"prompt": "Once upon a time", "raw": True, "max_tokens": 8, "temperature": 0}


def remaining_today(server: PolicyServer, account: str) -> float:
    return server.usage(account).json()["result"]["daily_allocation"]["remaining_today"]


def test_daily_allocation_across_two_replicas_on_postgres(policy_server: Callable[..., PolicyServer],
                                                          pg_schema: PostgresSchema, redis_prefix: str) -> None:
    """An allocation of 2 neurons: one request on A (~2.4 neurons) uses it up; B, which served nothing, reads
    A's row from the shared ledger and refuses the account with 3036, and so does A; another account is served."""
    shared = {"daily_neurons": 2, "rate_limits": False, "database_url": pg_schema.server_url(),
              "redis_url": f"{REDIS_URL}?key_prefix={redis_prefix}"}
    a, b = policy_server(**shared), policy_server(**shared)
    assert remaining_today(b, "acct-a") == 2
    assert a.post("acct-a", BODY).status_code == 200
    deadline = time.monotonic() + 30  # B reads the database again once its last reading is a second old
    while remaining_today(b, "acct-a") > 0:
        assert time.monotonic() < deadline, "B never saw A's row"
        time.sleep(0.05)
    for replica in (b, a):
        refused = replica.post("acct-a", BODY)
        assert (refused.status_code, refused.json()["errors"][0]["code"]) == (429, 3036)
    assert b.post("acct-b", BODY).status_code == 200
    assert b.policy.ledger.flush()
    rows = a.rows()
    assert [(r["account"], r["outcome"]) for r in rows] == [("acct-a", "ok"), ("acct-b", "ok")]


def test_during_a_redis_outage_each_replica_admits_its_share(policy_server: Callable[..., PolicyServer],
                                                             private_redis: RedisServer) -> None:
    """acct-a may make 4 requests a minute. With Redis up, A and B share one window (A 2, B 1: 3 admitted) and
    each counts 2 replicas. Redis dies: each replica now admits at most 4 // 2 = 2 in the window, counting its
    own earlier admissions, so A admits none and B one more — 4 in all, as with Redis, not 4 per replica."""
    url = f"redis://127.0.0.1:{private_redis.port}/0?key_prefix=share"
    settings = {"redis_url": url, "account_rpm": {"acct-a": 4}, "cache": False, "retry_seconds": 60,
                "replica_stamp_seconds": 1e-6}  # each admission through Redis counts the replicas again
    a, b = policy_server(**settings), policy_server(**settings)
    admitted = [a.post("acct-a", BODY), b.post("acct-a", BODY), a.post("acct-a", BODY)]
    assert [r.status_code for r in admitted] == [200, 200, 200]
    assert a.policy.limiter.replicas is not None and b.policy.limiter.replicas is not None
    assert a.policy.limiter.replicas.count == b.policy.limiter.replicas.count == 2

    private_redis.kill()
    during_a = [a.post("acct-a", BODY) for _ in range(3)]
    during_b = [b.post("acct-a", BODY) for _ in range(3)]
    assert [r.status_code for r in during_a] == [429, 429, 429]
    assert [r.status_code for r in during_b] == [200, 429, 429]
    assert not a.policy.shared_state.healthy and not b.policy.shared_state.healthy  # type: ignore[union-attr]
    assert during_a[0].json()["errors"][0]["code"] == 3021
    assert during_b[0].headers["x-ratelimit-limit-requests"] == "2"  # the replica's share is what it shows
    assert during_b[0].headers["x-ratelimit-remaining-requests"] == "0"


def test_during_a_redis_outage_retry_after_is_when_the_share_has_room(policy_server: Callable[..., PolicyServer],
                                                                       private_redis: RedisServer) -> None:
    """acct-a may make 4 requests in a 4-second window, shared by two replicas. A admits 3 through Redis, a second
    apart; Redis dies: A's share is 2, so 2 of its 3 admissions must leave the window before it admits again. The
    refusal's Retry-After says when that is (the second one's exit), and a client that waits that long is served
    (it said when the oldest alone leaves: a retry then was refused again)."""
    url = f"redis://127.0.0.1:{private_redis.port}/0?key_prefix=room"
    settings = {"redis_url": url, "account_rpm": {"acct-a": 4}, "window_seconds": 4, "cache": False,
                "retry_seconds": 60, "replica_stamp_seconds": 1e-6}
    a, b = policy_server(**settings), policy_server(**settings)
    assert b.post("acct-b", BODY).status_code == 200  # B stamps itself in Redis
    for n in range(3):
        if n:
            time.sleep(1.0)
        assert a.post("acct-a", {**BODY, "seed": n + 1}).status_code == 200
    assert a.policy.limiter.replicas is not None and a.policy.limiter.replicas.count == 2
    private_redis.kill()
    refused = a.post("acct-a", {**BODY, "seed": 9})
    assert refused.status_code == 429
    retry_after = int(refused.headers["retry-after"])
    assert retry_after >= 2  # the second admission, ~1 s after the first, leaves ~3 s from now
    time.sleep(retry_after)
    assert a.post("acct-a", {**BODY, "seed": 10}).status_code == 200
