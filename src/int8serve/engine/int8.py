"""Weight-only int8: symmetric per-output-channel quantization and the linear layer that runs on it.

Decode reads every weight once per step, so its speed is the speed at which int8 weights stream from memory.
Measured (benchmarks/engine.py, docs/benchmarks.md) the fastest stock kernel for a few rows is
`torch._weight_int8pack_mm` with **bf16** activations and bf16 scales (fp32 or fp16 activations are ~10x slower).
Prefill is compute-bound instead: there each weight is dequantized into one reused buffer and multiplied with
`F.linear`. The buffer is bf16 on CPUs with native bf16 arithmetic (AVX-512 BF16 or AMX); elsewhere bf16 matmuls
are emulated and fp32 is faster (AVX2 EPYC, 128 x 4096 x 4096: bf16 307 ms, fp32 66 ms), so it is fp32 there.
The residual stream, norms and logits stay in fp32 around it.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import chunking

COMPUTE_DTYPE = torch.bfloat16
# Above this many rows a layer dequantizes into a scratch buffer and uses a dense bf16 matmul.
# Chosen by measurement (benchmarks/engine.py --kernels, docs/benchmarks.md): per 7B block int8pack is faster up
# to 32 rows and the dense path from 64. The two paths agree to bf16 rounding.
DENSE_ROWS_THRESHOLD = 32
MIN_DENSE_ROWS = 16  # fp32 F.linear rounds a row by how many rows come with it below ~12: pad to this many
# torch 2.13's CPU `_weight_int8pack_mm` segfaults unless in_features is a multiple of 16 (and the weight is
# 64-byte aligned, see set_quantized)
# (measured: K = 8, 12, 36, 100, 168, 172 crash; 16, 160, 176, 4096, 11008 work). Other widths take the dense path.
KERNEL_K_MULTIPLE = 16


@functools.cache
def dense_dtype() -> torch.dtype:
    """The dtype of the prefill (dense) path: bf16 where the CPU multiplies bf16 natively, else fp32."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:  # not Linux: keep bf16, the measured choice on CPUs with native bf16
        return COMPUTE_DTYPE
    return COMPUTE_DTYPE if flags & {"avx512_bf16", "amx_bf16"} else torch.float32


def quantize_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """weight [N, K] (any float dtype) -> (int8 [N, K], fp32 scales [N]) with scale ~ absmax / 127.

    Each scale is rounded *up* to the nearest bf16 value before the weights are rounded against it: the kernel
    multiplies by bf16 scales, and a scale that is exact in bf16 adds no second, per-channel systematic error.
    """
    w = weight.float()
    exact = w.abs().amax(dim=1) / 127.0
    scales = exact.to(COMPUTE_DTYPE)
    scales = torch.where(scales.float() < exact, torch.nextafter(scales, torch.full_like(scales, torch.inf)), scales)
    scales = scales.float()
    safe = torch.where(scales > 0, scales, torch.ones_like(scales))  # an all-zero row stays zero
    q = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize(q: Tensor, scales: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return q.to(dtype) * scales.to(dtype)[:, None]


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
    """y = x @ (q * scale)^T with int8 q [out, in] and one scale per output channel; no bias (Llama has none)."""

    def __init__(self, in_features: int, out_features: int, buffer: DequantBuffer | None = None,
                 refine_top: int = 0) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        # The kernels round their outputs to bf16 (about 3 significant digits). For the output head that is
        # visible in the token distribution, so the `refine_top` largest logits of each row are recomputed
        # exactly in fp32 from their int8 rows (a few thousand multiply-adds per row).
        self.refine_top = refine_top
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.empty(out_features, dtype=torch.float32))
        self.kernel_scale: Tensor | None = None  # scale in COMPUTE_DTYPE, made once by prepare()
        self.dequant_buffer = buffer or DequantBuffer()

    def set_quantized(self, q: Tensor, scale: Tensor) -> None:
        if q.shape != (self.out_features, self.in_features) or q.dtype != torch.int8:
            raise ValueError(f"int8 weight of shape {tuple(q.shape)}/{q.dtype}, expected "
                             f"{(self.out_features, self.in_features)}/int8")
        if scale.shape != (self.out_features,):
            raise ValueError(f"scale of shape {tuple(scale.shape)}, expected {(self.out_features,)}")
        q = q.contiguous()
        if q.data_ptr() % 64:  # e.g. a slice of a memory-mapped file: the kernel crashes on unaligned weights
            q = q.clone()
        self.weight = q
        self.scale = scale.float().contiguous()
        self.kernel_scale = self.scale.to(COMPUTE_DTYPE)

    def forward(self, x: Tensor) -> Tensor:
        # x [..., in] -> [..., out], same dtype as x
        rows = x.reshape(-1, self.in_features)
        if self.kernel_scale is None:
            self.kernel_scale = self.scale.to(COMPUTE_DTYPE)
        chunk = chunking.CURRENT.get()  # a prefill chunk: the path of its whole aligned chunk (chunking.py)
        few_rows = (chunk.rows if chunk is not None else rows.shape[0]) <= DENSE_ROWS_THRESHOLD
        if few_rows and self.in_features % KERNEL_K_MULTIPLE == 0:
            out = torch._weight_int8pack_mm(rows.to(COMPUTE_DTYPE), self.weight, self.kernel_scale)
        else:
            # decode rows of a width the kernel cannot take stay bf16: fp32 F.linear rounds a row differently
            # depending on how many rows are batched with it, and decode must be batch invariant
            dtype = COMPUTE_DTYPE if few_rows else dense_dtype()
            dense = self.dequant_buffer.view(self.out_features, self.in_features, dtype)
            # the bf16-exact scales, so that both dtypes dequantize to the same weight values
            torch.mul(self.weight, self.kernel_scale.to(dense.dtype)[:, None], out=dense)
            out = F.linear(_padded(rows.to(dense.dtype)), dense)[:rows.shape[0]]
        out = out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return self._refine(x, out) if self.refine_top else out

    def _refine(self, x: Tensor, out: Tensor) -> Tensor:
        # x [..., in], out [..., out] -> out with its top-k entries per row recomputed in fp32
        top = out.topk(min(self.refine_top, self.out_features), dim=-1).indices  # [..., k]
        rows = self.weight[top].float()  # [..., k, in]
        # multiply-and-sum rather than a batched matmul: its result for a row must not depend on the batch size
        exact = (rows * x.float()[..., None, :]).sum(-1) * self.scale[top]
        return out.float().scatter(-1, top, exact).to(out.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def _padded(rows: Tensor) -> Tensor:
    """`rows` [M, in] with zero rows added up to MIN_DENSE_ROWS, so that each row's result does not depend on M."""
    missing = MIN_DENSE_ROWS - rows.shape[0]
    return rows if missing <= 0 else torch.cat([rows, rows.new_zeros(missing, rows.shape[1])])
