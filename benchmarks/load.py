"""Load and fault harness (issue 11, "The figures"): does a real `int8serve serve` stay correct under hostile load?

The figures of the engine and serving benchmarks say how fast the server is; this script says whether it stays
*correct* when many clients push it at once, some of them hostile, some leaving mid-stream, while Redis or
PostgreSQL go away and come back. It is black-box: it starts `python -m int8serve serve` as a subprocess, talks
to it only over HTTP, and at the end reads the usage ledger from the database, so it keeps working while the
service's internals change.

What one run does:

1. starts a server (default model stories260K) on a free port with 10 accounts from a `--tokens-file`, its own
   `--data-dir` in a temporary folder, `--rpm 0` (unlimited) except for the first `--limited-accounts` accounts,
   which get `--account-rpm ACCOUNT=--limited-rpm` so that rate limits are exercised for some accounts but not all;
2. runs `--clients` closed-loop asyncio/httpx clients for `--duration` seconds, spread over the accounts, each
   mixing valid JSON requests, invalid ones (bad JSON, schema violations, out-of-range and huge numbers), streams
   read to the end, streams the client cuts after a few frames, repeated identical requests (cache hits) and
   OpenAI-route requests (`/v1/chat/completions`, bearer token); every answer is recorded: status, error code
   (`errors[0].code`, or OpenAI's `error.code`), the `cf-ai-req-id` header, and for streams how they ended
   (`[DONE]`, an error frame, cut by the client, or truncated by the server);
3. polls `/healthz` every 100 ms throughout, from a separate process (so the clients' own event loop does not
   inflate the latencies);
4. optionally injects a fault (`--fault redis`: its own `redis-server`, stopped and restarted mid-run;
   `--fault postgres`: a TCP proxy of its own in front of the machine's PostgreSQL, cut and restored; both from
   benchmarks/backends.py);
5. stops the server with SIGTERM (it drains and flushes its ledger, exit 0), reads the ledger
   (`<data-dir>/usage.sqlite3`, or the PostgreSQL schema this run created) and checks:

   - no answer with a 5xx status;
   - every 200 answer, and every stream that got its 200 headers (completed or cut), has exactly one ledger row
     (matched by `cf-ai-req-id`), with the right account, `cached` flag and outcome;
   - valid requests are refused only with 429 (3021 for the rate-limited accounts, 3040 capacity), invalid ones
     with a 4xx that is not 408/429;
   - whole answers: every stream read to the end ended with `[DONE]` (no error frame, no truncation), every 200
     JSON body has its API's shape, no transport error, nothing still running after `--grace`;
   - the headers the README promises: `cf-ai-req-id` on every answer, `cf-aig-cache-status` on 200s,
     `Retry-After` on 429s, `x-ratelimit-*-requests` on the 200s and 429s of the rate-limited accounts;
   - no cache hit for an account that had not itself received that answer before (issue 11: the cache is per
     account by default);
   - `/healthz` answered every poll; the server stayed up, exited 0 on SIGTERM with its ledger spool empty (every
     row in the database), logged no traceback;
   - the rate-limited accounts never had more than their limit admitted in 60 s (a bound from send and answer
     times, so a busy machine gives no false breach);
   - the load exercised every path (200s, streams done and cut, cache hits, OpenAI 200s, invalid requests, 3021s);
   - under a fault: answers kept coming during the outage; Redis: /metrics counted the outage; PostgreSQL: the
     usage endpoint answered 503/1002 halfway through (the cut was real); and 0 ledger rows lost after recovery.

It prints a table, exits 1 listing the failed checks with the requests concerned (2 when the run itself could not
be set up), keeps its work folder (server log, data dir) when a check failed, writes a JSON report with
`--json FILE` (tests/benchmarks/test_load.py runs this script that way) and every request with `--records FILE`,
and with `--write FILE` replaces its section of docs/benchmarks.md (one section per fault).

    .venv/bin/python -m benchmarks.load --clients 40 --duration 10      # ~20 s
    .venv/bin/python -m benchmarks.load --write docs/benchmarks.md      # 200 clients, 60 s: ~75 s
    .venv/bin/python -m benchmarks.load --fault redis --write docs/benchmarks.md
    .venv/bin/python -m benchmarks.load --fault postgres --write docs/benchmarks.md

Each client has its own HTTP connection and pauses 0–2×`--think` seconds between requests; refusals come back in
milliseconds, so 200 clients keep the server saturated (beyond capacity, as intended: most generation requests
get 3040). The client latencies include this process's own CPU wait (its event-loop lag is reported beside them).

PostgreSQL runs (`--fault postgres`, or `--database-url postgresql+psycopg://...`) create a schema of their own
(`int8serve_load_<hex>`), point the server's `search_path` at it so its ledger table is made there, and drop that
schema at the end: nothing else in the database is touched. `--redis-url` runs use a key prefix of their own and
delete its keys at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from benchmarks.backends import (
    LEDGER_TABLE,
    BackendError,
    PostgresSchema,
    RedisServer,
    TcpProxy,
    delete_keys,
    read_rows,
)
from benchmarks.common import (
    display_command,
    error_code,
    free_port,
    launch,
    parse_frame,
    percentile,
    serve_command,
    stop_process,
    wait_ready,
    write_section,
)
from benchmarks.machine import machine_description

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO.parent / "shared" / "models" / "stories260K" / "hf"
DEFAULT_POSTGRES = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
MODEL = "@cf/meta/llama-2-7b-chat-int8"
RUN_PATH = "/client/v4/accounts/{account}/ai/run/" + MODEL
OPENAI_PATH = "/v1/chat/completions"
HEALTH_INTERVAL = 0.1  # seconds between two /healthz polls
HEALTH_TIMEOUT = 5.0  # a poll that takes longer counts as unanswered
REQUEST_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
EXAMPLES = 8  # request examples listed per failed check
# Idle keep-alive connections are dropped by the client after this many seconds, well before the server (uvicorn:
# 5 s): with the same expiry on both sides, a request sent as the server closes the connection fails with a
# ReadError that says nothing about the server (the usual HTTP/1.1 keep-alive race).
KEEPALIVE_EXPIRY = 1.0
TRANSPORT_ERROR_PAUSE = 0.5  # seconds a client waits after a request failed without an answer

# The request mix: kind -> weight (relative frequency of a client's next request)
MIX = {"valid": 25, "stream": 18, "stream-cut": 12, "cache": 15, "openai": 10, "invalid": 20}
CACHE_BODIES = 1  # distinct repeated bodies per run (each account repeats them; one, so that every account asks
# for the same answer: the isolation check meets it in every account, and a repeat comes after its first answer even
# on a slow CPU (with 2, an AVX2 EPYC often finished the run with no hit at all)
HUGE = "1" + "0" * 400  # 1 followed by 400 zeros
HUGER = "1" + "0" * 5000  # beyond Python's 4300-digit int parsing limit


def _run_body(extra: str) -> bytes:
    return ('{"prompt": "Once upon a time", ' + extra + "}").encode()


# Invalid requests: name -> (route, body). Each must be answered 4xx (not 408/429), never 5xx.
INVALID: dict[str, tuple[str, bytes]] = {
    "bad-json": ("run", b'{"prompt": "Once upon'),
    "not-an-object": ("run", b'["prompt", "Once upon a time"]'),
    "missing-prompt": ("run", b'{"max_tokens": 8}'),
    "prompt-not-a-string": ("run", b'{"prompt": 5}'),
    "messages-not-a-list": ("run", b'{"messages": "hello"}'),
    "max-tokens-negative": ("run", _run_body('"max_tokens": -3')),
    "max-tokens-over-limit": ("run", _run_body('"max_tokens": 100000')),
    "temperature-out-of-range": ("run", _run_body('"temperature": 99')),
    "max-tokens-huge": ("run", _run_body(f'"max_tokens": {HUGE}')),
    "seed-huge": ("run", _run_body(f'"seed": {HUGE}')),
    "seed-5000-digits": ("run", _run_body(f'"seed": {HUGER}')),
    "temperature-1e400": ("run", _run_body('"temperature": 1e400')),
    "openai-messages-not-a-list": ("openai", json.dumps({"model": MODEL, "messages": "hello"}).encode()),
    "openai-max-tokens-huge": ("openai", ('{"model": "' + MODEL + '", "messages": [{"role": "user", "content": '
                                          '"hi"}], "max_tokens": ' + HUGE + "}").encode()),
}


# ---------------------------------------------------------------------------------------------------------------
# What the clients send


@dataclass(frozen=True)
class PlannedRequest:
    """One request a client is about to send."""

    kind: str  # a key of MIX, or "invalid:<name>"
    account: str
    route: str  # "run" (Workers AI) or "openai"
    body: bytes
    stream: bool
    cut_after: int | None = None  # frames to read before the client closes the stream
    cache_key: str | None = None  # the repeated body's name, for "cache" requests


@dataclass
class RequestRecord:
    """One request as its client saw it; times in seconds since the start of the load (time.monotonic)."""

    kind: str
    account: str
    route: str
    stream: bool
    body: str  # the first 200 characters, for reports
    cache_key: str | None
    sent: float
    finished: float | None = None
    status: int | None = None
    code: int | str | None = None
    request_id: str | None = None
    cache_status: str | None = None
    stream_end: str | None = None  # "done", "error", "cut" (by the client), "truncated" (by the server)
    frames: int = 0
    transport_error: str | None = None
    abandoned: bool = False  # still running when the grace period ended
    malformed: str | None = None  # what is wrong with a 200 JSON body
    missing_headers: list[str] = field(default_factory=list)  # contract headers the answer lacked
    rate_limited: bool = False  # the account has a requests-per-minute limit

    @property
    def invalid(self) -> bool:
        return self.kind.startswith("invalid:")

    @property
    def got_200(self) -> bool:
        return self.status == 200

    def describe(self) -> str:
        parts = [f"{self.kind} account={self.account} status={self.status}"]
        if self.code is not None:
            parts.append(f"code={self.code}")
        if self.stream:
            parts.append(f"stream_end={self.stream_end} frames={self.frames}")
        if self.transport_error:
            parts.append(f"transport_error={self.transport_error!r}")
        parts.append(f"cf-ai-req-id={self.request_id} t={self.sent:.2f}s body={self.body[:120]!r}")
        return " ".join(parts)


def account_names(count: int) -> list[str]:
    return [f"load-acct-{n}" for n in range(count)]


def token_of(account: str) -> str:
    return f"tok-{account}"


def plan_request(kind: str, account: str, rng: random.Random) -> PlannedRequest:
    """The next request of a client of `account`: its body depends on the kind only (and a random nonce)."""
    nonce = uuid.uuid4().hex[:12]
    if kind == "invalid":
        name = rng.choice(sorted(INVALID))
        route, body = INVALID[name]
        return PlannedRequest(f"invalid:{name}", account, route, body, stream=False)
    if kind == "cache":
        index = rng.randrange(CACHE_BODIES)
        body = {"prompt": f"Once upon a time, cached story number {index}", "raw": True, "max_tokens": 16,
                "seed": 11, "stream": rng.random() < 0.5}
        return PlannedRequest(kind, account, "run", json.dumps(body).encode(), body["stream"],
                              cache_key=f"cache-{index}")
    if kind == "openai":
        stream = rng.random() < 0.5
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"Tell me a story about {nonce}"}],
                "max_tokens": rng.randint(8, 32), "stream": stream}
        return PlannedRequest(kind, account, "openai", json.dumps(body).encode(), stream)
    body = valid_body(nonce, rng)
    if kind == "stream":
        return PlannedRequest(kind, account, "run", json.dumps({**body, "stream": True}).encode(), True)
    if kind == "stream-cut":
        long = {**body, "max_tokens": rng.randint(160, 300), "stream": True}
        return PlannedRequest(kind, account, "run", json.dumps(long).encode(), True, cut_after=rng.randint(1, 3))
    return PlannedRequest(kind, account, "run", json.dumps(body).encode(), False)


def valid_body(nonce: str, rng: random.Random) -> dict[str, Any]:
    """A valid Workers AI body that is unique to this request (never a cache hit), prompt or messages form."""
    max_tokens = rng.randint(8, 48)
    if rng.random() < 0.5:
        return {"prompt": f"Once upon a time, {nonce}", "raw": True, "max_tokens": max_tokens}
    return {"messages": [{"role": "user", "content": f"Tell me about {nonce}"}], "max_tokens": max_tokens,
            "temperature": 0.7}


def request_url(planned: PlannedRequest) -> str:
    return RUN_PATH.format(account=planned.account) if planned.route == "run" else OPENAI_PATH


# ---------------------------------------------------------------------------------------------------------------
# Reading answers


def malformed_answer(content: bytes, route: str) -> str | None:
    """What is wrong with a 200 JSON answer (`success: true` and a `result.response` string on Workers AI routes,
    a `choices` list on OpenAI ones), or None."""
    try:
        body = json.loads(content)
    except ValueError:
        return f"not JSON: {content[:80]!r}"
    if route == "openai":
        ok = isinstance(body, dict) and isinstance(body.get("choices"), list) and body["choices"]
    else:
        result = body.get("result") if isinstance(body, dict) else None
        ok = body.get("success") is True and isinstance(result, dict) and isinstance(result.get("response"), str)
    return None if ok else f"unexpected body: {content[:120]!r}"


# Headers the README promises: every answer has a request id, a 200 its cache status, a 429 when to retry; and for
# an account with a rate limit (unlimited ones have none: ratelimit.py) every 200 and 429 says where it stands.
REQUIRED_HEADERS = {"any": ("cf-ai-req-id",), 200: ("cf-aig-cache-status",), 429: ("retry-after",)}
RATE_LIMIT_HEADERS = ("x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests")


def note_headers(record: RequestRecord, response: httpx.Response) -> None:
    record.status = response.status_code
    record.request_id = response.headers.get("cf-ai-req-id")
    record.cache_status = response.headers.get("cf-aig-cache-status")
    wanted = REQUIRED_HEADERS["any"] + REQUIRED_HEADERS.get(response.status_code, ())
    if record.rate_limited and response.status_code in (200, 429):
        wanted += RATE_LIMIT_HEADERS
    record.missing_headers = [name for name in wanted if name not in response.headers]


async def read_stream(response: httpx.Response, planned: PlannedRequest, record: RequestRecord) -> None:
    """Read SSE frames until `[DONE]`, an error frame, the cut, or the end of the body ("truncated")."""
    async for line in response.aiter_lines():
        kind, payload = parse_frame(line)
        if kind == "done":
            record.stream_end = "done"
            return
        if kind == "error":
            record.stream_end, record.code = "error", error_code(payload)
            return
        if kind == "data":
            record.frames += 1
            if planned.cut_after is not None and record.frames >= planned.cut_after:
                record.stream_end = "cut"
                return  # leaving `client.stream(...)` unread closes the connection: the server sees the client go
    record.stream_end = "truncated"


async def send(client: httpx.AsyncClient, planned: PlannedRequest, record: RequestRecord) -> None:
    headers = {"Authorization": f"Bearer {token_of(planned.account)}", "Content-Type": "application/json"}
    url = request_url(planned)
    try:
        if planned.stream:
            async with client.stream("POST", url, content=planned.body, headers=headers) as response:
                note_headers(record, response)
                if response.status_code == 200:
                    await read_stream(response, planned, record)
                else:
                    record.code = error_code(await response.aread())
        else:
            response = await client.post(url, content=planned.body, headers=headers)
            note_headers(record, response)
            if response.status_code == 200:
                record.malformed = malformed_answer(response.content, planned.route)
            else:
                record.code = error_code(response.content)
    except httpx.HTTPError as exc:
        record.transport_error = f"{type(exc).__name__}: {exc}"[:200]
        if record.stream and record.got_200 and record.stream_end is None:
            record.stream_end = "truncated"
    finally:
        record.finished = time.monotonic()


# ---------------------------------------------------------------------------------------------------------------
# The load


@dataclass
class LoadState:
    """Shared by the clients of one run."""

    base_url: str
    client: httpx.AsyncClient  # for the fault's probe
    start: float
    stop: asyncio.Event
    records: list[RequestRecord] = field(default_factory=list)
    loop_lags: list[float] = field(default_factory=list)  # seconds a 50 ms sleep overran (this process's load)


@dataclass
class LoadResult:
    """What the clients saw; times relative to the start of the load."""

    records: list[RequestRecord]
    window: FaultWindow | None
    wall: float  # the load's duration plus the time the last answers took
    start: float  # time.monotonic() at the start
    loop_lags: list[float]


async def watch_loop_lag(state: LoadState, period: float = 0.05) -> None:
    """How late this process's event loop wakes up: when it is busy, every client latency it measures is inflated
    (the /healthz latencies are not: they are measured by a process of their own)."""
    while not state.stop.is_set():
        before = time.monotonic()
        await asyncio.sleep(period)
        state.loop_lags.append(max(0.0, time.monotonic() - before - period))


def http_client(base_url: str, **options: Any) -> httpx.AsyncClient:
    """A client of the server. Each load client has its own (one connection): httpcore's pool scans all its
    connections for every request, which made one pool shared by 200 clients this process's main CPU cost.
    verify=False: plain HTTP on loopback, and no CA bundle to load (~60 ms) per client."""
    limits = httpx.Limits(max_connections=4, max_keepalive_connections=1, keepalive_expiry=KEEPALIVE_EXPIRY)
    return httpx.AsyncClient(base_url=base_url, timeout=REQUEST_TIMEOUT, limits=limits, verify=False, **options)


async def client_loop(index: int, account: str, limited: bool, state: LoadState, seed: int, think: float) -> None:
    """A closed-loop client: send, wait for the whole answer, think a little, repeat until told to stop."""
    rng = random.Random(seed * 100_003 + index)
    kinds, weights = list(MIX), list(MIX.values())
    await asyncio.sleep(rng.uniform(0, think * 2))  # spread the first requests
    async with http_client(state.base_url) as client:
        while not state.stop.is_set():
            planned = plan_request(rng.choices(kinds, weights)[0], account, rng)
            record = RequestRecord(planned.kind, account, planned.route, planned.stream,
                                   planned.body.decode(errors="replace")[:200], planned.cache_key,
                                   sent=time.monotonic(), rate_limited=limited)
            state.records.append(record)
            try:
                await send(client, planned, record)
            except asyncio.CancelledError:
                record.abandoned = True
                raise
            # after a transport error (e.g. the server is gone) wait a little: no busy loop of failed connects
            await asyncio.sleep(TRANSPORT_ERROR_PAUSE if record.transport_error else rng.uniform(0, think * 2))


def health_poller(url: str, stop: Any, results: Any) -> None:
    """In a child process: GET `url` every HEALTH_INTERVAL until `stop` is set; send back the samples."""
    samples: list[tuple[float, float, int | None, str | None]] = []
    with httpx.Client(timeout=HEALTH_TIMEOUT, verify=False) as client:
        next_poll = time.monotonic()
        while not stop.is_set():
            began = time.monotonic()
            status, error = None, None
            try:
                status = client.get(url).status_code
            except httpx.HTTPError as exc:
                error = f"{type(exc).__name__}: {exc}"[:200]
            samples.append((began, time.monotonic() - began, status, error))
            next_poll = max(next_poll + HEALTH_INTERVAL, time.monotonic())
            time.sleep(max(0.0, next_poll - time.monotonic()))
    results.send(samples)


class HealthPolling:
    """The /healthz poller, in a process of its own (spawned: nothing of this process is inherited)."""

    def __init__(self, url: str) -> None:
        context = multiprocessing.get_context("spawn")
        self.stop_event = context.Event()
        self.receiver, sender = context.Pipe(duplex=False)
        self.process = context.Process(target=health_poller, args=(url, self.stop_event, sender), daemon=True)

    def start(self) -> None:
        self.process.start()

    def finish(self) -> list[tuple[float, float, int | None, str | None]]:
        self.stop_event.set()
        samples = self.receiver.recv() if self.receiver.poll(30) else []
        self.process.join(10)
        return samples


@dataclass(frozen=True)
class FaultWindow:
    """When the fault was injected and lifted (seconds since the start of the load)."""

    name: str
    down: float
    up: float
    probe: str = ""  # what a request made during the outage showed
    probe_confirms: bool | None = None  # whether it showed the server saw the outage (None: nothing to probe)


async def run_load(base_url: str, accounts: Sequence[str], args: argparse.Namespace,
                   fault: Fault | None) -> LoadResult:
    """Run the clients for args.duration seconds (and the fault, if any), then let the requests in flight finish
    for up to args.grace seconds."""
    async with http_client(base_url) as client:
        state = LoadState(base_url, client, time.monotonic(), asyncio.Event())
        tasks = []
        for i in range(args.clients):
            n = i % len(accounts)  # the first --limited-accounts accounts have the rate limit
            loop = client_loop(i, accounts[n], n < args.limited_accounts, state, args.seed, args.think)
            tasks.append(asyncio.create_task(loop))
        lag_watch = asyncio.create_task(watch_loop_lag(state))
        window = await drive_fault(fault, state, accounts[-1], args) if fault else None
        await asyncio.sleep(max(0.0, state.start + args.duration - time.monotonic()))
        state.stop.set()
        _, pending = await asyncio.wait(tasks, timeout=args.grace)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, lag_watch, return_exceptions=True)
        wall = time.monotonic() - state.start
    for record in state.records:
        record.sent -= state.start
        record.finished = None if record.finished is None else record.finished - state.start
    return LoadResult(state.records, window, wall, state.start, state.loop_lags)


async def drive_fault(fault: Fault, state: LoadState, account: str, args: argparse.Namespace) -> FaultWindow:
    """Inject the fault at --fault-start, probe the server halfway, lift it at --fault-end (fractions of the
    duration)."""
    start = state.start
    await asyncio.sleep(max(0.0, start + args.duration * args.fault_start - time.monotonic()))
    down = time.monotonic() - start
    await asyncio.to_thread(fault.inject)
    log(f"fault: {fault.name} down at {down:.1f} s")
    halfway = start + args.duration * (args.fault_start + args.fault_end) / 2
    await asyncio.sleep(max(0.0, halfway - time.monotonic()))
    probe, confirms = await fault.probe(state.client, account)
    await asyncio.sleep(max(0.0, start + args.duration * args.fault_end - time.monotonic()))
    up = time.monotonic() - start
    await asyncio.to_thread(fault.lift)
    log(f"fault: {fault.name} back at {up:.1f} s")
    return FaultWindow(fault.name, down, up, probe, confirms)


# ---------------------------------------------------------------------------------------------------------------
# The server, Redis, PostgreSQL


def log(message: str) -> None:
    print(f"[load] {message}", file=sys.stderr, flush=True)


def server_environment() -> dict[str, str]:
    """This process's environment without the operator's INT8SERVE_* settings (the kernel cache is kept)."""
    kept = {"INT8SERVE_CACHE"}
    return {k: v for k, v in os.environ.items() if not k.startswith("INT8SERVE_") or k in kept}


class ServerProcess:
    """`python -m int8serve serve` on a free port, its output in `<work>/server.log`."""

    def __init__(self, args: argparse.Namespace, work: Path, accounts: Sequence[str], redis_url: str | None,
                 database_url: str | None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = work / "server.log"
        self.data_dir = work / "data"
        tokens = work / "tokens.txt"
        tokens.write_text("".join(f"{token_of(a)}={a}\n" for a in accounts))
        self.command = serve_command(self.port, [
            "--model", str(args.model), "--host", "127.0.0.1", "--tokens-file", str(tokens), "--data-dir",
            str(self.data_dir), "--rpm", "0", "--max-queue", str(args.max_queue), "--shutdown-timeout",
            str(args.shutdown_timeout)])
        for account in accounts[:args.limited_accounts]:
            self.command += ["--account-rpm", f"{account}={args.limited_rpm}"]
        if args.server_threads:
            self.command += ["--threads", str(args.server_threads)]
        if redis_url:
            self.command += ["--redis-url", redis_url]
        if database_url:
            self.command += ["--database-url", database_url]
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 180.0) -> None:
        self.process = launch(self.command, self.log_path, server_environment(), REPO)
        try:
            wait_ready(self.url, self.process, timeout, self.log_path, interval=0.2)
        except RuntimeError as exc:
            raise SetupError(str(exc)) from exc

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: float) -> int | None:
        """SIGTERM, then wait; the exit status, or None when it had to be killed."""
        return None if self.process is None else stop_process(self.process, timeout)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


class SetupError(RuntimeError):
    """The run could not be set up (the server did not start; a BackendError: no Redis, no PostgreSQL): exit
    status 2."""


class Fault:
    """Something the script takes away mid-run and gives back."""

    name = "none"

    def inject(self) -> None:
        raise NotImplementedError

    def lift(self) -> None:
        raise NotImplementedError

    async def probe(self, client: httpx.AsyncClient, account: str) -> tuple[str, bool | None]:
        """A request during the outage that shows whether the server noticed it: (what it showed, whether it
        confirms the outage), or ("", None) when there is nothing to ask."""
        return "", None


class RedisOutage(Fault):
    """A `redis-server` of this run (nothing saved), stopped by `inject` and restarted by `lift`."""

    name = "redis"

    def __init__(self, work: Path) -> None:
        self.server = RedisServer(log_path=work / "redis.log")

    def inject(self) -> None:
        self.server.stop()

    def lift(self) -> None:
        self.server.start()


class PostgresOutage(Fault):
    """A TCP proxy of this run in front of PostgreSQL: `inject` closes every proxied connection and refuses new
    ones (accepts and closes them at once); `lift` lets new connections through again."""

    name = "postgres"

    def __init__(self, proxy: TcpProxy) -> None:
        self.proxy = proxy

    def inject(self) -> None:
        self.proxy.cut()

    def lift(self) -> None:
        self.proxy.restore()

    async def probe(self, client: httpx.AsyncClient, account: str) -> tuple[str, bool | None]:
        """The usage endpoint reads the ledger's database: while it is unreachable it answers 503, code 1002."""
        url = f"/client/v4/accounts/{account}/ai/usage"
        try:
            response = await client.get(url, headers={"Authorization": f"Bearer {token_of(account)}"})
        except httpx.HTTPError as exc:
            return f"GET {url}: {type(exc).__name__}", False
        code = error_code(response.content)
        return f"GET {url} → {response.status_code}/{code}", (response.status_code, code) == (503, 1002)


def with_key_prefix(url: str, prefix: str) -> str:
    """`url` with `?key_prefix=prefix` unless it names one already."""
    if "key_prefix=" in url:
        return url
    return url + ("&" if "?" in url else "?") + f"key_prefix={prefix}"


def delete_redis_keys(url: str) -> None:
    """Delete the keys of the key prefix `url` names, if any."""
    match = re.search(r"key_prefix=([^&]+)", url)
    if match:
        delete_keys(url, match.group(1))


def fetch_metrics(base_url: str) -> dict[str, float] | None:
    """The un-labelled samples of /metrics, or None when it does not answer 200 (e.g. it needs a token)."""
    try:
        response = httpx.get(base_url + "/metrics", timeout=10, verify=False)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    values: dict[str, float] = {}
    for line in response.text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*) ([0-9.eE+-]+|NaN|[+-]Inf)", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


# ---------------------------------------------------------------------------------------------------------------
# Checks (pure: records, health samples and ledger rows in, verdicts out)


@dataclass
class Check:
    name: str
    passed: bool
    summary: str
    details: list[str] = field(default_factory=list)


@dataclass
class Health:
    polls: int
    answered: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    max_at: float  # when the slowest poll was sent, seconds since the start of the load
    failures: list[str]

    @classmethod
    def of(cls, samples: Sequence[tuple[float, float, int | None, str | None]], start: float) -> Health:
        latencies = sorted(s[1] * 1000 for s in samples)
        failures = [f"t={s[0] - start:.2f}s: {s[3] or f'status {s[2]}'}" for s in samples if s[2] != 200]
        slowest = max(samples, key=lambda s: s[1], default=(start + math.nan, math.nan, None, None))
        return cls(len(samples), len(samples) - len(failures), percentile(latencies, 50), percentile(latencies, 99),
                   slowest[1] * 1000, slowest[0] - start, failures)


def examples(records: Iterable[RequestRecord]) -> list[str]:
    return [r.describe() for r in list(records)[:EXAMPLES]]


def check_no_5xx(records: Sequence[RequestRecord]) -> Check:
    bad = [r for r in records if r.status is not None and r.status >= 500]
    kinds = Counter(f"{r.kind} → {r.status}/{r.code}" for r in bad)
    summary = f"{len(bad)} answers with a 5xx status" + (f" ({_counts(kinds)})" if bad else "")
    return Check("no 5xx", not bad, summary, examples(bad))


def ledgered(records: Sequence[RequestRecord]) -> list[RequestRecord]:
    """The requests that must have exactly one ledger row: 200 answers, streams with 200 headers included."""
    return [r for r in records if r.got_200]


def check_ledger_rows(records: Sequence[RequestRecord], rows: Sequence[dict[str, Any]]) -> Check:
    by_id = {row["request_id"]: row for row in rows}
    expected = ledgered(records)
    no_id = [r for r in expected if not r.request_id]
    ids = Counter(r.request_id for r in expected if r.request_id)
    twice = [r for r in expected if r.request_id and ids[r.request_id] > 1]
    missing = [r for r in expected if r.request_id and r.request_id not in by_id]
    ends = Counter(r.stream_end or ("json" if not r.stream else "?") for r in missing)
    summary = (f"{len(expected)} answers with 200 headers, {len(expected) - len(missing) - len(no_id)} with their "
               f"ledger row; {len(missing)} missing" + (f" ({_counts(ends)})" if missing else "")
               + f", {len(twice)} with a request id given twice, {len(no_id)} without cf-ai-req-id")
    details = ([f"missing row: {d}" for d in examples(missing)] + [f"id twice: {d}" for d in examples(twice)]
               + [f"no cf-ai-req-id: {d}" for d in examples(no_id)])
    return Check("exactly one ledger row per 200", not (missing or twice or no_id), summary, details)


def expected_outcomes(record: RequestRecord) -> set[str]:
    if not record.stream or record.stream_end == "done":
        return {"ok"}
    if record.stream_end == "cut":
        return {"ok", "aborted"}
    return {"ok", "aborted", "error"}


def check_ledger_consistent(records: Sequence[RequestRecord], rows: Sequence[dict[str, Any]]) -> Check:
    by_id = {row["request_id"]: row for row in rows}
    wrong: list[str] = []
    for record in ledgered(records):
        row = by_id.get(record.request_id)
        if row is None:
            continue
        problems = []
        if row["account"] != record.account:
            problems.append(f"account {row['account']!r}")
        if row["outcome"] not in expected_outcomes(record):
            problems.append(f"outcome {row['outcome']!r}")
        if bool(row["cached"]) != (record.cache_status == "HIT"):
            problems.append(f"cached={bool(row['cached'])} but cf-aig-cache-status={record.cache_status}")
        if problems:
            wrong.append(f"{', '.join(problems)}: {record.describe()}")
    summary = f"{len(wrong)} rows whose account, outcome or cached flag contradicts the answer"
    return Check("ledger rows match their answers", not wrong, summary, wrong[:EXAMPLES])


def extra_rows(records: Sequence[RequestRecord], rows: Sequence[dict[str, Any]]) -> Counter[str]:
    """Ledger rows of no 200 answer, by what the client saw (informational: admitted requests that then failed,
    or requests the client gave up on, are metered too)."""
    answered = {r.request_id: r for r in records if r.request_id}
    reasons: Counter[str] = Counter()
    ok_ids = {r.request_id for r in ledgered(records)}
    for row in rows:
        if row["request_id"] in ok_ids:
            continue
        record = answered.get(row["request_id"])
        reasons[f"{record.status}/{record.code} ({row['outcome']})" if record else f"unseen ({row['outcome']})"] += 1
    return reasons


def refusal_problem(record: RequestRecord, limited: set[str]) -> str | None:
    """Why this non-200 answer is not an expected refusal, or None when it is."""
    if record.status is None or record.status == 200 or record.status >= 500:
        return None  # transport errors and 5xx have checks of their own
    if record.invalid:
        return None if 400 <= record.status < 500 and record.status not in (408, 429) else "invalid request"
    if record.status != 429:
        return "valid request refused with a status other than 429"
    if record.code == 3040 or (record.code == 3021 and record.account in limited):
        return None
    return "429 with an unexpected code (3021 only for the rate-limited accounts, 3040 for capacity)"


def check_refusals(records: Sequence[RequestRecord], limited: set[str]) -> Check:
    bad = [(r, why) for r in records if (why := refusal_problem(r, limited))]
    valid_200 = [r for r in records if r.invalid and r.got_200]
    codes = Counter(f"{r.kind}: {r.status}/{r.code}" for r, _ in bad)
    summary = (f"{len(bad)} unexpected refusals" + (f" ({_counts(codes)})" if bad else "")
               + f"; {len(valid_200)} invalid requests answered 200")
    details = [f"{why}: {r.describe()}" for r, why in bad[:EXAMPLES]]
    details += [f"invalid answered 200: {d}" for d in examples(valid_200)]
    return Check("refusals only 429 (3021/3040) or 4xx for invalid input", not (bad or valid_200), summary, details)


def check_streams_and_transport(records: Sequence[RequestRecord]) -> Check:
    broken = [r for r in records if r.got_200 and r.stream and r.stream_end in ("error", "truncated")]
    transport = [r for r in records if r.transport_error and not (r.got_200 and r.stream_end == "truncated")]
    unfinished = [r for r in records if r.abandoned]
    malformed = [r for r in records if r.malformed]
    ends = Counter(f"{r.stream_end}/{r.code}" for r in broken)
    summary = (f"{len(broken)} streams ended by an error frame or truncated"
               + (f" ({_counts(ends)})" if broken else "")
               + f", {len(transport)} transport errors, {len(unfinished)} requests unfinished after the grace period, "
               f"{len(malformed)} malformed 200 bodies")
    details = (examples(broken) + examples(transport) + examples(unfinished)
               + [f"{r.malformed}: {r.describe()}" for r in malformed[:EXAMPLES]])
    return Check("whole answers: streams end with [DONE], no transport error",
                 not (broken or transport or unfinished or malformed), summary, details)


def cross_account_hits(records: Sequence[RequestRecord]) -> list[RequestRecord]:
    """Cache hits for an account that had not itself got that body's answer generated (a MISS, complete) before
    the hit's answer arrived: the answer came from another account's entry."""
    own_misses: dict[tuple[str, str], list[float]] = {}
    for r in records:
        if r.cache_key and r.got_200 and r.cache_status == "MISS" and r.stream_end in (None, "done"):
            own_misses.setdefault((r.cache_key, r.account), []).append(r.sent)
    return [r for r in records
            if r.cache_key and r.got_200 and r.cache_status == "HIT" and r.finished is not None
            and not any(sent < r.finished for sent in own_misses.get((r.cache_key, r.account), []))]


def check_headers(records: Sequence[RequestRecord]) -> Check:
    lacking = [r for r in records if r.missing_headers]
    which = Counter(f"{r.status} without {name}" for r in lacking for name in r.missing_headers)
    summary = f"{len(lacking)} answers without a header the README promises" + (f" ({_counts(which)})" if which
                                                                                   else "")
    return Check("contract headers on every answer", not lacking, summary, examples(lacking))


def check_cache_isolation(records: Sequence[RequestRecord]) -> Check:
    foreign = cross_account_hits(records)
    hits = sum(1 for r in records if r.got_200 and r.cache_status == "HIT")
    summary = f"{hits} cache hits, {len(foreign)} of them served from another account's entry"
    return Check("cache hits only from the account's own entries", not foreign, summary, examples(foreign))


def check_health(health: Health) -> Check:
    summary = (f"{health.answered} of {health.polls} polls answered 200; p50 {health.p50_ms:.1f} ms, "
               f"p99 {health.p99_ms:.1f} ms, max {health.max_ms:.1f} ms")
    return Check("/healthz answered throughout", health.polls > 0 and not health.failures, summary,
                 health.failures[:EXAMPLES])


def tracebacks(log_text: str) -> list[str]:
    """The line before each traceback of the server log (what failed) and the traceback's last line (why)."""
    lines = log_text.splitlines()
    found = []
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last)"):
            end = next((j for j in range(i + 1, len(lines)) if not lines[j].startswith((" ", "\t"))), len(lines) - 1)
            found.append(f"{lines[i - 1][:200] if i else ''} … {lines[end][:200]}")
    return found


def check_server(server: ServerOutcome) -> Check:
    found = tracebacks(server.log_text)
    status = server.exit_status
    exit_text = "killed after the drain timeout" if status is None else f"exit status {status}"
    spool = "absent" if server.spool_bytes is None else f"{server.spool_bytes} bytes"
    summary = (f"{'up' if server.alive_at_end else 'DOWN'} at the end of the load; SIGTERM: {exit_text}; ledger "
               f"spool after exit: {spool}; {len(found)} tracebacks in its log")
    passed = server.alive_at_end and status == 0 and not server.spool_bytes and not found
    return Check("server up, clean exit, spool flushed, no traceback", passed, summary, found[:EXAMPLES])


def check_coverage(records: Sequence[RequestRecord], limited: set[str]) -> Check:
    """The load exercised what the checks are about (otherwise passing them proves little)."""
    wanted = {
        "200 answers": sum(r.got_200 for r in records),
        "streams read to [DONE]": sum(r.stream_end == "done" for r in records),
        "streams cut by the client": sum(r.stream_end == "cut" for r in records),
        "cache hits": sum(r.got_200 and r.cache_status == "HIT" for r in records),
        "OpenAI-route 200s": sum(r.route == "openai" and r.got_200 for r in records),
        "invalid requests answered": sum(r.invalid and r.status is not None for r in records),
    }
    if limited:
        wanted["3021 for the rate-limited accounts"] = sum(r.code == 3021 for r in records)
    missing = [name for name, count in wanted.items() if count == 0]
    summary = ", ".join(f"{name}: {count}" for name, count in wanted.items())
    return Check("the load exercised every path", not missing, summary, [f"none: {m}" for m in missing])


def during(records: Sequence[RequestRecord], window: FaultWindow) -> list[RequestRecord]:
    """Requests sent while the fault was on."""
    return [r for r in records if window.down <= r.sent < window.up]


def admitted(record: RequestRecord) -> bool:
    """Whether this request counted against its account's rate limit: every valid request that was not refused by
    the limit itself (answers, cache hits, cut streams, and admitted requests that then failed, 3040 included)."""
    return not record.invalid and record.status is not None and record.code not in (3021, 3036)


def rate_limit_excess(records: Sequence[RequestRecord], limited: set[str], rpm: int,
                      until: float | None = None) -> list[str]:
    """Limited accounts that certainly had more than `rpm` admissions in a moving 60-second window (among the
    requests answered before `until`).

    The client does not know when the server admitted a request, only that it was between sending it and reading
    its answer (seconds apart on a busy machine). Requests sent at or after t whose answers were read before t + 60
    were all admitted within less than 60 s, so all were in the window at the last admission: more than `rpm` of
    them is a breach for certain. (The count is a lower bound: a breach it misses is possible, a false one is not.)"""
    excess = []
    for account in sorted(limited):
        spans = sorted((r.sent, r.finished) for r in records if r.account == account and admitted(r)
                       and r.finished is not None and (until is None or r.finished < until))
        for i, (start, _) in enumerate(spans):
            within = [finished for _, finished in spans[i:] if finished < start + 60]
            if len(within) > rpm:
                excess.append(f"{account}: {len(within)} requests admitted between t={start:.2f}s and "
                              f"t={max(within):.2f}s (limit {rpm} a minute)")
                break
    return excess


def check_rate_limits(records: Sequence[RequestRecord], limited: set[str], rpm: int,
                      until: float | None = None) -> Check:
    excess = rate_limit_excess(records, limited, rpm, until)
    refused = sum(r.code == 3021 for r in records)
    scope = "" if until is None else f" (requests answered before {until:.1f} s: the restarted Redis is empty)"
    summary = (f"{len(limited)} accounts at {rpm}/min: {refused} refusals 3021, {len(excess)} accounts admitted more "
               f"than their limit{scope}")
    return Check("rate limits held", not excess, summary, excess)


def check_redis_fallback(records: Sequence[RequestRecord], window: FaultWindow,
                         metrics: dict[str, float] | None) -> Check:
    outage = during(records, window)
    served = sum(r.got_200 for r in outage)
    refused = sum(r.code == 3021 for r in outage)
    outages = None if metrics is None else metrics.get("int8serve_fallback_outages_total")
    summary = (f"while Redis was down ({window.down:.1f}–{window.up:.1f} s): {served} answers 200, {refused} "
               f"refusals 3021; /metrics fallback outages: {'not readable' if outages is None else f'{outages:g}'}")
    failed = []
    if not served:
        failed.append("no 200 answer while Redis was down")
    if outages is not None and outages < 1:
        failed.append("the server did not count a Redis outage")
    return Check("Redis lost: served, limits fall back in-process", not failed, summary, failed)


def check_postgres_outage(records: Sequence[RequestRecord], window: FaultWindow) -> Check:
    outage = during(records, window)
    served = [r for r in outage if r.got_200 and r.finished is not None and r.finished < window.up]
    summary = (f"while PostgreSQL was unreachable ({window.down:.1f}–{window.up:.1f} s): {len(outage)} requests "
               f"sent, {len(served)} answered 200 before it came back; the server saw the outage: {window.probe} "
               "(503/1002 expected)")
    failed = [] if served else ["no 200 answer while PostgreSQL was unreachable"]
    if not window.probe_confirms:
        failed.append(f"the usage endpoint did not show the outage ({window.probe}): was the database cut?")
    return Check("PostgreSQL lost: answers keep coming", not failed, summary, failed)


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{key}: {n}" for key, n in counter.most_common())


# ---------------------------------------------------------------------------------------------------------------
# Report


@dataclass
class RunReport:
    config: dict[str, Any]
    load: LoadResult
    health: Health
    ledger_rows: int
    extra_rows: dict[str, int]
    checks: list[Check]
    server_command: list[str]
    machine: str
    date: str

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def records(self) -> list[RequestRecord]:
        return self.load.records

    def to_json(self) -> dict[str, Any]:
        fault = self.load.window
        return {
            "config": self.config, "wall": self.load.wall, "fault": asdict(fault) if fault else None,
            "requests": len(self.records), "by_status": status_counts(self.records),
            "by_kind": kind_table(self.records), "latency_ms": latency_table(self.records),
            "client_loop_lag_ms": lag_figures(self.load.loop_lags), "health": asdict(self.health),
            "ledger_rows": self.ledger_rows, "extra_rows": self.extra_rows,
            "checks": [asdict(c) for c in self.checks], "passed": self.passed, "machine": self.machine,
            "date": self.date, "server_command": self.server_command,
        }


def status_key(record: RequestRecord) -> str:
    if record.status is None:
        return "abandoned" if record.abandoned else "no answer (transport error)"
    if record.status == 200:
        return "200 stream " + (record.stream_end or "?") if record.stream else "200"
    return f"{record.status} code {record.code}"


def status_counts(records: Sequence[RequestRecord]) -> dict[str, int]:
    return dict(Counter(status_key(r) for r in records).most_common())


def kind_table(records: Sequence[RequestRecord]) -> dict[str, dict[str, int]]:
    table: dict[str, Counter[str]] = {}
    for r in records:
        kind = "invalid" if r.invalid else r.kind
        table.setdefault(kind, Counter())[status_key(r)] += 1
    return {kind: dict(counts.most_common()) for kind, counts in sorted(table.items())}


def latency_table(records: Sequence[RequestRecord]) -> dict[str, dict[str, float]]:
    """Client-side latency (sent → whole answer read, or the cut) by answer, in ms: count, p50, p99, max."""
    groups: dict[str, list[float]] = {}
    for r in records:
        if r.finished is not None and r.status is not None:
            groups.setdefault(status_key(r), []).append((r.finished - r.sent) * 1000)
    table = {}
    for key, values in sorted(groups.items(), key=lambda item: -len(item[1])):
        values.sort()
        table[key] = {"count": len(values), "p50": percentile(values, 50), "p99": percentile(values, 99),
                      "max": values[-1]}
    return table


def lag_figures(lags: Sequence[float]) -> dict[str, float]:
    ordered = sorted(lag * 1000 for lag in lags)
    return {"p50": percentile(ordered, 50), "p99": percentile(ordered, 99), "max": ordered[-1] if ordered else math.nan}


def report_lines(report: RunReport) -> list[str]:
    """The figures as Markdown (printed, and the body of the docs section)."""
    records, c = report.records, report.config
    rate = len(records) / c["duration"] if c["duration"] else 0.0
    lines = [f"{len(records)} requests in {c['duration']:g} s ({rate:.0f}/s; the last answers took "
             f"{report.load.wall - c['duration']:.1f} s more), {c['clients']} clients over {c['accounts']} accounts.",
             "", "| request kind | sent | answers |", "|---|---|---|"]
    for kind, counts in kind_table(records).items():
        lines.append(f"| {kind} | {sum(counts.values())} | {_counts(Counter(counts))} |")
    lines += ["", "| answer | count | latency p50 / p99 / max, ms |", "|---|---|---|"]
    lines += [f"| {key} | {row['count']} | {row['p50']:.0f} / {row['p99']:.0f} / {row['max']:.0f} |"
              for key, row in latency_table(records).items()]
    lines += [f"| {key} | {n} | — |" for key, n in status_counts(records).items() if key.startswith(("no ", "aban"))]
    invalid = Counter(f"{r.kind.removeprefix('invalid:')} → {r.status}/{r.code}" for r in records if r.invalid)
    lag = lag_figures(report.load.loop_lags)
    lines += ["", "Invalid requests, by kind → status/code: " + _counts(invalid) + ".", "",
              f"The clients' own event loop woke up late by p50 {lag['p50']:.1f} ms, p99 {lag['p99']:.1f} ms, max "
              f"{lag['max']:.1f} ms: the latencies above include that (and the CPU the clients take from the "
              "server); the /healthz ones below do not (polled from a process of their own)."]
    lines += ["", *health_lines(report.health), "", ledger_line(report)]
    if report.load.window:
        w = report.load.window
        lines += ["", f"Fault: {w.name} down at {w.down:.1f} s, back at {w.up:.1f} s"
                      + (f"; halfway through, {w.probe}." if w.probe else ".")]
    lines += ["", "| check | result | figures |", "|---|---|---|"]
    lines += [f"| {ch.name} | {'pass' if ch.passed else '**FAIL**'} | {ch.summary} |" for ch in report.checks]
    return lines


def health_lines(h: Health) -> list[str]:
    return [f"`/healthz` every {HEALTH_INTERVAL * 1000:.0f} ms: {h.answered} of {h.polls} polls answered; latency "
            f"p50 {h.p50_ms:.1f} ms, p99 {h.p99_ms:.1f} ms, max {h.max_ms:.1f} ms (at {h.max_at:.1f} s)."]


def ledger_line(report: RunReport) -> str:
    extra = (f"; {sum(report.extra_rows.values())} rows of other requests ({_counts(Counter(report.extra_rows))})"
             if report.extra_rows else "")
    return (f"Ledger: {report.ledger_rows} rows read after SIGTERM, checked against {len(ledgered(report.records))} "
            f"answers with 200 headers{extra}.")


def failure_lines(report: RunReport) -> list[str]:
    lines = []
    for check in report.checks:
        if not check.passed:
            lines.append(f"FAILED: {check.name}: {check.summary}")
            lines += [f"    {d}" for d in check.details]
    return lines


def load_average() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def section_label(fault: str | None) -> str:
    return "load" if fault is None else f"load-{fault}-fault"


def build_section(report: RunReport, command: str) -> str:
    c = report.config
    title = {"load": "Load", "redis": "Load with Redis stopped and restarted",
             "postgres": "Load with PostgreSQL cut and restored"}[c["fault"] or "load"]
    limited = c["limited_accounts"]
    verdict = "**All checks passed.**" if report.passed else (
        "**Checks failed:** " + "; ".join(ch.name for ch in report.checks if not ch.passed) + ".")
    lines = [f"## {title}: {c['clients']} clients, {c['duration']:g} s "
             f"(benchmarks/load.py)", "",
             f"- Command: `{command}`", f"- Date: {report.date}",
             f"- Machine: {report.machine}; shared with other engineers, so absolute latencies are noisy.",
             f"- Server: `int8serve serve`, model {Path(c['model']).parent.name or c['model']}, the card's 4 slots, "
             f"queue {c['max_queue']}; {c['accounts']} accounts, {limited} of them at {c['limited_rpm']} requests/min, "
             f"the others unlimited (`--rpm 0`); response cache on; ledger in {c['ledger']}"
             + (f"; Redis {c['redis']}" if c["redis"] else "") + ".",
             "- Mix per request: " + ", ".join(f"{k} {v}%" for k, v in MIX.items())
             + f"; think time 0–{2 * c['think']:g} s between a client's requests.",
             f"- Machine load average (1 / 5 / 15 min) at the end of the load: {c['load_average']} (this run's "
             "server and clients included).",
             "- The script starts the server, runs the clients, stops the server with SIGTERM, reads its usage ledger "
             "and checks what the table at the end lists (the rules: `python -m benchmarks.load --help`).", "",
             verdict, "", *report_lines(report), ""]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------------------
# One run


@dataclass
class Setup:
    """What a run starts besides the server, and how to undo it."""

    redis_url: str | None = None
    database_url: str | None = None
    ledger: str = "SQLite (the data dir)"
    redis: str | None = None
    fault: Fault | None = None
    schema: PostgresSchema | None = None
    cleanups: list[Callable[[], None]] = field(default_factory=list)

    def cleanup(self) -> None:
        for undo in reversed(self.cleanups):
            try:
                undo()
            except Exception as exc:  # cleaning up must not hide the run's result
                log(f"cleanup failed: {exc}")


def prepare(args: argparse.Namespace, work: Path) -> Setup:
    setup = Setup()
    if args.fault == "redis":
        outage = RedisOutage(work)
        outage.server.start()
        setup.cleanups.append(outage.server.stop)
        setup.fault, setup.redis_url = outage, outage.server.url
        setup.redis = f"redis-server of this run on port {outage.server.port}"
    elif args.redis_url:
        setup.redis_url = with_key_prefix(args.redis_url, f"int8serve-load-{uuid.uuid4().hex[:12]}")
        setup.cleanups.append(lambda: delete_redis_keys(setup.redis_url or ""))
        setup.redis = "given by --redis-url"
    if args.fault == "postgres" or args.database_url:
        schema = PostgresSchema(args.database_url or DEFAULT_POSTGRES, prefix="int8serve_load_").create()
        setup.schema = schema
        setup.cleanups.append(schema.drop)
        setup.database_url = schema.server_url()
        setup.ledger = f"PostgreSQL (schema {schema.name}, dropped after the run)"
        if args.fault == "postgres":
            proxy = TcpProxy((schema.url.host or "127.0.0.1", schema.url.port or 5432)).start()
            setup.cleanups.append(proxy.stop)
            setup.fault, setup.database_url = PostgresOutage(proxy), schema.server_url(proxy.port)
            setup.ledger += f", through this script's TCP proxy on port {proxy.port}"
    return setup


def ledger_rows(setup: Setup, server: ServerProcess) -> list[dict[str, Any]]:
    if setup.schema is not None:
        return setup.schema.rows()
    path = server.data_dir / "usage.sqlite3"
    if not path.exists():
        return []
    return read_rows(f"sqlite:///{path}", LEDGER_TABLE)


@dataclass
class ServerOutcome:
    """How the server went through the run, seen from outside."""

    alive_at_end: bool
    exit_status: int | None
    log_text: str
    metrics: dict[str, float] | None
    ledger: list[dict[str, Any]]
    spool_bytes: int | None  # the ledger spool after exit: empty once every row is in the database


def run(args: argparse.Namespace, work: Path) -> RunReport:
    accounts = account_names(args.accounts)
    setup = prepare(args, work)
    server = ServerProcess(args, work, accounts, setup.redis_url, setup.database_url)
    try:
        log(f"starting the server on port {server.port} (log: {server.log_path})")
        server.start()
        health = HealthPolling(server.url + "/healthz")
        health.start()
        log(f"{args.clients} clients for {args.duration:g} s" + (f", fault {args.fault}" if args.fault else ""))
        load = asyncio.run(run_load(server.url, accounts, args, setup.fault))
        load_avg = load_average()
        health_figures = Health.of(health.finish(), load.start)
        alive = server.alive()
        metrics = fetch_metrics(server.url) if alive else None
        log("load done; SIGTERM to the server")
        exit_status = server.stop(args.shutdown_timeout + 60)
        spool = server.data_dir / "ledger-spool.jsonl"
        outcome = ServerOutcome(alive, exit_status, server.log_text(), metrics, ledger_rows(setup, server),
                                spool.stat().st_size if spool.exists() else None)
    finally:
        server.stop(10)
        setup.cleanup()
    checks = all_checks(load, health_figures, outcome, set(accounts[:args.limited_accounts]), args)
    config = {"clients": args.clients, "duration": args.duration, "accounts": args.accounts,
              "limited_accounts": args.limited_accounts, "limited_rpm": args.limited_rpm, "think": args.think,
              "max_queue": args.max_queue, "fault": args.fault, "model": str(args.model), "ledger": setup.ledger,
              "redis": setup.redis, "seed": args.seed, "load_average": load_avg}
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return RunReport(config, load, health_figures, len(outcome.ledger), dict(extra_rows(load.records, outcome.ledger)),
                     checks, server.command, machine_description(), date)


def all_checks(load: LoadResult, health: Health, server: ServerOutcome, limited: set[str],
               args: argparse.Namespace) -> list[Check]:
    records, window, rows = load.records, load.window, server.ledger
    # a restarted Redis (nothing saved) starts with empty windows: the limit starts again then
    limits_until = window.up if window and args.fault == "redis" else None
    checks = [
        check_no_5xx(records),
        check_ledger_rows(records, rows),
        check_ledger_consistent(records, rows),
        check_refusals(records, limited),
        check_streams_and_transport(records),
        check_headers(records),
        check_cache_isolation(records),
        check_health(health),
        check_server(server),
        check_rate_limits(records, limited, args.limited_rpm, limits_until),
        check_coverage(records, limited),
    ]
    if window and args.fault == "redis":
        checks.append(check_redis_fallback(records, window, server.metrics))
    if window and args.fault == "postgres":
        checks.append(check_postgres_outage(records, window))
    return checks


# ---------------------------------------------------------------------------------------------------------------
# Command line


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """The module docstring as is, and the default of every option that has one."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False):
            return action.help
        return super()._get_help_string(action)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="benchmarks/load.py", formatter_class=HelpFormatter, description=__doc__,
        epilog="exit status: 0 all checks passed, 1 a check failed (listed), 2 the run could not be set up")
    add = parser.add_argument
    add("--model", metavar="PATH", type=Path, default=DEFAULT_MODEL, help="model folder")
    add("--clients", metavar="N", type=int, default=200, help="concurrent clients")
    add("--duration", metavar="SECONDS", type=float, default=60.0, help="seconds of load")
    add("--accounts", metavar="N", type=int, default=10, help="accounts the clients are spread over")
    add("--limited-accounts", metavar="N", type=int, default=3,
        help="how many accounts get a rate limit (--account-rpm); the others are unlimited (--rpm 0)")
    add("--limited-rpm", metavar="N", type=int, default=10, help="their requests per minute")
    add("--think", metavar="SECONDS", type=float, default=0.1,
        help="mean pause of a client between two requests (uniform in 0..2x)")
    add("--max-queue", metavar="N", type=int, default=32, help="the server's --max-queue")
    add("--shutdown-timeout", metavar="SECONDS", type=float, default=30.0, help="the server's --shutdown-timeout")
    add("--server-threads", metavar="N", type=int, help="the server's --threads (default: its own)")
    add("--redis-url", metavar="URL", help="serve with this Redis (a key prefix of this run is added)")
    add("--database-url", metavar="URL",
        help="the ledger in this PostgreSQL database (in a schema of this run); with --fault postgres the upstream "
             f"of the proxy (default then: {DEFAULT_POSTGRES})")
    add("--fault", choices=["redis", "postgres"],
        help="redis: a redis-server of this run, stopped and restarted; postgres: a TCP proxy in front of "
             "PostgreSQL, cut and restored")
    add("--fault-start", metavar="FRACTION", type=float, default=0.3, help="fault on at this fraction of the duration")
    add("--fault-end", metavar="FRACTION", type=float, default=0.65, help="fault off at this fraction of the duration")
    add("--grace", metavar="SECONDS", type=float, default=30.0,
        help="how long the requests in flight at the end may take to finish")
    add("--seed", metavar="N", type=int, default=0, help="seed of the clients' choices")
    add("--json", metavar="FILE", type=Path, help="write the report as JSON to this file")
    add("--records", metavar="FILE", type=Path, help="write every request's record to this file (JSON lines)")
    add("--write", metavar="FILE", type=Path,
        help="replace this run's section of this Markdown file (docs/benchmarks.md)")
    add("--keep", action="store_true", help="keep the work folder (server log, ledger) even when every check passed")
    args = parser.parse_args(argv)
    if args.fault == "redis" and args.redis_url:
        parser.error("--fault redis starts its own redis-server: leave out --redis-url")
    if not 0 <= args.fault_start < args.fault_end <= 1:
        parser.error("expected 0 <= --fault-start < --fault-end <= 1")
    if not 0 <= args.limited_accounts <= args.accounts or args.clients < 1 or args.duration <= 0:
        parser.error("expected --clients >= 1, --duration > 0 and 0 <= --limited-accounts <= --accounts")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="int8serve-load-"))
    try:
        report = run(args, work)
    except (SetupError, BackendError) as exc:
        log(f"cannot run: {exc}")
        if any(work.iterdir()):
            log(f"work folder kept: {work}")
        else:
            work.rmdir()
        return 2
    print("\n".join(report_lines(report)))
    if args.json:
        args.json.write_text(json.dumps(report.to_json(), indent=1, default=str))
    if args.records:
        args.records.write_text("".join(json.dumps(asdict(r)) + "\n" for r in report.records))
    if args.write:
        label = section_label(args.fault)
        shown = [arg for arg in argv if arg != "--keep"]
        command = display_command("load", shown, hidden=("--json", "--records"))
        write_section(args.write, build_section(report, command), "load.py", label)
        log(f"wrote the section '{label}' of {args.write}")
    if report.passed and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    else:
        log(f"work folder kept (server log, data dir): {work}")
    if not report.passed:
        print("\n".join(failure_lines(report)), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
