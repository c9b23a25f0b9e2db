"""Error-compensating int8 quantization (GPTQ): how full-precision weights become int8 by default.

Rounding each weight to its nearest int8 step (round-to-nearest, `int8.quantize`) treats the rounding errors of a
row as independent, though they add up in the layer's output. GPTQ (Frantar et al., 2022; gpt-fast's `GPTQ.py` is
another small implementation) quantizes a layer's input columns one at a time and moves each column's rounding
error onto the columns not yet quantized, weighted by how the layer's inputs vary together (H = Xᵀ X, the Hessian
of the squared output error, from calibration text run through the model), so that the outputs move as little as
the int8 grid allows. The int8 format does not change: the same int8 values and bf16 scales per group, which the
kernels read as before; only which int8 value each weight gets differs.

Scales are chosen as `int8.quantize` chooses them (bf16, least squares among three candidates), for each group
from its weights as they stand when the group is reached (GPTQ's "group" option), per output channel from the
original row. Measured on stories260K (docs/benchmarks.md "int8 accuracy").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from . import int8, kernels

__all__ = ["BLOCK_COLUMNS", "DAMPING", "InputCovariance", "quantize_gptq"]

DAMPING = 0.01  # of the mean diagonal, added to H's diagonal: H from a few thousand tokens is singular
BLOCK_COLUMNS = 128  # columns quantized before their errors are pushed to the rest in one matmul (a multiple of 32)


class InputCovariance:
    """H = Σ xᵀx over the calibration rows a layer received: [in, in] fp32."""

    def __init__(self, in_features: int) -> None:
        self.matrix = torch.zeros(in_features, in_features)
        self.rows = 0

    def add(self, x: Tensor) -> None:
        rows = x.reshape(-1, x.shape[-1]).float()  # [M, in]
        self.matrix.addmm_(rows.T, rows)
        self.rows += rows.shape[0]


def quantize_gptq(weight: Tensor, hessian: Tensor, group_size: int = int8.DEFAULT_GROUP_SIZE,
                  damping: float = DAMPING) -> tuple[Tensor, Tensor]:
    """weight [N, K], hessian [K, K] -> (int8 [N, K], fp32 scales [N, G]) in `int8.quantize`'s format."""
    kernels.check_group_size(group_size)
    n, k = weight.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian of shape {tuple(hessian.shape)} for a weight of {k} inputs")
    w = weight.float().clone()
    upper = _inverse_hessian_factor(hessian, w, damping)  # [K, K]
    size = group_size or k
    q = torch.empty(n, k, dtype=torch.int8)
    scales = torch.empty(n, -(-k // size))
    scale = _group_scales(w) if group_size == 0 else None  # [N]
    if scale is not None:
        scales[:, 0] = scale
    for start in range(0, k, BLOCK_COLUMNS):
        end = min(k, start + BLOCK_COLUMNS)
        block = w[:, start:end]  # a view: updated in place
        errors = torch.empty(n, end - start)
        with _one_thread():
            for j in range(end - start):
                column = start + j
                if group_size and column % group_size == 0:
                    scale = scales[:, column // group_size] = _group_scales(w[:, column:column + group_size])
                assert scale is not None
                safe = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group stays zero
                rounded = (block[:, j] / safe).round_().clamp_(-127, 127)
                q[:, column] = rounded.to(torch.int8)
                error = (block[:, j] - rounded * scale) / upper[column, column]
                block[:, j:].sub_(error[:, None] * upper[column, column:end][None, :])
                errors[:, j] = error
        if end < k:
            w[:, end:].sub_(errors @ upper[start:end, end:])  # the one big matmul of a block: every thread
    return q, scales


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """The column loop's many small ops on one thread: with two, each op waits on the other thread, and on a busy
    machine that wait dominates (measured, a 1536 x 576 layer on 2 loaded cores: 3.4 s with 2 threads, 0.11 s
    with 1)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _group_scales(columns: Tensor) -> Tensor:
    """columns [N, size] -> the bf16-exact scale `int8.quantize` would choose for each row [N]."""
    return int8._quantize_groups(columns.reshape(columns.shape[0], 1, columns.shape[1]))[1][:, 0]


def _inverse_hessian_factor(hessian: Tensor, weight: Tensor, damping: float) -> Tensor:
    """The upper Cholesky factor of (H + damping)⁻¹; inputs never seen (zero diagonal) get their weights zeroed."""
    h = hessian.float().clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    weight[:, dead] = 0.0
    h.diagonal().add_(damping * torch.diagonal(h).mean())
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True)
