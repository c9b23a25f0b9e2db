"""Neuron metering and the usage ledger: the card's arithmetic, one row per request that reached the engine or the
cache (ok, aborted, cached), the usage endpoint and its account isolation, the daily allocation, the spool, and
no database work on the event loop's thread."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import cloudflare
import httpx
import pytest
import sqlalchemy as sa
from cloudflare import Cloudflare
from tests.file_modes import modes

from int8serve.engine.scheduler import Engine
from int8serve.service.errors import ApiError
from int8serve.service.policy import Policy, PolicySettings, UsageRow, format_neurons
from int8serve.service.policy.ledger import Ledger, make_database, utc_now
from int8serve.service.policy.spool import FileSpool, MemorySpool, SpoolLockedError
from int8serve.service.policy.usage import parse_period

from ..conftest import MODEL, SCRIPTED_MODEL, SLOW_MODEL
from .conftest import ACCOUNTS, CARD_NEURON_COST, PolicyServer, UtcClock, auth_for, collected_request, sse_data

ALLOCATION_MESSAGE = ("You have used up your daily free allocation of 10,000 neurons. Please upgrade to Cloudflare's "
                      "Workers Paid plan if you would like to continue usage.")


def expected_neurons(prompt_tokens: int, completion_tokens: int) -> float:
    return round((prompt_tokens + completion_tokens) * CARD_NEURON_COST, 6)


def test_neurons_from_the_card(policy_server: Callable[..., PolicyServer]) -> None:
    """input and output tokens × 0.1836, in the header of a JSON answer and in the final frame of a stream."""
    server = policy_server()
    resp = server.post("acct-a", {"prompt": "Tell me a story", "max_tokens": 20, "seed": 1})
    usage = resp.json()["result"]["usage"]
    neurons = expected_neurons(usage["prompt_tokens"], usage["completion_tokens"])
    assert usage["prompt_tokens"] > 20  # the templated prompt (default system prompt) is what is billed
    assert resp.headers["cf-ai-neurons"] == format_neurons(neurons)
    _resp, raw = server.stream("acct-a", {"prompt": "Once", "raw": True}, model=SCRIPTED_MODEL)
    final = sse_data(raw)[-2]
    assert final["usage"] == {"prompt_tokens": 2, "completion_tokens": 15, "total_tokens": 17,
                              "neurons": expected_neurons(2, 15)}
    rows = server.rows()
    assert [r["neurons"] for r in rows] == [pytest.approx(neurons), pytest.approx(3.1212)]
    assert format_neurons(47.18520000001) == "47.1852" and format_neurons(0.0) == "0"


def _abort_collected(server: PolicyServer, engines: dict[str, Engine]) -> None:
    """A non-streamed request on the slow engine whose client leaves while it runs."""
    with collected_request(server, max_tokens=400):
        engine, deadline = engines[SLOW_MODEL], time.monotonic() + 30
        while engine.stats().running == 0:
            assert time.monotonic() < deadline, "the request did not start"
            time.sleep(0.01)
        started = engine.stats().steps
        while engine.stats().steps < started + 3:  # a few tokens (the step that admitted it gave the first)
            assert time.monotonic() < deadline, "the request did not generate"
            time.sleep(0.01)


def test_one_row_per_request_ok_aborted_cached(policy_server: Callable[..., PolicyServer],
                                               engines: dict[str, Engine], utc_clock: UtcClock) -> None:
    server = policy_server(account_rpm={"acct-a": 8})
    body = {"prompt": "Once upon a time", "raw": True, "max_tokens": 6, "temperature": 0}
    before = utc_clock()
    ok, cached = server.post("acct-a", body), server.post("acct-a", body)
    server.post("acct-a", {})  # 400: never reached the engine, no row
    server.post("acct-a", {"prompt": "x", "raw": True, "max_tokens": 1800})  # 413 after the limiter: no row
    with server.http.stream("POST", server.run_url("acct-a", SLOW_MODEL), headers=auth_for("acct-a"),
                            json={**body, "max_tokens": 300, "stream": True}) as streamed:
        next(streamed.iter_lines())
    _abort_collected(server, engines)
    rows = server.wait_rows(4)
    assert len(rows) == 4
    by_id = {r["request_id"]: r for r in rows}
    first, hit = by_id[ok.headers["cf-ai-req-id"]], by_id[cached.headers["cf-ai-req-id"]]
    usage = ok.json()["result"]["usage"]
    assert (first["account"], first["model"], first["outcome"], first["cached"]) == ("acct-a", MODEL, "ok", False)
    assert (first["input_tokens"], first["output_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
    assert first["neurons"] == pytest.approx(expected_neurons(usage["prompt_tokens"], usage["completion_tokens"]))
    assert (hit["cached"], hit["neurons"], hit["outcome"], hit["output_tokens"]) == (True, 0.0, "ok", 6)
    assert first["latency_ms"] > 0 and before - timedelta(seconds=1) <= first["time"] <= utc_clock()
    assert first["day"] == first["time"].date().isoformat()
    aborted = [r for r in rows if r["outcome"] == "aborted"]
    assert len(aborted) == 2 and all(r["model"] == SLOW_MODEL and not r["cached"] for r in aborted)
    for row in aborted:  # billed for the prompt and the tokens actually generated
        assert 1 <= row["output_tokens"] < 300
        assert row["neurons"] == pytest.approx(expected_neurons(row["input_tokens"], row["output_tokens"]))


def test_usage_endpoint_and_account_isolation(policy_server: Callable[..., PolicyServer],
                                              utc_clock: UtcClock, backend: dict[str, Any]) -> None:
    server = policy_server(rate_limits=False, **backend)
    for n in range(3):
        server.post("acct-a", {"prompt": f"Story {n}", "raw": True, "max_tokens": 3})
    server.post("acct-a", {"prompt": "Story 0", "raw": True, "max_tokens": 3})  # a cache hit
    server.post("acct-a", {"prompt": "Hi", "raw": True}, model=SCRIPTED_MODEL)
    server.post("acct-b", {"prompt": "Other", "raw": True, "max_tokens": 3})
    rows = [r for r in server.rows() if r["account"] == "acct-a"]

    resp = server.usage("acct-a")
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    result = resp.json()["result"]
    assert result["account_id"] == "acct-a" and result["daily_allocation"] is None
    # the default period in whole seconds, as docs/policy.md shows it: 30 days up to now rounded up (the clock is a
    # few microseconds past noon, the rows too)
    noon = datetime.combine(utc_clock().date(), datetime.min.time()) + timedelta(hours=12)
    assert (result["since"], result["until"]) == (f"{(noon - timedelta(days=30)).date()}T12:00:01Z",
                                                  f"{noon.date()}T12:00:01Z")
    totals = result["totals"]
    assert totals["requests"] == 5 and totals["cached_requests"] == 1
    assert totals["input_tokens"] == sum(r["input_tokens"] for r in rows)
    assert totals["output_tokens"] == sum(r["output_tokens"] for r in rows)
    assert totals["neurons"] == pytest.approx(sum(r["neurons"] for r in rows))
    assert [(m["model"], m["requests"]) for m in result["by_model"]] == [(SCRIPTED_MODEL, 1), (MODEL, 4)]  # by name
    assert [(d["day"], d["requests"]) for d in result["by_day"]] == [(utc_clock().date().isoformat(), 5)]

    # only the caller's own account
    assert server.usage("acct-b", as_account="acct-a").status_code == 403
    assert server.usage("acct-b").json()["result"]["totals"]["requests"] == 1
    assert server.usage("acct-c").json()["result"]["totals"] == {
        "requests": 0, "cached_requests": 0, "input_tokens": 0, "output_tokens": 0, "neurons": 0}
    assert server.http.get("/client/v4/accounts/acct-a/ai/usage").status_code == 400  # no credentials: 9106

    # the period
    today = utc_clock().date()
    assert server.usage("acct-a", since=today.isoformat(), until=today.isoformat()).json()[
        "result"]["totals"]["requests"] == 5
    tomorrow = (today + timedelta(days=1)).isoformat()
    assert server.usage("acct-a", since=tomorrow, until=tomorrow).json()["result"]["totals"]["requests"] == 0
    past = server.usage("acct-a", since="2020-01-01T00:00:00Z", until="2026-06-15T11:00:00Z").json()
    assert past["result"]["totals"]["requests"] == 0 and past["result"]["since"] == "2020-01-01T00:00:00Z"
    bad = server.usage("acct-a", since="yesterday")
    assert bad.status_code == 400 and bad.json()["errors"][0]["code"] == 1001
    assert server.usage("acct-a", since=tomorrow, until=today.isoformat()).status_code == 400


def test_daily_allocation(policy_server: Callable[..., PolicyServer], utc_clock: UtcClock,
                          backend: dict[str, Any]) -> None:
    """10,000 neurons a day per account when on: past it, 429/3036 with the contract's words, not counted by the
    rate limiter, and `x-should-retry: false`, so the SDK does not retry in vain."""
    server = policy_server(daily_neurons=10_000, account_rpm={"acct-a": 10}, **backend)
    body = {"prompt": "Once", "raw": True, "max_tokens": 2}
    assert server.post("acct-a", body).status_code == 200
    usage = server.usage("acct-a").json()["result"]["daily_allocation"]
    assert usage["neurons_per_day"] == 10_000 and 0 < usage["used_today"] < 10
    # the account used 10,000 neurons earlier today on another replica: a row in the shared database, which this
    # server reads again once its last reading is a second old
    insert_row(server, "earlier-today", utc_clock() - timedelta(seconds=1), 9_999.9)
    wait_used_up(server, "acct-a")
    refused = server.post("acct-a", body)
    assert refused.status_code == 429
    assert refused.json()["errors"] == [{"code": 3036, "message": ALLOCATION_MESSAGE}]
    assert refused.headers["x-should-retry"] == "false" and int(refused.headers["retry-after"]) == 12 * 3600
    assert refused.headers["x-ratelimit-remaining-requests"] == "9"  # refused before the limiter: not counted
    seen: list[int] = []
    client = Cloudflare(api_token=ACCOUNTS["acct-a"], base_url=f"{server.url}/client/v4", max_retries=2,
                        http_client=httpx.Client(event_hooks={"response": [lambda r: seen.append(r.status_code)]}))
    with pytest.raises(cloudflare.RateLimitError) as info:
        client.ai.run(MODEL, account_id="acct-a", prompt="Once", raw=True, max_tokens=2)
    assert info.value.body["errors"][0]["code"] == 3036 and seen == [429]  # one attempt, no retries
    assert server.post("acct-b", body).status_code == 200  # per account
    assert server.usage("acct-a").json()["result"]["daily_allocation"]["remaining_today"] == 0


def test_daily_allocation_resets_at_utc_midnight(policy_server: Callable[..., PolicyServer],
                                                 utc_clock: UtcClock) -> None:
    """On a fake clock: used up at 23:59:58 (Retry-After: 2 s, the time to 00:00 UTC); at 00:00:01 the next day the
    account is served again, and the usage endpoint counts the new day only."""
    utc_clock.set(datetime(2026, 6, 15, 23, 59, 58))
    server = policy_server(daily_neurons=10_000, rate_limits=False)
    insert_row(server, "late", utc_clock(), 10_000.0)
    wait_used_up(server, "acct-a")
    refused = server.post("acct-a", {"prompt": "Once", "raw": True, "max_tokens": 2})
    assert (refused.status_code, refused.headers["retry-after"]) == (429, "2")
    utc_clock.set(datetime(2026, 6, 16, 0, 0, 1))
    assert server.post("acct-a", {"prompt": "Once", "raw": True, "max_tokens": 2}).status_code == 200
    allocation = server.usage("acct-a").json()["result"]["daily_allocation"]
    assert 0 < allocation["used_today"] < 10


def test_a_body_that_arrives_across_midnight_counts_to_the_new_day(policy_server: Callable[..., PolicyServer],
                                                                   utc_clock: UtcClock) -> None:
    """Found by an audit: a request whose headers came at 23:59:50 of a day whose allocation was used up, and whose
    body ended at 00:00:10, was refused for the day before: 3036 with `x-should-retry: false` and `Retry-After: 1`
    (the time to a midnight already past) — the SDK gives up at once, while a retry at once was served. A request
    is admitted, and counted in the ledger, at the time its body is in: the new day."""
    utc_clock.set(datetime(2026, 6, 15, 23, 59, 50))
    server = policy_server(daily_neurons=10_000, rate_limits=False, cache=False)
    insert_row(server, "late", utc_clock(), 10_000.0)
    wait_used_up(server, "acct-a")
    payload = json.dumps({"prompt": "Once upon a time", "raw": True, "max_tokens": 2}).encode()

    def body() -> Iterator[bytes]:
        yield payload[:10]
        time.sleep(0.5)  # the server has the headers and waits for the rest of the body
        utc_clock.set(datetime(2026, 6, 16, 0, 0, 10))
        yield payload[10:]

    answer = server.http.post(server.run_url("acct-a"), content=body(),
                              headers={**auth_for("acct-a"), "content-length": str(len(payload))})
    assert answer.status_code == 200, (answer.headers, answer.text)
    row = next(r for r in server.rows() if r["request_id"] == answer.headers["cf-ai-req-id"])
    assert row["day"] == "2026-06-16" and row["time"] >= datetime(2026, 6, 16, 0, 0, 10)
    assert server.usage("acct-a").json()["result"]["daily_allocation"]["used_today"] == pytest.approx(
        float(answer.headers["cf-ai-neurons"]))


def test_used_today_counts_that_day_only(policy_server: Callable[..., PolicyServer], utc_clock: UtcClock,
                                         backend: dict[str, Any]) -> None:
    """Found by an audit: "used today" counted every later day's rows too. Two replicas on one database, the other
    one's clock 5 s ahead across midnight: its rows of 00:00 made this one, still at 23:59:55, refuse with 3036 and
    `x-should-retry: false` while its usage showed nothing that day (so did one server whose clock was stepped back
    to a day with no rows). Used today is the account's neurons of that UTC day, neither before nor after."""
    utc_clock.set(datetime(2026, 6, 15, 23, 59, 55))
    server = policy_server(daily_neurons=100, rate_limits=False, cache=False, **backend)
    insert_row(server, "day-before", datetime(2026, 6, 14, 23, 59, 59), 500.0)
    insert_row(server, "today", datetime(2026, 6, 15, 8), 20.0)
    insert_row(server, "tomorrow", datetime(2026, 6, 16, 0, 0, 0), 112.914)  # the other replica's, already 00:00
    served = server.post("acct-a", {"prompt": "Once", "raw": True, "max_tokens": 2})
    assert served.status_code == 200, served.text
    result = server.usage("acct-a", since="2026-06-15").json()["result"]
    (day,) = result["by_day"]
    assert day["day"] == "2026-06-15"
    assert result["daily_allocation"]["used_today"] == pytest.approx(day["neurons"], abs=1e-6)
    assert day["neurons"] == pytest.approx(20.0 + float(served.headers["cf-ai-neurons"]), abs=1e-6)
    utc_clock.set(datetime(2026, 6, 16, 0, 0, 1))  # the next day: the other replica's rows, 112.914 of 100
    assert server.usage("acct-a").json()["result"]["daily_allocation"]["used_today"] == pytest.approx(112.914)
    refused = server.post("acct-a", {"prompt": "Once", "raw": True, "max_tokens": 2})
    assert (refused.status_code, refused.headers["x-should-retry"]) == (429, "false")


def insert_row(server: PolicyServer, request_id: str, when: datetime, neurons: float) -> None:
    """A row of acct-a written straight into the ledger's database, as another replica would."""
    ledger = server.policy.ledger
    with ledger.database.begin() as conn:
        conn.execute(sa.insert(ledger.table), [UsageRow(request_id, when, "acct-a", MODEL, 40_000, 14_465, neurons,
                                                        False, "ok", 1.0).to_db()])


def wait_used_up(server: PolicyServer, account: str) -> None:
    """Poll the usage endpoint (it reads the allocation as admission does) until nothing is left today; the
    database is read again once the last reading is a second old."""
    deadline = time.monotonic() + 30
    while server.usage(account).json()["result"]["daily_allocation"]["remaining_today"] > 0:
        assert time.monotonic() < deadline, "the other replica's row was never counted"
        time.sleep(0.05)


def test_a_reading_of_the_ledger_counts_rows_recorded_after_it() -> None:
    """The daily allocation reads the ledger in a thread, then checks on the event loop: a row recorded in between
    (a request that ended, its reservation released meanwhile) must count, or two requests could cross the line."""
    ledger = Ledger(make_database("sqlite://"), MemorySpool())
    ledger.create_schema()
    ledger.start()

    async def scenario() -> None:
        now = utc_now()
        since = now.replace(hour=0, minute=0, second=0, microsecond=0)
        reading = await ledger.neurons_reading("acct", since)
        assert reading.now() == 0.0
        await ledger.record(UsageRow("r1", now, "acct", MODEL, 10, 20, 5.508, False, "ok", 1.0))
        assert reading.now() == pytest.approx(5.508)
        assert await ledger.neurons_used("acct", since) == pytest.approx(5.508)

    try:
        asyncio.run(scenario())
    finally:
        ledger.close()


def test_a_days_total_leaves_out_the_spooled_rows_of_later_days() -> None:
    """The rows still in the spool count towards their own day only (the database's rows: above)."""
    spool = MemorySpool()
    rows = [("late", datetime(2026, 6, 15, 23, 59, 59), 2.0), ("next", datetime(2026, 6, 16), 30.0)]
    spool.append([UsageRow(name, when, "acct", MODEL, 1, 1, neurons, False, "ok", 1.0).to_json()
                  for name, when, neurons in rows])
    ledger = Ledger(make_database("sqlite://"), spool)  # not started: the rows stay in the spool
    ledger.create_schema()

    async def days() -> list[float]:
        return [await ledger.neurons_used("acct", datetime(2026, 6, day)) for day in (15, 16, 17)]

    try:
        assert asyncio.run(days()) == [2.0, 30.0, 0.0]
    finally:
        ledger.close(timeout=1)


class GatedSpool(MemorySpool):
    """A spool whose appends wait for `gate`: a writer busy on a slow fsync."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def append(self, rows: Any) -> None:
        self.gate.wait(10)
        super().append(rows)


def test_a_cancelled_caller_does_not_fail_the_other_rows_of_its_batch() -> None:
    """Found in review: a request task cancelled while its row waited for the writer cancelled the writer's future,
    setting its result raised, and the writer then failed every other row of that batch (500s for requests whose
    rows were written and billed)."""
    spool = GatedSpool()
    ledger = Ledger(make_database("sqlite://"), spool)
    ledger.create_schema()
    ledger.start()
    now = utc_now()

    def row(i: int) -> UsageRow:
        return UsageRow(f"r{i}", now, "acct", MODEL, 1, 1, 1.0, False, "ok", 1.0)

    async def scenario() -> list[Any]:
        first = asyncio.ensure_future(ledger.record(row(1)))  # the writer takes it and waits in append
        await asyncio.sleep(0.2)
        cancelled = asyncio.ensure_future(ledger.record(row(2)))
        others = [asyncio.ensure_future(ledger.record(row(i))) for i in range(3, 6)]
        await asyncio.sleep(0.1)
        cancelled.cancel()
        await asyncio.sleep(0.1)
        spool.gate.set()
        await first
        return await asyncio.gather(*others, return_exceptions=True)

    try:
        assert asyncio.run(scenario()) == [None, None, None]
        assert ledger.flush(5)
        with ledger.database.connect() as conn:
            ids = sorted(r[0] for r in conn.execute(sa.select(ledger.table.c.request_id)))
        assert ids == [f"r{i}" for i in range(1, 6)]  # the cancelled caller's row is written all the same
    finally:
        ledger.close()


def test_no_database_work_on_the_event_loop_thread(policy_server: Callable[..., PolicyServer]) -> None:
    server = policy_server(daily_neurons=10_000)
    threads: set[str] = set()
    sa.event.listen(server.policy.ledger.database, "before_cursor_execute",
                    lambda *args: threads.add(threading.current_thread().name))
    server.post("acct-a", {"prompt": "Once", "raw": True, "max_tokens": 2})
    server.stream("acct-a", {"prompt": "Twice", "raw": True, "max_tokens": 2})
    server.usage("acct-a")
    assert server.policy.ledger.flush()
    assert threads and all(name.startswith("int8serve-ledger") for name in threads), threads


def _row(request_id: str, when: datetime) -> UsageRow:
    return UsageRow(request_id, when, "acct", MODEL, 10, 5, 2.754, False, "ok", 12.5)


def test_spool_replay_is_ordered_and_idempotent(tmp_path: Path) -> None:
    """Rows left in a spool (a crash, a database outage) are inserted at the next start, in order, once each —
    even when some of them had already reached the database."""
    url = f"sqlite:///{tmp_path / 'usage.sqlite3'}"
    now = utc_now()
    rows = [_row(f"r{n}", now + timedelta(milliseconds=n)) for n in range(5)]
    spool = FileSpool(tmp_path / "spool.jsonl")
    spool.append([r.to_json() for r in rows] + [rows[1].to_json()])  # a duplicate, too
    with pytest.raises(SpoolLockedError):
        FileSpool(tmp_path / "spool.jsonl")  # one server per data directory
    spool.close()
    with (tmp_path / "spool.jsonl").open("ab") as f:
        f.write(b'{"request_id": "torn')  # a crash in the middle of an append: never acknowledged
    (tmp_path / "spool.jsonl.new").write_bytes(b'{"request_id": "r3"}\n')  # a crash while rewriting the spool

    first = Ledger(make_database(url), FileSpool(tmp_path / "spool.jsonl"))
    assert not (tmp_path / "spool.jsonl.new").exists()  # the spool itself was never left incomplete
    first.create_schema()
    with first.database.begin() as conn:  # r0 and r1 made it to the database before the crash
        conn.execute(sa.insert(first.table), [rows[0].to_db(), rows[1].to_db()])
    assert first.pending == 6
    assert first.flush()
    assert first.pending == 0 and (tmp_path / "spool.jsonl").read_bytes() == b""
    with first.database.connect() as conn:
        ids = conn.execute(sa.select(first.table.c.request_id).order_by(first.table.c.time)).scalars().all()
    assert ids == ["r0", "r1", "r2", "r3", "r4"]
    first.close()


@pytest.mark.usefixtures("umask_022")
@pytest.mark.parametrize("made_by_the_user", [False, True])
def test_the_ledger_in_the_data_dir_is_for_its_owner_alone(made_by_the_user: bool, tmp_path: Path) -> None:
    """Every account's requests, tokens and neurons: the SQLite ledger and its WAL files are 0600 like the spool,
    and the data directory is 0700, whether int8serve made it or the operator did, 0755 (test_data_dir.py)."""
    data_dir = tmp_path / "data"
    if made_by_the_user:
        data_dir.mkdir(mode=0o755)
    policy = Policy.build(PolicySettings(data_dir=data_dir))
    try:
        asyncio.run(policy.ledger.record(_row("r0", utc_now())))
        assert policy.ledger.flush()
        assert modes(data_dir) == {".": "700", "usage.sqlite3": "600",
                                   "usage.sqlite3-wal": "600", "usage.sqlite3-shm": "600",
                                   "ledger-spool.jsonl": "600"}
    finally:
        policy.close()


@pytest.mark.parametrize("since, until", [("0001-01-01T00:00:00+01:00", None),
                                          ("2026-01-01", "9999-12-31T23:59:59-01:00")])
def test_a_time_whose_offset_leaves_the_calendar_is_a_400(since: str, until: str | None) -> None:
    """The offset moves it before year 1 or after 9999: a clear 400/1001, not a 500 (OverflowError)."""
    with pytest.raises(ApiError) as refused:
        parse_period(since, until)
    assert (refused.value.status, refused.value.code) == (400, 1001)


def test_the_default_period_is_in_whole_seconds() -> None:
    """Its end is now rounded up to a second (a row written this second is in), its start 30 days before; a time
    given keeps its fraction."""
    now = datetime(2026, 11, 6, 14, 55, 53, 444184)
    assert parse_period(None, None, now) == (datetime(2026, 10, 7, 14, 55, 54), datetime(2026, 11, 6, 14, 55, 54))
    assert parse_period(None, None, now.replace(microsecond=0))[1] == now.replace(microsecond=0)
    assert parse_period("2026-11-06T14:00:00.5Z", None, now)[0] == datetime(2026, 11, 6, 14, 0, 0, 500000)


def test_the_last_day_of_the_calendar_is_a_whole_day() -> None:
    since, until = parse_period("9999-12-30", "9999-12-31")
    assert (since, until) == (datetime(9999, 12, 30), datetime.max)


@pytest.mark.parametrize("until, end", [("2026-12-01", datetime(2026, 12, 2)), ("2026-W49-2", datetime(2026, 12, 2)),
                                        ("2026W49T12", datetime(2026, 11, 30, 12)),  # a time as long as a date
                                        ("2026-12-01T12", datetime(2026, 12, 1, 12))])
def test_until_a_date_is_its_whole_day_and_until_a_time_is_that_time(until: str, end: datetime) -> None:
    """A plain date in any ISO 8601 form ends the period at the day's end; a time ends it there. Whether `until`
    was a date was told by its length (10 characters): `2026W49T12` (noon of Monday of week 49) ended a day late,
    and `2026-W49-2` at the day's start. (Digits alone are unix seconds.)"""
    assert parse_period("2026-11-01", until)[1] == end
