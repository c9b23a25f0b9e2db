"""The int8 KV cache's rows, in torch: the same format and the same bits as the attention kernel's (attention.cpp,
"int8 cache rows").

A decode step reads every key and value of its rows' past positions: on the 7B shape at 4 rows of 512/384/256/128
positions that is 0.67 GB of bf16, 10% of a step's bytes beside the 7 GB of int8 weights, and at 4 x 2048 positions
4.3 GB, more than half. Stored as int8 with an fp32 scale per 32 values (as llama.cpp's `-ctk q8_0`), a head of 128 is
144 bytes a row instead of 256: the cache takes 0.56x the memory and decode attention reads 0.56x the bytes.

A row of the cache (one key or value of one kv head at one position) is `width(head_dim)` int8 bytes: head_dim values,
then, from the next multiple of 4 bytes, one fp32 scale per group of GROUP values (the last group may be shorter).
value[d] = int8[d] * scale[d // GROUP]. Each group is quantized on its own, symmetric: scale = max |x| / 127 and
int8 = round half to even (x / scale), clamped to [-127, 127]; a group of zeros gets scale 0, and a NaN the division
makes is stored as 0. The kernel writes the rows of decode steps and row-exact prefill chunks; the torch path (the
prefill chunks SDPA computes, and decode without the kernel) writes and reads them through kernels/attention.py's
`quantize_into` and `dequantize_rows` (these functions' bits, one C++ call each), or through `quantize` and
`dequantize` here where the library is not available.
"""

from __future__ import annotations

import torch
from torch import Tensor

GROUP = 32  # values a scale (kQ8Group in attention.cpp)


def groups(head_dim: int) -> int:
    return -(-head_dim // GROUP)


def scales_at(head_dim: int) -> int:
    """The byte where a row's scales start (head_dim rounded up to 4: the fp32 scales are aligned in the row)."""
    return -(-head_dim // 4) * 4


def width(head_dim: int) -> int:
    """Bytes in a row of the int8 cache."""
    return scales_at(head_dim) + 4 * groups(head_dim)


def row_size(head_dim: int, dtype: torch.dtype) -> int:
    """Elements in a row of a KV cache of `dtype`: head_dim, or an int8 cache's width(head_dim) bytes."""
    return width(head_dim) if dtype == torch.int8 else head_dim


def quantize(x: Tensor) -> Tensor:
    """fp32 [..., head_dim] -> int8 rows [..., width(head_dim)], bitwise as the kernel stores them."""
    x = x.float()
    head_dim = x.shape[-1]
    n = groups(head_dim)
    padded = torch.nn.functional.pad(x, (0, n * GROUP - head_dim)).unflatten(-1, (n, GROUP))  # [..., n, GROUP]
    magnitude = padded.abs()
    top = torch.where(magnitude.isnan(), 0.0, magnitude).amax(-1, keepdim=True)  # a NaN never wins, as in C++
    scale = top / 127.0
    rounded = torch.round(padded / scale)  # half to even, as nearbyint
    values = torch.where((scale > 0) & ~rounded.isnan(), rounded.clamp(-127, 127), 0.0)
    rows = torch.zeros(*x.shape[:-1], width(head_dim), dtype=torch.int8)
    rows[..., :head_dim] = values.flatten(-2)[..., :head_dim].to(torch.int8)
    rows[..., scales_at(head_dim):] = scale.squeeze(-1).contiguous().view(torch.int8)
    return rows


def dequantize(rows: Tensor, head_dim: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """int8 rows [..., width(head_dim)] -> [..., head_dim] of `dtype`: each value int8 * its group's scale, in fp32."""
    n = groups(head_dim)
    start = scales_at(head_dim)
    scale = rows[..., start:start + 4 * n].contiguous().view(torch.float32)  # [..., n]
    if head_dim % GROUP == 0:  # whole groups: each scale over its 32 values by broadcasting (no expanded copy)
        values = rows[..., :head_dim].unflatten(-1, (n, GROUP)).float()
        return (values * scale[..., None]).flatten(-2).to(dtype)
    expanded = scale.repeat_interleave(GROUP, dim=-1)[..., :head_dim]
    return (rows[..., :head_dim].float() * expanded).to(dtype)
