"""Builds of our int8 decode kernel (engine/kernels/gemv.cpp) that differ in a compile-time setting, timed on the
Llama-2-7B decode shapes in the same run.

Why: a kernel change that helps one CPU can hurt another (this project's machines have been a Sapphire Rapids, a
Zen 4 and an AVX2-only Zen 3), and the machine's bandwidth drifts within seconds, so a before/after pair measured
minutes apart says little. This script compiles gemv.cpp once per variant (the project's flags plus the variant's
`-D` defines) into a temporary folder, loads each build with ctypes, and times `i8s_gemv` of each in turn, round
after round (alternating which goes first), on weights that rotate through more than 1 GB of distinct copies so
that no call finds its weight in a cache. The path is the CPU's best (`INT8SERVE_KERNEL` forces another) and the
activations are precise (two int8 rows per row), as decode runs them. Every build must give the same bits.

    python -m benchmarks.gemv_builds                      # the default build against one without the prefetch hint
    python -m benchmarks.gemv_builds --variant "prefetch 4096=-DINT8SERVE_PREFETCH_BYTES=4096" --rows 1 4
    python -m benchmarks.gemv_builds --variant now= --revision ebe2a2e --rows 4   # this code against a commit's
    python -m benchmarks.gemv_builds --variant now= --variant "one core=-fno-lto" --rows 1 128   # GCC's LTO or not

A variant's flags are `-D` defines, and `-fno-lto`: the build on one core, without GCC's link-time optimizer
(builds._parallel_flags), which must give the same code. The working tree's source without flags is the library the
server builds, loaded from the kernels' cache. `--revision REV` adds a build of the kernel's sources as they were at
git revision REV (gemv.cpp and the headers beside it), so that a change to the code itself is timed against the code
before it in the same run.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.common import publish
from benchmarks.machine import CpuShares, cpu_label, log, machine_description
from int8serve.engine import kernels
from int8serve.engine.kernels import builds, gemv

SCRIPT = "gemv_builds.py"
DEFAULT_VARIANTS = ("default=", "no prefetch=-DINT8SERVE_PREFETCH_BYTES=0")
SHAPES = {"qkvo": (4096, 4096), "gate/up": (4096, 11008), "down": (11008, 4096), "lm_head": (4096, 32000)}
ROTATION_BYTES = 1.1e9
# flags a variant may add besides -D defines: -fno-lto builds on one core as before builds._parallel_flags (the
# same code, which a variant "one core=-fno-lto" shows in the same run)
OTHER_FLAGS = ("-fno-lto",)


@dataclass(frozen=True)
class Variant:
    label: str
    defines: tuple[str, ...]
    revision: str | None = None  # a git revision whose sources to build (None: the working tree's)


def parse_variant(text: str) -> Variant:
    """`LABEL=FLAGS` (FLAGS: -D defines, shell-quoted, may be empty) -> Variant."""
    label, sep, flags = text.partition("=")
    if not sep or not label.strip():
        raise argparse.ArgumentTypeError(f"a variant is LABEL=FLAGS (e.g. 'no prefetch=-DX=0'), not {text!r}")
    defines = tuple(shlex.split(flags))
    if any(not flag.startswith("-D") and flag not in OTHER_FLAGS for flag in defines):
        raise argparse.ArgumentTypeError(f"only -D defines and {', '.join(OTHER_FLAGS)} may vary between builds, "
                                         f"not {flags!r}")
    return Variant(label.strip(), defines)


def revision_sources(revision: str, folder: Path, source: Path = kernels.SOURCE) -> Path:
    """A kernel source (gemv.cpp; attention.cpp...) and the headers beside it as they were at git `revision`,
    written into `folder`; the source's path there."""
    repo = Path(__file__).resolve().parent.parent
    kernels_dir = source.parent.relative_to(repo).as_posix()

    def git(*words: str) -> str:
        done = subprocess.run(["git", *words], capture_output=True, text=True, cwd=repo, check=False)
        if done.returncode != 0:
            sys.exit(f"error: git {' '.join(words)}: {done.stderr.strip()}")
        return done.stdout

    names = [name for name in git("ls-tree", "--name-only", f"{revision}:{kernels_dir}").split()
             if name == source.name or name.endswith(".h")]
    if source.name not in names:
        sys.exit(f"error: revision {revision} has no {kernels_dir}/{source.name}")
    folder.mkdir(parents=True)
    for name in names:
        (folder / name).write_text(git("show", f"{revision}:{kernels_dir}/{name}"))
    return folder / source.name


def check_variants(parser: argparse.ArgumentParser, variants: Sequence[Variant], too_few: str) -> None:
    """Exit with a usage error unless there are two builds or more, each with a label of its own."""
    if len({v.label for v in variants}) < len(variants):
        parser.error("every variant needs a label of its own")
    if len(variants) < 2:
        parser.error(too_few)


def describe_variants(variants: Sequence[Variant]) -> str:
    """The report's line naming each build: its defines, or the revision whose sources it is."""
    return "- Variants: " + "; ".join(f"{v.label}: " + (f"the sources at {v.revision}" if v.revision else
                                                      f"`{shlex.join(v.defines) or '(no defines)'}`")
                                    for v in variants) + "."


def add_build_arguments(parser: argparse.ArgumentParser, source: str) -> None:
    """--variant and --revision for a script whose builds are the first given as the reference (attention_builds,
    matmul_builds); `source`: the file they build (attention.cpp, matmul.cpp)."""
    parser.add_argument("--variant", type=parse_variant, action="append", default=[],
                        help=f"LABEL=FLAGS, a build of the working tree's {source} with these -D defines (repeat; "
                             "the first build given is the reference)")
    parser.add_argument("--revision", action="append", default=[], metavar="REV",
                        help=f"a build of {source} as it was at git revision REV (repeat; the reference when it "
                             "comes first; without --variant, the working tree is compared with it as 'now')")


def builds_in_order(parser: argparse.ArgumentParser, args: argparse.Namespace) -> list[Variant]:
    """add_build_arguments' builds: the revisions first, then the variants (the working tree as 'now' without any);
    a usage error unless there are two or more, each with a label of its own."""
    variants = [Variant(revision, (), revision) for revision in args.revision] + (args.variant or
                                                                                   [parse_variant("now=")])
    check_variants(parser, variants, "give at least two builds: --revision REV, or two --variant")
    return variants


def timed_in_random_order(libraries: dict[str, ctypes.CDLL], rounds: int, order: random.Random,
                          seconds_of: Callable[[ctypes.CDLL], float]) -> dict[str, list[float]]:
    """`rounds` times of every build, `seconds_of(library)` each, the builds in a new random order every round."""
    seconds: dict[str, list[float]] = {label: [] for label in libraries}
    for _ in range(rounds):
        labels = list(libraries)
        order.shuffle(labels)
        for label in labels:
            seconds[label].append(seconds_of(libraries[label]))
    return seconds


def speedup_cell(reference: Sequence[float], seconds: Sequence[float]) -> str:
    """`**median x** (quartiles)` of the per-round ratios reference time / this build's."""
    ratios = [a / b for a, b in zip(reference, seconds, strict=True)]
    q1, _, q3 = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else (ratios[0],) * 3
    return f"**{statistics.median(ratios):.2f}x** ({q1:.2f}-{q3:.2f})"


def compile_source(source: Path, output: Path, flags: Sequence[str] = (), runner: Sequence[str] = (),
                   name: str | None = None) -> None:
    """`source` built into `output` with the server's own command (builds._command) plus `flags`, under `runner`
    (a command prefix, or none); exits with the compiler's message, naming the build `name`, if it fails."""
    command = [*runner, *builds._command(builds._compiler(), output, source), *flags]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    if result.returncode != 0:
        sys.exit(f"error: building {name or source} failed:\n{result.stderr[-3000:]}")


def compile_variant(variant: Variant, folder: Path, source: Path = kernels.SOURCE,
                    opener: Callable[[Path], ctypes.CDLL] = gemv._open, runner: Sequence[str] = ()
                    ) -> ctypes.CDLL:
    """`source` (gemv.cpp; attention.cpp with attention's opener) of the working tree, or of the variant's
    revision, built with the project's flags and the variant's defines, loaded with `opener`. The working tree's
    source without defines is the library the server builds: its cached build is loaded (built first if need be).
    `runner`: a command to run the compiler under (tests/variant_builds.py: `chrt --idle 0`, in the background)."""
    if not variant.defines and not variant.revision:
        try:
            return opener(kernels.build(source=source))
        except kernels.BuildError as error:
            sys.exit(f"error: building {variant.label!r} failed: {error}")
    number = len(list(folder.glob("variant*.so")))
    output = folder / f"variant{number}.so"
    if variant.revision:
        source = revision_sources(variant.revision, folder / f"sources{number}", source)
    compile_source(source, output, variant.defines, runner, repr(variant.label))
    return opener(output)  # checks the ABI version and declares every function's arguments


@dataclass
class Timing:
    seconds: dict[str, list[float]] = field(default_factory=dict)
    outputs_equal: bool = True


def time_shape(libraries: dict[str, ctypes.CDLL], n: int, k: int, rows: int, rounds: int, calls: int,
               threads: int, rotation_bytes: float = ROTATION_BYTES, group_size: int = 32) -> Timing:
    """Median-ready call times of every build on [rows, k] x [n, k], weights rotating through distinct copies; a
    weight scale per `group_size` inputs (0: per output row)."""
    generator = torch.Generator().manual_seed(n + k)
    block = torch.randint(-127, 128, (n, k), generator=generator, dtype=torch.int8)
    scale = (torch.rand(n, k // group_size if group_size else 1, generator=generator) * 0.01 + 0.001)
    scale = scale.to(torch.bfloat16).float()
    copies = max(2, int(rotation_bytes // (n * k)))
    weights = [kernels.pack_weight(torch.roll(block, i + 1, dims=0), scale if group_size else scale[:, 0], group_size)
               for i in range(copies)]
    x = torch.randn(rows, k, generator=generator)
    timing = Timing({label: [] for label in libraries})
    outputs = {}
    impl = gemv._IMPLS[kernels.path()]  # the CPU's best, or INT8SERVE_KERNEL's
    for round_index in range(rounds):
        order = list(libraries) if round_index % 2 == 0 else list(reversed(libraries))
        for label in order:
            y = torch.empty(rows, n)
            started = time.perf_counter()
            for call in range(calls):
                packed = weights[(round_index * calls + call) % copies]
                status = libraries[label].i8s_gemv(x.data_ptr(), rows, k, packed.data.data_ptr(), n, group_size,
                                                   y.data_ptr(), impl, 1, threads)
                if status != 0:
                    sys.exit(f"error: i8s_gemv of {label!r} returned {status}")
            timing.seconds[label].append((time.perf_counter() - started) / calls)
            outputs[label] = y
    first = next(iter(outputs.values()))
    timing.outputs_equal = all(torch.equal(first, y) for y in outputs.values())
    return timing


def scale_scheme(group_size: int) -> str:
    return f"a bf16 scale per {group_size} weights" if group_size else "a bf16 scale per output row"


def command_line(args: argparse.Namespace) -> str:
    words = ["python", "-m", f"benchmarks.{SCRIPT.removesuffix('.py')}"]
    flagged = [v for v in args.variant if v.revision is None]
    if [f"{v.label}={shlex.join(v.defines)}" for v in flagged] != list(DEFAULT_VARIANTS):
        for v in flagged:
            words += ["--variant", f"{v.label}={shlex.join(v.defines)}"]
    for v in args.variant:
        if v.revision is not None:
            words += ["--revision", v.revision]
    words += ["--shapes", *args.shapes, "--rows", *map(str, args.rows), "--rounds", str(args.rounds)]
    if args.group_size != 32:
        words += ["--group-size", str(args.group_size)]
    return shlex.join(words) + (f" --write {args.write}" if args.write else "")


def report(args: argparse.Namespace, results: list[tuple[str, int, Timing]], load: float) -> str:
    labels = [v.label for v in args.variant]
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    header = "| shape K→N | rows | " + " | ".join(f"{label} GB/s" for label in labels) + " | " + \
        " | ".join(f"{label} ÷ {labels[0]}" for label in labels[1:]) + " |"
    lines = [f"## Builds of the decode kernel compared (`benchmarks/{SCRIPT}`, {cpu_label()})", "",
             f"- Command: `{command_line(args)}`",
             f"- Date: {now}; CPU: {machine_description()}; kernel path {kernels.path()}, precise activations, "
             f"{args.threads} threads, {scale_scheme(args.group_size)}; weights rotate through > 1 GB of copies.",
             describe_variants(args.variant),
             f"- Other processes used {load:.0%} of the CPUs during the run. GB/s = int8 weight bytes per call ÷ "
             "median call time; the ratios are medians of the per-round ratios.", "",
             header, "|" + "---|" * (2 + 2 * len(labels) - 1)]
    for shape, rows, timing in results:
        k, n = SHAPES[shape]
        medians = {label: statistics.median(timing.seconds[label]) for label in labels}
        ratios = [statistics.median(b / a for a, b in zip(timing.seconds[label], timing.seconds[labels[0]],
                                                          strict=True)) for label in labels[1:]]
        same = "" if timing.outputs_equal else " (outputs differ!)"
        lines.append(f"| {k}→{n} ({shape}) | {rows}{same} | "
                     + " | ".join(f"{n * k / medians[label] / 1e9:.1f}" for label in labels) + " | "
                     + " | ".join(f"{r:.2f}×" for r in ratios) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{SCRIPT.removesuffix('.py')}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", type=parse_variant, action="append",
                        help="LABEL=FLAGS, a build with these -D defines (repeat; the first is the reference; "
                             f"default: {' and '.join(repr(v) for v in DEFAULT_VARIANTS)})")
    parser.add_argument("--revision", action="append", default=[], metavar="REV",
                        help="also build the kernel's sources as they were at git revision REV (repeat; after the "
                             "--variant builds)")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=["gate/up", "down"])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4], help="activation rows per call (decode "
                        "batch; precise activations make twice as many int8 rows)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds (default 5)")
    parser.add_argument("--calls", type=int, default=12, help="calls per build and round (default 12)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--group-size", type=int, default=32, choices=(0, 32, 64, 128),
                        help="inputs per weight scale (0: one scale per output row; default 32, the default scheme)")
    parser.add_argument("--write", type=Path, metavar="FILE", help="replace this script's section of FILE")
    args = parser.parse_args(argv)
    args.variant = args.variant or ([parse_variant("now=")] if args.revision
                                    else [parse_variant(v) for v in DEFAULT_VARIANTS])
    args.variant += [Variant(revision, (), revision) for revision in args.revision]
    check_variants(parser, args.variant, "give at least two variants (the first is the reference)")
    if min(args.rows) < 1 or args.rounds < 1 or args.calls < 1 or args.threads < 1:
        parser.error("--rows, --rounds, --calls and --threads must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if not kernels.available():
        sys.exit(f"error: the kernel is unavailable: {kernels.unavailable_reason()}")
    with tempfile.TemporaryDirectory(prefix="int8serve-gemv-builds-") as tmp:
        libraries = {v.label: compile_variant(v, Path(tmp)) for v in args.variant}
        log(f"built {len(libraries)} variants; path {kernels.path()}, {args.threads} threads")
        load = CpuShares()
        results = []
        for shape in args.shapes:
            for rows in args.rows:
                timing = time_shape(libraries, *reversed(SHAPES[shape]), rows, args.rounds, args.calls, args.threads,
                                    group_size=args.group_size)
                results.append((shape, rows, timing))
                log(f"{shape} rows {rows}: " + ", ".join(
                    f"{label} {statistics.median(t) * 1e3:.2f} ms" for label, t in timing.seconds.items()))
        text = report(args, results, load.others())
    publish(text, args.write, SCRIPT, cpu_label())


if __name__ == "__main__":
    main()
