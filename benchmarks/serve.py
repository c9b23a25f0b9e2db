"""Serving benchmark: what the HTTP path (Workers AI `/ai/run` streaming) costs on top of the engine (issue #5).

N concurrent streaming clients (1, 4, 8, 16 by default) drive a running `int8serve serve`; each is a closed loop
that sends its next request when the previous stream is done. Measured as vLLM's `bench serve` defines it:

- TTFT: request sent → first token frame (`data: {"response": ...}`); queueing for a slot included;
- ITL: the gaps between successive token frames of a request (all requests' gaps pooled);
- TPOT: (e2e − TTFT) / (output tokens − 1) per request with more than one output token;
- e2e: request sent → end of the stream (`data: [DONE]`);
- request throughput = completed requests / wall time; output throughput = output tokens / wall time;
- output tokens come from the stream's final usage frame, not from counting frames; 429s (3021 rate limit, 3040
  capacity) are counted apart and are not completed requests.

The same generation (same prompt token ids, same max_tokens, greedy) is then timed through the engine alone, in
this process (`Engine.submit` / `events()`, the same slots, context, queue and prefill chunk as `serve` gives it,
the same number of torch threads, loaded in a worker thread as `serve` loads it: see `load_engine`), so that the
HTTP layer's overhead is a same-run ratio: HTTP TPOT / engine TPOT. The goal of the issue: the HTTP path adds at
most 5% to TPOT.

The server and the in-process engine never run at the same time (2 cores): a round measures every client count
through the server, stops it, then through the engine (rounds alternate which goes first). Before each
measurement the script waits for other processes to leave the CPUs (benchmarks/machine.py's QuietWaiter) and
measures again when they came back meanwhile; rounds that others disturbed anyway are left out of the pooled
results when another round was quiet. Each measurement starts with an untimed warm-up of N requests.

The server is started by the script (a free port, `--rpm 0 --no-cache`: no rate limit, no response cache, so every
request generates; a queue of 64 so that 8 and 16 clients wait for the card's 4 slots instead of getting 3040),
or given with --url/--token/--account (then make it serve --model with --threads, --max-queue and --prefill-chunk
equal to this script's, or the comparison is not like for like).

    .venv/bin/python -m benchmarks.serve --model ../shared/models/stories260K/hf --clients 1 2 --max-tokens 8 \\
        --requests 1 --rounds 1 --wait-quiet 0                        # smoke run, ~15 s
    .venv/bin/python -m benchmarks.serve --model ../shared/models/stories260K/hf --rounds 3 \\
        --write docs/benchmarks.md                   # ~9 minutes, longer while the machine is busy
    .venv/bin/python -m benchmarks.serve --make-7b data/llama2-7b-shape-int8   # once: 7.1 GB, ~30 s
    .venv/bin/python -m benchmarks.serve --model data/llama2-7b-shape-int8 --clients 1 4 8 16 \\
        --max-tokens 32 32 16 16 --requests 2 1 1 1 --rounds 1 --write docs/benchmarks.md   # ~10 minutes

--write replaces this model's section (`<!-- benchmarks/serve.py LABEL: begin -->`) of the Markdown file and keeps
the rest. The 7B-shape model (random int8 weights, built by benchmarks/engine.py's build_random_int8_model) uses
the Llama 2 SentencePiece tokenizer (32000 pieces, ../shared/models/llama2-tokenizer); its output is meaningless,
its speed is the 7B's. It peaks at ~12 GB resident (weights + a 4-slot KV cache of 2048 positions), once in the
server and once in this process, never both at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import gc
import json
import math
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

from benchmarks.common import (
    display_command,
    error_code,
    free_port,
    parse_frame,
    percentile,
    running_server,
    wait_ready,
    write_section,
)
from benchmarks.engine import LLAMA2_7B, build_random_int8_model
from benchmarks.machine import QUIET, CpuShares, NoWait, QuietWaiter, least_contended, log, machine_facts
from int8serve.catalog.registry import Catalog
from int8serve.engine.chat_template import render_prompt
from int8serve.engine.config import ModelConfig, config_from_hf, read_json
from int8serve.engine.loader import LoadedModel, detect_format, find_tokenizer, load_model, save_int8_checkpoint
from int8serve.engine.model import Transformer
from int8serve.engine.model_files import missing_tokenizer
from int8serve.engine.sampling_params import SamplingParams
from int8serve.engine.scheduler import Engine, GenerationRequest, QueueFullError
from int8serve.engine.tokenizer import Tokenizer
from int8serve.server import warm_up_thread_pool

REPO = Path(__file__).resolve().parents[1]
MODEL_NAME = "@cf/meta/llama-2-7b-chat-int8"
DEFAULT_CLIENTS = [1, 4, 8, 16]
DEFAULT_PROMPT = "Once upon a time"
GOAL_TPOT_OVERHEAD = 0.05  # the goal: the HTTP path adds at most 5% to TPOT
WARMUP_TOKENS = 4  # max_tokens of the untimed warm-up requests
LLAMA2_TOKENIZER = REPO.parent / "shared" / "models" / "llama2-tokenizer" / "tokenizer.model"
HTTP, ENGINE = "HTTP", "engine"


# ---------------------------------------------------------------------------------------------------------------
# Metrics (pure): one request's timestamps, and a measurement's summaries


@dataclass
class RequestRecord:
    """One request as a client saw it; times in seconds (time.perf_counter)."""

    sent: float
    token_times: list[float]  # arrival of each token frame (HTTP) or each event with text (engine)
    done: float  # end of the stream (`[DONE]`, or the engine's final event), or of the refusal
    output_tokens: int  # from the final usage frame / the final event
    status: str = "ok"  # "ok", "rejected" (429), "error"
    error_code: int | None = None
    prompt_tokens: int = 0

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.sent if self.token_times else None

    @property
    def e2e(self) -> float:
        return self.done - self.sent

    @property
    def tpot(self) -> float | None:
        """(e2e − TTFT) / (output tokens − 1), vLLM's time per output token after the first."""
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times, self.token_times[1:], strict=False)]


@dataclass(frozen=True)
class Summary:
    mean: float
    p50: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        if not values:
            return cls(math.nan, math.nan, math.nan)
        return cls(statistics.fmean(values), percentile(values, 50), percentile(values, 99))


@dataclass
class LevelResult:
    """One path (HTTP or engine) at one client count: every request, the wall time, and the CPU shares."""

    path: str
    clients: int
    max_tokens: int
    records: list[RequestRecord]
    wall: float  # first request sent → last stream done
    other_load: float = 0.0  # share of the CPUs used by other processes (neither this one nor the server)
    own_load: float = 0.0  # this process: the clients (HTTP) or the clients + the engine (engine)
    server_load: float = 0.0
    rounds: int = 1  # rounds pooled into this result
    rounds_measured: int = 1  # rounds measured (the disturbed ones left out of `rounds`)

    @property
    def completed(self) -> list[RequestRecord]:
        return [r for r in self.records if r.status == "ok"]

    @property
    def rejected(self) -> int:
        return sum(r.status == "rejected" for r in self.records)

    @property
    def errors(self) -> int:
        return sum(r.status == "error" for r in self.records)

    @property
    def output_tokens(self) -> int:
        return sum(r.output_tokens for r in self.completed)

    @property
    def request_throughput(self) -> float:
        return len(self.completed) / self.wall if self.wall > 0 else math.nan

    @property
    def output_throughput(self) -> float:
        return self.output_tokens / self.wall if self.wall > 0 else math.nan

    @property
    def ttft(self) -> Summary:
        return Summary.of([r.ttft for r in self.completed if r.ttft is not None])

    @property
    def tpot(self) -> Summary:
        return Summary.of([r.tpot for r in self.completed if r.tpot is not None])

    @property
    def itl(self) -> Summary:
        return Summary.of([gap for r in self.completed for gap in r.itls])

    @property
    def e2e(self) -> Summary:
        return Summary.of([r.e2e for r in self.completed])

    @property
    def rejection_codes(self) -> Counter[int]:
        return Counter(r.error_code for r in self.records if r.status == "rejected" and r.error_code is not None)


def pool(results: Sequence[LevelResult], disturbed: float = QUIET) -> LevelResult:
    """The rounds of one (path, client count) as one measurement: all requests, the summed wall time.

    Rounds during which other processes used `disturbed` or more of the CPUs are left out when another round was
    quiet (on 2 cores a busy neighbour can slow a 2-thread engine tenfold); else the least disturbed round is used.
    """
    quiet = [r for r in results if r.other_load < disturbed]
    used = quiet or [min(results, key=lambda r: r.other_load)]
    first = used[0]
    total = sum(r.wall for r in used)

    def weighted(name: str) -> float:
        return sum(getattr(r, name) * r.wall for r in used) / total if total > 0 else 0.0

    return LevelResult(first.path, first.clients, first.max_tokens, [rec for r in used for rec in r.records], total,
                       other_load=max(r.other_load for r in used), own_load=weighted("own_load"),
                       server_load=weighted("server_load"), rounds=len(used),
                       rounds_measured=sum(r.rounds_measured for r in results))


def tpot_ratio(http: LevelResult, engine: LevelResult, stat: str = "mean") -> float:
    """HTTP TPOT / engine TPOT (mean or p50): 1.05 means the HTTP path adds 5%."""
    return getattr(http.tpot, stat) / getattr(engine.tpot, stat)


# ---------------------------------------------------------------------------------------------------------------
# The report (pure)


def ms(seconds: float) -> str:
    if math.isnan(seconds):
        return "—"
    value = seconds * 1e3
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def triple(summary: Summary) -> str:
    return f"{ms(summary.mean)} / {ms(summary.p50)} / {ms(summary.p99)}"


def tokens_per_request(result: LevelResult) -> str:
    counts = [r.output_tokens for r in result.completed]
    if not counts:
        return "—"
    return str(counts[0]) if min(counts) == max(counts) else f"{min(counts)}–{max(counts)}"


def rejections(result: LevelResult) -> str:
    codes = result.rejection_codes
    text = str(result.rejected)
    if codes:
        text += " (" + ", ".join(f"{code}: {count}" for code, count in sorted(codes.items())) + ")"
    return text + (f", {result.errors} errors" if result.errors else "")


def results_table(results: Sequence[LevelResult]) -> list[str]:
    """One row per (client count, path): rounds pooled, throughput, the four latencies as mean / p50 / p99 in ms."""
    lines = [
        "| clients | path | rounds | max_tokens | tokens/request | completed | 429s | req/s | output tok/s | "
        "TTFT ms mean / p50 / p99 | TPOT ms mean / p50 / p99 | ITL ms mean / p50 / p99 | "
        "e2e ms mean / p50 / p99 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r.clients} | {r.path} | {r.rounds} of {r.rounds_measured} | {r.max_tokens} | "
                     f"{tokens_per_request(r)} | {len(r.completed)} | "
                     f"{rejections(r)} | {r.request_throughput:.2f} | {r.output_throughput:.1f} | "
                     f"{triple(r.ttft)} | {triple(r.tpot)} | {triple(r.itl)} | {triple(r.e2e)} |")
    return lines


def overhead_table(pairs: Sequence[tuple[LevelResult, LevelResult]]) -> list[str]:
    lines = [
        "| clients | TPOT mean, HTTP ms | TPOT mean, engine ms | HTTP ÷ engine (mean) | TPOT p50 ratio | "
        "output tok/s ratio | CPUs used: server / this process / others, HTTP runs | this process / others, "
        "engine runs |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for http, engine in pairs:
        lines.append(f"| {http.clients} | {ms(http.tpot.mean)} | {ms(engine.tpot.mean)} | "
                     f"**{tpot_ratio(http, engine):.3f}** | {tpot_ratio(http, engine, 'p50'):.3f} | "
                     f"{http.output_throughput / engine.output_throughput:.3f} | "
                     f"{http.server_load:.0%} / {http.own_load:.0%} / {http.other_load:.0%} | "
                     f"{engine.own_load:.0%} / {engine.other_load:.0%} |")
    return lines


def goal_verdict(pairs: Sequence[tuple[LevelResult, LevelResult]]) -> str:
    ratios = {http.clients: tpot_ratio(http, engine) for http, engine in pairs}
    limit = 1 + GOAL_TPOT_OVERHEAD
    met = [n for n, ratio in ratios.items() if ratio <= limit]
    missed = [n for n, ratio in ratios.items() if not ratio <= limit]
    goal = f"**Goal, the HTTP path adds ≤ {GOAL_TPOT_OVERHEAD:.0%} to TPOT (mean): "
    overhead = ", ".join(f"{(ratios[n] - 1):+.1%} at {n}" for n in ratios)
    if not missed:
        return goal + f"met** at every client count ({overhead})."
    if not met:
        return goal + f"not met** at any client count ({overhead})."
    return (goal + f"met at {', '.join(map(str, met))} clients, not at {', '.join(map(str, missed))}** "
            f"({overhead}).")


@dataclass
class RunInfo:
    """What the report says about the run besides the measurements."""

    label: str
    command: str
    machine: dict[str, str]
    model: str  # one line on the model
    served: str  # one line on how the server was run
    workload: str  # one line on the requests
    wait_quiet: float
    rounds: int
    minutes: float
    notes: list[str] = field(default_factory=list)


def build_section(info: RunInfo, results: Sequence[LevelResult]) -> str:
    """The Markdown section: how it was run, the table of both paths, the HTTP/engine TPOT ratios."""
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    machine = info.machine
    by_key = {(r.path, r.clients): r for r in results}
    clients = sorted({r.clients for r in results})
    pairs = [(by_key[(HTTP, n)], by_key[(ENGINE, n)]) for n in clients
             if (HTTP, n) in by_key and (ENGINE, n) in by_key]
    ordered = [by_key[(path, n)] for n in clients for path in (HTTP, ENGINE) if (path, n) in by_key]
    lines = [
        f"## Serving: {info.label}, HTTP streaming against the engine alone",
        "",
        f"- Command: `{info.command}` ({info.minutes:.1f} minutes)",
        f"- Date: {now}",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores ({machine['isa'].removeprefix('; ')}), "
        f"{machine['ram']} RAM; "
        f"torch {machine['torch']} (CPU capability {machine['capability']}), {machine['threads']} torch threads in "
        "the server and in the in-process engine alike.",
        "- The machine is **shared**: other engineers run tests on it at the same time. Before each measurement the "
        f"script waited (up to {info.wait_quiet:.0f} s) for other processes to use less than {QUIET:.0%} of the "
        "CPUs and measured again when they came back meanwhile (the share they used is in the second table). "
        "Trust the HTTP ÷ engine ratios of this run more than the absolute times.",
        f"- Model: {info.model}",
        f"- Server: {info.served}",
        f"- Workload: {info.workload}",
        "- Metrics as vLLM's `bench serve` defines them: TTFT = request sent → first token frame (queueing "
        "included); ITL = gaps between successive token frames (all requests pooled); TPOT = (e2e − TTFT) / "
        "(output tokens − 1) per request; e2e = request sent → `[DONE]`; req/s and output tok/s over the wall time "
        "of the measurement; output tokens from the final usage frame. The engine path is the same requests "
        "through `Engine.submit` / `events()` in the benchmark's process, its events with text standing for "
        "frames.",
        *(f"- {note}" for note in info.notes),
    ]
    lines += ["", *results_table(ordered), "", "HTTP overhead on TPOT (ratios > 1: the HTTP path is slower):", "",
              *overhead_table(pairs), ""]
    if pairs:
        lines += [goal_verdict(pairs), ""]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# Driving N concurrent clients


@dataclass(frozen=True)
class Level:
    clients: int
    max_tokens: int
    requests: int  # per client, one after another


async def drive(clients: int, requests: int, send: Callable[[], Awaitable[RequestRecord]]
                ) -> tuple[list[RequestRecord], float]:
    """`clients` closed loops of `requests` requests each; all records and the wall time."""

    async def client() -> list[RequestRecord]:
        return [await send() for _ in range(requests)]

    started = time.perf_counter()
    batches = await asyncio.gather(*(client() for _ in range(clients)))
    return [record for batch in batches for record in batch], time.perf_counter() - started


def classify_frame(line: str) -> tuple[str, dict | None]:
    """A Workers AI SSE line → ("token" | "usage" | "error" | "done" | "other", its JSON payload): a data frame with
    text is a token, the one with `usage` the last; any other data line (one that is not a JSON object too) is
    "other"."""
    kind, payload = parse_frame(line)
    if kind != "data":
        return kind, payload
    if not isinstance(payload, dict):
        return "other", None
    if "usage" in payload:
        return "usage", payload
    return ("token", payload) if payload.get("response") else ("other", payload)


async def http_request(client: httpx.AsyncClient, url: str, headers: dict[str, str], body: bytes) -> RequestRecord:
    sent = time.perf_counter()
    token_times: list[float] = []
    async with client.stream("POST", url, content=body, headers=headers) as response:
        if response.status_code != 200:
            code = error_code(await response.aread())
            status = "rejected" if response.status_code == 429 else "error"
            return RequestRecord(sent, [], time.perf_counter(), 0, status, code)
        usage: dict = {}
        async for line in response.aiter_lines():
            now = time.perf_counter()
            kind, payload = classify_frame(line)
            if kind == "token":
                token_times.append(now)
            elif kind == "usage" and payload is not None:
                usage = payload["usage"]
            elif kind == "error" and payload is not None:
                return RequestRecord(sent, token_times, now, 0, "error", error_code(payload))
            elif kind == "done":
                return RequestRecord(sent, token_times, now, int(usage.get("completion_tokens", 0)),
                                     "ok" if usage else "error", prompt_tokens=int(usage.get("prompt_tokens", 0)))
    return RequestRecord(sent, token_times, time.perf_counter(), 0, "error")  # the stream ended without [DONE]


async def engine_request(engine: Engine, prompt_ids: Sequence[int], max_tokens: int) -> RequestRecord:
    sent = time.perf_counter()
    request = GenerationRequest(prompt_ids=list(prompt_ids), max_tokens=max_tokens,
                                params=SamplingParams(temperature=0.0))
    try:
        handle = engine.submit(request)
    except QueueFullError:
        return RequestRecord(sent, [], time.perf_counter(), 0, "rejected", 3040)
    token_times: list[float] = []
    async for event in handle.events():
        now = time.perf_counter()
        if event.text:  # exactly the events the server turns into frames
            token_times.append(now)
        if event.finish_reason is not None:
            ok = event.finish_reason in ("stop", "length")
            return RequestRecord(sent, token_times, now, event.completion_tokens, "ok" if ok else "error",
                                 prompt_tokens=event.prompt_tokens)
    raise AssertionError("the event stream ended without a final event")


# ---------------------------------------------------------------------------------------------------------------
# The two paths


@dataclass
class Server:
    """A running server: where, with which token, and (when this script started it) its process."""

    url: str
    token: str
    account: str
    process: subprocess.Popen | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process else None

    @property
    def run_url(self) -> str:
        return f"{self.url.rstrip('/')}/client/v4/accounts/{self.account}/ai/run/{MODEL_NAME}"


@contextlib.contextmanager
def launched_server(model: Path, threads: int, max_queue: int, prefill_chunk: int, timeout: float
                    ) -> Iterator[Server]:
    """`int8serve serve` on a free port with rate limits and the cache off; stopped (SIGTERM) at the end."""
    token, account = "bench-token", "bench"
    flags = ["--threads", str(threads), "--rpm", "0", "--no-cache", "--max-queue", str(max_queue),
             "--prefill-chunk", str(prefill_chunk)]
    started = time.perf_counter()
    with running_server(model, free_port(), [f"{token}={account}"], flags, timeout) as running:
        log(f"  server pid {running.process.pid} ready on port {running.port} after "
            f"{time.perf_counter() - started:.1f} s")
        yield Server(running.url, token, account, running.process)


def run_body(prompt: str, max_tokens: int) -> bytes:
    return json.dumps({"prompt": prompt, "raw": True, "stream": True, "max_tokens": max_tokens,
                       "temperature": 0}).encode()


def measure_http(server: Server, level: Level, prompt: str) -> LevelResult:
    headers = {"authorization": f"Bearer {server.token}", "content-type": "application/json"}

    async def run() -> tuple[list[RequestRecord], float, tuple[float, float, float]]:
        limits = httpx.Limits(max_connections=level.clients + 4, max_keepalive_connections=level.clients + 4)
        async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(1800.0, connect=10.0),
                                     trust_env=False) as client:
            warmup = run_body(prompt, min(WARMUP_TOKENS, level.max_tokens))
            await drive(level.clients, 1, lambda: http_request(client, server.run_url, headers, warmup))
            body = run_body(prompt, level.max_tokens)
            shares = CpuShares(server.pid)
            records, wall = await drive(level.clients, level.requests,
                                        lambda: http_request(client, server.run_url, headers, body))
            return records, wall, shares.stop()

    records, wall, (own, server_share, others) = asyncio.run(run())
    return LevelResult(HTTP, level.clients, level.max_tokens, records, wall, others, own, server_share)


def measure_engine(engine: Engine, level: Level, prompt_ids: Sequence[int]) -> LevelResult:
    async def run() -> tuple[list[RequestRecord], float, tuple[float, float, float]]:
        await drive(level.clients, 1, lambda: engine_request(engine, prompt_ids, min(WARMUP_TOKENS, level.max_tokens)))
        shares = CpuShares()
        records, wall = await drive(level.clients, level.requests,
                                    lambda: engine_request(engine, prompt_ids, level.max_tokens))
        return records, wall, shares.stop()

    records, wall, (own, _, others) = asyncio.run(run())
    return LevelResult(ENGINE, level.clients, level.max_tokens, records, wall, others, own)


@dataclass(frozen=True)
class EngineSizing:
    """What `serve` gives its engine (server.build_service): the card's slots, its context within the model's."""

    slots: int
    context: int
    max_queue: int
    prefill_chunk: int


def engine_sizing(model_config: ModelConfig, max_queue: int, prefill_chunk: int) -> EngineSizing:
    card = Catalog.load().get(MODEL_NAME)
    return EngineSizing(card.max_concurrent_requests, min(card.context_length_limit, model_config.max_seq_len),
                        max_queue, prefill_chunk)


def describe(result: LevelResult) -> str:
    return (f"{result.path:6} N={result.clients:2}: {len(result.completed)} done, {result.rejected} 429s, "
            f"{result.output_throughput:.1f} tok/s, TTFT {ms(result.ttft.mean)} ms, TPOT {ms(result.tpot.mean)} ms, "
            f"ITL {ms(result.itl.mean)} ms, e2e {ms(result.e2e.mean)} ms (others used {result.other_load:.0%})")


def run_http_phase(args: argparse.Namespace, levels: Sequence[Level], quiet: QuietWaiter) -> list[LevelResult]:
    results = []
    with contextlib.ExitStack() as stack:
        if args.url:
            server = Server(args.url, args.token, args.account)
            wait_ready(server.url, None, args.server_timeout)
        else:
            log("  starting the server ...")
            server = stack.enter_context(launched_server(args.model, args.threads, args.max_queue,
                                                         args.prefill_chunk, args.server_timeout))
        for level in levels:
            result = least_contended(lambda level=level: measure_http(server, level, args.prompt), quiet,
                                     args.attempts)
            log("  " + describe(result))
            results.append(result)
    return results


def load_engine(model: Path, max_queue: int, prefill_chunk: int, in_thread: bool) -> Engine:
    """The checkpoint in an `Engine` sized as `serve` sizes it, loaded and started in a worker thread when
    `in_thread` (as `serve` does: server.py loads the model in its `int8serve-load` thread while uvicorn starts,
    after `warm_up_thread_pool` on the main thread).

    Which thread first runs torch's parallel ops changes how its OpenMP threads behave afterwards. Measured on
    stories260K, 2 threads, with other processes using half of the CPUs: an engine loaded in the main thread decoded
    at ~5 ms per token, the same engine loaded in a worker thread (with no parallel op run on the main thread first)
    at 90-290 ms; on a quiet machine that worker-thread engine was the faster one and used ~2 CPUs instead of ~1
    (its OpenMP worker spins, as with OMP_WAIT_POLICY=ACTIVE). serve now warms the pool on the main thread first
    (server.warm_up_thread_pool), and so does this function, so that the engine-only runs load it the way the
    server does and the ratio measures the HTTP layer."""
    built: list[Engine] = []
    failed: list[BaseException] = []

    def load() -> None:
        try:
            loaded = load_model(model, "int8")
            assert loaded.tokenizer_path is not None, f"{model}: no tokenizer.model"
            sizing = engine_sizing(loaded.config, max_queue, prefill_chunk)
            built.append(Engine(loaded.model, Tokenizer(loaded.tokenizer_path), max_slots=sizing.slots,
                                max_queue=sizing.max_queue, max_seq_len=sizing.context,
                                prefill_chunk=sizing.prefill_chunk).start())
        except BaseException as err:
            failed.append(err)

    if in_thread:
        warm_up_thread_pool()
        worker = threading.Thread(target=load, name="bench-load")
        worker.start()
        worker.join()
    else:
        load()
    if failed:
        raise failed[0]
    return built[0]


def run_engine_phase(args: argparse.Namespace, levels: Sequence[Level], quiet: QuietWaiter,
                     prompt_ids: Sequence[int]) -> list[LevelResult]:
    log(f"  loading the model in this process ({args.engine_load} thread) ...")
    engine = load_engine(args.model, args.max_queue, args.prefill_chunk, in_thread=args.engine_load == "worker")
    results = []
    try:
        for level in levels:
            result = least_contended(lambda level=level: measure_engine(engine, level, prompt_ids), quiet,
                                     args.attempts)
            log("  " + describe(result))
            results.append(result)
    finally:
        engine.stop()
    return results


# ---------------------------------------------------------------------------------------------------------------
# The 7B-shape model on disk


def make_7b(destination: Path, tokenizer_path: Path) -> None:
    """Write a random-weight int8 model of the Llama-2-7B shape as an int8 checkpoint (+ tokenizer.model)."""
    vocab = Tokenizer(tokenizer_path).vocab_size
    config = LLAMA2_7B if vocab == LLAMA2_7B.vocab_size else ModelConfig(**{**LLAMA2_7B.to_dict(), "vocab_size": vocab})
    if vocab != LLAMA2_7B.vocab_size:
        log(f"the tokenizer has {vocab} pieces, not {LLAMA2_7B.vocab_size}: the model gets vocab_size {vocab}")
    log(f"building a random int8 model of the Llama-2-7B shape (vocab {config.vocab_size}) ...")
    started = time.perf_counter()
    model = build_random_int8_model(config)
    source = Path(f"random int8 weights, Llama-2-7B shape (benchmarks/serve.py --make-7b, tokenizer {tokenizer_path})")
    save_int8_checkpoint(LoadedModel(model, config, tokenizer_path, "int8", source), destination)
    log(f"wrote {destination} in {time.perf_counter() - started:.0f} s")


# ---------------------------------------------------------------------------------------------------------------


def per_level(values: Sequence[int], clients: Sequence[int], name: str, parser: argparse.ArgumentParser) -> list[int]:
    if len(values) == 1:
        return list(values) * len(clients)
    if len(values) != len(clients):
        parser.error(f"{name}: give one value, or one per client count ({len(clients)})")
    return list(values)


def default_label(model: Path) -> str:
    """The model's folder name; for a `hf` or `meta` folder, its parent's (stories260K/hf → stories260K)."""
    resolved = model.resolve()
    return resolved.parent.name if resolved.name in ("hf", "meta") else resolved.name


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path,
                        help="checkpoint folder the server serves and the in-process engine loads (required, except "
                        "with --make-7b)")
    parser.add_argument("--clients", type=int, nargs="+", default=DEFAULT_CLIENTS, metavar="N",
                        help="concurrent streaming clients, one measurement each (default 1 4 8 16)")
    parser.add_argument("--max-tokens", type=int, nargs="+", default=[128], metavar="M",
                        help="max_tokens of every request: one value, or one per client count (default 128)")
    parser.add_argument("--requests", type=int, nargs="+", default=[4], metavar="R",
                        help="requests each client sends one after another, per round: one value, or one per client "
                        "count (default 4)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of (every client count through the server, then through the engine), "
                        "alternating which path goes first; the requests of the rounds that other processes did not "
                        "disturb are pooled (default 1)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT,
                        help=f"the prompt, sent raw (no chat template), greedy (default {DEFAULT_PROMPT!r})")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch threads of the server and of the in-process engine (default: this machine's "
                        f"torch default, {torch.get_num_threads()})")
    parser.add_argument("--max-queue", type=int, default=64,
                        help="the engine's waiting queue (server --max-queue), beyond which 429/3040 (default 64)")
    parser.add_argument("--prefill-chunk", type=int, default=128,
                        help="prompt tokens per prefill step, server and engine (default 128, as serve)")
    parser.add_argument("--url", help="an already-running server (e.g. http://127.0.0.1:8787) instead of starting one; "
                        "needs --token and --account")
    parser.add_argument("--token", help="API token for --url")
    parser.add_argument("--account", help="account id of --token, for --url")
    parser.add_argument("--no-engine", action="store_true", help="skip the engine-only comparison")
    parser.add_argument("--engine-load", choices=["worker", "main"], default="worker",
                        help="load the in-process engine in a worker thread, as `serve` does (default), or in the "
                        "main thread (see load_engine: it changes torch's OpenMP threads' behaviour)")
    parser.add_argument("--attempts", type=int, default=2,
                        help="measure a (path, client count) up to this many times while other processes disturb "
                        "it, keeping the least disturbed (default 2)")
    parser.add_argument("--wait-quiet", type=float, default=120, metavar="SECONDS",
                        help="wait up to this long before each measurement for other processes to leave the CPUs "
                        "(default 120; 0 = never wait)")
    parser.add_argument("--server-timeout", type=float, default=900, metavar="SECONDS",
                        help="how long the server may take to load the model and become ready (default 900)")
    parser.add_argument("--label", help="the model's name in the report and its section markers (default: the "
                        "model folder's name, its parent's for a hf/meta folder)")
    parser.add_argument("--write", type=Path, metavar="FILE", help="write the report into this Markdown file")
    parser.add_argument("--note", action="append", default=[], metavar="TEXT",
                        help="a sentence to add to the report's list of facts about the run; repeatable")
    parser.add_argument("--make-7b", type=Path, metavar="DIR",
                        help="only write a random-weight Llama-2-7B-shape int8 checkpoint to DIR (~7 GB) and exit")
    parser.add_argument("--tokenizer", type=Path, default=LLAMA2_TOKENIZER,
                        help="tokenizer.model for --make-7b (default: ../shared/models/llama2-tokenizer, 32000 pieces)")
    args = parser.parse_args(argv)
    if args.make_7b:
        return args
    if args.model is None:
        parser.error("--model is required (the server's checkpoint, also loaded for the engine-only runs)")
    if args.url and not (args.token and args.account):
        parser.error("--url needs --token and --account")
    if min(args.clients) < 1 or min(args.max_tokens) < 2 or min(args.requests) < 1 or args.rounds < 1:
        parser.error("--clients, --requests and --rounds must be at least 1, --max-tokens at least 2 (for TPOT)")
    args.max_tokens = per_level(args.max_tokens, args.clients, "--max-tokens", parser)
    args.requests = per_level(args.requests, args.clients, "--requests", parser)
    args.label = args.label or default_label(args.model)
    return args


def read_config(model: Path) -> ModelConfig:
    """The model's shape without loading its weights (an int8 or Hugging Face folder; else the whole model)."""
    kind = detect_format(model)
    if kind == "int8":
        return ModelConfig.from_dict(read_json(model / "int8serve.json").get("config", {}))
    if kind == "hf":
        return config_from_hf(model / "config.json")
    return load_model(model, "int8").config


def describe_model(model: Path, config: ModelConfig) -> str:
    with torch.device("meta"):
        shape = Transformer(config, "int8")
    parameters = sum(p.numel() for p in shape.parameters()) + sum(
        b.numel() for b in shape.buffers() if b.dtype == torch.int8)
    return (f"`{model}` ({detect_format(model)} checkpoint, served as int8; {parameters / 1e6:.1f}M parameters: dim "
            f"{config.dim}, {config.n_layers} layers, {config.n_heads} heads, hidden {config.hidden_dim}, vocab "
            f"{config.vocab_size})")


def prompt_token_ids(model: Path, prompt: str) -> list[int]:
    """The ids the server makes of a raw prompt."""
    tokenizer = find_tokenizer(model)
    if tokenizer is None:
        raise SystemExit(missing_tokenizer(model))
    return Tokenizer(tokenizer).encode_segments(render_prompt(prompt, raw=True))


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.make_7b:
        make_7b(args.make_7b, args.tokenizer)
        return
    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    machine = machine_facts()
    log(f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, {args.threads} threads")
    config = read_config(args.model)
    prompt_ids = prompt_token_ids(args.model, args.prompt)
    model_line = describe_model(args.model, config)
    sizing = engine_sizing(config, args.max_queue, args.prefill_chunk)
    levels = [Level(n, m, r) for n, m, r in zip(args.clients, args.max_tokens, args.requests, strict=True)]
    if len(prompt_ids) + max(args.max_tokens) > sizing.context:
        raise SystemExit(f"{len(prompt_ids)} prompt tokens + max_tokens {max(args.max_tokens)} exceed the context of "
                         f"{sizing.context}")
    quiet: QuietWaiter = QuietWaiter(args.wait_quiet) if args.wait_quiet > 0 else NoWait()
    rounds: dict[tuple[str, int], list[LevelResult]] = {}
    for number in range(args.rounds):
        paths = [HTTP] if args.no_engine else ([HTTP, ENGINE] if number % 2 == 0 else [ENGINE, HTTP])
        for path in paths:
            log(f"round {number + 1} of {args.rounds}: {path} ...")
            phase = (run_http_phase(args, levels, quiet) if path == HTTP
                     else run_engine_phase(args, levels, quiet, prompt_ids))
            gc.collect()  # the engine's model and KV cache go before the server loads its own
            for result in phase:
                rounds.setdefault((result.path, result.clients), []).append(result)
    results = [pool(parts) for parts in rounds.values()]
    check_prompt_tokens(results, len(prompt_ids))
    info = RunInfo(
        label=args.label, command=display_command("serve", sys.argv[1:]), machine=machine, model=model_line,
        served=(f"`{args.url}`" if args.url else "started by the script: `int8serve serve --model ... --threads "
                f"{args.threads} --rpm 0 --no-cache --max-queue {args.max_queue} --prefill-chunk {args.prefill_chunk}` "
                "(no rate limit, no response cache)") + f"; the card's {sizing.slots} slots, context {sizing.context}, "
                "Workers AI streaming (`POST /client/v4/accounts/{account}/ai/run/@cf/meta/llama-2-7b-chat-int8`, "
                "`stream: true`) over httpx from the same machine: the client's CPU use is part of the HTTP runs.",
        workload=(f"raw prompt {args.prompt!r} ({len(prompt_ids)} tokens with BOS), greedy (`temperature: 0`); each "
                  "of N clients sends its requests one after another (closed loop); "
                  + ", ".join(f"N = {lv.clients}: max_tokens {lv.max_tokens}, {lv.requests * args.rounds} request(s) "
                              "per client" for lv in levels)
                  + f"; {args.rounds} round(s), the order of the two paths alternating; a round during which other "
                  f"processes used ≥ {QUIET:.0%} of the CPUs is left out when another was quiet (column rounds). "
                  "Each measurement started "
                  f"with an untimed warm-up of N requests of {WARMUP_TOKENS} tokens."),
        wait_quiet=args.wait_quiet, rounds=args.rounds, minutes=(time.perf_counter() - started) / 60,
        notes=[f"Code: {code_revision()}.",
               f"The in-process engine was loaded and started in a {args.engine_load} thread (`--engine-load`): "
               "`serve` loads its model in a worker thread, and which thread first runs torch's parallel ops "
               "changes how its OpenMP threads behave (see `load_engine`).", *args.note])
    section = build_section(info, results)
    log("\n" + section)
    if args.write:
        write_section(args.write, section, "serve.py", args.label)
        log(f"wrote {args.write}")


def code_revision() -> str:
    """The commit the measured code is at, and whether src/ had uncommitted changes (read-only git calls)."""
    def git(*words: str) -> str:
        done = subprocess.run(["git", "--no-optional-locks", *words], cwd=REPO, capture_output=True, text=True,
                              check=False)
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "--short", "HEAD")
    if not commit:
        return "not a git checkout"
    return f"commit {commit}" + (" with uncommitted changes in src/" if git("status", "--porcelain", "--", "src")
                                 else "")


def check_prompt_tokens(results: Sequence[LevelResult], expected: int) -> None:
    seen = {r.prompt_tokens for result in results for r in result.completed}
    if seen - {expected}:
        log(f"warning: prompt token counts {sorted(seen)} differ from the {expected} ids the engine runs got")


if __name__ == "__main__":
    main()
