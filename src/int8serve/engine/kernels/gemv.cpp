// int8 weight x int8 activation matrix-vector products for decode (a few activation rows; more rows are taken 4 at a
// time over each tile while it is in cache), fp32 accumulation and output.
//
// y[m, n] = wscale[n] * sum_g xscale[m, g] * sum_{k in group g} w[n, k] * xq[m, k]
//
// Activations are quantized here, per row in groups of 32 values (one fp32 scale per group, round to nearest even);
// with `precise` each row is quantized twice, the row and its quantization error, and the two outputs are added.
// Weights are int8 with one fp32 scale per output row, repacked once (see kernels/__init__.py, pack_weight) into
// tiles of 64 output rows:
//
//   packed[tile][group][block][step][row][byte] = w[64 * tile + 16 * block + row, 32 * group + 4 * step + byte] + 128
//          N/64   K/32    4      8     16   4
//
// so one 64-byte load holds 4 consecutive k of 16 output rows. `vpdpbusd` (unsigned x signed bytes, 4 products
// summed into each int32 lane) then multiplies those with 4 activation bytes broadcast to every lane: each lane
// accumulates one output row, no horizontal sums are needed, and one activation scale per group applies to all 16
// lanes. The weights are stored as w + 128 (unsigned) so that the activations can be the signed operand; the excess
// 128 * sum(xq of the group) is the same for every output row and is subtracted exactly by starting the group's
// int32 accumulator at -128 * sum(xq). The group's int32 dot product is exact (|dot| <= 32 * 127 * 127 < 2^24,
// so its conversion to fp32 is exact too), then acc = fma(float(dot), xscale, acc) in group order, then
// y = acc * wscale. Every path (AVX-512 VNNI, scalar) performs exactly these roundings in this order for every
// output, so results are bitwise identical across paths and independent of how many rows are in the call.
//
// Plain C ABI (loaded with ctypes, see __init__.py), no torch headers: it compiles in about a second and does not
// depend on torch's version or C++ ABI. Threads: OpenMP with the count the caller passes (torch.get_num_threads());
// torch's own libgomp is already loaded when this library is, so both share one OpenMP runtime.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;                       // activation values sharing one scale
constexpr int64_t kBlockRows = 16;                   // output rows in one vector of int32 lanes
constexpr int64_t kBlocks = 4;                       // blocks per tile
constexpr int64_t kTileRows = kBlockRows * kBlocks;  // 64
constexpr int64_t kSteps = kGroup / 4;               // 8 loads of 64 bytes per block and group
constexpr int64_t kBlockBytes = kBlockRows * kGroup; // 512
constexpr int64_t kGroupBytes = kTileRows * kGroup;  // 2048
constexpr int64_t kMaxRows = 4;                      // activation rows per pass over a tile

bool cpu_has_vnni() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
  }();
  return has;
}

// Quantized activations: xq [M, Kp] int8 (zero padded), xscale [M, G] fp32, xcorr [M, G] = -128 * sum(xq of group).
struct Activations {
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<int32_t> corr;
  int64_t kp = 0;
  int64_t groups = 0;
};

// Per group of 32: d = max|x| / 127, q = round-half-even(x * (1 / d)) clamped to [-127, 127]; zero padding past k.
// The scalar path's version; quantize_row_avx512 performs the same IEEE operations, so both give the same bits.
void quantize_row(const float* x, int64_t k, int64_t groups, int8_t* q, float* scale, int32_t* corr) {
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t begin = g * kGroup;
    const int64_t end = std::min(begin + kGroup, k);
    float amax = 0.0f;
    for (int64_t i = begin; i < end; ++i) amax = std::max(amax, std::fabs(x[i]));
    const float d = amax / 127.0f;
    const float inv = d > 0.0f ? 1.0f / d : 0.0f;
    int32_t sum = 0;
    for (int64_t i = begin; i < begin + kGroup; ++i) {
      int32_t v = 0;
      if (i < end) {
        v = static_cast<int32_t>(std::nearbyint(x[i] * inv));
        v = std::min(127, std::max(-127, v));
      }
      q[i] = static_cast<int8_t>(v);
      sum += v;
    }
    scale[g] = d;
    corr[g] = -128 * sum;
  }
}

#define INT8SERVE_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))

// quantize_row with AVX-512 (the scalar one calls libm's nearbyint per value: 40 us per 4096 values, more than
// the rest of a small call).
INT8SERVE_VNNI void quantize_row_avx512(const float* x, int64_t k, int64_t groups, int8_t* q, float* scale,
                                        int32_t* corr) {
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t begin = g * kGroup;
    const int64_t count = std::min(kGroup, k - begin);
    const __mmask16 m0 = count >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
    const __mmask16 m1 = count >= 32 ? __mmask16(0xFFFF) : count <= 16 ? __mmask16(0) : __mmask16((1u << (count - 16)) - 1);
    const __m512 v0 = _mm512_maskz_loadu_ps(m0, x + begin);
    const __m512 v1 = _mm512_maskz_loadu_ps(m1, x + begin + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1)));
    const float d = amax / 127.0f;
    const float inv = d > 0.0f ? 1.0f / d : 0.0f;
    const __m512 vinv = _mm512_set1_ps(inv);
    __m512i i0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, vinv));  // MXCSR default: round half to even
    __m512i i1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, vinv));
    i0 = _mm512_min_epi32(_mm512_max_epi32(i0, lo), hi);
    i1 = _mm512_min_epi32(_mm512_max_epi32(i1, lo), hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + begin), _mm512_cvtepi32_epi8(i0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q + begin + 16), _mm512_cvtepi32_epi8(i1));
    scale[g] = d;
    corr[g] = -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
  }
}

// Quantize M rows. precise: 2 int8 rows per input row, the row (2r) and what its quantization left over (2r + 1),
// so that x = scale_hi * q_hi + scale_lo * q_lo to about 1/(254 * 254) of each group's largest value; the kernel
// then runs 2M rows and adds each pair of outputs.
Activations quantize(const float* x, int64_t m, int64_t k, bool vnni, bool precise) {
  Activations a;
  const int64_t rows = precise ? 2 * m : m;
  a.kp = (k + kGroup - 1) / kGroup * kGroup;
  a.groups = a.kp / kGroup;
  a.q.assign(static_cast<size_t>(rows * a.kp), 0);
  a.scale.assign(static_cast<size_t>(rows * a.groups), 0.0f);
  a.corr.assign(static_cast<size_t>(rows * a.groups), 0);
  auto row = vnni ? quantize_row_avx512 : quantize_row;
  std::vector<float> residual(precise ? static_cast<size_t>(k) : 0);
  for (int64_t r = 0; r < rows; ++r) {
    const float* source = x + (precise ? r / 2 : r) * k;
    if (precise && r % 2 == 1) {  // the previous row's quantization error, in plain fp32 (no fma: -ffp-contract=off)
      const int8_t* q = a.q.data() + (r - 1) * a.kp;
      const float* scale = a.scale.data() + (r - 1) * a.groups;
      for (int64_t i = 0; i < k; ++i) residual[i] = source[i] - scale[i / kGroup] * static_cast<float>(q[i]);
      source = residual.data();
    }
    row(source, k, a.groups, a.q.data() + r * a.kp, a.scale.data() + r * a.groups, a.corr.data() + r * a.groups);
  }
  return a;
}

struct TileArgs {
  const uint8_t* packed;  // the whole packed weight
  const float* wscale;    // [Np]
  const int8_t* xq;       // first activation row of this pass
  const float* xscale;
  const int32_t* xcorr;
  int64_t kp, groups, n;
  float* y;               // first output row of this pass
};

// ---- scalar path: the reference arithmetic, also used where the CPU lacks AVX-512 VNNI ----

void tile_scalar(const TileArgs& a, int64_t rows, int64_t tile) {
  const uint8_t* w = a.packed + tile * a.groups * kGroupBytes;
  for (int64_t r = 0; r < rows; ++r) {
    float acc[kTileRows] = {};
    const int8_t* xq = a.xq + r * a.kp;
    for (int64_t g = 0; g < a.groups; ++g) {
      int32_t dot[kTileRows];
      for (int64_t i = 0; i < kTileRows; ++i) dot[i] = a.xcorr[r * a.groups + g];
      const uint8_t* wg = w + g * kGroupBytes;
      for (int64_t b = 0; b < kBlocks; ++b) {
        for (int64_t s = 0; s < kSteps; ++s) {
          const uint8_t* v = wg + b * kBlockBytes + s * 64;
          const int8_t* xs = xq + g * kGroup + s * 4;
          for (int64_t lane = 0; lane < kBlockRows; ++lane) {
            int32_t sum = 0;
            for (int64_t j = 0; j < 4; ++j) sum += static_cast<int32_t>(v[lane * 4 + j]) * xs[j];
            dot[b * kBlockRows + lane] += sum;
          }
        }
      }
      const float scale = a.xscale[r * a.groups + g];
      for (int64_t i = 0; i < kTileRows; ++i) acc[i] = std::fma(static_cast<float>(dot[i]), scale, acc[i]);
    }
    const int64_t n0 = tile * kTileRows;
    const int64_t count = std::min(kTileRows, a.n - n0);
    float* out = a.y + r * a.n + n0;
    for (int64_t i = 0; i < count; ++i) out[i] = acc[i] * a.wscale[n0 + i];
  }
}

// ---- AVX-512 VNNI path ----

// R activation rows (1..4) over one tile, reading its bytes strictly in memory order: group by group, block by
// block, 64 bytes at a time. (Interleaving the 4 blocks of a group, to load each activation broadcast once for
// all of them, halved the speed from memory at M = 1: the hardware prefetcher wants one sequential stream.)
template <int R>
INT8SERVE_VNNI void tile_vnni(const TileArgs& a, int64_t tile) {
  const uint8_t* w = a.packed + tile * a.groups * kGroupBytes;
  __m512 acc[R][kBlocks];
  for (int r = 0; r < R; ++r)
    for (int b = 0; b < kBlocks; ++b) acc[r][b] = _mm512_setzero_ps();
  for (int64_t g = 0; g < a.groups; ++g) {
    const uint8_t* wg = w + g * kGroupBytes;
    for (int b = 0; b < kBlocks; ++b) {
      __m512i dot[R];
      for (int r = 0; r < R; ++r) dot[r] = _mm512_set1_epi32(a.xcorr[r * a.groups + g]);
      for (int s = 0; s < kSteps; ++s) {
        const __m512i v = _mm512_load_si512(static_cast<const void*>(wg + b * kBlockBytes + s * 64));
        for (int r = 0; r < R; ++r) {
          int32_t x4;
          std::memcpy(&x4, a.xq + r * a.kp + g * kGroup + s * 4, 4);
          dot[r] = _mm512_dpbusd_epi32(dot[r], v, _mm512_set1_epi32(x4));
        }
      }
      for (int r = 0; r < R; ++r) {
        const __m512 xscale = _mm512_set1_ps(a.xscale[r * a.groups + g]);
        acc[r][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[r]), xscale, acc[r][b]);
      }
    }
  }
  const int64_t n0 = tile * kTileRows;
  for (int b = 0; b < kBlocks; ++b) {
    const int64_t nb = n0 + b * kBlockRows;
    if (nb >= a.n) break;
    const int64_t count = std::min(kBlockRows, a.n - nb);
    const __mmask16 mask = count == kBlockRows ? __mmask16(0xFFFF) : __mmask16((1u << count) - 1);
    const __m512 ws = _mm512_loadu_ps(a.wscale + nb);  // wscale is padded to a whole tile
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(a.y + r * a.n + nb, mask, _mm512_mul_ps(acc[r][b], ws));
  }
}

INT8SERVE_VNNI void tile_vnni_rows(const TileArgs& a, int64_t rows, int64_t tile) {
  switch (rows) {
    case 1: tile_vnni<1>(a, tile); break;
    case 2: tile_vnni<2>(a, tile); break;
    case 3: tile_vnni<3>(a, tile); break;
    default: tile_vnni<4>(a, tile); break;
  }
}

bool use_vnni(int impl) { return impl == 0 ? cpu_has_vnni() : impl == 1; }

}  // namespace

extern "C" {

#define INT8SERVE_API __attribute__((visibility("default")))

// Bumped whenever a signature below changes; __init__.py checks it.
INT8SERVE_API int i8s_abi_version() { return 3; }

INT8SERVE_API int i8s_has_vnni() { return cpu_has_vnni() ? 1 : 0; }

// y [M, N] = x [M, K] (fp32, contiguous) times the packed weight (uint8 [Np * Kp], 64-byte aligned) and its fp32
// scales (padded to Np). impl: 0 = best available, 1 = AVX-512 VNNI, 2 = scalar. precise: 1 = two int8 passes per
// row (see quantize). Returns 0, or -1 if VNNI is asked for and missing, -2 for a misaligned weight, -3 for bad
// sizes. Thread-safe.
INT8SERVE_API int i8s_gemv(const float* x, int64_t m, int64_t k, const uint8_t* packed, const float* wscale, int64_t n,
                           float* y, int impl, int precise, int threads) {
  if (impl == 1 && !cpu_has_vnni()) return -1;
  if (reinterpret_cast<uintptr_t>(packed) % 64 != 0) return -2;
  if (m < 0 || k <= 0 || n <= 0 || impl < 0 || impl > 2) return -3;
  if (m == 0) return 0;
  const bool vnni = use_vnni(impl);
  const int64_t np = (n + kTileRows - 1) / kTileRows * kTileRows;
  const Activations act = quantize(x, m, k, vnni, precise != 0);
  const int64_t rows_total = precise ? 2 * m : m;
  std::vector<float> pairs(precise ? static_cast<size_t>(rows_total * n) : 0);
  float* out = precise ? pairs.data() : y;
  const int64_t tiles = np / kTileRows;
  const TileArgs base{packed, wscale, nullptr, nullptr, nullptr, act.kp, act.groups, n, nullptr};
  // Each thread takes a contiguous range of tiles, i.e. one sequential stream of weights, and runs all
  // activation rows over each tile (in passes of up to 4 rows) while it is in cache.
  const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, tiles)));
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    for (int64_t r0 = 0; r0 < rows_total; r0 += kMaxRows) {
      const int64_t rows = std::min(kMaxRows, rows_total - r0);
      TileArgs a = base;
      a.xq = act.q.data() + r0 * act.kp;
      a.xscale = act.scale.data() + r0 * act.groups;
      a.xcorr = act.corr.data() + r0 * act.groups;
      a.y = out + r0 * n;
      if (vnni) {
        tile_vnni_rows(a, rows, tile);
      } else {
        tile_scalar(a, rows, tile);
      }
    }
  }
  if (precise) {
    for (int64_t r = 0; r < m; ++r)
      for (int64_t i = 0; i < n; ++i) y[r * n + i] = pairs[2 * r * n + i] + pairs[(2 * r + 1) * n + i];
  }
  return 0;
}

// The activations as the kernel quantizes them: q [M, Kp] int8, scale [M, Kp/32] fp32. Returns 0 or -1 (no VNNI).
INT8SERVE_API int i8s_quantize(const float* x, int64_t m, int64_t k, int8_t* q, float* scale, int impl) {
  if (impl == 1 && !cpu_has_vnni()) return -1;
  const Activations act = quantize(x, m, k, use_vnni(impl), false);
  std::memcpy(q, act.q.data(), act.q.size());
  std::memcpy(scale, act.scale.data(), act.scale.size() * sizeof(float));
  return 0;
}

// int8 [N, K] (contiguous) -> out: the packed layout above, uint8 [Np * Kp] (N padded to 64 rows and K to 32
// columns with zero weights).
INT8SERVE_API void i8s_pack(const int8_t* src, int64_t n, int64_t k, uint8_t* dst, int threads) {
  const int64_t np = (n + kTileRows - 1) / kTileRows * kTileRows;
  const int64_t kp = (k + kGroup - 1) / kGroup * kGroup;
  const int64_t tiles = np / kTileRows;
  const int nthreads = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, tiles)));
#pragma omp parallel for schedule(static) num_threads(nthreads) if (nthreads > 1)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    uint8_t* o = dst + tile * kTileRows * kp;
    for (int64_t g = 0; g < kp / kGroup; ++g)
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
}

}  // extern "C"
