"""The CPU's arithmetic peak for the instructions a prefill can multiply with, and how close the dense matmul gets.

Prefill is compute-bound, so its ceiling on a CPU is the throughput of the multiply instruction it uses. Whether a
goal such as "prefill 2x llama.cpp" is reachable with a given kind of arithmetic is a question of that peak, not of
the code: this script measures it, on this CPU, in the same run as the matmul that uses it.

1. A small C++ probe (compiled here with the project's compiler) times long chains of independent multiply
   instructions in registers on every core at once (OpenMP, one thread per core): fp32 FMA (`vfmadd231ps`), bf16 dot
   products (`vdpbf16ps`, AVX-512 BF16: 32 multiply-adds per zmm instruction) and int8 dot products (`vpdpbusd`,
   AVX-512 VNNI: 64 per zmm; AVX-VNNI on ymm), each where the CPU has it. Multiply-adds per second = the peak.
2. The dense prefill matmul as Int8Linear runs it (`int8.dense_matmul`: bf16 through oneDNN on CPUs with native
   bf16, fp32 elsewhere), for a 512-row chunk on the Llama-2-7B shapes, after the dequantization (not timed).
3. The share of its instruction's peak the matmul reaches, and the prefill tok/s that peak would allow for the 7B
   shape's linear layers alone (2 x 6.48 G multiply-adds per token, the head excluded: prefill computes it for one
   row).

    python -m benchmarks.cpu_peak --write docs/benchmarks.md     # about a minute
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import display_command, publish
from benchmarks.machine import CpuShares, cpu_label, log, machine_description
from int8serve.engine import int8, kernels

# name, instruction (AT&T, {r} is each accumulator), register width, multiply-adds per instruction, flags
PROBES = [
    ("fp32 FMA, zmm", "vfmadd231ps %%zmm30, %%zmm31, %%zmm{r}", 16, {"avx512f"}),
    ("fp32 FMA, ymm", "vfmadd231ps %%ymm14, %%ymm15, %%ymm{r}", 8, {"avx2", "fma"}),
    ("bf16 dot (vdpbf16ps), zmm", "vdpbf16ps %%zmm30, %%zmm31, %%zmm{r}", 32, {"avx512_bf16"}),
    ("int8 dot (vpdpbusd), zmm", "vpdpbusd %%zmm30, %%zmm31, %%zmm{r}", 64, {"avx512_vnni"}),
    ("int8 dot (vpdpbusd), ymm (AVX-VNNI)", "%{{vex%}} vpdpbusd %%ymm14, %%ymm15, %%ymm{r}", 32, {"avx_vnni"}),
    # AVX2's integer products (what gemv.cpp's avx2 path and llama.cpp's AVX2 code run on): products summed in pairs,
    # without the accumulation, which takes a vpaddd (and for vpmaddubsw a vpmaddwd) more
    ("int16 pairs (vpmaddwd), ymm", "vpmaddwd %%ymm14, %%ymm15, %%ymm{r}", 16, {"avx2"}),
    ("uint8 x int8 pairs (vpmaddubsw), ymm", "vpmaddubsw %%ymm14, %%ymm15, %%ymm{r}", 32, {"avx2"}),
]
# Independent chains per thread (ymm0-13 beside the sources ymm14-15): more than latency x pipes of every probe. 10 were
# too few for vdpbf16ps on an AMD EPYC Zen 5 (family 26 model 2, 2026-12-02, 10 and 14 alternated three times, best
# G instructions/s on 2 threads: 12.6 against 14.7; the other probes 14.6-15.3 either way). That machine's whole
# throughput also halved for minutes at a time (every probe ~7.8), whatever the count: best of 3 runs is kept.
ACCUMULATORS = 14
ITERATIONS = 20_000_000
SHAPES = [(4096, 4096, "qkvo"), (4096, 11008, "gate/up"), (11008, 4096, "down")]
LINEAR_MACS_PER_TOKEN = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)  # the 7B shape's blocks (6.48 G)


@dataclass
class Probe:
    name: str
    macs_per_instruction: int
    instructions_per_second: float  # all cores together

    @property
    def macs_per_second(self) -> float:
        return self.instructions_per_second * self.macs_per_instruction


def probe_source(probes: Sequence[tuple[str, str, int, set[str]]]) -> str:
    functions, calls = [], []
    for index, (_, instruction, _, _) in enumerate(probes):
        body = "".join(f'"{instruction.format(r=r)}\\n\\t"' for r in range(ACCUMULATORS))
        functions.append(f"static void probe{index}(long n) {{ for (long i = 0; i < n; ++i) asm volatile({body} ::: "
                         f"\"memory\"); }}")
        calls.append(f"    case {index}: probe{index}(n); break;")
    return "\n".join([
        "#include <chrono>", "#include <cstdio>", "#include <cstdlib>", "#include <omp.h>",
        *functions,
        "int main(int argc, char** argv) {",
        "  const int which = std::atoi(argv[1]); const long n = std::atol(argv[2]);",
        "  const auto start = std::chrono::steady_clock::now();",
        "#pragma omp parallel",
        "  switch (which) {", *calls, "  }",
        "  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();",
        f"  std::printf(\"%.6e\\n\", double(n) * {ACCUMULATORS} * omp_get_max_threads() / seconds);",
        "}",
    ]) + "\n"


def run_probes(threads: int) -> list[Probe]:
    """Instruction throughput of every probe this CPU can run, on `threads` threads at once (best of 3)."""
    flags = kernels.cpu_flags()
    runnable = [p for p in PROBES if p[3] <= flags]
    with tempfile.TemporaryDirectory() as folder:
        source, binary = Path(folder) / "probe.cpp", Path(folder) / "probe"
        source.write_text(probe_source(runnable))
        isa = ["-mavx2", "-mfma", "-mavx512f", "-mavx512bf16", "-mavx512vnni", "-mavxvnni"]
        build = subprocess.run([kernels._compiler(), "-O2", "-fopenmp", *isa, str(source), "-o", str(binary)],
                               capture_output=True, text=True, check=False)
        if build.returncode != 0:
            sys.exit(f"error: the probe did not compile:\n{build.stderr[-2000:]}")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_PROC_BIND": "spread"}
        results = []
        for index, (name, _, macs, _) in enumerate(runnable):
            rates = [float(subprocess.run([str(binary), str(index), str(ITERATIONS)], env=env, capture_output=True,
                                          text=True, check=True).stdout) for _ in range(3)]
            results.append(Probe(name, macs, max(rates)))
            log(f"  {name}: {max(rates) / 1e9:.2f} G instructions/s on {threads} threads")
    return results


def time_dense(m: int, rounds: int) -> dict[str, float]:
    """Seconds (median of `rounds`) of `int8.dense_matmul` of m rows per 7B shape, its dequantized weight ready."""
    dtype = int8.dense_dtype()
    seconds = {}
    for k, n, label in SHAPES:
        weight = (torch.randn(n, k) * 0.02).to(dtype)
        x = torch.randn(m, k)
        int8.dense_matmul(x, weight)  # warm-up (oneDNN's first call builds its kernel)
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            int8.dense_matmul(x, weight)
            times.append(time.perf_counter() - started)
        seconds[label] = sorted(times)[len(times) // 2]
        log(f"  dense {dtype} {m} x {k} -> {n}: {seconds[label] * 1e3:.1f} ms")
    return seconds


def report(args: argparse.Namespace, probes: list[Probe], dense: dict[str, float], load: float) -> str:
    dtype = int8.dense_dtype()
    used = next((p for p in probes if p.name.startswith("bf16")), None) if dtype == torch.bfloat16 else \
        next((p for p in probes if p.name.startswith("fp32 FMA, zmm")), None) or \
        next((p for p in probes if p.name.startswith("fp32")), None)
    lines = [
        f"## Arithmetic peak and the dense prefill matmul ({cpu_label()})",
        "",
        f"- Command: `{display_command('cpu_peak', sys.argv[1:])}`",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; CPU: {machine_description()}; "
        f"{args.threads} threads; torch {torch.__version__}; other processes used {load:.0%} of the CPUs.",
        f"- Peak: {ACCUMULATORS} independent chains of one instruction in registers per thread, all threads at once, "
        "best of 3. The matmul: `int8.dense_matmul` (what prefill chunks of more than `int8.kernel_rows()` rows "
        f"run after dequantizing, {dtype}), {args.rows} rows, median of {args.rounds}.",
        "",
        "| instruction | multiply-adds each | G instructions/s | G multiply-adds/s | 7B prefill ceiling (linear layers "
        "only) |",
        "|---|---|---|---|---|",
    ]
    for p in probes:
        ceiling = p.macs_per_second / LINEAR_MACS_PER_TOKEN
        lines.append(f"| {p.name} | {p.macs_per_instruction} | {p.instructions_per_second / 1e9:.2f} | "
                     f"{p.macs_per_second / 1e9:.0f} | {ceiling:.1f} tok/s |")
    lines += ["", f"| dense matmul ({dtype}), {args.rows} rows | ms | G multiply-adds/s | share of the "
              f"{used.name if used else '?'} peak |", "|---|---|---|---|"]
    total_macs = total_seconds = 0.0
    for k, n, label in SHAPES:
        macs = args.rows * k * n
        rate = macs / dense[label]
        share = f"{rate / used.macs_per_second:.0%}" if used else "?"
        lines.append(f"| {k} -> {n} ({label}) | {dense[label] * 1e3:.1f} | {rate / 1e9:.0f} | {share} |")
        weight = 4 if label == "qkvo" else 2 if label == "gate/up" else 1  # 4 qkvo, 2 gate/up, 1 down per block
        total_macs += weight * macs
        total_seconds += weight * dense[label]
    if used:
        rate = total_macs / total_seconds
        lines += ["", f"A 7B block's seven matmuls together: {rate / 1e9:.0f} G multiply-adds/s, "
                  f"{rate / used.macs_per_second:.0%} of the peak; at that rate the linear layers alone allow "
                  f"{rate / LINEAR_MACS_PER_TOKEN:.1f} tok/s of prefill (its dequantization, attention, norms and "
                  "the rest of a forward come on top)."]
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="threads for the probe and the matmul (default: torch's, one per core)")
    parser.add_argument("--rows", type=int, default=512, help="rows of the matmul (default 512, a long prompt)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--write", type=Path, metavar="FILE", help="replace this script's section of FILE")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.rows < 1 or args.rounds < 1:
        parser.error("--threads, --rows and --rounds must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    log(f"[cpu_peak] {machine_description()}")
    load = CpuShares()
    probes = run_probes(args.threads)
    dense = time_dense(args.rows, args.rounds)
    publish(report(args, probes, dense, load.others()), args.write, "cpu_peak.py", cpu_label())


if __name__ == "__main__":
    main()
