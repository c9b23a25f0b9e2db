"""The feed-forward gate of int8 models, silu(gate) * up, in one C++ pass (activation.cpp); and their RMSNorm, a row
per pass (one call instead of six torch ops a row, ~65 a 7B decode step).

Each element goes through the same operations wherever it sits, so a row's result does not depend on the rows that
come with it (torch's SiLU rounds the tail of a call differently, which is why the model otherwise calls it row by
row: `model.silu_rows`). A 512-token chunk of the 7B shape: 512 torch calls a layer and a separate product pass,
against one call here. The paths (avx512, avx2, scalar) give the same bits; "auto" takes the widest this CPU runs,
and INT8SERVE_ACTIVATION forces one (benchmarks hold an engine to AVX2 code with it, as on a CPU without AVX-512).
Without the library (no compiler, INT8SERVE_KERNELS=0) `available()` is False and the model keeps torch's SiLU.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from ..variables import env_choice
from .builds import build
from .library import Loaded, kernel_threads, load_library, open_library, required

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("activation.cpp")
ABI_VERSION = 3  # must match i8e_abi_version() in activation.cpp
ENV = "INT8SERVE_ACTIVATION"
Impl = Literal["auto", "avx512", "avx2", "scalar"]
IMPLS: dict[str, int] = {"auto": 0, "avx512": 1, "avx2": 2, "scalar": 3}
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def _open(path: Path) -> ctypes.CDLL:
    lib = open_library(path, "i8e_abi_version", ABI_VERSION)
    lib.i8e_resolve.argtypes = [_INT]
    lib.i8e_resolve.restype = _INT
    lib.i8e_silu_mul.argtypes = [_P, _P, _P, _I64, _INT, _INT]
    lib.i8e_silu_mul.restype = _INT
    lib.i8e_silu_mul_rows.argtypes = [_P, _P, _P, _I64, _I64, _I64, _I64, _INT, _INT]
    lib.i8e_silu_mul_rows.restype = _INT
    lib.i8e_rms_norm.argtypes = [_P, _P, _P, _I64, _I64, ctypes.c_float, _INT, _INT]
    lib.i8e_rms_norm.restype = _INT
    lib.i8e_add_rms_norm.argtypes = [_P, _P, _P, _P, _I64, _I64, ctypes.c_float, _INT, _INT]
    lib.i8e_add_rms_norm.restype = _INT
    return lib


@functools.cache
def _load() -> Loaded:
    """The loaded library, or the reason it cannot be used (logged once)."""
    loaded = load_library(SOURCE, _open, build)
    if isinstance(loaded, str):
        log.warning("SiLU kernel not available, the feed-forward calls torch's SiLU row by row: %s", loaded)
    return loaded


def available() -> bool:
    return not isinstance(_load(), str)


def runs(impl: Impl) -> bool:
    """Whether this CPU runs the path `impl` (False without the library)."""
    loaded = _load()
    return not isinstance(loaded, str) and loaded.i8e_resolve(IMPLS[impl]) >= 0


def _library() -> ctypes.CDLL:
    """The loaded library; RuntimeError with the reason when there is none."""
    return required(_load(), "the SiLU kernel is not available")


def resolve(impl: Impl | None = None) -> str:
    """The path `impl` (None: the setting) runs on this CPU ("auto" -> the widest). RuntimeError without the
    library or when the CPU cannot run it."""
    loaded = _library()
    impl = setting() if impl is None else impl
    code = loaded.i8e_resolve(IMPLS[impl])
    if code < 0:
        raise RuntimeError(f"this CPU cannot run the {impl} SiLU path ({ENV})")
    return {v: k for k, v in IMPLS.items()}[code]


def setting() -> Impl:
    """INT8SERVE_ACTIVATION: auto (default), avx512, avx2 or scalar. ValueError for anything else."""
    return env_choice(ENV, IMPLS)  # type: ignore[return-value]


def silu_mul(gate: Tensor, up: Tensor, impl: Impl | None = None) -> Tensor:
    """silu(gate) * up for fp32 tensors of one shape -> a new contiguous fp32 tensor, on path `impl` (None: the
    INT8SERVE_ACTIVATION setting). Rows that sit apart in memory with one stride (gate and up as views of a stacked
    projection's output) are read in place. RuntimeError without the library or when the CPU cannot run the path."""
    impl = setting() if impl is None else impl
    loaded = _library()
    if gate.shape != up.shape or gate.dtype != torch.float32 or up.dtype != torch.float32:
        raise ValueError(f"gate and up must be fp32 of one shape, got {gate.dtype} {tuple(gate.shape)} and "
                         f"{up.dtype} {tuple(up.shape)}")
    out = torch.empty(gate.shape, dtype=torch.float32)
    if out.numel() == 0:
        return out
    n = gate.shape[-1] if gate.dim() else 1
    gate_rows, up_rows = _rows(gate, n), _rows(up, n)
    if gate_rows.stride(0) != up_rows.stride(0):
        gate_rows, up_rows = gate_rows.contiguous(), up_rows.contiguous()
    status = loaded.i8e_silu_mul_rows(gate_rows.data_ptr(), up_rows.data_ptr(), out.data_ptr(), gate_rows.shape[0], n,
                                      max(gate_rows.stride(0), n), n, IMPLS[impl], kernel_threads())
    if status != 0:
        raise RuntimeError(f"i8e_silu_mul_rows failed with status {status}: the {impl} SiLU path ({ENV})")
    return out


def _rows(t: Tensor, n: int) -> Tensor:
    """`t` as [rows, n] with unit stride along a row: a view where the layout allows, else a contiguous copy."""
    rows = t.reshape(-1, n)
    return rows if rows.stride(1) == 1 or n == 1 else rows.contiguous()


def rms_norm(x: Tensor, weight: Tensor, eps: float, impl: Impl | None = None) -> Tensor:
    """weight * (x * rsqrt(mean(x * x) + eps)) over the last dimension of fp32 `x` -> a new fp32 tensor, each row on
    its own with the same bits on every path (activation.cpp). RuntimeError without the library or when the CPU
    cannot run the path; ValueError for other dtypes or shapes."""
    impl = setting() if impl is None else impl
    loaded = _library()
    dim = x.shape[-1]
    if x.dtype is not torch.float32 or weight.shape != (dim,) or dim == 0:
        raise ValueError(f"x must be fp32 [..., {weight.shape[0]}] for a weight of {tuple(weight.shape)}, got "
                         f"{x.dtype} {tuple(x.shape)}")
    x = x.contiguous()
    weight = weight.to(torch.float32).contiguous()
    out = torch.empty_like(x)
    status = loaded.i8e_rms_norm(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // dim, dim, eps,
                                 IMPLS[impl], kernel_threads())
    if status != 0:
        raise RuntimeError(f"i8e_rms_norm failed with status {status}: the {impl} path ({ENV}) or the sizes")
    return out


def add_rms_norm(x: Tensor, delta: Tensor, weight: Tensor, eps: float, impl: Impl | None = None) -> Tensor:
    """x += delta in place (a residual add), then RMSNorm of the new x as `rms_norm` gives it -> a new fp32 tensor;
    one pass (activation.cpp). x must be contiguous fp32, delta fp32 of x's shape."""
    impl = setting() if impl is None else impl
    loaded = _library()
    dim = x.shape[-1]
    if (x.dtype is not torch.float32 or delta.dtype is not torch.float32 or delta.shape != x.shape
            or weight.shape != (dim,) or dim == 0 or not x.is_contiguous()):
        raise ValueError(f"x must be contiguous fp32 [..., {weight.shape[0]}] and delta fp32 of its shape, got x "
                         f"{x.dtype} {tuple(x.shape)} and delta {delta.dtype} {tuple(delta.shape)}")
    delta = delta.contiguous()
    weight = weight.to(torch.float32).contiguous()
    out = torch.empty_like(x)
    status = loaded.i8e_add_rms_norm(x.data_ptr(), delta.data_ptr(), weight.data_ptr(), out.data_ptr(),
                                     x.numel() // dim, dim, eps, IMPLS[impl], kernel_threads())
    if status != 0:
        raise RuntimeError(f"i8e_add_rms_norm failed with status {status}: the {impl} path ({ENV}) or the sizes")
    return out
