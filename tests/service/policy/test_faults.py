"""Nothing lost when the backends go away: a private Redis killed and restarted mid-run, and the ledger's database
cut off (a TCP proxy in front of the real PostgreSQL) and restored."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from benchmarks.backends import PostgresSchema, RedisServer, TcpProxy

from int8serve.service.policy.policy import SPOOL_FILE

from .conftest import PolicyServer, sse_data

BODY = {"prompt": "Once upon a time", "raw": True, "max_tokens": 3, "temperature": 0}


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> int:
    return sum(1 for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage())


def test_redis_lost_mid_run_and_back(policy_server: Callable[..., PolicyServer], private_redis: RedisServer,
                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="int8serve.service.policy.fallback")
    prefix = f"fault-{uuid.uuid4().hex[:8]}"
    server = policy_server(redis_url=f"redis://127.0.0.1:{private_redis.port}/0?key_prefix={prefix}",
                           account_rpm={"acct-a": 4}, retry_seconds=0.3)
    guard = server.policy.shared_state
    assert guard is not None and guard.healthy
    first, hit = server.post("acct-a", BODY), server.post("acct-a", BODY)
    assert [first.headers["cf-aig-cache-status"], hit.headers["cf-aig-cache-status"]] == ["MISS", "HIT"]
    shared_keys = {k.decode() for k in private_redis.client().keys(f"{prefix}:*")}
    assert any(":limits:" in k for k in shared_keys) and any(":cache:" in k for k in shared_keys)

    private_redis.kill()
    during = [server.post("acct-a", {**BODY, "seed": n}) for n in range(1, 4)]
    # no request failed; the in-process window continued from its shadow copy of the 2 shared admissions
    assert [r.status_code for r in during] == [200, 200, 429]
    assert during[2].json()["errors"][0]["code"] == 3021
    again = server.post("acct-b", BODY), server.post("acct-b", BODY)  # the cache carries on in this process
    assert [r.headers["cf-aig-cache-status"] for r in again] == ["MISS", "HIT"]
    assert not guard.healthy
    snapshot = server.policy.fallbacks.snapshot()
    assert snapshot["outages"] == 1 and snapshot["local_operations"]["ratelimit"] >= 3
    assert snapshot["local_operations"]["cache"] >= 2
    assert _warnings(caplog, "is unreachable") == 1  # one warning for the whole outage

    private_redis.start()  # back, empty (no persistence)
    deadline = time.monotonic() + 10
    while not guard.healthy:
        assert time.monotonic() < deadline, "the shared state was not used again"
        assert server.post("acct-c", BODY).status_code == 200
        time.sleep(0.1)
    resp = server.post("acct-c", {**BODY, "seed": 99})
    assert resp.status_code == 200 and resp.headers["cf-aig-cache-status"] == "MISS"
    keys = {k.decode() for k in private_redis.client().keys(f"{prefix}:*")}
    assert any("acct-c" in k for k in keys) and any(":cache:" in k for k in keys)  # Redis is used again
    assert server.policy.fallbacks.snapshot()["outages"] == 1
    assert _warnings(caplog, "is unreachable") == 1 and _warnings(caplog, "reachable again") == 1


def test_database_lost_mid_run_and_back(pg_schema: PostgresSchema, pg_proxy: TcpProxy,
                                        policy_server: Callable[..., PolicyServer], tmp_path: Path,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """While the database is away, every answer is still given and its row waits in the spool (appended and fsynced
    before the answer); when it returns, the spool is replayed: every acknowledged request has exactly one row."""
    caplog.set_level(logging.WARNING, logger="int8serve.service.policy.ledger")
    data_dir = tmp_path / "replica"
    server = policy_server(database_url=pg_schema.server_url(pg_proxy.port), data_dir=data_dir,
                           rate_limits=False, retry_seconds=0.3)
    ledger = server.policy.ledger
    acknowledged = [server.post("acct-a", {**BODY, "seed": n}).headers["cf-ai-req-id"] for n in range(1, 4)]
    assert ledger.flush() and len(pg_schema.rows()) == 3

    pg_proxy.cut()
    during = [server.post("acct-a", {**BODY, "seed": n}) for n in range(4, 8)]
    during.append(server.post("acct-a", {**BODY, "seed": 4}))  # a cache hit
    streamed, raw = server.stream("acct-a", {**BODY, "seed": 50})
    assert all(r.status_code == 200 for r in [*during, streamed]) and sse_data(raw)[-1] == "[DONE]"
    acknowledged += [r.headers["cf-ai-req-id"] for r in [*during, streamed]]
    assert not ledger.flush(timeout=2)  # the rows cannot reach the database...
    spooled = (data_dir / SPOOL_FILE).read_text().splitlines()
    assert len(spooled) == 6 and not ledger.healthy  # ... and wait, durably, in the spool
    unavailable = server.usage("acct-a")
    assert unavailable.status_code == 503 and unavailable.json()["errors"][0]["code"] == 1002
    assert _warnings(caplog, "ledger database is unreachable") == 1

    pg_proxy.restore()
    deadline = time.monotonic() + 10
    while not ledger.flush(timeout=2):
        assert time.monotonic() < deadline, "the spool was not replayed"
    rows = pg_schema.rows()
    assert sorted(r["request_id"] for r in rows) == sorted(acknowledged)  # none missing, none twice
    assert len(rows) == len(set(acknowledged)) == 9
    assert sum(r["cached"] for r in rows) == 1
    assert (data_dir / SPOOL_FILE).read_bytes() == b""
    assert ledger.healthy and ledger.outages == 1
    assert _warnings(caplog, "reachable again: 6 spooled rows replayed") == 1
    assert server.usage("acct-a").json()["result"]["totals"]["requests"] == 9
