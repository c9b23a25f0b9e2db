"""The CPU's arithmetic peak for the instructions a prefill can multiply with, and how close the dense matmul gets.

Prefill is compute-bound, so its ceiling on a CPU is the throughput of the multiply instruction it uses. Whether a
goal such as "prefill 2x llama.cpp" is reachable with a given kind of arithmetic is a question of that peak, not of
the code: this script measures it, on this CPU, in the same run as the matmul that uses it.

1. A small C++ probe (compiled here with the project's compiler) times long chains of independent multiply
   instructions in registers on every core at once (OpenMP, one thread per core): fp32 FMA (`vfmadd231ps`), bf16 dot
   products (`vdpbf16ps`, AVX-512 BF16: 32 multiply-adds per zmm instruction) and int8 dot products (`vpdpbusd`,
   AVX-512 VNNI: 64 per zmm; AVX-VNNI on ymm), each where the CPU has it. Multiply-adds per second = the peak.
   AVX2's integer products sum their pairs but do not accumulate: the probes also time them with the instructions
   that accumulate their sums (vpmaddwd + vpaddd, as our avx2 GEMM multiplies 16-bit rows; vpmaddubsw + vpmaddwd +
   vpaddd, as int8 x int8 code on AVX2 does), a group of instructions a step of each chain.
2. The dense prefill matmul as Int8Linear runs it (`int8.dense_matmul`: bf16 through oneDNN on CPUs with native
   bf16, fp32 elsewhere), for a 512-row chunk on the Llama-2-7B shapes, after the dequantization (not timed); and,
   where our int8 kernel takes prefill calls (the vnni512, avx2 and avxvnni paths), its GEMM with precise
   activations on the same rows, as prefill runs it.
3. The share of its instruction's peak each matmul reaches, and the prefill tok/s that peak would allow for the 7B
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
from typing import NamedTuple

import torch

from benchmarks.common import display_command, publish
from benchmarks.machine import CpuShares, cpu_label, log, machine_description
from int8serve.engine import int8, kernels

# Independent chains per thread (ymm0-13 beside the sources ymm14-15): more than latency x pipes of every probe. 10 were
# too few for vdpbf16ps on an AMD EPYC Zen 5 (family 26 model 2, 2026-12-02, 10 and 14 alternated three times, best
# G instructions/s on 2 threads: 12.6 against 14.7; the other probes 14.6-15.3 either way). That machine's whole
# throughput also halved for minutes at a time (every probe ~7.8), whatever the count: best of 3 runs is kept.
ACCUMULATORS = 14


class ProbeSpec(NamedTuple):
    name: str
    instruction: str  # AT&T, {r} is each chain's accumulator; the instructions of a group are separated by ";"
    macs: int  # multiply-adds per instruction (or group)
    needs: set[str]  # CPU flags
    chains: int = ACCUMULATORS  # a group's scratch registers (ymm12-13) are not accumulators


ACCUMULATED_INT16 = "int16 pairs accumulated (vpmaddwd + vpaddd), ymm"  # our avx2 GEMM's arithmetic
INT16_DOT_AVX_VNNI = "int16 dot (vpdpwssd), ymm (AVX-VNNI)"  # our avxvnni GEMM's: the same sums in one


PROBES = [
    ProbeSpec("fp32 FMA, zmm", "vfmadd231ps %%zmm30, %%zmm31, %%zmm{r}", 16, {"avx512f"}),
    ProbeSpec("fp32 FMA, ymm", "vfmadd231ps %%ymm14, %%ymm15, %%ymm{r}", 8, {"avx2", "fma"}),
    ProbeSpec("bf16 dot (vdpbf16ps), zmm", "vdpbf16ps %%zmm30, %%zmm31, %%zmm{r}", 32, {"avx512_bf16"}),
    ProbeSpec("int8 dot (vpdpbusd), zmm", "vpdpbusd %%zmm30, %%zmm31, %%zmm{r}", 64, {"avx512_vnni"}),
    ProbeSpec("int8 dot (vpdpbusd), ymm (AVX-VNNI)", "%{{vex%}} vpdpbusd %%ymm14, %%ymm15, %%ymm{r}", 32,
              {"avx_vnni"}),
    ProbeSpec(INT16_DOT_AVX_VNNI, "%{{vex%}} vpdpwssd %%ymm14, %%ymm15, %%ymm{r}", 16, {"avx_vnni"}),
    # AVX2's integer products (what gemv.cpp's avx2 path and llama.cpp's AVX2 code run on): products summed in pairs,
    # without the accumulation, which takes a vpaddd (and for vpmaddubsw a vpmaddwd) more
    ProbeSpec("int16 pairs (vpmaddwd), ymm", "vpmaddwd %%ymm14, %%ymm15, %%ymm{r}", 16, {"avx2"}),
    ProbeSpec("uint8 x int8 pairs (vpmaddubsw), ymm", "vpmaddubsw %%ymm14, %%ymm15, %%ymm{r}", 32, {"avx2"}),
    # ... and with it: what a GEMM of each kind can reach at most
    ProbeSpec(ACCUMULATED_INT16, "vpmaddwd %%ymm14, %%ymm15, %%ymm13; vpaddd %%ymm13, %%ymm{r}, %%ymm{r}", 16,
              {"avx2"}, chains=13),
    ProbeSpec("uint8 x int8 pairs accumulated (vpmaddubsw + vpmaddwd + vpaddd), ymm",
              "vpmaddubsw %%ymm14, %%ymm15, %%ymm13; vpmaddwd %%ymm13, %%ymm12, %%ymm13; "
              "vpaddd %%ymm13, %%ymm{r}, %%ymm{r}", 32, {"avx2"}, chains=12),
]
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


def probe_source(probes: Sequence[ProbeSpec]) -> str:
    """A C++ program: `probe WHICH N` runs probe WHICH's chains N times on every thread and prints the instructions
    (or groups) per second of all threads together."""
    functions, calls = [], []
    for index, probe in enumerate(probes):
        body = "".join(f'"{probe.instruction.format(r=r)}\\n\\t"' for r in range(probe.chains))
        functions.append(f"static void probe{index}(long n) {{ for (long i = 0; i < n; ++i) asm volatile({body} ::: "
                         f"\"memory\"); }}")
        calls.append(f"    case {index}: probe{index}(n); break;")
    return "\n".join([
        "#include <chrono>", "#include <cstdio>", "#include <cstdlib>", "#include <omp.h>",
        *functions,
        "int main(int argc, char** argv) {",
        "  const int which = std::atoi(argv[1]); const long n = std::atol(argv[2]);",
        f"  const int chains[] = {{{', '.join(str(p.chains) for p in probes)}}};",
        "  const auto start = std::chrono::steady_clock::now();",
        "#pragma omp parallel",
        "  switch (which) {", *calls, "  }",
        "  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();",
        "  std::printf(\"%.6e\\n\", double(n) * chains[which] * omp_get_max_threads() / seconds);",
        "}",
    ]) + "\n"


def run_probes(threads: int) -> list[Probe]:
    """Instruction throughput of every probe this CPU can run, on `threads` threads at once (best of 3)."""
    flags = kernels.cpu_flags()
    runnable = [p for p in PROBES if p.needs <= flags]
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
        for index, probe in enumerate(runnable):
            rates = [float(subprocess.run([str(binary), str(index), str(ITERATIONS)], env=env, capture_output=True,
                                          text=True, check=True).stdout) for _ in range(3)]
            results.append(Probe(probe.name, probe.macs, max(rates)))
            log(f"  {probe.name}: {max(rates) / 1e9:.2f} G instructions/s on {threads} threads")
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


def kernel_takes_prefill() -> bool:
    """Whether our int8 kernel takes prefill's long calls on this CPU (its vnni512, avx2 and avxvnni paths)."""
    return kernels.available() and int8.kernel_rows() == int8.ALL_ROWS


def time_kernel(m: int, rounds: int) -> dict[str, float]:
    """Seconds (median of `rounds`) of our int8 kernel's call of m rows per 7B shape, precise activations (as prefill
    calls it), random int8 weights with a bf16 scale per 32 inputs (the default scheme)."""
    generator = torch.Generator().manual_seed(0)
    seconds = {}
    for k, n, label in SHAPES:
        weight = torch.randint(-127, 128, (n, k), generator=generator, dtype=torch.int8)
        scale = (torch.rand(n, k // 32, generator=generator) * 0.01 + 0.001).to(torch.bfloat16).float()
        packed = kernels.pack_weight(weight, scale, 32)
        x = torch.randn(m, k, generator=generator)
        kernels.int8_gemv(x, packed, precise=True)  # warm-up
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            kernels.int8_gemv(x, packed, precise=True)
            times.append(time.perf_counter() - started)
        seconds[label] = sorted(times)[len(times) // 2]
        log(f"  our kernel ({kernels.path()}) {m} x {k} -> {n}: {seconds[label] * 1e3:.1f} ms")
    return seconds


def kernel_peak(probes: Sequence[Probe]) -> tuple[Probe | None, int]:
    """The probe our kernel's GEMM multiplies with on this CPU's path, and how many of its multiply-adds each of the
    call's takes: two on vnni512 (two int8 passes a row), one on avx2 and avxvnni (16-bit rows: vpmaddwd + vpaddd,
    or vpdpwssd). None on the amx path (its tiles are not probed)."""
    wanted = {"avx2": (ACCUMULATED_INT16, 1), "avxvnni": (INT16_DOT_AVX_VNNI, 1),
              "vnni512": ("int8 dot (vpdpbusd), zmm", 2)}.get(kernels.path())
    if wanted is None:
        return None, 1
    return next((p for p in probes if p.name == wanted[0]), None), wanted[1]


def matmul_table(title: str, rows: int, seconds: dict[str, float], peak: Probe | None, per_mac: int = 1) -> list[str]:
    """A table of the 7B shapes' matmuls of `rows` rows, each one's share of `peak` (`per_mac` of its multiply-adds
    for each of the matmul's), and the seven matmuls of a block together."""
    lines = ["", f"| {title}, {rows} rows | ms | G multiply-adds/s | share of the {peak.name if peak else '?'} peak |",
             "|---|---|---|---|"]
    total_macs = total_seconds = 0.0
    for k, n, label in SHAPES:
        macs = rows * k * n
        rate = macs / seconds[label]
        share = f"{per_mac * rate / peak.macs_per_second:.0%}" if peak else "?"
        lines.append(f"| {k} -> {n} ({label}) | {seconds[label] * 1e3:.1f} | {rate / 1e9:.0f} | {share} |")
        weight = 4 if label == "qkvo" else 2 if label == "gate/up" else 1  # 4 qkvo, 2 gate/up, 1 down per block
        total_macs += weight * macs
        total_seconds += weight * seconds[label]
    rate = total_macs / total_seconds
    share = f", {per_mac * rate / peak.macs_per_second:.0%} of the peak" if peak else ""
    lines += ["", f"A 7B block's seven matmuls together: {rate / 1e9:.0f} G multiply-adds/s{share}; at that rate the "
              f"linear layers alone allow {rate / LINEAR_MACS_PER_TOKEN:.1f} tok/s of prefill (attention, norms and "
              "the rest of a forward come on top)."]
    return lines


def report(args: argparse.Namespace, probes: list[Probe], dense: dict[str, float], load: float,
           kernel: dict[str, float] | None = None) -> str:
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
        f"- Peak: independent chains ({ACCUMULATORS}, or 12-13 for a group of instructions) of one instruction, or "
        "of one group, in registers per thread, all threads at once, best of 3. The dense matmul: "
        f"`int8.dense_matmul` (what prefill chunks of more than `int8.kernel_rows()` rows run after dequantizing, "
        f"{dtype}), median of {args.rounds}.",
    ]
    if kernel is not None:
        lines.append(f"- Our int8 kernel's call (`kernels.int8_gemv`, path {kernels.path()}, precise activations: what "
                     "prefill runs on this CPU), the same rows, median of the same count.")
    lines += [
        "",
        "| instruction | multiply-adds each | G instructions (or groups)/s | G multiply-adds/s | 7B prefill ceiling "
        "(linear layers only) |",
        "|---|---|---|---|---|",
    ]
    for p in probes:
        ceiling = p.macs_per_second / LINEAR_MACS_PER_TOKEN
        lines.append(f"| {p.name} | {p.macs_per_instruction} | {p.instructions_per_second / 1e9:.2f} | "
                     f"{p.macs_per_second / 1e9:.0f} | {ceiling:.1f} tok/s |")
    lines += matmul_table(f"dense matmul ({dtype})", args.rows, dense, used)
    if kernel is not None:
        peak, per_mac = kernel_peak(probes)
        lines += matmul_table(f"our int8 kernel ({kernels.path()}, precise)", args.rows, kernel, peak, per_mac)
        if per_mac > 1:
            lines += ["", f"(The kernel's share counts {per_mac} of the peak's multiply-adds for each of its own: "
                      f"{per_mac} int8 passes a row.)"]
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
    kernel = time_kernel(args.rows, args.rounds) if kernel_takes_prefill() else None
    publish(report(args, probes, dense, load.others(), kernel), args.write, "cpu_peak.py", cpu_label())


if __name__ == "__main__":
    main()
