"""Decode tok/s of each kernel path of Int8Linear against torch's stock int8pack, same run, on the Llama-2-7B shape.

Two models with the same random int8 weights (benchmarks/engine.py's builder): "stock" keeps the plain per-channel
weight and runs `torch._weight_int8pack_mm` with bf16 activations (Int8Linear before issue #10, and its fallback
without a C++ compiler); "ours" keeps only the packed copy with the default scheme (int8.DEFAULT_GROUP_SIZE,
int8.PRECISE_ACTIVATIONS) and runs our kernel, its path forced with INT8SERVE_KERNEL for each path this CPU has.
Rounds alternate between the variants (the machine is shared and noisy: compare within a round), and each variant's
figure is the median step over all rounds. Batch 4 = 4 slots at different positions, as benchmarks/engine.py.

    .venv/bin/python -m benchmarks.decode_paths --layers 8
    .venv/bin/python -m benchmarks.decode_paths --layers 8 --write docs/benchmarks.md

A full 32-layer model of each kind is ~7 GB: with --layers 32 the two are built and timed one after the other.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.common import display_command, environment, write_section
from benchmarks.engine import LLAMA2_7B, build_random_int8_model, decode_bytes_per_step, fill_cache, random_tokens
from benchmarks.machine import log, machine_facts
from int8serve.engine import int8, kernels
from int8serve.engine.config import ModelConfig
from int8serve.engine.model import Transformer

BATCHES = (1, 4)


def forced_path(path: str | None) -> contextlib.AbstractContextManager[None]:
    """INT8SERVE_KERNEL=path for the duration (None: leave it alone)."""
    return environment(kernels.ENV_PATH, path)


def build(config: ModelConfig, stock: bool) -> Transformer:
    """The random model; stock: plain per-channel weights for torch's kernels (as without our kernel)."""
    if not stock:
        return build_random_int8_model(config, group_size=int8.DEFAULT_GROUP_SIZE)
    available = kernels.available
    kernels.available = lambda: False  # type: ignore[assignment]
    try:
        return build_random_int8_model(config, group_size=0)
    finally:
        kernels.available = available  # type: ignore[assignment]


def time_steps(model: Transformer, batch: int, steps: int, start: int) -> list[float]:
    """Seconds of `steps` decode forwards of `batch` slots (after one untimed)."""
    cache = model.new_cache(batch, start + steps + 8)
    fill_cache(cache)
    generator = torch.Generator().manual_seed(3)
    positions = [start - i * (start // 4) for i in range(batch)]
    seconds = []
    for step in range(steps + 1):
        tokens = random_tokens((batch, 1), model.config.vocab_size, generator)
        began = time.perf_counter()
        model(tokens, cache, list(range(batch)), positions)
        if step:
            seconds.append(time.perf_counter() - began)
        positions = [p + 1 for p in positions]
    return seconds


def run(args: argparse.Namespace) -> tuple[dict[str, dict[int, list[float]]], dict[str, int]]:
    config = ModelConfig(**{**LLAMA2_7B.to_dict(), "n_layers": args.layers})
    paths = [p for p in ("amx", "vnni512", "avxvnni", "avx2") if kernels.cpu_has(p)]
    variants = [("stock int8pack (before)", True, None)] + [(f"ours, {p}", False, p) for p in paths]
    times: dict[str, dict[int, list[float]]] = {name: {b: [] for b in BATCHES} for name, _, _ in variants}
    nbytes: dict[str, int] = {}
    together = args.layers <= 16  # both models fit in memory: alternate within each round
    models: dict[bool, Transformer] = {}
    for stock in (True, False):
        if together or not models:
            models[stock] = build(config, stock)
    for round_ in range(args.rounds):
        for name, stock, path in variants:
            if stock not in models:  # one model at a time: free the other first
                models.clear()
                gc.collect()
                models[stock] = build(config, stock)
            nbytes[name] = decode_bytes_per_step(models[stock])
            with forced_path(path):
                for batch in BATCHES:
                    times[name][batch] += time_steps(models[stock], batch, args.steps, args.start)
            log(f"round {round_ + 1}: {name}: " + ", ".join(
                f"batch {b} {b / statistics.median(times[name][b]):.2f} tok/s" for b in BATCHES))
    return times, nbytes


def report(args: argparse.Namespace, times: dict[str, dict[int, list[float]]], nbytes: dict[str, int]) -> str:
    machine = machine_facts()
    base = next(iter(times))
    lines = [
        "## Decode per kernel path: our kernel vs torch's int8pack (benchmarks/decode_paths.py)",
        "",
        f"- CPU: {machine['cpu']} ({machine['cores']} CPUs; {machine['isa']}), {machine['ram']} RAM, torch "
        f"{machine['torch']}, {machine['threads']} threads; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        "a machine shared with other jobs (load average "
        f"{os.getloadavg()[0]:.1f} at the end): absolute figures are low, compare the ratios of the same run.",
        f"- Model: the Llama-2-7B shape with {args.layers} of 32 blocks, random int8 weights; decode from position "
        f"{args.start}; {args.rounds} alternating rounds of {args.steps} steps per variant and batch; median step.",
        f"- Ours: a bf16 scale per {int8.DEFAULT_GROUP_SIZE} weights, precise activations "
        f"{int8.PRECISE_ACTIVATIONS}. Stock: per-channel scales, `torch._weight_int8pack_mm`, bf16 activations.",
        f"- Command: `{display_command('decode_paths', sys.argv[1:])}`",
        "",
        "| variant | weight + scale bytes per step | batch 1 tok/s | × stock | batch 4 tok/s (aggregate) | × stock |",
        "|---|---|---|---|---|---|",
    ]
    for name, by_batch in times.items():
        cells = []
        for batch in BATCHES:
            rate = batch / statistics.median(by_batch[batch])
            ratio = rate / (batch / statistics.median(times[base][batch]))
            cells += [f"{rate:.2f}", f"{ratio:.2f}×"]
        lines.append(f"| {name} | {nbytes[name] / 1e9:.2f} GB | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8, help="transformer blocks of the 7B shape (default 8)")
    parser.add_argument("--steps", type=int, default=8, help="timed decode steps per variant, batch and round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--start", type=int, default=256, help="position of the first decode step (default 256)")
    parser.add_argument("--write", type=Path, metavar="FILE", help="write the table into this Markdown file")
    args = parser.parse_args(argv)
    if not kernels.available():
        raise SystemExit(f"our kernel is not available: {kernels.unavailable_reason()}")
    log(kernels.describe())
    times, nbytes = run(args)
    section = report(args, times, nbytes)
    log("\n" + section)
    if args.write:
        write_section(args.write, section, "decode_paths.py")


if __name__ == "__main__":
    main()
