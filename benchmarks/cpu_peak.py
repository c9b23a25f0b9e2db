"""The CPU's arithmetic peak for the instructions a prefill can multiply with, and how close the dense matmul gets.

Prefill is compute-bound, so its ceiling on a CPU is the throughput of the multiply instruction it uses. Whether a
goal such as "prefill 2x llama.cpp" is reachable with a given kind of arithmetic is a question of that peak, not of
the code: this script measures it, on this CPU, in the same run as the matmul that uses it.

1. A small C++ probe (compiled here with the project's compiler) times long chains of independent multiply
   instructions in registers on every core at once (OpenMP, one thread per core): fp32 FMA (`vfmadd231ps`), bf16 dot
   products (`vdpbf16ps`, AVX-512 BF16: 32 multiply-adds per zmm instruction) and int8 dot products (`vpdpbusd`,
   AVX-512 VNNI: 64 per zmm; AVX-VNNI on ymm) and AMX tile products (`tdpbf16ps`: 16 x 16 x 32 multiply-adds,
   `tdpbssd`: 16 x 16 x 64; tiles of nonzero values), each where the CPU has it. Multiply-adds per second = the
   peak.
   AVX2's integer products sum their pairs but do not accumulate: the probes also time them with the instructions
   that accumulate their sums (vpmaddwd + vpaddd, as our avx2 GEMM multiplies 16-bit rows; vpmaddubsw + vpmaddwd +
   vpaddd, as int8 x int8 code on AVX2 does), a group of instructions a step of each chain.
2. The dense prefill matmul as Int8Linear runs it (`int8.dense_matmul`: bf16 through oneDNN on CPUs with native
   bf16, fp32 elsewhere), for a 512-row chunk on the Llama-2-7B shapes, after the dequantization (not timed); and
   what prefill runs instead where it does: our int8 kernel's GEMM with precise activations (the vnni512, avx2 and
   avxvnni paths), or our bf16 prefill kernel (kernels/matmul.py: AMX CPUs), on the same rows.
3. The share of its instruction's peak each matmul reaches, and the prefill tok/s that peak would allow for the 7B
   shape's linear layers alone (2 x 6.48 G multiply-adds per token, the head excluded: prefill computes it for one
   row).

    python -m benchmarks.cpu_peak --write docs/benchmarks.md     # about a minute
    python -m benchmarks.cpu_peak --rows 128                      # the server's prefill chunk
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from benchmarks.common import display_command, publish
from benchmarks.machine import CpuShares, cpu_label, log, machine_description
from int8serve.engine import int8, kernels
from int8serve.engine.kernels import builds
from int8serve.engine.kernels import matmul as prefill_matmul

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
    tiles: bool = False  # AMX: the thread configures its tiles first (C: tmm0-5, A: tmm6, B: tmm7)


ACCUMULATED_INT16 = "int16 pairs accumulated (vpmaddwd + vpaddd), ymm"  # our avx2 GEMM's arithmetic
INT16_DOT_AVX_VNNI = "int16 dot (vpdpwssd), ymm (AVX-VNNI)"  # our avxvnni GEMM's: the same sums in one
BF16_DOT_ZMM = "bf16 dot (vdpbf16ps), zmm"  # our bf16 prefill kernel's vector path
BF16_TILES = "bf16 tile product (tdpbf16ps), AMX"  # its tile path, and oneDNN's bf16 matmul on AMX CPUs


PROBES = [
    ProbeSpec("fp32 FMA, zmm", "vfmadd231ps %%zmm30, %%zmm31, %%zmm{r}", 16, {"avx512f"}),
    ProbeSpec("fp32 FMA, ymm", "vfmadd231ps %%ymm14, %%ymm15, %%ymm{r}", 8, {"avx2", "fma"}),
    ProbeSpec(BF16_DOT_ZMM, "vdpbf16ps %%zmm30, %%zmm31, %%zmm{r}", 32, {"avx512_bf16"}),
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
    # AMX: six C tiles, each a chain of tile products of the same A and B (16 rows of 64 bytes each)
    ProbeSpec(BF16_TILES, "tdpbf16ps %%tmm7, %%tmm6, %%tmm{r}", 16 * 16 * 32, {"amx_bf16", "amx_tile"}, chains=6,
              tiles=True),
    ProbeSpec("int8 tile product (tdpbssd), AMX", "tdpbssd %%tmm7, %%tmm6, %%tmm{r}", 16 * 16 * 64,
              {"amx_int8", "amx_tile"}, chains=6, tiles=True),
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


# The tile probes' set-up, in each thread: Linux's permission for the tile data (arch_prctl ARCH_REQ_XCOMP_PERM,
# once per process), 16 x 64-byte rows in every tile, and A and B loaded with nonzero values (bf16 1.0, int8 bytes
# 0x80 and 0x3f: the tile unit's power, and so perhaps its clock, may depend on them).
TILE_SETUP = r"""
#include <sys/syscall.h>
#include <unistd.h>
#include <cstdint>
struct alignas(64) TileConfig { uint8_t palette = 1, start_row = 0, reserved[14] = {}; uint16_t colsb[16] = {};
                                uint8_t rows[16] = {}; };
static bool tiles_on() {
  static const bool granted = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  if (!granted) return false;
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.rows[t] = 16, config.colsb[t] = 64;
  asm volatile("ldtilecfg %0" : : "m"(config));
  alignas(64) static thread_local uint16_t values[512];
  for (uint16_t& v : values) v = 0x3f80;
  asm volatile("tileloadd (%0,%1,1), %%tmm6" : : "r"(values), "r"(int64_t{64}) : "memory");
  asm volatile("tileloadd (%0,%1,1), %%tmm7" : : "r"(values), "r"(int64_t{64}) : "memory");
  return true;
}
"""


def probe_source(probes: Sequence[ProbeSpec]) -> str:
    """A C++ program: `probe WHICH N` runs probe WHICH's chains N times on every thread and prints the instructions
    (or groups) per second of all threads together (exit status 3 if Linux refused a tile probe its tiles)."""
    functions, calls = [], []
    for index, probe in enumerate(probes):
        body = "".join(f'"{probe.instruction.format(r=r)}\\n\\t"' for r in range(probe.chains))
        functions.append(f"static void probe{index}(long n) {{ for (long i = 0; i < n; ++i) asm volatile({body} ::: "
                         f"\"memory\"); }}")
        calls.append(f"    case {index}: probe{index}(n); break;")
    tiles = any(p.tiles for p in probes)
    return "\n".join([
        "#include <chrono>", "#include <cstdio>", "#include <cstdlib>", "#include <omp.h>",
        TILE_SETUP if tiles else "",
        *functions,
        "int main(int argc, char** argv) {",
        "  const int which = std::atoi(argv[1]); const long n = std::atol(argv[2]);",
        f"  const int chains[] = {{{', '.join(str(p.chains) for p in probes)}}};",
        f"  const bool tiles[] = {{{', '.join('true' if p.tiles else 'false' for p in probes)}}};",
        "  bool refused = false;",
        "  const auto start = std::chrono::steady_clock::now();",
        "#pragma omp parallel",
        "  {",
        "    if (tiles[which]) { if (!tiles_on()) refused = true; }" if tiles else "",
        "    if (!refused) switch (which) {", *calls, "    }",
        "  }",
        "  if (refused) return 3;",
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
        build = subprocess.run([builds._compiler(), "-O2", "-fopenmp", *isa, str(source), "-o", str(binary)],
                               capture_output=True, text=True, check=False)
        if build.returncode != 0:
            sys.exit(f"error: the probe did not compile:\n{build.stderr[-2000:]}")
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "OMP_PROC_BIND": "spread"}
        results = []
        for index, probe in enumerate(runnable):
            runs = [subprocess.run([str(binary), str(index), str(ITERATIONS)], env=env, capture_output=True,
                                   text=True, check=False) for _ in range(3)]
            if any(run.returncode == 3 for run in runs):  # (the CPU has AMX, this process may not use it)
                log(f"  {probe.name}: not measured, Linux refused the tile data (arch_prctl)")
                continue
            for run in runs:
                if run.returncode != 0:
                    sys.exit(f"error: probe {probe.name!r} failed ({run.returncode}): {run.stderr[-2000:]}")
            rates = [float(run.stdout) for run in runs]
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


def time_packed(m: int, rounds: int, multiply: Callable[[torch.Tensor, kernels.PackedWeight], object], name: str
                ) -> dict[str, float]:
    """Seconds (median of `rounds`) of `multiply`(x, packed) for m rows per 7B shape, random int8 weights with a bf16
    scale per 32 inputs (the default scheme)."""
    generator = torch.Generator().manual_seed(0)
    seconds = {}
    for k, n, label in SHAPES:
        weight = torch.randint(-127, 128, (n, k), generator=generator, dtype=torch.int8)
        scale = (torch.rand(n, k // 32, generator=generator) * 0.01 + 0.001).to(torch.bfloat16).float()
        packed = kernels.pack_weight(weight, scale, 32)
        x = torch.randn(m, k, generator=generator)
        multiply(x, packed)  # warm-up (its buffers)
        times = []
        for _ in range(rounds):
            started = time.perf_counter()
            multiply(x, packed)
            times.append(time.perf_counter() - started)
        seconds[label] = sorted(times)[len(times) // 2]
        log(f"  {name} {m} x {k} -> {n}: {seconds[label] * 1e3:.1f} ms")
    return seconds


def time_kernel(m: int, rounds: int) -> dict[str, float]:
    """Our int8 kernel's call of m rows per 7B shape, precise activations (as prefill calls it): `time_packed`."""
    return time_packed(m, rounds, lambda x, packed: kernels.int8_gemv(x, packed, precise=True),
                       f"our kernel ({kernels.path()})")


def bf16_kernel_takes_prefill(rows: int) -> bool:
    """Whether our bf16 prefill kernel takes prefill calls of `rows` rows on this CPU (by default on AMX CPUs, past
    our int8 kernel's rows; int8.py)."""
    return prefill_matmul.takes(rows) and not int8.kernel_takes(rows)


def time_bf16_kernel(m: int, rounds: int) -> dict[str, float]:
    """Our bf16 prefill kernel's call of m rows per 7B shape (fp32 rows, the fp32 sums kept, as Int8Linear calls it):
    `time_packed`."""
    return time_packed(m, rounds, prefill_matmul.matmul, f"our bf16 kernel ({prefill_matmul.path()})")


def bf16_peak(probes: Sequence[Probe], path: str | None) -> Probe | None:
    """The probe a bf16 matmul on `path` multiplies with: AMX tiles ("amx", and oneDNN on AMX CPUs) or vdpbf16ps."""
    wanted = BF16_TILES if path == "amx" else BF16_DOT_ZMM
    return next((p for p in probes if p.name == wanted), None)


def kernel_peak(probes: Sequence[Probe]) -> tuple[Probe | None, int]:
    """The probe our kernel's GEMM multiplies with on this CPU's path, and how many of its multiply-adds each of the
    call's takes: two on vnni512 (two int8 passes a row), one on avx2 and avxvnni (16-bit rows: vpmaddwd + vpaddd,
    or vpdpwssd). None on the amx path (its int8 GEMM is not read against the tile probes)."""
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
           kernel: dict[str, float] | None = None, bf16_kernel: dict[str, float] | None = None) -> str:
    dtype = int8.dense_dtype()
    amx = kernels.cpu_flags() >= prefill_matmul.AMX_FLAGS  # (oneDNN's bf16 matmul takes the tiles there)
    used = bf16_peak(probes, "amx" if amx else None) if dtype == torch.bfloat16 else \
        next((p for p in probes if p.name.startswith("fp32 FMA, zmm")), None) or \
        next((p for p in probes if p.name.startswith("fp32")), None)
    lines = [
        f"## Arithmetic peak and the dense prefill matmul ({cpu_label()})",
        "",
        f"- Command: `{display_command('cpu_peak', sys.argv[1:])}`",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; CPU: {machine_description()}; "
        f"{args.threads} threads; torch {torch.__version__}; other processes used {load:.0%} of the CPUs.",
        f"- Peak: independent chains ({ACCUMULATORS}, or 12-13 for a group of instructions, 6 C tiles for AMX) of one "
        "instruction, or of one group, in registers per thread, all threads at once, best of 3. The dense matmul: "
        f"`int8.dense_matmul` (what prefill chunks of more than `int8.kernel_rows()` rows run after dequantizing, "
        f"{dtype}), median of {args.rounds}.",
    ]
    if kernel is not None:
        lines.append(f"- Our int8 kernel's call (`kernels.int8_gemv`, path {kernels.path()}, precise activations: what "
                     "prefill runs on this CPU), the same rows, median of the same count.")
    if bf16_kernel is not None:
        lines.append(f"- Our bf16 prefill kernel's call (`kernels.matmul.matmul`, path {prefill_matmul.path()}, fp32 "
                     "rows and sums: what prefill runs on this CPU), the same rows, median of the same count.")
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
    if bf16_kernel is not None:
        lines += matmul_table(f"our bf16 prefill kernel ({prefill_matmul.path()})", args.rows, bf16_kernel,
                              bf16_peak(probes, prefill_matmul.path()))
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
    bf16_kernel = time_bf16_kernel(args.rows, args.rounds) if bf16_kernel_takes_prefill(args.rows) else None
    publish(report(args, probes, dense, load.others(), kernel, bf16_kernel), args.write, "cpu_peak.py", cpu_label())


if __name__ == "__main__":
    main()
