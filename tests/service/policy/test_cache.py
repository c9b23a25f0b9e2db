"""The response cache: HIT/MISS, a key that covers everything that changes the output (and not `stream`), replayed
streams, nothing stored from aborted streams, AI Gateway's skip-cache and TTL headers, and the in-process bounds."""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import json
import logging
import random
import socket
import struct
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from int8serve.catalog.registry import Catalog
from int8serve.engine.chat_template import DEFAULT_SYSTEM_PROMPT
from int8serve.engine.sampling_params import SamplingParams
from int8serve.engine.scheduler import Engine
from int8serve.service.app import create_app
from int8serve.service.inference import RequestLimits
from int8serve.service.policy import Policy
from int8serve.service.policy import cache as cache_module
from int8serve.service.policy.cache import CachedAnswer, CacheDirectives, CacheKey, MemoryCache, cache_key
from int8serve.service.protocol.run import RunRequest, ValidatedRun
from int8serve.service.request_log import REQUEST_LOGGER

from ..conftest import MODEL, SLOW_MODEL, TOKEN, TOKENS, LiveServer, stuck_reader, wait_for
from .conftest import CARD_NEURON_COST, REDIS_URL, FakeClock, PolicyServer, auth_for, sse_data

STORY = "Once upon a time, there was a little"
BASE: dict[str, Any] = {"prompt": STORY, "max_tokens": 4, "temperature": 1.0, "top_p": 0.95, "top_k": 40,
                        "seed": 42, "repetition_penalty": 1.1, "frequency_penalty": 0.1, "presence_penalty": 0.1}


def status(resp: httpx.Response) -> str:
    return resp.headers["cf-aig-cache-status"]


def test_hit_and_miss(policy_server: Callable[..., PolicyServer], backend: dict[str, Any]) -> None:
    server = policy_server(**backend)
    first, second = server.post("acct-a", BASE), server.post("acct-a", BASE)
    assert (first.status_code, status(first), status(second)) == (200, "MISS", "HIT")
    assert second.json() == first.json()
    assert float(first.headers["cf-ai-neurons"]) > 0 and second.headers["cf-ai-neurons"] == "0"
    error = server.post("acct-a", {"prompt": ""})
    assert (error.status_code, status(error)) == (400, "MISS")
    rows = server.rows()
    assert [(r["cached"], r["neurons"] > 0) for r in rows] == [(False, True), (True, False)]


def test_accounts_never_read_each_others_answers(policy_server: Callable[..., PolicyServer],
                                                 backend: dict[str, Any]) -> None:
    """The issue's finding: A's sampled answer to a canary prompt was B's HIT. Now B's identical request is a MISS
    (a fresh sample, billed), and each account hits only its own entry."""
    server = policy_server(rate_limits=False, **backend)
    canary = {"prompt": "canary-123", "max_tokens": 8, "temperature": 1}
    a_first, b_first = server.post("acct-a", canary), server.post("acct-b", canary)
    assert (status(a_first), status(b_first)) == ("MISS", "MISS")
    assert float(b_first.headers["cf-ai-neurons"]) > 0
    a_again, b_again = server.post("acct-a", canary), server.post("acct-b", canary)
    assert (status(a_again), status(b_again)) == ("HIT", "HIT")
    assert a_again.json() == a_first.json() and b_again.json() == b_first.json()


def test_global_scope_shares_answers_by_choice(policy_server: Callable[..., PolicyServer]) -> None:
    server = policy_server(rate_limits=False, cache_scope="global")
    assert [status(server.post(account, BASE)) for account in ("acct-a", "acct-b")] == ["MISS", "HIT"]


def test_key_covers_everything_that_changes_the_output(policy_server: Callable[..., PolicyServer]) -> None:
    """Every sampling parameter, the seed, max_tokens, raw, and messages instead of the same prompt change the key;
    `stream` does not."""
    server = policy_server(rate_limits=False)
    assert status(server.post("acct-a", BASE)) == "MISS"
    variants = {
        "temperature": {"temperature": 0.7}, "top_p": {"top_p": 0.9}, "top_k": {"top_k": 20}, "seed": {"seed": 43},
        "repetition_penalty": {"repetition_penalty": 1.2}, "frequency_penalty": {"frequency_penalty": 0.5},
        "presence_penalty": {"presence_penalty": 0.5}, "max_tokens": {"max_tokens": 5}, "raw": {"raw": True},
    }
    for name, change in variants.items():
        assert status(server.post("acct-a", {**BASE, **change})) == "MISS", name
    # the messages form rendering the very same template as the prompt form is still another request
    messages = {k: v for k, v in BASE.items() if k != "prompt"}
    messages["messages"] = [{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": STORY}]
    assert status(server.post("acct-a", messages)) == "MISS"
    assert status(server.post("acct-a", messages)) == "HIT"
    resp, _raw = server.stream("acct-a", BASE)
    assert status(resp) == "HIT"  # `stream` is not in the key
    assert status(server.post("acct-a", BASE)) == "HIT"


def test_cache_key_unit() -> None:
    """Each field of SamplingParams (present and future ones) and of the request shape changes the digest."""
    checked = ValidatedRun(segments=(), max_tokens=8, params=SamplingParams(seed=1), stream=False,
                           reject_if_busy=False, form="prompt", raw=False)
    base = RunRequest(checked=checked, prompt_ids=(1, 2, 3))

    def varied(**changes: object) -> RunRequest:
        return dataclasses.replace(base, checked=dataclasses.replace(checked, **changes))

    key = cache_key("acct", "@cf/m", base)
    assert cache_key("acct", "@cf/m", varied(stream=True, reject_if_busy=True)) == key
    changed = [dataclasses.replace(base, prompt_ids=(1, 2, 4)), varied(max_tokens=9), varied(form="messages"),
               varied(raw=True)]
    for f in dataclasses.fields(SamplingParams):
        value = getattr(checked.params, f.name)
        if isinstance(value, tuple):
            other: object = (*value, "stop")
        else:
            other = 7 if value is None else (value + 1 if not isinstance(value, float) else value / 2 + 0.1)
        changed.append(varied(params=dataclasses.replace(checked.params, **{f.name: other})))
    keys = {cache_key("acct", "@cf/m", run) for run in changed}
    keys |= {cache_key("acct", "@cf/other", base), cache_key("other-acct", "@cf/m", base)}
    assert key not in keys and len(keys) == len(changed) + 2
    assert cache_key("acct", "@cf/m", base, weights="other weights") != key  # the engine's fingerprint


def test_stream_replay_equals_the_original_stream(policy_server: Callable[..., PolicyServer],
                                                   backend: dict[str, Any]) -> None:
    """A streamed hit sends the original's frames byte for byte; only the usage frame's neurons differ (a hit costs
    0). It does not matter whether the entry was made by a streamed or a collected request."""
    server = policy_server(rate_limits=False, **backend)
    body = {**BASE, "max_tokens": 40}
    original_resp, original = server.stream("acct-a", body)
    replay_resp, replay = server.stream("acct-a", body)
    assert (status(original_resp), status(replay_resp)) == ("MISS", "HIT")
    frames = sse_data(original)
    neurons = frames[-2]["usage"]["neurons"]
    assert neurons == round((frames[-2]["usage"]["total_tokens"]) * CARD_NEURON_COST, 6) > 0
    assert replay == original.replace(f'"neurons":{neurons}'.encode(), b'"neurons":0.0')
    assert replay_resp.headers["content-type"] == "text/event-stream"

    # an entry made by a collected request, replayed as a stream, equals a fresh stream of the same request
    other = {**BASE, "seed": 7, "max_tokens": 30}
    collected = server.post("acct-a", other)
    hit_resp, hit = server.stream("acct-a", other)
    fresh_resp, fresh = server.stream("acct-a", other, headers={"cf-aig-skip-cache": "true"})
    assert (status(collected), status(hit_resp), status(fresh_resp)) == ("MISS", "HIT", "MISS")
    fresh_neurons = sse_data(fresh)[-2]["usage"]["neurons"]
    assert hit == fresh.replace(f'"neurons":{fresh_neurons}'.encode(), b'"neurons":0.0')
    assert "".join(f["response"] for f in sse_data(hit)[:-1]) == collected.json()["result"]["response"]


def test_aborted_streams_are_not_cached(policy_server: Callable[..., PolicyServer]) -> None:
    """A stream the client leaves is billed for what was generated and never stored: the same request again is a
    MISS."""
    server = policy_server(rate_limits=False)
    body = {"prompt": "Once upon a time", "raw": True, "max_tokens": 300, "temperature": 0, "stream": True}
    for attempt in range(2):
        with server.http.stream("POST", server.run_url("acct-a", SLOW_MODEL), headers=auth_for("acct-a"),
                                json=body) as resp:
            assert status(resp) == "MISS", attempt
            lines = resp.iter_lines()
            assert next(lines).startswith('data: {"response":')
        server.wait_rows(attempt + 1)
    rows = server.rows()
    assert [(r["outcome"], r["cached"]) for r in rows] == [("aborted", False), ("aborted", False)]
    for row in rows:
        assert 1 <= row["output_tokens"] < 300
        assert row["neurons"] == pytest.approx((row["input_tokens"] + row["output_tokens"]) * CARD_NEURON_COST)


def test_a_replay_whose_client_resets_stops_and_is_logged_as_cut(policy_server: Callable[..., PolicyServer],
                                                                caplog: pytest.LogCaptureFixture) -> None:
    """Found by an audit: a streamed hit wrote all its frames in one tick of the event loop, into the connection of
    a client that had reset it: ~320 `socket.send() raised exception.` lines for one request of a 480-token answer
    (a hit costs no neurons: any account could fill the log), and the request's line said outcome=ok. Now the replay
    stops when its client leaves, as a live stream does, and its line says it was cut (aborted, 3008)."""
    server = policy_server(rate_limits=False)
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    body = {"prompt": "Once upon a time", "raw": True, "max_tokens": 480, "seed": 4343, "stream": True}
    fill, frames = server.stream("acct-a", body)
    assert status(fill) == "MISS" and len(sse_data(frames)) > 300
    payload = json.dumps(body).encode()
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close() resets
        sock.sendall(f"POST {server.run_url('acct-a')} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                     f"tok-acct-a\r\nContent-Length: {len(payload)}\r\n\r\n".encode() + payload)
        assert sock.recv(10) == b"HTTP/1.1 2"
    wait_for(lambda: _cached_line(caplog), "the replayed request's log line", timeout=10)
    time.sleep(0.3)  # what the server might still write into the reset connection
    assert [r for r in caplog.records if r.name == "asyncio"] == []
    assert {k: _cached_line(caplog)[k] for k in ("status", "outcome", "error_code", "stream")} == {  # type: ignore[index]
        "status": 200, "outcome": "aborted", "error_code": 3008, "stream": True}


def test_a_replay_whose_client_reads_nothing_is_cut_after_the_stall_timeout(
        catalog: Catalog, engines: dict[str, Engine], caplog: pytest.LogCaptureFixture) -> None:
    """A streamed hit to a client that reads nothing is cut after the stall timeout, as a live stream is (the
    replay had no deadline: it waited for the client as long as the connection stayed open)."""
    policy = Policy.in_memory(rate_limits=False)
    app = create_app(catalog, engines, TOKENS, policy=policy, limits=RequestLimits(stall_timeout=0.5))
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 480, "stream": True,
            "temperature": 0}
    with LiveServer(app) as live, httpx.stream("POST", f"{live.url}/v1/chat/completions", json=body,
                                               headers={"Authorization": f"Bearer {TOKEN}"}) as fill:
        assert status(fill) == "MISS" and len(sse_data(fill.read())) > 300  # ~70 KB of frames
    caplog.set_level(logging.INFO, logger=REQUEST_LOGGER)
    try:
        with stuck_reader(app, body, TOKEN) as (_, sock):
            started = time.monotonic()
            wait_for(lambda: _cached_line(caplog), "the replay to be cut", timeout=10)
            assert 0.5 <= time.monotonic() - started < 5
            sock.settimeout(5)
            while sock.recv(65536):  # what the buffers held, then the end: the server closed the connection
                pass
    finally:
        policy.close()
    assert {k: _cached_line(caplog)[k] for k in ("status", "outcome", "error_code")} == {  # type: ignore[index]
        "status": 200, "outcome": "aborted", "error_code": 3008}


def _cached_line(caplog: pytest.LogCaptureFixture) -> dict[str, Any] | None:
    """The fields of the first request log line of a cache hit."""
    lines = [r.fields for r in caplog.records if r.name == REQUEST_LOGGER and r.fields.get("cached")]  # type: ignore
    return lines[0] if lines else None


def test_skip_cache_and_ttl(policy_server: Callable[..., PolicyServer]) -> None:
    """The skip headers, and TTLs on a fake clock (an entry's age is the subject, not the machine's speed)."""
    clock = FakeClock()
    server = policy_server(rate_limits=False, clock=clock, monotonic=clock)
    skip = {"cf-aig-skip-cache": "true"}
    one = {**BASE, "seed": 100}
    assert status(server.post("acct-a", one, skip)) == "MISS"
    assert status(server.post("acct-a", one)) == "MISS"  # a skipped request stored nothing
    assert status(server.post("acct-a", one, skip)) == "MISS"  # ... and reads nothing
    assert status(server.post("acct-a", one, {"cf-skip-cache": "true"})) == "MISS"  # the older header name
    assert status(server.post("acct-a", one)) == "HIT"

    short = {**BASE, "seed": 101}
    assert status(server.post("acct-a", short, {"cf-aig-cache-ttl": "1"})) == "MISS"
    clock.advance(0.9)
    assert status(server.post("acct-a", short)) == "HIT"  # 0.9 s old: still within its own TTL of 1 s
    clock.advance(0.2)
    assert status(server.post("acct-a", short)) == "MISS"  # expired after its own TTL of 1 s
    # a stored answer (default TTL) older than the TTL a request asks for is not served to it
    assert status(server.post("acct-a", short)) == "HIT"
    clock.advance(1.1)
    assert status(server.post("acct-a", short, {"cf-aig-cache-ttl": "1"})) == "MISS"
    assert status(server.post("acct-a", short, {"cf-aig-cache-ttl": "nonsense"})) == "HIT"  # ignored


def test_in_process_ages_ignore_wall_clock_steps(policy_server: Callable[..., PolicyServer]) -> None:
    """In this process an entry's TTL and age run on the monotonic clock: with the wall clock stepped an hour
    forward a fresh entry is still fresh, and with it stepped an hour back an entry stored for 1 s is gone 1.2 s
    later (it was served for the hour when they ran on the wall clock)."""
    wall = FakeClock()
    server = policy_server(rate_limits=False, clock=wall)
    body = {**BASE, "seed": 102}
    assert status(server.post("acct-a", body, {"cf-aig-cache-ttl": "1"})) == "MISS"
    wall.advance(3600)
    assert status(server.post("acct-a", body, {"cf-aig-cache-ttl": "1"})) == "HIT"
    wall.advance(-7200)
    time.sleep(1.2)
    assert status(server.post("acct-a", body)) == "MISS"


def test_a_shared_entry_stamped_in_the_future_has_no_known_age(policy_server: Callable[..., PolicyServer],
                                                                redis_prefix: str) -> None:
    """A shared entry's age is read from the wall-clock time its writer stamped in it (Redis' TTL bounds its life).
    A stamp in the future — this replica's clock stepped back since, or behind the writer's — tells no age: a request
    that bounds the age (`cf-aig-cache-ttl`) does not take the entry; one that does not, does."""
    wall = FakeClock()
    server = policy_server(rate_limits=False, clock=wall, redis_url=f"{REDIS_URL}?key_prefix={redis_prefix}")
    body = {**BASE, "seed": 103}
    assert status(server.post("acct-a", body)) == "MISS"
    assert status(server.post("acct-a", body, {"cf-aig-cache-ttl": "2"})) == "HIT"
    wall.advance(-3600)
    assert status(server.post("acct-a", body)) == "HIT"
    assert status(server.post("acct-a", body, {"cf-aig-cache-ttl": "2"})) == "MISS"
    assert status(server.post("acct-a", body, {"cf-aig-cache-ttl": "2"})) == "HIT"  # stored again, stamped now


def test_no_cache_setting(policy_server: Callable[..., PolicyServer]) -> None:
    server = policy_server(cache=False)
    assert [status(server.post("acct-a", BASE)) for _ in range(2)] == ["MISS", "MISS"]


def test_directives_from_headers() -> None:
    """A client's TTL is capped by the server's (here 300 s): it can shorten an entry's life, never extend it."""
    def directives(headers: dict[str, str]) -> CacheDirectives:
        return CacheDirectives.from_headers(headers, max_ttl=300)

    assert directives({}) == CacheDirectives(False, None)
    assert directives({"cf-aig-skip-cache": "TRUE", "cf-aig-cache-ttl": "90"}) == CacheDirectives(True, 90)
    assert directives({"cf-cache-ttl": "2592000"}).ttl == 300  # 30 days asked: the server's 300 s
    assert directives({"cf-aig-cache-ttl": "9" * 5000}).ttl == 300  # any number of digits
    assert directives({"cf-aig-cache-ttl": "-5"}).ttl is None
    assert directives({"cf-aig-cache-ttl": "0"}).ttl is None


def test_memory_cache_bounds() -> None:
    """Bounded in entries and in bytes (least recently used out first), each entry with its own TTL."""
    now = [1000.0]
    cache = MemoryCache(max_entries=3, max_bytes=3000, clock=lambda: now[0])

    def answer(text: str) -> CachedAnswer:
        return CachedAnswer((text,), 1, 1, "stop", created=now[0])

    def k(digest: str, owner: str = "a") -> CacheKey:
        return CacheKey(owner, digest)

    async def scenario() -> None:
        for key in "abc":
            await cache.put(k(key), answer(key), ttl=10)
        assert await cache.get(k("a")) is not None  # a is now the most recently used
        await cache.put(k("d"), answer("d"), ttl=10)
        assert [await cache.get(k(key)) is not None for key in "abcd"] == [True, False, True, True]
        await cache.put(k("big"), answer("x" * 1850), ttl=10)  # evicts until the bytes fit
        assert cache.bytes <= 3000 and await cache.get(k("big")) is not None and len(cache) == 1
        await cache.put(k("huge"), answer("x" * 5000), ttl=10)  # larger than a whole partition: not stored
        assert await cache.get(k("huge")) is None
        await cache.put(k("short"), answer("s"), ttl=1)
        now[0] += 1.5
        assert await cache.get(k("short")) is None and cache.bytes == 0  # (short had pushed big out)

    asyncio.run(scenario())


def test_one_account_filling_the_cache_evicts_only_its_own_entries() -> None:
    cache = MemoryCache(max_entries=3, max_bytes=100_000)

    async def scenario() -> list[bool]:
        await cache.put(CacheKey("victim", "v"), CachedAnswer(("secret",), 1, 1, "stop", created=0.0), ttl=60)
        for n in range(50):  # another account floods the cache
            await cache.put(CacheKey("flooder", str(n)), CachedAnswer(("x",), 1, 1, "stop", created=0.0), ttl=60)
        return [await cache.get(CacheKey("victim", "v")) is not None, await cache.get(CacheKey("flooder", "v")) is None]

    assert asyncio.run(scenario()) == [True, True]
    assert len(cache) == 4  # the flooder's 3 newest and the victim's 1


TOKEN_DELTAS: dict[str, Callable[[random.Random], str]] = {  # what a streaming detokenizer gives, token by token
    "two letters": lambda rnd: chr(97 + rnd.randrange(26)) + chr(97 + rnd.randrange(26)),
    "one CJK character": lambda rnd: chr(0x4E00 + rnd.randrange(20_000)),
    "a word": lambda rnd: " " + "".join(chr(97 + rnd.randrange(26)) for _ in range(rnd.randrange(2, 10))),
}


@pytest.mark.parametrize("delta", list(TOKEN_DELTAS))
def test_a_full_partition_holds_no_more_memory_than_its_byte_bound(delta: str) -> None:
    """The bound counted an answer's JSON, while each delta is a str object of its own (~50 bytes over its text):
    256 answers of 2,048 tokens were counted 3 MiB of the 16 MiB and held 20-42 MiB. What is counted is what is
    held (traced: the answers' objects, made here, and the cache's own)."""
    max_bytes, make, rnd = 1 << 20, TOKEN_DELTAS[delta], random.Random(0)
    cache = MemoryCache(max_entries=256, max_bytes=max_bytes)

    async def fill() -> None:
        for n in range(256):
            deltas = tuple(make(rnd) for _ in range(2048))
            await cache.put(CacheKey("acct", f"{n:064x}"), CachedAnswer(deltas, 10, 2048, "length", 0.0), ttl=60)

    gc.collect()
    tracemalloc.start()
    try:
        asyncio.run(fill())
        gc.collect()
        snapshot = tracemalloc.take_snapshot()
    finally:
        tracemalloc.stop()
    here = [tracemalloc.Filter(True, name) for name in (__file__, cache_module.__file__, "<string>")]
    held = sum(stat.size for stat in snapshot.filter_traces(here).statistics("filename"))
    assert max_bytes * 0.8 < cache.bytes <= max_bytes  # full
    assert held <= max_bytes * 1.05, f"{held / 2**20:.1f} MiB held, {cache.bytes / 2**20:.1f} MiB counted"
