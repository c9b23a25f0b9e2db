"""The prefix cache's worth: time to first token with it and without it, in the same run (issue 13).

The script starts `int8serve serve` twice on the same model, with the prefix cache (the default) and with
`--no-prefix-cache`, alternating, and measures through the HTTP API:

* short `prompt` requests — Workers AI's template with its default system prompt and ~10 new user tokens — from
  1 client, then from 4 at once: time to first token (TTFT) and the aggregate output tokens per second;
* a 5-turn chat replayed turn by turn, each turn resending the whole history as chat clients do: TTFT per turn.

Goals on the 7B shape at 1 client: short prompts >= 3x lower TTFT with the cache, the 5th turn >= 5x lower, the
aggregate throughput not lower.

    .venv/bin/python -m benchmarks.prefix --model ../shared/models/stories260K/hf --write docs/benchmarks.md
    .venv/bin/python -m benchmarks.prefix --model data/llama2-7b-shape-int8 --requests 4 --turns 5 \\
        --reply-tokens 16 --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.common import free_port, started_server, write_section
from benchmarks.machine import machine_description

MODEL = "@cf/meta/llama-2-7b-chat-int8"
TOKEN, ACCOUNT = "prefix-token", "prefix-account"
QUESTIONS = ["What is the capital of France?", "How do birds fly so high?", "Tell me a joke about cats.",
             "Why is the sky blue today?", "Name three colours of apples.", "What do dogs like to eat?",
             "How far away is the moon?", "Which fruit is yellow and long?"]
TURNS = ["Hello! Can you tell me a story?", "Who is in the story?", "What happens next?", "Does it end well?",
         "Thank you, what is the moral?", "Tell me another one.", "Make it shorter.", "Why?"]


@dataclass
class Run:
    ttft: list[float] = field(default_factory=list)  # seconds
    tokens: int = 0
    seconds: float = 0.0
    cached: list[int] = field(default_factory=list)  # per chat turn: prompt tokens reused from the prefix cache
    prompt: list[int] = field(default_factory=list)  # per request: prompt tokens

    def mean_ms(self) -> float:
        return statistics.mean(self.ttft) * 1000

    @property
    def throughput(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


async def stream(http: httpx.AsyncClient, url: str, body: dict, run: Run) -> str:
    """One streamed request: its TTFT into `run`, its text back."""
    started, first, text = time.perf_counter(), None, []
    async with http.stream("POST", url, json={**body, "stream": True}) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            frame = json.loads(line[6:])
            if frame.get("usage"):
                run.tokens += frame["usage"]["completion_tokens"]
                run.prompt.append(frame["usage"]["prompt_tokens"])
            elif first is None:
                first = time.perf_counter()
            text.append(frame.get("response", ""))
    run.ttft.append((first or time.perf_counter()) - started)
    return "".join(text)


async def short_prompts(base: str, requests: int, clients: int, max_tokens: int) -> Run:
    run, url = Run(), f"{base}/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}"
    async with httpx.AsyncClient(timeout=600, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        started = time.perf_counter()
        for batch in range(0, requests, clients):
            await asyncio.gather(*(stream(http, url, {"prompt": QUESTIONS[(batch + i) % len(QUESTIONS)],
                                                      "max_tokens": max_tokens, "temperature": 0}, run)
                                   for i in range(min(clients, requests - batch))))
        run.seconds = time.perf_counter() - started
    return run


async def chat(base: str, turns: int, reply_tokens: int) -> Run:
    run, url = Run(), f"{base}/client/v4/accounts/{ACCOUNT}/ai/run/{MODEL}"
    messages = [{"role": "system", "content": "You are a kind storyteller who answers in short sentences."}]
    async with httpx.AsyncClient(timeout=600, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
        for turn in range(turns):
            messages.append({"role": "user", "content": TURNS[turn % len(TURNS)]})
            reused = await reused_tokens(http, base)
            reply = await stream(http, url, {"messages": messages, "max_tokens": reply_tokens, "temperature": 0},
                                 run)
            run.cached.append(int(await reused_tokens(http, base) - reused))
            messages.append({"role": "assistant", "content": reply})
    return run


async def reused_tokens(http: httpx.AsyncClient, base: str) -> float:
    """The server's count of prompt tokens taken from its prefix cache so far (0 without one)."""
    for line in (await http.get(f"{base}/metrics")).text.splitlines():
        if line.startswith("int8serve_prefix_cache_reused_tokens_total{") and f'model="{MODEL}"' in line:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@dataclass
class Measured:
    short: dict[int, Run]  # clients -> run
    chat: Run


def measure(model: Path, cache: bool, args: argparse.Namespace) -> Measured:
    flags = ["--rpm", "0", "--no-cache", "--max-queue", "64"] + ([] if cache else ["--no-prefix-cache"])
    with started_server(model, free_port(), [f"{TOKEN}={ACCOUNT}"], flags) as base:
        asyncio.run(short_prompts(base, 1, 1, 2))  # warm-up, untimed
        short = {clients: asyncio.run(short_prompts(base, args.requests, clients, args.max_tokens))
                 for clients in (1, 4)}
        conversation = asyncio.run(chat(base, args.turns, args.reply_tokens))
    return Measured(short, conversation)


def table(on: Measured, off: Measured) -> list[str]:
    lines = ["| measurement | cache on | cache off | off ÷ on |", "|---|---|---|---|"]
    for clients in (1, 4):
        a, b = on.short[clients], off.short[clients]
        lines.append(f"| short prompts, {clients} client(s): TTFT mean | {a.mean_ms():.1f} ms | {b.mean_ms():.1f} ms "
                     f"| {b.mean_ms() / a.mean_ms():.2f}× |")
        lines.append(f"| short prompts, {clients} client(s): output tok/s | {a.throughput:.1f} | {b.throughput:.1f} "
                     f"| {b.throughput / a.throughput:.2f}× |")
    for turn, (a, b) in enumerate(zip(on.chat.ttft, off.chat.ttft, strict=True), 1):
        reuse = f" ({on.chat.cached[turn - 1]} of {on.chat.prompt[turn - 1]} prompt tokens from the cache)" \
            if len(on.chat.cached) >= turn and len(on.chat.prompt) >= turn else ""
        lines.append(f"| chat turn {turn}: TTFT{reuse} | {a * 1000:.1f} ms | {b * 1000:.1f} ms | {b / a:.2f}× |")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="model folder for the servers the script starts")
    parser.add_argument("--requests", type=int, default=8, help="short prompts per measurement (default: 8)")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens per short answer (default: 8)")
    parser.add_argument("--turns", type=int, default=5, help="chat turns (default: 5)")
    parser.add_argument("--reply-tokens", type=int, default=24, help="tokens per chat reply (default: 24)")
    parser.add_argument("--write", type=Path, default=None, help="write the result into this Markdown file")
    args = parser.parse_args(argv)
    started = time.monotonic()
    on = measure(args.model, True, args)
    off = measure(args.model, False, args)
    lines = table(on, off)
    print("\n".join(lines))
    if args.write is not None:
        command = " ".join(["`.venv/bin/python -m benchmarks.prefix", *(argv or []), "`"]) if argv else \
            f"`.venv/bin/python -m benchmarks.prefix --model {args.model} --requests {args.requests} --turns " \
            f"{args.turns} --reply-tokens {args.reply_tokens} --write {args.write}`"
        body = "\n".join([f"## Prefix cache: on vs off (`benchmarks/prefix.py`, {args.model.name})", "",
                          f"{command} — {machine_description()}, {time.strftime('%Y-%m-%d')}, "
                          f"{time.monotonic() - started:.0f} s, load average {os.getloadavg()[0]:.1f} at the end. "
                          "Both servers in one run, one after the other; greedy answers (the same text either way).",
                          "", *lines])
        write_section(args.write, body, "prefix.py", args.model.name)


if __name__ == "__main__":
    main()
