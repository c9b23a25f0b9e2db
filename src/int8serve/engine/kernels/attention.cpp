// Decode attention for a whole batch in one call: every row (one new token of one sequence) applies its rotary
// embedding, writes its key and value into its own cache slot and attends over its own positions [0, pos].
// Several rows may share a slot at distinct positions (the rows of a prefill chunk, computed exactly as decode steps
// would compute them one by one): every row's key and value are written first, then each row attends over [0, pos].
//
// Why a kernel: the torch version loops over rows in Python and converts each row's whole cache slice to fp32 before
// two small matmuls; padding the rows to one length would change each row's reduction lengths, and so its bits,
// with what else is in the batch. Here one task = (row, kv head), computed by one thread from start to end in a fixed
// order that depends only on that row's data, so a row's output is bitwise the same whatever else is in the batch,
// however many threads run and whichever thread takes the task. (A decode row's task takes up to 4 kv heads and
// reads them side by side, see kHeadsTogether: each head's operations stay those of the head alone.)
//
// Per task, for the G = H / Hkv query heads that share the kv head:
//   rope:   q' = q * cos[pos] + rotate_half(q) * sin[pos] (and k'), as three separately rounded fp32 operations,
//           exactly like model.apply_rope, so the key written here has the bits the torch path would write;
//   cache:  k', v rounded to the cache's dtype (round to nearest even, as torch) at [slot, kv head, pos];
//   scores: s[l] = dot(q', key[l]) * scale for l in [0, pos], fp32 accumulation;
//   softmax: p[l] = exp(s[l] - max s), sum in fp32;
//   output: out = (sum_l p[l] * value[l]) / sum, fp32.
// Cache dtypes: fp32, bf16, fp16, and int8 rows with a scale per 32 values (see "int8 cache rows"). Paths: AVX-512
// (16 lanes, masked tails), AVX2+FMA+F16C (8 lanes, head_dim a multiple of 8), scalar; chosen at run time
// from the CPU's flags. The vector paths sum in another order than the scalar one, so paths differ in the last bits;
// each path on its own is deterministic. head_dim > 128 takes the scalar path.
//
// Plain C ABI for ctypes, no torch headers (see kernels/library.py); OpenMP threads as the caller asks.

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "prefetch.h"

namespace {

enum Impl { kAuto = 0, kAvx512 = 1, kAvx2 = 2, kScalar = 3 };
enum Dtype { kF32 = 0, kBF16 = 1, kF16 = 2, kInt8 = 3 };  // kInt8: int8 rows (q8_width)
struct Half {  // an IEEE fp16 value
  uint16_t bits;
};
constexpr int64_t kMaxVectorDim = 128;

// The heads of one row that a task attends side by side, at most kMaxHeadsTogether (see heads_together): each one's
// query (after rope), keys and values (its [slot, kv head] of the cache), scores (len + 16 floats) and output.
// Why: a head's keys (then values) are one stream of a few hundred KB, and one thread reading one stream at a time
// left bandwidth unused. The vector paths now compute the scores of 4 keys of each head in turn, and the weighted sum
// a value row of each head in turn, so that each thread has kHeadsTogether streams in flight. A read-only loop over a
// batch-4 step's bf16 caches (Sapphire Rapids, 2 threads) streamed 25 GB/s one stream a thread, 27 two, 29 four.
// The same CPU (2026-12-04, benchmarks/attention_builds.py, 12 rounds in random order, same bits), 4 kv heads a task
// against 1: avx512, batch 1 at 512 1.16x, 4 rows at 512/384/256/128 1.14x, at 1020-960 1.07x, at 80-83 1.14x (2
// heads: 1.12x, 1.11x, 1.03x, 1.09x); the avx2 path on the same CPU 1.20x, 1.21x, 1.15x, although its 4 heads' 64
// query and 64 sum registers of 8 lanes do not fit in 16 (the compiler keeps them in L1). Int8 rows, the same
// measurement: avx512 1.24x, 1.17x, 1.27x, 1.16x (2 heads 1.15x, 1.16x, 1.15x, 1.09x); avx2 1.25x, 1.21x, 1.23x.
// 8 heads a task (an ad-hoc build, avx512, bf16, 12 rounds): 1.01x at 4 rows of 512-128, 1.00x at batch 1: not kept.
// On an AMD EPYC Zen 4 (2026-12-04, the same measurement), where one stream a thread already comes near the memory's
// speed: avx512 bf16 1.01x, 1.02x, 0.99x, int8 1.06x, 1.08x, 1.02x; avx2 bf16 1.04x, 1.04x, 0.99x, int8 1.00x, 1.07x,
// 0.95x (the first three cases; that 0.95x within the run's noise): no CPU loses by it, so 4 on every CPU.
// -DINT8SERVE_ATTENTION_HEADS_TOGETHER=1 builds the code that reads one head at a time.
constexpr int kMaxHeadsTogether = 4;
#ifndef INT8SERVE_ATTENTION_HEADS_TOGETHER
#define INT8SERVE_ATTENTION_HEADS_TOGETHER 4
#endif
constexpr int64_t kHeadsTogether = INT8SERVE_ATTENTION_HEADS_TOGETHER;
static_assert(kHeadsTogether >= 1 && kHeadsTogether <= kMaxHeadsTogether, "1 to 4 heads side by side");
template <class T>
struct Heads {
  int n;
  const float* q[kMaxHeadsTogether];
  const T* keys[kMaxHeadsTogether];
  const T* values[kMaxHeadsTogether];
  float* scores[kMaxHeadsTogether];
  float* out[kMaxHeadsTogether];
  Heads one(int i) const { return {1, {q[i]}, {keys[i]}, {values[i]}, {scores[i]}, {out[i]}}; }
};

template <class T>
using HeadFn = void (*)(const Heads<T>&, int64_t len, int64_t dim, float scale);

// A path that attends one head at a time, as a function of Heads.
template <class T, void (*kHead)(const float*, const T*, const T*, int64_t, int64_t, float, float*, float*)>
void one_by_one(const Heads<T>& hs, int64_t len, int64_t dim, float scale) {
  for (int n = 0; n < hs.n; ++n) kHead(hs.q[n], hs.keys[n], hs.values[n], len, dim, scale, hs.scores[n], hs.out[n]);
}

// hs.n heads by a path's code for 4, 2 and 1 heads side by side (3 = 2 + 1).
template <class T, HeadFn<T> kFour, HeadFn<T> kTwo, HeadFn<T> kOne>
void by_fours(const Heads<T>& hs, int64_t len, int64_t dim, float scale) {
  switch (hs.n) {
    case 4: return kFour(hs, len, dim, scale);
    case 3: kTwo(hs, len, dim, scale); return kOne(hs.one(2), len, dim, scale);
    case 2: return kTwo(hs, len, dim, scale);
    default: return kOne(hs, len, dim, scale);
  }
}

bool cpu_has_avx512() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl");
  }();
  return has;
}

bool cpu_has_avx2() {
  static const bool has = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  }();
  return has;
}

// fp32 -> bf16, round to nearest even; NaN -> quiet NaN (c10::BFloat16's rounding).
inline uint16_t to_bf16(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  if (std::isnan(value)) return 0x7FC0;
  bits += 0x7FFF + ((bits >> 16) & 1);
  return static_cast<uint16_t>(bits >> 16);
}

inline float from_bf16(uint16_t value) {
  const uint32_t bits = static_cast<uint32_t>(value) << 16;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

inline float bits_to_float(uint32_t bits) {
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

inline uint32_t float_to_bits(float value) {
  uint32_t bits;
  std::memcpy(&bits, &value, 4);
  return bits;
}

// fp32 -> fp16, IEEE round to nearest even (the FP16 library's branch-free conversion, as torch's c10::Half).
inline Half to_half(float value) {
  float base = (std::fabs(value) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = float_to_bits(value);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = bits_to_float((bias >> 1) + 0x07800000u) + base;
  const uint32_t bits = float_to_bits(base);
  const uint32_t nonsign = ((bits >> 13) & 0x00007C00u) + (bits & 0x00000FFFu);
  return Half{static_cast<uint16_t>((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign))};
}

inline float from_half(Half value) {
  const uint32_t w = static_cast<uint32_t>(value.bits) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = bits_to_float((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = bits_to_float((two_w >> 17) | (126u << 23)) - 0.5f;
  return bits_to_float(sign | float_to_bits(two_w < (1u << 27) ? denormalized : normalized));
}

inline float load_scalar(const float* p) { return *p; }
inline float load_scalar(const Half* p) { return from_half(*p); }
// fp16 caches take values beyond fp16's range as +-65504 (NaN stays NaN), as model.write_rows does: an infinity would
// make every later score of its row NaN.
inline void store_scalar(Half* p, float v) { *p = to_half(std::fabs(v) > 65504.0f ? std::copysign(65504.0f, v) : v); }
inline float load_scalar(const uint16_t* p) { return from_bf16(*p); }
inline void store_scalar(float* p, float v) { *p = v; }
inline void store_scalar(uint16_t* p, float v) { *p = to_bf16(v); }

// out[d] = x[d] * cos[d] + rotate_half(x)[d] * sin[d]; rotate_half(x) = [-x[half:], x[:half]].
void rope(const float* x, const float* cos, const float* sin, int64_t dim, float* out) {
  const int64_t half = dim / 2;
  for (int64_t d = 0; d < dim; ++d) {
    const float rotated = d < half ? -x[d + half] : x[d - half];
    const float a = x[d] * cos[d];
    const float b = rotated * sin[d];
    out[d] = a + b;
  }
}

// ---- scalar path -------------------------------------------------------------------------------------------------

template <class T>
void scores_scalar(const float* q, const T* keys, int64_t len, int64_t dim, float scale, float* s) {
  for (int64_t l = 0; l < len; ++l) {
    float acc = 0.0f;
    for (int64_t d = 0; d < dim; ++d) acc += q[d] * load_scalar(keys + l * dim + d);  // no fma: a libm call here
    s[l] = acc * scale;
  }
}

float softmax_scalar(float* s, int64_t len) {  // s <- exp(s - max), returns the sum
  float top = s[0];
  for (int64_t l = 1; l < len; ++l) top = std::max(top, s[l]);
  float sum = 0.0f;
  for (int64_t l = 0; l < len; ++l) {
    s[l] = std::exp(s[l] - top);
    sum += s[l];
  }
  return sum;
}

// The weighted sum in pieces, so that attend_rows can take the values a block at a time: acc[d] += p[l] * value[l][d]
// over a range of l (acc waits in memory between the pieces), then out = acc * inv_sum. A decode step's
// weighted_sum_* is the two over every l, from zeros: each path's pieces run the same operations in the same order.
template <class T>
void accumulate_scalar(const float* p, const T* values, int64_t len, int64_t dim, float* acc) {
  for (int64_t l = 0; l < len; ++l)
    for (int64_t d = 0; d < dim; ++d) acc[d] += p[l] * load_scalar(values + l * dim + d);
}

void finish_scalar(const float* acc, int64_t dim, float inv_sum, float* out) {
  for (int64_t d = 0; d < dim; ++d) out[d] = acc[d] * inv_sum;
}

template <class T>
void weighted_sum_scalar(const float* p, const T* values, int64_t len, int64_t dim, float inv_sum, float* out) {
  std::fill(out, out + dim, 0.0f);
  accumulate_scalar(p, values, len, dim, out);
  finish_scalar(out, dim, inv_sum, out);
}

template <class T>
void head_scalar(const float* q, const T* keys, const T* values, int64_t len, int64_t dim, float scale,
                 float* scratch, float* out) {
  scores_scalar(q, keys, len, dim, scale, scratch);
  const float sum = softmax_scalar(scratch, len);
  weighted_sum_scalar(scratch, values, len, dim, 1.0f / sum, out);
}

// ---- int8 cache rows ------------------------------------------------------------------------------------------
//
// An int8 cache (INT8SERVE_KV_CACHE=int8, kv_int8.py) holds each key and value as one row of bytes: head_dim int8
// values, then, from the next multiple of 4 bytes, one fp32 scale per group of kQ8Group values (the last group may be
// shorter); value[d] = int8[d] * scale[d / kQ8Group]. A 7B head of 128: 144 bytes a row against 256 in bf16. Each group
// is quantized on its own, symmetric: scale = max |x| / 127, int8 = round half to even (x / scale); a group of zeros
// gets scale 0 and zeros, and a NaN that the division makes is stored as 0 (kv_int8.quantize does the same in torch,
// bit for bit).
constexpr int64_t kQ8Group = 32;

inline int64_t q8_scales_at(int64_t dim) { return (dim + 3) / 4 * 4; }
inline int64_t q8_groups(int64_t dim) { return (dim + kQ8Group - 1) / kQ8Group; }
inline int64_t q8_width(int64_t dim) { return q8_scales_at(dim) + 4 * q8_groups(dim); }

// Elements from one cache row to the next: head_dim, or an int8 row's bytes.
template <class T>
inline int64_t row_width(int64_t dim) {
  if constexpr (std::is_same_v<T, int8_t>) return q8_width(dim);
  return dim;
}

inline float q8_scale(const int8_t* row, int64_t dim, int64_t group) {
  float scale;
  std::memcpy(&scale, row + q8_scales_at(dim) + 4 * group, 4);
  return scale;
}

void q8_store(const float* x, int64_t dim, int8_t* row) {
  for (int64_t g = 0; g < q8_groups(dim); ++g) {
    const int64_t begin = g * kQ8Group, end = std::min(dim, begin + kQ8Group);
    float top = 0.0f;
    for (int64_t d = begin; d < end; ++d) top = std::max(top, std::fabs(x[d]));  // (a NaN never wins: top stays)
    const float scale = top / 127.0f;
    for (int64_t d = begin; d < end; ++d) {
      const float r = scale > 0.0f ? std::nearbyint(x[d] / scale) : 0.0f;
      row[d] = static_cast<int8_t>(std::isnan(r) ? 0.0f : std::min(127.0f, std::max(-127.0f, r)));
    }
    std::memcpy(row + q8_scales_at(dim) + 4 * g, &scale, 4);
  }
}

// The scalar path on int8 rows: each value is int8 * scale (one rounding), then as scores_scalar and
// accumulate_scalar.
void scores_q8_scalar(const float* q, const int8_t* keys, int64_t len, int64_t dim, float scale, float* s) {
  const int64_t width = q8_width(dim);
  for (int64_t l = 0; l < len; ++l) {
    const int8_t* row = keys + l * width;
    float acc = 0.0f;
    for (int64_t d = 0; d < dim; ++d) acc += q[d] * (static_cast<float>(row[d]) * q8_scale(row, dim, d / kQ8Group));
    s[l] = acc * scale;
  }
}

void accumulate_q8_scalar(const float* p, const int8_t* values, int64_t len, int64_t dim, float* acc) {
  const int64_t width = q8_width(dim);
  for (int64_t l = 0; l < len; ++l) {
    const int8_t* row = values + l * width;
    for (int64_t d = 0; d < dim; ++d)
      acc[d] += p[l] * (static_cast<float>(row[d]) * q8_scale(row, dim, d / kQ8Group));
  }
}

void head_q8_scalar(const float* q, const int8_t* keys, const int8_t* values, int64_t len, int64_t dim, float scale,
                    float* scratch, float* out) {
  scores_q8_scalar(q, keys, len, dim, scale, scratch);
  const float sum = softmax_scalar(scratch, len);
  std::fill(out, out + dim, 0.0f);
  accumulate_q8_scalar(scratch, values, len, dim, out);
  finish_scalar(out, dim, 1.0f / sum, out);
}

// ---- AVX-512 path: 16 lanes, C chunks of 16 cover head_dim (the last one masked) ------------------------------

// The vector paths ask for a head's keys and values some rows before they read them, and for the first values while
// the scores are computed: each (row, kv head) task reads its own rows of the cache once, from memory, and the
// hardware prefetcher alone lagged (Sapphire Rapids, 2 threads, 4 rows at positions 64-95, bf16 caches of 32 layers
// in turn: avx512 277-287 us a call without the hints, 224-230 with them 16 rows ahead; the avx2 path on the same CPU
// 365-381 -> 258-259; 1 row 47-53 us either way). Farther is not better: a hint waits for a free L1 miss buffer, and
// a profile of the avx512 path at position 512 had 82% of its scores loop's time on the instruction after the hint.
// 4 rows ahead (1 KB of a bf16 head of 128), against 16 (the same CPU, 2026-12-03, the 32 layers' attention of a
// decode step, alternating builds): batch 1 at position 512 15.9 -> 14.6 ms, at 1024 32.0 -> 28.7, at 2000 59.5 ->
// 45.0; 4 rows at 512/384/256/128 41.1 -> 36.8; at 80-83 11.5 -> 11.9. The avx2 path on an AVX2-only AMD EPYC
// Zen 3 (2026-12-03, the same measurement, 8-10 alternating rounds): batch 1 at 512 11.1 -> 10.4 ms (1.07x), 4 rows
// at 512-128 31.1 -> 29.1, at 2000 44.4 -> 42.6, at 80 3.1 -> 3.0; 8 rows ahead was between the two. On an AMD EPYC
// Zen 4 (2026-12-04, bf16, 32 layers, 16 alternating rounds, against 4 rows): 8 rows ahead 1.01-1.02x at 4 rows of
// 512-128, 1.02-1.03x at batch 1, 0.99-1.05x at 4 rows of 1020 in two runs; 16 rows 0.98-1.01x. Kept at 4.
// (-DINT8SERVE_ATTENTION_ROWS_AHEAD=N builds another distance.)
#ifndef INT8SERVE_ATTENTION_ROWS_AHEAD
#define INT8SERVE_ATTENTION_ROWS_AHEAD 4
#endif
constexpr int64_t kRowsAhead = INT8SERVE_ATTENTION_ROWS_AHEAD;
// Besides, the vector paths ask for rows kL2RowsAhead ahead into L2 (a hint that does not wait on L1's miss buffers
// for its line to arrive), over one stream per head: its keys, then on into its values, so that the first values are
// on their way while the last keys are read; a head's first kL2RowsAhead rows are asked for as it starts. AMD EPYC
// Zen 4, 2 threads, bf16 caches, the 32 layers' attention of a decode step, alternating builds, 16 rounds a run (the
// medians of the per-round ratios; the machine's noise moved single rounds by 0.9-1.3x): 32 rows ahead (8 KB of a
// bf16 head of 128) against none, avx512, 4 rows at positions 512/384/256/128 1.06-1.08x in five runs and 1.01x in a
// sixth, batch 1 at 512 1.02-1.13x in four; the avx2 path on the same CPU 1.02x and 1.02x; 64 rows ahead 1.04x
// (4 rows) and 1.00-1.15x (batch 1), 16 rows 1.04x and 1.05x. On a Sapphire Rapids an earlier form (64 or 128 rows
// ahead, keys and values apart, no hints as a head starts) gained nothing; this one, against none (2026-12-04, the
// same measurement, 12 rounds in random order): 4 rows at 512/384/256/128 1.09x, batch 1 at 512 1.09x, 4 rows at
// 1020-960 1.05x; 64 rows ahead 0.98x, 0.98x, 1.00x of 32. Carrying the hints on past a task's last values into the
// first keys of the thread's next task (tasks dealt round-robin so that the next one is known): 0.93-0.99x, not kept.
// (-DINT8SERVE_ATTENTION_L2_ROWS_AHEAD=0 builds without them.)
#ifndef INT8SERVE_ATTENTION_L2_ROWS_AHEAD
#define INT8SERVE_ATTENTION_L2_ROWS_AHEAD 32
#endif
constexpr int64_t kL2RowsAhead = INT8SERVE_ATTENTION_L2_ROWS_AHEAD;

// Asks for the lines of rows [first, first + count) of a head's keys or values (no row at or past len).
template <class T, _mm_hint kHint = _MM_HINT_T0>
inline void prefetch_rows(const T* rows, int64_t first, int64_t count, int64_t len, int64_t dim) {
  const int64_t end = std::min(len, first + count);
  if (first >= end) return;
  const char* begin = reinterpret_cast<const char*>(rows + first * dim);
  const int64_t bytes = (end - first) * dim * static_cast<int64_t>(sizeof(T));
  for (int64_t at = 0; at < bytes; at += 64) ask_for_line<kHint>(begin + at);  // (prefetch.h: why not _mm_prefetch)
}

// The int8 cache's score loops go without hint_stream's L2 hints: since prefetch.h made those hints real (2026-12-05),
// its decode attention measured 0.95-1.00x with them on an AMD EPYC Zen 4 (benchmarks/attention_builds.py against
// 8fca354, avx512 and avx2 paths, the three cases, two runs), where the bf16 cache's measured 1.01-1.10x and keeps
// them.
constexpr bool kHintQ8Stream = false;

// The L2 hints for rows [first, first + count) of a head's stream of rows: its len keys, then its len values (row
// len + i of the stream is value i). values null: none (the rows of a prefill chunk, attend_rows, read each block
// of keys and values once from memory and then from L1 for every row: there the hints only cost instructions, the
// avx2 path's chunk attention 0.84-0.95x with them on a Zen 4, benchmarks/chunk_attention.py).
template <class T>
inline void hint_stream(const T* keys, const T* values, int64_t first, int64_t count, int64_t len, int64_t dim) {
  if (kL2RowsAhead <= 0 || values == nullptr) return;
  if constexpr (std::is_same_v<T, int8_t> && !kHintQ8Stream) return;  // the int8 cache's rows
  prefetch_rows<T, _MM_HINT_T1>(keys, first, count, len, dim);
  const int64_t begin = std::max(first, len), end = std::min(first + count, 2 * len);
  if (begin < end) prefetch_rows<T, _MM_HINT_T1>(values, begin - len, end - begin, len, dim);
}

// A decode task's N heads on a vector path, from its pieces: the scores (with the hints of the values), the softmax,
// the weighted sum from zeros (with L2 hints), and its scaling by 1 / the softmax's sum.
template <class T, int N, auto kScores, auto kSoftmax, auto kAccumulate, auto kFinish>
void attend_heads(const Heads<T>& hs, int64_t len, int64_t dim, float scale) {
  for (int n = 0; n < N; ++n) prefetch_rows(hs.values[n], 0, kRowsAhead, len, row_width<T>(dim));  // during scores
  kScores(hs.q, hs.keys, len, dim, scale, hs.scores, hs.values);
  float inv_sums[N];
  for (int n = 0; n < N; ++n) {
    inv_sums[n] = 1.0f / kSoftmax(hs.scores[n], len);
    std::fill(hs.out[n], hs.out[n] + dim, 0.0f);
  }
  kAccumulate(hs.scores, hs.values, len, dim, hs.out);
  for (int n = 0; n < N; ++n) kFinish(hs.out[n], dim, inv_sums[n], hs.out[n]);
}

// attend_rows takes this many (row, query head) pairs of a prefill chunk at once on the vector paths (the avx2 pieces
// say why: scores_pairs_avx2).
constexpr int64_t kPairsTogether = 4;

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,fma")
#pragma GCC diagnostic push  // GCC 12's AVX-512 headers use deliberately undefined operands (_mm256_undefined_pd)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// Tried on a Sapphire Rapids (2026-12-04, bf16, 32 layers, 12 rounds in random order) and not kept: a bf16 row's 64
// bytes as two vectors of 16 fp32, its even and odd values, by a shift and a mask (no vpmovzxwd), q split alike, and
// the scores of 16 keys summed in one shared tree of shuffles (each key's pairs as sum16's, the same bits alone or in
// a block): with the caches in L2 1.06x, from memory 0.91-0.98x; the scores alone that way 1.00-1.03x, the weighted
// sum alone (512-bit loads of the values) the slower part.
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const Half* p, __mmask16 m) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p)); }
inline __m512 load16(const uint16_t* p, __mmask16 m) {
  const __m512i wide = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(wide, 16));
}

// Horizontal sum and max in a fixed order.
inline float sum16(__m512 v) {
  const __m512 high = _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 s8 = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_castps512_ps256(high));
  const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(s8), _mm256_extractf128_ps(s8, 1));
  const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
  return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

inline float max16(__m512 v) {
  const __m512 high = _mm512_shuffle_f32x4(v, v, _MM_SHUFFLE(3, 2, 3, 2));
  const __m256 m8 = _mm256_max_ps(_mm512_castps512_ps256(v), _mm512_castps512_ps256(high));
  const __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
  const __m128 m2 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  return _mm_cvtss_f32(_mm_max_ss(m2, _mm_movehdup_ps(m2)));
}

// exp(x) for x <= 0 (Cephes' expf polynomial; ~1 ulp), 0 below -87.
inline __m512 exp16(__m512 x) {
  const __mmask16 tiny = _mm512_cmp_ps_mask(x, _mm512_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~tiny), _mm512_scalef_ps(p, n));
}

// N heads of one row (one len), each its own stream of keys, then values, read side by side: the scores of 4 keys of
// each head in turn, the weighted sum a value row of each in turn. Each head's operations and their order are those
// of the head alone (N = 1), so its bits do not depend on N. values (or null: no L2 hints): the heads' values, whose
// first rows are asked for as the last keys are read (hint_stream).
template <class T, int C, int N>
void scores_hinting_avx512(const float* const* q, const T* const* keys, int64_t len, int64_t dim, float scale,
                           float* const* s, const T* const* values) {
  const __mmask16 tail = static_cast<__mmask16>((1u << (dim - 16 * (C - 1))) - 1);
  __m512 qv[N][C];
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c) qv[n][c] = load16(q[n] + 16 * c, c == C - 1 ? tail : 0xFFFF);
  auto values_of = [&](int n) { return values == nullptr ? nullptr : values[n]; };
  int64_t l = 0;
  for (int n = 0; n < N; ++n) {
    prefetch_rows(keys[n], 0, kRowsAhead, len, dim);
    hint_stream(keys[n], values_of(n), kRowsAhead, kL2RowsAhead - kRowsAhead, len, dim);
  }
  for (; l + 4 <= len; l += 4) {  // 4 keys at a time: independent FMA chains
    for (int n = 0; n < N; ++n) {
      prefetch_rows(keys[n], l + kRowsAhead, 4, len, dim);
      hint_stream(keys[n], values_of(n), l + kL2RowsAhead, 4, len, dim);
      __m512 acc[4];
      for (int j = 0; j < 4; ++j) acc[j] = _mm512_setzero_ps();
      for (int c = 0; c < C; ++c) {
        const __mmask16 m = c == C - 1 ? tail : 0xFFFF;
        for (int j = 0; j < 4; ++j)
          acc[j] = _mm512_fmadd_ps(qv[n][c], load16(keys[n] + (l + j) * dim + 16 * c, m), acc[j]);
      }
      for (int j = 0; j < 4; ++j) s[n][l + j] = sum16(acc[j]) * scale;
    }
  }
  for (; l < len; ++l)
    for (int n = 0; n < N; ++n) {
      hint_stream(keys[n], values_of(n), l + kL2RowsAhead, 1, len, dim);
      __m512 acc = _mm512_setzero_ps();
      for (int c = 0; c < C; ++c)
        acc = _mm512_fmadd_ps(qv[n][c], load16(keys[n] + l * dim + 16 * c, c == C - 1 ? tail : 0xFFFF), acc);
      s[n][l] = sum16(acc) * scale;
    }
}

// The keys alone, without L2 hints (a piece of attend_rows).
template <class T, int C>
void scores_avx512(const float* q, const T* keys, int64_t len, int64_t dim, float scale, float* s) {
  scores_hinting_avx512<T, C, 1>(&q, &keys, len, dim, scale, &s, nullptr);
}

float softmax_avx512(float* s, int64_t len) {
  const __mmask16 tail = static_cast<__mmask16>((1u << (len % 16)) - 1);
  const int64_t full = len / 16 * 16;
  __m512 top = _mm512_set1_ps(-INFINITY);
  for (int64_t l = 0; l < full; l += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(s + l));
  if (tail) top = _mm512_mask_max_ps(top, tail, top, _mm512_maskz_loadu_ps(tail, s + full));
  const __m512 shift = _mm512_set1_ps(max16(top));
  __m512 sum = _mm512_setzero_ps();
  for (int64_t l = 0; l < full; l += 16) {
    const __m512 p = exp16(_mm512_sub_ps(_mm512_loadu_ps(s + l), shift));
    _mm512_storeu_ps(s + l, p);
    sum = _mm512_add_ps(sum, p);
  }
  if (tail) {
    const __m512 p = _mm512_maskz_mov_ps(tail, exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, s + full), shift)));
    _mm512_mask_storeu_ps(s + full, tail, p);
    sum = _mm512_add_ps(sum, p);
  }
  return sum16(sum);
}

// The weighted sum's pieces (see accumulate_scalar) for N heads side by side: the running sums in registers within a
// piece.
template <class T, int C, int N, bool kHintL2>  // kHintL2: a decode step's heads (hint_stream), not attend_rows
void accumulate_heads_avx512(const float* const* p, const T* const* values, int64_t len, int64_t dim,
                             float* const* acc) {
  const __mmask16 tail = static_cast<__mmask16>((1u << (dim - 16 * (C - 1))) - 1);
  __m512 sums[N][C];
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c) sums[n][c] = load16(acc[n] + 16 * c, c == C - 1 ? tail : 0xFFFF);
  for (int64_t l = 0; l < len; ++l)
    for (int n = 0; n < N; ++n) {
      prefetch_rows(values[n], l + kRowsAhead, 1, len, dim);
      if (kHintL2 && kL2RowsAhead > 0) prefetch_rows<T, _MM_HINT_T1>(values[n], l + kL2RowsAhead, 1, len, dim);
      const __m512 w = _mm512_set1_ps(p[n][l]);
      for (int c = 0; c < C; ++c)
        sums[n][c] = _mm512_fmadd_ps(w, load16(values[n] + l * dim + 16 * c, c == C - 1 ? tail : 0xFFFF), sums[n][c]);
    }
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c) _mm512_mask_storeu_ps(acc[n] + 16 * c, c == C - 1 ? tail : 0xFFFF, sums[n][c]);
}

template <class T, int C>  // one head, no L2 hints (a piece of attend_rows)
void accumulate_avx512(const float* p, const T* values, int64_t len, int64_t dim, float* acc) {
  accumulate_heads_avx512<T, C, 1, false>(&p, &values, len, dim, &acc);
}

// attend_rows' pieces for kPairsTogether pairs at once, as the avx2 path's (scores_pairs_avx2 says why): each key and
// value loaded (and widened) once for the four pairs, K keys x 4 pairs of independent score sums, the weighted sum 4
// chunks of 16 lanes at a time (16 running sums in registers); every score and running sum of a pair with
// scores_avx512's and accumulate_avx512's operations in their order (a row keeps its decode step's bits). AMD EPYC
// Zen 4, 2 threads, the 32 layers' attention of a 128-row chunk of the 7B shape against one pair at a time
// (benchmarks/chunk_attention.py, 2026-12-04): the scores alone 1.05-1.12x, the weighted sum alone 0.87x until its
// loop became a do-while (below), then both 1.25-1.36x.
template <class T, int C, int K>
inline void scores_of_keys_avx512(const float* const* q, const T* keys, int64_t l, int64_t dim, float scale,
                                  float* const* s) {
  const __mmask16 tail = static_cast<__mmask16>((1u << (dim - 16 * (C - 1))) - 1);
  __m512 acc[kPairsTogether][K];
  for (auto& pair : acc)
    for (auto& one : pair) one = _mm512_setzero_ps();
  for (int c = 0; c < C; ++c) {
    const __mmask16 m = c == C - 1 ? tail : 0xFFFF;
    __m512 key[K];
    for (int j = 0; j < K; ++j) key[j] = load16(keys + (l + j) * dim + 16 * c, m);
    for (int i = 0; i < kPairsTogether; ++i) {
      const __m512 qv = load16(q[i] + 16 * c, m);
      for (int j = 0; j < K; ++j) acc[i][j] = _mm512_fmadd_ps(qv, key[j], acc[i][j]);
    }
  }
  for (int i = 0; i < kPairsTogether; ++i)
    for (int j = 0; j < K; ++j) s[i][l + j] = sum16(acc[i][j]) * scale;
}

constexpr int kPairKeys512 = 2;  // keys a step of scores_pairs_avx512 (4 measured alike on a Zen 4: 0.97-1.01x)

template <class T, int C>
void scores_pairs_avx512(const float* const* q, const T* keys, int64_t len, int64_t dim, float scale,
                         float* const* s) {
  int64_t l = 0;
  for (; l + kPairKeys512 <= len; l += kPairKeys512)
    scores_of_keys_avx512<T, C, kPairKeys512>(q, keys, l, dim, scale, s);
  for (; l < len; ++l) scores_of_keys_avx512<T, C, 1>(q, keys, l, dim, scale, s);
}

// Chunks [C0, C0 + S) of the 4 pairs' running sums over values [0, len), len >= 1 (chunk C - 1 masked to the head's
// tail).
template <class T, int C, int C0, int S>
inline void accumulate_pairs_slice_avx512(const float* const* p, const T* values, int64_t len, int64_t dim,
                                          float* const* acc) {
  const __mmask16 tail = static_cast<__mmask16>((1u << (dim - 16 * (C - 1))) - 1);
  const auto mask = [tail](int c) { return C0 + c == C - 1 ? tail : __mmask16(0xFFFF); };  // chunk C0 + c's lanes
  __m512 sums[kPairsTogether][S];
  for (int i = 0; i < kPairsTogether; ++i)
    for (int c = 0; c < S; ++c) sums[i][c] = load16(acc[i] + 16 * (C0 + c), mask(c));
  int64_t l = 0;
  do {  // (len >= 1; with a for loop GCC kept the sums' home on the stack and stored every sum at every value, 0.87x)
    __m512 w[kPairsTogether];
    for (int i = 0; i < kPairsTogether; ++i) w[i] = _mm512_set1_ps(p[i][l]);
    for (int c = 0; c < S; ++c) {
      const __m512 value = load16(values + l * dim + 16 * (C0 + c), mask(c));
      for (int i = 0; i < kPairsTogether; ++i) sums[i][c] = _mm512_fmadd_ps(w[i], value, sums[i][c]);
    }
  } while (++l < len);
  for (int i = 0; i < kPairsTogether; ++i)
    for (int c = 0; c < S; ++c) _mm512_mask_storeu_ps(acc[i] + 16 * (C0 + c), mask(c), sums[i][c]);
}

// Chunks [C0, C): 4 at a time, then what is left.
template <class T, int C, int C0 = 0>
void accumulate_pairs_avx512(const float* const* p, const T* values, int64_t len, int64_t dim, float* const* acc) {
  constexpr int S = std::min(4, C - C0);
  accumulate_pairs_slice_avx512<T, C, C0, S>(p, values, len, dim, acc);
  if constexpr (C0 + S < C) accumulate_pairs_avx512<T, C, C0 + S>(p, values, len, dim, acc);
}

template <int C>
void finish_avx512(const float* acc, int64_t dim, float inv_sum, float* out) {
  const __mmask16 tail = static_cast<__mmask16>((1u << (dim - 16 * (C - 1))) - 1);
  const __m512 inv = _mm512_set1_ps(inv_sum);
  for (int c = 0; c < C; ++c) {
    const __mmask16 m = c == C - 1 ? tail : 0xFFFF;
    _mm512_mask_storeu_ps(out + 16 * c, m, _mm512_mul_ps(load16(acc + 16 * c, m), inv));
  }
}

template <class T, int C, int N>
constexpr HeadFn<T> heads_avx512_n = attend_heads<T, N, scores_hinting_avx512<T, C, N>, softmax_avx512,
                                                  accumulate_heads_avx512<T, C, N, true>, finish_avx512<C>>;

template <class T, int C>
void heads_avx512_c(const Heads<T>& hs, int64_t len, int64_t dim, float scale) {
  by_fours<T, heads_avx512_n<T, C, 4>, heads_avx512_n<T, C, 2>, heads_avx512_n<T, C, 1>>(hs, len, dim, scale);
}

template <class T>
void heads_avx512(const Heads<T>& hs, int64_t len, int64_t dim, float scale) {
  switch ((dim + 15) / 16) {
    case 1: return heads_avx512_c<T, 1>(hs, len, dim, scale);
    case 2: return heads_avx512_c<T, 2>(hs, len, dim, scale);
    case 3: return heads_avx512_c<T, 3>(hs, len, dim, scale);
    case 4: return heads_avx512_c<T, 4>(hs, len, dim, scale);
    case 5: return heads_avx512_c<T, 5>(hs, len, dim, scale);
    case 6: return heads_avx512_c<T, 6>(hs, len, dim, scale);
    case 7: return heads_avx512_c<T, 7>(hs, len, dim, scale);
    case 8: return heads_avx512_c<T, 8>(hs, len, dim, scale);
    default: return one_by_one<T, head_scalar<T>>(hs, len, dim, scale);
  }
}

// int8 rows (head_dim = 32 G): each group's 32 values as two vectors of 16 fp32. A score sums each group's products
// with q before it takes the group's scale; the weighted sum takes p[l] * scale as the weight of the group's values
// (one multiply a group, not one a value: 1.04-1.07x on a Zen 4 from memory, 1.18x from L3). The hints count rows of
// q8_width bytes.
inline __m512 load16_i8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}

// N heads side by side, as scores_hinting_avx512.
template <int G, int N>
void scores_q8_hinting_avx512(const float* const* q, const int8_t* const* keys, int64_t len, int64_t dim, float scale,
                              float* const* s, const int8_t* const* values) {
  const int64_t width = q8_width(dim);
  __m512 qv[N][2 * G];
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < 2 * G; ++c) qv[n][c] = _mm512_loadu_ps(q[n] + 16 * c);
  auto values_of = [&](int n) { return values == nullptr ? nullptr : values[n]; };
  auto add_group = [&](int n, const int8_t* row, int g, __m512 acc) {  // acc + (group g's products with q) * scale
    const __m512 part = _mm512_fmadd_ps(qv[n][2 * g + 1], load16_i8(row + 32 * g + 16),
                                        _mm512_mul_ps(qv[n][2 * g], load16_i8(row + 32 * g)));
    return _mm512_fmadd_ps(part, _mm512_set1_ps(q8_scale(row, dim, g)), acc);
  };
  int64_t l = 0;
  for (int n = 0; n < N; ++n) {
    prefetch_rows(keys[n], 0, kRowsAhead, len, width);
    hint_stream(keys[n], values_of(n), kRowsAhead, kL2RowsAhead - kRowsAhead, len, width);
  }
  for (; l + 4 <= len; l += 4)
    for (int n = 0; n < N; ++n) {
      prefetch_rows(keys[n], l + kRowsAhead, 4, len, width);
      hint_stream(keys[n], values_of(n), l + kL2RowsAhead, 4, len, width);
      __m512 acc[4];
      for (int j = 0; j < 4; ++j) acc[j] = _mm512_setzero_ps();
      for (int g = 0; g < G; ++g)
        for (int j = 0; j < 4; ++j) acc[j] = add_group(n, keys[n] + (l + j) * width, g, acc[j]);
      for (int j = 0; j < 4; ++j) s[n][l + j] = sum16(acc[j]) * scale;
    }
  for (; l < len; ++l)
    for (int n = 0; n < N; ++n) {
      hint_stream(keys[n], values_of(n), l + kL2RowsAhead, 1, len, width);
      __m512 acc = _mm512_setzero_ps();
      for (int g = 0; g < G; ++g) acc = add_group(n, keys[n] + l * width, g, acc);
      s[n][l] = sum16(acc) * scale;
    }
}

template <int G>
void scores_q8_avx512(const float* q, const int8_t* keys, int64_t len, int64_t dim, float scale, float* s) {
  scores_q8_hinting_avx512<G, 1>(&q, &keys, len, dim, scale, &s, nullptr);
}

template <int G, int N, bool kHintL2>
void accumulate_q8_heads_avx512(const float* const* p, const int8_t* const* values, int64_t len, int64_t dim,
                                float* const* acc) {
  const int64_t width = q8_width(dim);
  __m512 sums[N][2 * G];
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < 2 * G; ++c) sums[n][c] = _mm512_loadu_ps(acc[n] + 16 * c);
  for (int64_t l = 0; l < len; ++l)
    for (int n = 0; n < N; ++n) {
      prefetch_rows(values[n], l + kRowsAhead, 1, len, width);
      if (kHintL2 && kL2RowsAhead > 0) prefetch_rows<int8_t, _MM_HINT_T1>(values[n], l + kL2RowsAhead, 1, len, width);
      const int8_t* row = values[n] + l * width;
      for (int g = 0; g < G; ++g) {
        const __m512 w = _mm512_set1_ps(p[n][l] * q8_scale(row, dim, g));
        sums[n][2 * g] = _mm512_fmadd_ps(w, load16_i8(row + 32 * g), sums[n][2 * g]);
        sums[n][2 * g + 1] = _mm512_fmadd_ps(w, load16_i8(row + 32 * g + 16), sums[n][2 * g + 1]);
      }
    }
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < 2 * G; ++c) _mm512_storeu_ps(acc[n] + 16 * c, sums[n][c]);
}

template <int G>  // one head, no L2 hints (a piece of attend_rows)
void accumulate_q8_avx512(const float* p, const int8_t* values, int64_t len, int64_t dim, float* acc) {
  accumulate_q8_heads_avx512<G, 1, false>(&p, &values, len, dim, &acc);
}

template <int G, int N>
constexpr HeadFn<int8_t> heads_q8_avx512_n = attend_heads<int8_t, N, scores_q8_hinting_avx512<G, N>, softmax_avx512,
                                                          accumulate_q8_heads_avx512<G, N, true>, finish_avx512<2 * G>>;

template <int G>
void heads_q8_avx512_g(const Heads<int8_t>& hs, int64_t len, int64_t dim, float scale) {
  by_fours<int8_t, heads_q8_avx512_n<G, 4>, heads_q8_avx512_n<G, 2>, heads_q8_avx512_n<G, 1>>(hs, len, dim, scale);
}

void heads_q8_avx512(const Heads<int8_t>& hs, int64_t len, int64_t dim, float scale) {
  switch (dim % kQ8Group == 0 ? dim / kQ8Group : 0) {
    case 1: return heads_q8_avx512_g<1>(hs, len, dim, scale);
    case 2: return heads_q8_avx512_g<2>(hs, len, dim, scale);
    case 3: return heads_q8_avx512_g<3>(hs, len, dim, scale);
    case 4: return heads_q8_avx512_g<4>(hs, len, dim, scale);
    default: return one_by_one<int8_t, head_q8_scalar>(hs, len, dim, scale);
  }
}

#pragma GCC diagnostic pop
#pragma GCC pop_options

// ---- AVX2 path: 8 lanes, head_dim a multiple of 8 ----------------------------------------------------------------

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load8(const uint16_t* p) {
  const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
}

inline float sum8(__m256 v) {
  const __m128 half = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 quarter = _mm_add_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_add_ss(quarter, _mm_movehdup_ps(quarter)));
}

inline float max8(__m256 v) {
  const __m128 half = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 quarter = _mm_max_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_max_ss(quarter, _mm_movehdup_ps(quarter)));
}

// exp(x) for x <= 0, as exp16.
inline __m256 exp8(__m256 x) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.0f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  const __m256i exponent = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(exponent)));
}

// N heads side by side, as scores_hinting_avx512.
template <class T, int C, int N>
void scores_hinting_avx2(const float* const* q, const T* const* keys, int64_t len, int64_t dim, float scale,
                         float* const* s, const T* const* values) {
  __m256 qv[N][C];
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c) qv[n][c] = _mm256_loadu_ps(q[n] + 8 * c);
  auto values_of = [&](int n) { return values == nullptr ? nullptr : values[n]; };
  int64_t l = 0;
  for (int n = 0; n < N; ++n) {
    prefetch_rows(keys[n], 0, kRowsAhead, len, dim);
    hint_stream(keys[n], values_of(n), kRowsAhead, kL2RowsAhead - kRowsAhead, len, dim);
  }
  for (; l + 4 <= len; l += 4)
    for (int n = 0; n < N; ++n) {
      prefetch_rows(keys[n], l + kRowsAhead, 4, len, dim);
      hint_stream(keys[n], values_of(n), l + kL2RowsAhead, 4, len, dim);
      __m256 acc[4];
      for (int j = 0; j < 4; ++j) acc[j] = _mm256_setzero_ps();
      for (int c = 0; c < C; ++c)
        for (int j = 0; j < 4; ++j) acc[j] = _mm256_fmadd_ps(qv[n][c], load8(keys[n] + (l + j) * dim + 8 * c), acc[j]);
      for (int j = 0; j < 4; ++j) s[n][l + j] = sum8(acc[j]) * scale;
    }
  for (; l < len; ++l)
    for (int n = 0; n < N; ++n) {
      hint_stream(keys[n], values_of(n), l + kL2RowsAhead, 1, len, dim);
      __m256 acc = _mm256_setzero_ps();
      for (int c = 0; c < C; ++c) acc = _mm256_fmadd_ps(qv[n][c], load8(keys[n] + l * dim + 8 * c), acc);
      s[n][l] = sum8(acc) * scale;
    }
}

template <class T, int C>
void scores_avx2(const float* q, const T* keys, int64_t len, int64_t dim, float scale, float* s) {
  scores_hinting_avx2<T, C, 1>(&q, &keys, len, dim, scale, &s, nullptr);
}

float softmax_avx2(float* s, int64_t len) {
  const int64_t full = len / 8 * 8;
  __m256 top8 = _mm256_set1_ps(-INFINITY);
  for (int64_t l = 0; l < full; l += 8) top8 = _mm256_max_ps(top8, _mm256_loadu_ps(s + l));
  float top = max8(top8);
  for (int64_t l = full; l < len; ++l) top = std::max(top, s[l]);
  const __m256 shift = _mm256_set1_ps(top);
  __m256 sum8v = _mm256_setzero_ps();
  for (int64_t l = 0; l < full; l += 8) {
    const __m256 p = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + l), shift));
    _mm256_storeu_ps(s + l, p);
    sum8v = _mm256_add_ps(sum8v, p);
  }
  if (full < len) {  // the tail through a block padded with -inf, whose exp is 0
    alignas(32) float block[8];
    for (int64_t i = 0; i < 8; ++i) block[i] = full + i < len ? s[full + i] - top : -INFINITY;
    const __m256 p = exp8(_mm256_load_ps(block));
    _mm256_store_ps(block, p);
    for (int64_t l = full; l < len; ++l) s[l] = block[l - full];
    sum8v = _mm256_add_ps(sum8v, p);
  }
  return sum8(sum8v);
}

// The weighted sum's pieces (see accumulate_scalar) for N heads side by side: the running sums in registers within a
// piece.
template <class T, int C, int N, bool kHintL2>  // kHintL2: a decode step's heads (hint_stream), not attend_rows
void accumulate_heads_avx2(const float* const* p, const T* const* values, int64_t len, int64_t dim,
                           float* const* acc) {
  __m256 sums[N][C];
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c) sums[n][c] = _mm256_loadu_ps(acc[n] + 8 * c);
  for (int64_t l = 0; l < len; ++l)
    for (int n = 0; n < N; ++n) {
      prefetch_rows(values[n], l + kRowsAhead, 1, len, dim);
      if (kHintL2 && kL2RowsAhead > 0) prefetch_rows<T, _MM_HINT_T1>(values[n], l + kL2RowsAhead, 1, len, dim);
      const __m256 w = _mm256_set1_ps(p[n][l]);
      for (int c = 0; c < C; ++c) sums[n][c] = _mm256_fmadd_ps(w, load8(values[n] + l * dim + 8 * c), sums[n][c]);
    }
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < C; ++c) _mm256_storeu_ps(acc[n] + 8 * c, sums[n][c]);
}

template <class T, int C>  // one head, no L2 hints (a piece of attend_rows)
void accumulate_avx2(const float* p, const T* values, int64_t len, int64_t dim, float* acc) {
  accumulate_heads_avx2<T, C, 1, false>(&p, &values, len, dim, &acc);
}

template <int C>
void finish_avx2(const float* acc, [[maybe_unused]] int64_t dim, float inv_sum, float* out) {
  const __m256 inv = _mm256_set1_ps(inv_sum);
  for (int c = 0; c < C; ++c) _mm256_storeu_ps(out + 8 * c, _mm256_mul_ps(_mm256_loadu_ps(acc + 8 * c), inv));
}

// attend_rows' pieces for kPairsTogether (row, query head) pairs of a prefill chunk at once: each 8 lanes of a key or
// a value are loaded and widened once for the four pairs instead of once a pair, and the scores of 2 keys x 4 pairs
// are 8 independent sums (scores_avx2's 4 wait on the fma's latency). Every score and running sum of a pair is still
// computed with scores_avx2's and accumulate_avx2's operations in their order, so a row keeps its decode step's bits.
// The weighted sum goes over the values 2 chunks of 8 lanes at a time, so that the 4 pairs' sums stay in registers
// (accumulate_avx2's 16 chunks of a 128-wide head are all the ymm registers there are). AMD EPYC Zen 3, 2 threads, the
// 32 layers' attention of a 128-row chunk of the 7B shape against one pair at a time (benchmarks/chunk_attention.py,
// 2026-12-04, two runs): positions 0-127 1.09-1.14x, 512-639 1.07-1.14x, 1024-1151 1.10-1.16x, 1920-2047 1.16-1.17x.
// The weighted sum still took ~1.7x the scores' time there (perf): widening bf16 values 8 at a time (vpmovzxwd from
// memory, then a shift) was what it waited for. With 16 at a time by interleaving (accumulate_pairs_bf16x16_avx2),
// against the 8 at a time just before: 0-127 1.23x, 512-639 1.35x, 1024-1151 1.43x, 1920-2047 1.35x. A score cannot
// take that order (its lanes' sums would add other values together). Tried, not kept: the 8 scores of a step reduced
// side by side (sum8's additions lane for lane through permutes and shuffles: 27 instructions instead of 64, the same
// bits), 0.96-0.99x; the scores of 8 pairs x 1 key (each key widened once for 8 pairs; the weighted sum 4 pairs at a
// time as here), 1.00-1.06x (quartiles 0.85-1.13). The avx512 path has its own (scores_pairs_avx512).

// The scores of keys [l, l + K) for the kPairsTogether pairs: K x 4 independent sums.
template <class T, int C, int K>
inline void scores_of_keys_avx2(const float* const* q, const T* keys, int64_t l, int64_t dim, float scale,
                                float* const* s) {
  __m256 acc[kPairsTogether][K];
  for (auto& pair : acc)
    for (auto& one : pair) one = _mm256_setzero_ps();
  for (int c = 0; c < C; ++c) {
    __m256 key[K];
    for (int j = 0; j < K; ++j) key[j] = load8(keys + (l + j) * dim + 8 * c);
    for (int i = 0; i < kPairsTogether; ++i) {
      const __m256 qv = _mm256_loadu_ps(q[i] + 8 * c);
      for (int j = 0; j < K; ++j) acc[i][j] = _mm256_fmadd_ps(qv, key[j], acc[i][j]);
    }
  }
  for (int i = 0; i < kPairsTogether; ++i)
    for (int j = 0; j < K; ++j) s[i][l + j] = sum8(acc[i][j]) * scale;
}

template <class T, int C>
void scores_pairs_avx2(const float* const* q, const T* keys, int64_t len, int64_t dim, float scale, float* const* s) {
  int64_t l = 0;
  for (; l + 2 <= len; l += 2) scores_of_keys_avx2<T, C, 2>(q, keys, l, dim, scale, s);
  if (l < len) scores_of_keys_avx2<T, C, 1>(q, keys, l, dim, scale, s);
}

// Chunks [c0, c0 + S) of the 4 pairs' running sums over values [0, len).
template <class T, int S>
inline void accumulate_pairs_slice_avx2(const float* const* p, const T* values, int64_t len, int64_t dim, int c0,
                                        float* const* acc) {
  __m256 sums[kPairsTogether][S];
  for (int i = 0; i < kPairsTogether; ++i)
    for (int c = 0; c < S; ++c) sums[i][c] = _mm256_loadu_ps(acc[i] + 8 * (c0 + c));
  for (int64_t l = 0; l < len; ++l) {
    __m256 w[kPairsTogether];
    for (int i = 0; i < kPairsTogether; ++i) w[i] = _mm256_broadcast_ss(p[i] + l);
    for (int c = 0; c < S; ++c) {
      const __m256 value = load8(values + l * dim + 8 * (c0 + c));
      for (int i = 0; i < kPairsTogether; ++i) sums[i][c] = _mm256_fmadd_ps(w[i], value, sums[i][c]);
    }
  }
  for (int i = 0; i < kPairsTogether; ++i)
    for (int c = 0; c < S; ++c) _mm256_storeu_ps(acc[i] + 8 * (c0 + c), sums[i][c]);
}

// bf16 values, 16 at a time: one 32-byte load, and the fp32 lanes of values 0-3, 8-11 and 4-7, 12-15 by interleaving
// it with zeros (2 instructions for 16 values, against 4 for two load8s); the running sums of those lanes are loaded
// into that order and stored back from it once per call.
inline void accumulate_pairs_bf16x16_avx2(const float* const* p, const uint16_t* values, int64_t len, int64_t dim,
                                          int c0, float* const* acc) {
  __m256 low[kPairsTogether], high[kPairsTogether];  // lanes: values 0-3, 8-11 / 4-7, 12-15 of the 16
  for (int i = 0; i < kPairsTogether; ++i) {
    const __m256 first = _mm256_loadu_ps(acc[i] + 8 * c0), second = _mm256_loadu_ps(acc[i] + 8 * c0 + 8);
    low[i] = _mm256_permute2f128_ps(first, second, 0x20), high[i] = _mm256_permute2f128_ps(first, second, 0x31);
  }
  const __m256i zero = _mm256_setzero_si256();
  for (int64_t l = 0; l < len; ++l) {
    const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(values + l * dim + 8 * c0));
    const __m256 value_low = _mm256_castsi256_ps(_mm256_unpacklo_epi16(zero, raw));
    const __m256 value_high = _mm256_castsi256_ps(_mm256_unpackhi_epi16(zero, raw));
    for (int i = 0; i < kPairsTogether; ++i) {
      const __m256 w = _mm256_broadcast_ss(p[i] + l);
      low[i] = _mm256_fmadd_ps(w, value_low, low[i]);
      high[i] = _mm256_fmadd_ps(w, value_high, high[i]);
    }
  }
  for (int i = 0; i < kPairsTogether; ++i) {
    _mm256_storeu_ps(acc[i] + 8 * c0, _mm256_permute2f128_ps(low[i], high[i], 0x20));
    _mm256_storeu_ps(acc[i] + 8 * c0 + 8, _mm256_permute2f128_ps(low[i], high[i], 0x31));
  }
}

template <class T, int C>
void accumulate_pairs_avx2(const float* const* p, const T* values, int64_t len, int64_t dim, float* const* acc) {
  int c0 = 0;
  if constexpr (std::is_same_v<T, uint16_t>)
    for (; c0 + 2 <= C; c0 += 2) accumulate_pairs_bf16x16_avx2(p, values, len, dim, c0, acc);
  for (; c0 + 2 <= C; c0 += 2) accumulate_pairs_slice_avx2<T, 2>(p, values, len, dim, c0, acc);
  if (c0 < C) accumulate_pairs_slice_avx2<T, 1>(p, values, len, dim, c0, acc);
}

template <class T, int C, int N>
constexpr HeadFn<T> heads_avx2_n = attend_heads<T, N, scores_hinting_avx2<T, C, N>, softmax_avx2,
                                                accumulate_heads_avx2<T, C, N, true>, finish_avx2<C>>;

template <class T, int C>
void heads_avx2_c(const Heads<T>& hs, int64_t len, int64_t dim, float scale) {
  by_fours<T, heads_avx2_n<T, C, 4>, heads_avx2_n<T, C, 2>, heads_avx2_n<T, C, 1>>(hs, len, dim, scale);
}

template <class T>
void heads_avx2(const Heads<T>& hs, int64_t len, int64_t dim, float scale) {
  if (dim % 8 != 0) return one_by_one<T, head_scalar<T>>(hs, len, dim, scale);
  switch (dim / 8) {
    case 1: return heads_avx2_c<T, 1>(hs, len, dim, scale);
    case 2: return heads_avx2_c<T, 2>(hs, len, dim, scale);
    case 3: return heads_avx2_c<T, 3>(hs, len, dim, scale);
    case 4: return heads_avx2_c<T, 4>(hs, len, dim, scale);
    case 5: return heads_avx2_c<T, 5>(hs, len, dim, scale);
    case 6: return heads_avx2_c<T, 6>(hs, len, dim, scale);
    case 7: return heads_avx2_c<T, 7>(hs, len, dim, scale);
    case 8: return heads_avx2_c<T, 8>(hs, len, dim, scale);
    case 9: return heads_avx2_c<T, 9>(hs, len, dim, scale);
    case 10: return heads_avx2_c<T, 10>(hs, len, dim, scale);
    case 11: return heads_avx2_c<T, 11>(hs, len, dim, scale);
    case 12: return heads_avx2_c<T, 12>(hs, len, dim, scale);
    case 13: return heads_avx2_c<T, 13>(hs, len, dim, scale);
    case 14: return heads_avx2_c<T, 14>(hs, len, dim, scale);
    case 15: return heads_avx2_c<T, 15>(hs, len, dim, scale);
    case 16: return heads_avx2_c<T, 16>(hs, len, dim, scale);
    default: return one_by_one<T, head_scalar<T>>(hs, len, dim, scale);
  }
}

// int8 rows (head_dim = 32 G): each group's 32 values as four vectors of 8 fp32, the scale taken as on AVX-512.
inline __m256 load8_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}

// sum over the group's 4 chunks of q * value, in order (the first a product, then fused multiply-adds)
inline __m256 group_dot8(const float* q, const int8_t* values) {
  __m256 part = _mm256_mul_ps(_mm256_loadu_ps(q), load8_i8(values));
  for (int c = 1; c < 4; ++c) part = _mm256_fmadd_ps(_mm256_loadu_ps(q + 8 * c), load8_i8(values + 8 * c), part);
  return part;
}

// N heads side by side, as scores_hinting_avx512.
template <int G, int N>
void scores_q8_hinting_avx2(const float* const* q, const int8_t* const* keys, int64_t len, int64_t dim, float scale,
                            float* const* s, const int8_t* const* values) {
  const int64_t width = q8_width(dim);
  auto values_of = [&](int n) { return values == nullptr ? nullptr : values[n]; };
  auto dot = [&](int n, const int8_t* row, int g) { return group_dot8(q[n] + 32 * g, row + 32 * g); };
  int64_t l = 0;
  for (int n = 0; n < N; ++n) {
    prefetch_rows(keys[n], 0, kRowsAhead, len, width);
    hint_stream(keys[n], values_of(n), kRowsAhead, kL2RowsAhead - kRowsAhead, len, width);
  }
  for (; l + 4 <= len; l += 4)
    for (int n = 0; n < N; ++n) {
      prefetch_rows(keys[n], l + kRowsAhead, 4, len, width);
      hint_stream(keys[n], values_of(n), l + kL2RowsAhead, 4, len, width);
      __m256 acc[4];
      for (int j = 0; j < 4; ++j) acc[j] = _mm256_setzero_ps();
      for (int g = 0; g < G; ++g)
        for (int j = 0; j < 4; ++j) {
          const int8_t* row = keys[n] + (l + j) * width;
          acc[j] = _mm256_fmadd_ps(dot(n, row, g), _mm256_set1_ps(q8_scale(row, dim, g)), acc[j]);
        }
      for (int j = 0; j < 4; ++j) s[n][l + j] = sum8(acc[j]) * scale;
    }
  for (; l < len; ++l)
    for (int n = 0; n < N; ++n) {
      hint_stream(keys[n], values_of(n), l + kL2RowsAhead, 1, len, width);
      const int8_t* row = keys[n] + l * width;
      __m256 acc = _mm256_setzero_ps();
      for (int g = 0; g < G; ++g) acc = _mm256_fmadd_ps(dot(n, row, g), _mm256_set1_ps(q8_scale(row, dim, g)), acc);
      s[n][l] = sum8(acc) * scale;
    }
}

template <int G>
void scores_q8_avx2(const float* q, const int8_t* keys, int64_t len, int64_t dim, float scale, float* s) {
  scores_q8_hinting_avx2<G, 1>(&q, &keys, len, dim, scale, &s, nullptr);
}

template <int G, int N, bool kHintL2>
void accumulate_q8_heads_avx2(const float* const* p, const int8_t* const* values, int64_t len, int64_t dim,
                              float* const* acc) {
  const int64_t width = q8_width(dim);
  __m256 sums[N][4 * G];
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < 4 * G; ++c) sums[n][c] = _mm256_loadu_ps(acc[n] + 8 * c);
  for (int64_t l = 0; l < len; ++l)
    for (int n = 0; n < N; ++n) {
      prefetch_rows(values[n], l + kRowsAhead, 1, len, width);
      if (kHintL2 && kL2RowsAhead > 0) prefetch_rows<int8_t, _MM_HINT_T1>(values[n], l + kL2RowsAhead, 1, len, width);
      const int8_t* row = values[n] + l * width;
      for (int g = 0; g < G; ++g) {
        const __m256 w = _mm256_set1_ps(p[n][l] * q8_scale(row, dim, g));
        for (int c = 0; c < 4; ++c)
          sums[n][4 * g + c] = _mm256_fmadd_ps(w, load8_i8(row + 32 * g + 8 * c), sums[n][4 * g + c]);
      }
    }
  for (int n = 0; n < N; ++n)
    for (int c = 0; c < 4 * G; ++c) _mm256_storeu_ps(acc[n] + 8 * c, sums[n][c]);
}

template <int G>  // one head, no L2 hints (a piece of attend_rows)
void accumulate_q8_avx2(const float* p, const int8_t* values, int64_t len, int64_t dim, float* acc) {
  accumulate_q8_heads_avx2<G, 1, false>(&p, &values, len, dim, &acc);
}

template <int G, int N>
constexpr HeadFn<int8_t> heads_q8_avx2_n = attend_heads<int8_t, N, scores_q8_hinting_avx2<G, N>, softmax_avx2,
                                                        accumulate_q8_heads_avx2<G, N, true>, finish_avx2<4 * G>>;

template <int G>
void heads_q8_avx2_g(const Heads<int8_t>& hs, int64_t len, int64_t dim, float scale) {
  by_fours<int8_t, heads_q8_avx2_n<G, 4>, heads_q8_avx2_n<G, 2>, heads_q8_avx2_n<G, 1>>(hs, len, dim, scale);
}

void heads_q8_avx2(const Heads<int8_t>& hs, int64_t len, int64_t dim, float scale) {
  switch (dim % kQ8Group == 0 ? dim / kQ8Group : 0) {
    case 1: return heads_q8_avx2_g<1>(hs, len, dim, scale);
    case 2: return heads_q8_avx2_g<2>(hs, len, dim, scale);
    case 3: return heads_q8_avx2_g<3>(hs, len, dim, scale);
    case 4: return heads_q8_avx2_g<4>(hs, len, dim, scale);
    default: return one_by_one<int8_t, head_q8_scalar>(hs, len, dim, scale);
  }
}

#pragma GCC pop_options

// ---- one (row, kv head) task, and the batch --------------------------------------------------------------------

struct Problem {
  const float* q;        // [B, H, D] before rope, rows q_stride floats apart
  const float* k;        // [B, Hkv, D] before rope, rows kv_stride floats apart
  const float* v;        // [B, Hkv, D], rows kv_stride floats apart
  const float* cos;      // [P, D]
  const float* sin;      // [P, D]
  const int64_t* slots;  // [B]
  const int64_t* positions;  // [B]: the new token's position; it attends over [0, position]
  int64_t heads, kv_heads, dim, max_len;
  int64_t q_stride, kv_stride;  // (a stacked projection's output holds each row's q, k and v side by side)
  float scale;
  float* out;  // [B, H, D]
};

template <class T>
void store_task(const Problem& pb, T* cache_k, T* cache_v, int64_t row, int64_t kv_head, std::vector<float>& scratch) {
  const int64_t dim = pb.dim, pos = pb.positions[row], width = row_width<T>(dim);
  const int64_t base = (pb.slots[row] * pb.kv_heads + kv_head) * pb.max_len * width;  // [slot, kv head, 0, 0]
  scratch.resize(static_cast<size_t>(dim));
  float* krot = scratch.data();
  rope(pb.k + row * pb.kv_stride + kv_head * dim, pb.cos + pos * dim, pb.sin + pos * dim, dim, krot);
  const float* value = pb.v + row * pb.kv_stride + kv_head * dim;
  if constexpr (std::is_same_v<T, int8_t>) {
    q8_store(krot, dim, cache_k + base + pos * width);
    q8_store(value, dim, cache_v + base + pos * width);
  } else {
    for (int64_t d = 0; d < dim; ++d) {
      store_scalar(cache_k + base + pos * dim + d, krot[d]);
      store_scalar(cache_v + base + pos * dim + d, value[d]);
    }
  }
}

// Kv heads [kv_first, kv_first + kv_count) of a decode row, side by side (kv_count <= kMaxHeadsTogether).
template <class T>
void attend_task(const Problem& pb, const T* cache_k, const T* cache_v, HeadFn<T> head, int64_t row, int64_t kv_first,
                 int64_t kv_count, std::vector<float>& scratch) {
  const int64_t dim = pb.dim, group = pb.heads / pb.kv_heads, pos = pb.positions[row], len = pos + 1;
  const float* cos = pb.cos + pos * dim;
  const float* sin = pb.sin + pos * dim;
  scratch.resize(static_cast<size_t>(kv_count * (group * dim + len + 16)));
  float* qrot = scratch.data();                        // [kv_count, G, D]
  float* scores = qrot + kv_count * group * dim;       // [kv_count, len + 16]
  for (int64_t g = 0; g < group; ++g) {
    Heads<T> hs{};
    hs.n = static_cast<int>(kv_count);
    for (int64_t i = 0; i < kv_count; ++i) {
      const int64_t kv_head = kv_first + i, h = kv_head * group + g;  // heads sharing a kv head are adjacent
      const int64_t base = (pb.slots[row] * pb.kv_heads + kv_head) * pb.max_len * row_width<T>(dim);
      rope(pb.q + row * pb.q_stride + h * dim, cos, sin, dim, qrot + (i * group + g) * dim);
      hs.q[i] = qrot + (i * group + g) * dim;
      hs.keys[i] = cache_k + base;
      hs.values[i] = cache_v + base;
      hs.scores[i] = scores + i * (len + 16);
      hs.out[i] = pb.out + (row * pb.heads + h) * dim;
    }
    head(hs, len, dim, pb.scale);
  }
}

template <class T>
HeadFn<T> choose(int impl) {
  if constexpr (std::is_same_v<T, int8_t>) {
    if (impl == kAvx512) return heads_q8_avx512;
    if (impl == kAvx2) return heads_q8_avx2;
    return one_by_one<int8_t, head_q8_scalar>;
  } else {
    if (impl == kAvx512) return heads_avx512<T>;
    if (impl == kAvx2) return heads_avx2<T>;
    return one_by_one<T, head_scalar<T>>;
  }
}

// How many kv heads of a decode row one task attends side by side on path `impl`: kHeadsTogether on the vector paths,
// fewer (halving) where that would leave fewer than two tasks a thread, so that every thread has work and the
// dynamic schedule can even out rows of different lengths (a small model's few kv heads, batch 1, many threads).
// decode_rows rows of kv_heads kv heads, other_tasks tasks besides (a prefill chunk's rows take one kv head a task).
// The bits do not depend on it.
int64_t heads_together(int impl, int64_t decode_rows, int64_t kv_heads, int64_t other_tasks, int threads) {
  if (impl == kScalar) return 1;
  for (int64_t together = kHeadsTogether; together > 1; together /= 2)
    if (decode_rows * ((kv_heads + together - 1) / together) + other_tasks >= 2 * int64_t{threads}) return together;
  return 1;
}

// ---- rows of one slot together (a prefill chunk) ---------------------------------------------------------------
//
// A row-exact prefill chunk is many rows of one slot, each attending over nearly the same keys and values. One task
// per (row, kv head) read them once per row: from ~1000 positions a 7B head's keys and values (bf16) no longer fit in
// a Zen 3's L2 beside each other, and every row read them again from L3 or memory.
// attend_rows takes up to kRowsTogether such rows in one task and goes over the keys, then the values, in blocks of
// about kBlockBytes, each block used by every row (and query head) while it is in L1. Every row still computes each
// score, the softmax and the weighted sum with the operations, in the order, of its decode step (head_*): a score is
// one dot product whatever the keys around it, and the weighted sum's running sums only wait in memory between blocks.
// AMD EPYC Zen 3, 2 threads, the 32 layers' attention of a 128-row chunk against one task a row
// (benchmarks/chunk_attention.py, 2026-12-03): positions 1920-2047 5.0 -> 2.3 s (2.20x), 0-1151 0.98-1.03x. Blocks of
// 16 KB had cost 9% at positions 512-639 (0.91x), 64 KB gained less at 1920 (1.74x against 2.34x in the same
// minutes); 8 rows together 1.42x at 1920, 32 rows as 16.
constexpr int64_t kRowsTogether = 16;
constexpr int64_t kBlockBytes = 32768;

template <class T>
struct HeadPieces {  // a path's pieces of head_* for one head_dim
  void (*scores)(const float*, const T*, int64_t, int64_t, float, float*);
  float (*softmax)(float*, int64_t);
  void (*accumulate)(const float*, const T*, int64_t, int64_t, float*);
  void (*finish)(const float*, int64_t, float, float*);
  // the same for kPairsTogether pairs at once (nullptr: the path takes pairs one by one)
  void (*scores_pairs)(const float* const*, const T*, int64_t, int64_t, float, float* const*) = nullptr;
  void (*accumulate_pairs)(const float* const*, const T*, int64_t, int64_t, float* const*) = nullptr;
};

template <class T, int... C>
HeadPieces<T> avx512_pieces(int64_t chunks, std::integer_sequence<int, C...>) {
  const HeadPieces<T> table[] = {{scores_avx512<T, C + 1>, softmax_avx512, accumulate_avx512<T, C + 1>,
                                  finish_avx512<C + 1>, scores_pairs_avx512<T, C + 1>,
                                  accumulate_pairs_avx512<T, C + 1>}...};
  return table[chunks - 1];
}

template <class T, int... C>
HeadPieces<T> avx2_pieces(int64_t chunks, std::integer_sequence<int, C...>) {
  const HeadPieces<T> table[] = {{scores_avx2<T, C + 1>, softmax_avx2, accumulate_avx2<T, C + 1>,
                                  finish_avx2<C + 1>, scores_pairs_avx2<T, C + 1>,
                                  accumulate_pairs_avx2<T, C + 1>}...};
  return table[chunks - 1];
}

template <int... G>
HeadPieces<int8_t> q8_avx512_pieces(int64_t groups, std::integer_sequence<int, G...>) {
  const HeadPieces<int8_t> table[] = {{scores_q8_avx512<G + 1>, softmax_avx512, accumulate_q8_avx512<G + 1>,
                                       finish_avx512<2 * (G + 1)>}...};
  return table[groups - 1];
}

template <int... G>
HeadPieces<int8_t> q8_avx2_pieces(int64_t groups, std::integer_sequence<int, G...>) {
  const HeadPieces<int8_t> table[] = {{scores_q8_avx2<G + 1>, softmax_avx2, accumulate_q8_avx2<G + 1>,
                                       finish_avx2<4 * (G + 1)>}...};
  return table[groups - 1];
}

// The pieces of the head function choose<T>(impl) gives for head_dim `dim` (its own fallbacks included).
template <class T>
HeadPieces<T> choose_pieces(int impl, int64_t dim) {
  if constexpr (std::is_same_v<T, int8_t>) {
    const int64_t groups = dim % kQ8Group == 0 ? dim / kQ8Group : 0;
    if (impl == kAvx512 && groups >= 1 && groups <= 4)
      return q8_avx512_pieces(groups, std::make_integer_sequence<int, 4>());
    if (impl == kAvx2 && groups >= 1 && groups <= 4)
      return q8_avx2_pieces(groups, std::make_integer_sequence<int, 4>());
    return {scores_q8_scalar, softmax_scalar, accumulate_q8_scalar, finish_scalar};
  } else {
    if (impl == kAvx512 && (dim + 15) / 16 <= 8)
      return avx512_pieces<T>((dim + 15) / 16, std::make_integer_sequence<int, 8>());
    if (impl == kAvx2 && dim % 8 == 0 && dim / 8 <= 16)
      return avx2_pieces<T>(dim / 8, std::make_integer_sequence<int, 16>());
    return {scores_scalar<T>, softmax_scalar, accumulate_scalar<T>, finish_scalar};
  }
}

// Rows [first, first + rows) (one slot) against kv head `kv_head`; their keys and values are in the cache already.
template <class T>
void attend_rows(const Problem& pb, const T* cache_k, const T* cache_v, const HeadPieces<T>& head, int64_t first,
                 int64_t rows, int64_t kv_head, std::vector<float>& scratch) {
  const int64_t dim = pb.dim, group = pb.heads / pb.kv_heads, pairs = rows * group;
  int64_t longest = 0;
  for (int64_t r = 0; r < rows; ++r) longest = std::max(longest, pb.positions[first + r] + 1);
  scratch.resize(static_cast<size_t>(2 * pairs * dim + pairs * (longest + 1) + 16));
  float* qrot = scratch.data();          // [pairs, D]: (row, query head) pairs
  float* acc = qrot + pairs * dim;       // [pairs, D]: their weighted sums
  float* inv = acc + pairs * dim;        // [pairs]: 1 / their softmax sums
  float* scores = inv + pairs;           // [pairs, longest]
  std::fill(acc, acc + pairs * dim, 0.0f);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t pos = pb.positions[first + r];
    for (int64_t g = 0; g < group; ++g)
      rope(pb.q + (first + r) * pb.q_stride + (kv_head * group + g) * dim, pb.cos + pos * dim, pb.sin + pos * dim,
           dim, qrot + (r * group + g) * dim);
  }
  const int64_t width = row_width<T>(dim);
  const int64_t base = (pb.slots[first] * pb.kv_heads + kv_head) * pb.max_len * width;  // [slot, kv head, 0, 0]
  const T* keys = cache_k + base;
  const T* values = cache_v + base;
  const int64_t block = std::max<int64_t>(16, kBlockBytes / (width * static_cast<int64_t>(sizeof(T))));
  auto length = [&](int64_t pair) { return pb.positions[first + pair / group] + 1; };
  // pairs [i, i + kPairsTogether) together where the path can: how many of block l's keys the shortest and the
  // longest of them take; a pair's scores past its own length are computed with the others' and never read
  auto keys_taken = [&](int64_t i, int64_t l) {
    int64_t fewest = block, most = 0;
    for (int64_t k = i; k < i + kPairsTogether; ++k) {
      const int64_t n = std::min(block, length(k) - l);
      fewest = std::min(fewest, std::max<int64_t>(n, 0)), most = std::max(most, n);
    }
    return std::pair{fewest, most};
  };
  const float* q_of[kPairsTogether];
  float* s_of[kPairsTogether];
  float* acc_of[kPairsTogether];
  for (int64_t l = 0; l < longest; l += block) {
    int64_t i = 0;
    for (; head.scores_pairs != nullptr && i + kPairsTogether <= pairs; i += kPairsTogether) {
      const int64_t most = keys_taken(i, l).second;
      for (int64_t k = 0; k < kPairsTogether; ++k)
        q_of[k] = qrot + (i + k) * dim, s_of[k] = scores + (i + k) * longest + l;
      if (most > 0) head.scores_pairs(q_of, keys + l * width, most, dim, pb.scale, s_of);
    }
    for (; i < pairs; ++i) {
      const int64_t n = std::min(block, length(i) - l);
      if (n > 0) head.scores(qrot + i * dim, keys + l * width, n, dim, pb.scale, scores + i * longest + l);
    }
  }
  for (int64_t i = 0; i < pairs; ++i) inv[i] = 1.0f / head.softmax(scores + i * longest, length(i));
  for (int64_t l = 0; l < longest; l += block) {
    int64_t i = 0;
    // the values all four take together, then each pair's own rest, in order: each running sum adds its values in
    // the order of the decode step
    for (; head.accumulate_pairs != nullptr && i + kPairsTogether <= pairs; i += kPairsTogether) {
      const int64_t fewest = keys_taken(i, l).first;
      for (int64_t k = 0; k < kPairsTogether; ++k)
        s_of[k] = scores + (i + k) * longest + l, acc_of[k] = acc + (i + k) * dim;
      if (fewest > 0) head.accumulate_pairs(s_of, values + l * width, fewest, dim, acc_of);
      for (int64_t k = 0; k < kPairsTogether; ++k) {
        const int64_t n = std::min(block, length(i + k) - l);
        if (n > fewest)
          head.accumulate(s_of[k] + fewest, values + (l + fewest) * width, n - fewest, dim, acc_of[k]);
      }
    }
    for (; i < pairs; ++i) {
      const int64_t n = std::min(block, length(i) - l);
      if (n > 0) head.accumulate(scores + i * longest + l, values + l * width, n, dim, acc + i * dim);
    }
  }
  for (int64_t i = 0; i < pairs; ++i) {
    const int64_t row = first + i / group, h = kv_head * group + i % group;
    head.finish(acc + i * dim, dim, inv[i], pb.out + (row * pb.heads + h) * dim);
  }
}

// The call's rows in runs of consecutive rows of one slot, at most kRowsTogether a run: (first row, rows).
std::vector<std::pair<int64_t, int64_t>> runs_of_rows(const Problem& pb, int64_t batch) {
  std::vector<std::pair<int64_t, int64_t>> runs;
  for (int64_t b = 0; b < batch; ++b) {
    if (!runs.empty() && runs.back().second < kRowsTogether && pb.slots[runs.back().first] == pb.slots[b])
      ++runs.back().second;
    else
      runs.emplace_back(b, 1);
  }
  return runs;
}

// Below this many multiply-adds a call runs on the calling thread: waking the other threads costs more than it saves
// (tiny models, short contexts), and on a busy machine a parallel region can wait a scheduler slice for a thread.
constexpr int64_t kParallelWork = int64_t{1} << 17;

int64_t work(const Problem& pb, int64_t batch) {
  int64_t keys = 0;
  for (int64_t b = 0; b < batch; ++b) keys += pb.positions[b] + 1;
  return keys * pb.heads * pb.dim * 2;  // scores and weighted sum
}

// A unit of a call's work: kv heads [kv_first, kv_first + kv_count) of one decode row (rows == 1), or one kv head of
// a run of rows of one slot (attend_rows).
struct Task {
  int64_t first, rows, kv_first, kv_count;
};

template <class T>
void run(const Problem& pb, void* cache_k, void* cache_v, int impl, int64_t batch, int threads) {
  const HeadFn<T> head = choose<T>(impl);
  const HeadPieces<T> pieces = choose_pieces<T>(impl, pb.dim);
  const std::vector<std::pair<int64_t, int64_t>> runs = runs_of_rows(pb, batch);
  const int64_t decode_rows = std::count_if(runs.begin(), runs.end(), [](const auto& run) { return run.second == 1; });
  const int64_t chunk_tasks = (static_cast<int64_t>(runs.size()) - decode_rows) * pb.kv_heads;
  const int64_t together = heads_together(impl, decode_rows, pb.kv_heads, chunk_tasks, threads);
  std::vector<Task> work_list;
  for (const auto& [first, rows] : runs)
    for (int64_t kv = 0; kv < pb.kv_heads; kv += rows == 1 ? together : 1)
      work_list.push_back({first, rows, kv, rows == 1 ? std::min(together, pb.kv_heads - kv) : 1});
  const int64_t stores = batch * pb.kv_heads, tasks = static_cast<int64_t>(work_list.size());
  const bool parallel = threads > 1 && stores > 1 && work(pb, batch) >= kParallelWork;
  T* keys = static_cast<T*>(cache_k);
  T* values = static_cast<T*>(cache_v);
#pragma omp parallel num_threads(threads) if (parallel)
  {
    std::vector<float> scratch;
    // every key and value first (the implicit barrier after the loop): a row may attend to other rows of its slot
#pragma omp for schedule(static)
    for (int64_t t = 0; t < stores; ++t) store_task<T>(pb, keys, values, t / pb.kv_heads, t % pb.kv_heads, scratch);
    // a decode step's rows (one a slot) each alone, as always; the rows of a prefill chunk together (attend_rows)
#pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < tasks; ++t) {
      const Task& task = work_list[static_cast<size_t>(t)];
      if (task.rows == 1)
        attend_task<T>(pb, keys, values, head, task.first, task.kv_first, task.kv_count, scratch);
      else
        attend_rows<T>(pb, keys, values, pieces, task.first, task.rows, task.kv_first, scratch);
    }
  }
}

int resolve(int impl) {
  if (impl == kAuto) return cpu_has_avx512() ? kAvx512 : cpu_has_avx2() ? kAvx2 : kScalar;
  if (impl == kAvx512 && !cpu_has_avx512()) return -1;
  if (impl == kAvx2 && !cpu_has_avx2()) return -1;
  return impl;
}

// ---- int8 rows to and from values for the torch path's SDPA (kv_int8's, fast) ------------------------------------
//
// A prefill chunk that SDPA computes reads its slot's keys and values [0, end) as bf16: from an int8 cache each chunk
// converts them all again, and writes its own rows (i8a_quantize). In torch (kv_int8) that made 1024-token prompts
// 1.07-1.11x slower to prefill on the 7B shape (4 layers, chunks of 128, a Zen 4; 1.00x with these two calls). The
// same conversion: value = int8 * scale in fp32, then bf16 rounded to nearest even as torch rounds (to_bf16: a NaN,
// which only a group with an inf makes, becomes 0x7FC0, c10's; torch's vector conversion gives another NaN), compiled
// for AVX-512, AVX2 and plain x86-64 (GCC picks the CPU's at load).
// One row: each group's values times its scale, stored as the cache's other dtypes are (store_scalar).
template <class Out>
inline void dequantize_row(const int8_t* row, int64_t dim, Out* out) {
  for (int64_t g = 0; g < q8_groups(dim); ++g) {
    const float scale = q8_scale(row, dim, g);
    const int64_t end = std::min(dim, (g + 1) * kQ8Group);
    for (int64_t d = g * kQ8Group; d < end; ++d) store_scalar(out + d, static_cast<float>(row[d]) * scale);
  }
}

__attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
void dequantize_row_f32(const int8_t* row, int64_t dim, float* out) { dequantize_row(row, dim, out); }

__attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
void dequantize_row_bf16(const int8_t* row, int64_t dim, uint16_t* out) { dequantize_row(row, dim, out); }

}  // namespace

extern "C" {

__attribute__((visibility("default"))) int i8a_abi_version() { return 4; }

// Bit 0: the AVX2 path can run here; bit 1: the AVX-512 path can.
__attribute__((visibility("default"))) int i8a_cpu_paths() {
  return (cpu_has_avx2() ? 1 : 0) | (cpu_has_avx512() ? 2 : 0);
}

// The path `impl` resolves to on this CPU (1 AVX-512, 2 AVX2, 3 scalar), or -1 if the CPU cannot run it.
__attribute__((visibility("default"))) int i8a_resolve(int impl) { return resolve(impl); }

// The kv heads a task of a decode call attends side by side (heads_together) on the path `impl` resolves to, or -1.
__attribute__((visibility("default"))) int64_t i8a_heads_together(int impl, int64_t decode_rows, int64_t kv_heads,
                                                                   int threads) {
  const int path = resolve(impl);
  return path < 0 ? -1 : heads_together(path, decode_rows, kv_heads, 0, threads);
}

// rows: `heads` runs of `positions` int8 rows (q8_width(dim) bytes each), the runs `head_stride` bytes apart (a cache
// slot's [kv heads, positions]); out: [heads, positions, dim], fp32 (out_dtype 0) or bf16 (1). Returns 0, or -3.
__attribute__((visibility("default"))) int i8a_dequantize(const int8_t* rows, int64_t heads, int64_t positions,
                                                          int64_t head_stride, int64_t dim, void* out, int out_dtype,
                                                          int threads) {
  if (heads < 0 || positions < 0 || dim <= 0 || (out_dtype != kF32 && out_dtype != kBF16)) return -3;
  const int64_t width = q8_width(dim), count = heads * positions;
  const bool parallel = threads > 1 && count * dim >= int64_t{1} << 16;
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
  for (int64_t i = 0; i < count; ++i) {
    const int8_t* row = rows + (i / positions) * head_stride + (i % positions) * width;
    if (out_dtype == kF32)
      dequantize_row_f32(row, dim, static_cast<float*>(out) + i * dim);
    else
      dequantize_row_bf16(row, dim, static_cast<uint16_t*>(out) + i * dim);
  }
  return 0;
}

// x: fp32 [heads, positions, dim] with the given strides (in floats; the last dimension contiguous) -> the int8
// rows of kv_int8.quantize, bit for bit, at out + head * out_head_stride + position * q8_width(dim) (a cache slot's
// [kv heads, positions]). Returns 0, or -3.
__attribute__((visibility("default"))) int i8a_quantize(const float* x, int64_t heads, int64_t positions,
                                                        int64_t x_head_stride, int64_t x_position_stride, int64_t dim,
                                                        int8_t* out, int64_t out_head_stride, int threads) {
  if (heads < 0 || positions < 0 || dim <= 0) return -3;
  const int64_t width = q8_width(dim), count = heads * positions;
  const bool parallel = threads > 1 && count * dim >= int64_t{1} << 16;
#pragma omp parallel for schedule(static) num_threads(threads) if (parallel)
  for (int64_t i = 0; i < count; ++i) {
    const int64_t head = i / positions, position = i % positions;
    q8_store(x + head * x_head_stride + position * x_position_stride, dim,
             out + head * out_head_stride + position * width);
  }
  return 0;
}

// Row b's q is at q + b * q_stride, its k and v at k (v) + b * kv_stride (in floats; H * D and Hkv * D when each is
// its own contiguous tensor). Returns 0, or -1 (the CPU cannot run `impl`), -2 (unknown dtype), -3 (bad sizes), -4
// (a slot or position out of range, or a (slot, position) twice: the tasks write into the cache, so these are
// checked before anything runs).
__attribute__((visibility("default"))) int i8a_decode(
    const float* q, const float* k, const float* v, int64_t q_stride, int64_t kv_stride, const float* cos,
    const float* sin, const int64_t* slots, const int64_t* positions, int64_t batch, int64_t heads, int64_t kv_heads,
    int64_t dim, void* cache_k, void* cache_v, int64_t n_slots, int64_t max_len, int64_t table_len, int dtype,
    float scale, float* out, int impl, int threads) {
  const int path = resolve(impl);
  if (path < 0) return -1;
  if (kv_heads <= 0 || heads % kv_heads != 0 || dim <= 0 || dim % 2 != 0) return -3;
  if (q_stride < heads * dim || kv_stride < kv_heads * dim) return -3;
  std::vector<std::pair<int64_t, int64_t>> written(static_cast<size_t>(batch));
  for (int64_t b = 0; b < batch; ++b) {
    if (slots[b] < 0 || slots[b] >= n_slots || positions[b] < 0 || positions[b] >= std::min(max_len, table_len))
      return -4;
    written[b] = {slots[b], positions[b]};
  }
  std::sort(written.begin(), written.end());
  if (std::adjacent_find(written.begin(), written.end()) != written.end()) return -4;
  const Problem pb{q, k, v, cos, sin, slots, positions, heads, kv_heads, dim, max_len, q_stride, kv_stride, scale,
                   out};
  if (dtype == kF32) {
    run<float>(pb, cache_k, cache_v, path, batch, threads);
  } else if (dtype == kBF16) {
    run<uint16_t>(pb, cache_k, cache_v, path, batch, threads);
  } else if (dtype == kF16) {
    run<Half>(pb, cache_k, cache_v, path, batch, threads);
  } else if (dtype == kInt8) {
    run<int8_t>(pb, cache_k, cache_v, path, batch, threads);
  } else {
    return -2;
  }
  return 0;
}

}  // extern "C"
