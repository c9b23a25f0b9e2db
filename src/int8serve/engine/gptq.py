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

__all__ = ["BLOCK_COLUMNS", "DAMPING", "InputCovariance", "InverseHessianFactor", "quantize_gptq"]

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


class InverseHessianFactor:
    """What GPTQ needs of one H, computed once for all the layers that share an input (wq, wk and wv; w1 and w3).

    `upper` [K, K] is the upper Cholesky factor of (H + damping)⁻¹; `dead` [K] marks the inputs never seen (a zero
    diagonal), whose weights are zeroed. `InverseHessianFactor(H)` leaves H as it is (it works on a copy);
    `InverseHessianFactor.taking(covariance)` works in the covariance's own memory and frees it as soon as it can:
    for the 7B's 11008 inputs each [K, K] matrix is 0.48 GB, and the first start's peak memory is the int8 model plus
    one block's quantization."""

    def __init__(self, hessian: Tensor, damping: float = DAMPING) -> None:
        self.dead, self.upper = _factor([hessian.float().clone()], damping)

    @classmethod
    def taking(cls, covariance: InputCovariance, damping: float = DAMPING) -> InverseHessianFactor:
        """The factor of `covariance.matrix`, which is damped and factored in place, then dropped (set to None)."""
        factor = cls.__new__(cls)
        held = [covariance.matrix.float()]  # the same tensor when it is fp32: the list holds the only reference
        covariance.matrix = None
        factor.dead, factor.upper = _factor(held, damping)
        return factor


def quantize_gptq(weight: Tensor, hessian: Tensor | InverseHessianFactor, group_size: int = int8.DEFAULT_GROUP_SIZE,
                  damping: float = DAMPING) -> tuple[Tensor, Tensor]:
    """weight [N, K], hessian [K, K] (or its factor) -> (int8 [N, K], fp32 scales [N, G]) in `int8.quantize`'s
    format."""
    kernels.check_group_size(group_size)
    n, k = weight.shape
    if isinstance(hessian, InverseHessianFactor):
        factor = hessian
        if factor.upper.shape != (k, k):
            raise ValueError(f"a factor of shape {tuple(factor.upper.shape)} for a weight of {k} inputs")
    elif hessian.shape != (k, k):
        raise ValueError(f"hessian of shape {tuple(hessian.shape)} for a weight of {k} inputs")
    else:
        factor = InverseHessianFactor(hessian, damping)
    upper = factor.upper
    # Columns as rows ([K, N]): the loop below reads and updates one input column at a time, which in the [N, K]
    # layout is N scattered floats (measured, 4096 x 11008: most of the time went to those cache misses).
    w_t = torch.empty(k, n).copy_(weight.T)  # [K, N] fp32, in one allocation whatever the weight's dtype
    w_t[factor.dead] = 0.0
    size = group_size or k
    q_t = torch.empty(k, n, dtype=torch.int8)
    scales = torch.empty(n, -(-k // size))
    scale = _group_scales(w_t.T) if group_size == 0 else None  # [N]
    if scale is not None:
        scales[:, 0] = scale
    diagonal = upper.diagonal().tolist()
    rounded = torch.empty(BLOCK_COLUMNS, n)  # a block's rounded columns, made int8 in one op once it is done
    for start in range(0, k, BLOCK_COLUMNS):
        end = min(k, start + BLOCK_COLUMNS)
        block = w_t[start:end]  # [B, N], a view: updated in place
        block_upper = upper[start:end, start:end]  # [B, B]
        errors = torch.empty(end - start, n)
        with _one_thread():
            for j in range(end - start):
                column = start + j
                if column == 0 or (group_size and column % group_size == 0):  # a new group: its scales
                    if group_size:
                        scale = scales[:, column // group_size] = _group_scales(w_t[column:column + group_size].T)
                    assert scale is not None
                    safe = torch.where(scale > 0, scale, 1.0)  # an all-zero group stays zero
                weights, error, levels = block[j], errors[j], rounded[j]
                torch.div(weights, safe, out=levels).round_().clamp_(-127, 127)
                # error = (weights - levels * scale) / U[column, column], spread over the block's later columns
                torch.mul(levels, scale, out=error)
                torch.sub(weights, error, out=error).div_(diagonal[column])
                block[j + 1:].addr_(block_upper[j, j + 1:], error, alpha=-1)  # no [B, N] temporary
        q_t[start:end].copy_(rounded[:end - start])
        if end < k:
            # the one big matmul of a block, on every thread, in place (no [K - end, N] temporary)
            w_t[end:].addmm_(upper[start:end, end:].T, errors, alpha=-1)
    return q_t.T.contiguous(), scales


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


def _factor(held: list[Tensor], damping: float) -> tuple[Tensor, Tensor]:
    """held = [H] (taken out of the list: its only reference) -> (dead inputs [K], U upper with (H + damping)⁻¹ = Uᵀ U),
    without forming the inverse.

    With J the order-reversing permutation and L the lower Cholesky factor of J H J: H = (J L J)(J L J)ᵀ, so
    H⁻¹ = Uᵀ U with U = (J L J)⁻¹ = J L⁻¹ J, upper. One factorization and one triangular inverse (2/3 K³ flops)
    instead of GPTQ's usual Cholesky, inverse and second Cholesky (5/3 K³): for the 11008-input layer of the 7B,
    most of a block's quantization time (benchmarks/gptq.py). H is freed once reversed: at most two [K, K] matrices
    are alive at once, and a quarter of one."""
    h = held.pop()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    h.diagonal().add_(damping * torch.diagonal(h).mean())
    lower = h.flip(0, 1)
    del h
    torch.linalg.cholesky(lower, out=lower)
    inverse = torch.empty_like(lower)
    _invert_lower_into(lower, inverse)
    del lower
    return dead, inverse.flip(0, 1)


def _invert_lower_into(lower: Tensor, out: Tensor) -> None:
    """out = lower⁻¹ (lower triangular [K, K]), by halves: [[A, 0], [C, D]]⁻¹ = [[A⁻¹, 0], [-D⁻¹ C A⁻¹, D⁻¹]].

    Most of the work lands in matrix products (K³/3 flops); `solve_triangular` against the identity does K³ and
    took 3x the Cholesky's time for K = 11008 (measured on 2 cores)."""
    k = lower.shape[0]
    if k <= 256:
        out.copy_(torch.linalg.solve_triangular(lower, torch.eye(k, dtype=lower.dtype), upper=False))
        return
    half = k // 2
    _invert_lower_into(lower[:half, :half], out[:half, :half])
    _invert_lower_into(lower[half:, half:], out[half:, half:])
    out[:half, half:] = 0
    out[half:, :half] = -(out[half:, half:] @ lower[half:, :half]) @ out[:half, :half]
