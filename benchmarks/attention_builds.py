"""Builds of the decode attention kernel (engine/kernels/attention.cpp) compared on a decode step of the Llama-2-7B
shape, in the same run.

Why: decode attention reads each row's keys and values once, from memory, and how fast it streams them depends on
the CPU's prefetchers, which differ between this project's machines (Sapphire Rapids, Zen 4, AVX2-only Zen 3). A
change measured minutes apart from its reference says little on a shared machine, so this script builds each
variant (the project's flags plus `-D` defines, or the sources of a git revision), checks that every build gives the
same bits, and times the attention of one decode step (rotary embedding, cache write, attention; no projections)
for all 32 layers, each over its own cache, build after build in a random order, round after round.

    python -m benchmarks.attention_builds --revision HEAD~1                       # this code against the commit before
    python -m benchmarks.attention_builds --variant "1 head=-DINT8SERVE_ATTENTION_HEADS_TOGETHER=1" --variant now=
    python -m benchmarks.attention_builds --revision HEAD~1 --impl avx2 --kv-cache bf16 int8

Cases (`--cases`): `b1@512` is one row at position 512, `b4@512-128` four rows at 512, 384, 256 and 128 (the
batch-4 step of benchmarks/engine.py), `b4@1020-960`, `b1@2000`, `b4@80-83`. KV GB/s = the cache bytes a step reads
÷ its median time; the ratios are medians of the per-round ratios (reference time ÷ this build's).
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import display_command, publish
from benchmarks.gemv_builds import (
    add_build_arguments,
    builds_in_order,
    compile_variant,
    describe_variants,
    speedup_cell,
    timed_in_random_order,
)
from benchmarks.machine import CpuShares, cpu_label, log, machine_description
from int8serve.engine import kv_int8
from int8serve.engine.kernels import attention
from int8serve.engine.model import KV_CACHES as MODEL_KV_CACHES
from int8serve.engine.model import rope_tables

SCRIPT = "attention_builds.py"
HEADS, HEAD_DIM, LAYERS = 32, 128, 32  # Llama-2-7B: 32 query and kv heads of 128
CASES = {"b1@512": (512,), "b4@512-128": (512, 384, 256, 128), "b4@1020-960": (1020, 1000, 980, 960),
         "b1@2000": (2000,), "b4@80-83": (80, 81, 82, 83)}
KV_CACHES = ("bf16", "fp16", "int8")


@dataclass
class Step:
    """Random q, k, v of one decode step's rows (one slot each) and each layer's cache, filled past every row."""

    positions: tuple[int, ...]
    kv_cache: str

    def __post_init__(self) -> None:
        g = torch.Generator().manual_seed(sum(self.positions))
        rows, length = len(self.positions), max(self.positions) + 8
        self.q, self.k, self.v = (torch.randn(LAYERS, rows, HEADS, HEAD_DIM, generator=g) for _ in range(3))
        self.cos, self.sin = rope_tables(HEAD_DIM, length, 10000.0)
        self.slots = torch.arange(rows, dtype=torch.int64)
        self.position_tensor = torch.tensor(self.positions, dtype=torch.int64)
        self.caches = [(self._cache(g, rows, length), self._cache(g, rows, length)) for _ in range(LAYERS)]

    def _cache(self, g: torch.Generator, rows: int, length: int) -> torch.Tensor:
        if self.kv_cache != "int8":
            return torch.randn(rows, HEADS, length, HEAD_DIM, generator=g).to(MODEL_KV_CACHES[self.kv_cache])
        cache = torch.empty(rows, HEADS, length, kv_int8.width(HEAD_DIM), dtype=torch.int8)
        for slot in range(rows):
            attention.quantize_into(cache[slot], torch.randn(HEADS, length, HEAD_DIM, generator=g))
        return cache

    def kv_bytes(self) -> int:
        """The cache bytes one step reads: every row's keys and values [0, position] in every layer."""
        row_bytes = self.caches[0][0].shape[-1] * self.caches[0][0].element_size()
        return sum(p + 1 for p in self.positions) * HEADS * row_bytes * 2 * LAYERS

    def attend(self, lib: ctypes.CDLL, impl: str) -> list[torch.Tensor]:
        return [attention.decode_attention(self.q[i], self.k[i], self.v[i], self.cos, self.sin, self.slots,
                                           self.position_tensor, cache_k, cache_v, impl, library=lib)  # type: ignore
                for i, (cache_k, cache_v) in enumerate(self.caches)]

    def seconds(self, lib: ctypes.CDLL, impl: str) -> float:
        started = time.perf_counter()
        self.attend(lib, impl)
        return time.perf_counter() - started


def time_case(libraries: dict[str, ctypes.CDLL], step: Step, impl: str, rounds: int, order: random.Random
              ) -> dict[str, list[float]]:
    """Per-round step times of every build; exits if two builds give different bits."""
    outputs = {label: step.attend(lib, impl) for label, lib in libraries.items()}  # also the warm-up
    first = next(iter(outputs.values()))
    for label, out in outputs.items():
        if not all(torch.equal(a, b) for a, b in zip(first, out, strict=True)):
            sys.exit(f"error: {label!r} gives other bits than {next(iter(outputs))!r} at {step.positions}")
    return timed_in_random_order(libraries, rounds, order, lambda lib: step.seconds(lib, impl))


def report(args: argparse.Namespace, rows: list[tuple[str, str, int, dict[str, list[float]]]], load: float,
           impl: str) -> str:
    labels = [v.label for v in args.variant]
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = ("| case | KV cache | " + " | ".join(f"{label} ms (KV GB/s)" for label in labels) + " | "
              + " | ".join(f"{label} speed-up over {labels[0]}" for label in labels[1:]) + " |")
    lines = [f"## Builds of the decode attention kernel compared (`benchmarks/{SCRIPT}`, {cpu_label()}, {impl} path)",
             "",
             f"- Command: `{display_command(SCRIPT.removesuffix('.py'), args.argv, ['--write'])}`",
             f"- Date: {now}; CPU: {machine_description()}; attention path {impl}, {args.threads} threads; the "
             f"attention of one decode step in all {LAYERS} layers ({HEADS} heads of {HEAD_DIM}), each over its own "
             f"cache; {args.rounds} rounds, the builds in a random order each; same bits checked first.",
             describe_variants(args.variant),
             f"- Other processes used {load:.0%} of the CPUs during the run. The ratios are medians of the "
             "per-round ratios, with their quartiles.", "", header, "|" + "---|" * (2 + 2 * len(labels) - 1)]
    for case, kv_cache, kv_bytes, seconds in rows:
        medians = {label: statistics.median(seconds[label]) for label in labels}
        cells = [f"{medians[label] * 1e3:.1f} ({kv_bytes / medians[label] / 1e9:.1f})" for label in labels]
        cells += [speedup_cell(seconds[labels[0]], seconds[label]) for label in labels[1:]]
        lines.append(f"| {case} | {kv_cache} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{SCRIPT.removesuffix('.py')}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_build_arguments(parser, "attention.cpp")
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=["b1@512", "b4@512-128", "b4@1020-960"])
    parser.add_argument("--kv-cache", nargs="+", choices=KV_CACHES, default=["bf16"])
    parser.add_argument("--impl", choices=["auto", "avx512", "avx2", "scalar"], default="auto",
                        help="the attention path (default: the CPU's best)")
    parser.add_argument("--rounds", type=int, default=12, help="rounds per case (default 12)")
    parser.add_argument("--write", type=Path, metavar="FILE", help="replace this script's section of FILE")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    args.variant = builds_in_order(parser, args)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if not attention.available():
        sys.exit(f"error: the attention kernel is unavailable: {attention.unavailable_reason()}")
    impl = attention.resolve(args.impl)
    args.threads = attention.kernel_threads()
    with tempfile.TemporaryDirectory(prefix="int8serve-attention-builds-") as tmp:
        libraries = {v.label: compile_variant(v, Path(tmp), attention.SOURCE, attention._open) for v in args.variant}
        log(f"built {len(libraries)} variants; attention path {impl}, {args.threads} threads")
        load = CpuShares()
        order = random.Random(0)
        rows = []
        for kv_cache in args.kv_cache:
            for case in args.cases:
                step = Step(CASES[case], kv_cache)
                seconds = time_case(libraries, step, args.impl, args.rounds, order)
                rows.append((case, kv_cache, step.kv_bytes(), seconds))
                log(f"{case} {kv_cache}: " + ", ".join(f"{label} {statistics.median(t) * 1e3:.2f} ms"
                                                       for label, t in seconds.items()))
                del step
        text = report(args, rows, load.others(), impl)
    publish(text, args.write, SCRIPT, f"{cpu_label()} {impl}")


if __name__ == "__main__":
    main()
