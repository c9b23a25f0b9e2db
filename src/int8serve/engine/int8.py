"""Weight-only int8: symmetric quantization (per output channel, or per group of input values) and the linear layer.

Decode reads every weight once per step, so its speed is the speed at which int8 weights stream from memory. Our kernel
(engine/kernels: AMX, AVX-512 VNNI, AVX-VNNI, AVX2 or scalar, chosen from the CPU's flags) runs every call of up to
`kernel_rows()` rows (decode; whole prefill chunks on the avx2 and avxvnni paths, or with
INT8SERVE_PREFILL_MATMUL=row-exact) on int8 activations quantized per 32 values; it streams the weights near memory
speed where torch's `_weight_int8pack_mm` is compute-bound, and it takes a scale per group of 32/64/128 input values
(like llama.cpp's Q8_0), which per-channel int8pack cannot. Longer calls are compute-bound. On CPUs with AMX-BF16 or
AVX512-BF16 our bf16 kernel multiplies them straight from the packed layout (kernels/matmul.py: the same bf16 weight
values, no dequantized copy). On the avx2 and avxvnni paths (CPUs with AVX2 only, or with AVX-VNNI but no AVX-512) our
int8 kernel takes them too, as a GEMM on 16-bit activations (see ALL_ROWS). Elsewhere, and with
INT8SERVE_PREFILL_MATMUL=dense, each weight is dequantized from the packed layout into one reused buffer and multiplied
with `F.linear`; without native bf16 arithmetic, bf16 matmuls are emulated and fp32 is faster (AVX2 EPYC, 128 x 4096 x
4096: bf16 307 ms, fp32 66 ms), so it is fp32 there, through oneDNN rather than MKL (1.6-1.8x on that EPYC,
benchmarks/prefill_paths.py). The residual stream, norms and logits stay in fp32 around it.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import chunking, kernels
from .kernels import matmul as prefill_matmul
from .quant_options import DEFAULT_GROUP_SIZE, GROUP_SIZES

COMPUTE_DTYPE = torch.bfloat16
# Our kernel quantizes activations twice (the row, then its quantization error on 1/256 of the row's scale: ~16-bit
# activations) when True. Measured: one int8 pass costs as much accuracy as the int8 weights (KLD 0.00100 against
# 0.00055 on 8k tokens); two are free while memory-bound (batch 1-2) and cost int8 arithmetic beyond, less since the
# two passes' sums are combined in int32 and the avx2 path multiplies the 16-bit rows directly (gemv.cpp).
PRECISE_ACTIVATIONS = True
# Calls of up to this many rows (a whole prefill chunk's rows during prefill) run our kernel; more rows dequantize
# into a scratch buffer and use a dense matmul (or the AMX-BF16 prefill kernel, kernels/matmul.py). Measured on the
# Sapphire Rapids (4096 -> 11008, per-32 scales, precise, 2 threads, quiet; kernel vs dequantize + AMX bf16 matmul):
# vnni512 19 vs 88 ms at 16 rows, 41 vs 106 at 32, 73 vs 115 at 64, 143 vs 130 at 128; avx2 55 vs 87 at 16, 177 vs
# 103 at 64, 455 vs 141 at 128; avxvnni 259 vs 132 at 128. amx against the AMX-BF16 prefill kernel (2026-12-02, the
# same CPU, weights from memory, precise; ms) 4096 -> 11008: 8 rows 2.5 vs 5.7, 24 rows 5.0 vs 6.1, 32 rows 6.1 vs
# 6.0, 48 rows 8.6 vs 5.2, 128 rows 23.5 vs 6.4 (11008 -> 4096 and 4096 -> 4096 alike). vnni512 against dequantize +
# oneDNN's bf16 matmul on an AMD EPYC Zen 4 (2026-12-02, the chunked kernel of gemv.cpp, weights from memory, ms;
# 4096 -> 11008 / 11008 -> 4096 / 4096 -> 4096): 32 rows 12.9 vs 15.6 / 10.4 vs 14.1 / 4.9 vs 6.2; 48 rows 16.9 vs
# 19.0 / 15.6 vs 17.9 / 6.4 vs 7.4; 64 rows 24.5 vs 22.0 / 22.2 vs 22.3 / 9.5 vs 8.6; 128 rows 46.8 vs 37.9 / 50.7
# vs 36.3 / 18.6 vs 13.8 (a 512-token prompt in the server's 128-token chunks, 32 layers: 17.8-19.0 tok/s through
# our kernel, against 27.9 for the whole prompt in one dense forward). So every path takes up to 32 rows by default,
# and prefill chunks of the default 128 rows take the dense path (or the AMX kernel): not row-exact (chunking.py),
# so the prefix cache keeps prompts, not replies. INT8SERVE_PREFILL_MATMUL=row-exact gives our kernel every call on
# the amx path (row-exact prefill, replies kept, decode's accuracy), where calls of 32 rows and more run as an AMX-INT8
# GEMM (gemv.cpp, gemm_exact_amx). That costs half the prefill speed of the AMX-BF16 kernel, the default: a 512-token
# prompt in 128-token chunks, 32 layers of the 7B shape, 0.468x (Sapphire Rapids, 2026-12-05, benchmarks/row_exact.py;
# each group of 32 inputs needs its own scales, so every tile product's sums go through vector code, and on this CPU
# the tiles and the vector code do not run at once: docs/benchmarks.md, "Exact prefill on AMX"). Since its GEMM the
# vnni512 path takes every call by default (below, EVERY_CALL_PATHS): the figures above are of the code before.
KERNEL_ROWS = 32
# The avx2 path (CPUs with AVX2 only: no native bf16, so the dense path is fp32) multiplies calls of 16 rows and more
# as a GEMM on 16-bit activations (gemv.cpp, gemm_wide16), faster there than dequantizing for oneDNN's fp32 matmul:
# on an AMD EPYC Zen 4 held to AVX2 code (INT8SERVE_KERNEL=avx2 ONEDNN_MAX_CPU_ISA=AVX2, 2 threads, weights from
# memory, benchmarks/prefill_paths.py, 2026-12-02) 1.24-1.37x for the three 7B shapes at 128 and at 512 rows (an
# AVX2-only CPU itself not measured yet). So it takes every call: prefill is row-exact on those CPUs, at no cost (the
# prefix cache keeps replies too). INT8SERVE_PREFILL_MATMUL=dense gives prefill back to oneDNN.
# The avxvnni path (CPUs with AVX-VNNI but no AVX-512: Intel's Alder Lake and later client CPUs, Xeon 6 E-cores) runs
# the same GEMM with vpdpwssd, one instruction for vpmaddwd + vpaddd, the same sums: on a Sapphire Rapids held to
# those instructions (INT8SERVE_KERNEL=avxvnni ONEDNN_MAX_CPU_ISA=AVX2_VNNI, 2 threads, benchmarks/prefill_paths.py,
# 2026-12-03) 1.44-1.70x dequantizing for oneDNN's fp32 matmul at 128 and 512 rows, and 1.23-1.29x the avx2 path's GEMM.
# (Before, that path's prefill dequantized for oneDNN.)
# INT8SERVE_PREFILL_MATMUL=int8 gives our kernel every prefill call with one int8 pass a row (one_int8_pass), as
# llama.cpp's Q8_0 computes, on every path. On an AMD EPYC Zen 4 (2026-12-04, 2 threads, 128 rows, the three 7B
# shapes, medians of 6 with the weights rotating through 3 copies): 236-280 G multiply-adds/s against 192-196 for
# the bf16 kernel (the default there) and 145-150 with decode's two passes. Its accuracy on stories260K over
# tinystories.txt (benchmarks/accuracy.py, mode `kernel`): KLD 0.000956, top-1 98.33%, against 0.000635 / 98.58% for
# the bf16 prefill (0.000537 / 98.70% since its fp32 sums are kept, kernels/matmul.py) and 0.000481 / 98.75% with two
# passes (with the head's residual, 2026-12-05: 0.000893, 0.000473 and 0.000418). So it is an option, not the default.
# On the avx2 path,
# which has no int8 dot product (vpmaddubsw + vpmaddwd + an add per 32 products, as many instructions as the 16-bit
# GEMM's vpmaddwd + add twice), one pass is slower than the default: 109 against 142-143 G/s on the same Zen 4 held to
# AVX2 (the start line says so). On a Sapphire Rapids (2026-12-04, the same measurement): the amx path's one pass
# (passes of 16 rows over each tile, one tile product a group of 32 and its sums scaled in vector code) 482-522 G/s
# against 858-1003 for the AMX-BF16 prefill kernel, its default (0.53-0.57x: the start line says so too); the avxvnni
# path held to its instructions (INT8SERVE_KERNEL=avxvnni) 225-229 against 150-162 for its 16-bit GEMM (1.42-1.51x);
# the avx2 path there 110-111 against 119-125 (0.88-0.92x).
# The vnni512 path (AVX-512 VNNI without AMX: AMD's Zen 4, Intel's Ice Lake and Cascade Lake, and Sapphire Rapids whose
# tile state Linux refuses) takes every call too since its GEMM (gemv.cpp, gemm_exact_vnni512): prefill is row-exact
# there, with decode's accuracy, where the bf16 kernel (AVX512-BF16, the default there before) measured KLD 0.000537
# against the 0.0005 (the note above; since the head's residual 0.000473 against 0.000418: both meet the
# targets, and row-exact stays for its accuracy and for the prefix cache keeping replies). It costs speed on a Zen 4:
# the GEMM multiplies 0.84-0.92x as fast as the bf16 kernel at 128 and 512 rows (two vpdpbusd where one vdpbf16ps does,
# the same peak, and each group's sums scaled apart), and a 512-token prompt in the server's 128-token chunks, 32 layers
# of the 7B shape with the default scheme, prefilled at 25.6 tok/s against 28.1 (0.915x; benchmarks/row_exact.py,
# 2026-12-04; 0.80x before the GEMM, at 76c20e0). INT8SERVE_PREFILL_MATMUL=bf16 gives those calls back to the bf16
# kernel where the CPU has it. CPUs with AVX-512 VNNI but not AVX512-BF16 (Ice Lake, Cascade Lake), whose prefill
# dequantized for oneDNN before, were not measured.
ALL_ROWS = sys.maxsize
WIDE16_PATHS = ("avx2", "avxvnni")
EVERY_CALL_PATHS = (*WIDE16_PATHS, "vnni512")  # the paths whose kernel takes every prefill call by default


def kernel_rows() -> int:
    """How many rows a call may have and still run our kernel (on its path of this CPU); 0 without it."""
    if not kernels.available():
        return 0
    path = kernels.path()
    if prefill_matmul.int8_requested():
        return ALL_ROWS
    if path in EVERY_CALL_PATHS and not prefill_matmul.dense_requested() and not bf16_kernel_requested():
        return ALL_ROWS
    if path == "amx" and prefill_matmul.row_exact_requested():
        return ALL_ROWS
    return KERNEL_ROWS


def bf16_kernel_requested() -> bool:
    """Whether INT8SERVE_PREFILL_MATMUL=bf16 gives long calls to the bf16 kernel, and this CPU has it."""
    return prefill_matmul.bf16_requested() and prefill_matmul.available()


# Without our kernel: above this many rows the dense bf16 path, at or below it torch's int8pack (per-channel only).
# Measured (benchmarks/engine.py --kernels, docs/benchmarks.md): per 7B block int8pack is faster up to 32 rows.
DENSE_ROWS_THRESHOLD = 32
MIN_DENSE_ROWS = 16  # fp32 F.linear rounds a row by how many rows come with it below ~12: pad to this many
# torch 2.13's CPU `_weight_int8pack_mm` segfaults unless in_features is a multiple of 16 (and the weight is
# 64-byte aligned, see set_quantized)
# (measured: K = 8, 12, 36, 100, 168, 172 crash; 16, 160, 176, 4096, 11008 work). Other widths take the dense path.
KERNEL_K_MULTIPLE = 16


@functools.cache
def dense_dtype() -> torch.dtype:
    """The dtype of the prefill (dense) path: bf16 where the CPU multiplies bf16 natively, else fp32."""
    flags = kernels.cpu_flags()
    if not flags:  # not Linux: keep bf16, the measured choice on CPUs with native bf16
        return COMPUTE_DTYPE
    return COMPUTE_DTYPE if flags & {"avx512_bf16", "amx_bf16"} else torch.float32


@functools.cache
def onednn_fp32() -> bool:
    """Whether fp32 dense matmuls go through oneDNN (torch's `mkldnn._linear_pointwise`) rather than torch's default
    BLAS (MKL). Measured on an AVX2-only AMD EPYC (Zen 3, 2 threads, 128 x 4096 -> 11008): MKL 51 GFLOP/s, oneDNN 118
    (MKL does not use its fast code on AMD CPUs); oneDNN's rows do not depend on how many come with them (from 2 rows;
    we pad to MIN_DENSE_ROWS), nor on the thread count. False where this torch lacks oneDNN: F.linear then."""
    try:
        probe = torch.ops.mkldnn._linear_pointwise(torch.ones(2, 4), torch.ones(3, 4), None, "none", [], "")
    except (AttributeError, RuntimeError):
        return False
    return torch.backends.mkldnn.is_available() and torch.equal(probe, torch.full((2, 3), 4.0))


# oneDNN's call costs ~50 us more than F.linear's whatever the size (measured on the Zen 3: 64 x 64 weights 63 vs
# 17 us; SmolLM2's 1536 x 576 1.15 vs 1.20 ms; 4096 x 11008 102 vs 190 ms): below this many weights F.linear.
ONEDNN_MIN_WEIGHTS = 1 << 21


def dense_matmul(rows: Tensor, weight: Tensor) -> Tensor:
    """rows [M, in] @ weight [out, in].T in weight's dtype: the prefill path's matmul. The library depends on the
    weight only. In fp32, and in bf16 on CPUs without AMX, each row's result is independent of M (padded to
    MIN_DENSE_ROWS rows, see _padded). On CPUs with AMX, oneDNN's bf16 kernels round a row by how many come with it
    (a Sapphire Rapids, 2026-12-02, 4096 inputs: 131 of 132 row counts from 1 to 384 differ from the same rows among
    512); there the rows that must not depend on their company (decode, row-exact prefill chunks) take our kernel
    (kernel_rows), and a prefill chunk's rows go in as their whole aligned chunk (_in_aligned_chunks)."""
    chunk = chunking.CURRENT.get()
    if chunk is not None and chunk.ends and not dense_rows_independent(weight.dtype):
        return _in_aligned_chunks(rows.to(weight.dtype), weight, chunk)
    return _dense(_padded(rows.to(weight.dtype)), weight)[:rows.shape[0]]


@functools.cache
def dense_rows_independent(dtype: torch.dtype) -> bool:
    """Whether the dense matmul in `dtype` gives a row the same bits however many rows come with it (from
    MIN_DENSE_ROWS): in fp32, and in bf16 where the CPU has no AMX-BF16 (see dense_matmul; as for
    kernels.cpu_flags, a CPU whose flags cannot be read is taken as one without)."""
    return dtype == torch.float32 or "amx_bf16" not in kernels.cpu_flags()


def _in_aligned_chunks(rows: Tensor, weight: Tensor, chunk: chunking.PrefillChunk) -> Tensor:
    """The rows of a prefill call, each aligned chunk's at their offsets among `chunk.rows` rows (zeros elsewhere):
    oneDNN multiplies as many rows, at the same places, as for the whole chunk, however many of them the prefix cache
    supplied (chunking.py). A short chunk, or the last row alone (the output head), costs a whole chunk's rows."""
    parts = []
    for first, count, offset in chunk.placements(rows.shape[0]):
        padded = rows.new_zeros(chunk.rows, rows.shape[1])
        padded[offset:offset + count] = rows[first:first + count]
        parts.append(_dense(padded, weight)[offset:offset + count])
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _dense(x: Tensor, weight: Tensor) -> Tensor:
    """x [M, in] @ weight [out, in].T: oneDNN's matmul (fp32 through `mkldnn._linear_pointwise` where it pays)."""
    if weight.dtype == torch.float32 and weight.numel() >= ONEDNN_MIN_WEIGHTS and onednn_fp32():
        return torch.ops.mkldnn._linear_pointwise(x, weight, None, "none", [], "")
    return F.linear(x, weight)  # (bf16: torch's F.linear is oneDNN's already)


def describe_dense() -> str:
    """One line for start-up logs: what the prefill (dense) path multiplies in."""
    dtype = dense_dtype()
    library = "oneDNN" if onednn_fp32() or dtype != torch.float32 else "torch's BLAS"
    if kernels.available() and prefill_matmul.int8_requested():
        slower = {"avx2": "; slower than this path's default 16-bit GEMM, which has no int8 dot product to gain from: "
                          "0.77x on a Zen 4 held to AVX2",
                  "amx": "; slower than this CPU's default, bf16 on AMX tiles: 0.53-0.57x on a Sapphire Rapids"
                  }.get(kernels.path(), "")
        return (f"prefill matmuls: our int8 kernel's {kernels.path()} path, every call, one int8 pass a row "
                f"({prefill_matmul.ENV}=int8: llama.cpp's Q8_0 numerics, less accurate than the default{slower})")
    if kernels.available() and kernel_rows() == ALL_ROWS:
        notes = [f"{prefill_matmul.ENV}=dense: {'fp32' if dtype == torch.float32 else 'bf16'} through {library}"]
        if kernels.path() == "amx":  # (only with =row-exact: the AMX-INT8 GEMM)
            notes.insert(0, "about half as fast as this CPU's default, bf16 on AMX tiles: 0.45-0.47x on a Sapphire "
                            "Rapids")
        if prefill_matmul.available():
            notes.append(f"{prefill_matmul.ENV}=bf16: our bf16 kernel, faster, a little less accurate, not row-exact")
        if prefill_matmul.bf16_requested():
            notes.append(f"{prefill_matmul.ENV}=bf16 asked for our bf16 kernel, which is not used here: "
                         f"{prefill_matmul.unavailable_reason()}")
        problem = prefill_matmul.setting_problem()  # (a value it does not take: the default's, as `auto`)
        if problem:
            notes.append(f"{problem}, taken as auto")
        return (f"prefill matmuls: our int8 kernel's {kernels.path()} path, every call (16-bit activations, each row "
                f"as decode computes it; {'; '.join(notes)})")
    if dtype == torch.float32:
        return f"prefill matmuls: fp32 through {library} (this CPU has no native bf16)"
    if kernels.available() and prefill_matmul.enabled():
        limit = prefill_matmul.max_rows()
        how = "on AMX tiles" if prefill_matmul.path() == "amx" else "with AVX512-BF16 dot products"
        longer = f"; calls of more than {limit} rows through oneDNN" if limit is not None else ""
        return (f"prefill matmuls: bf16 {how} straight from the int8 weights, sums kept at full precision "
                f"(our kernel{longer})")
    return (f"prefill matmuls: bf16 through oneDNN (native bf16 on this CPU; our bf16 kernel not used: "
            f"{prefill_matmul.unavailable_reason()})")


def _bf16_up(exact: Tensor) -> Tensor:
    """`exact` (fp32) rounded *up* to the nearest bf16 value, as fp32."""
    scales = exact.to(COMPUTE_DTYPE)
    scales = torch.where(scales.float() < exact, torch.nextafter(scales, torch.full_like(scales, torch.inf)), scales)
    return scales.float()


def quantize_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """weight [N, K] (any float dtype) -> (int8 [N, K], fp32 scales [N]) with scale ~ absmax / 127 (see quantize)."""
    q, scales = quantize(weight, 0)
    return q, scales[:, 0]


def quantize(weight: Tensor, group_size: int = DEFAULT_GROUP_SIZE) -> tuple[Tensor, Tensor]:
    """weight [N, K] -> (int8 [N, K], fp32 scales [N, G]): one scale per row and group of `group_size` input values
    (G = ceil(K / group_size); a shorter last group), or per row (group_size 0, G = 1).

    Each scale is a bf16 value (the kernels multiply by bf16 scales, so a bf16-exact scale adds no second error):
    of absmax / 127 rounded up to bf16 and the two bf16 values below it, the one whose rounded weights are closest
    to the weight (least squares; a smaller scale clamps the largest values to +-127). On stories260K this lowers
    the squared weight error by ~7% against always rounding up, and the KL divergence to fp32 with it.
    """
    kernels.check_group_size(group_size)
    n, k = weight.shape
    size = group_size or k
    groups = -(-k // size)
    q = torch.empty(n, groups * size, dtype=torch.int8)
    scales = torch.empty(n, groups)
    rows = max(1, QUANTIZE_CHUNK // (groups * size))  # bounded temporaries: loading streams (see test_loader)
    for start in range(0, n, rows):
        q[start:start + rows], scales[start:start + rows] = _quantize_groups(_in_groups(weight[start:start + rows],
                                                                                        group_size))
    return q[:, :k].contiguous(), scales


def _in_groups(weight: Tensor, group_size: int) -> Tensor:
    """weight [R, K] -> fp32 [R, G, size]: each row in groups of `group_size` inputs (0: the whole row), the last
    group zero-padded."""
    k = weight.shape[1]
    size = group_size or k
    groups = -(-k // size)
    w = weight.float()
    return (F.pad(w, (0, groups * size - k)) if groups * size != k else w).view(-1, groups, size)


QUANTIZE_CHUNK = 1 << 22  # weights quantized at a time


def _quantize_groups(padded: Tensor) -> tuple[Tensor, Tensor]:
    """padded [R, G, size] fp32 -> (int8 [R, G * size], bf16-exact fp32 scales [R, G]); see quantize."""
    up = _bf16_up(padded.abs().amax(dim=2) / 127.0)  # [R, G]
    best_q = best_scale = best_error = None
    candidate = up.to(COMPUTE_DTYPE)
    for _ in range(3):  # absmax / 127 rounded up, then the next two bf16 values below
        scale = candidate.float()
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group stays zero
        rounded = (padded / safe[:, :, None]).round_().clamp_(-127, 127)
        error = (rounded * scale[:, :, None] - padded).square_().sum(dim=2)  # [R, G]
        if best_q is None:
            best_q, best_scale, best_error = rounded.to(torch.int8), scale, error
        else:
            better = error < best_error
            best_q = torch.where(better[:, :, None], rounded.to(torch.int8), best_q)
            best_scale = torch.where(better, scale, best_scale)
            best_error = torch.where(better, error, best_error)
        candidate = torch.nextafter(candidate, torch.zeros_like(candidate))
    return best_q.view(padded.shape[0], -1), best_scale


def group_size_of(scale: Tensor, in_features: int) -> int:
    """The group size a checkpoint's scale tensor implies: [N] or [N, 1] per channel (0), [N, G] else."""
    if scale.dim() == 1 or scale.shape[1] == 1:
        return 0
    for size in GROUP_SIZES[1:]:
        if kernels.weight_groups(in_features, size) == scale.shape[1]:
            return size
    raise ValueError(f"scales [{', '.join(map(str, scale.shape))}] fit no group size of {GROUP_SIZES[1:]} for "
                     f"{in_features} inputs")


def dequantize(q: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """int8 [N, K] and scales [N] (per channel) or [N, G] (per group) -> [N, K] in `dtype`."""
    if scales.dim() == 1 or scales.shape[1] == 1:
        return q.to(dtype) * scales.reshape(-1, 1).to(dtype)
    size = group_size_of(scales, q.shape[1])
    return q.to(dtype) * scales.to(dtype).repeat_interleave(size, dim=1)[:, :q.shape[1]]


def rows_of_call(x: Tensor, in_features: int) -> tuple[Tensor, int]:
    """x [..., in] -> (its rows [M, in], the row count that decides the call's path): a prefill chunk's path is that
    of its whole aligned chunk (batch invariance, chunking.py)."""
    rows = x.reshape(-1, in_features)
    chunk = chunking.CURRENT.get()
    return rows, chunk.rows if chunk is not None else rows.shape[0]


def kernel_takes(count: int) -> bool:
    """Whether a call deciding by `count` rows runs our kernel. Up to KERNEL_ROWS rows (every decode step) it does
    whatever kernel_rows() says, so that setting is not read (a few microseconds a call, ~200 calls a 7B step)."""
    return count <= KERNEL_ROWS or count <= kernel_rows()


def kernel_matmul(rows: Tensor, packed: kernels.PackedWeight) -> Tensor:
    """rows [M, in] through our kernel -> fp32 [M, out], or bf16 in a prefill chunk that is not row-exact."""
    out = kernels.int8_gemv(rows, packed, precise=PRECISE_ACTIVATIONS and not one_int8_pass(rows.shape[0]))
    # Prefill chunks round to bf16 as int8pack did: with fp32 outputs, test_prefix_cache found a chunk's last logits
    # differing by whether a cached prefix shortened the chunk (this kernel's rows are bitwise independent, tested;
    # the op downstream that is not, likely SDPA by its query count, is not pinned down). Row-exact chunks keep fp32,
    # as decode does: their attention is the decode kernel's, row by row.
    chunk = chunking.CURRENT.get()
    return out.to(COMPUTE_DTYPE) if chunk is not None and not chunk.row_exact else out


def one_int8_pass(count: int) -> bool:
    """Whether a call of `count` rows is prefill that INT8SERVE_PREFILL_MATMUL=int8 gives one int8 pass a row: a
    prefill chunk (the scheduler's), or a call of more rows than any decode step has (KERNEL_ROWS)."""
    # (the setting is read only for prefill: a decode step's ~200 calls through the modules do not pay for it)
    return (chunking.CURRENT.get() is not None or count > KERNEL_ROWS) and prefill_matmul.int8_requested()


# The output head's residual (Int8Linear.set_residual): the head's rounding error as 4-bit values (-7..7, stored + 8,
# two a byte) with a bf16 scale per group of the layer's scheme. 4 bits make the refined rows ~12-bit weights, which
# measure as the 8-bit residual's did (stories260K in decode's numerics: KLD 0.000418 against 0.000416,
# top-1 98.90% against 98.89%; 0.000481 / 98.75% without), at half the memory (the 7B's head:
# 66 MB and 8 MB of scales; mapped from the model cache's copy, only the pages of rows read become resident).
RESIDUAL_LEVELS = 7


def quantize_residual(error: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """error [N, K] -> (uint8 [N, ceil(K / 2)]: each value + 8 in 4 bits, inputs 2j and 2j + 1 in the low and high
    nibble of byte j; bf16 scales [N, G], one per row and weight group of `group_size` inputs, 0: one per row)."""
    n, k = error.shape
    padded = _in_groups(error, group_size)
    scales = (padded.abs().amax(dim=2) / RESIDUAL_LEVELS).to(torch.bfloat16)  # [N, G]
    safe = torch.where(scales > 0, scales.float(), 1.0)[..., None]
    codes = (padded / safe).round_().clamp_(-RESIDUAL_LEVELS, RESIDUAL_LEVELS).add_(8).to(torch.uint8)
    codes = F.pad(codes.view(n, -1)[:, :k], (0, k % 2), value=8)  # an even count: whole bytes
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous(), scales


def residual_values(packed: Tensor, in_features: int) -> Tensor:
    """quantize_residual's bytes [..., ceil(K / 2)] -> their values [..., K] in fp32 (times the scales: the error)."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).flatten(-2)[..., :in_features].float() - 8


class DequantBuffer:
    """Scratch buffers shared by all int8 layers of a model (one per dtype), grown to the largest weight they held.

    Allocating a fresh multi-megabyte temporary for each layer costs page faults on every call.
    """

    def __init__(self) -> None:
        self.data: dict[torch.dtype, Tensor] = {}

    def view(self, rows: int, cols: int, dtype: torch.dtype) -> Tensor:
        data = self.data.get(dtype)
        if data is None or data.numel() < rows * cols:
            data = self.data[dtype] = torch.empty(rows * cols, dtype=dtype)
        return data[: rows * cols].view(rows, cols)


class Int8Linear(nn.Module):
    """y = x @ (q * scale)^T with int8 q [out, in] and a scale per output channel or per group of inputs; no bias.

    One copy of the weight: `packed` (our kernel's layout) where the kernel is available, else the plain `weight`
    and `scale` tensors for torch's stock kernels.
    """

    def __init__(self, in_features: int, out_features: int, buffer: DequantBuffer | None = None,
                 refine_top: int = 0) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # The kernels' outputs are a few digits short of fp32 (int8 or bf16 activations). For the output head that is
        # visible in the token distribution, so the `refine_top` largest logits of each row are recomputed
        # exactly in fp32 from their int8 rows (a few thousand multiply-adds per row), plus the rows' rounding error
        # where the layer keeps it (set_residual).
        self.refine_top = refine_top
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32))
        # The head's rounding error in 4 bits with a scale per group (set_residual): None, or uint8 [out, in / 2]
        # (quantize_residual) and bf16 [out, groups]
        self.register_buffer("residual", None)
        self.register_buffer("residual_scale", None)
        self.register_buffer("packed_data", None)  # the packed weight with its scales (kernels.PackedWeight.data)
        self.packed: kernels.PackedWeight | None = None
        self.group_size = 0
        self.kernel_scale: Tensor | None = None  # stock path: scale in COMPUTE_DTYPE, made once by set_quantized
        self.dequant_buffer = buffer or DequantBuffer()

    def set_quantized(self, q: Tensor, scale: Tensor, group_size: int | None = None) -> None:
        """q int8 [out, in], scale fp32 [out] or [out, groups] (group_size: inferred from the shape if None)."""
        if q.shape != (self.out_features, self.in_features) or q.dtype != torch.int8:
            raise ValueError(f"int8 weight of shape {tuple(q.shape)}/{q.dtype}, expected "
                             f"{(self.out_features, self.in_features)}/int8")
        if scale.shape[:1] != (self.out_features,) or scale.dim() > 2:
            raise ValueError(f"scale of shape {tuple(scale.shape)}, expected {(self.out_features,)} or "
                             f"{(self.out_features, 'groups')}")
        group_size = group_size_of(scale, self.in_features) if group_size is None else group_size
        scale = scale.float().reshape(self.out_features, kernels.weight_groups(self.in_features, group_size))
        self.group_size = group_size
        self.residual = self.residual_scale = None  # (another weight's error)
        if kernels.available():
            self.packed = kernels.pack_weight(q, scale, group_size)
            self.weight = self.scale = self.kernel_scale = None  # the packed layout is the only copy
            # as a buffer too (the same tensor), so that the module's buffers are its memory
            self.packed_data = self.packed.data
            return
        self.packed = self.packed_data = None
        q = q.contiguous()
        if q.data_ptr() % 64:  # e.g. a slice of a memory-mapped file: int8pack crashes on unaligned weights
            q = q.clone()
        self.weight = q
        self.scale = scale[:, 0].contiguous() if group_size == 0 else scale.contiguous()
        self.kernel_scale = self.scale.to(COMPUTE_DTYPE)

    def set_packed(self, packed: kernels.PackedWeight) -> None:
        """The weight already in the kernel's layout (the model cache's copy): kept as it is, no repacking. Without
        the kernel it is unpacked into the stock path's plain weight and scales instead."""
        if (packed.out_features, packed.in_features) != (self.out_features, self.in_features):
            raise ValueError(f"packed weight of shape {(packed.out_features, packed.in_features)}, expected "
                             f"{(self.out_features, self.in_features)}")
        if not kernels.available():
            scales = packed.scales()
            self.set_quantized(kernels.unpack_weight(packed), scales[:, 0] if packed.group_size == 0 else scales,
                               packed.group_size)
            return
        self.group_size = packed.group_size
        self.packed = packed
        self.weight = self.scale = self.kernel_scale = None
        self.packed_data = packed.data
        self.residual = self.residual_scale = None  # (another weight's error)

    def set_residual(self, original: Tensor) -> None:
        """Keep what rounding `original` (the full-precision weight this layer's int8 weight was made from) left over,
        for the rows that `refine_top` recomputes: the error original - q * scale in 4 bits (quantize_residual), so
        that those rows are ~12-bit weights. Only the output head refines: its weights' rounding moves the token
        distribution more than any other layer's (stories260K against fp32, the int8 weights in fp32 math: KLD
        0.000482, 0.000412 with an exact head, 0.000417 with the head's 16 largest logits a row from exact rows;
        docs/benchmarks.md). It costs half a byte per head weight in memory, and a decode step reads `refine_top` of
        its rows."""
        if tuple(original.shape) != (self.out_features, self.in_features):
            raise ValueError(f"original weight of shape {tuple(original.shape)}, expected "
                             f"{(self.out_features, self.in_features)}")
        q, scales = self.quantized()
        codes = torch.empty(self.out_features, -(-self.in_features // 2), dtype=torch.uint8)
        residual_scales = torch.empty(self.out_features, kernels.weight_groups(self.in_features, self.group_size),
                                      dtype=torch.bfloat16)
        rows = max(1, QUANTIZE_CHUNK // self.in_features)  # bounded temporaries (the 7B's head: 0.5 GB in fp32)
        for start in range(0, self.out_features, rows):
            end = min(self.out_features, start + rows)
            error = original[start:end].float() - dequantize(q[start:end], scales[start:end])
            codes[start:end], residual_scales[start:end] = quantize_residual(error, self.group_size)
        self.set_residual_quantized(codes, residual_scales)

    def set_residual_quantized(self, codes: Tensor, scales: Tensor) -> None:
        """The residual as set_residual makes it (a checkpoint's copy): quantize_residual's uint8 [out, ceil(in / 2)]
        and scales [out, groups] in the layer's scheme (kept in bf16)."""
        if not self.refine_top:
            raise ValueError("only a layer that refines its largest outputs (the output head) keeps a residual")
        groups = kernels.weight_groups(self.in_features, self.group_size)
        expected = (self.out_features, -(-self.in_features // 2))
        if tuple(codes.shape) != expected or codes.dtype != torch.uint8:
            raise ValueError(f"residual of shape {tuple(codes.shape)}/{codes.dtype}, expected {expected}/uint8")
        if tuple(scales.shape) != (self.out_features, groups) or not scales.is_floating_point():
            raise ValueError(f"residual scales of shape {tuple(scales.shape)}/{scales.dtype}, expected "
                             f"{(self.out_features, groups)}, floating point")
        self.residual = codes.contiguous()
        self.residual_scale = scales.to(torch.bfloat16).contiguous()

    def packed_copy(self) -> kernels.PackedWeight:
        """The weight in the kernel's layout: the layer's own copy, or (stock path) one packed now."""
        if self.packed is not None:
            return self.packed
        assert self.weight is not None and self.scale is not None
        return kernels.pack_weight(self.weight, self.scale, self.group_size)

    def quantized(self) -> tuple[Tensor, Tensor]:
        """(int8 [out, in], fp32 scales [out] per channel or [out, groups]): what a checkpoint stores."""
        if self.packed is not None:
            scales = self.packed.scales()
            return kernels.unpack_weight(self.packed), scales[:, 0] if self.group_size == 0 else scales
        assert self.weight is not None and self.scale is not None
        return self.weight, self.scale

    @property
    def weight_nbytes(self) -> int:
        """Bytes of weights and scales a decode step reads."""
        if self.packed is not None:
            return self.packed.nbytes
        assert self.weight is not None and self.kernel_scale is not None
        return self.weight.nbytes + self.kernel_scale.nbytes

    def forward(self, x: Tensor) -> Tensor:
        # x [..., in] -> [..., out], same dtype as x
        rows, count = rows_of_call(x, self.in_features)
        compute = self._packed_forward if self.packed is not None else self._stock_forward
        out = compute(rows, count).reshape(*x.shape[:-1], self.out_features)
        if out.dtype is not x.dtype:
            out = out.to(x.dtype)
        return self._refine(x, out) if self.refine_top else out

    def _packed_forward(self, rows: Tensor, count: int) -> Tensor:
        # rows [M, in] -> fp32 [M, out]; `count` rows decide the path (batch invariance, chunking.py)
        assert self.packed is not None
        if kernel_takes(count):
            return kernel_matmul(rows, self.packed)
        if prefill_matmul.takes(count):  # (its CPUs multiply bf16 natively: dense_dtype() is bf16 there)
            # the same bf16 weight values, without the dequantized copy; its fp32 sums kept, not rounded to bf16 as
            # the dense path's bf16 matmul returns them (kernels/matmul.py: more accurate)
            return prefill_matmul.matmul(rows, self.packed)
        dense = self.dequant_buffer.view(self.out_features, self.in_features, dense_dtype())
        kernels.dequantize(self.packed, dense)
        return dense_matmul(rows, dense)

    def _stock_forward(self, rows: Tensor, count: int) -> Tensor:
        # rows [M, in] -> [M, out] with torch's kernels: int8pack for few rows (per channel), else dense
        assert self.weight is not None and self.kernel_scale is not None
        few_rows = count <= DENSE_ROWS_THRESHOLD
        if few_rows and self.group_size == 0 and self.in_features % KERNEL_K_MULTIPLE == 0:
            return torch._weight_int8pack_mm(rows.to(COMPUTE_DTYPE), self.weight, self.kernel_scale)
        # decode rows int8pack cannot take stay bf16: fp32 F.linear rounds a row differently depending on how many
        # rows are batched with it, and decode must be batch invariant
        dtype = COMPUTE_DTYPE if few_rows else dense_dtype()
        dense = self.dequant_buffer.view(self.out_features, self.in_features, dtype)
        # the bf16-exact scales, so that both dtypes dequantize to the same weight values
        scales = self.kernel_scale.to(dtype)
        if self.group_size:
            scales = scales.repeat_interleave(self.group_size, dim=1)[:, :self.in_features]
        torch.mul(self.weight, scales if self.group_size else scales[:, None], out=dense)
        return dense_matmul(rows, dense)

    def _rows(self, top: Tensor) -> Tensor:
        """The dequantized fp32 weight rows `top` (int64 [...]) -> [..., in], exact (int8 x bf16 scale in fp32),
        with their residual added where the layer keeps one."""
        if self.packed is not None:
            rows = kernels.weight_rows(self.packed, top).float() * kernels.row_scales(self.packed, top)
        else:
            assert self.weight is not None and self.scale is not None
            rows = self.weight[top].float() * self._spread(self.scale[top], top)
        if self.residual is not None:
            rows += residual_values(self.residual[top], self.in_features) * self._spread(
                self.residual_scale[top].float(), top)
        return rows

    def _spread(self, scales: Tensor, top: Tensor) -> Tensor:
        """The scales of rows `top` ([...] or [..., 1] per channel, [..., groups]) -> one per weight, broadcastable to
        [..., in]."""
        if self.group_size:
            return scales.repeat_interleave(self.group_size, dim=-1)[..., :self.in_features]
        return scales.reshape(*top.shape, 1)

    def _refine(self, x: Tensor, out: Tensor) -> Tensor:
        # x [..., in], out [..., out] -> out with its top-k entries per row recomputed in fp32
        flat = out.reshape(-1, self.out_features)
        if (flat.shape[0] > 1 and out.dtype == torch.float32 and out.is_contiguous()
                and kernels.kernel_threads() < torch.get_num_threads()):
            # a small decode step (model.SINGLE_THREAD_STEP_WORK): row by row, each scattered into `out` in place, so
            # that no op here is big enough for torch to run it in parallel (a parallel region waits for the busy
            # second core); each row's result is the same either way
            for inputs, row in zip(x.reshape(-1, self.in_features), flat, strict=True):
                self._refine(inputs[None], row[None])
            return out
        top = out.topk(min(self.refine_top, self.out_features), dim=-1).indices  # [..., k]
        rows = self._rows(top)  # [..., k, in]
        # multiply-and-sum rather than a batched matmul: its result for a row must not depend on the batch size
        exact = (rows * x.float()[..., None, :]).sum(-1)
        # in place: `out` is this call's own tensor, and scatter's copy of a [..., vocab] row would be a parallel
        # region (more than torch's grain of 32768 values), which on a busy machine waits for the second thread
        return out.float().scatter_(-1, top, exact).to(out.dtype)

    def extra_repr(self) -> str:
        scheme = f"per group of {self.group_size}" if self.group_size else "per channel"
        kernel = f"kernel {kernels.path()}" if self.packed is not None else "torch kernels"
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 {scheme}, {kernel}"


class StackedInt8Linear(nn.Module):
    """Int8Linear layers over the same input (q, k and v; gate and up) whose packed weights lie end to end in one
    buffer (kernels.stack_packed), so that a decode step reads them in one kernel call: one call's overhead instead of
    three, and one stream of weights that the prefetchers follow instead of three that each start cold. The outputs
    are bitwise those of the layers' own calls (the kernel computes each output row alike, whatever the rows around
    it). Each layer keeps its `packed` as a view into the buffer, so the model still holds one copy of each weight and
    every other use of a layer (checkpoints, the dense prefill path, calibration) is unchanged; calls our kernel does
    not take (long prefill chunks) go through the layers one by one.

    The layers stay where the checkpoint names them; this module keeps them in a plain tuple, not as submodules.
    """

    def __init__(self, layers: Sequence[Int8Linear]) -> None:
        super().__init__()
        if not self.can_stack(layers):
            raise ValueError("only Int8Linear layers of the same inputs holding our kernel's packed weights (and no "
                             "refined rows) can be stacked")
        parts = [layer.packed for layer in layers]
        self.packed, views, self.starts = kernels.stack_packed(parts)
        # whether the parts had to be copied into a new buffer (they did not lie end to end in one storage)
        self.copied = any(view is not part for view, part in zip(views, parts, strict=True))
        for layer, view in zip(layers, views, strict=True):
            layer.set_packed(view)
        self.layers = tuple(layers)
        self._views = tuple(views)  # what each layer holds while the stack is current
        self.in_features = self.packed.in_features

    @staticmethod
    def can_stack(layers: Sequence[nn.Module]) -> bool:
        return (all(isinstance(layer, Int8Linear) and layer.packed is not None and not layer.refine_top
                    for layer in layers)
                and kernels.can_stack([layer.packed for layer in layers]))

    def current(self) -> bool:
        """Whether each layer still holds its view into the buffer (set_quantized or set_packed since would leave
        the buffer stale: the layers are then called one by one)."""
        return all(layer.packed is view for layer, view in zip(self.layers, self._views, strict=True))

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        # x [..., in] -> one [..., out_i] per layer, each in x's dtype
        rows, count = rows_of_call(x, self.in_features)
        if not (kernel_takes(count) and self.current()):
            return tuple(layer(x) for layer in self.layers)
        out = kernel_matmul(rows, self.packed).to(x.dtype)  # [M, stacked rows]
        return tuple(out[:, start:start + layer.out_features].reshape(*x.shape[:-1], layer.out_features)
                     for layer, start in zip(self.layers, self.starts, strict=True))

    def extra_repr(self) -> str:
        sizes = "+".join(str(layer.out_features) for layer in self.layers)
        return f"in_features={self.in_features}, out_features={sizes}, one kernel call"


def _padded(rows: Tensor) -> Tensor:
    """`rows` [M, in] with zero rows added up to MIN_DENSE_ROWS, so that each row's result does not depend on M."""
    missing = MIN_DENSE_ROWS - rows.shape[0]
    return rows if missing <= 0 else torch.cat([rows, rows.new_zeros(missing, rows.shape[1])])
