"""The prefill (dense) path's two steps on the Llama-2-7B shapes, each against what it replaced, in the same run.

A prefill chunk of more rows than our int8 kernel takes dequantizes each weight from its packed copy into a reused
buffer and multiplies the chunk with it (int8.py, `Int8Linear._packed_forward`). This script times both steps:
- dequantization: the vector code (AVX2, non-temporal stores for buffers larger than the caches) against the scalar
  code of the same library (`kernels.dequantize(..., impl=)`), into fp32 and into bf16;
- the fp32 matmul (CPUs without native bf16): oneDNN (`int8.dense_matmul`) against torch's default `F.linear`
  (MKL in torch's CPU wheels), for a chunk of `--rows` rows (default 128, the engine's prefill chunk);
- on CPUs with AMX-BF16 or AVX512-BF16, the whole bf16 step as Int8Linear runs it for chunks of `--step-rows` rows
  (default 128 and 512): each path of our bf16 kernel straight from the packed weight (kernels/matmul.py: `amx`,
  `avx512bf16`) against dequantizing into bf16 and oneDNN's matmul (`int8.dense_matmul`), from fp32 rows to fp32
  outputs; and on the amx and vnni512 paths, in the same rounds, our int8 kernel's GEMM with decode's numerics (what
  row-exact prefill multiplies with) against the CPU's best bf16 kernel path;
- on the avx2 and avxvnni paths (CPUs with AVX2 only, or AVX-VNNI without AVX-512, or `INT8SERVE_KERNEL=avx2` /
  `avxvnni`), the whole prefill step for chunks of `--step-rows` rows: our int8 kernel's GEMM on 16-bit activations
  (what Int8Linear runs there, int8.kernel_rows) against dequantizing into fp32 and oneDNN's fp32 matmul
  (`INT8SERVE_PREFILL_MATMUL=dense`). To measure such a CPU's two paths on a CPU with more, hold oneDNN to the same
  instructions: `INT8SERVE_KERNEL=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python -m benchmarks.prefill_paths`, or
  `INT8SERVE_KERNEL=avxvnni ONEDNN_MAX_CPU_ISA=AVX2_VNNI ...` (then the bf16 kernel, which such CPUs lack, is left
  out).
Candidates alternate within each round (which goes first alternates too), on weights that rotate through several
distinct copies; medians over all rounds; the ratios are medians of per-round ratios.

    python -m benchmarks.prefill_paths --write docs/benchmarks.md    # about 2 minutes
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import publish
from benchmarks.machine import CpuShares, cpu_label, log, machine_description
from int8serve.engine import int8, kernels
from int8serve.engine.kernels import matmul as prefill_matmul

SCRIPT = "prefill_paths.py"
SHAPES = {"qkvo": (4096, 4096), "gate/up": (4096, 11008), "down": (11008, 4096)}
COPIES = 3
HELD = ("INT8SERVE_KERNEL", "ONEDNN_MAX_CPU_ISA", "INT8SERVE_PREFILL_MATMUL")  # settings the command line shows
EXACT_GEMM_PATHS = ("amx", "vnni512")  # our int8 kernel's paths with a GEMM of decode's numerics beside a bf16 kernel


def alternate(candidates: dict[str, Callable[[int], object]], rounds: int, copies: int) -> dict[str, list[float]]:
    """Seconds per call of each candidate (called with the copy's index), candidates alternating in every round."""
    seconds: dict[str, list[float]] = {name: [] for name in candidates}
    for call in candidates.values():  # warm-up: oneDNN's primitive, first touch of the buffers
        call(0)
    for index in range(rounds):
        names = list(candidates) if index % 2 == 0 else list(reversed(candidates))
        for name in names:
            started = time.perf_counter()
            candidates[name](index % copies)
            seconds[name].append(time.perf_counter() - started)
    return seconds


def ratio(new: list[float], old: list[float]) -> float:
    """How many times faster `new` is, the median of the per-round ratios."""
    return statistics.median(o / n for n, o in zip(new, old, strict=True))


def measure_shape(k: int, n: int, rows: int, rounds: int, step_rows: Sequence[int] = (128, 512)) -> list[str]:
    generator = torch.Generator().manual_seed(n * k)
    scale = (torch.rand(n, k // 32, generator=generator) * 0.01 + 0.001).to(torch.bfloat16).float()
    packed = [kernels.pack_weight(torch.randint(-127, 128, (n, k), generator=generator, dtype=torch.int8), scale, 32)
              for _ in range(COPIES)]
    vector = kernels.path() if kernels.path() != "scalar" else None
    lines = []
    for dtype, name in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
        buffer = torch.empty(n, k, dtype=dtype)
        candidates = {"scalar": lambda i, b=buffer: kernels.dequantize(packed[i], b, impl="scalar")}
        if vector:
            candidates[vector] = lambda i, b=buffer: kernels.dequantize(packed[i], b, impl=vector)
        seconds = alternate(candidates, rounds, COPIES)
        cells = [f"{statistics.median(seconds[c]) * 1e3:.1f} ms" for c in candidates]
        gain = f"{ratio(seconds[vector], seconds['scalar']):.2f}×" if vector else "—"
        lines.append(f"| {k}→{n} | dequantize into {name} | {' | '.join(cells + ['—'] * (2 - len(cells)))} | "
                     f"{gain} |")
    dense = [torch.empty(n, k) for _ in range(COPIES)]
    for i in range(COPIES):
        kernels.dequantize(packed[i], dense[i])
    x = torch.randn(rows, k, generator=generator)
    candidates = {"F.linear": lambda i: F.linear(x, dense[i]), "dense_matmul": lambda i: int8.dense_matmul(x, dense[i])}
    seconds = alternate(candidates, rounds, COPIES)
    flops = 2 * rows * n * k
    cells = [f"{statistics.median(seconds[c]) * 1e3:.1f} ms ({flops / statistics.median(seconds[c]) / 1e9:.0f} "
             "GFLOP/s)" for c in candidates]
    lines.append(f"| {k}→{n} | fp32 matmul, {rows} rows | {' | '.join(cells)} | "
                 f"{ratio(seconds['dense_matmul'], seconds['F.linear']):.2f}× |")
    wide16 = kernels.path() in int8.WIDE16_PATHS
    for count in step_rows if prefill_matmul.available() and not wide16 else ():
        lines += measure_bf16_kernel(k, n, count, rounds, packed, generator)
    for count in step_rows if wide16 else ():
        lines += measure_wide16_kernel(k, n, count, rounds, packed, generator)
    return lines


def measure_wide16_kernel(k: int, n: int, rows: int, rounds: int, packed: list[kernels.PackedWeight],
                          generator: torch.Generator) -> list[str]:
    """The prefill step of the avx2 or avxvnni path from fp32 rows to fp32 outputs: dequantize + oneDNN's fp32 matmul
    against our int8 kernel (its GEMM from 16 rows up, precise activations, as Int8Linear calls it); on the avxvnni
    path also the avx2 path's GEMM in the same rounds (vpmaddwd + vpaddd where avxvnni has vpdpwssd), a line more."""
    path = kernels.path()
    buffer = torch.empty(n, k)
    x = torch.randn(rows, k, generator=generator)

    def dequantized(i: int) -> torch.Tensor:
        kernels.dequantize(packed[i], buffer)
        return int8.dense_matmul(x, buffer)

    candidates = {"dequantize + oneDNN": dequantized}
    for name in ("avx2", path):
        candidates[name] = lambda i, name=name: kernels.int8_gemv(x, packed[i], impl=name,
                                                                   precise=int8.PRECISE_ACTIVATIONS)
    seconds = alternate(candidates, rounds, COPIES)
    flops = 2 * rows * n * k

    def cell(name: str) -> str:
        median = statistics.median(seconds[name])
        return f"{median * 1e3:.1f} ms ({flops / median / 1e9:.0f} GFLOP/s)"

    gain = ratio(seconds[path], seconds["dequantize + oneDNN"])
    lines = [f"| {k}→{n} | fp32 prefill step, {rows} rows, our int8 kernel's `{path}` GEMM | "
             f"{cell('dequantize + oneDNN')} | {cell(path)} | {gain:.2f}× |"]
    if path != "avx2":
        lines.append(f"| {k}→{n} | fp32 prefill step, {rows} rows: the `{path}` GEMM against the `avx2` one | "
                     f"{cell('avx2')} | {cell(path)} | {ratio(seconds[path], seconds['avx2']):.2f}× |")
    return lines


def measure_bf16_kernel(k: int, n: int, rows: int, rounds: int, packed: list[kernels.PackedWeight],
                        generator: torch.Generator) -> list[str]:
    """The bf16 prefill step from fp32 rows to fp32 outputs: dequantize + oneDNN against each path of our bf16
    kernel, one line per path; on the amx and vnni512 paths a line more, in the same rounds: our int8 kernel's GEMM
    with decode's numerics (row-exact prefill: INT8SERVE_PREFILL_MATMUL=row-exact on the amx path, the default on the
    vnni512 one) against the CPU's best bf16 kernel path."""
    buffer = torch.empty(n, k, dtype=torch.bfloat16)
    x = torch.randn(rows, k, generator=generator)

    def dequantized(i: int) -> torch.Tensor:
        kernels.dequantize(packed[i], buffer)
        return int8.dense_matmul(x, buffer).float()

    candidates = {"dequantize + oneDNN": dequantized}
    for path in prefill_matmul.paths():
        candidates[path] = lambda i, path=path: prefill_matmul.matmul(x, packed[i], path=path)
    exact = kernels.path() if kernels.path() in EXACT_GEMM_PATHS else None
    if exact:
        candidates["int8"] = lambda i: kernels.int8_gemv(x, packed[i], precise=True)
    seconds = alternate(candidates, rounds, COPIES)
    flops = 2 * rows * n * k

    def cell(name: str) -> str:
        median = statistics.median(seconds[name])
        return f"{median * 1e3:.1f} ms ({flops / median / 1e12:.2f} TFLOP/s)"

    lines = [f"| {k}→{n} | bf16 prefill step, {rows} rows, our `{path}` path | {cell('dequantize + oneDNN')} | "
             f"{cell(path)} | {ratio(seconds[path], seconds['dequantize + oneDNN']):.2f}× |"
             for path in prefill_matmul.paths()]
    if exact:
        best = prefill_matmul.path()
        lines.append(f"| {k}→{n} | row-exact prefill step, {rows} rows: our int8 kernel's `{exact}` GEMM (decode's "
                     f"numerics) against our bf16 kernel's `{best}` path | {cell(best)} | {cell('int8')} | "
                     f"{ratio(seconds['int8'], seconds[best]):.2f}× |")
    return lines


def report(args: argparse.Namespace, lines: list[str], load: float) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    held = "".join(f"{name}={os.environ[name]} " for name in HELD if os.environ.get(name))
    library = "oneDNN" if int8.onednn_fp32() else "F.linear (no oneDNN in this torch)"
    return "\n".join([
        f"## Prefill path: dequantization, the fp32 matmul and our bf16 kernel (`benchmarks/{SCRIPT}`, {cpu_label()})",
        "",
        f"- Command: `{held}python -m benchmarks.{SCRIPT.removesuffix('.py')} --rows {args.rows} --step-rows "
        f"{' '.join(map(str, args.step_rows))} --rounds {args.rounds}"
        + (f" --write {args.write}`" if args.write else "`"),
        f"- Date: {now}; CPU: {machine_description()}; {torch.get_num_threads()} threads; torch {torch.__version__}.",
        f"- Old: the scalar dequantization, torch's `F.linear` (MKL); new: the `{kernels.path()}` path's vector "
        f"code, `int8.dense_matmul` ({library}); on CPUs with AMX-BF16 or AVX512-BF16, for the bf16 step: dequantize + "
        f"oneDNN (old) and each path of our bf16 kernel (new), and on the amx and vnni512 paths our int8 kernel's "
        f"GEMM with decode's numerics (new, row-exact) against the best of those paths (old); on the avx2 and avxvnni "
        f"paths, for the fp32 step: dequantize + oneDNN (old) and our int8 kernel (new). The prefill path on this "
        f"CPU: {int8.describe_dense()}.",
        f"- {args.rounds} alternating rounds, weights rotating through {COPIES} copies; other processes used "
        f"{load:.0%} of the CPUs.", "",
        "| shape K→N | step | old | new | new ÷ old (speed) |", "|---|---|---|---|---|", *lines, ""])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=f"python -m benchmarks.{SCRIPT.removesuffix('.py')}", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=128, help="rows of the matmul (default 128, a prefill chunk)")
    parser.add_argument("--step-rows", "--bf16-rows", dest="step_rows", type=int, nargs="+", default=[128, 512],
                        metavar="ROWS", help="rows of the whole prefill step compared (the bf16 step on CPUs with "
                        "AMX-BF16 or AVX512-BF16, the avx2 or avxvnni path's fp32 step; default 128 512: a server's "
                        "prefill chunk, a long prompt in one forward)")
    parser.add_argument("--rounds", type=int, default=6, help="alternating rounds (default 6)")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--write", type=Path, metavar="FILE", help="replace this script's section of FILE")
    args = parser.parse_args(argv)
    if args.rows < 1 or args.rounds < 1 or min(args.step_rows) < 1:
        parser.error("--rows, --step-rows and --rounds must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    load = CpuShares()
    lines = []
    for shape in args.shapes:
        lines += measure_shape(*SHAPES[shape], args.rows, args.rounds, args.step_rows)
        log(lines[-1])
    text = report(args, lines, load.others())
    publish(text, args.write, SCRIPT, section_label())


def section_label() -> str:
    """This CPU's section; a run with a path held (INT8SERVE_KERNEL=avx2 ...) keeps one of its own."""
    return " ".join([cpu_label(), *(f"{name}={os.environ[name]}" for name in HELD if os.environ.get(name))])


if __name__ == "__main__":
    main()
