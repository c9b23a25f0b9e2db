"""How long our kernels take to build: the project's command (GCC's link-time optimizer, one job per CPU, see
builds._parallel_flags) against the same command on one core (`-fno-lto`), source by source, in the same run.

Why: a server's first start compiles every kernel before it answers (attention.cpp's many template instances took
36 s on a Zen 4's 2 cores, 80 s on a Zen 1), and so does each test run on a clean machine. Builds alternate between
the two commands round after round, into a temporary folder (the kernels' cache is not touched). That both give the
same code and the same speed is measured by the *_builds benchmarks with `--variant now= --variant "one
core=-fno-lto"` (same bits, or they stop).

    python -m benchmarks.kernel_builds                       # every source, 2 rounds
    python -m benchmarks.kernel_builds --sources attention --rounds 3 --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import display_command, publish
from benchmarks.gemv_builds import compile_source
from benchmarks.machine import CpuShares, cpu_label, log, machine_description
from int8serve.engine import kernels
from int8serve.engine.kernels import activation, attention, builds, matmul

SCRIPT = "kernel_builds.py"
SOURCES = {"gemv": kernels.SOURCE, "attention": attention.SOURCE, "matmul": matmul.SOURCE,
           "activation": activation.SOURCE}
ONE_CORE = "-fno-lto"


def build_seconds(source: Path, output: Path, extra: Sequence[str] = ()) -> float:
    """Wall time of one build of `source` with the project's command (plus `extra` flags); exits if it fails."""
    started = time.perf_counter()
    compile_source(source, output, extra, name=source.name)
    return time.perf_counter() - started


def time_source(source: Path, folder: Path, rounds: int) -> dict[str, list[float]]:
    """Per-round build times of `source`, the project's command and one core taking turns going first."""
    seconds: dict[str, list[float]] = {"project": [], "one core": []}
    for round_index in range(rounds):
        order = ["project", "one core"] if round_index % 2 == 0 else ["one core", "project"]
        for label in order:
            extra = [ONE_CORE] if label == "one core" else []
            seconds[label].append(build_seconds(source, folder / f"{source.stem}-{round_index}-{label[0]}.so", extra))
    return seconds


def report(argv: Sequence[str], results: dict[str, dict[str, list[float]]], load: float) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    flags = " ".join(builds._parallel_flags(builds._compiler())) or "(none: not GCC)"
    lines = [f"## Building the kernels (`benchmarks/{SCRIPT}`, {cpu_label()})", "",
             f"- Command: `{display_command(SCRIPT.removesuffix('.py'), argv, ['--write'])}`",
             f"- Date: {now}; CPU: {machine_description()}; compiler `{builds._compiler()}`; the project's parallel "
             f"flags `{flags}`, against the same command with `{ONE_CORE}`.",
             f"- Other processes used {load:.0%} of the CPUs during the run. Seconds are medians of the rounds; the "
             "ratio is the median of the per-round ratios (one core's time ÷ the project's).", "",
             "| source | project s | one core s | speed-up |", "|---|---|---|---|"]
    for name, seconds in results.items():
        ratios = [b / a for a, b in zip(seconds["project"], seconds["one core"], strict=True)]
        lines.append(f"| {SOURCES[name].name} | {statistics.median(seconds['project']):.1f} | "
                     f"{statistics.median(seconds['one core']):.1f} | **{statistics.median(ratios):.2f}x** |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{SCRIPT.removesuffix('.py')}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", nargs="+", choices=list(SOURCES), default=list(SOURCES))
    parser.add_argument("--rounds", type=int, default=2, help="builds of each source with each command (default 2)")
    parser.add_argument("--write", type=Path, metavar="FILE", help="replace this script's section of FILE")
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    load = CpuShares()
    results = {}
    with tempfile.TemporaryDirectory(prefix="int8serve-kernel-builds-") as tmp:
        for name in args.sources:
            results[name] = time_source(SOURCES[name], Path(tmp), args.rounds)
            log(f"{name}: " + ", ".join(f"{label} {statistics.median(s):.1f} s" for label, s in results[name].items()))
    publish(report(args.argv, results, load.others()), args.write, SCRIPT, cpu_label())


if __name__ == "__main__":
    main()
