// int8 weight x int8 activation matrix-vector products for decode (a few activation rows; more rows are taken 4 at a
// time over each tile, or over each chunk of a tile, while it is in cache), fp32 accumulation and output, on every
// x86-64 CPU; on the avx2, avxvnni, vnni512 and amx paths with precise activations, calls of many rows (prefill) as a
// register-blocked GEMM (gemm_wide16, with vpdpwssd on the avxvnni path; gemm_exact_vnni512; gemm_exact_amx on AMX-INT8
// tiles), with the same bits.
//
// y[m, n] = sum_w wscale[n, w] * (sum_{g in weight group w} xscale[m, g] * sum_{k in group g} w[n, k] * xq[m, k])
//
// Activations are quantized here, per row in groups of 32 values (one fp32 scale per group, round to nearest even);
// with `precise` each row is quantized twice: the row (q_hi, scale d), then what that left over on the fixed scale
// d / 256 (q_lo), so that 256 * q_hi + q_lo is the row as a 16-bit integer on the scale d / 256. Each group's two
// int32 dot products are combined exactly, 256 * dot_hi + dot_lo, before the one conversion to fp32 below (the avx2
// and avxvnni paths multiply that 16-bit integer directly).
// Weights are int8, repacked once (see kernels/packed.py, pack_weight) into tiles of 64 output rows, each group of
// 32 inputs of a tile 2048 bytes:
//
//   group[block][step][row][byte] = w[64 * tile + 16 * block + row, 32 * group + 4 * step + byte] + 128
//          4      8     16   4
//
// with bf16 scales, one per output row and weight group (a group of `group_size` = 32, 64, 128... input values, or the
// whole row for per-channel scales, group_size 0), 64 of them (128 bytes) right after the groups of their weight
// group, in the same stream of bytes (packed_layout.h: where each group and each weight group's scales are).
//
// One 64-byte load holds 4 consecutive k of 16 output rows. Each path multiplies those with 4 activation bytes
// broadcast to every 32-bit lane, so each lane accumulates one output row and no horizontal sums are needed:
//   - vnni512: `vpdpbusd` on zmm (unsigned weight x signed activation, 4 products summed into each int32 lane); the
//     excess 128 * sum(xq of the group) is the same for every output row and is subtracted exactly by starting the
//     group's accumulator at -128 * sum(xq);
//   - avxvnni: the same instruction on ymm (8 rows per register, two per load); calls of 2 precise rows and more as
//     on the avx2 path (below), with vpdpwssd for vpmaddwd + vpaddd;
//   - avx2: `vpmaddubsw` + `vpmaddwd`. vpmaddubsw saturates its int16 pair sums, and 255 * 127 * 2 would, so it
//     multiplies |w| (unsigned, <= 127) with sign(w) * x (signed, |.| <= 127): a pair sums to at most 32258;
//   - scalar: plain C++, the reference.
// The amx path (AMX-INT8: Sapphire Rapids and later) reads the same bytes as tiles, a block's 8 steps of one group
// (8 x 64 bytes) each, and multiplies the activations of up to 16 rows with them at once (see tile_amx; calls of
// kAmxGemmMinRows precise rows and more: gemm_exact_amx).
// Each group's int32 dot product is exact (|dot| <= 32 * 127 * 127 < 2^24, so its conversion to fp32 is exact too;
// a precise row's combined dot, |.| < 2^28, is rounded to the nearest fp32 by that conversion, on every path alike),
// then, in group order, inner = fma(float(dot), xscale, inner) within a weight group, acc = fma(inner, wscale, acc)
// at the end of each weight group (with one weight group, acc = inner * wscale as before), y = acc. Every path
// performs exactly these roundings in this order for every output, so results are bitwise identical across paths and
// independent of how many rows are in the call.
//
// Plain C ABI (loaded with ctypes, see kernels/library.py and gemv.py), no torch headers: it compiles in a few seconds and does not
// depend on torch's version or C++ ABI. Built without -march: the vector functions carry target attributes and are
// only called after a runtime CPU check. Threads: OpenMP with the count the caller passes (kernel_threads(),
// torch's count or 1 in small decode steps), or 1 below kParallelGemvWork; torch's own libgomp is already loaded
// when this library is, so both share one OpenMP runtime.

#include <cpuid.h>
#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <new>
#include <vector>

#include "aligned.h"
#include "amx_tiles.h"
#include "packed_layout.h"
#include "prefetch.h"

namespace {

using packed::kBlockBytes;  // the packed layout's shape (packed_layout.h)
using packed::kBlockRows;
using packed::kBlocks;
using packed::kGroup;
using packed::kGroupBytes;
using packed::kSteps;
using packed::kTileRows;
constexpr int64_t kMaxRows = 4;                      // activation rows per pass over a tile
// The 256-bit paths ask for the line one group ahead (of the same tile, or the next tile's first) while they compute:
// on an AVX2-only EPYC (Zen 3) their arithmetic takes about as long as the memory, and without the hint the two did
// not overlap (avx2, precise, 2 threads, weights streamed from memory; 11008 -> 4096: 1 row 9.5 -> 11.3 GB/s, 4 rows
// 5.7 -> 6.8 GB/s; 4096 -> 11008: 1 row 12.2 -> 14.0 GB/s, 2 rows 9.6 -> 13.2 GB/s).
// (-DINT8SERVE_PREFETCH_BYTES=0 builds without it: benchmarks/gemv_builds.py compares the two.)
#ifndef INT8SERVE_PREFETCH_BYTES
#define INT8SERVE_PREFETCH_BYTES 2048  // kGroupBytes
#endif
constexpr int64_t kPrefetchBytes = INT8SERVE_PREFETCH_BYTES;
// The 512-bit paths ask for the lines one group ahead too, and 16 KB ahead into L2, where more requests can be in
// flight than L1 takes. On a Sapphire Rapids (2 vCPU, 2 threads, precise, weights streamed from memory;
// benchmarks/gemv_builds.py, 2026-12-02), one group ahead: vnni512 1 row 22.1 -> 24.2 GB/s (4096 -> 11008) and
// 23.3 -> 24.6 (11008 -> 4096), 4 rows 16.3 -> 16.6 and 14.6 -> 15.7; amx (whose tile loads wait for memory one group
// at a time) 1 row 22.9 -> 25.2 and 22.2 -> 24.9, 4 rows 16.2 -> 20.2 and 16.4 -> 19.5. The L2 hint on top, weights on
// 2 MB pages, in the packed layout v1: amx 4 rows 1.26-1.29x, 1 and 2 rows 0.95-0.99x, so it was for calls of more
// than 4 int8 rows only; since the layout v2 it pays at 2 rows too, and is asked for at every row count (the same
// CPU and script, docs/benchmarks.md: without it 1 row 0.97-1.00x, 2 rows 0.86-0.91x, 4 rows 0.71-0.75x; 16, 32 and
// 64 KB ahead alike). On AMD CPUs calls of 1 and 2 precise rows go without it (INT8SERVE_L2_HINT_ALWAYS, below).
#ifndef INT8SERVE_PREFETCH_BYTES_512
#define INT8SERVE_PREFETCH_BYTES_512 2048  // kGroupBytes
#endif
constexpr int64_t kPrefetchBytes512 = INT8SERVE_PREFETCH_BYTES_512;
#ifndef INT8SERVE_PREFETCH_L2_BYTES_512
#define INT8SERVE_PREFETCH_L2_BYTES_512 16384
#endif
constexpr int64_t kPrefetchL2Bytes512 = INT8SERVE_PREFETCH_L2_BYTES_512;
// Since the scales moved into the weights' stream (packed_layout.h, a group's stride 2176 bytes), the one-group hints
// above leave lines unasked, and two hints measured better than one (Sapphire Rapids, 2 threads, precise, streamed
// weights, benchmarks/gemv_builds.py, 2026-12-02; the 7B decode shapes and the output head): vnni512 also asks for
// the line 4 KB ahead at every step, 1 row 1.01-1.04x, 2 rows 1.02-1.09x (that line alone, without the 2 KB one:
// 0.92-0.99x); the amx path asks, each group, for the 4 KB from 2 KB ahead instead of 2 KB (two groups' lines, each
// line asked twice), 4 rows 1.09-1.14x (2176 bytes, one group's stride: 1.07-1.08x; 6 KB: 0.79-0.89x).
// On an AMD EPYC Zen 4 the vnni512 line 4 KB ahead helps only calls of more than one pass of rows (2 threads,
// precise, streamed weights, benchmarks/gemv_builds.py, 2026-12-02, the 7B decode shapes, two runs; without it: 1 row
// 1.00-1.15x, 2 rows 0.86-1.07x, 4 rows 0.85-0.94x), so on AMD CPUs calls of up to kMaxRows int8 rows (what was one
// pass then) go without it (far_hint); since 2026-12-04 vnni512 takes 4 precise rows in one pass, with the hint
// (without it 0.90-1.02x at 3 and 4 rows, the same CPU model and script).
#ifndef INT8SERVE_PREFETCH_FAR_BYTES_512
#define INT8SERVE_PREFETCH_FAR_BYTES_512 4096
#endif
constexpr int64_t kPrefetchFarBytes512 = INT8SERVE_PREFETCH_FAR_BYTES_512;
// -1: calls of up to kMaxRows int8 rows take the far hint unless the CPU is AMD's (the rule above); 0 or 1: never or
// always (benchmarks/gemv_builds.py builds variants to test the rule on another CPU).
#ifndef INT8SERVE_FAR_HINT_SINGLE_PASS
#define INT8SERVE_FAR_HINT_SINGLE_PASS -1
#endif
// The L2 hint (kPrefetchL2Bytes512) follows the same rule on AMD CPUs: on a Zen 4 (2026-12-05, 2 threads, precise,
// streamed weights, the 7B decode shapes, 6 rounds, benchmarks/gemv_builds.py) calls of 1 and 2 precise rows ran
// 1.06-1.19x faster without it and 4 rows 0.83-0.89x as fast. INT8SERVE_L2_HINT_ALWAYS=1 builds the rule out.
#ifndef INT8SERVE_L2_HINT_ALWAYS
#define INT8SERVE_L2_HINT_ALWAYS 0
#endif
// At every row count the amx path asks for the 4 KB from 2 KB ahead. In the afternoon of 2026-12-03 (the same CPU and
// script, after the hints of decode attention were found waiting for free L1 miss buffers) one group's stride (2176
// bytes) measured 1.06-1.10x faster from 8 int8 rows (4 sequences with precise activations), three runs, and was taken
// there; that evening three runs of the same comparison (2 threads, precise, streamed weights, the 7B decode shapes)
// had 4096 faster at 8, 12 and 16 int8 rows: 1.13-1.24x (4 rows: gate/up 25.7 -> 29.4 GB/s, down 25.3 -> 28.8; against
// 2176, 3264 bytes 1.04-1.26x; against 4096, 4352 bytes 1.01-1.03x and 5120 0.91-0.93x), and half an hour later, when
// every build ran slower (26.4-26.7 GB/s at 4 rows), 2176 measured 0.98-1.05x of 4096: the best span moves with the
// host's state, and 4096 was never the slower by more than 5%. The L2 hint 8 or 32 KB ahead instead of 16 measured the
// same; without it, or without the L1 hint, slower (4 rows: 0.85x, 0.95-0.97x). A single vnni512 pass of all 8 int8
// rows instead of the tiles: 0.90-1.16x of either, by shape and hour.
#ifndef INT8SERVE_AMX_PREFETCH_SPAN
#define INT8SERVE_AMX_PREFETCH_SPAN 4096
#endif
constexpr int64_t kAmxPrefetchSpan = INT8SERVE_AMX_PREFETCH_SPAN;

enum Impl { kAuto = 0, kVnni512 = 1, kAvxVnni = 2, kAvx2 = 3, kScalar = 4, kAmx = 5 };
constexpr int kLastImpl = kAmx;

// AMX (Sapphire Rapids and later): the CPU has AMX-TILE and AMX-INT8 (CPUID leaf 7, EDX bits 24 and 25), and Linux
// grants this process the tile data state (arch_prctl ARCH_REQ_XCOMP_PERM for XFEATURE_XTILEDATA, once per process;
// every thread may then use the tiles).
bool amx_ready() {
  static const bool ready = [] {
    unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
    if (!__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx) || !((edx >> 24) & 1u) || !((edx >> 25) & 1u)) return false;
    return amx_permission();
  }();
  return ready;
}

bool cpu_has(Impl impl) {
  __builtin_cpu_init();
  switch (impl) {
    case kVnni512:
      return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
    case kAvxVnni:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("avxvnni");
    case kAvx2:
      return __builtin_cpu_supports("avx2");
    case kScalar:
      return true;
    case kAmx:
      return cpu_has(kVnni512) && amx_ready();
    default:
      return false;
  }
}

Impl best_impl() {
  static const Impl best = [] {
    for (Impl impl : {kAmx, kVnni512, kAvxVnni, kAvx2})
      if (cpu_has(impl)) return impl;
    return kScalar;
  }();
  return best;
}

Impl resolve(int impl) { return impl == kAuto ? best_impl() : static_cast<Impl>(impl); }

bool cpu_is_amd() {
  static const bool amd = [] {
    __builtin_cpu_init();
    return __builtin_cpu_is("amd") != 0;
  }();
  return amd;
}

// A build setting of the form -1 (the default: `rule`, measured per CPU kind), 0 (never) or 1 (always).
bool setting_or_rule(int setting, bool rule) { return setting < 0 ? rule : setting != 0; }

inline float bf16_to_float(uint16_t v) {
  const uint32_t bits = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even (finite values)
  uint32_t bits;
  std::memcpy(&bits, &f, 4);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// ---- activation quantization ----

// Quantized activations: xq [M, Kp] int8 (zero padded), xscale [M, G] fp32, xcorr [M, G] = -128 * sum(xq of group);
// precise: 2M int8 rows, and for the avx2 path `wide` [M, Kp] = 256 * q_hi + q_lo, each row as one 16-bit integer.
struct Activations {
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<int32_t> corr;
  std::vector<int16_t> wide;
  int64_t kp = 0;
  int64_t groups = 0;
};

// One group of 32 (zero padded past `count`): q = round-half-even(x * inv) clamped to [-127, 127],
// corr = -128 * sum(q). The row's own quantization takes inv = 1 / d, d = max|x| / 127 (its scale); a precise row's
// second int8 row takes what the first left over with inv = 256 / d (|.| <= d / 2, so |q| <= 128 before the clamp).
// The scalar version; the vector ones perform the same IEEE operations, so all give the same bits.
void round_group_scalar(const float* x, int64_t count, float inv, int8_t* q, int32_t* corr) {
  int32_t sum = 0;
  for (int64_t i = 0; i < kGroup; ++i) {
    int32_t v = 0;
    if (i < count) v = std::min(127, std::max(-127, static_cast<int32_t>(std::nearbyint(x[i] * inv))));
    q[i] = static_cast<int8_t>(v);
    sum += v;
  }
  *corr = -128 * sum;
}

// d = max|x| / 127 over the group's `count` values (its scale), and 1 / d (0 for an all-zero group).
inline float group_inverse(float amax, float* scale) {
  const float d = amax / 127.0f;
  *scale = d;
  return d > 0.0f ? 1.0f / d : 0.0f;
}

void quantize_group_scalar(const float* x, int64_t count, int8_t* q, float* scale, int32_t* corr) {
  float amax = 0.0f;
  for (int64_t i = 0; i < count; ++i) amax = std::max(amax, std::fabs(x[i]));
  round_group_scalar(x, count, group_inverse(amax, scale), q, corr);
}

#define INT8SERVE_VNNI512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define INT8SERVE_AVX2 __attribute__((target("avx2,fma")))
#define INT8SERVE_AVXVNNI __attribute__((target("avx2,fma,avxvnni")))

// The lanes of a group's two halves that hold values (count of 32).
INT8SERVE_VNNI512 inline void group_masks(int64_t count, __mmask16* m0, __mmask16* m1) {
  *m0 = count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
  *m1 = count >= 32 ? __mmask16(0xFFFF) : count <= 16 ? __mmask16(0) : __mmask16((1u << (count - 16)) - 1);
}

// (the scalar version calls libm's nearbyint per value: 40 us per 4096 values, more than the rest of a small call)
INT8SERVE_VNNI512 void round_group_avx512(const float* x, int64_t count, float inv, int8_t* q, int32_t* corr) {
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  __mmask16 m0, m1;
  group_masks(count, &m0, &m1);
  const __m512 vinv = _mm512_set1_ps(inv);
  __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m0, x), vinv));  // MXCSR: round half to even
  __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_maskz_loadu_ps(m1, x + 16), vinv));
  i0 = _mm512_min_epi32(_mm512_max_epi32(i0, lo), hi);
  i1 = _mm512_min_epi32(_mm512_max_epi32(i1, lo), hi);
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(i0));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + 16), _mm512_cvtepi32_epi8(i1));
  *corr = -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
}

INT8SERVE_VNNI512 void quantize_group_avx512(const float* x, int64_t count, int8_t* q, float* scale, int32_t* corr) {
  __mmask16 m0, m1;
  group_masks(count, &m0, &m1);
  const __m512 v0 = _mm512_abs_ps(_mm512_maskz_loadu_ps(m0, x)), v1 = _mm512_abs_ps(_mm512_maskz_loadu_ps(m1, x + 16));
  round_group_avx512(x, count, group_inverse(_mm512_reduce_max_ps(_mm512_max_ps(v0, v1)), scale), q, corr);
}

INT8SERVE_AVX2 void round_group_avx2(const float* x, int64_t count, float inv, int8_t* q, int32_t* corr) {
  float padded[kGroup] = {};
  std::memcpy(padded, x, static_cast<size_t>(count) * sizeof(float));
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  alignas(32) int32_t ints[kGroup];
  for (int i = 0; i < 4; ++i) {
    __m256i v = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(padded + 8 * i), vinv));  // round half to even
    v = _mm256_min_epi32(_mm256_max_epi32(v, lo), hi);
    _mm256_store_si256(reinterpret_cast<__m256i*>(ints + 8 * i), v);
  }
  int32_t sum = 0;
  for (int64_t i = 0; i < kGroup; ++i) {
    q[i] = static_cast<int8_t>(ints[i]);
    sum += ints[i];
  }
  *corr = -128 * sum;
}

INT8SERVE_AVX2 void quantize_group_avx2(const float* x, int64_t count, int8_t* q, float* scale, int32_t* corr) {
  float padded[kGroup] = {};
  std::memcpy(padded, x, static_cast<size_t>(count) * sizeof(float));
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(padded + 8 * i)));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
  round_group_avx2(x, count, group_inverse(_mm_cvtss_f32(h), scale), q, corr);
}

using GroupQuantizer = void (*)(const float*, int64_t, int8_t*, float*, int32_t*);
using GroupRounder = void (*)(const float*, int64_t, float, int8_t*, int32_t*);

GroupQuantizer group_quantizer(Impl impl) {
  switch (impl) {
    case kVnni512:
    case kAmx: return quantize_group_avx512;
    case kAvxVnni:
    case kAvx2: return quantize_group_avx2;
    default: return quantize_group_scalar;
  }
}

GroupRounder group_rounder(Impl impl) {
  switch (impl) {
    case kVnni512:
    case kAmx: return round_group_avx512;
    case kAvxVnni:
    case kAvx2: return round_group_avx2;
    default: return round_group_scalar;
  }
}

// One group of a precise row on the avx2 path (32 values, the whole group): q_hi and q_lo, their scales and
// corrections, and the 16-bit row 256 * q_hi + q_lo, by the same IEEE operations as quantize_group_avx2, the residual
// of quantize_row and round_group_avx2, in registers (prefill quantizes many rows: it was 5% of a GEMM call's time).
INT8SERVE_AVX2 void quantize_pair_avx2(const float* x, int8_t* qhi, int8_t* qlo, float* scale_hi, float* scale_lo,
                                       int32_t* corr_hi, int32_t* corr_lo, int16_t* wide) {
  __m256 v[4];
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 m = _mm256_setzero_ps();
  for (int i = 0; i < 4; ++i) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[i] = _mm256_loadu_ps(x + 8 * i)));
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
  const float inv = group_inverse(_mm_cvtss_f32(h), scale_hi);
  const float d = *scale_hi;
  const float inv256 = d > 0.0f ? (1.0f / d) * 256.0f : 0.0f;
  *scale_lo = d * (1.0f / 256.0f);
  const __m256i lo = _mm256_set1_epi32(-127), hi = _mm256_set1_epi32(127);
  __m256i qh[4], ql[4];
  __m256i sum_hi = _mm256_setzero_si256(), sum_lo = _mm256_setzero_si256();
  for (int i = 0; i < 4; ++i) {
    qh[i] = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(v[i], _mm256_set1_ps(inv))), lo), hi);
    const __m256 residual = _mm256_sub_ps(v[i], _mm256_mul_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(qh[i])));
    ql[i] = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(residual, _mm256_set1_ps(inv256))), lo),
                             hi);
    sum_hi = _mm256_add_epi32(sum_hi, qh[i]);
    sum_lo = _mm256_add_epi32(sum_lo, ql[i]);
    const __m256i w = _mm256_add_epi32(_mm256_slli_epi32(qh[i], 8), ql[i]);  // |.| <= 32639: packs exactly
    _mm_storeu_si128(reinterpret_cast<__m128i*>(wide + 8 * i),
                     _mm_packs_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
  }
  // int32 -> int8 in order: packs work within 128-bit lanes, the permute puts the 4-value pieces back in order
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i bytes_hi = _mm256_permutevar8x32_epi32(
      _mm256_packs_epi16(_mm256_packs_epi32(qh[0], qh[1]), _mm256_packs_epi32(qh[2], qh[3])), order);
  const __m256i bytes_lo = _mm256_permutevar8x32_epi32(
      _mm256_packs_epi16(_mm256_packs_epi32(ql[0], ql[1]), _mm256_packs_epi32(ql[2], ql[3])), order);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(qhi), bytes_hi);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(qlo), bytes_lo);
  alignas(32) int32_t sums[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(sums), sum_hi);
  _mm256_store_si256(reinterpret_cast<__m256i*>(sums + 8), sum_lo);
  int32_t total_hi = 0, total_lo = 0;
  for (int i = 0; i < 8; ++i) total_hi += sums[i], total_lo += sums[8 + i];
  *corr_hi = -128 * total_hi;
  *corr_lo = -128 * total_lo;
}

// Quantize input row i into int8 row i (precise: rows 2i and 2i + 1, see quantize; and row i of `wide` if the
// Activations have it).
void quantize_row(const float* x, int64_t i, int64_t k, GroupQuantizer group, GroupRounder round_group, bool precise,
                  Activations& a) {
  const float* source = x + i * k;
  const int64_t r = precise ? 2 * i : i;  // the first int8 row
  for (int64_t g = 0; g < a.groups; ++g) {
    const int64_t count = std::min(kGroup, k - g * kGroup);
    int8_t* q = a.q.data() + r * a.kp + g * kGroup;
    float* scale = a.scale.data() + r * a.groups + g;
    int32_t* corr = a.corr.data() + r * a.groups + g;
    int16_t* wide = a.wide.empty() ? nullptr : a.wide.data() + i * a.kp + g * kGroup;
    if (precise && wide && count == kGroup) {  // (the avx2 and avxvnni paths: `wide` is only made there)
      quantize_pair_avx2(source + g * kGroup, q, q + a.kp, scale, scale + a.groups, corr, corr + a.groups, wide);
      continue;
    }
    group(source + g * kGroup, count, q, scale, corr);
    if (!precise) continue;
    // the group's quantization error, in plain fp32 (no fma: -ffp-contract=off), on the scale d / 256
    const float d = *scale;
    float residual[kGroup] = {};
    for (int64_t j = 0; j < count; ++j) residual[j] = source[g * kGroup + j] - d * static_cast<float>(q[j]);
    const float inv256 = d > 0.0f ? (1.0f / d) * 256.0f : 0.0f;
    scale[a.groups] = d * (1.0f / 256.0f);  // exact: a power of two
    round_group(residual, count, inv256, q + a.kp, corr + a.groups);
    if (wide)
      for (int64_t j = 0; j < kGroup; ++j) wide[j] = static_cast<int16_t>(256 * q[j] + q[a.kp + j]);
  }
}

// Quantize M rows. precise: 2 int8 rows per input row, the row (2r) and what its quantization left over (2r + 1) on
// the scale d / 256 (d: row 2r's scale of the group), so that x = d / 256 * (256 * q_hi + q_lo) to about 1/(2 * 127 *
// 256) of each group's largest value; the kernel combines each pair's dot products (see the top of this file).
// Calls of kParallelQuantizeRows rows and kParallelQuantizeValues values or more (prefill chunks) quantize on
// `threads` threads, a row each at a time (each row's result is the same either way); decode's few rows stay on one.
constexpr int64_t kParallelQuantizeRows = 8;
// Calls of at least this many rows with precise activations run the register-blocked GEMM on 16-bit rows
// (gemm_wide16, below) on the avx2 and avxvnni paths.
#ifndef INT8SERVE_WIDE_GEMM_MIN_ROWS
#define INT8SERVE_WIDE_GEMM_MIN_ROWS 16
#endif
constexpr int64_t kWideGemmMinRows = INT8SERVE_WIDE_GEMM_MIN_ROWS;
// The same for the vnni512 path (gemm_exact_vnni512, below).
#ifndef INT8SERVE_EXACT_GEMM_MIN_ROWS
#define INT8SERVE_EXACT_GEMM_MIN_ROWS 16
#endif
constexpr int64_t kExactGemmMinRows = INT8SERVE_EXACT_GEMM_MIN_ROWS;
// The same for the amx path (gemm_exact_amx, below).
#ifndef INT8SERVE_AMX_GEMM_MIN_ROWS
#define INT8SERVE_AMX_GEMM_MIN_ROWS 32
#endif
constexpr int64_t kAmxGemmMinRows = INT8SERVE_AMX_GEMM_MIN_ROWS;

// Whether a call of m rows on path `impl` multiplies precise rows as 16-bit integers (Activations::wide;
// tile_avx2_wide, gemm_wide16): every avx2 call, and avxvnni calls of kAvxVnniWideRows rows and more. Below, the
// avxvnni path multiplies a row's two int8 rows with vpdpbusd, as vnni512 does: on a Sapphire Rapids held to its code
// (benchmarks/gemv_builds.py against ef46020, 2 threads, streamed weights, the 7B decode shapes, 2026-12-03) the 16-bit
// rows with vpdpwssd were 1.18-1.39x faster at 4 rows, 1.01-1.19x at 3, the same at 2 and 0.93-0.95x at 1.
constexpr int64_t kAvxVnniWideRows = 2;
bool takes_wide_rows(Impl impl, int64_t m) { return impl == kAvx2 || (impl == kAvxVnni && m >= kAvxVnniWideRows); }
constexpr int64_t kParallelQuantizeValues = int64_t{1} << 15;

Activations quantize(const float* x, int64_t m, int64_t k, Impl impl, bool precise, int threads) {
  Activations a;
  const int64_t rows = precise ? 2 * m : m;
  a.kp = (k + kGroup - 1) / kGroup * kGroup;
  a.groups = a.kp / kGroup;
  a.q.assign(static_cast<size_t>(rows * a.kp), 0);
  a.scale.assign(static_cast<size_t>(rows * a.groups), 0.0f);
  a.corr.assign(static_cast<size_t>(rows * a.groups), 0);
  if (precise && takes_wide_rows(impl, m)) a.wide.resize(static_cast<size_t>(m * a.kp));
  const GroupQuantizer group = group_quantizer(impl);
  const GroupRounder round_group = group_rounder(impl);
  const bool parallel = m >= kParallelQuantizeRows && m * k >= kParallelQuantizeValues;
  const int nthreads = parallel ? static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, m))) : 1;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
  for (int64_t i = 0; i < m; ++i) quantize_row(x, i, k, group, round_group, precise, a);
  return a;
}

// ---- the tile kernels ----

// A pass of activation rows over tiles. Rows are int8 rows; with `pairs` (precise activations) rows 2j and 2j + 1 are
// output row j's q_hi and q_lo, whose dot products combine as 256 * dot_hi + dot_lo, scaled by row 2j + 1's scale.
struct TileArgs {
  packed::Layout lay;     // where the groups and scales of a tile are
  const uint8_t* packed;  // the whole packed weight (with its scales)
  const int8_t* xq;       // first int8 activation row of this pass
  const float* xscale;
  const int32_t* xcorr;
  const int16_t* xwide;   // tile_avx2_wide: the pass's first row as 16-bit integers (Activations::wide)
  int64_t kp, groups, n;
  bool pairs;
  bool far_hint;          // vnni512: ask for the line kPrefetchFarBytes512 ahead too (see there)
  bool l2_hint;           // vnni512: ask for the line kPrefetchL2Bytes512 ahead into L2 (see INT8SERVE_L2_HINT_ALWAYS)
  float* y;               // first output row of this pass
};

// The GEMMs' last step for rows [r_begin, r_begin + m) of tile `tile`: their outputs of the tile (acc, 64 floats a
// row) into y.
void store_tile_rows(const TileArgs& base, int64_t r_begin, int64_t m, int64_t tile, const float* acc) {
  const int64_t n0 = tile * kTileRows;
  const int64_t count = std::min(kTileRows, base.n - n0);
  for (int64_t r = 0; r < m; ++r)
    std::memcpy(base.y + (r_begin + r) * base.n + n0, acc + r * kTileRows, static_cast<size_t>(count) * sizeof(float));
}

// The GEMMs' hint (all but the AMX one: INT8SERVE_AMX_GEMM_HINT) while the K-block of groups [g0, g1) of `tile`
// multiplies: as many bytes after it (the next K-block, or the next tile's first) asked for into L2, each of the
// K-block's `blocks` register blocks of rows asking for its share of the lines (ask_for_share). Made once per K-block:
// its divisions stay out of the loop over register blocks.
struct NextKBlock {
  const uint8_t* next;  // the first byte after the K-block
  int64_t lines;        // 64-byte lines asked for in all
  int64_t per_block;    // lines a register block asks for
};

inline NextKBlock next_kblock(const packed::Layout& lay, const uint8_t* tile, int64_t g0, int64_t g1, int64_t blocks) {
  const int64_t bytes = (g1 - g0) * lay.wgroup_bytes() / lay.span;
  const int64_t lines = bytes / 64;
  return NextKBlock{lay.group(tile, g0) + bytes, lines, (lines + blocks - 1) / blocks};
}

// Register block `block`'s share of the next K-block's lines.
inline void ask_for_share(const NextKBlock& k, int64_t block) {
  for (int64_t line = block * k.per_block, end = std::min(line + k.per_block, k.lines); line < end; ++line)
    ask_for_line<_MM_HINT_T1>(k.next + 64 * line);  // (prefetch.h: why not _mm_prefetch)
}

// Rows a pass of a GEMM over the tiles: a call of m rows in chunks of about the same size, of at most about max_rows,
// whole register blocks of block_rows.
int64_t gemm_chunk_rows(int64_t m, int64_t max_rows, int64_t block_rows) {
  const int64_t passes = (m + max_rows - 1) / max_rows;
  const int64_t even = (m + passes - 1) / passes;
  return (even + block_rows - 1) / block_rows * block_rows;
}

// The exact int32 dot product of int8 row r (+ its correction) with group g of a tile's 64 rows, into dot[64].
void group_dot_scalar(const TileArgs& a, const uint8_t* w, int64_t r, int64_t g, int32_t* dot) {
  for (int64_t i = 0; i < kTileRows; ++i) dot[i] = a.xcorr[r * a.groups + g];
  const uint8_t* wg_bytes = a.lay.group(w, g);
  const int8_t* xq = a.xq + r * a.kp;
  for (int64_t b = 0; b < kBlocks; ++b) {
    for (int64_t s = 0; s < kSteps; ++s) {
      const uint8_t* v = wg_bytes + b * kBlockBytes + s * 64;
      const int8_t* xs = xq + g * kGroup + s * 4;
      for (int64_t lane = 0; lane < kBlockRows; ++lane) {
        int32_t sum = 0;
        for (int64_t j = 0; j < 4; ++j) sum += static_cast<int32_t>(v[lane * 4 + j]) * xs[j];
        dot[b * kBlockRows + lane] += sum;
      }
    }
  }
}

// The scalar path: the reference arithmetic, also used where the CPU has no AVX2.
void tile_scalar(const TileArgs& a, int64_t rows, int64_t tile) {
  const uint8_t* w = a.lay.tile(a.packed, tile);
  const int64_t per_output = a.pairs ? 2 : 1;  // int8 rows per output row
  for (int64_t r = 0; r < rows; r += per_output) {
    float acc[kTileRows] = {};
    for (int64_t wg = 0; wg < a.lay.wgroups; ++wg) {
      float inner[kTileRows] = {};
      for (int64_t g = wg * a.lay.span; g < std::min(a.groups, (wg + 1) * a.lay.span); ++g) {
        int32_t dot[kTileRows];
        group_dot_scalar(a, w, r, g, dot);
        if (a.pairs) {
          int32_t low[kTileRows];
          group_dot_scalar(a, w, r + 1, g, low);
          for (int64_t i = 0; i < kTileRows; ++i) dot[i] = dot[i] * 256 + low[i];
        }
        const float scale = a.xscale[(r + per_output - 1) * a.groups + g];
        for (int64_t i = 0; i < kTileRows; ++i) inner[i] = std::fma(static_cast<float>(dot[i]), scale, inner[i]);
      }
      const uint16_t* scales = a.lay.scales(w, wg);
      for (int64_t i = 0; i < kTileRows; ++i) acc[i] = std::fma(inner[i], bf16_to_float(scales[i]), acc[i]);
    }
    const int64_t n0 = tile * kTileRows;
    const int64_t count = std::min(kTileRows, a.n - n0);
    std::memcpy(a.y + (r / per_output) * a.n + n0, acc, static_cast<size_t>(count) * sizeof(float));
  }
}

// The running sums of a pass's rows over one tile, kept in memory between the chunks of activation groups it takes
// at a time (see i8s_gemv): per row, acc[64] (the finished weight groups, scaled) then inner[64] (the activation
// groups of the open weight group). acc starts at zero; inner is only read after its weight group's first group.
constexpr int64_t kSumFloats = 2 * kTileRows;  // per activation row
// Activation groups per chunk when a call needs more than one pass of rows over each tile (vnni512): every pass
// takes the chunk (16 KB of the tile) before any takes the next, so the first pass reads it from memory and the others
// from L1, and the weights stream at one pace. Before, each pass went over the whole tile (256-704 KB), and memory
// idled while the later passes ran from L2. Measured on an AMD EPYC Zen 4 (2 threads, 4 rows with precise
// activations, i.e. 2 passes of 4 int8 rows; benchmarks/gemv_builds.py, weights streamed from memory, 2026-12-02):
// 1.11-1.21x on the three 7B decode shapes in 4 of 5 alternating runs, 1 row unchanged (0.98-1.05x).
#ifndef INT8SERVE_CHUNK_GROUPS
#define INT8SERVE_CHUNK_GROUPS 8
#endif
constexpr int64_t kChunkGroups = INT8SERVE_CHUNK_GROUPS;

// vnni512: R int8 activation rows (1..4; with pairs 2, 4, 6 or 8) over activation groups [g0, g1) of one tile,
// reading its bytes strictly in memory order: group by group, block by block, 64 bytes at a time. (Interleaving the 4
// blocks of a group, to load each activation broadcast once for all of them, halved the speed from memory at M = 1:
// the hardware prefetcher wants one sequential stream.) `sums`: the pass's running sums (kSumFloats per row); the
// outputs are written at g1 == groups.
// A precise row's two int8 dot products as one (TileArgs): 256 * hi + lo, exact in int32.
INT8SERVE_VNNI512 inline __m512i pair_dot(__m512i hi, __m512i lo) {
  return _mm512_add_epi32(_mm512_slli_epi32(hi, 8), lo);
}

// With pairs (P), the R int8 rows are R / 2 output rows, and `sums` holds kSumFloats per output row.
template <int R, bool P>
INT8SERVE_VNNI512 void tile_vnni512(const TileArgs& a, int64_t tile, int64_t g0, int64_t g1, float* sums) {
  constexpr int kPer = P ? 2 : 1;  // int8 rows per output row
  const uint8_t* w = a.lay.tile(a.packed, tile);
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t g = g0; g < g1; ++g) {
    const bool opens = g % a.lay.span == 0;                                  // the first group of its weight group
    const bool closes = (g + 1) % a.lay.span == 0 || g + 1 == a.groups;  // its last
    const uint8_t* wgb = a.lay.group(w, g);
    for (int b = 0; b < kBlocks; ++b) {
      __m512i dot[R];
      for (int r = 0; r < R; ++r) dot[r] = _mm512_set1_epi32(a.xcorr[r * a.groups + g]);
      for (int s = 0; s < kSteps; ++s) {
        const uint8_t* p = wgb + b * kBlockBytes + s * 64;
        if (kPrefetchBytes512 > 0) _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBytes512), _MM_HINT_T0);
        if (kPrefetchFarBytes512 > 0 && a.far_hint)
          _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchFarBytes512), _MM_HINT_T0);
        if (kPrefetchL2Bytes512 > 0 && a.l2_hint)
          _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchL2Bytes512), _MM_HINT_T1);
        const __m512i v = _mm512_load_si512(static_cast<const void*>(p));
        for (int r = 0; r < R; ++r) {
          int32_t x4;
          std::memcpy(&x4, a.xq + r * a.kp + g * kGroup + s * 4, 4);
          dot[r] = _mm512_dpbusd_epi32(dot[r], v, _mm512_set1_epi32(x4));
        }
      }
      __m512 scale = zero;
      if (closes) {
        const uint16_t* group_scales = a.lay.scales(w, g / a.lay.span) + b * kBlockRows;
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(group_scales));
        scale = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
      }
      for (int o = 0; o < R / kPer; ++o) {
        const int r = o * kPer;
        float* acc = sums + o * kSumFloats + b * kBlockRows;
        float* inner = acc + kTileRows;
        const __m512i d = P ? pair_dot(dot[r], dot[r + kPer - 1]) : dot[r];
        const __m512 xscale = _mm512_set1_ps(a.xscale[(r + kPer - 1) * a.groups + g]);
        const __m512 in = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), xscale, opens ? zero : _mm512_loadu_ps(inner));
        if (closes)
          _mm512_storeu_ps(acc, _mm512_fmadd_ps(in, scale, _mm512_loadu_ps(acc)));
        else
          _mm512_storeu_ps(inner, in);
      }
    }
  }
  if (g1 < a.groups) return;
  const int64_t n0 = tile * kTileRows;
  for (int b = 0; b < kBlocks; ++b) {
    const int64_t nb = n0 + b * kBlockRows;
    if (nb >= a.n) break;
    const int64_t count = std::min(kBlockRows, a.n - nb);
    const __mmask16 mask = count == kBlockRows ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
    for (int o = 0; o < R / kPer; ++o)
      _mm512_mask_storeu_ps(a.y + o * a.n + nb, mask, _mm512_loadu_ps(sums + o * kSumFloats + b * kBlockRows));
  }
}

// The 256-bit paths: each 64-byte load is two registers of 8 rows (half h = rows 8h..8h+7 of the block).
// Dot is the exact int32 product of 4 k of 8 rows with the broadcast activations `x4`, added to `dot`.
struct DotAvx2 {
  static constexpr bool kCorrected = false;  // |w| x sign(w)*x: no +128 excess to remove
  INT8SERVE_AVX2 static inline __m256i dot(__m256i acc, __m256i v, __m256i x4) {
    const __m256i w = _mm256_xor_si256(v, _mm256_set1_epi8(static_cast<char>(0x80)));  // back to signed w
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x4, w));  // exact: <= 32258
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
  }
};

struct DotAvxVnni {
  static constexpr bool kCorrected = true;  // unsigned w + 128: start at -128 * sum(xq)
  INT8SERVE_AVXVNNI static inline __m256i dot(__m256i acc, __m256i v, __m256i x4) {
    return _mm256_dpbusd_avx_epi32(acc, v, x4);
  }
};

// R int8 rows (with pairs P: R / 2 output rows, see TileArgs) over one tile.
#define INT8SERVE_TILE256(NAME, DOT, TARGET)                                                                      \
  template <int R, bool P>                                                                                         \
  TARGET void NAME(const TileArgs& a, int64_t tile) {                                                              \
    constexpr int kPer = P ? 2 : 1, kOut = R / kPer;                                                               \
    const uint8_t* w = a.lay.tile(a.packed, tile);                                                                 \
    __m256 acc[kOut][2 * kBlocks];                                                                                 \
    for (int o = 0; o < kOut; ++o)                                                                                 \
      for (int h = 0; h < 2 * kBlocks; ++h) acc[o][h] = _mm256_setzero_ps();                                       \
    for (int64_t wg = 0; wg < a.lay.wgroups; ++wg) {                                                               \
      __m256 inner[kOut][2 * kBlocks];                                                                             \
      for (int o = 0; o < kOut; ++o)                                                                               \
        for (int h = 0; h < 2 * kBlocks; ++h) inner[o][h] = _mm256_setzero_ps();                                   \
      for (int64_t g = wg * a.lay.span; g < std::min(a.groups, (wg + 1) * a.lay.span); ++g) {                      \
        const uint8_t* wgb = a.lay.group(w, g);                                                                    \
        for (int b = 0; b < kBlocks; ++b) {                                                                        \
          __m256i dot[R][2];                                                                                       \
          for (int r = 0; r < R; ++r)                                                                              \
            dot[r][0] = dot[r][1] = _mm256_set1_epi32(DOT::kCorrected ? a.xcorr[r * a.groups + g] : 0);            \
          for (int s = 0; s < kSteps; ++s) {                                                                       \
            const uint8_t* p = wgb + b * kBlockBytes + s * 64;                                                     \
            const __m256i v0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(p));                             \
            const __m256i v1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(p + 32));                        \
            if (kPrefetchBytes > 0) _mm_prefetch(reinterpret_cast<const char*>(p + kPrefetchBytes), _MM_HINT_T0);  \
            for (int r = 0; r < R; ++r) {                                                                          \
              int32_t x4;                                                                                          \
              std::memcpy(&x4, a.xq + r * a.kp + g * kGroup + s * 4, 4);                                           \
              const __m256i xb = _mm256_set1_epi32(x4);                                                            \
              dot[r][0] = DOT::dot(dot[r][0], v0, xb);                                                             \
              dot[r][1] = DOT::dot(dot[r][1], v1, xb);                                                             \
            }                                                                                                      \
          }                                                                                                        \
          for (int o = 0; o < kOut; ++o) {                                                                         \
            const int r = o * kPer;                                                                                \
            const __m256 xscale = _mm256_set1_ps(a.xscale[(r + kPer - 1) * a.groups + g]);                          \
            for (int h = 0; h < 2; ++h) {                                                                          \
              const __m256i d = P ? _mm256_add_epi32(_mm256_slli_epi32(dot[r][h], 8), dot[r + kPer - 1][h])        \
                                  : dot[r][h];                                                                     \
              inner[o][2 * b + h] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(d), xscale, inner[o][2 * b + h]);           \
            }                                                                                                      \
          }                                                                                                        \
        }                                                                                                          \
      }                                                                                                            \
      for (int h = 0; h < 2 * kBlocks; ++h) {                                                                      \
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(a.lay.scales(w, wg) + 8 * h));       \
        const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));               \
        for (int o = 0; o < kOut; ++o) acc[o][h] = _mm256_fmadd_ps(inner[o][h], scale, acc[o][h]);                 \
      }                                                                                                            \
    }                                                                                                              \
    const int64_t n0 = tile * kTileRows;                                                                           \
    const int64_t count = std::min(kTileRows, a.n - n0);                                                           \
    for (int o = 0; o < kOut; ++o) {                                                                               \
      alignas(32) float out[kTileRows];                                                                            \
      for (int h = 0; h < 2 * kBlocks; ++h) _mm256_store_ps(out + 8 * h, acc[o][h]);                               \
      std::memcpy(a.y + o * a.n + n0, out, static_cast<size_t>(count) * sizeof(float));                            \
    }                                                                                                              \
  }

INT8SERVE_TILE256(tile_avx2, DotAvx2, INT8SERVE_AVX2)
INT8SERVE_TILE256(tile_avxvnni, DotAvxVnni, INT8SERVE_AVXVNNI)

// `rows` int8 rows of a pass (with pairs an even count: 2 or 4) -> the kernel's instance.
#define INT8SERVE_ROWS(NAME, KERNEL, TARGET)                        \
  TARGET void NAME(const TileArgs& a, int64_t rows, int64_t tile) { \
    if (a.pairs) {                                                  \
      if (rows == 2)                                                \
        KERNEL<2, true>(a, tile);                                   \
      else                                                          \
        KERNEL<4, true>(a, tile);                                   \
      return;                                                       \
    }                                                               \
    switch (rows) {                                                 \
      case 1: KERNEL<1, false>(a, tile); break;                     \
      case 2: KERNEL<2, false>(a, tile); break;                     \
      case 3: KERNEL<3, false>(a, tile); break;                     \
      default: KERNEL<4, false>(a, tile); break;                    \
    }                                                               \
  }

#define INT8SERVE_CHUNK_ROWS(NAME, KERNEL, TARGET)                                                       \
  TARGET void NAME(const TileArgs& a, int64_t rows, int64_t tile, int64_t g0, int64_t g1, float* sums) { \
    if (a.pairs) {                                                                                       \
      switch (rows) {                                                                                    \
        case 2: KERNEL<2, true>(a, tile, g0, g1, sums); break;                                           \
        case 4: KERNEL<4, true>(a, tile, g0, g1, sums); break;                                           \
        case 6: KERNEL<6, true>(a, tile, g0, g1, sums); break;                                           \
        default: KERNEL<8, true>(a, tile, g0, g1, sums); break;                                          \
      }                                                                                                  \
      return;                                                                                            \
    }                                                                                                    \
    switch (rows) {                                                                                      \
      case 1: KERNEL<1, false>(a, tile, g0, g1, sums); break;                                            \
      case 2: KERNEL<2, false>(a, tile, g0, g1, sums); break;                                            \
      case 3: KERNEL<3, false>(a, tile, g0, g1, sums); break;                                            \
      default: KERNEL<4, false>(a, tile, g0, g1, sums); break;                                           \
    }                                                                                                    \
  }

INT8SERVE_CHUNK_ROWS(rows_vnni512, tile_vnni512, INT8SERVE_VNNI512)
INT8SERVE_ROWS(rows_avxvnni, tile_avxvnni, INT8SERVE_AVXVNNI)
INT8SERVE_ROWS(rows_avx2, tile_avx2, INT8SERVE_AVX2)

// avx2 (and avxvnni) with precise activations: each row as one 16-bit integer (Activations::wide, 256 * q_hi + q_lo)
// times the weights widened to 16 bits, with vpmaddwd (avxvnni: vpdpwssd where 4 rows are in assembly): per 32 weights
// and row, 2 multiplies and 2 adds, where the two int8 passes took 8 instructions (vpsignb, vpmaddubsw, vpmaddwd and an
// add, twice), and AVX2 has no int8 dot product. The weights are widened as stored (w + 128, zero-extended: no
// subtraction in the loop), and each output's group sum then gets the row's correction, -128 * (its 32 inputs' sum) =
// 256 * corr_hi + corr_lo (quantize's corrections of the row's two int8 rows). The integers are the same (256 * dot_hi
// + dot_lo, exactly: every partial sum stays below 2^28), so the result is every path's bits. O output rows (1..4), 8
// output rows (half a block) at a time: 2 registers of widened weights and 2 of sums per row.

#ifndef INT8SERVE_WIDE_DECODE_ASM
#define INT8SERVE_WIDE_DECODE_ASM 1
#endif

// The sums of one group and half block (8 outputs) for O rows, 8 steps of 4 inputs: low[o] holds outputs 0-3 of the
// half, high[o] outputs 4-7, as int32 lanes (output, input pair) of (w + 128) * x. ahead (or null): each step's line
// kPrefetchBytes ahead, asked for at that step.
template <bool kDot>
INT8SERVE_AVX2 inline void half_sums_4(const uint8_t* half, const int16_t* x, int64_t kp, const uint8_t* ahead,
                                       __m256i* low, __m256i* high);

// kDot (the avxvnni path): 4 rows take vpdpwssd in the assembly below, the same sums; fewer rows these intrinsics.
template <int O, bool kDot>
INT8SERVE_AVX2 inline void half_sums(const uint8_t* half, const int16_t* x, int64_t kp, const uint8_t* ahead,
                                     __m256i* low, __m256i* high) {
  if constexpr (O == 4 && INT8SERVE_WIDE_DECODE_ASM) {
    half_sums_4<kDot>(half, x, kp, ahead, low, high);
    return;
  }
  for (int o = 0; o < O; ++o) low[o] = high[o] = _mm256_setzero_si256();
  for (int s = 0; s < kSteps; ++s) {
    if (ahead) _mm_prefetch(reinterpret_cast<const char*>(ahead + s * 64), _MM_HINT_T0);
    const __m128i* p = reinterpret_cast<const __m128i*>(half + s * 64);
    const __m256i w0 = _mm256_cvtepu8_epi16(_mm_load_si128(p)), w1 = _mm256_cvtepu8_epi16(_mm_load_si128(p + 1));
    for (int o = 0; o < O; ++o) {
      int64_t x4;  // inputs 4s..4s+3 of row o, 16 bits each
      std::memcpy(&x4, x + o * kp + s * 4, 8);
      const __m256i xb = _mm256_set1_epi64x(x4);
      low[o] = _mm256_add_epi32(low[o], _mm256_madd_epi16(w0, xb));
      high[o] = _mm256_add_epi32(high[o], _mm256_madd_epi16(w1, xb));
    }
  }
}

struct HalfSteps { uint8_t bytes[kSteps * 64]; };  // the 64-byte steps a half block's sums read (half of each)
struct GroupInputs { int16_t x[kGroup]; };         // a group of one row's 16-bit inputs

// 4 rows (4 sequences decoding): the same sums in inline assembly. With intrinsics GCC kept one sum in memory (a
// store and a reload every step, a chain through the store buffer) and copied the others between registers each
// step; here the 8 sums, 2 registers of weights, 2 of activations and 2 of products are 14 ymm registers.
// INT8SERVE_WIDE_DECODE_ASM=0 builds the intrinsics instead (benchmarks/gemv_builds.py compares the two).
#define INT8SERVE_HALF_ROW(X, XR, L, H)                    \
  "vpbroadcastq \\step*8(%[" X "]), %%ymm" XR "\n\t"       \
  "vpmaddwd %%ymm8, %%ymm" XR ", %%ymm14\n\t"              \
  "vpaddd %%ymm14, %[" L "], %[" L "]\n\t"                 \
  "vpmaddwd %%ymm9, %%ymm" XR ", %%ymm15\n\t"              \
  "vpaddd %%ymm15, %[" H "], %[" H "]\n\t"
#define INT8SERVE_HALF_ROW_DOT(X, XR, L, H)                \
  "vpbroadcastq \\step*8(%[" X "]), %%ymm" XR "\n\t"       \
  "%{vex%} vpdpwssd %%ymm8, %%ymm" XR ", %[" L "]\n\t"       \
  "%{vex%} vpdpwssd %%ymm9, %%ymm" XR ", %[" H "]\n\t"

template <bool kDot>
INT8SERVE_AVX2 inline void half_sums_4(const uint8_t* half, const int16_t* x, int64_t kp, const uint8_t* ahead,
                                       __m256i* low, __m256i* high) {
  if (ahead)  // (compute-bound: the 8 lines at once, before the arithmetic)
    for (int s = 0; s < kSteps; ++s) _mm_prefetch(reinterpret_cast<const char*>(ahead + s * 64), _MM_HINT_T0);
  const int16_t *x0 = x, *x1 = x + kp, *x2 = x + 2 * kp, *x3 = x + 3 * kp;
  __m256i l0, l1, l2, l3, h0, h1, h2, h3;
#define INT8SERVE_HALF_SUMS_ASM(ROW) \
  asm("vpxor %[l0], %[l0], %[l0]\n\t"                                                                    \
      "vpxor %[l1], %[l1], %[l1]\n\t"                                                                    \
      "vpxor %[l2], %[l2], %[l2]\n\t"                                                                    \
      "vpxor %[l3], %[l3], %[l3]\n\t"                                                                    \
      "vpxor %[h0], %[h0], %[h0]\n\t"                                                                    \
      "vpxor %[h1], %[h1], %[h1]\n\t"                                                                    \
      "vpxor %[h2], %[h2], %[h2]\n\t"                                                                    \
      "vpxor %[h3], %[h3], %[h3]\n\t"                                                                    \
      ".irp step,0,1,2,3,4,5,6,7\n\t"                                                                    \
      "vpmovzxbw \\step*64(%[w]), %%ymm8\n\t"                                                            \
      "vpmovzxbw \\step*64+16(%[w]), %%ymm9\n\t"                                                         \
      ROW("x0", "12", "l0", "h0")                                                                        \
      ROW("x1", "13", "l1", "h1")                                                                        \
      ROW("x2", "12", "l2", "h2")                                                                        \
      ROW("x3", "13", "l3", "h3")                                                                        \
      ".endr"                                                                                            \
      : [l0] "=&x"(l0), [l1] "=&x"(l1), [l2] "=&x"(l2), [l3] "=&x"(l3), [h0] "=&x"(h0), [h1] "=&x"(h1),  \
        [h2] "=&x"(h2), [h3] "=&x"(h3)                                                                   \
      : [w] "r"(half), [x0] "r"(x0), [x1] "r"(x1), [x2] "r"(x2), [x3] "r"(x3),                           \
        "m"(*reinterpret_cast<const HalfSteps*>(half)), "m"(*reinterpret_cast<const GroupInputs*>(x0)),  \
        "m"(*reinterpret_cast<const GroupInputs*>(x1)), "m"(*reinterpret_cast<const GroupInputs*>(x2)),  \
        "m"(*reinterpret_cast<const GroupInputs*>(x3))                                                   \
      : "xmm8", "xmm9", "xmm12", "xmm13", "xmm14", "xmm15")
  if constexpr (kDot)
    INT8SERVE_HALF_SUMS_ASM(INT8SERVE_HALF_ROW_DOT);
  else
    INT8SERVE_HALF_SUMS_ASM(INT8SERVE_HALF_ROW);
#undef INT8SERVE_HALF_SUMS_ASM
  low[0] = l0, low[1] = l1, low[2] = l2, low[3] = l3;
  high[0] = h0, high[1] = h1, high[2] = h2, high[3] = h3;
}
#undef INT8SERVE_HALF_ROW
#undef INT8SERVE_HALF_ROW_DOT

// kEachGroup: every group is a weight group of its own (the default scheme, a weight scale per 32 inputs), so each
// half block's sums go straight into acc, with no running sum per weight group to store and read back.
// inner and acc hold each 8 outputs in hadd's order (0, 1, 4, 5, 2, 3, 6, 7), the weight scales are read in that order
// (half_scales), and the tile's end puts acc back in order: one permute per 8 outputs and row a tile, not a group.
INT8SERVE_AVX2 inline __m256 half_scales(const uint16_t* scales) {
  const __m128i raw = _mm_shuffle_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(scales)), 0xD8);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
}

template <int O, bool kEachGroup, bool kDot>
INT8SERVE_AVX2 void tile_avx2_wide(const TileArgs& a, int64_t tile) {
  const uint8_t* w = a.lay.tile(a.packed, tile);
  alignas(32) float acc[O][kTileRows] = {};
  alignas(32) float inner[O][kTileRows];
  for (int64_t wg = 0; wg < a.lay.wgroups; ++wg) {
    const int64_t g0 = wg * a.lay.span, g1 = std::min(a.groups, (wg + 1) * a.lay.span);
    const uint16_t* wscales = a.lay.scales(w, wg);
    for (int64_t g = g0; g < g1; ++g) {
      const uint8_t* wgb = a.lay.group(w, g);
      __m256i corr[O];  // -128 * the sum of row o's 16-bit inputs of group g
      __m256 xscale[O];
      for (int o = 0; o < O; ++o) {
        corr[o] = _mm256_set1_epi32(256 * a.xcorr[2 * o * a.groups + g] + a.xcorr[(2 * o + 1) * a.groups + g]);
        xscale[o] = _mm256_set1_ps(a.xscale[(2 * o + 1) * a.groups + g]);
      }
      for (int b = 0; b < kBlocks; ++b) {
        for (int h = 0; h < 2; ++h) {
          __m256i low[O], high[O];
          const uint8_t* ahead = kPrefetchBytes > 0 && h == 0 ? wgb + b * kBlockBytes + kPrefetchBytes : nullptr;
          half_sums<O, kDot>(wgb + b * kBlockBytes + 32 * h, a.xwide + g * kGroup, a.kp, ahead, low, high);
          const int64_t column = b * kBlockRows + 8 * h;
          const __m256 wscale = kEachGroup ? half_scales(wscales + column) : _mm256_setzero_ps();
          for (int o = 0; o < O; ++o) {
            // lane pairs -> outputs: hadd gives outputs 0, 1, 4, 5 | 2, 3, 6, 7, the order inner and acc keep
            const __m256i dot = _mm256_add_epi32(_mm256_hadd_epi32(low[o], high[o]), corr[o]);
            float* in = inner[o] + column;
            const __m256 before = kEachGroup || g == g0 ? _mm256_setzero_ps() : _mm256_load_ps(in);
            const __m256 total = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), xscale[o], before);
            if (kEachGroup)
              _mm256_store_ps(acc[o] + column, _mm256_fmadd_ps(total, wscale, _mm256_load_ps(acc[o] + column)));
            else
              _mm256_store_ps(in, total);
          }
        }
      }
    }
    if (kEachGroup) continue;
    for (int h = 0; h < 2 * kBlocks; ++h) {
      const __m256 scale = half_scales(wscales + 8 * h);
      for (int o = 0; o < O; ++o)
        _mm256_store_ps(acc[o] + 8 * h,
                        _mm256_fmadd_ps(_mm256_load_ps(inner[o] + 8 * h), scale, _mm256_load_ps(acc[o] + 8 * h)));
    }
  }
  const int64_t n0 = tile * kTileRows;
  const int64_t count = std::min(kTileRows, a.n - n0);
  for (int o = 0; o < O; ++o) {
    for (int h = 0; h < 2 * kBlocks; ++h)  // back in order
      _mm256_store_pd(reinterpret_cast<double*>(acc[o] + 8 * h),
                      _mm256_permute4x64_pd(_mm256_load_pd(reinterpret_cast<const double*>(acc[o] + 8 * h)), 0xD8));
    std::memcpy(a.y + o * a.n + n0, acc[o], static_cast<size_t>(count) * sizeof(float));
  }
}

template <bool kEachGroup, bool kDot>
INT8SERVE_AVX2 void rows_wide_of(const TileArgs& a, int64_t rows, int64_t tile) {
  switch (rows / 2) {
    case 1: tile_avx2_wide<1, kEachGroup, kDot>(a, tile); break;
    case 2: tile_avx2_wide<2, kEachGroup, kDot>(a, tile); break;
    case 3: tile_avx2_wide<3, kEachGroup, kDot>(a, tile); break;
    default: tile_avx2_wide<4, kEachGroup, kDot>(a, tile); break;
  }
}

// `rows` int8 rows of a pass (2..8: pairs, i.e. 1..4 output rows) -> tile_avx2_wide's instance; kDot: the avxvnni
// path's (vpdpwssd where 4 rows are multiplied in assembly), else the avx2 path's.
template <bool kDot>
INT8SERVE_AVX2 void rows_wide(const TileArgs& a, int64_t rows, int64_t tile) {
  if (a.lay.span == 1)
    rows_wide_of<true, kDot>(a, rows, tile);
  else
    rows_wide_of<false, kDot>(a, rows, tile);
}

// ---- avx2 and avxvnni with precise activations, many rows: a register-blocked GEMM ----
//
// A prefill chunk is compute-bound, and tile_avx2_wide, made for decode, spends more instructions around its
// vpmaddwd than in them: it widens each step again for every pass of 4 rows, and its int32 lanes are (output, input
// pair), so each group ends with a horizontal add and a permute per 8 outputs. Here each thread widens a K-block of
// a tile once (kWideGemmGroups groups, 16 KB of int16, kept in L1) into an order where each int32 lane is one output:
// per input pair, one register holds the pair's two inputs of 8 outputs, and vpmaddwd with the row's pair broadcast
// to every lane adds into one sum per output. Every row of the call is multiplied with the K-block, kWideGemmRows
// rows x kWideColumns outputs at a time. Each output's arithmetic is tile_avx2_wide's, in its order (exact int32
// group dots, then inner = fma(float(dot), xscale, inner), and acc = fma(inner, wscale, acc) at each weight group's
// end), so every output has the same bits as every other path's, whatever the number of rows.
//
// The register block is 3 rows x 32 outputs (group_sums_3x32; 6 x 16 where wide6_blocks says, group_into_acc_6x16): 12
// sum registers, and per input pair 2 registers of weights (outputs 0-15), 1 of the broadcast pair and 1 of products;
// outputs 16-31's weights are vpmaddwd's memory operands. Per pair: 2 weight loads and 3 broadcasts for 12 vpmaddwd
// (each with its vpaddd), 29 instructions. An AMD EPYC Zen 3 issues vpmaddwd 2 a cycle alone and 1.7 a cycle beside as
// many vpaddd (a loop of the two and nothing else), loads 2 a cycle, and its vector side takes about 4 instructions a
// cycle, loads and broadcasts included, so the instructions around the products count: the 4 rows x 16 outputs block
// before (per step of 4 inputs, 4 weight loads and 8 broadcasts for 16 vpmaddwd: 2.75 instructions a product, against
// 2.42 here) ran its loop at 4.5 G vpmaddwd/s on one thread, this one at 4.8 (a microbenchmark of the two loops over
// L1-resident data, 2026-12-03; 6.4 G/s alone); with every weight as a memory operand (fewer instructions, but 15 loads
// per 12 products), 4.6. After each group, the float arithmetic (per row and 8 outputs: a conversion, an fma with the
// row's scale and one with the weight scale on the running sum in memory) is in the same assembly for the default
// scheme (group_into_acc_3x32): from intrinsics GCC kept a second copy of each running sum on the stack and took a
// quarter of a call there; now ~16%. With both, and the rows taken in passes of at most kWideGemmChunkRows, the whole
// call runs at ~60% of the vpmaddwd peak on this Zen 3 (one or two threads, 128 or 512 rows, the 7B shapes), against
// 49-54% before (benchmarks/gemv_builds.py against f183341, 2 threads, 16 / 128 / 512 rows: 1.09-1.12x / 1.09-1.20x /
// 1.15-1.26x). Against what such a GEMM can reach at all, vpmaddwd + vpaddd in a loop of nothing else
// (benchmarks/cpu_peak.py, 2026-12-05, the same CPU model): 74-77%. The sums alone run at that loop's rate; the float
// arithmetic after each group, which every path's bits require, costs most of the rest (a build without it ran 1.16x
// faster; a 3 x 16 block with its running sums in registers, inputs broadcast ahead in memory, and each group's float
// arithmetic run from memory after the next group's sums were not faster: docs/benchmarks.md).
constexpr int kWideGemmRows = 3;     // activation rows a register block (group_sums_3x32)
constexpr int kWideGemmVectors = 4;  // 8 outputs each: the register block's outputs (group_sums_3x32's: 4)
constexpr int64_t kWideColumns = 8 * kWideGemmVectors;          // outputs a register block
// Groups a K-block: 64 outputs x 128 inputs x 2 bytes = 16 KB, in L1 (8 and 16 groups, from L2, measured alike:
// within 6%, one thread, the shape above).
#ifndef INT8SERVE_WIDE_GEMM_GROUPS
#define INT8SERVE_WIDE_GEMM_GROUPS 4
#endif
constexpr int64_t kWideGemmGroups = INT8SERVE_WIDE_GEMM_GROUPS;
// While a K-block multiplies, the next one is asked for into L2 (next_kblock), as the other GEMMs do: widening
// loads a K-block's weights all at once. On a Zen 4 held to the avx2 path (2026-12-05, 2 threads, the 7B shapes,
// benchmarks/gemv_builds.py -DINT8SERVE_WIDE_GEMM_HINT=0 against it): without it 16 rows 0.82-0.89x, 32 rows
// 0.89-0.96x, 128 and 512 rows 0.93-0.98x (6 rounds).
#ifndef INT8SERVE_WIDE_GEMM_HINT
#define INT8SERVE_WIDE_GEMM_HINT 1
#endif
constexpr int64_t kWidePairWords = 2 * 8 * kWideGemmVectors;  // int16: one input pair of a register block's outputs
constexpr int64_t kWideStepWords = 2 * kWidePairWords;        // int16: a step (4 inputs, 2 pairs) of them
constexpr int64_t kWideBytes = kTileRows * kWideGemmGroups * kGroup * 2;
constexpr int64_t kWideScaleBytes = kTileRows * kWideGemmGroups * 4;  // the K-block's weight scales in fp32
static_assert(kTileRows % kWideColumns == 0, "a tile holds whole register blocks of outputs");

// The widened K-block of a tile: [column block][group - g0][step][pair][vector][8 outputs x 2 inputs] int16, w (not
// w + 128): pair 0 holds inputs 4s, 4s + 1 of each output, pair 1 inputs 4s + 2, 4s + 3. With a weight group per
// group (the default scheme), also the groups' weight scales in fp32, [column block][group - g0][32 outputs], for
// group_into_acc_3x32: converted here once per K-block instead of once per register block of rows (8 of its ~45
// float instructions a group; on the Zen 3, 128 rows, 2 threads: 1.00-1.02x, within the machine's noise).
INT8SERVE_AVX2 void widen_scales(const packed::Layout& lay, const uint8_t* tile, int64_t g0, int64_t g1, float* out) {
  const int64_t ng = g1 - g0;
  for (int64_t g = g0; g < g1; ++g) {
    const uint16_t* scales = lay.scales(tile, g);
    for (int64_t column = 0; column < kTileRows; column += 8) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + column));
      float* o = out + (column / kWideColumns * ng + (g - g0)) * kWideColumns + column % kWideColumns;
      _mm256_store_ps(o, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16)));
    }
  }
}

INT8SERVE_AVX2 void widen_tile(const packed::Layout& lay, const uint8_t* tile, int64_t g0, int64_t g1, int16_t* out) {
  const __m256i bias = _mm256_set1_epi16(128);
  const int64_t ng = g1 - g0;
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* group = lay.group(tile, g);
    for (int b = 0; b < kBlocks; ++b)
      for (int s = 0; s < kSteps; ++s)
        for (int h = 0; h < 2; ++h) {  // outputs 16b + 8h .. 16b + 8h + 7
          const __m128i* half = reinterpret_cast<const __m128i*>(group + b * kBlockBytes + s * 64 + 32 * h);
          // int32 lanes (output o, pair p): outputs 0-3 of the half, then 4-7
          const __m256 low = _mm256_castsi256_ps(_mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_load_si128(half)), bias));
          const __m256 high =
              _mm256_castsi256_ps(_mm256_sub_epi16(_mm256_cvtepu8_epi16(_mm_load_si128(half + 1)), bias));
          // pair 0 / pair 1 of outputs 0, 1, 4, 5 | 2, 3, 6, 7; the permute puts the outputs in order
          const __m256i pair0 = _mm256_permute4x64_epi64(_mm256_castps_si256(_mm256_shuffle_ps(low, high, 0x88)), 0xD8);
          const __m256i pair1 = _mm256_permute4x64_epi64(_mm256_castps_si256(_mm256_shuffle_ps(low, high, 0xDD)), 0xD8);
          const int64_t column = 16 * b + 8 * h;
          int16_t* o = out + ((column / kWideColumns * ng + (g - g0)) * kSteps + s) * kWideStepWords +
                       (column % kWideColumns) / 8 * 16;
          _mm256_store_si256(reinterpret_cast<__m256i*>(o), pair0);
          _mm256_store_si256(reinterpret_cast<__m256i*>(o + kWidePairWords), pair1);
        }
  }
}

// What a register block works on: the call's rows, the tile's K-block and the running sums of its 64 outputs.
struct WideBlock {
  packed::Layout lay;
  const uint8_t* tile;   // the packed tile (for its weight scales)
  const int16_t* wide;   // widen_tile's K-block
  const float* wscale;   // widen_scales' fp32 weight scales of the K-block (the default scheme only)
  const int16_t* x;      // the block's first row (Activations::wide), kp int16 a row
  const float* xscale;   // that row's scales (an odd int8 row's: d / 256), `groups` a row, 2 rows apart
  int64_t kp, groups, g0, g1;
  int64_t wg[kWideGemmGroups];  // the weight group of each group g0..g1 - 1
  float* inner;          // [rows][64]: the running sum of the current weight group (per row of the call)
  float* acc;            // [rows][64]: the finished weight groups' sum
};

// The register block's assembly, in pieces. A product added to sum S, or (the group's first pair: no zeroing of the sums before) written to it.
#define INT8SERVE_WIDE_ADD(WEIGHTS, S)                                     \
  "vpmaddwd " WEIGHTS ", %%ymm12, %%ymm13\n\t"                             \
  "vpaddd %%ymm13, %[" S "], %[" S "]\n\t"
#define INT8SERVE_WIDE_SET(WEIGHTS, S) "vpmaddwd " WEIGHTS ", %%ymm12, %[" S "]\n\t"
// AVX-VNNI: the same exact int32 sum in one instruction (VEX-encoded: the 16 ymm registers of AVX2)
#define INT8SERVE_WIDE_DOT(WEIGHTS, S) "%{vex%} vpdpwssd " WEIGHTS ", %%ymm12, %[" S "]\n\t"
// The assembly statement ASM(product op) of a function templated on kDot: vpdpwssd, or vpmaddwd + vpaddd
#define INT8SERVE_WIDE_WITH_PRODUCTS(ASM) \
  if constexpr (kDot)                     \
    ASM(INT8SERVE_WIDE_DOT);              \
  else                                    \
    ASM(INT8SERVE_WIDE_ADD)
#define INT8SERVE_WIDE_ROW(OP, X, PAIR, S0, S1, S2, S3)                    \
  "vpbroadcastd \\step*8+" PAIR "*4(%[" X "]), %%ymm12\n\t"               \
  OP("%%ymm14", S0)                                                        \
  OP("%%ymm15", S1)                                                        \
  OP("\\step*256+" PAIR "*128+64(%[w])", S2)                               \
  OP("\\step*256+" PAIR "*128+96(%[w])", S3)
#define INT8SERVE_WIDE_PAIR(OP, PAIR)                                      \
  "vmovdqa \\step*256+" PAIR "*128(%[w]), %%ymm14\n\t"                     \
  "vmovdqa \\step*256+" PAIR "*128+32(%[w]), %%ymm15\n\t"                  \
  INT8SERVE_WIDE_ROW(OP, "x0", PAIR, "s00", "s01", "s02", "s03")           \
  INT8SERVE_WIDE_ROW(OP, "x1", PAIR, "s10", "s11", "s12", "s13")           \
  INT8SERVE_WIDE_ROW(OP, "x2", PAIR, "s20", "s21", "s22", "s23")

struct GroupWeights { int16_t w[kSteps * kWideStepWords]; };  // a group of a register block's outputs, widened
struct BlockScales { float s[kWideColumns]; };                   // a register block's weight scales (fp32)
struct WideSums { float v[kWideGemmRows][kTileRows]; };          // the acc rows a register block updates
static_assert(kWideStepWords * 2 == 256, "group_sums_3x32 addresses a step as 256 bytes");
static_assert(kTileRows * sizeof(float) == 256, "group_into_acc_3x32 steps from row to row by 256 bytes");

// The sums' assembly: the 8 steps of a group, 2 pairs each; the first pair's products start the sums (zeroing them
// and adding took 24 of a group's ~540 instructions).
#define INT8SERVE_WIDE_SUMS(ADD)                                                                         \
  ".irp step,0\n\t"                                                                                      \
  INT8SERVE_WIDE_PAIR(INT8SERVE_WIDE_SET, "0")                                                           \
  INT8SERVE_WIDE_PAIR(ADD, "1")                                                                          \
  ".endr\n\t"                                                                                            \
  ".irp step,1,2,3,4,5,6,7\n\t"                                                                          \
  INT8SERVE_WIDE_PAIR(ADD, "0")                                                                          \
  INT8SERVE_WIDE_PAIR(ADD, "1")                                                                          \
  ".endr\n\t"
#define INT8SERVE_WIDE_SUM_OPERANDS                                                                      \
  [s00] "=&x"(s00), [s01] "=&x"(s01), [s02] "=&x"(s02), [s03] "=&x"(s03), [s10] "=&x"(s10),              \
  [s11] "=&x"(s11), [s12] "=&x"(s12), [s13] "=&x"(s13), [s20] "=&x"(s20), [s21] "=&x"(s21),              \
  [s22] "=&x"(s22), [s23] "=&x"(s23)
// (what the sums read, so that GCC needs no "memory" clobber, which made it reload every field of WideBlock after)
#define INT8SERVE_WIDE_SUM_INPUTS                                                                        \
  [w] "r"(w), [x0] "r"(x0), [x1] "r"(x1), [x2] "r"(x2), "m"(*reinterpret_cast<const GroupWeights*>(w)),  \
  "m"(*reinterpret_cast<const GroupInputs*>(x0)), "m"(*reinterpret_cast<const GroupInputs*>(x1)),        \
  "m"(*reinterpret_cast<const GroupInputs*>(x2))

// One group of 3 rows x 32 outputs (wide_block's register block): sum[r][v] = the int32 dot products of row r with
// outputs 8v..8v+7. Inline assembly: with intrinsics GCC kept fewer sums in registers than there are and copied
// them between registers at every step; here the 12 sums, 2 registers of weights, 1 of the broadcast pair and 1 of
// products are the 16 ymm registers. kDot (the avxvnni path): vpdpwssd instead of vpmaddwd and vpaddd, the same
// sums (the instructions are in the assembly text only, so this AVX2 function runs it on a CPU with AVX-VNNI alone).
template <bool kDot>
INT8SERVE_AVX2 inline void group_sums_3x32(const int16_t* w, const int16_t* x, int64_t kp, __m256i sum[][4]) {
  const int16_t *x0 = x, *x1 = x + kp, *x2 = x + 2 * kp;
  __m256i s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23;
#define INT8SERVE_WIDE_SUMS_ASM(ADD)        \
  asm(INT8SERVE_WIDE_SUMS(ADD)              \
      : INT8SERVE_WIDE_SUM_OPERANDS         \
      : INT8SERVE_WIDE_SUM_INPUTS           \
      : "xmm12", "xmm13", "xmm14", "xmm15")
  INT8SERVE_WIDE_WITH_PRODUCTS(INT8SERVE_WIDE_SUMS_ASM);
#undef INT8SERVE_WIDE_SUMS_ASM
  sum[0][0] = s00, sum[0][1] = s01, sum[0][2] = s02, sum[0][3] = s03;
  sum[1][0] = s10, sum[1][1] = s11, sum[1][2] = s12, sum[1][3] = s13;
  sum[2][0] = s20, sum[2][1] = s21, sum[2][2] = s22, sum[2][3] = s23;
}

// The default scheme (each group a weight group of its own): the sums of group_sums_3x32, then in the same assembly
// the float arithmetic, per row r and vector v: total = float(sum) * xscale[r] (fma(float(sum), xscale[r], 0) of the
// other paths: the same value, or -0 for +0, which no acc keeps: acc starts at +0 and fma(-0, w, +0) is +0), acc =
// fma(total, wscale[v], acc) (why in assembly: the comment at the GEMM's constants above).
// xs: row 0's scale of the group (rows `xstride` bytes apart); scales: the block's 32 fp32 weight scales
// (widen_scales); acc: the block's first row and column (rows kTileRows floats apart).
#define INT8SERVE_WIDE_INNER(XS, S0, S1, S2, S3)                    \
  "vbroadcastss " XS ", %%ymm12\n\t"                                \
  ".irp sum,%[" S0 "],%[" S1 "],%[" S2 "],%[" S3 "]\n\t"            \
  "vcvtdq2ps \\sum, \\sum\n\t"                                      \
  "vmulps %%ymm12, \\sum, \\sum\n\t"                                \
  ".endr\n\t"
#define INT8SERVE_WIDE_ACC(V, S0, S1, S2)                           \
  "vmovaps " V "*32(%[scales]), %%ymm14\n\t"                        \
  "vfmadd213ps " V "*32(%[acc]), %%ymm14, %[" S0 "]\n\t"            \
  "vmovaps %[" S0 "], " V "*32(%[acc])\n\t"                         \
  "vfmadd213ps " V "*32+256(%[acc]), %%ymm14, %[" S1 "]\n\t"        \
  "vmovaps %[" S1 "], " V "*32+256(%[acc])\n\t"                     \
  "vfmadd213ps " V "*32+512(%[acc]), %%ymm14, %[" S2 "]\n\t"        \
  "vmovaps %[" S2 "], " V "*32+512(%[acc])\n\t"

template <bool kDot>
INT8SERVE_AVX2 inline void group_into_acc_3x32(const int16_t* w, const int16_t* x, int64_t kp, const float* xs,
                                               int64_t xstride, const float* scales, float* acc) {
  const int16_t *x0 = x, *x1 = x + kp, *x2 = x + 2 * kp;
  __m256i s00, s01, s02, s03, s10, s11, s12, s13, s20, s21, s22, s23;
#define INT8SERVE_WIDE_ACC_ASM(ADD)                                                                             \
  asm(INT8SERVE_WIDE_SUMS(ADD)                                                                                  \
      INT8SERVE_WIDE_INNER("(%[xs])", "s00", "s01", "s02", "s03")                                               \
      INT8SERVE_WIDE_INNER("(%[xs],%[xstride],1)", "s10", "s11", "s12", "s13")                                  \
      INT8SERVE_WIDE_INNER("(%[xs],%[xstride],2)", "s20", "s21", "s22", "s23")                                  \
      INT8SERVE_WIDE_ACC("0", "s00", "s10", "s20")                                                              \
      INT8SERVE_WIDE_ACC("1", "s01", "s11", "s21")                                                              \
      INT8SERVE_WIDE_ACC("2", "s02", "s12", "s22")                                                              \
      INT8SERVE_WIDE_ACC("3", "s03", "s13", "s23")                                                              \
      : INT8SERVE_WIDE_SUM_OPERANDS, "+m"(*reinterpret_cast<WideSums*>(acc))                                    \
      : INT8SERVE_WIDE_SUM_INPUTS, [xs] "r"(xs), [xstride] "r"(xstride), [scales] "r"(scales), [acc] "r"(acc), \
        "m"(*reinterpret_cast<const BlockScales*>(scales)), "m"(xs[0]), "m"(xs[xstride / 4]),                  \
        "m"(xs[xstride / 2])                                                                                    \
      : "xmm12", "xmm13", "xmm14", "xmm15")
  INT8SERVE_WIDE_WITH_PRODUCTS(INT8SERVE_WIDE_ACC_ASM);
#undef INT8SERVE_WIDE_ACC_ASM
}

// The same group as 6 rows x 16 outputs (one half of a register block's 32 outputs, `half` 0 or 1): 12 sums, the half's
// 2 registers of weights, 1 of the broadcast pair and 1 of products (the avx2 path's; unused with kDot). Per input pair
// 2 weight loads and 6 broadcasts for 12 products, every product's operands in registers, where the 3 x 32 block loads
// 2 weight registers and 3 broadcasts and takes the other 6 products' weights from memory. INT8SERVE_WIDE6_DOT /
// INT8SERVE_WIDE6_ADD: whether the avxvnni / avx2 path's default scheme takes it for every 6 rows (the 3 x 32 block
// takes the last 3 and fewer); -1, the default, leaves it to wide6_blocks' rule. On a Sapphire Rapids (Golden Cove
// cores, as Intel's client CPUs with AVX-VNNI; 2026-12-05, 2 threads, benchmarks/gemv_builds.py -DINT8SERVE_WIDE6_DOT=1
// against 0, the 7B shapes, 4 rounds, the same bits) the avxvnni path's GEMM ran 1.02-1.06x faster at 18 rows,
// 1.07-1.09x at 24 and 48, 1.08-1.13x at 128 (the server's chunks), 1.08-1.10x at 512: 149 -> ~163 G multiply-adds/s,
// 57% -> ~63% of vpdpwssd's peak there. (Asking for both 3-row shares of the next K-block's hint at the start of a
// 6-row block made it 0.92-0.96x at 16-24 rows instead: one share before each half.) Held to the avx2 path the same CPU
// measured 1.02-1.10x (16-512 rows): fewer loads a product help an Intel core, whose loads the 3 x 32 block nearly
// fills (11 a pair of 12 products; a Skylake loads 2 a cycle). On AMD's Zen 2/3 the count of instructions around
// vpmaddwd decided the block's shape (the note above kWideGemmRows; 6 x 16 issues 2.67 instructions a product there, 3
// x 32 2.42), so AMD CPUs keep the 3 x 32 block until one measures the other faster. A Zen 1, whose AVX2 integer
// products all share one resource (2026-12-06, 2 threads, benchmarks/gemv_builds.py -DINT8SERVE_WIDE6_ADD=1 against the
// default, the 7B shapes, 5 rounds), ran 6 x 16 at 0.97-1.02x (16-512 rows): alike.
#ifndef INT8SERVE_WIDE6_DOT
#define INT8SERVE_WIDE6_DOT -1
#endif
#ifndef INT8SERVE_WIDE6_ADD
#define INT8SERVE_WIDE6_ADD -1
#endif
constexpr int kWide6Rows = 6;
struct WideSums6 { float v[kWide6Rows][kTileRows]; };  // the acc rows group_into_acc_6x16 updates
#define INT8SERVE_WIDE6_ROW(OP, X, PAIR, S0, S1)                           \
  "vpbroadcastd \\step*8+" PAIR "*4" X ", %%ymm12\n\t"                    \
  OP("%%ymm14", S0)                                                        \
  OP("%%ymm15", S1)
#define INT8SERVE_WIDE6_PAIR(OP, PAIR)                                     \
  "vmovdqa \\step*256+" PAIR "*128(%[w]), %%ymm14\n\t"                     \
  "vmovdqa \\step*256+" PAIR "*128+32(%[w]), %%ymm15\n\t"                  \
  INT8SERVE_WIDE6_ROW(OP, "(%[x0])", PAIR, "s00", "s01")                   \
  INT8SERVE_WIDE6_ROW(OP, "(%[x0],%[kpb],1)", PAIR, "s10", "s11")          \
  INT8SERVE_WIDE6_ROW(OP, "(%[x0],%[kpb],2)", PAIR, "s20", "s21")          \
  INT8SERVE_WIDE6_ROW(OP, "(%[x3])", PAIR, "s30", "s31")                   \
  INT8SERVE_WIDE6_ROW(OP, "(%[x3],%[kpb],1)", PAIR, "s40", "s41")          \
  INT8SERVE_WIDE6_ROW(OP, "(%[x3],%[kpb],2)", PAIR, "s50", "s51")
#define INT8SERVE_WIDE6_SUMS(ADD)                                          \
  ".irp step,0\n\t"                                                        \
  INT8SERVE_WIDE6_PAIR(INT8SERVE_WIDE_SET, "0")                            \
  INT8SERVE_WIDE6_PAIR(ADD, "1")                                           \
  ".endr\n\t"                                                              \
  ".irp step,1,2,3,4,5,6,7\n\t"                                            \
  INT8SERVE_WIDE6_PAIR(ADD, "0")                                           \
  INT8SERVE_WIDE6_PAIR(ADD, "1")                                           \
  ".endr\n\t"
#define INT8SERVE_WIDE6_INNER(XS, S0, S1)                                  \
  "vbroadcastss " XS ", %%ymm12\n\t"                                       \
  "vcvtdq2ps %[" S0 "], %[" S0 "]\n\t"                                     \
  "vmulps %%ymm12, %[" S0 "], %[" S0 "]\n\t"                               \
  "vcvtdq2ps %[" S1 "], %[" S1 "]\n\t"                                     \
  "vmulps %%ymm12, %[" S1 "], %[" S1 "]\n\t"
#define INT8SERVE_WIDE6_ACC_ROW(V, R, S)                                   \
  "vfmadd213ps " V "*32+" R "*256(%[acc]), %%ymm14, %[" S "]\n\t"          \
  "vmovaps %[" S "], " V "*32+" R "*256(%[acc])\n\t"
#define INT8SERVE_WIDE6_ACC(V, S0, S1, S2, S3, S4, S5)                     \
  "vmovaps " V "*32(%[scales]), %%ymm14\n\t"                               \
  INT8SERVE_WIDE6_ACC_ROW(V, "0", S0) INT8SERVE_WIDE6_ACC_ROW(V, "1", S1)  \
  INT8SERVE_WIDE6_ACC_ROW(V, "2", S2) INT8SERVE_WIDE6_ACC_ROW(V, "3", S3)  \
  INT8SERVE_WIDE6_ACC_ROW(V, "4", S4) INT8SERVE_WIDE6_ACC_ROW(V, "5", S5)

// w: the group's widened weights of the register block (both halves); x, xs, xstride: as group_into_acc_3x32's;
// scales and acc: the register block's first weight scale and acc element (the half's are 16 further on). Two
// assembly statements (the sums, then the float arithmetic), as one would have more operands than GCC allows.
template <bool kDot>
INT8SERVE_AVX2 inline void group_into_acc_6x16(const int16_t* w, int half, const int16_t* x, int64_t kp,
                                               const float* xs, int64_t xstride, const float* scales, float* acc) {
  const int16_t *x0 = x, *x3 = x + 3 * kp, *wh = w + 32 * half;  // (a half: 2 vectors of 8 outputs x 2 inputs)
  const int64_t kpb = 2 * kp;
  const float* xs3 = xs + 3 * (xstride / 4);
  const float* sh = scales + 16 * half;
  float* ah = acc + 16 * half;
  __m256i s00, s01, s10, s11, s20, s21, s30, s31, s40, s41, s50, s51;
#define INT8SERVE_WIDE6_SUMS_ASM(ADD)                                                                          \
  asm(INT8SERVE_WIDE6_SUMS(ADD)                                                                                \
      : [s00] "=&x"(s00), [s01] "=&x"(s01), [s10] "=&x"(s10), [s11] "=&x"(s11), [s20] "=&x"(s20),              \
        [s21] "=&x"(s21), [s30] "=&x"(s30), [s31] "=&x"(s31), [s40] "=&x"(s40), [s41] "=&x"(s41),              \
        [s50] "=&x"(s50), [s51] "=&x"(s51)                                                                     \
      : [w] "r"(wh), [x0] "r"(x0), [x3] "r"(x3), [kpb] "r"(kpb), "m"(*reinterpret_cast<const GroupWeights*>(w)), \
        "m"(*reinterpret_cast<const GroupInputs*>(x0)), "m"(*reinterpret_cast<const GroupInputs*>(x0 + kp)),   \
        "m"(*reinterpret_cast<const GroupInputs*>(x0 + 2 * kp)), "m"(*reinterpret_cast<const GroupInputs*>(x3)), \
        "m"(*reinterpret_cast<const GroupInputs*>(x3 + kp)), "m"(*reinterpret_cast<const GroupInputs*>(x3 + 2 * kp)) \
      : "xmm12", "xmm13", "xmm14", "xmm15")
  INT8SERVE_WIDE_WITH_PRODUCTS(INT8SERVE_WIDE6_SUMS_ASM);
#undef INT8SERVE_WIDE6_SUMS_ASM
  // (the float arithmetic in four statements, for the same reason: three rows' inner sums, then a vector's acc)
#define INT8SERVE_WIDE6_INNER_ASM(XS, A0, A1, B0, B1, C0, C1)                                                \
  asm(INT8SERVE_WIDE6_INNER("(%[xs])", "a0", "a1")                                                            \
      INT8SERVE_WIDE6_INNER("(%[xs],%[xstride],1)", "b0", "b1")                                               \
      INT8SERVE_WIDE6_INNER("(%[xs],%[xstride],2)", "c0", "c1")                                               \
      : [a0] "+x"(A0), [a1] "+x"(A1), [b0] "+x"(B0), [b1] "+x"(B1), [c0] "+x"(C0), [c1] "+x"(C1)              \
      : [xs] "r"(XS), [xstride] "r"(xstride), "m"(XS[0]), "m"(XS[xstride / 4]), "m"(XS[xstride / 2])          \
      : "xmm12")
  INT8SERVE_WIDE6_INNER_ASM(xs, s00, s01, s10, s11, s20, s21);
  INT8SERVE_WIDE6_INNER_ASM(xs3, s30, s31, s40, s41, s50, s51);
#undef INT8SERVE_WIDE6_INNER_ASM
#define INT8SERVE_WIDE6_ACC_ASM(V, S0, S1, S2, S3, S4, S5)                                                    \
  asm(INT8SERVE_WIDE6_ACC(V, "s0", "s1", "s2", "s3", "s4", "s5")                                              \
      : [s0] "+x"(S0), [s1] "+x"(S1), [s2] "+x"(S2), [s3] "+x"(S3), [s4] "+x"(S4), [s5] "+x"(S5),             \
        "+m"(*reinterpret_cast<WideSums6*>(acc))                                                              \
      : [scales] "r"(sh), [acc] "r"(ah), "m"(*reinterpret_cast<const BlockScales*>(scales))                   \
      : "xmm14")
  INT8SERVE_WIDE6_ACC_ASM("0", s00, s10, s20, s30, s40, s50);
  INT8SERVE_WIDE6_ACC_ASM("1", s01, s11, s21, s31, s41, s51);
#undef INT8SERVE_WIDE6_ACC_ASM
}
#undef INT8SERVE_WIDE6_ACC
#undef INT8SERVE_WIDE6_ACC_ROW
#undef INT8SERVE_WIDE6_INNER
#undef INT8SERVE_WIDE6_SUMS
#undef INT8SERVE_WIDE6_PAIR
#undef INT8SERVE_WIDE6_ROW
#undef INT8SERVE_WIDE_ACC
#undef INT8SERVE_WIDE_INNER
#undef INT8SERVE_WIDE_SUM_INPUTS
#undef INT8SERVE_WIDE_SUM_OPERANDS
#undef INT8SERVE_WIDE_SUMS
#undef INT8SERVE_WIDE_PAIR
#undef INT8SERVE_WIDE_ROW
#undef INT8SERVE_WIDE_SET
#undef INT8SERVE_WIDE_ADD
#undef INT8SERVE_WIDE_DOT
#undef INT8SERVE_WIDE_WITH_PRODUCTS

// R rows x the kWideColumns outputs of column block `cb` over the K-block.
// kEachGroup: every group is a weight group of its own (the default scheme, one weight scale per 32 inputs), so each
// group's sum goes straight into acc (a branch-free epilogue).
template <int R, bool kEachGroup, bool kDot>
INT8SERVE_AVX2 void wide_block(const WideBlock& a, int64_t cb) {
  constexpr int V = kWideGemmVectors;
  const int64_t ng = a.g1 - a.g0;
  for (int64_t g = a.g0; g < a.g1; ++g) {
    __m256i sum[R][V];  // int32: one output a lane
    const int16_t* w = a.wide + (cb * ng + (g - a.g0)) * kSteps * kWideStepWords;
    const int16_t* x = a.x + g * kGroup;
    if constexpr (R == 3 && kEachGroup) {
      group_into_acc_3x32<kDot>(w, x, a.kp, a.xscale + g, 2 * a.groups * static_cast<int64_t>(sizeof(float)),
                          a.wscale + (cb * ng + (g - a.g0)) * kWideColumns, a.acc + cb * kWideColumns);
      continue;
    } else if constexpr (R == 3) {
      group_sums_3x32<kDot>(w, x, a.kp, sum);
    } else {  // the last 1-2 rows of a call: the same integer sums, with intrinsics
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < V; ++v) sum[r][v] = _mm256_setzero_si256();
      for (int s = 0; s < kSteps; ++s) {
        const __m256i* pair0 = reinterpret_cast<const __m256i*>(w + s * kWideStepWords);
        const __m256i* pair1 = reinterpret_cast<const __m256i*>(w + s * kWideStepWords + kWidePairWords);
        for (int r = 0; r < R; ++r) {
          int32_t x01, x23;  // inputs 4s, 4s + 1 and 4s + 2, 4s + 3 of row r, 16 bits each
          std::memcpy(&x01, x + r * a.kp + 4 * s, 4);
          std::memcpy(&x23, x + r * a.kp + 4 * s + 2, 4);
          const __m256i xb0 = _mm256_set1_epi32(x01), xb1 = _mm256_set1_epi32(x23);
          for (int v = 0; v < V; ++v) {
            const __m256i products0 = _mm256_madd_epi16(_mm256_load_si256(pair0 + v), xb0);
            const __m256i products1 = _mm256_madd_epi16(_mm256_load_si256(pair1 + v), xb1);
            sum[r][v] = _mm256_add_epi32(sum[r][v], _mm256_add_epi32(products0, products1));
          }
        }
      }
    }
    const int64_t wg = a.wg[g - a.g0];  // (a division here, per group and block, cost more than it seems)
    const bool first = kEachGroup || g == wg * a.lay.span;
    const bool last = kEachGroup || g == std::min(a.groups, (wg + 1) * a.lay.span) - 1;
    // inner (in place of the sums): row by row, so that only the sums, the row's scale and a zero are live
    __m256 total[R][V];
    for (int r = 0; r < R; ++r) {
      const __m256 xscale = _mm256_set1_ps(a.xscale[2 * r * a.groups + g]);
      for (int v = 0; v < V; ++v) {
        const float* in = a.inner + r * kTileRows + cb * kWideColumns + 8 * v;
        const __m256 before = first ? _mm256_setzero_ps() : _mm256_load_ps(in);
        total[r][v] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r][v]), xscale, before);
      }
    }
    if (!last) {
      for (int r = 0; r < R; ++r)
        for (int v = 0; v < V; ++v) _mm256_store_ps(a.inner + r * kTileRows + cb * kWideColumns + 8 * v, total[r][v]);
      continue;
    }
    // acc: vector by vector, each weight scale converted once for the rows
    const uint16_t* scales = a.lay.scales(a.tile, wg) + cb * kWideColumns;
    for (int v = 0; v < V; ++v) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + 8 * v));
      const __m256 wscale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
      for (int r = 0; r < R; ++r) {
        float* out = a.acc + r * kTileRows + cb * kWideColumns + 8 * v;
        _mm256_store_ps(out, _mm256_fmadd_ps(total[r][v], wscale, _mm256_load_ps(out)));
      }
    }
  }
}

template <bool kEachGroup, bool kDot>
INT8SERVE_AVX2 void wide_rows(const WideBlock& a, int64_t rows, int64_t cb) {
  switch (rows) {
    case 1: wide_block<1, kEachGroup, kDot>(a, cb); break;
    case 2: wide_block<2, kEachGroup, kDot>(a, cb); break;
    default: wide_block<3, kEachGroup, kDot>(a, cb); break;
  }
}

// 6 rows x the kWideColumns outputs of column block `cb` over the K-block, the default scheme (group_into_acc_6x16).
template <bool kDot>
INT8SERVE_AVX2 void wide_block6(const WideBlock& a, int64_t cb) {
  const int64_t ng = a.g1 - a.g0;
  const int64_t xstride = 2 * a.groups * static_cast<int64_t>(sizeof(float));
  for (int64_t g = a.g0; g < a.g1; ++g) {
    const int16_t* w = a.wide + (cb * ng + (g - a.g0)) * kSteps * kWideStepWords;
    const float* scales = a.wscale + (cb * ng + (g - a.g0)) * kWideColumns;
    for (int half = 0; half < 2; ++half)
      group_into_acc_6x16<kDot>(w, half, a.x + g * kGroup, a.kp, a.xscale + g, xstride, scales,
                                a.acc + cb * kWideColumns);
  }
}

// Whether the path's default scheme takes 6-row blocks (INT8SERVE_WIDE6_DOT, INT8SERVE_WIDE6_ADD: -1 the rule above,
// the avxvnni path always, the avx2 path unless the CPU is AMD's; 0 never; 1 always).
template <bool kDot>
bool wide6_blocks() {
  return setting_or_rule(kDot ? INT8SERVE_WIDE6_DOT : INT8SERVE_WIDE6_ADD, kDot || !cpu_is_amd());
}

// Per-thread room of gemm_wide16: the widened K-block and each row's inner and acc sums over one tile.
struct WideScratch {
  int16_t* wide;
  float* wscale;
  float* inner;
  float* acc;
};

// Rows [r_begin, r_end) of the call over tile `tile`: y gets their outputs of the tile.
template <bool kDot>
INT8SERVE_AVX2 void gemm_wide16_tile(const TileArgs& base, int64_t r_begin, int64_t r_end, const WideScratch& room,
                                        int64_t tile) {
  const int64_t m = r_end - r_begin;
  std::fill(room.acc, room.acc + m * kTileRows, 0.0f);
  WideBlock a{base.lay, base.lay.tile(base.packed, tile), room.wide, room.wscale, nullptr, nullptr, base.kp,
              base.groups, 0, 0, {}, nullptr, nullptr};
  const bool six_rows = a.lay.span == 1 && wide6_blocks<kDot>();  // (the default scheme's 6 x 16 blocks)
  for (int64_t g0 = 0; g0 < base.groups; g0 += kWideGemmGroups) {
    a.g0 = g0;
    a.g1 = std::min(base.groups, g0 + kWideGemmGroups);
    for (int64_t g = a.g0; g < a.g1; ++g) a.wg[g - a.g0] = g / a.lay.span;
    widen_tile(base.lay, a.tile, a.g0, a.g1, room.wide);
    if (a.lay.span == 1) widen_scales(base.lay, a.tile, a.g0, a.g1, room.wscale);
    const NextKBlock next = next_kblock(a.lay, a.tile, a.g0, a.g1, (m + kWideGemmRows - 1) / kWideGemmRows);
    const auto at_row = [&](int64_t r0) {  // the block's rows from the call's row r0 on
      a.x = base.xwide + (r_begin + r0) * base.kp;
      a.xscale = base.xscale + (2 * (r_begin + r0) + 1) * base.groups;
      a.inner = room.inner + r0 * kTileRows;
      a.acc = room.acc + r0 * kTileRows;
    };
    int64_t r0 = 0;
    if (six_rows) {
      static_assert(kTileRows / kWideColumns == 2 && kWide6Rows == 2 * kWideGemmRows, "a share per column block");
      for (; r0 + kWide6Rows <= m; r0 += kWide6Rows) {
        at_row(r0);
        for (int64_t cb = 0; cb < 2; ++cb) {  // (the two 3-row blocks' shares of the hint, one before each half)
          if (INT8SERVE_WIDE_GEMM_HINT) ask_for_share(next, r0 / kWideGemmRows + cb);
          wide_block6<kDot>(a, cb);
        }
      }
    }
    for (; r0 < m; r0 += kWideGemmRows) {
      if (INT8SERVE_WIDE_GEMM_HINT) ask_for_share(next, r0 / kWideGemmRows);
      at_row(r0);
      const int64_t rows = std::min<int64_t>(kWideGemmRows, m - r0);
      for (int64_t cb = 0; cb < kTileRows / kWideColumns; ++cb) {
        if (a.lay.span == 1)
          wide_rows<true, kDot>(a, rows, cb);
        else
          wide_rows<false, kDot>(a, rows, cb);
      }
    }
  }
  store_tile_rows(base, r_begin, m, tile, room.acc);
}

// Rows a pass over the tiles, at most: a call of more rows goes over every tile once per chunk of rows, in chunks of
// about the same size (the weights are read again, and widened again, for each). A chunk's 16-bit inputs of a
// K-block and its running sums (132 rows: 33 KB each) stay in L2; with every row of a 512-row call in one pass
// (256 KB each) they did not, and the call ran at 55% of the vpmaddwd peak instead of 60% (Zen 3, one thread, the 7B
// shapes; 96-row chunks: 60% at 512 rows, 58% at 128, two passes of 96 and 32).
#ifndef INT8SERVE_WIDE_GEMM_CHUNK_ROWS
#define INT8SERVE_WIDE_GEMM_CHUNK_ROWS 132
#endif
constexpr int64_t kWideGemmChunkRows = INT8SERVE_WIDE_GEMM_CHUNK_ROWS;
static_assert(kWideGemmChunkRows % kWideGemmRows == 0, "a chunk holds whole register blocks of rows");

// gemv's body for the avx2 path (kDot false) and the avxvnni path (true) with precise activations and at least
// kWideGemmMinRows rows: each thread takes a contiguous range of tiles and multiplies each chunk of rows with each
// (gemm_wide16_tile).
template <bool kDot>
INT8SERVE_AVX2 void gemm_wide16(const Activations& act, TileArgs base, int64_t m, int64_t tiles, int nthreads) {
  base.xscale = act.scale.data();
  base.xwide = act.wide.data();
  const int64_t chunk = gemm_chunk_rows(m, kWideGemmChunkRows, kWideGemmRows);
  const int64_t sum_room = (chunk * kTileRows * 4 + 63) / 64 * 64;
  const int64_t per_thread = kWideBytes + kWideScaleBytes + 2 * sum_room;
  std::vector<uint8_t> storage(static_cast<size_t>(nthreads * per_thread + 64));  // (allocated before the threads)
  uint8_t* aligned = aligned64(storage);
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {
    uint8_t* mine = aligned + omp_get_thread_num() * per_thread;
    uint8_t* sums = mine + kWideBytes + kWideScaleBytes;
    const WideScratch room{reinterpret_cast<int16_t*>(mine), reinterpret_cast<float*>(mine + kWideBytes),
                           reinterpret_cast<float*>(sums), reinterpret_cast<float*>(sums + sum_room)};
    for (int64_t r_begin = 0; r_begin < m; r_begin += chunk) {
      // (the same tiles for each thread in every chunk, and no chunk reads another's outputs: no barrier between)
#pragma omp for schedule(static) nowait
      for (int64_t tile = 0; tile < tiles; ++tile)
        gemm_wide16_tile<kDot>(base, r_begin, std::min(m, r_begin + chunk), room, tile);
    }
  }
}

// vnni512 with precise activations, calls of kExactGemmMinRows rows and more (prefill chunks): a register-blocked
// GEMM on the packed bytes as they are. The decode pass (tile_vnni512) spends a broadcast on every vpdpbusd and uses
// each weight load for at most 8 int8 rows, keeps its sums in memory between groups and asks for lines ahead at every
// step; here kExactRows rows x the 4 blocks of a tile (64 outputs) are 24 int32 sums in registers, and each step's 4
// weight loads feed 24 vpdpbusd (the activations their broadcast memory operands). A row's two int8 rows go one after
// the other into the same sums: the high row's dot products (started at its correction), shifted left by 8, then the
// low row's (its correction added first). That is 256 * dot_hi + dot_lo, the integer every path combines (exact:
// |.| < 2^28 throughout), in half the registers that two sets of sums would take. Then each output's float arithmetic
// is every path's, in its order (float(dot) * xscale, fma with the weight scale into acc at the weight group's end,
// inner in between for weight groups of several groups), so the bits are every path's whatever the number of rows.
// Loop order as gemm_wide16's: each thread a contiguous range of tiles; per tile, K-blocks of kExactGemmGroups groups
// (17 KB of weights and scales, in L1) over which every row of the chunk passes, kExactRows at a time, while the
// next K-block is asked for into L2 a few lines a register block (1.02-1.04x).
// Measured on an AMD EPYC Zen 4 (2026-12-04, 2 threads, the 7B shapes, benchmarks/gemv_builds.py against 76c20e0,
// which took these calls in passes of 8 int8 rows over chunks of 8 groups): 16 rows 1.06-1.10x, 32 rows 1.16-1.27x,
// 128 rows 1.11-1.27x, 512 rows 1.30-1.56x; 8 and 12 rows, where the passes were faster or as fast (0.87-0.93x,
// 1.02-1.03x), keep them (kExactGemmMinRows). At 128 rows it multiplies ~172-179 G int8 pairs a second, against
// 188-205 G multiply-adds for the bf16 prefill kernel (kernels/matmul.py) in the same runs: the same arithmetic peak
// (one vpdpbusd, 64 products, a cycle: 32 of the two passes' pairs, as one vdpbf16ps), less the float arithmetic
// each group's sums take here (a conversion, a multiply and an fma per 16 outputs and row: 72 of a group's ~550
// instructions; without it, a timing build with wrong results, 186-193 G). From intrinsics GCC copied the sums
// between registers and the stack at every step (90 G): the group's work is one inline assembly statement.
constexpr int kExactRows = 6;  // rows a register block: 6 x 4 blocks = 24 of the 32 zmm registers hold sums
#ifndef INT8SERVE_EXACT_GEMM_GROUPS
#define INT8SERVE_EXACT_GEMM_GROUPS 8
#endif
constexpr int64_t kExactGemmGroups = INT8SERVE_EXACT_GEMM_GROUPS;
#ifndef INT8SERVE_EXACT_GEMM_CHUNK_ROWS
#define INT8SERVE_EXACT_GEMM_CHUNK_ROWS 132
#endif
constexpr int64_t kExactGemmChunkRows = INT8SERVE_EXACT_GEMM_CHUNK_ROWS;
static_assert(kExactGemmChunkRows % kExactRows == 0, "a chunk holds whole register blocks of rows");

// What a register block of rows works on.
struct ExactBlock {
  packed::Layout lay;
  const uint8_t* tile;
  const int8_t* xq;      // the block's first row's high int8 row (its low row follows, kp bytes on)
  const float* xscale;   // that low row's scales (d / 256), rows 2 * groups apart
  const int32_t* xcorr;  // the high row's corrections (the low row's follow, groups on)
  int64_t kp, groups;
  float* inner;          // [rows][64]: the running sum of the open weight group (weight groups of several groups)
  float* acc;            // [rows][64]: the finished weight groups' sum
};

// The assembly of one group (exact_group): zmm0-23 hold the sums (row r's 4 blocks in zmm 4r..4r+3; rows past R are not
// touched), zmm24-27 a step's weights of the 4 blocks, then the blocks' weight scales, zmm28 a broadcast row constant,
// zmm29 a row's broadcast input bytes (where they are not memory operands: exact_broadcasts_in_a_register). x: row 0's
// high int8 row at the group (rows `stride` bytes apart), x3 row 3's; xl, xl3 the same of the low rows; consts: the
// rows' corrections and scales (ExactGroupRows).
#define INT8SERVE_EXACT_ROW(R, ADDR, S0, S1, S2, S3)                            \
  ".if %c[rows] > " #R "\n\t"                                                   \
  ".if %c[regbc]\n\t"                                                          \
  "vpbroadcastd \\step*4" ADDR ", %%zmm29\n\t"                                   \
  "vpdpbusd %%zmm29, %%zmm24, %%zmm" #S0 "\n\t"                                 \
  "vpdpbusd %%zmm29, %%zmm25, %%zmm" #S1 "\n\t"                                 \
  "vpdpbusd %%zmm29, %%zmm26, %%zmm" #S2 "\n\t"                                 \
  "vpdpbusd %%zmm29, %%zmm27, %%zmm" #S3 "\n\t"                                 \
  ".else\n\t"                                                                  \
  "vpdpbusd \\step*4" ADDR "%{1to16%}, %%zmm24, %%zmm" #S0 "\n\t"               \
  "vpdpbusd \\step*4" ADDR "%{1to16%}, %%zmm25, %%zmm" #S1 "\n\t"               \
  "vpdpbusd \\step*4" ADDR "%{1to16%}, %%zmm26, %%zmm" #S2 "\n\t"               \
  "vpdpbusd \\step*4" ADDR "%{1to16%}, %%zmm27, %%zmm" #S3 "\n\t"               \
  ".endif\n\t"                                                                 \
  ".endif\n\t"
#define INT8SERVE_EXACT_PASS(X, X3)                                             \
  ".irp step,0,1,2,3,4,5,6,7\n\t"                                               \
  "vmovdqa64 \\step*64(%[w]), %%zmm24\n\t"                                      \
  "vmovdqa64 \\step*64+512(%[w]), %%zmm25\n\t"                                  \
  "vmovdqa64 \\step*64+1024(%[w]), %%zmm26\n\t"                                 \
  "vmovdqa64 \\step*64+1536(%[w]), %%zmm27\n\t"                                 \
  INT8SERVE_EXACT_ROW(0, "(%[" X "])", 0, 1, 2, 3)                              \
  INT8SERVE_EXACT_ROW(1, "(%[" X "],%[stride],1)", 4, 5, 6, 7)                  \
  INT8SERVE_EXACT_ROW(2, "(%[" X "],%[stride],2)", 8, 9, 10, 11)                \
  INT8SERVE_EXACT_ROW(3, "(%[" X3 "])", 12, 13, 14, 15)                         \
  INT8SERVE_EXACT_ROW(4, "(%[" X3 "],%[stride],1)", 16, 17, 18, 19)             \
  INT8SERVE_EXACT_ROW(5, "(%[" X3 "],%[stride],2)", 20, 21, 22, 23)             \
  ".endr\n\t"
// Row R's sums: started at its high correction (START), shifted and given its low correction between the passes
// (SHIFT).
#define INT8SERVE_EXACT_START(R, S0, S1, S2, S3)                                \
  ".if %c[rows] > " #R "\n\t"                                                   \
  ".irp s," #S0 "," #S1 "," #S2 "," #S3 "\n\t"                                  \
  "vpbroadcastd 8*" #R "(%[consts]), %%zmm\\s\n\t"                              \
  ".endr\n\t"                                                                   \
  ".endif\n\t"
#define INT8SERVE_EXACT_SHIFT(R, S0, S1, S2, S3)                                \
  ".if %c[rows] > " #R "\n\t"                                                   \
  "vpbroadcastd 8*" #R "+4(%[consts]), %%zmm28\n\t"                             \
  ".irp s," #S0 "," #S1 "," #S2 "," #S3 "\n\t"                                  \
  "vpslld $8, %%zmm\\s, %%zmm\\s\n\t"                                           \
  "vpaddd %%zmm28, %%zmm\\s, %%zmm\\s\n\t"                                      \
  ".endr\n\t"                                                                   \
  ".endif\n\t"
// Row R's 4 sums written to its 64 floats at P (rows 256 bytes apart).
#define INT8SERVE_EXACT_STORE(P, R, S0, S1, S2, S3)                            \
  "vmovaps %%zmm" #S0 ", 256*" #R "(%[" P "])\n\t"                              \
  "vmovaps %%zmm" #S1 ", 256*" #R "+64(%[" P "])\n\t"                           \
  "vmovaps %%zmm" #S2 ", 256*" #R "+128(%[" P "])\n\t"                          \
  "vmovaps %%zmm" #S3 ", 256*" #R "+192(%[" P "])\n\t"
// Row R's sums converted to fp32 (FLOAT, with zmm28 its scale) and multiplied by the scale (TIMES_XSCALE): total =
// float(dot) * xscale.
#define INT8SERVE_EXACT_FLOAT(R, S0, S1, S2, S3)                               \
  "vbroadcastss 48+4*" #R "(%[consts]), %%zmm28\n\t"                           \
  ".irp s," #S0 "," #S1 "," #S2 "," #S3 "\n\t"                                 \
  "vcvtdq2ps %%zmm\\s, %%zmm\\s\n\t"                                          \
  ".endr\n\t"
#define INT8SERVE_EXACT_TIMES_XSCALE(S0, S1, S2, S3)                           \
  ".irp s," #S0 "," #S1 "," #S2 "," #S3 "\n\t"                                 \
  "vmulps %%zmm28, %%zmm\\s, %%zmm\\s\n\t"                                     \
  ".endr\n\t"
// Weight groups of several groups (kMode 1: the weight group's first, 2: the others): row R's inner = total, or
// fma(float(dot), xscale, inner), written back (inner: row R's 64 running sums, 256 bytes a row).
#define INT8SERVE_EXACT_INNER(R, S0, S1, S2, S3)                               \
  ".if %c[rows] > " #R "\n\t"                                                  \
  INT8SERVE_EXACT_FLOAT(R, S0, S1, S2, S3)                                     \
  ".if %c[mode] == 1\n\t"                                                      \
  INT8SERVE_EXACT_TIMES_XSCALE(S0, S1, S2, S3)                                 \
  ".else\n\t"                                                                  \
  "vfmadd213ps 256*" #R "(%[inner]), %%zmm28, %%zmm" #S0 "\n\t"                \
  "vfmadd213ps 256*" #R "+64(%[inner]), %%zmm28, %%zmm" #S1 "\n\t"             \
  "vfmadd213ps 256*" #R "+128(%[inner]), %%zmm28, %%zmm" #S2 "\n\t"            \
  "vfmadd213ps 256*" #R "+192(%[inner]), %%zmm28, %%zmm" #S3 "\n\t"            \
  ".endif\n\t"                                                                 \
  INT8SERVE_EXACT_STORE("inner", R, S0, S1, S2, S3)                            \
  ".endif\n\t"
// The default scheme (a weight scale per group): row R's acc = fma(total, wscale, acc) (acc: row R's 64 running sums,
// 256 bytes a row; zmm24-27 the 4 blocks' weight scales).
#define INT8SERVE_EXACT_ACC(R, S0, S1, S2, S3)                                 \
  ".if %c[rows] > " #R "\n\t"                                                  \
  INT8SERVE_EXACT_FLOAT(R, S0, S1, S2, S3)                                     \
  INT8SERVE_EXACT_TIMES_XSCALE(S0, S1, S2, S3)                                 \
  "vfmadd213ps 256*" #R "(%[acc]), %%zmm24, %%zmm" #S0 "\n\t"                  \
  "vfmadd213ps 256*" #R "+64(%[acc]), %%zmm25, %%zmm" #S1 "\n\t"               \
  "vfmadd213ps 256*" #R "+128(%[acc]), %%zmm26, %%zmm" #S2 "\n\t"              \
  "vfmadd213ps 256*" #R "+192(%[acc]), %%zmm27, %%zmm" #S3 "\n\t"              \
  INT8SERVE_EXACT_STORE("acc", R, S0, S1, S2, S3)                              \
  ".endif\n\t"
#define INT8SERVE_EXACT_ROWS(EACH)                                              \
  EACH(0, 0, 1, 2, 3)                                                           \
  EACH(1, 4, 5, 6, 7)                                                           \
  EACH(2, 8, 9, 10, 11)                                                         \
  EACH(3, 12, 13, 14, 15)                                                       \
  EACH(4, 16, 17, 18, 19)                                                       \
  EACH(5, 20, 21, 22, 23)

// What the assembly reads of a group's rows besides their bytes: each row's corrections (high, low) and scale.
struct ExactGroupRows {
  int32_t corr[kExactRows][2];
  float xscale[kExactRows];  // the low row's (d / 256)
};
static_assert(offsetof(ExactGroupRows, xscale) == 48, "INT8SERVE_EXACT_ACC reads the scales at 48");

// R rows (1..6) x the tile's 64 outputs over one group: the exact int32 dots, 256 * (dot_hi + corr_hi) + dot_lo +
// corr_lo, then their float arithmetic: kMode 0 (the default scheme, a weight group per group) into acc with the
// group's weight scales (bf16, 64); 1 and 2 into inner (INT8SERVE_EXACT_INNER).
template <int R, int kMode, bool kRegBroadcast>
INT8SERVE_VNNI512 inline void exact_group(const uint8_t* group, const int8_t* x, int64_t kp, const ExactGroupRows& rows,
                                          const uint16_t* scales, float* acc, float* inner) {
  static_assert(R >= 1 && R <= kExactRows, "the assembly has room for kExactRows rows");
  const int64_t stride = 2 * kp;
  const int8_t *x3 = x + 3 * stride, *xl = x + kp, *xl3 = x3 + kp;
  asm volatile(INT8SERVE_EXACT_ROWS(INT8SERVE_EXACT_START)
               INT8SERVE_EXACT_PASS("x", "x3")
               INT8SERVE_EXACT_ROWS(INT8SERVE_EXACT_SHIFT)
               INT8SERVE_EXACT_PASS("xl", "xl3")
               ".if %c[mode] == 0\n\t"
               ".irp b,4,5,6,7\n\t"  // zmm24-27 (no more weights): block b - 4's weight scales as fp32
               "vpmovzxwd 32*(\\b-4)(%[scales]), %%zmm2\\b\n\t"
               "vpslld $16, %%zmm2\\b, %%zmm2\\b\n\t"
               ".endr\n\t"
               INT8SERVE_EXACT_ROWS(INT8SERVE_EXACT_ACC)
               ".else\n\t"
               INT8SERVE_EXACT_ROWS(INT8SERVE_EXACT_INNER)
               ".endif\n\t"
               :
               : [rows] "i"(R), [mode] "i"(kMode), [regbc] "i"(kRegBroadcast ? 1 : 0), [w] "r"(group), [x] "r"(x),
                 [x3] "r"(x3), [xl] "r"(xl), [xl3] "r"(xl3), [stride] "r"(stride), [consts] "r"(&rows),
                 [scales] "r"(scales), [acc] "r"(acc), [inner] "r"(inner)
               : "memory", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm10",
                 "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "xmm16", "xmm17", "xmm18", "xmm19", "xmm20", "xmm21",
                 "xmm22", "xmm23", "xmm24", "xmm25", "xmm26", "xmm27", "xmm28", "xmm29");
}
#undef INT8SERVE_EXACT_ROWS
#undef INT8SERVE_EXACT_ACC
#undef INT8SERVE_EXACT_INNER
#undef INT8SERVE_EXACT_STORE
#undef INT8SERVE_EXACT_TIMES_XSCALE
#undef INT8SERVE_EXACT_FLOAT
#undef INT8SERVE_EXACT_SHIFT
#undef INT8SERVE_EXACT_START
#undef INT8SERVE_EXACT_PASS
#undef INT8SERVE_EXACT_ROW

// R rows x 64 outputs over groups [g0, g1) of the tile.
template <int R, bool kEachGroup, bool kRegBroadcast>
INT8SERVE_VNNI512 void exact_block(const ExactBlock& a, int64_t g0, int64_t g1) {
  for (int64_t g = g0; g < g1; ++g) {
    const uint8_t* group = a.lay.group(a.tile, g);
    ExactGroupRows rows;
    for (int r = 0; r < R; ++r) {
      for (int half = 0; half < 2; ++half) rows.corr[r][half] = a.xcorr[(2 * r + half) * a.groups + g];
      rows.xscale[r] = a.xscale[2 * r * a.groups + g];
    }
    if constexpr (kEachGroup) {
      exact_group<R, 0, kRegBroadcast>(group, a.xq + g * kGroup, a.kp, rows, a.lay.scales(a.tile, g), a.acc, nullptr);
      continue;
    }
    const int64_t wg = g / a.lay.span;
    if (g == wg * a.lay.span)
      exact_group<R, 1, kRegBroadcast>(group, a.xq + g * kGroup, a.kp, rows, nullptr, nullptr, a.inner);
    else
      exact_group<R, 2, kRegBroadcast>(group, a.xq + g * kGroup, a.kp, rows, nullptr, nullptr, a.inner);
    if ((g + 1) % a.lay.span != 0 && g + 1 != a.groups) continue;
    // the weight group's end: acc = fma(inner, wscale, acc)
    const uint16_t* scales = a.lay.scales(a.tile, wg);
    for (int b = 0; b < kBlocks; ++b) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(scales + b * kBlockRows));
      const __m512 wscale = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
      for (int r = 0; r < R; ++r) {
        float* out = a.acc + r * kTileRows + b * kBlockRows;
        _mm512_store_ps(out, _mm512_fmadd_ps(_mm512_load_ps(a.inner + r * kTileRows + b * kBlockRows), wscale,
                                             _mm512_load_ps(out)));
      }
    }
  }
}

template <bool kEachGroup, bool kRegBroadcast>
INT8SERVE_VNNI512 void exact_rows(const ExactBlock& a, int64_t rows, int64_t g0, int64_t g1) {
  switch (rows) {
    case 1: exact_block<1, kEachGroup, kRegBroadcast>(a, g0, g1); break;
    case 2: exact_block<2, kEachGroup, kRegBroadcast>(a, g0, g1); break;
    case 3: exact_block<3, kEachGroup, kRegBroadcast>(a, g0, g1); break;
    case 4: exact_block<4, kEachGroup, kRegBroadcast>(a, g0, g1); break;
    case 5: exact_block<5, kEachGroup, kRegBroadcast>(a, g0, g1); break;
    default: exact_block<6, kEachGroup, kRegBroadcast>(a, g0, g1); break;
  }
}

// Rows [r_begin, r_end) of the call over tile `tile`: y gets their outputs of the tile. room: inner and acc, 64
// floats a row each.
template <bool kRegBroadcast>
INT8SERVE_VNNI512 void gemm_exact_tile(const TileArgs& base, int64_t r_begin, int64_t r_end, float* inner, float* acc,
                                       int64_t tile) {
  const int64_t m = r_end - r_begin;
  std::fill(acc, acc + m * kTileRows, 0.0f);
  ExactBlock a{base.lay, base.lay.tile(base.packed, tile), nullptr, nullptr, nullptr, base.kp, base.groups, nullptr,
               nullptr};
  for (int64_t g0 = 0; g0 < base.groups; g0 += kExactGemmGroups) {
    const int64_t g1 = std::min(base.groups, g0 + kExactGemmGroups);
    const NextKBlock next = next_kblock(a.lay, a.tile, g0, g1, (m + kExactRows - 1) / kExactRows);
    for (int64_t r0 = 0; r0 < m; r0 += kExactRows) {
      ask_for_share(next, r0 / kExactRows);
      const int64_t row = r_begin + r0;  // the call's row: int8 rows 2 row (high) and 2 row + 1 (low)
      a.xq = base.xq + 2 * row * base.kp;
      a.xscale = base.xscale + (2 * row + 1) * base.groups;
      a.xcorr = base.xcorr + 2 * row * base.groups;
      a.inner = inner + r0 * kTileRows;
      a.acc = acc + r0 * kTileRows;
      const int64_t rows = std::min<int64_t>(kExactRows, m - r0);
      if (a.lay.span == 1)
        exact_rows<true, kRegBroadcast>(a, rows, g0, g1);
      else
        exact_rows<false, kRegBroadcast>(a, rows, g0, g1);
    }
  }
  store_tile_rows(base, r_begin, m, tile, acc);
}

// How the GEMM's rows reach vpdpbusd: each row's 4 input bytes of a step broadcast once into a register for the 4
// products that use them (6 broadcasts and 4 weight loads a step of 24 products), or as each product's embedded
// broadcast memory operand (24 loads and 4). A Sapphire Rapids held to the vnni512 path (Intel: two 512-bit multiply
// ports, two 512-bit loads a cycle; 2026-12-05, 2 threads, benchmarks/gemv_builds.py
// -DINT8SERVE_EXACT_BROADCAST_REG=1 against 0, the 7B shapes, 4 rounds, the same bits) ran the register form
// 1.09-1.12x faster at 16 rows, 1.12-1.14x at 32, 1.12-1.15x at 128 and 1.14-1.15x at 512: its loads, not its
// products, bounded the memory-operand form. On AMD's Zen 4, this path's main CPU (2026-12-05, the same script, 5
// rounds, 16, 128 and 512 rows), the register form ran 0.98-1.04x, inside the run's noise floor (a second build of
// the same code: 0.98-1.02x; docs/benchmarks.md): AMD CPUs keep the memory operands.
// INT8SERVE_EXACT_BROADCAST_REG: -1 (default) that rule, 0 never, 1 always.
#ifndef INT8SERVE_EXACT_BROADCAST_REG
#define INT8SERVE_EXACT_BROADCAST_REG -1
#endif
bool exact_broadcasts_in_a_register() { return setting_or_rule(INT8SERVE_EXACT_BROADCAST_REG, !cpu_is_amd()); }

// gemv's body for the vnni512 path with precise activations and at least kExactGemmMinRows rows.
INT8SERVE_VNNI512 void gemm_exact_vnni512(const Activations& act, TileArgs base, int64_t m, int64_t tiles,
                                          int nthreads) {
  base.xq = act.q.data();
  base.xscale = act.scale.data();
  base.xcorr = act.corr.data();
  const int64_t chunk = gemm_chunk_rows(m, kExactGemmChunkRows, kExactRows);
  const int64_t room = chunk * kTileRows;  // floats: a multiple of 64, so every row's sums stay 64-byte aligned
  std::vector<float> storage(static_cast<size_t>(nthreads * 2 * room + 16));
  float* aligned = aligned64(storage);
  const bool reg_broadcast = exact_broadcasts_in_a_register();
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {
    float* mine = aligned + omp_get_thread_num() * 2 * room;
    for (int64_t r_begin = 0; r_begin < m; r_begin += chunk) {
#pragma omp for schedule(static) nowait
      for (int64_t tile = 0; tile < tiles; ++tile) {
        const int64_t r_end = std::min(m, r_begin + chunk);
        if (reg_broadcast)
          gemm_exact_tile<true>(base, r_begin, r_end, mine, mine + room, tile);
        else
          gemm_exact_tile<false>(base, r_begin, r_end, mine, mine + room, tile);
      }
    }
  }
}

// amx: up to 16 activation rows over one tile with AMX-INT8 tile instructions, 32 inputs (one activation group) at a
// time. The packed layout is already what a tile multiply wants of its second operand: a block's 8 steps of one group,
// 8 x 64 contiguous bytes, are 4 consecutive k of each of 16 output rows per 64-byte row. TDPBSUD multiplies the
// signed activation bytes (A: rows x 32) with these unsigned bytes (B) into exact int32 sums (C: rows x 16), the
// same dot products as vpdpbusd's, so the fp32 arithmetic that follows (the same fmas in the same order) gives the
// same bits as every other path. The tiles do the products of all rows at once where vnni512 spends one instruction
// per row and 64 bytes: at 8 rows (4 sequences, precise) its arithmetic, not the memory, was the limit.
// Tile registers: tmm0-3 the four blocks' sums, tmm4 the activations, tmm5 and tmm6 the weights (alternating);
// inline assembly (amx_tiles.h).
void amx_configure(int64_t rows) {
  TileConfig config;
  for (int t = 0; t < 4; ++t) config.rows[t] = static_cast<uint8_t>(rows), config.colsb[t] = 64;  // C: rows x 16 int32
  config.rows[4] = static_cast<uint8_t>(rows), config.colsb[4] = kGroup;                           // A: rows x 32 int8
  for (int t = 5; t < 7; ++t) config.rows[t] = kSteps, config.colsb[t] = 64;                       // B: 8 x 64 uint8
  tiles_configure(config);
}

// C += A (signed bytes) . B (unsigned bytes); AT&T order: B, A, C
#define INT8SERVE_TILE_DPBSUD(C, A, B) asm volatile("tdpbsud %%tmm" #B ", %%tmm" #A ", %%tmm" #C ::)

constexpr int64_t kAmxMaxRows = 16;

// The four blocks' int32 sums of activation group g, for `rows` rows, into dots[row][64] (exact, no +128 correction).
// Each group asks for kAmxPrefetchSpan bytes from kPrefetchBytes512 and from kPrefetchL2Bytes512 ahead.
inline void amx_group_dots(const TileArgs& a, const uint8_t* wgb, int64_t g, int32_t (*dots)[kTileRows]) {
  INT8SERVE_TILE_LOAD(4, a.xq + g * kGroup, a.kp);
  INT8SERVE_TILE_ZERO(0);
  INT8SERVE_TILE_ZERO(1);
  INT8SERVE_TILE_ZERO(2);
  INT8SERVE_TILE_ZERO(3);
  INT8SERVE_TILE_LOAD(5, wgb, 64);
  INT8SERVE_TILE_LOAD(6, wgb + kBlockBytes, 64);
  INT8SERVE_TILE_DPBSUD(0, 4, 5);
  INT8SERVE_TILE_DPBSUD(1, 4, 6);
  INT8SERVE_TILE_LOAD(5, wgb + 2 * kBlockBytes, 64);
  INT8SERVE_TILE_LOAD(6, wgb + 3 * kBlockBytes, 64);
  INT8SERVE_TILE_DPBSUD(2, 4, 5);
  INT8SERVE_TILE_DPBSUD(3, 4, 6);
  if (kPrefetchBytes512 > 0)
    for (int64_t line = 0; line < kAmxPrefetchSpan; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(wgb + kPrefetchBytes512 + line), _MM_HINT_T0);
  if (kPrefetchL2Bytes512 > 0)
    for (int64_t line = 0; line < kAmxPrefetchSpan; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(wgb + kPrefetchL2Bytes512 + line), _MM_HINT_T1);
  constexpr int64_t kRowBytes = kTileRows * sizeof(int32_t);
  INT8SERVE_TILE_STORE(0, &dots[0][0], kRowBytes);
  INT8SERVE_TILE_STORE(1, &dots[0][kBlockRows], kRowBytes);
  INT8SERVE_TILE_STORE(2, &dots[0][2 * kBlockRows], kRowBytes);
  INT8SERVE_TILE_STORE(3, &dots[0][3 * kBlockRows], kRowBytes);
}

// The correction of int8 row r at activation group g, broadcast; with pairs, of rows r and r + 1 as one integer:
// 256 * (dot_hi + corr_hi) + dot_lo + corr_lo = 256 * dot_hi + dot_lo + (256 * corr_hi + corr_lo), exact in int32, so
// a pair's dots take one add instead of two (the same sums, the same bits).
INT8SERVE_VNNI512 inline __m512i amx_corr(const TileArgs& a, int64_t r, int64_t g, bool pairs) {
  const int32_t corr = a.xcorr[r * a.groups + g];
  return _mm512_set1_epi32(pairs ? 256 * corr + a.xcorr[(r + 1) * a.groups + g] : corr);
}

// float(dot + correction) of int8 row r, block b (corr: amx_corr of its group); with pairs, of rows r and r + 1
// combined (256 * dot_hi + dot_lo, see TileArgs). `pairs` is a.pairs (a constant where the caller's template knows it).
INT8SERVE_VNNI512 inline __m512 amx_dot(const int32_t (*dots)[kTileRows], int64_t r, int b, bool pairs, __m512i corr) {
  const __m512i hi = _mm512_load_si512(&dots[r][b * kBlockRows]);
  const __m512i dot = pairs ? pair_dot(hi, _mm512_load_si512(&dots[r + 1][b * kBlockRows])) : hi;
  return _mm512_cvtepi32_ps(_mm512_add_epi32(dot, corr));
}

INT8SERVE_VNNI512 inline __m512 amx_weight_scale(const uint16_t* ws, int b) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ws + b * kBlockRows));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// tile_amx of kOut output rows (P: with pairs) when every weight group is one activation group (the default scheme):
// the running sums stay in registers from the first group to the last (the same fmas, the same bits). The vector
// work after each group's tile products (before, with a pair's two corrections added apart), not the memory,
// held the general loop back at 4 sequences: 8 int8 rows without it streamed 1.11-1.21x faster (Sapphire Rapids,
// gemv_builds.py, 2026-12-04, outputs not kept). This code against the general loop, the same CPU and script (the 7B
// decode shapes, 9 rounds): 4 sequences 1.08-1.12x, 3 sequences 1.12-1.14x; the corrections loaded as the C tiles'
// starting values instead (no integer add at all) were slower, 0.74-0.98x.
// Its loops start on 64-byte boundaries (GCC's align-loops for this function alone). Its speed at 4 sequences had
// come to depend on where the linker put it: on a Sapphire Rapids (2026-12-05, 2 threads, the 7B decode shapes,
// gemv_builds.py) the builds of the same tile_amx at the last commits alternated between two speeds, 7-12% apart, as
// the function moved (start address 48 or 0 modulo 64), and 4 sequences' decode through 8 layers read 49.6-52.6
// tok/s against 51.7-55.2 at 69cd9d9. Aligned (-DINT8SERVE_AMX_LOOP_ALIGN=64 against 0, 6 rounds): 4 sequences
// 1.14-1.16x (25-27 -> 28-30 GB/s, near batch 1's 30-32), 3 sequences 1.01-1.04x, 1 and 2 sequences 0.97-1.03x;
// 32-byte alignment 1.11-1.13x at 4. The flag for the whole library instead moved other loops the wrong way (3
// sequences 0.90x, 128-row GEMM calls down to 0.77x).
#ifndef INT8SERVE_AMX_LOOP_ALIGN
#define INT8SERVE_AMX_LOOP_ALIGN 64
#endif
#define INT8SERVE_STR2(x) #x
#define INT8SERVE_STR(x) INT8SERVE_STR2(x)
#if INT8SERVE_AMX_LOOP_ALIGN
#define INT8SERVE_AMX_ALIGN __attribute__((optimize("align-loops=" INT8SERVE_STR(INT8SERVE_AMX_LOOP_ALIGN))))
#else
#define INT8SERVE_AMX_ALIGN
#endif
template <int kOut, bool P>
INT8SERVE_VNNI512 INT8SERVE_AMX_ALIGN void tile_amx_span1(const TileArgs& a, int64_t tile) {
  constexpr int64_t kPer = P ? 2 : 1;  // int8 rows per output row
  const uint8_t* w = a.lay.tile(a.packed, tile);
  alignas(64) int32_t dots[kAmxMaxRows][kTileRows];
  __m512 acc[kOut][kBlocks];
  for (int o = 0; o < kOut; ++o)
    for (int b = 0; b < kBlocks; ++b) acc[o][b] = _mm512_setzero_ps();
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t g = 0; g < a.groups; ++g) {
    __m512 scale[kBlocks];
    for (int b = 0; b < kBlocks; ++b) scale[b] = amx_weight_scale(a.lay.scales(w, g), b);
    amx_group_dots(a, a.lay.group(w, g), g, dots);
    for (int o = 0; o < kOut; ++o) {
      const int64_t r = o * kPer;
      const __m512 xscale = _mm512_set1_ps(a.xscale[(r + kPer - 1) * a.groups + g]);
      const __m512i corr = amx_corr(a, r, g, P);
      for (int b = 0; b < kBlocks; ++b) {
        const __m512 in = _mm512_fmadd_ps(amx_dot(dots, r, b, P, corr), xscale, zero);
        acc[o][b] = _mm512_fmadd_ps(in, scale[b], acc[o][b]);
      }
    }
  }
  const int64_t n0 = tile * kTileRows;
  const int64_t count = std::min(kTileRows, a.n - n0);
  for (int o = 0; o < kOut; ++o) {
    alignas(64) float out[kTileRows];
    for (int b = 0; b < kBlocks; ++b) _mm512_store_ps(out + b * kBlockRows, acc[o][b]);
    std::memcpy(a.y + o * a.n + n0, out, static_cast<size_t>(count) * sizeof(float));
  }
}

// Needs amx_configure(rows) on the calling thread (i8s_gemv does it once per pass size). rows: int8 rows (with
// pairs, rows / 2 output rows).
INT8SERVE_VNNI512 void tile_amx(const TileArgs& a, int64_t rows, int64_t tile) {
  if (a.lay.span == 1) {  // up to 4 output rows: their running sums fit in registers (16 of the 32)
    switch (a.pairs ? rows / 2 : -rows) {
      case 1: return tile_amx_span1<1, true>(a, tile);
      case 2: return tile_amx_span1<2, true>(a, tile);
      case 3: return tile_amx_span1<3, true>(a, tile);
      case 4: return tile_amx_span1<4, true>(a, tile);
      case -1: return tile_amx_span1<1, false>(a, tile);
      case -2: return tile_amx_span1<2, false>(a, tile);
      case -3: return tile_amx_span1<3, false>(a, tile);
      case -4: return tile_amx_span1<4, false>(a, tile);
      default: break;
    }
  }
  const uint8_t* w = a.lay.tile(a.packed, tile);
  const int64_t per = a.pairs ? 2 : 1, outputs = rows / per;  // int8 rows per output row
  alignas(64) int32_t dots[kAmxMaxRows][kTileRows];
  alignas(64) float inner[kAmxMaxRows][kTileRows];
  alignas(64) float acc[kAmxMaxRows][kTileRows];
  std::memset(acc, 0, static_cast<size_t>(outputs) * sizeof(acc[0]));
  const __m512 zero = _mm512_setzero_ps();
  for (int64_t wg = 0; wg < a.lay.wgroups; ++wg) {
    __m512 scale[kBlocks];
    for (int b = 0; b < kBlocks; ++b) scale[b] = amx_weight_scale(a.lay.scales(w, wg), b);
    const int64_t g0 = wg * a.lay.span, g1 = std::min(a.groups, (wg + 1) * a.lay.span);
    // A weight group of one activation group (the default scheme): the general loop's arithmetic without its inner
    // sums in memory (the same fmas; 1.06-1.19x the speed at 4 and 8 rows, Sapphire Rapids, gemv_builds.py)
    if (g1 - g0 == 1) {
      amx_group_dots(a, a.lay.group(w, g0), g0, dots);
      for (int64_t o = 0; o < outputs; ++o) {
        const int64_t r = o * per;
        const __m512 xscale = _mm512_set1_ps(a.xscale[(r + per - 1) * a.groups + g0]);
        const __m512i corr = amx_corr(a, r, g0, a.pairs);
        for (int b = 0; b < kBlocks; ++b) {
          float* out = &acc[o][b * kBlockRows];
          const __m512 in = _mm512_fmadd_ps(amx_dot(dots, r, b, a.pairs, corr), xscale, zero);
          _mm512_store_ps(out, _mm512_fmadd_ps(in, scale[b], _mm512_load_ps(out)));
        }
      }
      continue;
    }
    std::memset(inner, 0, static_cast<size_t>(outputs) * sizeof(inner[0]));
    for (int64_t g = g0; g < g1; ++g) {
      amx_group_dots(a, a.lay.group(w, g), g, dots);
      for (int64_t o = 0; o < outputs; ++o) {
        const int64_t r = o * per;
        const __m512 xscale = _mm512_set1_ps(a.xscale[(r + per - 1) * a.groups + g]);
        const __m512i corr = amx_corr(a, r, g, a.pairs);
        for (int b = 0; b < kBlocks; ++b) {
          float* in = &inner[o][b * kBlockRows];
          _mm512_store_ps(in, _mm512_fmadd_ps(amx_dot(dots, r, b, a.pairs, corr), xscale, _mm512_load_ps(in)));
        }
      }
    }
    for (int64_t o = 0; o < outputs; ++o)
      for (int b = 0; b < kBlocks; ++b) {
        float* out = &acc[o][b * kBlockRows];
        _mm512_store_ps(out, _mm512_fmadd_ps(_mm512_load_ps(&inner[o][b * kBlockRows]), scale[b], _mm512_load_ps(out)));
      }
  }
  const int64_t n0 = tile * kTileRows;
  const int64_t count = std::min(kTileRows, a.n - n0);
  for (int64_t o = 0; o < outputs; ++o)
    std::memcpy(a.y + o * a.n + n0, acc[o], static_cast<size_t>(count) * sizeof(float));
}

// amx with precise activations, calls of kAmxGemmMinRows rows and more (prefill chunks): every path's exact arithmetic
// on AMX-INT8 tiles, so that prefill here can be row-exact, with decode's accuracy (the AMX-BF16 prefill kernel rounds
// activations and dequantized weights to bf16). A tile product takes one group of 32 inputs: each group's sums need
// their own scales, so every group's C tiles go to memory and vector code does every path's float arithmetic on them
// (the same fmas in the same order). A register block is 16 output rows (two A tiles of 16 int8 rows, each row's high
// and low int8 rows in turn) x one block of 16 outputs (one B tile), whose 16 running sums stay in zmm registers over
// a K-block of kAmxGemmGroups groups. TDPBSSD multiplies signed by signed bytes: each K-block's weights are copied
// once as signed bytes (the top bit of w + 128 flipped, 16 KB in L1) for every row of the chunk, so the exact dot
// products need no correction. A row's two combine as on every path, 256 * dot_hi + dot_lo, before the conversion.
// Tile registers: tmm0-3 C (16 int8 rows x 16 int32; 0 and 1 for even groups, 2 and 3 for odd), tmm4-5 A (16 int8
// rows x 32 bytes), tmm6-7 B (8 steps x 64 bytes; even and odd groups).
// Measured on a Sapphire Rapids (2026-12-05, 2 threads, the 7B shapes, benchmarks/gemv_builds.py against 9fe2a4d,
// which took these calls in passes of 16 int8 rows over each tile): 32 rows 1.02-1.04x, 64 rows 1.16-1.20x, 128 rows
// 1.20-1.32x, 512 rows 1.19-1.28x; at 16 and 24 rows the passes are faster (the GEMM from 16 rows: 0.79-0.92x,
// gemv_builds.py -DINT8SERVE_AMX_GEMM_MIN_ROWS=16), so they keep those calls (kAmxGemmMinRows). It is still about
// half as fast as the AMX-BF16 prefill kernel (kernels/matmul.py), whose sums stay in the tiles over all inputs: here
// the tile work and the vector work take turns rather than overlapping (benchmarks/amx_overlap.py: each alone 77-80
// TSC cycles a step, both 182).
constexpr int kAmxGemmRows = 16;  // output rows a register block: 32 int8 rows, two A tiles
#ifndef INT8SERVE_AMX_GEMM_GROUPS
#define INT8SERVE_AMX_GEMM_GROUPS 8
#endif
constexpr int64_t kAmxGemmGroups = INT8SERVE_AMX_GEMM_GROUPS;
#ifndef INT8SERVE_AMX_GEMM_CHUNK_ROWS
#define INT8SERVE_AMX_GEMM_CHUNK_ROWS 128
#endif
constexpr int64_t kAmxGemmChunkRows = INT8SERVE_AMX_GEMM_CHUNK_ROWS;
// Unlike the other GEMMs, this one does not ask for its next K-block into L2 (next_kblock): on a Sapphire Rapids
// (2026-12-05, 2 threads, the 7B shapes, benchmarks/gemv_builds.py -DINT8SERVE_AMX_GEMM_HINT=0 against =1, 8 rounds)
// the calls were faster without it: 32 rows 1.06-1.08x, 64 rows 1.01-1.03x, 128 and 512 rows 1.00-1.02x (6 rounds).
// Its tiles and its vector code take turns, and each K-block's weights are copied as signed bytes first: the
// hardware prefetcher keeps up with that stream alone.
#ifndef INT8SERVE_AMX_GEMM_HINT
#define INT8SERVE_AMX_GEMM_HINT 0
#endif
static_assert(kAmxGemmChunkRows % kAmxGemmRows == 0, "a chunk holds whole register blocks of rows");

void amx_gemm_configure() {
  TileConfig config;
  for (int t = 0; t < 4; ++t) config.rows[t] = kAmxMaxRows, config.colsb[t] = 64;      // C: 16 x 16 int32
  for (int t = 4; t < 6; ++t) config.rows[t] = kAmxMaxRows, config.colsb[t] = kGroup;  // A: 16 x 32 int8
  for (int t = 6; t < 8; ++t) config.rows[t] = kSteps, config.colsb[t] = 64;           // B: 8 x 64 int8
  tiles_configure(config);
}

// C += A (signed bytes) . B (signed bytes); AT&T order: B, A, C
#define INT8SERVE_TILE_DPBSSD(C, A, B) asm volatile("tdpbssd %%tmm" #B ", %%tmm" #A ", %%tmm" #C ::)

constexpr int64_t kAmxGemmGroupBytes = 2 * kAmxMaxRows * kGroup;  // a register block's two A tiles of one group

// The quantized rows as A tiles, each contiguous (512 bytes: a tile load reads 8 whole lines, not 16 rows kp bytes
// apart from L2): [register block][group][32 int8 rows][32 bytes]; and each register block's scales (its low int8
// rows', d / 256) group by group: [register block][group][16 output rows]; the last block's rows past the call's
// zeros (a new vector's). storage: room for both (resized here).
struct AmxGemmRows {
  const int8_t* q;
  const float* scale;
};
AmxGemmRows amx_gemm_rows(const Activations& act, int64_t m, int nthreads, std::vector<float>& storage) {
  const int64_t blocks = (m + kAmxGemmRows - 1) / kAmxGemmRows;
  const int64_t q_floats = blocks * act.groups * kAmxGemmGroupBytes / static_cast<int64_t>(sizeof(float));
  storage.resize(static_cast<size_t>(q_floats + blocks * act.groups * kAmxGemmRows + 16));
  float* start = aligned64(storage);
  int8_t* q = reinterpret_cast<int8_t*>(start);
  float* scale = start + q_floats;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1 && blocks > 1)
  for (int64_t block = 0; block < blocks; ++block) {
    const int64_t outputs = std::min<int64_t>(kAmxGemmRows, m - block * kAmxGemmRows);  // the call's rows here
    for (int64_t g = 0; g < act.groups; ++g) {
      for (int64_t r = 0; r < 2 * outputs; ++r)
        std::memcpy(q + (block * act.groups + g) * kAmxGemmGroupBytes + r * kGroup,
                    act.q.data() + (block * 2 * kAmxGemmRows + r) * act.kp + g * kGroup, kGroup);
      for (int64_t o = 0; o < outputs; ++o)
        scale[(block * act.groups + g) * kAmxGemmRows + o] =
            act.scale[(2 * (block * kAmxGemmRows + o) + 1) * act.groups + g];
    }
  }
  return {q, scale};
}

// What a register block works on.
struct AmxGemmBlock {
  packed::Layout lay;
  const uint8_t* tile;           // the packed tile (for its scales)
  const int8_t* signed_weights;  // the K-block's groups as signed bytes, kGroupBytes a group from g0
  const int8_t* xq;              // the block's A tiles (amx_gemm_rows), kAmxGemmGroupBytes a group
  const float* xscale;           // the block's scales (amx_gemm_rows), kAmxGemmRows a group
  int64_t groups;
  float* acc;                    // the block's running sums, 64 floats a row (the tile's 4 blocks)
  float* inner;                  // the same for the weight groups of several groups
};

// Tile loads and stores of 512 contiguous bytes (and 1 KB) that name the memory they read or write, rather than
// clobbering all of it as amx_tiles.h's macros do.
#define INT8SERVE_TILE_LOAD_512(T, BASE, STRIDE)                                                                 \
  asm volatile("tileloadd (%1,%2,1), %%tmm" #T                                                                   \
               :                                                                                                 \
               : "m"(*reinterpret_cast<const int8_t(*)[512]>(BASE)), "r"(BASE), "r"(static_cast<int64_t>(STRIDE)))
#define INT8SERVE_TILE_STORE_1K(T, BASE)                                                                         \
  asm volatile("tilestored %%tmm" #T ", (%1,%2,1)"                                                               \
               : "=m"(*reinterpret_cast<int32_t(*)[256]>(BASE))                                                  \
               : "r"(BASE), "r"(int64_t{64}))

// Group g's exact dot products of the block's 32 int8 rows with block b, into dots (32 x 16 int32; C tiles T0 and
// T1, B tile U: the caller alternates them between groups).
#define INT8SERVE_AMX_GEMM_PRODUCTS(T0, T1, U, a, b, g0, g, dots)                                                \
  do {                                                                                                           \
    INT8SERVE_TILE_LOAD_512(U, (a).signed_weights + ((g) - (g0)) * kGroupBytes + (b) * kBlockBytes, 64);         \
    INT8SERVE_TILE_LOAD_512(4, (a).xq + (g) * kAmxGemmGroupBytes, kGroup);                                       \
    INT8SERVE_TILE_LOAD_512(5, (a).xq + (g) * kAmxGemmGroupBytes + kAmxMaxRows * kGroup, kGroup);                \
    INT8SERVE_TILE_ZERO(T0);                                                                                     \
    INT8SERVE_TILE_ZERO(T1);                                                                                     \
    INT8SERVE_TILE_DPBSSD(T0, 4, U);                                                                             \
    INT8SERVE_TILE_DPBSSD(T1, 5, U);                                                                             \
    INT8SERVE_TILE_STORE_1K(T0, &(dots)[0][0]);                                                                  \
    INT8SERVE_TILE_STORE_1K(T1, &(dots)[kAmxMaxRows][0]);                                                        \
  } while (0)

// Every path's float arithmetic on a group's dot products, output row o (its high row's sums at o * 128 bytes of
// dots, its low row's 64 bytes on; its scale at 4 * o bytes of xs) in zmm T: 256 * dot_hi + dot_lo, converted, then
// with a weight group of one group (EACH) run_o = fma(fma(float, xscale, 0), wscale, run_o), else (INNER) run_o =
// fma(float, xscale, run_o). Inline assembly: from intrinsics GCC kept the 16 running sums on the stack.
#define INT8SERVE_AMX_DOT(o, T)                          \
  "vpslld $8, " #o "*128(%[d]), %%zmm" #T "\n\t"         \
  "vpaddd " #o "*128+64(%[d]), %%zmm" #T ", %%zmm" #T "\n\t" \
  "vcvtdq2ps %%zmm" #T ", %%zmm" #T "\n\t"
#define INT8SERVE_AMX_EACH(o, T) INT8SERVE_AMX_DOT(o, T)                  \
  "vfmadd132ps 4*" #o "(%[xs])%{1to16%}, %[zero], %%zmm" #T "\n\t"        \
  "vfmadd231ps %[ws], %%zmm" #T ", %[r" #o "]\n\t"
#define INT8SERVE_AMX_INNER(o, T) INT8SERVE_AMX_DOT(o, T)                 \
  "vfmadd231ps 4*" #o "(%[xs])%{1to16%}, %%zmm" #T ", %[r" #o "]\n\t"
#define INT8SERVE_AMX_ROWS_0(ROW) \
  ROW(0, 28) ROW(1, 29) ROW(2, 30) ROW(3, 31) ROW(4, 28) ROW(5, 29) ROW(6, 30) ROW(7, 31)
#define INT8SERVE_AMX_ROWS_8(ROW) \
  ROW(8, 28) ROW(9, 29) ROW(10, 30) ROW(11, 31) ROW(12, 28) ROW(13, 29) ROW(14, 30) ROW(15, 31)
// (two statements of 8 rows: an asm statement takes at most 30 operands, and "+v" counts twice)
#define INT8SERVE_AMX_SCALE_8(ROWS, ROW, A, B, C, D, E, F, G, H, dots, xs, wscale, zero)                           \
  asm volatile(ROWS(ROW)                                                                                           \
               : [r##A] "+v"(r##A), [r##B] "+v"(r##B), [r##C] "+v"(r##C), [r##D] "+v"(r##D), [r##E] "+v"(r##E),     \
                 [r##F] "+v"(r##F), [r##G] "+v"(r##G), [r##H] "+v"(r##H)                                           \
               : [d] "r"(dots), [xs] "r"(xs), [ws] "v"(wscale), [zero] "v"(zero),                                  \
                 "m"(*reinterpret_cast<const int32_t(*)[512]>(dots)),                                            \
                 "m"(*reinterpret_cast<const float(*)[kAmxGemmRows]>(xs))                                        \
               : "xmm28", "xmm29", "xmm30", "xmm31")
#define INT8SERVE_AMX_SCALE(ROW, dots, xs, wscale, zero)                                                     \
  INT8SERVE_AMX_SCALE_8(INT8SERVE_AMX_ROWS_0, ROW, 0, 1, 2, 3, 4, 5, 6, 7, dots, xs, wscale, zero);          \
  INT8SERVE_AMX_SCALE_8(INT8SERVE_AMX_ROWS_8, ROW, 8, 9, 10, 11, 12, 13, 14, 15, dots, xs, wscale, zero)
#define INT8SERVE_AMX_16(M) M(0) M(1) M(2) M(3) M(4) M(5) M(6) M(7) M(8) M(9) M(10) M(11) M(12) M(13) M(14) M(15)

// The block's rows over block b of groups [g0, g1): the 16 running sums (acc with kEachGroup, else inner, which goes
// into acc at the end of each weight group) from memory into registers and back.
template <bool kEachGroup>
INT8SERVE_VNNI512 void amx_gemm_block(const AmxGemmBlock& a, int b, int64_t g0, int64_t g1) {
  alignas(64) int32_t dots[2][2 * kAmxMaxRows][kBlockRows];
  float* keep = (kEachGroup ? a.acc : a.inner) + b * kBlockRows;
  const __m512 zero = _mm512_setzero_ps();
#define INT8SERVE_AMX_LOAD_RUN(o) __m512 r##o = _mm512_load_ps(keep + (o) * kTileRows);
  INT8SERVE_AMX_16(INT8SERVE_AMX_LOAD_RUN)
#undef INT8SERVE_AMX_LOAD_RUN
  const auto group = [&](int64_t g, const int32_t (*d)[kBlockRows]) INT8SERVE_VNNI512 {
    const __m512 wscale = amx_weight_scale(a.lay.scales(a.tile, kEachGroup ? g : g / a.lay.span), b);
    const float* xs = a.xscale + g * kAmxGemmRows;
    if (kEachGroup) {
      INT8SERVE_AMX_SCALE(INT8SERVE_AMX_EACH, &d[0][0], xs, wscale, zero);
    } else {
      INT8SERVE_AMX_SCALE(INT8SERVE_AMX_INNER, &d[0][0], xs, wscale, zero);
      if ((g + 1) % a.lay.span == 0 || g + 1 == a.groups) {  // the weight group's end: inner into acc
        float* acc = a.acc + b * kBlockRows;
#define INT8SERVE_AMX_FLUSH(o)                                                                     \
  _mm512_store_ps(acc + (o) * kTileRows, _mm512_fmadd_ps(r##o, wscale, _mm512_load_ps(acc + (o) * kTileRows))); \
  r##o = zero;
        INT8SERVE_AMX_16(INT8SERVE_AMX_FLUSH)
#undef INT8SERVE_AMX_FLUSH
      }
    }
  };
  // Two groups a step, in alternating tiles and buffers. (Tile products issued two groups ahead of the vector code
  // that reads them, in four buffers, measured 1.00-1.05x: the tiles and the vector code hardly overlap here.)
  int64_t g = g0;
  for (; g + 1 < g1; g += 2) {
    INT8SERVE_AMX_GEMM_PRODUCTS(0, 1, 6, a, b, g0, g, dots[0]);
    INT8SERVE_AMX_GEMM_PRODUCTS(2, 3, 7, a, b, g0, g + 1, dots[1]);
    group(g, dots[0]);
    group(g + 1, dots[1]);
  }
  if (g < g1) {
    INT8SERVE_AMX_GEMM_PRODUCTS(0, 1, 6, a, b, g0, g, dots[0]);
    group(g, dots[0]);
  }
#define INT8SERVE_AMX_STORE_RUN(o) _mm512_store_ps(keep + (o) * kTileRows, r##o);
  INT8SERVE_AMX_16(INT8SERVE_AMX_STORE_RUN)
#undef INT8SERVE_AMX_STORE_RUN
}

// Rows [r_begin, r_end) of the call over tile `tile`: y gets their outputs of the tile. room: inner and acc, 64 floats
// a row each, for the rows rounded up to a register block; signed_weights: kAmxGemmGroups x kGroupBytes.
INT8SERVE_VNNI512 void gemm_amx_tile(const TileArgs& base, int64_t r_begin, int64_t r_end, float* inner, float* acc,
                                     int8_t* signed_weights, int64_t tile) {
  const int64_t m = r_end - r_begin;
  const int64_t padded = (m + kAmxGemmRows - 1) / kAmxGemmRows * kAmxGemmRows;
  std::fill(acc, acc + padded * kTileRows, 0.0f);
  if (base.lay.span != 1) std::fill(inner, inner + padded * kTileRows, 0.0f);
  AmxGemmBlock a{base.lay, base.lay.tile(base.packed, tile), signed_weights, nullptr, nullptr, base.groups, nullptr,
                 nullptr};
  const __m512i flip = _mm512_set1_epi8(static_cast<char>(0x80));
  for (int64_t g0 = 0; g0 < base.groups; g0 += kAmxGemmGroups) {
    const int64_t g1 = std::min(base.groups, g0 + kAmxGemmGroups);
    for (int64_t g = g0; g < g1; ++g) {  // w + 128 -> w: the top bit of each byte flipped
      const uint8_t* from = a.lay.group(a.tile, g);
      int8_t* to = signed_weights + (g - g0) * kGroupBytes;
      for (int64_t i = 0; i < kGroupBytes; i += 64)
        _mm512_store_si512(to + i, _mm512_xor_si512(_mm512_load_si512(from + i), flip));
    }
    const NextKBlock next = next_kblock(a.lay, a.tile, g0, g1, padded / kAmxGemmRows);
    for (int64_t r0 = 0; r0 < padded; r0 += kAmxGemmRows) {
      if (INT8SERVE_AMX_GEMM_HINT) ask_for_share(next, r0 / kAmxGemmRows);
      const int64_t row = r_begin + r0;  // the call's row: int8 rows 2 row (high) and 2 row + 1 (low)
      a.xq = base.xq + row / kAmxGemmRows * base.groups * kAmxGemmGroupBytes;
      a.xscale = base.xscale + row / kAmxGemmRows * base.groups * kAmxGemmRows;
      a.acc = acc + r0 * kTileRows;
      a.inner = inner + r0 * kTileRows;
      for (int b = 0; b < kBlocks; ++b) {
        if (a.lay.span == 1)
          amx_gemm_block<true>(a, b, g0, g1);
        else
          amx_gemm_block<false>(a, b, g0, g1);
      }
    }
  }
  store_tile_rows(base, r_begin, m, tile, acc);
}

// gemv's body for the amx path with precise activations and at least kAmxGemmMinRows rows.
INT8SERVE_VNNI512 void gemm_exact_amx(const Activations& act, TileArgs base, int64_t m, int64_t tiles, int nthreads) {
  std::vector<float> row_storage;
  const AmxGemmRows rows = amx_gemm_rows(act, m, nthreads, row_storage);
  base.xq = rows.q;
  base.xscale = rows.scale;
  const int64_t chunk = gemm_chunk_rows(m, kAmxGemmChunkRows, kAmxGemmRows);
  const int64_t room = chunk * kTileRows;  // floats: a multiple of 64, so every row's sums stay 64-byte aligned
  const int64_t weight_room = kAmxGemmGroups * kGroupBytes / static_cast<int64_t>(sizeof(float));
  const int64_t per_thread = 2 * room + weight_room;
  std::vector<float> storage(static_cast<size_t>(nthreads * per_thread + 16));
  float* aligned = aligned64(storage);
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {
    float* mine = aligned + omp_get_thread_num() * per_thread;
    int8_t* signed_weights = reinterpret_cast<int8_t*>(mine + 2 * room);
    amx_gemm_configure();
    for (int64_t r_begin = 0; r_begin < m; r_begin += chunk) {
#pragma omp for schedule(static) nowait
      for (int64_t tile = 0; tile < tiles; ++tile)
        gemm_amx_tile(base, r_begin, std::min(m, r_begin + chunk), mine, mine + room, signed_weights, tile);
    }
    tiles_release();  // other code on this thread (oneDNN, the bf16 kernel) configures the tiles its own way
  }
}

using TileRows = void (*)(const TileArgs&, int64_t, int64_t);
using ChunkRows = void (*)(const TileArgs&, int64_t, int64_t, int64_t, int64_t, float*);

// The paths that take a tile a chunk of groups at a time (see kChunkGroups), else nullptr.
ChunkRows chunk_rows(Impl impl) {
  switch (impl) {
    case kVnni512: return rows_vnni512;
    default: return nullptr;
  }
}

TileRows tile_rows(Impl impl) {
  switch (impl) {
    case kAvxVnni: return rows_avxvnni;
    case kAvx2: return rows_avx2;
    default: return tile_scalar;
  }
}

// ---- dequantization (the dense path's weight) ----

constexpr int64_t kStreamBytes = int64_t{32} << 20;  // the L3 cache of the EPYCs we measured on

struct DequantArgs {
  packed::Layout lay;
  const uint8_t* packed;
  int64_t n, k, groups;
  void* out;
  bool bf16;
  bool stream;  // write `out` with non-temporal stores (see i8s_dequant)
};

// One weight row's group g (count <= 32 values): out = (w - 128) * scale, in fp32 (exact) or rounded to bf16.
void dequant_group_scalar(const DequantArgs& a, int64_t tile, int64_t row, int64_t g) {
  const int64_t b = row / kBlockRows, lane = row % kBlockRows, r = tile * kTileRows + row;
  const uint8_t* w = a.lay.tile(a.packed, tile);
  const float scale = bf16_to_float(a.lay.scales(w, g / a.lay.span)[row]);
  const uint8_t* src = a.lay.group(w, g) + b * kBlockBytes + lane * 4;
  const int64_t count = std::min(kGroup, a.k - g * kGroup);
  float values[kGroup];
  for (int64_t s = 0; s < kSteps; ++s)
    for (int64_t j = 0; j < 4; ++j)
      values[s * 4 + j] = static_cast<float>(static_cast<int32_t>(src[s * 64 + j]) - 128) * scale;
  if (a.bf16) {
    uint16_t* dst = static_cast<uint16_t*>(a.out) + r * a.k + g * kGroup;
    for (int64_t i = 0; i < count; ++i) dst[i] = float_to_bf16(values[i]);
  } else {
    std::memcpy(static_cast<float*>(a.out) + r * a.k + g * kGroup, values, static_cast<size_t>(count) * 4);
  }
}

void dequant_tile_scalar(const DequantArgs& a, int64_t tile) {
  const int64_t rows = std::min(kTileRows, a.n - tile * kTileRows);
  for (int64_t row = 0; row < rows; ++row)
    for (int64_t g = 0; g < a.groups; ++g) dequant_group_scalar(a, tile, row, g);
}

// 8 rows x 32 k of a block (8 loads of 8 dwords, one per row, each 4 consecutive k) -> 8 registers of 32 bytes, one
// row's k 0..31 each: an 8 x 8 transpose of dwords.
INT8SERVE_AVX2 inline void transpose8x8_epi32(__m256i v[8]) {
  __m256i a[8], b[8];
  for (int i = 0; i < 4; ++i) {
    a[2 * i] = _mm256_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
    a[2 * i + 1] = _mm256_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
  }
  for (int i = 0; i < 2; ++i) {
    b[4 * i + 0] = _mm256_unpacklo_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 1] = _mm256_unpackhi_epi64(a[4 * i], a[4 * i + 2]);
    b[4 * i + 2] = _mm256_unpacklo_epi64(a[4 * i + 1], a[4 * i + 3]);
    b[4 * i + 3] = _mm256_unpackhi_epi64(a[4 * i + 1], a[4 * i + 3]);
  }
  for (int r = 0; r < 4; ++r) {
    v[r] = _mm256_permute2x128_si256(b[r], b[4 + r], 0x20);
    v[r + 4] = _mm256_permute2x128_si256(b[r], b[4 + r], 0x31);
  }
}

// The same arithmetic as dequant_group_scalar (an exact product, then the same round-to-nearest-even to bf16), 8 rows
// of a whole group at a time; partial groups (k not a multiple of 32) and rows past n go to the scalar version.
INT8SERVE_AVX2 void dequant_tile_avx2(const DequantArgs& a, int64_t tile) {
  const int64_t rows = std::min(kTileRows, a.n - tile * kTileRows);
  const uint8_t* w = a.lay.tile(a.packed, tile);
  const __m256i bias = _mm256_set1_epi32(128), round = _mm256_set1_epi32(0x7FFF), one = _mm256_set1_epi32(1);
  const int64_t full_groups = a.k / kGroup;
  const bool stream = a.stream;
  const auto store = [stream](__m256i* dst, __m256i v) INT8SERVE_AVX2 {
    if (stream)
      _mm256_stream_si256(dst, v);
    else
      _mm256_storeu_si256(dst, v);
  };
  for (int64_t g = 0; g < full_groups; ++g) {
    // the next group's lines (and the 128 bytes after it: a weight group's scales, packed_layout.h). The hardware
    // prefetcher alone fell behind once the scales moved into the stream: 11008 x 4096 into bf16 on a Sapphire Rapids
    // (2 threads, 8 copies in turn) took 7.2-7.9 ms against 6.3-6.6 with the scales in an array of their own, and
    // takes 5.7-5.9 ms with this hint (one group ahead; two or four: 6.1-6.2).
    if (g + 1 < a.groups) {
      const char* next = reinterpret_cast<const char*>(a.lay.group(w, g + 1));
      for (int64_t line = 0; line < kGroupBytes + packed::kScaleBytes; line += 64)
        _mm_prefetch(next + line, _MM_HINT_T0);
    }
    const uint16_t* scales = a.lay.scales(w, g / a.lay.span);
    for (int64_t b = 0; b < kBlocks; ++b) {
      for (int64_t half = 0; half < 2; ++half) {
        const int64_t row0 = b * kBlockRows + 8 * half;
        if (row0 + 8 > rows) {
          for (int64_t row = row0; row < std::min(rows, row0 + 8); ++row) dequant_group_scalar(a, tile, row, g);
          continue;
        }
        __m256i v[8];
        const uint8_t* src = a.lay.group(w, g) + b * kBlockBytes + 32 * half;
        for (int s = 0; s < 8; ++s) v[s] = _mm256_load_si256(reinterpret_cast<const __m256i*>(src + s * 64));
        transpose8x8_epi32(v);
        // the 8 rows' scales in one load (fp32 from bf16: the bits shifted up), each broadcast from the register
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(scales + row0));
        const __m256 row_scales = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(raw), 16));
        for (int i = 0; i < 8; ++i) {
          const int64_t row = row0 + i, r = tile * kTileRows + row;
          const __m256 scale = _mm256_permutevar8x32_ps(row_scales, _mm256_set1_epi32(i));
          alignas(32) uint8_t bytes[32];
          _mm256_store_si256(reinterpret_cast<__m256i*>(bytes), v[i]);
          __m256 values[4];
          for (int q = 0; q < 4; ++q) {
            const __m256i wide = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes + 8 * q)));
            values[q] = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(wide, bias)), scale);
          }
          if (a.bf16) {
            uint16_t* dst = static_cast<uint16_t*>(a.out) + r * a.k + g * kGroup;
            for (int q = 0; q < 4; q += 2) {
              __m256i half16[2];
              for (int j = 0; j < 2; ++j) {
                const __m256i bits = _mm256_castps_si256(values[q + j]);
                const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), one);
                half16[j] = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, round), lsb), 16);
              }
              const __m256i packed16 = _mm256_permute4x64_epi64(_mm256_packus_epi32(half16[0], half16[1]), 0xD8);
              store(reinterpret_cast<__m256i*>(dst + 8 * q), packed16);
            }
          } else {
            float* dst = static_cast<float*>(a.out) + r * a.k + g * kGroup;
            for (int q = 0; q < 4; ++q) store(reinterpret_cast<__m256i*>(dst + 8 * q), _mm256_castps_si256(values[q]));
          }
        }
      }
    }
  }
  for (int64_t g = full_groups; g < a.groups; ++g)
    for (int64_t row = 0; row < rows; ++row) dequant_group_scalar(a, tile, row, g);
  _mm_sfence();  // the streamed stores are visible before this tile's task ends
}

}  // namespace

extern "C" {

#define INT8SERVE_API __attribute__((visibility("default")))

// Bumped whenever a signature below changes; kernels/gemv.py checks it.
INT8SERVE_API int i8s_abi_version() { return 8; }

// 1 if this CPU can run path `impl` (1 vnni512, 2 avxvnni, 3 avx2, 4 scalar, 5 amx), else 0; impl 0: the path auto
// picks.
INT8SERVE_API int i8s_cpu_has(int impl) { return impl == kAuto ? static_cast<int>(best_impl()) : static_cast<int>(cpu_has(static_cast<Impl>(impl))); }

// Below this many multiply-adds (activation rows, precise passes included, x padded weights) a gemv runs on the
// calling thread. Waking a second thread for a few microseconds of work gains nothing when the machine is quiet and,
// when the other core is busy, the parallel region waits for it: SmolLM2-135M (layers of 0.1-0.9 M weights, 211
// calls a token) decoded at ~100 ms a token with 2 threads on 2 loaded cores against ~25 ms with 1 (each of its layer
// calls 14-25 us alone on 1 thread, no faster on 2). Every 7B-shape call (>= 16.8 M) and SmolLM2's output head
// (28 M) stay parallel.
constexpr int64_t kParallelGemvWork = int64_t{1} << 22;

// y [M, N] = x [M, K] (fp32, contiguous) times the packed weight (packed_layout.h, 64-byte aligned, its bf16 scales
// within); group_size: input values per weight scale (a multiple of 32), 0 = one per row. impl: 0 = best available,
// else the path (see i8s_cpu_has). precise: 1 = two int8 rows per row, combined (see quantize and TileArgs).
// i8s_gemv's body: see there for what it returns.
static int gemv(const float* x, int64_t m, int64_t k, const uint8_t* packed, int64_t n,
                int64_t group_size, float* y, int impl, int precise, int threads) {
  if (m < 0 || k <= 0 || n <= 0 || impl < kAuto || impl > kLastImpl || group_size < 0 || group_size % kGroup != 0)
    return -3;
  const Impl path = resolve(impl);
  if (!cpu_has(path)) return -1;
  if (reinterpret_cast<uintptr_t>(packed) % 64 != 0) return -2;
  if (m == 0) return 0;
  const int64_t np = (n + kTileRows - 1) / kTileRows * kTileRows;
  const bool pairs = precise != 0;
  const Activations act = quantize(x, m, k, path, pairs, threads);
  const int64_t per_output = pairs ? 2 : 1;  // int8 rows per output row
  const int64_t rows_total = per_output * m;
  const int64_t tiles = np / kTileRows;
  TileArgs base{packed::layout(act.groups, group_size), packed, nullptr, nullptr, nullptr, nullptr, act.kp,
                act.groups, n, pairs, true, true, nullptr};
  // amx: up to 4 int8 rows (one token, or two, with precise activations) vnni512's single pass over each tile is the
  // faster (Sapphire Rapids, streamed weights: 1 row 26.0 vs 25.4 GB/s, 2 rows 24.2-25.1 vs 23.7-23.8); beyond, it
  // needs two passes or more where the tiles take 16 rows at once (4 rows: 18.0-18.2 vs 22.9-23.0). Since
  // tile_amx_span1 the tiles at 2 and 4 int8 rows measured 1.00-1.04x the vnni512 pass (the same CPU model,
  // gemv_builds.py, three runs of 7-11 rounds, the 7B decode shapes and the output head): within the noise, kept.
  const bool amx_tiles = path == kAmx && rows_total > kMaxRows;
  const Impl kernel = path == kAmx ? kVnni512 : path;
  const bool wide = pairs && takes_wide_rows(kernel, m);  // precise rows as 16-bit integers (tile_avx2_wide)
  const bool dot = kernel == kAvxVnni;  // 16-bit rows with vpdpwssd (else vpmaddwd + vpaddd)
  const ChunkRows chunked = amx_tiles ? nullptr : chunk_rows(kernel);
  const TileRows run = amx_tiles ? tile_amx : !wide ? tile_rows(kernel) : dot ? rows_wide<true> : rows_wide<false>;
  // Each thread takes a contiguous range of tiles, i.e. one sequential stream of weights, and runs all activation
  // rows over each tile (in passes of up to 4 rows, or of 4 output rows with pairs; vnni512 a chunk of groups at a
  // time, see kChunkGroups) while it is in cache. A small call stays on the calling thread (see kParallelGemvWork);
  // the split never changes the result (each tile is computed alike).
  const bool small = rows_total * np * act.kp < kParallelGemvWork;
  const int nthreads = small ? 1 : static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, tiles)));
  if (pairs && path == kAmx && m >= kAmxGemmMinRows) {  // the same, on AMX tiles
    base.y = y;
    gemm_exact_amx(act, base, m, tiles, nthreads);
    return 0;
  }
  if (pairs && kernel == kVnni512 && !amx_tiles && m >= kExactGemmMinRows) {  // the same, on vnni512
    base.y = y;
    gemm_exact_vnni512(act, base, m, tiles, nthreads);
    return 0;
  }
  if (wide && m >= kWideGemmMinRows) {  // a prefill chunk: the register-blocked GEMM, the same bits
    base.y = y;
    if (dot)
      gemm_wide16<true>(act, base, m, tiles, nthreads);
    else
      gemm_wide16<false>(act, base, m, tiles, nthreads);
    return 0;
  }
  // int8 rows a pass (even with pairs): with pairs, 4 output rows on the 16-bit paths and on vnni512 (whose 8 int8 rows
  // in one pass, against two passes of 4 over each chunk, on a Zen 4, 2 threads, streamed weights,
  // benchmarks/gemv_builds.py against 1a9f4fc, three runs: 3 precise rows 1.04-1.31x, 4 rows 1.07-1.22x; 1 and 2 rows
  // alike)
  const int64_t pass_rows = amx_tiles ? kAmxMaxRows : wide || (pairs && kernel == kVnni512) ? 2 * kMaxRows : kMaxRows;
  // the far and L2 hints: for every call of more than one pass, and for single passes unless the CPU is AMD's
  const bool single_pass_hints = !cpu_is_amd();
  base.far_hint = rows_total > kMaxRows || setting_or_rule(INT8SERVE_FAR_HINT_SINGLE_PASS, single_pass_hints);
  base.l2_hint = rows_total > kMaxRows || INT8SERVE_L2_HINT_ALWAYS || single_pass_hints;
  // One pass of rows takes each tile whole; more take it kChunkGroups groups at a time, every pass over a chunk
  // before the next chunk (the weights stream from memory at one pace, and each chunk is read from memory once).
  const int64_t chunk = rows_total > pass_rows ? kChunkGroups : act.groups;
  std::vector<float> sums(chunked ? static_cast<size_t>(nthreads * rows_total * kSumFloats) : 0);
  const auto pass_args = [&](int64_t r0) {  // the arguments of the pass of int8 rows r0..
    TileArgs a = base;
    a.xq = act.q.data() + r0 * act.kp;
    a.xscale = act.scale.data() + r0 * act.groups;
    a.xcorr = act.corr.data() + r0 * act.groups;
    if (wide) a.xwide = act.wide.data() + (r0 / 2) * act.kp;
    a.y = y + (r0 / per_output) * n;
    return a;
  };
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
  {
    int64_t configured = 0;  // amx: the rows the tiles of this thread are configured for (0: not yet)
    float* mine = chunked ? sums.data() + omp_get_thread_num() * rows_total * kSumFloats : nullptr;
#pragma omp for schedule(static)
    for (int64_t tile = 0; tile < tiles; ++tile) {
      if (chunked) {
        std::fill(mine, mine + rows_total * kSumFloats, 0.0f);
        for (int64_t g0 = 0; g0 < act.groups; g0 += chunk) {
          const int64_t g1 = std::min(act.groups, g0 + chunk);
          for (int64_t r0 = 0; r0 < rows_total; r0 += pass_rows)
            chunked(pass_args(r0), std::min(pass_rows, rows_total - r0), tile, g0, g1,
                    mine + (r0 / per_output) * kSumFloats);
        }
        continue;
      }
      for (int64_t r0 = 0; r0 < rows_total; r0 += pass_rows) {
        const int64_t rows = std::min(pass_rows, rows_total - r0);
        if (amx_tiles && rows != configured) amx_configure(configured = rows);
        run(pass_args(r0), rows, tile);
      }
    }
    if (configured) tiles_release();  // other code on this thread (oneDNN) configures the tiles its own way
  }
  return 0;
}

// y [M, N] = x [M, K] (fp32, contiguous) times the packed weight, as described above. Returns 0, or -1 if the CPU
// lacks the path, -2 for a misaligned weight, -3 for bad arguments, -4 when its buffers (the quantized rows, the
// running sums: a few bytes per input value and row) do not fit in memory. Thread-safe.
INT8SERVE_API int i8s_gemv(const float* x, int64_t m, int64_t k, const uint8_t* packed,
                           int64_t n, int64_t group_size, float* y, int impl, int precise, int threads) {
  try {  // (every allocation is made outside the parallel region, so that a failure reaches this handler)
    return gemv(x, m, k, packed, n, group_size, y, impl, precise, threads);
  } catch (const std::bad_alloc&) {
    return -4;
  }
}

// The activations as path `impl` quantizes them: q [M, Kp] int8, scale [M, Kp/32] fp32; with precise, 2M rows of
// each (q_hi, q_lo of each row, see quantize). Returns 0, -1 (the CPU lacks the path) or -4 (out of memory).
INT8SERVE_API int i8s_quantize(const float* x, int64_t m, int64_t k, int8_t* q, float* scale, int impl, int precise) {
  const Impl path = resolve(impl);
  if (impl < kAuto || impl > kLastImpl || !cpu_has(path)) return -1;
  try {
    const Activations act = quantize(x, m, k, path, precise != 0, 1);
    std::memcpy(q, act.q.data(), act.q.size());
    std::memcpy(scale, act.scale.data(), act.scale.size() * sizeof(float));
  } catch (const std::bad_alloc&) {
    return -4;
  }
  return 0;
}

// int8 [N, K] (contiguous) and its bf16 scales ([N, weight groups], the bits) -> dst: the packed layout above,
// uint8 [tiles x tile bytes] (packed_layout.h; N padded to 64 rows and K to 32 columns with zero weights and zero
// scales, the unused groups of a last weight group zero weights too).
INT8SERVE_API void i8s_pack(const int8_t* src, int64_t n, int64_t k, const uint16_t* scales, int64_t group_size,
                            uint8_t* dst, int threads) {
  const int64_t np = (n + kTileRows - 1) / kTileRows * kTileRows;
  const int64_t groups = (k + kGroup - 1) / kGroup;
  const packed::Layout lay = packed::layout(groups, group_size);
  const int64_t tiles = np / kTileRows;
  const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, tiles)));
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    uint8_t* t = dst + tile * lay.tile_bytes();
    for (int64_t g = groups; g < lay.wgroups * lay.span; ++g)  // the unused room of a last weight group: zero weights
      std::memset(const_cast<uint8_t*>(lay.group(t, g)), 0x80, static_cast<size_t>(kGroupBytes));
    for (int64_t g = 0; g < groups; ++g) {
      uint8_t* o = const_cast<uint8_t*>(lay.group(t, g));
      for (int64_t b = 0; b < kBlocks; ++b)
        for (int64_t s = 0; s < kSteps; ++s)
          for (int64_t row = 0; row < kBlockRows; ++row, o += 4) {
            const int64_t r = tile * kTileRows + b * kBlockRows + row, c = g * kGroup + s * 4;
            uint32_t word = 0;  // four zero weights
            if (r < n && c + 4 <= k) {
              std::memcpy(&word, src + r * k + c, 4);
            } else if (r < n) {
              for (int64_t j = 0; j < 4 && c + j < k; ++j) word |= uint32_t(uint8_t(src[r * k + c + j])) << (8 * j);
            }
            word ^= 0x80808080u;  // w + 128 in each byte
            std::memcpy(o, &word, 4);
          }
    }
    for (int64_t wg = 0; wg < lay.wgroups; ++wg) {
      uint16_t* o = const_cast<uint16_t*>(lay.scales(t, wg));
      for (int64_t row = 0; row < kTileRows; ++row) {
        const int64_t r = tile * kTileRows + row;
        o[row] = r < n ? scales[r * lay.wgroups + wg] : uint16_t{0};
      }
    }
  }
}

// The dense weight back from the packed layout: out [N, K] = w * wscale, as fp32 (exact: 8-bit x 8-bit mantissas)
// or, with bf16 = 1, rounded to nearest-even bf16 (uint16), the same bits as torch's bf16 multiply of the two.
// What the prefill path multiplies with, written into its reused buffer; one tile per task. impl: as i8s_gemv's;
// every vector path uses the AVX2 code (the same bits as the scalar one). Returns 0, -1 or -3 as i8s_gemv.
INT8SERVE_API int i8s_dequant(const uint8_t* packed, int64_t n, int64_t k, int64_t group_size,
                              void* out, int bf16, int impl, int threads) {
  if (n <= 0 || k <= 0 || group_size < 0 || group_size % kGroup != 0 || impl < kAuto || impl > kLastImpl) return -3;
  const Impl path = resolve(impl);
  if (!cpu_has(path)) return -1;
  const int64_t np = (n + kTileRows - 1) / kTileRows * kTileRows;
  const int64_t kp = (k + kGroup - 1) / kGroup * kGroup;
  const int64_t groups = kp / kGroup, tiles = np / kTileRows;
  // A buffer larger than the caches is streamed to memory without reading its lines first (non-temporal stores, 2x
  // faster on the 7B shapes); a smaller one stays in the cache for the matmul that follows. Streaming needs 32-byte
  // aligned rows: the prefill path's buffer is 64-byte aligned, and its rows are multiples of 32 bytes when K is.
  const int64_t row_bytes = k * (bf16 ? 2 : 4);
  const bool stream = reinterpret_cast<uintptr_t>(out) % 32 == 0 && row_bytes % 32 == 0 && n * row_bytes >= kStreamBytes;
  const DequantArgs args{packed::layout(groups, group_size), packed, n, k, groups, out, bf16 != 0, stream};
  const bool vector = path != kScalar;
  const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, tiles)));
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    if (vector)
      dequant_tile_avx2(args, tile);
    else
      dequant_tile_scalar(args, tile);
  }
  return 0;
}

}  // extern "C"
