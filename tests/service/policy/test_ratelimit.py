"""Requests per minute per account and model: the card's limit, the operator's overrides, what counts, the
headers on every answer, and what the official SDK sees."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudflare
import httpx
import pytest
import redis.asyncio
from benchmarks.backends import RedisServer
from cloudflare import Cloudflare

from int8serve.catalog.registry import Catalog
from int8serve.service.policy import Policy, PolicySettings
from int8serve.service.policy.ratelimit import MonotonicMemoryStorage, RateLimitStatus, ReplicaCount

from ..conftest import ACCOUNT, MODEL, OTHER_ACCOUNT, OTHER_TOKEN, SCRIPTED_MODEL, TOKEN
from .conftest import ACCOUNTS, STAGING_ACCOUNT, PolicyServer, auth_for

RATE_MESSAGE = "rate limiting: inference request per min rate reached"
SMALL = {"prompt": "Once upon a time", "raw": True, "max_tokens": 2, "temperature": 0}
REAL_TIME = time.time


def sdk(server: PolicyServer, token: str = TOKEN, **options: object) -> Cloudflare:
    return Cloudflare(api_token=token, base_url=f"{server.url}/client/v4", **{"max_retries": 0, **options})


def limit_headers(resp: httpx.Response) -> tuple[int, int, str]:
    return (int(resp.headers["x-ratelimit-limit-requests"]), int(resp.headers["x-ratelimit-remaining-requests"]),
            resp.headers["x-ratelimit-reset-requests"])


def step_wall_clock(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """The wall clock (`time.time`) `seconds` away from the real time, as an NTP step moves it; `time.monotonic`
    does not move."""
    monkeypatch.setattr(time, "time", lambda: REAL_TIME() + seconds)


def test_card_limit_through_the_sdk(policy_server: Callable[..., PolicyServer], backend: dict[str, Any]) -> None:
    """The card's default, 5 a minute: the sixth call is a RateLimitError with code 3021; other accounts and other
    models have windows of their own."""
    server = policy_server(**backend)
    client = sdk(server)
    for n in range(5):
        out = client.ai.run(MODEL, account_id=ACCOUNT, prompt=f"Story {n}", raw=True, max_tokens=2)
        assert isinstance(out["response"], str)
    with pytest.raises(cloudflare.RateLimitError) as info:
        client.ai.run(MODEL, account_id=ACCOUNT, prompt="Story 6", raw=True, max_tokens=2)
    err = info.value
    assert err.status_code == 429
    assert err.body["errors"] == [{"code": 3021, "message": RATE_MESSAGE}]
    assert err.body["success"] is False and err.body["result"] == {}
    headers = err.response.headers
    assert 55 <= int(headers["retry-after"]) <= 60
    assert limit_headers(err.response)[:2] == (5, 0)
    assert headers["cf-aig-cache-status"] == "MISS"
    # the refused call was not recorded: still no room, and no ledger row
    assert len(server.rows()) == 5
    # another account, and another model of the same account, are not affected
    other = sdk(server, OTHER_TOKEN)
    assert other.ai.run(MODEL, account_id=OTHER_ACCOUNT, prompt="x", raw=True, max_tokens=1)["response"] is not None
    assert client.ai.run(SCRIPTED_MODEL, account_id=ACCOUNT, prompt="x", raw=True)["response"]


def test_card_and_operator_overrides(policy_server: Callable[..., PolicyServer], backend: dict[str, Any]) -> None:
    """Operator per-account > card per-account > operator default > card default; 0 = unlimited."""
    server = policy_server(default_rpm=2, account_rpm={"acct-a": 3, "acct-b": 0}, **backend)
    assert limit_headers(server.post(STAGING_ACCOUNT, SMALL))[:2] == (60, 59)  # the card's override stands
    assert limit_headers(server.post("acct-c", SMALL))[:2] == (2, 1)  # the operator's default replaces 5
    statuses = [server.post("acct-a", SMALL).status_code for _ in range(4)]
    assert statuses == [200, 200, 200, 429]
    unlimited = [server.post("acct-b", SMALL) for _ in range(6)]
    assert all(r.status_code == 200 for r in unlimited)
    assert "x-ratelimit-limit-requests" not in unlimited[-1].headers
    # the SDK sees the operator's limit exactly like the card's
    client = sdk(server, ACCOUNTS["acct-c"])
    client.ai.run(MODEL, account_id="acct-c", prompt="y", raw=True, max_tokens=1)
    with pytest.raises(cloudflare.RateLimitError) as info:
        client.ai.run(MODEL, account_id="acct-c", prompt="z", raw=True, max_tokens=1)
    assert info.value.body["errors"][0]["code"] == 3021


def test_what_counts_and_headers_on_every_answer(policy_server: Callable[..., PolicyServer],
                                                 backend: dict[str, Any]) -> None:
    """Refused bodies (400) do not count but show the window; a request admitted and then found too long for the
    context (413/5021) counts; so do answers and cache hits; the answers of authentication (400/9106, 401, 403)
    have no account, so no window, and no cache status either (README, docs/policy.md: "past authentication")."""
    server = policy_server(account_rpm={"acct-a": 4}, **backend)
    for body in ({}, {"prompt": ""}, {"prompt": "x", "temperature": 9}, "not an object"):
        resp = server.post("acct-a", body)
        assert resp.status_code == 400
        assert limit_headers(resp)[:2] == (4, 4) and resp.headers["cf-aig-cache-status"] == "MISS"
    too_long = server.post("acct-a", {"prompt": "Once", "raw": True, "max_tokens": 1800})
    assert (too_long.status_code, too_long.json()["errors"][0]["code"]) == (413, 5021)
    assert limit_headers(too_long)[:2] == (4, 3)
    first, hit = server.post("acct-a", SMALL), server.post("acct-a", SMALL)
    assert [first.headers["cf-aig-cache-status"], hit.headers["cf-aig-cache-status"]] == ["MISS", "HIT"]
    assert [limit_headers(first)[1], limit_headers(hit)[1]] == [2, 1]
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")
    with server.http.stream("POST", server.run_url("acct-a"), headers={"Authorization": "Bearer tok-acct-a"},
                            json={**SMALL, "stream": True}) as streamed:
        assert limit_headers(streamed)[1] == 0 and streamed.headers["cf-aig-cache-status"] == "HIT"
    refused = server.post("acct-a", SMALL)
    assert refused.status_code == 429 and int(refused.headers["retry-after"]) >= 1
    unauthenticated = server.http.post(server.run_url("acct-a"), json=SMALL, headers={"Authorization": "Bearer no"})
    missing = server.http.post(server.run_url("acct-a"), json=SMALL)
    forbidden = server.http.post(server.run_url("acct-b"), json=SMALL, headers={"Authorization": "Bearer tok-acct-a"})
    for refused_auth, (status, code) in ((unauthenticated, (401, 10000)), (missing, (400, 9106)),
                                         (forbidden, (403, 10000))):
        assert (refused_auth.status_code, refused_auth.json()["errors"][0]["code"]) == (status, code)
        assert "x-ratelimit-limit-requests" not in refused_auth.headers
        assert "cf-aig-cache-status" not in refused_auth.headers


def test_concurrent_admissions_each_report_their_own_remaining(backend: dict[str, Any], catalog: Catalog,
                                                               tmp_path: Path) -> None:
    """Requests admitted at the same time each report the window as their own admission left it: 3 taking the
    3rd, 4th and 5th places of 5 report 2, 1 and 0, the fourth is refused (with Redis each read the window again
    after its hit, counting the others' admissions too, and several reported the same count: 2, 2, 2 or 2, 0, 0)."""
    policy = Policy.build(PolicySettings(data_dir=tmp_path, **backend))
    card = catalog.get(MODEL)

    async def scenario() -> tuple[list[RateLimitStatus | None], list[RateLimitStatus | None]]:
        first = [await policy.limiter.acquire(card, "acct-a") for _ in range(2)]
        together = await asyncio.gather(*(policy.limiter.acquire(card, "acct-a") for _ in range(4)))
        return first, list(together)

    try:
        first, together = asyncio.run(scenario())
    finally:
        policy.close()
    assert [s.remaining for s in first if s is not None] == [4, 3]
    statuses = [s for s in together if s is not None]
    assert sorted((s.allowed, s.remaining) for s in statuses) == [(False, 0), (True, 0), (True, 1), (True, 2)]
    assert {s.limit for s in statuses} == {5}
    refused = next(s for s in statuses if not s.allowed)
    assert 55 <= refused.reset_after <= 60


def test_concurrent_answers_carry_distinct_remaining_counts(policy_server: Callable[..., PolicyServer],
                                                           backend: dict[str, Any]) -> None:
    """Through the server: 4 requests sent at once by an account limited to 5 read 4, 3, 2 and 1 remaining, in
    some order, and the next one 0 (with Redis they read 1, 2, 1, 1)."""
    server = policy_server(**backend)

    async def together() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=server.url, timeout=30, headers=auth_for("acct-a")) as client:
            return await asyncio.gather(*(client.post(server.run_url("acct-a"), json={**SMALL, "prompt": f"Tale {n}"})
                                          for n in range(4)))

    answers = asyncio.run(together())
    assert [r.status_code for r in answers] == [200] * 4
    assert sorted(limit_headers(r)[1] for r in answers) == [1, 2, 3, 4]
    assert limit_headers(server.post("acct-a", SMALL))[:2] == (5, 0)


def test_sdk_default_retries_wait_out_the_window(policy_server: Callable[..., PolicyServer]) -> None:
    """With its default `max_retries=2`, the SDK sleeps for `Retry-After` (it honours values up to 60 s) and tries
    again: a caller over the limit sees a slow call that succeeds once the window frees a request, not an error.
    Shown on a 3-second window; with the real 60-second window the call blocks for up to a minute. The refused
    attempt did not count, otherwise the retry would be refused too."""
    server = policy_server(window_seconds=3, account_rpm={"acct-d": 2})
    seen: list[httpx.Response] = []
    http_client = httpx.Client(event_hooks={"response": [seen.append]})
    client = sdk(server, ACCOUNTS["acct-d"], max_retries=2, http_client=http_client)
    for n in range(2):
        client.ai.run(MODEL, account_id="acct-d", prompt=f"Tale {n}", raw=True, max_tokens=1)
    started = time.monotonic()
    out = client.ai.run(MODEL, account_id="acct-d", prompt="Tale 3", raw=True, max_tokens=1)
    waited = time.monotonic() - started
    assert isinstance(out["response"], str)
    assert [r.status_code for r in seen] == [200, 200, 429, 200]
    retry_after = int(seen[2].headers["retry-after"])
    assert 1 <= retry_after <= 3 and waited >= retry_after  # it slept as told (only a lower bound: no flake)


def test_a_wall_clock_stepped_back_never_asks_for_more_than_the_window(policy_server: Callable[..., PolicyServer],
                                                                     backend: dict[str, Any],
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The window full, the wall clock steps back an hour: the refusal's `Retry-After` and reset are still at most
    the 60-second window (they were the step plus the window, 3660 s, and the SDK does not wait that long)."""
    server = policy_server(account_rpm={"acct-e": 3}, **backend)
    assert [server.post("acct-e", SMALL).status_code for _ in range(3)] == [200, 200, 200]
    step_wall_clock(monkeypatch, -3600)
    refused = server.post("acct-e", SMALL)
    assert refused.status_code == 429
    assert 55 <= int(refused.headers["retry-after"]) <= 60
    assert 55 <= int(refused.headers["x-ratelimit-reset-requests"].removesuffix("s")) <= 60


def test_the_in_process_window_ignores_wall_clock_steps(policy_server: Callable[..., PolicyServer],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The in-process window runs on the monotonic clock: a wall clock stepped an hour forward does not empty it,
    and one stepped an hour back does not keep its admissions for an hour — they leave after the window's own
    seconds (shown on a 2-second window)."""
    server = policy_server(window_seconds=2, account_rpm={"acct-e": 2})
    assert [server.post("acct-e", SMALL).status_code for _ in range(2)] == [200, 200]
    admitted = time.monotonic()
    step_wall_clock(monkeypatch, 3600)
    assert server.post("acct-e", SMALL).status_code == 429
    step_wall_clock(monkeypatch, -3600)
    refused = server.post("acct-e", SMALL)
    assert refused.status_code == 429 and 1 <= int(refused.headers["retry-after"]) <= 2
    time.sleep(max(0.0, admitted + 2.1 - time.monotonic()))
    assert server.post("acct-e", SMALL).status_code == 200


def test_a_replica_stepped_back_an_hour_goes_on_stamping_and_counting(private_redis: RedisServer,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """When a replica next stamps itself is `every` seconds of the monotonic clock: after its wall clock stepped
    back an hour it still stamps itself, at the new wall-clock time, and counts a replica that joined meanwhile (it
    did neither for that hour: its next stamp was due at the old wall-clock time plus `every`)."""

    async def scenario() -> tuple[int, float | None]:
        client = redis.asyncio.Redis(port=private_redis.port)
        wall = lambda: time.time()  # noqa: E731 (read at each call: the step below moves it)
        first = ReplicaCount(client, "replicas", every=0.05, clock=wall)
        await first.refresh()
        assert first.count == 1
        step_wall_clock(monkeypatch, -3600)
        joined = ReplicaCount(client, "replicas", every=0.05, clock=wall)
        await joined.refresh()
        await asyncio.sleep(0.1)
        await first.refresh()
        stamp = await client.zscore("replicas", first.member)
        await client.aclose()
        return first.count, stamp

    count, stamp = asyncio.run(scenario())
    assert count == 2
    assert stamp is not None and abs(stamp - (REAL_TIME() - 3600)) < 5  # the wall-clock time, as stepped


def test_the_in_process_window_keeps_only_the_stamps_in_it() -> None:
    """A limit far above the traffic (1,000 a minute, 2 admitted a second for 10 minutes): the key keeps the stamps
    of the last 60 seconds, newest first, and no older ones (an audit found every stamp up to the limit kept, and
    copied on each admission: 1,000 here); the window still admits and refuses as before."""
    now = [0.0]
    storage = MonotonicMemoryStorage(clock=lambda: now[0])

    async def scenario() -> None:
        for tick in range(1200):
            now[0] = tick / 2
            assert await storage.acquire_entry("k", 1000, 60)
            assert storage.stamps["k"] == [now[0] - i / 2 for i in range(min(tick + 1, 120))]
        assert await storage.get_moving_window("k", 1000, 60) == (now[0] - 59.5, 120)
        assert not await storage.acquire_entry("k", 120, 60)  # a window of 120 is full
        now[0] += 0.5
        assert await storage.acquire_entry("k", 120, 60)  # the oldest left it
        assert len(storage.stamps["k"]) == 120

    asyncio.run(scenario())
