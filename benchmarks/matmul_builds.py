"""Builds of our bf16 prefill kernel (engine/kernels/matmul.cpp: AMX-BF16 tiles, or AVX512-BF16 vectors) compared on
the Llama-2-7B prefill shapes, in the same run.

Why: the kernel's speed at the server's 128-row chunks depends on how its vector work (making each B tile from the
int8 weights) and its tile products share a core, and on when the weights arrive from memory; both differ between
CPUs and move with the host's load, so a change is timed against its reference round after round in one run. Each
variant is matmul.cpp built with the project's flags plus `-D` defines, or its sources at a git revision; every build
must give the same bits (checked first: a build that does not stops the run). Calls rotate through copies of the
weight (about `ROTATION_BYTES` together), so that each call reads its weight from memory, as prefill does.

    python -m benchmarks.matmul_builds --revision HEAD~1                     # this code against the commit before
    python -m benchmarks.matmul_builds --variant now= --variant "4 ahead=-DINT8SERVE_MATMUL_JOBS_AHEAD=4"
    python -m benchmarks.matmul_builds --revision HEAD~1 --path avx512bf16 --rows 48 128

The ratios are medians of the per-round ratios (the reference's time ÷ this build's), with their quartiles. A second
build of the same code (`--variant "again=-DUNUSED=1"`) shows what the run cannot tell apart: before 9fbf3f0 two such
builds differed by up to 18%, each in its own steady way, because the kernel's scratch sat where malloc put it.
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
from int8serve.engine import kernels
from int8serve.engine.kernels import matmul

SCRIPT = "matmul_builds.py"
SHAPES = {"qkvo": (4096, 4096), "gate/up": (4096, 11008), "down": (11008, 4096)}  # K -> N
ROTATION_BYTES = 0.6e9
CALLS = 4  # per build and round, each on the next weight copy


@dataclass
class Case:
    """One shape at one row count: random rows, and copies of one random packed weight (a scale per 32 inputs)."""

    shape: str
    rows: int

    def __post_init__(self) -> None:
        k, n = SHAPES[self.shape]
        g = torch.Generator().manual_seed(k + n + self.rows)
        weight = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
        scale = (torch.rand(n, k // 32, generator=g) * 0.01 + 0.001).to(torch.bfloat16).float()
        copies = max(2, int(ROTATION_BYTES // (n * k)))
        self.weights = [kernels.pack_weight(torch.roll(weight, i, dims=0), scale, 32) for i in range(copies)]
        self.x = torch.randn(self.rows, k, generator=g)
        self.next = 0

    def multiply_adds(self) -> int:
        k, n = SHAPES[self.shape]
        return self.rows * k * n

    def product(self, lib: ctypes.CDLL, path: str, copy: int = 0) -> torch.Tensor:
        return matmul.matmul(self.x, self.weights[copy], path=path, library=lib)

    def seconds(self, lib: ctypes.CDLL, path: str) -> float:
        """One call's time, the mean of CALLS calls on the next weight copies."""
        started = time.perf_counter()
        for _ in range(CALLS):
            self.product(lib, path, self.next)
            self.next = (self.next + 1) % len(self.weights)
        return (time.perf_counter() - started) / CALLS


def time_case(libraries: dict[str, ctypes.CDLL], case: Case, path: str, rounds: int, order: random.Random
              ) -> dict[str, list[float]]:
    """Per-round call times of every build; exits if two builds give different bits."""
    outputs = {label: case.product(lib, path) for label, lib in libraries.items()}  # also the warm-up
    reference = next(iter(outputs))
    for label, out in outputs.items():
        if not torch.equal(outputs[reference], out):
            sys.exit(f"error: {label!r} gives other bits than {reference!r} ({case.shape}, {case.rows} rows)")
    return timed_in_random_order(libraries, rounds, order, lambda lib: case.seconds(lib, path))


def report(args: argparse.Namespace, rows: list[tuple[Case, dict[str, list[float]]]], load: float) -> str:
    labels = [v.label for v in args.variant]
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = ("| shape K→N | rows | " + " | ".join(f"{label} ms (G multiply-adds/s)" for label in labels) + " | "
              + " | ".join(f"{label} speed-up over {labels[0]}" for label in labels[1:]) + " |")
    lines = [f"## Builds of the bf16 prefill kernel compared (`benchmarks/{SCRIPT}`, {cpu_label()}, {args.path} path)",
             "",
             f"- Command: `{display_command(SCRIPT.removesuffix('.py'), args.argv, ['--write'])}`",
             f"- Date: {now}; CPU: {machine_description()}; path {args.path}, {args.threads} threads; fp32 rows, a "
             f"bf16 weight scale per 32 inputs, the weights rotating through copies ({ROTATION_BYTES / 1e9:.1f} GB "
             f"a shape); {args.rounds} rounds of {CALLS} calls, the builds in a random order each; same bits "
             "checked first.",
             describe_variants(args.variant),
             f"- Other processes used {load:.0%} of the CPUs during the run. The ratios are medians of the "
             "per-round ratios, with their quartiles.", "", header, "|" + "---|" * (2 + 2 * len(labels) - 1)]
    for case, seconds in rows:
        k, n = SHAPES[case.shape]
        medians = {label: statistics.median(seconds[label]) for label in labels}
        cells = [f"{medians[label] * 1e3:.2f} ({case.multiply_adds() / medians[label] / 1e9:.0f})" for label in labels]
        cells += [speedup_cell(seconds[labels[0]], seconds[label]) for label in labels[1:]]
        lines.append(f"| {k}→{n} ({case.shape}) | {case.rows} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{SCRIPT.removesuffix('.py')}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_build_arguments(parser, "matmul.cpp")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--rows", type=int, nargs="+", default=[128, 512],
                        help="rows a call (default 128, the server's chunk, and 512, a prompt in one forward)")
    parser.add_argument("--path", choices=list(matmul.PATHS), default=None,
                        help="the kernel's path (default: the CPU's first, as prefill takes it)")
    parser.add_argument("--rounds", type=int, default=8, help="rounds per case (default 8)")
    parser.add_argument("--write", type=Path, metavar="FILE", help="replace this script's section of FILE")
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    args.variant = builds_in_order(parser, args)
    if args.rounds < 1 or min(args.rows) < 1:
        parser.error("--rounds and --rows must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if not matmul.available():
        sys.exit(f"error: the bf16 prefill kernel does not run here: {matmul.unavailable_reason()}")
    args.path = args.path or matmul.path()
    if args.path not in matmul.paths():
        sys.exit(f"error: this CPU (or process) cannot run the {args.path} path; it runs {', '.join(matmul.paths())}")
    args.threads = kernels.kernel_threads()
    with tempfile.TemporaryDirectory(prefix="int8serve-matmul-builds-") as tmp:
        libraries = {v.label: compile_variant(v, Path(tmp), matmul.SOURCE, matmul._open) for v in args.variant}
        log(f"built {len(libraries)} variants; path {args.path}, {args.threads} threads")
        load = CpuShares()
        order = random.Random(0)
        rows = []
        for shape in args.shapes:
            for count in args.rows:
                case = Case(shape, count)
                seconds = time_case(libraries, case, args.path, args.rounds, order)
                rows.append((case, seconds))
                log(f"{shape} {count} rows: " + ", ".join(f"{label} {statistics.median(t) * 1e3:.2f} ms"
                                                          for label, t in seconds.items()))
                del case.weights
        text = report(args, rows, load.others())
    publish(text, args.write, SCRIPT, f"{cpu_label()} {args.path}")


if __name__ == "__main__":
    main()
