"""Whether AMX tile products and vector code run at the same time on this CPU: the ceiling of an exact int8 GEMM on AMX.

Decode's arithmetic (gemv.cpp: int8 activations per group of 32 inputs, two int8 passes a row, every group's sums
scaled in fp32) needs each group's tile sums in memory and vector code on them: the AMX-INT8 GEMM (gemm_exact_amx)
stores two C tiles a group and converts, combines and scales every row of them with zmm instructions. The AMX-BF16
prefill kernel keeps its sums in the tiles over all inputs. So the int8 GEMM can only match it if the tiles and the
vector code overlap. This probe (C++, compiled here with the project's compiler, one thread) times, in TSC cycles
per step of 4 tile products (16 x 16 x 32 int8 each: two groups of one 16 x 16 block of 16 output rows, precise):
- `tiles`: the GEMM's tile instructions for the step: 3 tile loads a group, 2 zeroings, 2 TDPBSSD, 2 tile stores;
- `vector`: its vector code for the step: per output row and group 2 loads, a shift, an add, a conversion and two
  fmas (inline assembly, as the GEMM's);
- `both`: the two interleaved as in the GEMM (the vector code reading sums stored two steps earlier).
If both ran at once, `both` would be near the larger of the two; if not, near their sum.

    python -m benchmarks.amx_overlap --write docs/benchmarks.md     # a few seconds; needs AMX-INT8
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from benchmarks.common import display_command, publish
from benchmarks.machine import cpu_label, log, machine_description
from int8serve.engine import kernels
from int8serve.engine.kernels import builds

KERNELS = Path(kernels.__file__).parent  # amx_tiles.h
VARIANTS = ("tiles", "vector", "both")
STEPS = 200_000


def _vector_rows(first: int) -> str:
    """Inline assembly text of 8 output rows (first..first + 7) of the GEMM's vector code on one buffer."""
    text = []
    for o in range(first, first + 8):
        t = 28 + o % 4
        text += [f"vpslld $8, {o * 128}(%[d]), %%zmm{t}", f"vpaddd {o * 128 + 64}(%[d]), %%zmm{t}, %%zmm{t}",
                 f"vcvtdq2ps %%zmm{t}, %%zmm{t}", f"vfmadd132ps {4 * o}(%[xs])%{{1to16%}}, %[zero], %%zmm{t}",
                 f"vfmadd231ps %[ws], %%zmm{t}, %[r{o - first}]"]
    return "".join(f'"{line}\\n\\t"' for line in text)


def probe_source() -> str:
    run = ", ".join(f'[r{i}] "+v"(r[{i}])' for i in range(8))
    vector = "\n".join(
        f"    asm volatile({_vector_rows(first)} : {run} : [d] \"r\"(d), [xs] \"r\"(xs), [ws] \"v\"(ws), "
        f"[zero] \"v\"(zero), \"m\"(*d) : \"xmm28\", \"xmm29\", \"xmm30\", \"xmm31\");" for first in (0, 8))
    return f"""#include <immintrin.h>
#include <x86intrin.h>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include "amx_tiles.h"
#define DP(C, A, B) asm volatile("tdpbssd %%tmm" #B ", %%tmm" #A ", %%tmm" #C ::: "memory")
alignas(64) static int8_t a_tiles[2][1024], b_tiles[2][512];
alignas(64) static int32_t sums[4][2][32][16];
alignas(64) static float xs[16];
__attribute__((target("avx512f"))) static void vector_step(const int32_t (*d)[32][16], __m512* r, __m512 ws) {{
  const __m512 zero = _mm512_setzero_ps();
  for (int half = 0; half < 2; ++half, d += 1) {{
{vector}
  }}
}}
static void tile_step(int32_t (*s)[32][16]) {{
  INT8SERVE_TILE_LOAD(6, b_tiles[0], 64); INT8SERVE_TILE_LOAD(4, a_tiles[0], 32);
  INT8SERVE_TILE_LOAD(5, a_tiles[0] + 512, 32);
  INT8SERVE_TILE_ZERO(0); INT8SERVE_TILE_ZERO(1); DP(0, 4, 6); DP(1, 5, 6);
  INT8SERVE_TILE_STORE(0, s[0][0], 64); INT8SERVE_TILE_STORE(1, s[0][16], 64);
  INT8SERVE_TILE_LOAD(7, b_tiles[1], 64); INT8SERVE_TILE_LOAD(4, a_tiles[1], 32);
  INT8SERVE_TILE_LOAD(5, a_tiles[1] + 512, 32);
  INT8SERVE_TILE_ZERO(2); INT8SERVE_TILE_ZERO(3); DP(2, 4, 7); DP(3, 5, 7);
  INT8SERVE_TILE_STORE(2, s[1][0], 64); INT8SERVE_TILE_STORE(3, s[1][16], 64);
}}
__attribute__((target("avx512f"))) int main(int argc, char** argv) {{
  if (argc != 3 || !amx_permission()) {{ std::puts("no AMX tile permission"); return 2; }}
  const int which = std::atoi(argv[1]); const long steps = std::atol(argv[2]);
  TileConfig config;
  for (int t = 0; t < 4; ++t) config.rows[t] = 16, config.colsb[t] = 64;
  for (int t = 4; t < 6; ++t) config.rows[t] = 16, config.colsb[t] = 32;
  for (int t = 6; t < 8; ++t) config.rows[t] = 8, config.colsb[t] = 64;
  tiles_configure(config);
  __m512 r[16];
  for (auto& v : r) v = _mm512_setzero_ps();
  const __m512 ws = _mm512_set1_ps(1.0f);
  const unsigned long long start = __rdtsc();
  for (long i = 0; i < steps; ++i) {{
    if (which != 1) tile_step(sums[i % 4]);
    if (which != 0) vector_step(sums[(i + 2) % 4], which == 1 ? r : r + 8, ws);
  }}
  const double cycles = double(__rdtsc() - start) / double(steps);
  tiles_release();
  float total = 0; for (auto& v : r) total += _mm512_reduce_add_ps(v);
  std::printf("%.3f %g\\n", cycles, total);
  return 0;
}}
"""


def run_probe(steps: int = STEPS) -> dict[str, float]:
    """TSC cycles per step of each variant (best of 3 runs), on one thread. Exits with a clear message where the CPU
    has no AMX-INT8 or Linux refuses its tiles."""
    if not {"amx_int8", "amx_tile"} <= kernels.cpu_flags():
        sys.exit("error: this CPU has no AMX-INT8 (lscpu lists neither amx_int8 nor amx_tile): nothing to measure")
    with tempfile.TemporaryDirectory() as folder:
        source, binary = Path(folder) / "amx_overlap.cpp", Path(folder) / "amx_overlap"
        source.write_text(probe_source())
        build = subprocess.run([builds._compiler(), "-O2", f"-I{KERNELS}", str(source), "-o", str(binary)],
                               capture_output=True, text=True, check=False)
        if build.returncode != 0:
            sys.exit(f"error: the probe did not compile:\n{build.stderr[-2000:]}")
        cycles = {}
        for index, name in enumerate(VARIANTS):
            runs = [subprocess.run([str(binary), str(index), str(steps)], capture_output=True, text=True, check=False)
                    for _ in range(3)]
            failed = next((r for r in runs if r.returncode != 0), None)
            if failed is not None:
                sys.exit(f"error: the probe failed: {failed.stdout.strip() or failed.stderr.strip()}")
            cycles[name] = min(float(r.stdout.split()[0]) for r in runs)
            log(f"  {name}: {cycles[name]:.1f} TSC cycles a step")
    return cycles


def report(cycles: dict[str, float], steps: int) -> str:
    tiles, vector, both = cycles["tiles"], cycles["vector"], cycles["both"]
    overlap = (tiles + vector - both) / min(tiles, vector)
    hidden = (f"{overlap:.0%} of the shorter one's time is hidden behind the other" if overlap > 0 else
              "none of either's time is hidden behind the other")
    return "\n".join([
        f"## AMX tiles beside vector code ({cpu_label()})",
        "",
        f"- Command: `{display_command('amx_overlap', sys.argv[1:])}`",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; CPU: {machine_description()}; one thread, "
        f"{steps} steps, best of 3 runs.",
        "- A step: 4 AMX-INT8 tile products of 16 x 16 x 32 with the tile loads and stores of the AMX-INT8 GEMM "
        "(gemv.cpp, gemm_exact_amx), and/or its vector code on 2 x 16 rows of their sums.",
        "",
        "| variant | TSC cycles a step |",
        "|---|---|",
        f"| tiles alone | {tiles:.1f} |",
        f"| vector code alone | {vector:.1f} |",
        f"| both, interleaved as in the GEMM | {both:.1f} |",
        "",
        f"Both together take {both / (tiles + vector):.2f}x the sum of the two alone and "
        f"{both / max(tiles, vector):.2f}x the longer one: {hidden}.",
    ]) + "\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=STEPS, help=f"steps a run (default {STEPS})")
    parser.add_argument("--write", type=Path, metavar="FILE", help="replace this script's section of FILE")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    log(f"[amx_overlap] {machine_description()}")
    publish(report(run_probe(args.steps), args.steps), args.write, "amx_overlap.py", cpu_label())


if __name__ == "__main__":
    main()
