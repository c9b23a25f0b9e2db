// The prefill matmul on AMX-BF16 (Sapphire Rapids and later) or AVX512-BF16 (Zen 4), read straight from the packed
// int8 weight:
//
//   out[m, n] = sum_k bf16(x[m, k]) * bf16(w[n, k] * wscale[n, group of k])      x fp32 or bf16 [M, K], out fp32
//
// The weight is the one copy gemv.cpp multiplies in decode (its layout: each group of a tile [block][step][row][byte],
// 64 output rows a tile, 32 inputs a group, 16 rows a block, 4 inputs a step, values w + 128; a weight group's 64 bf16
// scales after its groups, see packed_layout.h). The dense path before this dequantized each whole weight into a bf16
// buffer in memory and handed it to oneDNN, which reorders it again for its tiles: two passes over 2 bytes a weight
// before any arithmetic.
// Here each block's group of 16 rows x 32 inputs (512 bytes) becomes, in registers, one AMX B tile of bf16 pairs
// (16 rows of 16 x 2 bf16: row p holds inputs 2p and 2p + 1 of each output), with exactly the bits of that
// dequantization ((w + 128 - 128) * scale is exact in fp32, rounded to the nearest even bf16), into a buffer that
// stays in L2 while every row of x is multiplied with it.
//
// Steps: x is converted and copied once so that each A tile (16 rows x 32 inputs) is 1 KB in a row (pack_rows). Then
// each thread takes a contiguous range of the weight's 64-row tiles, in panels of up to 4 tiles (256 outputs) x
// K-blocks of 256 inputs. For each 32 rows of x (two A tiles, 16 KB over the K-block, in L1) and each 32 outputs (two
// B tiles), 8 steps of 4 TDPBF16PS accumulate into four C tiles; between K-blocks the C tiles go to a per-thread
// buffer of contiguous 1 KB tiles (`sums`, the panel's mp x 256 fp32, in L2), and only after the last K-block to
// `out`, whose rows are 4 N bytes apart. A step's B tiles (a panel's K-block: 128 KB) are made while the step before
// it multiplies (two buffers), in small batches between its passes, so that the vector arithmetic of the
// dequantization overlaps the tile multiplications. Measured on a Sapphire Rapids (2 threads, 512 x 4096 -> 11008
// and 11008 -> 4096, from fp32 rows to fp32 outputs, alternating): 19 ms, against 33-34 ms for dequantizing and
// oneDNN's bf16 matmul (22 ms in an earlier run credited to a prefetch hint that, see run_jobs, never ran). The
// version before, with the C tiles kept in `out` between K-blocks and the rows converted and packed in a separate
// pass, took 26-28 ms; taken apart, its tile multiplications alone took 19-20 ms (2.4 TFLOP/s;
// the tile unit's peak here is 5.1 with every operand in registers, 3.5 with B streamed from L2), the dequantization
// 2.5-4.5 and the separate packing pass 4.
// On CPUs with AVX512-BF16 but no AMX (AMD's Zen 4), the vector path makes the same B tiles the same way and multiplies
// them with vdpbf16ps (see vector_sums). Against dequantizing and oneDNN's bf16 matmul on a Zen 4 (2 threads, weights
// from memory, the 7B shapes; benchmarks/prefill_paths.py): 48 rows 1.40-1.53x, 128 rows 1.15-1.20x, 256 rows
// 0.98-1.08x, 512 rows 0.92-1.02x (kernels/matmul.py: MAX_ROWS). Alone, 128 and 512 rows of 4096 -> 11008 reach
// 175-190 G multiply-adds/s, 75-80% of the 233 G/s that vdpbf16ps allows there (benchmarks/cpu_peak.py); the order of
// the loops (rows outer, or blocks outer) made no difference.
// Every output is a sum over k in the same order whatever M, N or the thread count: row m of `out` depends on row m
// of x only (each path in its own order: the two paths' bits differ). With `round_bf16` the finished sums are rounded
// to the nearest even bf16 (kept as fp32), as the bf16 matmul they replace returns them; Int8Linear keeps the fp32
// sums instead (more accurate, kernels/matmul.py).
//
// Plain C ABI, built and loaded like gemv.cpp (kernels/builds.py: build(); kernels/library.py: ctypes). The caller gives `out` room for
// M rounded up to 32 rows and ldc >= the packed rows (N rounded up to 64); x's padding (rows, and inputs to a
// multiple of 32) is zeros. Tile instructions are inline assembly, as in gemv.cpp (GCC's tile intrinsics hide from
// it what they read and write; amx_tiles.h).

#include <cpuid.h>
#include <immintrin.h>

#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>
#include <vector>

#include "aligned.h"
#include "amx_tiles.h"
#include "packed_layout.h"

namespace {

using packed::kBlockBytes;  // the packed layout's shape (packed_layout.h): a group is one B tile's K, a block its N
using packed::kBlockRows;
using packed::kBlocks;
using packed::kGroup;
using packed::kSteps;
using packed::kTileRows;
constexpr int64_t kPanelTiles = 4;      // packed tiles per panel: 256 outputs
constexpr int64_t kBlockGroups = 8;     // groups per K-block: 256 inputs
constexpr int64_t kRowsPerPass = 32;    // rows of x per pass of the tiles (two A tiles)
constexpr int64_t kBTileWords = kBlockRows * kGroup;  // 512 bf16 a B tile

enum Path { kAuto = 0, kTiles = 1, kVector = 2 };  // i8m_matmul's `impl`

// AVX512-F/BW/VL (CPUID 7.0 EBX bits 16, 30, 31) and AVX512-BF16 (CPUID 7.1 EAX bit 5): the vector path, and the
// dequantization and row packing of both paths.
bool vector_ready() {
  static const bool ready = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    if (!((ebx >> 16) & 1u) || !((ebx >> 30) & 1u) || !((ebx >> 31) & 1u)) return false;
    return __get_cpuid_count(7, 1, &eax, &ebx, &ecx, &edx) && ((eax >> 5) & 1u);
  }();
  return ready;
}

// The tile path also needs AMX-TILE and AMX-BF16 (CPUID 7.0 EDX bits 24 and 22) and Linux's permission to use the
// tile data (arch_prctl ARCH_REQ_XCOMP_PERM, once per process).
bool tiles_ready() {
  static const bool ready = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!vector_ready() || !__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    return ((edx >> 24) & 1u) && ((edx >> 22) & 1u) && amx_permission();
  }();
  return ready;
}

bool path_ready(int impl) {
  switch (impl) {
    case kAuto: return tiles_ready() || vector_ready();
    case kTiles: return tiles_ready();
    case kVector: return vector_ready();
    default: return false;
  }
}

#define INT8SERVE_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16")))

// tmm0-3: C (16 rows x 16 fp32), tmm4-5: A (16 rows x 32 bf16), tmm6-7: B (16 rows x 16 bf16 pairs).
void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.rows[t] = 16, config.colsb[t] = 64;
  tiles_configure(config);
}

// C += A . B in fp32 from bf16 pairs; AT&T order: B, A, C
#define INT8SERVE_TILE_DPBF16PS(C, A, B) asm volatile("tdpbf16ps %%tmm" #B ", %%tmm" #A ", %%tmm" #C ::)

struct Args {
  const uint16_t* x;       // bf16 [m / 16][k / 32][16][32] (pack_rows)
  int64_t m, k;            // m and k multiples of 32
  int64_t rows;            // of which x's own (the vector path leaves the padding rows of `out` alone)
  bool tiles;              // the AMX path, else the vector one
  const uint8_t* packed;   // the packed weight with its scales (packed_layout.h), k / 32 groups a tile
  packed::Layout lay;
  float* out;              // fp32 [m, ldc]
  int64_t ldc;
  bool round_bf16;
};

// One block's group (16 outputs x 32 inputs, 512 packed bytes) -> one B tile (16 rows x 32 bf16, 1 KB) with the
// bits of the dequantized weight: row p of the tile holds inputs 2p and 2p + 1 of each output.
INT8SERVE_BF16 inline void dequant_block(const uint8_t* src, const uint16_t* scale_bits, uint16_t* dst) {
  const __m512 scale = _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(scale_bits))), 16));
  const __m512 offset = _mm512_mul_ps(scale, _mm512_set1_ps(-128.0f));  // exact: a power of two
  const __m512i byte = _mm512_set1_epi32(0xFF);
  // words 2l and 2l + 1 <- words l and 16 + l: the pairs of one output side by side
  const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  for (int64_t s = 0; s < kSteps; ++s) {  // step s: inputs 4s..4s+3 of each output, one dword a lane
    const __m512i v = _mm512_load_si512(reinterpret_cast<const void*>(src + s * 64));
    __m512 f[4];
    for (int j = 0; j < 4; ++j) {
      const __m512i u = j == 3 ? _mm512_srli_epi32(v, 24) : _mm512_and_si512(_mm512_srli_epi32(v, 8 * j), byte);
      f[j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(u), scale, offset);  // (w + 128) * s - 128 * s = w * s, exact
    }
    const __m512i lo = _mm512_permutexvar_epi16(pairs, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(f[1], f[0])));
    const __m512i hi = _mm512_permutexvar_epi16(pairs, reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(f[3], f[2])));
    _mm512_store_si512(reinterpret_cast<void*>(dst + (2 * s) * 32), lo);
    _mm512_store_si512(reinterpret_cast<void*>(dst + (2 * s + 1) * 32), hi);
  }
}

// One B tile to make: dequant_block(src, scale, dst).
struct DequantJob {
  const uint8_t* src;
  const uint16_t* scale;
  uint16_t* dst;
};

// A panel (tiles [tile0, tile0 + tiles)) times one K-block (groups [g0, g0 + groups)).
struct Step {
  int64_t tile0, tiles, g0, groups;
};

// The B tiles of a step into buf[block][group] (1 KB each), listed in the packed bytes' order (group by group, the
// 4 blocks of a group are 2 KB in a row).
void step_jobs(const Args& a, const Step& step, uint16_t* buf, std::vector<DequantJob>& jobs) {
  jobs.clear();
  for (int64_t t = 0; t < step.tiles; ++t) {
    const uint8_t* w = a.lay.tile(a.packed, step.tile0 + t);
    for (int64_t g = 0; g < step.groups; ++g) {
      const uint8_t* bytes = a.lay.group(w, step.g0 + g);
      const uint16_t* scales = a.lay.scales(w, (step.g0 + g) / a.lay.span);
      for (int64_t b = 0; b < kBlocks; ++b)
        jobs.push_back({bytes + b * kBlockBytes, scales + b * kBlockRows,
                        buf + ((t * kBlocks + b) * step.groups + g) * kBTileWords});
    }
  }
}

// The jobs [*next, min(*next + count, jobs.size())), advancing *next. Each asks for the packed bytes (and the scales
// line) of the job kJobsAhead later, two groups on: the weights come from memory, and the hardware prefetcher alone
// falls behind. (This was 128 jobs ahead, which a step of 4 tiles x 8 groups x 4 blocks = 128 jobs never reached:
// no hint at all. It went unnoticed while the scales were an array of their own; with them in the stream, 128-row
// chunks of 4096 -> 11008 took 7.0-7.1 ms against 5.9-6.2 before. Sapphire Rapids, 2 threads, 6 weight copies in
// turn: 4 jobs ahead 5.9-6.3 ms, 8: 6.1-6.2, 16: 6.2, 32: 6.5, 64: 6.6-6.7; 512 rows 18-20 ms alike.) A build with
// -DINT8SERVE_MATMUL_JOBS_AHEAD=N asks N jobs ahead instead (benchmarks/matmul_builds.py compares builds).
#ifndef INT8SERVE_MATMUL_JOBS_AHEAD
#define INT8SERVE_MATMUL_JOBS_AHEAD 8
#endif
constexpr size_t kJobsAhead = INT8SERVE_MATMUL_JOBS_AHEAD;
static_assert(kJobsAhead >= 1, "at least the next job");

INT8SERVE_BF16 void run_jobs(const std::vector<DequantJob>& jobs, size_t* next, size_t count) {
  const size_t end = std::min(jobs.size(), *next + count);
  for (; *next < end; ++*next) {
    if (*next + kJobsAhead < jobs.size()) {
      for (int64_t line = 0; line < kBlockBytes; line += 64)
        _mm_prefetch(reinterpret_cast<const char*>(jobs[*next + kJobsAhead].src) + line, _MM_HINT_T0);
      // its scales too: they follow the weight group's bytes (packed_layout.h), a line no job's bytes share
      _mm_prefetch(reinterpret_cast<const char*>(jobs[*next + kJobsAhead].scale), _MM_HINT_T0);
    }
    dequant_block(jobs[*next].src, jobs[*next].scale, jobs[*next].dst);
  }
}

INT8SERVE_BF16 inline __m512 round_to_bf16(__m512 v) {  // to the nearest even bf16, kept as fp32
  const __m256bh bf = _mm512_cvtneps_pbh(v);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(reinterpret_cast<__m256i>(bf)), 16));
}

// Round 16 rows of 16 fp32 (stride ldc) to the nearest even bf16, in place.
INT8SERVE_BF16 void round_rows(float* c, int64_t ldc) {
  for (int64_t r = 0; r < 16; ++r) _mm512_storeu_ps(c + r * ldc, round_to_bf16(_mm512_loadu_ps(c + r * ldc)));
}

// out[:, step's columns] (+)= x[:, step's inputs] . the B tiles in `buf`; between its passes it makes the next
// step's B tiles (`jobs`), so that their vector arithmetic runs while the tiles multiply.
INT8SERVE_BF16 void multiply_step(const Args& a, const Step& step, const uint16_t* buf,
                                  const std::vector<DequantJob>& jobs, float* sums) {
  const int64_t cstride = a.ldc * 4, xgroups = a.k / kGroup, blocks = step.tiles * kBlocks, groups = step.groups;
  const bool first = step.g0 == 0, last = step.g0 + groups == xgroups;
  const int64_t passes = (a.m / kRowsPerPass) * (blocks / 2);
  const size_t per_pass = (jobs.size() + static_cast<size_t>(passes) - 1) / static_cast<size_t>(passes);
  size_t next = 0;
  for (int64_t m0 = 0; m0 < a.m; m0 += kRowsPerPass) {
    const uint16_t* x0 = a.x + ((m0 / 16) * xgroups + step.g0) * kBTileWords;
    const uint16_t* x1 = x0 + xgroups * kBTileWords;
    for (int64_t j = 0; j < blocks; j += 2) {
      // scratch: [m/16][blocks][16x16 fp32] contiguous tiles
      float* s00 = sums + ((m0 / 16) * blocks + j) * 256;
      float* s01 = s00 + 256;
      float* s10 = s00 + blocks * 256;
      float* s11 = s10 + 256;
      if (first) {
        INT8SERVE_TILE_ZERO(0);
        INT8SERVE_TILE_ZERO(1);
        INT8SERVE_TILE_ZERO(2);
        INT8SERVE_TILE_ZERO(3);
      } else {
        INT8SERVE_TILE_LOAD(0, s00, 64);
        INT8SERVE_TILE_LOAD(1, s01, 64);
        INT8SERVE_TILE_LOAD(2, s10, 64);
        INT8SERVE_TILE_LOAD(3, s11, 64);
      }
      const uint16_t* b0 = buf + j * groups * kBTileWords;
      const uint16_t* b1 = b0 + groups * kBTileWords;
      for (int64_t g = 0; g < groups; ++g) {
        INT8SERVE_TILE_LOAD(4, x0 + g * kBTileWords, 64);
        INT8SERVE_TILE_LOAD(6, b0 + g * kBTileWords, 64);
        INT8SERVE_TILE_DPBF16PS(0, 4, 6);
        INT8SERVE_TILE_LOAD(7, b1 + g * kBTileWords, 64);
        INT8SERVE_TILE_DPBF16PS(1, 4, 7);
        INT8SERVE_TILE_LOAD(5, x1 + g * kBTileWords, 64);
        INT8SERVE_TILE_DPBF16PS(2, 5, 6);
        INT8SERVE_TILE_DPBF16PS(3, 5, 7);
      }
      if (last) {
        float* c = a.out + m0 * a.ldc + step.tile0 * kTileRows + j * kBlockRows;
        float* c_low = c + 16 * a.ldc;
        INT8SERVE_TILE_STORE(0, c, cstride);
        INT8SERVE_TILE_STORE(1, c + 16, cstride);
        INT8SERVE_TILE_STORE(2, c_low, cstride);
        INT8SERVE_TILE_STORE(3, c_low + 16, cstride);
        if (a.round_bf16) {
          round_rows(c, a.ldc);
          round_rows(c + 16, a.ldc);
          round_rows(c_low, a.ldc);
          round_rows(c_low + 16, a.ldc);
        }
      } else {
        INT8SERVE_TILE_STORE(0, s00, 64);
        INT8SERVE_TILE_STORE(1, s01, 64);
        INT8SERVE_TILE_STORE(2, s10, 64);
        INT8SERVE_TILE_STORE(3, s11, 64);
      }
      run_jobs(jobs, &next, per_pass);
    }
  }
  run_jobs(jobs, &next, jobs.size());
}

// The vector path (CPUs with AVX512-BF16 but no AMX, e.g. AMD's Zen 4): the same steps and the same B tiles, made the
// same way, multiplied with vdpbf16ps on zmm registers instead of tiles. A B tile's row p (inputs 2p and 2p + 1 of
// 16 outputs) times that pair of one row of x, broadcast, adds both products to 16 fp32 sums. kVecRows rows x
// kVecBlocks blocks of sums stay in registers (24 of the 32) over a K-block: per pair, 4 loads of B and 6 broadcasts
// feed 24 multiplies. Between K-blocks the sums wait in `sums` ([rows][256] fp32, the panel's columns).
constexpr int64_t kVecRows = 6;
constexpr int64_t kVecBlocks = 4;  // a panel has 4 blocks per tile: always a multiple
constexpr int64_t kPanelColumns = kPanelTiles * kTileRows;

// Rows [m0, m0 + R) x blocks [j0, j0 + kVecBlocks) of a step: their sums over the step's groups, in order.
template <int R>
INT8SERVE_BF16 void vector_sums(const Args& a, const Step& step, const uint16_t* buf, int64_t m0, int64_t j0,
                                float* sums) {
  const int64_t xgroups = a.k / kGroup, groups = step.groups;
  const bool first = step.g0 == 0, last = step.g0 + groups == xgroups;
  const uint16_t* xs[R];  // each row's pairs over the step's groups: a group's 32 inputs are 16 pairs in a row
  for (int r = 0; r < R; ++r) {
    const int64_t row = m0 + r;
    xs[r] = a.x + ((row / 16) * xgroups + step.g0) * kBTileWords + (row % 16) * kGroup;
  }
  __m512 acc[R][kVecBlocks];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < kVecBlocks; ++b)
      acc[r][b] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(sums + (m0 + r) * kPanelColumns + (j0 + b) * 16);
  const int64_t block_words = groups * kBTileWords;  // from one block's B tiles to the next's
  for (int64_t g = 0; g < groups; ++g) {
    const uint16_t* bg = buf + (j0 * groups + g) * kBTileWords;
    for (int p = 0; p < 16; ++p) {
      __m512bh w[kVecBlocks];
      for (int b = 0; b < kVecBlocks; ++b)
        w[b] = reinterpret_cast<__m512bh>(
            _mm512_load_si512(reinterpret_cast<const void*>(bg + b * block_words + p * 32)));
      for (int r = 0; r < R; ++r) {
        int32_t pair;
        std::memcpy(&pair, xs[r] + g * kBTileWords + 2 * p, 4);
        const __m512bh x = reinterpret_cast<__m512bh>(_mm512_set1_epi32(pair));
        for (int b = 0; b < kVecBlocks; ++b) acc[r][b] = _mm512_dpbf16_ps(acc[r][b], x, w[b]);
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < kVecBlocks; ++b) {
      if (!last) {
        _mm512_storeu_ps(sums + (m0 + r) * kPanelColumns + (j0 + b) * 16, acc[r][b]);
        continue;
      }
      float* c = a.out + (m0 + r) * a.ldc + step.tile0 * kTileRows + (j0 + b) * kBlockRows;
      _mm512_storeu_ps(c, a.round_bf16 ? round_to_bf16(acc[r][b]) : acc[r][b]);
    }
}

// The vector path's step: x's own rows, kVecRows at a time, over each kVecBlocks blocks; the next step's B tiles made
// between its passes, as multiply_step does.
INT8SERVE_BF16 void multiply_step_vector(const Args& a, const Step& step, const uint16_t* buf,
                                         const std::vector<DequantJob>& jobs, float* sums) {
  const int64_t blocks = step.tiles * kBlocks;
  const int64_t passes = (a.rows + kVecRows - 1) / kVecRows * (blocks / kVecBlocks);
  const size_t per_pass = (jobs.size() + static_cast<size_t>(passes) - 1) / static_cast<size_t>(passes);
  size_t next = 0;
  for (int64_t m0 = 0; m0 < a.rows; m0 += kVecRows) {
    for (int64_t j0 = 0; j0 < blocks; j0 += kVecBlocks) {
      switch (std::min(kVecRows, a.rows - m0)) {
        case 1: vector_sums<1>(a, step, buf, m0, j0, sums); break;
        case 2: vector_sums<2>(a, step, buf, m0, j0, sums); break;
        case 3: vector_sums<3>(a, step, buf, m0, j0, sums); break;
        case 4: vector_sums<4>(a, step, buf, m0, j0, sums); break;
        case 5: vector_sums<5>(a, step, buf, m0, j0, sums); break;
        default: vector_sums<6>(a, step, buf, m0, j0, sums); break;
      }
      run_jobs(jobs, &next, per_pass);
    }
  }
  run_jobs(jobs, &next, jobs.size());
}

// One thread's tiles [begin, end): panel by panel (kPanelTiles), K-block by K-block (kBlockGroups), the B tiles of
// each step made during the step before it (two buffers).
INT8SERVE_BF16 void multiply_tiles(const Args& a, int64_t begin, int64_t end, uint16_t* buffers[2], float* sums) {
  const int64_t groups = a.k / kGroup;
  std::vector<Step> steps;
  for (int64_t tile0 = begin; tile0 < end; tile0 += kPanelTiles)
    for (int64_t g0 = 0; g0 < groups; g0 += kBlockGroups)
      steps.push_back({tile0, std::min(kPanelTiles, end - tile0), g0, std::min(kBlockGroups, groups - g0)});
  std::vector<DequantJob> jobs;
  if (steps.empty()) return;
  step_jobs(a, steps[0], buffers[0], jobs);
  size_t done = 0;
  run_jobs(jobs, &done, jobs.size());
  for (size_t i = 0; i < steps.size(); ++i) {
    if (i + 1 < steps.size())
      step_jobs(a, steps[i + 1], buffers[(i + 1) % 2], jobs);
    else
      jobs.clear();
    if (a.tiles)
      multiply_step(a, steps[i], buffers[i % 2], jobs, sums);
    else
      multiply_step_vector(a, steps[i], buffers[i % 2], jobs, sums);
  }
}

// x [m, k] (fp32, rounded to the nearest even bf16 here, or bf16) -> bf16 [mp / 16][kp / 32][16][32], zero padded
// to mp rows and kp inputs: each A tile's 16 rows x 32 inputs in one 1 KB piece. Tile loads of rows 2 k bytes apart
// (8 KB at k = 4096) measured 2.2 TFLOP/s against 3.5 from contiguous tiles (L2-resident B); converting here saves
// the caller's own pass over the rows.
INT8SERVE_BF16 void pack_rows(const void* x, bool fp32, int64_t m, int64_t k, int64_t mp, int64_t kp, uint16_t* rows,
                              int threads) {
  const int64_t groups = kp / kGroup, blocks = mp / 16;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
  for (int64_t block = 0; block < blocks; ++block) {
    for (int64_t g = 0; g < groups; ++g) {
      uint16_t* dst = rows + (block * groups + g) * kBTileWords;
      for (int64_t i = 0; i < 16; ++i) {
        const int64_t r = block * 16 + i, k0 = g * kGroup;
        const int64_t count = r < m ? std::max<int64_t>(0, std::min<int64_t>(kGroup, k - k0)) : 0;
        const __mmask32 mask = count == kGroup ? ~__mmask32(0) : static_cast<__mmask32>((uint64_t{1} << count) - 1);
        const int64_t at = count > 0 ? r * k + k0 : 0;  // masked-off lanes are not read
        __m512i v;
        if (fp32) {
          const float* src = static_cast<const float*>(x) + at;
          const __m512 lo = _mm512_maskz_loadu_ps(static_cast<__mmask16>(mask), src);
          const __m512 hi = _mm512_maskz_loadu_ps(static_cast<__mmask16>(mask >> 16), count > 16 ? src + 16 : src);
          v = reinterpret_cast<__m512i>(_mm512_cvtne2ps_pbh(hi, lo));
        } else {
          v = _mm512_maskz_loadu_epi16(mask, static_cast<const uint16_t*>(x) + at);
        }
        _mm512_storeu_si512(reinterpret_cast<void*>(dst + i * kGroup), v);
      }
    }
  }
}

}  // namespace

#define I8M_API extern "C" __attribute__((visibility("default")))

I8M_API int i8m_abi_version() { return 4; }

// 1 if this CPU and process can run i8m_matmul.
// 1 if this CPU and process can run i8m_matmul's path `impl` (0: either, 1: AMX tiles, 2: AVX512-BF16 vectors).
I8M_API int i8m_cpu_has(int impl) { return path_ready(impl) ? 1 : 0; }

// out [m, ldc] fp32 = x [m, k] . dequantized weight^T, over the packed weight's `tiles` tiles of 64 outputs
// (columns [0, 64 * tiles) of out). x is fp32 (x_fp32 = 1: rounded to the nearest even bf16) or bf16, row-major;
// out must hold m rounded up to 32 rows (the tile path gives the padding rows the zero rows' products, the vector
// path leaves them as they are). impl: 0 the tiles where the CPU has them, else the vectors; 1 or 2 that path.
// Status: 0 ok, -1 the CPU cannot, -2 out of memory for its buffers, -3 bad sizes.
I8M_API int i8m_matmul(const void* x, int x_fp32, int64_t m, int64_t k, const uint8_t* packed, int64_t tiles,
                       int64_t group_size, float* out, int64_t ldc, int round_bf16, int impl, int threads) {
  if (m <= 0 || k <= 0 || tiles <= 0 || ldc < tiles * kTileRows || group_size < 0 || group_size % kGroup) return -3;
  if (impl < kAuto || impl > kVector) return -3;
  if (!path_ready(impl)) return -1;
  const bool use_tiles = impl == kTiles || (impl == kAuto && tiles_ready());
  const int64_t mp = (m + kRowsPerPass - 1) / kRowsPerPass * kRowsPerPass, kp = (k + kGroup - 1) / kGroup * kGroup;
  const int64_t groups = kp / kGroup;
  // the calling thread's packed rows, kept and grown (the engine calls from one thread), on 64-byte boundaries: every
  // tile load reads 16 rows of 64 bytes (aligned.h)
  static thread_local std::vector<uint16_t> rows;
  try {
    if (rows.size() < static_cast<size_t>(mp * kp + kAlignSlack<uint16_t>))
      rows.resize(static_cast<size_t>(mp * kp + kAlignSlack<uint16_t>));
  } catch (const std::bad_alloc&) {
    return -2;
  }
  uint16_t* packed_rows = aligned64(rows);
  const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, tiles)));
  pack_rows(x, x_fp32 != 0, m, k, mp, kp, packed_rows, nthreads);
  const Args args{packed_rows, mp, kp, m, use_tiles, packed, packed::layout(groups, group_size), out, ldc,
                  round_bf16 != 0};
  std::atomic<bool> out_of_memory{false};
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {
    const int count = nthreads > 1 ? omp_get_num_threads() : 1, id = nthreads > 1 ? omp_get_thread_num() : 0;
    // each thread's two buffers of B tiles (128 KB each) and its panel's sums between K-blocks (mp x 256 fp32), kept
    // for its later calls (OpenMP's threads live as long as the process); no exception may leave the region
    // (each on 64-byte boundaries, as the rows)
    static thread_local std::vector<uint16_t> tile_room;
    static thread_local std::vector<float> sum_room;
    constexpr int64_t kBufferWords = kPanelTiles * kBlocks * kBlockGroups * kBTileWords;
    try {
      if (tile_room.empty()) tile_room.resize(static_cast<size_t>(2 * kBufferWords + kAlignSlack<uint16_t>));
      if (sum_room.size() < static_cast<size_t>(mp * kPanelTiles * kTileRows + kAlignSlack<float>))
        sum_room.resize(static_cast<size_t>(mp * kPanelTiles * kTileRows + kAlignSlack<float>));
      uint16_t* buffers[2] = {aligned64(tile_room), aligned64(tile_room) + kBufferWords};
      if (use_tiles) configure_tiles();
      multiply_tiles(args, tiles * id / count, tiles * (id + 1) / count, buffers, aligned64(sum_room));
      if (use_tiles) tiles_release();  // other code on this thread (oneDNN, gemv.cpp) configures the tiles its own way
    } catch (const std::bad_alloc&) {
      if (use_tiles) tiles_release();
      out_of_memory = true;
    }
  }
  if (out_of_memory) return -2;
  return 0;
}
