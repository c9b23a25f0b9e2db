// The feed-forward's gate of int8 models, element by element in one pass: out = silu(gate) * up, in fp32,
//
//   silu(g) = g / (1 + exp(-g)),   exp by range reduction (n = nearest integer of x log2 e, r = x - n ln 2 in two
//   steps) and Cephes' degree-5 polynomial for exp(r), then * 2^n; arguments clamped to [-87, 88] (|error| ~1 ulp).
//
// Why: torch's SiLU computes the last few elements of a call (and of each thread's share) with a scalar exp that
// rounds differently from its vector exp, so the model called it row by row to keep a row's bits independent of the
// rows with it (model.silu_rows): 512 calls a layer for a 512-token chunk, ~6 ms against ~2 for one call on the 7B
// shape, and a separate pass for the product with `up`. Here every element goes through the same operations whatever
// its position, on every path (avx512, avx2 and scalar perform the same IEEE operations in the same order: fma,
// nearest-even conversion, division), so the result of an element depends on its two inputs only.
//
// And RMSNorm of int8 models, row by row: out = weight * (x * r), r = 1 / sqrt(sum(x * x) / dim + eps), where the
// sum of squares runs in 8 lanes (lane j adds x[i] * x[i] for i = j mod 8, in order, a product and an add each, no
// fma) and the 8 lane sums are added in a fixed order at the end. Why: torch's RMSNorm is six ops a row (pow, mean,
// add, rsqrt, two products), each a dispatch; a 7B decode step makes 65 of them, each ~30 us alone and ~60 us right
// after a linear has streamed its weights through the caches. Every path adds in that order, so a row's result is
// the same on every path and whatever rows come with it (a prefill chunk's rows as decode computes them).
//
// Decode plans (decode_plan.py) call the two over a whole step's rows at once: silu_mul over rows that sit apart in
// memory (gate and up of a row side by side in the stacked projection's output), and RMSNorm after the residual add
// in the same pass (x += delta, then the norm of the new x: the add is one IEEE operation, as torch's add_, so the
// bits are those of the two apart).
//
// Plain C ABI, built and loaded like gemv.cpp (kernels/builds.py: build(); kernels/library.py: ctypes).

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace {

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2Hi = 0.693359375f;       // ln 2 = kLn2Hi + kLn2Lo, kLn2Hi exact in few bits
constexpr float kLn2Lo = -2.12194440e-4f;
constexpr float kMin = -87.0f, kMax = 88.0f;  // 2^n stays a normal float
constexpr float kP[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                         4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
// Below these many elements a call runs on one thread. In a decode plan the calls come between parallel int8 linears,
// whose threads are still awake: the 7B shape's 4-row step (SiLU 44032 elements, RMSNorm 16384) spent 1.17x less time
// in these calls with both threads than below 65536 on one (AMD EPYC Zen 4, 2 threads, the two builds alternating in
// one process, 12 rounds); 1 row, under both thresholds, 1.03x. (-DINT8SERVE_SILU_PARALLEL=N and
// -DINT8SERVE_NORM_PARALLEL=N build others.)
#ifndef INT8SERVE_SILU_PARALLEL
#define INT8SERVE_SILU_PARALLEL 16384
#endif
#ifndef INT8SERVE_NORM_PARALLEL
#define INT8SERVE_NORM_PARALLEL 8192
#endif
constexpr int64_t kParallelSiluElements = INT8SERVE_SILU_PARALLEL;
constexpr int64_t kParallelNormElements = INT8SERVE_NORM_PARALLEL;

enum Impl { kAuto = 0, kAvx512 = 1, kAvx2 = 2, kScalar = 3 };

float exp_scalar(float x) {
  x = std::min(kMax, std::max(kMin, x));
  const float n = std::nearbyint(x * kLog2e);
  float r = std::fma(-n, kLn2Hi, x);
  r = std::fma(-n, kLn2Lo, r);
  float p = kP[0];
  for (int i = 1; i < 6; ++i) p = std::fma(p, r, kP[i]);
  const float y = std::fma(p, r * r, r) + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return y * scale;
}

void silu_mul_scalar(const float* gate, const float* up, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = gate[i] / (1.0f + exp_scalar(-gate[i])) * up[i];
}

__attribute__((target("avx512f"))) __m512 exp16(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(kMax), _mm512_max_ps(_mm512_set1_ps(kMin), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_setzero_ps(), n), _mm512_set1_ps(kLn2Hi), x);
  r = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_setzero_ps(), n), _mm512_set1_ps(kLn2Lo), r);
  __m512 p = _mm512_set1_ps(kP[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(kP[i]));
  const __m512 y = _mm512_add_ps(_mm512_fmadd_ps(p, _mm512_mul_ps(r, r), r), _mm512_set1_ps(1.0f));
  const __m512i bits = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(y, _mm512_castsi512_ps(bits));
}

__attribute__((target("avx512f"))) void silu_mul_avx512(const float* gate, const float* up, float* out, int64_t n) {
  const __m512 one = _mm512_set1_ps(1.0f), zero = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 mask = n - i >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (n - i)) - 1);
    const __m512 g = _mm512_maskz_loadu_ps(mask, gate + i);
    const __m512 s = _mm512_div_ps(g, _mm512_add_ps(one, exp16(_mm512_sub_ps(zero, g))));
    _mm512_mask_storeu_ps(out + i, mask, _mm512_mul_ps(s, _mm512_maskz_loadu_ps(mask, up + i)));
  }
}

__attribute__((target("avx2,fma"))) __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(kMax), _mm256_max_ps(_mm256_set1_ps(kMin), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(kLog2e)), _MM_FROUND_TO_NEAREST_INT |
                                                                             _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_setzero_ps(), n), _mm256_set1_ps(kLn2Hi), x);
  r = _mm256_fmadd_ps(_mm256_sub_ps(_mm256_setzero_ps(), n), _mm256_set1_ps(kLn2Lo), r);
  __m256 p = _mm256_set1_ps(kP[0]);
  for (int i = 1; i < 6; ++i) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(kP[i]));
  const __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(bits));
}

__attribute__((target("avx2,fma"))) void silu_mul_avx2(const float* gate, const float* up, float* out, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  const int64_t full = n / 8 * 8;
  for (int64_t i = 0; i < full; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 s = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, g))));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(s, _mm256_loadu_ps(up + i)));
  }
  silu_mul_scalar(gate + full, up + full, out + full, n - full);  // the same operations, one at a time
}

constexpr int kLanes = 8;  // RMSNorm's partial sums of squares

// The 8 lane sums of RMSNorm, added in the fixed order every path uses.
float lane_total(const float* lanes) {
  return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}

void rms_norm_scalar(const float* x, const float* weight, float* out, int64_t dim, float eps) {
  float lanes[kLanes] = {};
  for (int64_t i = 0; i < dim; ++i) {
    const float square = x[i] * x[i];
    lanes[i % kLanes] = lanes[i % kLanes] + square;
  }
  const float r = 1.0f / std::sqrt(lane_total(lanes) / static_cast<float>(dim) + eps);
  for (int64_t i = 0; i < dim; ++i) out[i] = weight[i] * (x[i] * r);
}

// (the AVX-512 path runs this too: 8 lanes are the order every path keeps)
__attribute__((target("avx2"))) void rms_norm_avx2(const float* x, const float* weight, float* out, int64_t dim,
                                                   float eps) {
  const int64_t full = dim / kLanes * kLanes;
  __m256 sums = _mm256_setzero_ps();
  for (int64_t i = 0; i < full; i += kLanes) {
    const __m256 v = _mm256_loadu_ps(x + i);
    sums = _mm256_add_ps(sums, _mm256_mul_ps(v, v));
  }
  alignas(32) float lanes[kLanes];
  _mm256_store_ps(lanes, sums);
  for (int64_t i = full; i < dim; ++i) {  // the tail: lanes 0.. in order, as the scalar path adds them
    const float square = x[i] * x[i];
    lanes[i - full] = lanes[i - full] + square;
  }
  const float r = 1.0f / std::sqrt(lane_total(lanes) / static_cast<float>(dim) + eps);
  const __m256 rv = _mm256_set1_ps(r);
  for (int64_t i = 0; i < full; i += kLanes)
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_loadu_ps(weight + i), _mm256_mul_ps(_mm256_loadu_ps(x + i), rv)));
  for (int64_t i = full; i < dim; ++i) out[i] = weight[i] * (x[i] * r);
}

// x += delta (one rounded add an element, stored), then out = RMSNorm(x), for one row.
template <void (*kNorm)(const float*, const float*, float*, int64_t, float)>
void add_rms_norm(float* x, const float* delta, const float* weight, float* out, int64_t dim, float eps) {
  for (int64_t i = 0; i < dim; ++i) x[i] = x[i] + delta[i];  // (vectorized by the compiler: the same IEEE adds)
  kNorm(x, weight, out, dim, eps);
}

bool cpu_has(Impl impl) {
  __builtin_cpu_init();
  switch (impl) {
    case kAvx512: return __builtin_cpu_supports("avx512f");
    case kAvx2: return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    case kScalar: return true;
    default: return false;
  }
}

Impl resolve(int impl) {
  if (impl != kAuto) return static_cast<Impl>(impl);
  for (Impl candidate : {kAvx512, kAvx2})
    if (cpu_has(candidate)) return candidate;
  return kScalar;
}

}  // namespace

#define I8E_API extern "C" __attribute__((visibility("default")))

I8E_API int i8e_abi_version() { return 3; }

// The path `impl` (0 auto) resolves to on this CPU, or -1 if the CPU cannot run it.
I8E_API int i8e_resolve(int impl) {
  if (impl < kAuto || impl > kScalar) return -1;
  const Impl path = resolve(impl);
  return cpu_has(path) ? path : -1;
}

// For r < rows and i < n: out[r * out_stride + i] = silu(gate[r * in_stride + i]) * up[r * in_stride + i] (out may
// be gate or up). Each row is cut into whole vectors, one piece per thread, the pieces of all rows shared out
// statically. Status: 0 ok, -1 the CPU cannot run `impl`, -3 bad sizes.
I8E_API int i8e_silu_mul_rows(const float* gate, const float* up, float* out, int64_t rows, int64_t n,
                              int64_t in_stride, int64_t out_stride, int impl, int threads) {
  if (i8e_resolve(impl) < 0) return -1;
  if (rows < 0 || n < 0 || (rows > 1 && (in_stride < n || out_stride < n))) return -3;
  const Impl path = resolve(impl);
  const auto run = path == kAvx512 ? silu_mul_avx512 : path == kAvx2 ? silu_mul_avx2 : silu_mul_scalar;
  const int64_t per_row = rows * n < kParallelSiluElements ? 1 : std::max(1, threads);
  const int64_t piece = (n / per_row + 15) / 16 * 16;  // whole vectors: a thread's share never splits one
  const int64_t pieces = rows * per_row;
#pragma omp parallel for schedule(static) num_threads(threads) if (per_row > 1)
  for (int64_t t = 0; t < pieces; ++t) {
    const int64_t r = t / per_row, p = t % per_row;
    const int64_t begin = std::min(n, p * piece), end = p + 1 == per_row ? n : std::min(n, (p + 1) * piece);
    run(gate + r * in_stride + begin, up + r * in_stride + begin, out + r * out_stride + begin, end - begin);
  }
  return 0;
}

// out[i] = silu(gate[i]) * up[i] for i < n (out may be gate or up). Status: 0 ok, -1 the CPU cannot run `impl`.
I8E_API int i8e_silu_mul(const float* gate, const float* up, float* out, int64_t n, int impl, int threads) {
  if (n < 0) return -1;
  return i8e_silu_mul_rows(gate, up, out, 1, n, n, n, impl, threads);
}

// out[r] = RMSNorm of row r of x [rows, dim] with `weight` [dim] (see the top of this file); out may be x. Status: 0
// ok, -1 the CPU cannot run `impl`, -3 bad sizes.
I8E_API int i8e_rms_norm(const float* x, const float* weight, float* out, int64_t rows, int64_t dim, float eps,
                         int impl, int threads) {
  if (i8e_resolve(impl) < 0) return -1;
  if (rows < 0 || dim <= 0) return -3;
  const auto run = resolve(impl) == kScalar ? rms_norm_scalar : rms_norm_avx2;
  const bool parallel = threads > 1 && rows > 1 && rows * dim >= kParallelNormElements;
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
  for (int64_t r = 0; r < rows; ++r) run(x + r * dim, weight, out + r * dim, dim, eps);
  return 0;
}

// x += delta, then out = RMSNorm of each row of the new x, for x, delta, out [rows, dim] (a decode plan's residual
// add and the next norm, one pass). out must not overlap x or delta. Status as i8e_rms_norm.
I8E_API int i8e_add_rms_norm(float* x, const float* delta, const float* weight, float* out, int64_t rows,
                             int64_t dim, float eps, int impl, int threads) {
  if (i8e_resolve(impl) < 0) return -1;
  if (rows < 0 || dim <= 0) return -3;
  const auto run = resolve(impl) == kScalar ? add_rms_norm<rms_norm_scalar> : add_rms_norm<rms_norm_avx2>;
  const bool parallel = threads > 1 && rows > 1 && rows * dim >= kParallelNormElements;
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
  for (int64_t r = 0; r < rows; ++r) run(x + r * dim, delta + r * dim, weight, out + r * dim, dim, eps);
  return 0;
}
