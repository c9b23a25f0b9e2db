"""Decode steps through a decode plan against the same steps through the modules (engine/decode_plan.py), same run.

One model: the Llama-2-7B shape with random int8 weights (benchmarks/engine.py's builder; --layers), or a model
folder or GGUF file (--model, loaded as int8). For batch 1 and 4 (4 slots at different positions, as
benchmarks/engine.py), rounds alternate INT8SERVE_DECODE_PLAN=off (the modules) and auto (the plan), which goes first
changing every round (the machine is shared and noisy: compare within a round); each variant's figure is the median
step of a round, and the report gives the median over rounds and every round's ratio. First it checks that both
give the same logits, bit for bit.

    .venv/bin/python -m benchmarks.decode_plan --layers 32 --write docs/benchmarks.md
    .venv/bin/python -m benchmarks.decode_plan --position 200 --write docs/benchmarks.md \
        --model ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.common import display_command, write_section
from benchmarks.engine import LLAMA2_7B, build_random_int8_model, fill_cache, time_decode
from benchmarks.machine import log, machine_facts
from int8serve.engine import decode_plan, int8, kernels
from int8serve.engine.loader import load_model
from int8serve.engine.model import Transformer

VARIANTS = ("off", "auto")  # INT8SERVE_DECODE_PLAN: the modules, the plan


def starts_of(batch: int, position: int) -> list[int]:
    """Row b of a batch starts at position * (4 - b) / 4: rows at different positions."""
    return [position * (4 - b) // 4 for b in range(batch)]


def with_setting(value: str) -> None:
    os.environ[decode_plan.ENV] = value


def same_logits(model: Transformer, position: int) -> bool:
    """One batch-4 step through each variant, on caches filled alike: bitwise the same logits and caches."""
    results = []
    for value in VARIANTS:
        with_setting(value)
        cache = model.new_cache(4, position + 2)
        fill_cache(cache)
        tokens = torch.arange(3, 7)[:, None]
        results.append((model(tokens, cache, [0, 1, 2, 3], starts_of(4, position)), cache))
    (logits_a, cache_a), (logits_b, cache_b) = results
    return torch.equal(logits_a, logits_b) and all(
        torch.equal(a, b) for a, b in zip(cache_a.k + cache_a.v, cache_b.k + cache_b.v, strict=True))


def measure(model: Transformer, batch: int, position: int, rounds: int, steps: int) -> dict[str, list[float]]:
    """Median step seconds of each variant in each round."""
    cache = model.new_cache(batch, position + steps + 2)
    fill_cache(cache)
    slots, starts = list(range(batch)), starts_of(batch, position)
    medians: dict[str, list[float]] = {value: [] for value in VARIANTS}
    for round_ in range(rounds):
        for value in VARIANTS if round_ % 2 == 0 else tuple(reversed(VARIANTS)):
            with_setting(value)
            medians[value].append(statistics.median(time_decode(model, cache, slots, starts, steps, None,
                                                                warmup=1).seconds))
    return medians


def report(args: argparse.Namespace, label: str, exact: bool, times: dict[int, dict[str, list[float]]]) -> str:
    machine = machine_facts()
    lines = [
        f"## Decode plans against the modules ({label})",
        "",
        f"- Command: `{display_command('decode_plan', sys.argv[1:] if args.argv is None else args.argv, ['--write'])}`",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        f"- CPU: {machine['cpu']} ({machine['cores']} CPUs; {machine['isa']}), {machine['ram']} RAM, torch "
        f"{machine['torch']}, {machine['threads']} threads; our kernel's `{kernels.path()}` path.",
        f"- {args.rounds} rounds of {args.steps} decode steps per variant and batch, the variant that goes first "
        f"alternating; rows from position {args.position} (batch 4: {starts_of(4, args.position)}). The same logits "
        f"and caches both ways, bit for bit: {'yes' if exact else '**no**'}.",
        "",
        "| batch | modules, ms a step | plan, ms a step | modules ÷ plan (median of the rounds) | per round |",
        "|---|---|---|---|---|",
    ]
    for batch, medians in times.items():
        modules, plan = (statistics.median(medians[value]) for value in VARIANTS)
        ratios = [a / b for a, b in zip(*(medians[value] for value in VARIANTS), strict=True)]
        rounds = " / ".join(f"{ratio:.2f}" for ratio in ratios)
        lines.append(f"| {batch} | {modules * 1e3:.1f} | {plan * 1e3:.1f} | **{statistics.median(ratios):.2f}×** | "
                     f"{rounds} |")
    lines += ["", "The machine is shared: compare the two variants within a round, not absolute times across runs."]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32, help="blocks of the random 7B shape (default 32)")
    parser.add_argument("--model", type=Path, help="a model folder or GGUF file instead (loaded as int8)")
    parser.add_argument("--position", type=int, default=512, help="the first decode step's position (default 512)")
    parser.add_argument("--rounds", type=int, default=10, help="alternating rounds (default 10)")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per variant, batch and round (default 4)")
    parser.add_argument("--write", type=Path, metavar="FILE", help="write the table into this Markdown file")
    args = parser.parse_args(argv)
    args.argv = None if argv is None else list(argv)
    return args


def main(argv: Sequence[str] | None = None) -> str:
    args = parse_args(argv)
    if not kernels.available():
        raise SystemExit(f"our kernel is not available: {kernels.unavailable_reason()}")
    if args.model is not None:
        model, label = load_model(args.model, "int8").model, args.model.name
    else:
        config = dataclasses.replace(LLAMA2_7B, n_layers=args.layers)
        model = build_random_int8_model(config, group_size=int8.DEFAULT_GROUP_SIZE)
        label = f"Llama-2-7B shape, {args.layers} layers"
    if not decode_plan.usable(model):
        raise SystemExit(decode_plan.describe(model))
    before = os.environ.get(decode_plan.ENV)
    try:
        exact = same_logits(model, args.position)
        times = {}
        for batch in (1, 4):
            log(f"batch {batch}: {args.rounds} rounds ...")
            times[batch] = measure(model, batch, args.position, args.rounds, args.steps)
    finally:
        if before is None:
            os.environ.pop(decode_plan.ENV, None)
        else:
            with_setting(before)
    section = report(args, label, exact, times)
    log("\n" + section)
    if args.write:
        write_section(args.write, section, "decode_plan.py", label)
    return section


if __name__ == "__main__":
    main()
