"""Decode attention for every row of a step in one C++ call (attention.cpp), batch invariant by construction; also
the attention of row-exact prefill chunks (several rows of one slot, each computed as its decode step would be).

The torch path attends one row at a time in Python and converts each row's whole cache slice to fp32 first: on the
7B shape that was most of the ~126 ms a batch-4 step spent outside the matmuls. Padding the rows to one length and
masking would batch it in torch, but a row's reductions would then run over the batch's longest length, and its
bits would change with what else is in the batch. The kernel instead runs one (row, kv head) task per thread, in an
order that depends only on that row: rotary embedding, cache write (the bits torch would write) and attention in
fp32 over the row's own positions.

Paths: "avx512", "avx2" and "scalar", chosen from the CPU's flags ("auto"), or forced with INT8SERVE_ATTENTION
(also "torch": the old per-row torch path). The library is built and loaded like gemv.cpp (builds.build and
library.load_library: same cache, same compiler); without a compiler, or with INT8SERVE_KERNELS=0, `available()` is
False, the reason is logged once, and the model keeps its torch path.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from .. import kv_int8
from ..variables import env_choice
from .builds import build
from .library import Loaded, kernel_threads, load_library, open_library, required

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("attention.cpp")
ABI_VERSION = 4  # must match i8a_abi_version() in attention.cpp
ENV = "INT8SERVE_ATTENTION"
Impl = Literal["auto", "avx512", "avx2", "scalar"]
IMPLS: dict[str, int] = {"auto": 0, "avx512": 1, "avx2": 2, "scalar": 3}
SETTINGS = (*IMPLS, "torch")
# cache dtypes the kernel reads and writes; int8: rows of int8 values and fp32 scales (kv_int8.py)
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.int8: 3}
STATUS = {-1: "the CPU cannot run this path", -2: "unsupported cache dtype", -3: "bad sizes",
          -4: "a slot or position out of range, or a slot twice at one position"}
_P, _I64, _INT, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


def _open(path: Path) -> ctypes.CDLL:
    lib = open_library(path, "i8a_abi_version", ABI_VERSION)
    lib.i8a_cpu_paths.restype = _INT
    lib.i8a_resolve.argtypes = [_INT]
    lib.i8a_resolve.restype = _INT
    lib.i8a_decode.argtypes = [_P, _P, _P, _I64, _I64, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _P, _P, _I64, _I64,
                               _I64, _INT, _F32, _P, _INT, _INT]
    lib.i8a_decode.restype = _INT
    lib.i8a_dequantize.argtypes = [_P, _I64, _I64, _I64, _I64, _P, _INT, _INT]
    lib.i8a_dequantize.restype = _INT
    lib.i8a_quantize.argtypes = [_P, _I64, _I64, _I64, _I64, _I64, _P, _I64, _INT]
    lib.i8a_quantize.restype = _INT
    return lib


@functools.cache
def _load() -> Loaded:
    """The loaded library, or the reason it cannot be used (logged once)."""
    loaded = load_library(SOURCE, _open, build)
    if isinstance(loaded, str):
        log.warning("attention kernel not available, decode attends row by row in torch: %s", loaded)
    return loaded


def available() -> bool:
    return not isinstance(_load(), str)


def unavailable_reason() -> str | None:
    loaded = _load()
    return loaded if isinstance(loaded, str) else None


def _library() -> ctypes.CDLL:
    """The loaded library; RuntimeError with the reason when there is none."""
    return required(_load(), "the attention kernel is not available")


def cpu_paths() -> list[str]:
    """The paths this CPU can run (scalar always, when the library is loaded)."""
    mask = _library().i8a_cpu_paths()
    return ["scalar", *(["avx2"] if mask & 1 else []), *(["avx512"] if mask & 2 else [])]


def resolve(impl: Impl = "auto") -> str:
    """The path `impl` runs on this CPU ("auto" -> the widest); ValueError if the CPU cannot run it."""
    code = _library().i8a_resolve(IMPLS[impl])
    if code < 0:
        raise ValueError(f"this CPU cannot run the {impl} attention path")
    return {v: k for k, v in IMPLS.items()}[code]


def setting() -> Impl | Literal["torch"]:
    """INT8SERVE_ATTENTION: auto (default), avx512, avx2, scalar, or torch (the per-row torch path)."""
    return env_choice(ENV, SETTINGS)  # type: ignore[return-value]


def set_setting(value: str) -> None:
    """Set INT8SERVE_ATTENTION for this process (benchmarks compare paths in one run)."""
    if value not in SETTINGS:
        raise ValueError(f"{ENV}={value!r}: expected one of {', '.join(SETTINGS)}")
    os.environ[ENV] = value


def heads_together(impl: Impl, decode_rows: int, kv_heads: int, threads: int) -> int:
    """How many kv heads of a row one task of a decode call reads side by side on `impl`'s path (attention.cpp's
    heads_together: up to 4, fewer where that would leave a thread without two tasks)."""
    function = _library().i8a_heads_together  # declared here: a benchmark opens older builds without it
    function.argtypes, function.restype = [_INT, _I64, _I64, _INT], _I64
    together = function(IMPLS[impl], decode_rows, kv_heads, threads)
    if together < 0:
        raise ValueError(f"this CPU cannot run the {impl} path")
    return together


def decode_attention(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, slots: Tensor, positions: Tensor,
                     cache_k: Tensor, cache_v: Tensor, impl: Impl = "auto", library: ctypes.CDLL | None = None
                     ) -> Tensor:
    """One new token per row: rope, cache write at [slot, :, position], attention over [0, position].

    q [B, H, D], k/v [B, Hkv, D] fp32 before rope; cos/sin [P, D] fp32 tables; slots/positions int64 [B] (distinct
    (slot, position) pairs); cache_k/cache_v [S, Hkv, L, D] fp32, bf16 or fp16, or int8 rows [S, Hkv, L,
    kv_int8.width(D)], contiguous. Returns fp32 [B, H, D].
    Row b's output depends only on row b's inputs and its slot's keys [0, position]. Rows may share a slot (the rows
    of a prefill chunk): every row's key and value are written before any row attends, so a row sees the rows of its
    slot before it, computed exactly as a decode step at its position would compute it. `library`: another build of
    attention.cpp, opened with `_open` (benchmarks compare builds), instead of this module's.
    """
    batch, heads, dim = q.shape
    kv_heads, max_len = cache_k.shape[1], cache_k.shape[2]
    _check(q, k, v, cos, sin, slots, positions, cache_k, cache_v)
    out = torch.empty(batch, heads, dim, dtype=torch.float32)
    args = (q.data_ptr(), k.data_ptr(), v.data_ptr(), heads * dim, kv_heads * dim, cos.data_ptr(), sin.data_ptr(),
            slots.data_ptr(), positions.data_ptr(), batch, heads, kv_heads, dim, cache_k.data_ptr(), cache_v.data_ptr(),
            cache_k.shape[0], max_len, cos.shape[0], DTYPES[cache_k.dtype], dim**-0.5, out.data_ptr(), IMPLS[impl],
            kernel_threads())
    lib = library or _library()
    if torch.autograd._profiler_enabled():  # ctypes calls are invisible to torch.profiler unless labelled
        with torch.autograd.profiler.record_function("int8serve::decode_attention"):
            status = lib.i8a_decode(*args)
    else:
        status = lib.i8a_decode(*args)
    if status != 0:
        raise ValueError(f"i8a_decode failed with status {status}: {STATUS.get(status, '?')} (impl {impl})")
    return out


def quantize_into(rows: Tensor, values: Tensor) -> None:
    """rows[...] = kv_int8.quantize(values): values fp32 [Hkv, T, D] (any strides, each row contiguous) into an int8
    cache's slice [Hkv, T, kv_int8.width(D)] (each head's rows contiguous), in one parallel C++ call (torch's ops
    where the library is not available or the layouts differ)."""
    heads, positions, dim = values.shape
    if (not available() or values.dtype != torch.float32 or values.stride(2) != 1 or rows.dtype != torch.int8
            or rows.shape != (heads, positions, kv_int8.width(dim)) or rows.stride(2) != 1
            or rows.stride(1) != rows.shape[2]):
        rows.copy_(kv_int8.quantize(values))
        return
    status = _library().i8a_quantize(values.data_ptr(), heads, positions, values.stride(0), values.stride(1), dim,
                                     rows.data_ptr(), rows.stride(0), kernel_threads())
    if status != 0:
        raise ValueError(f"i8a_quantize failed with status {status}")


def dequantize_rows(rows: Tensor, head_dim: int, dtype: torch.dtype) -> Tensor:
    """An int8 cache's rows [Hkv, L, kv_int8.width(D)] (a slot's slice: each head's rows contiguous) -> [Hkv, L, D]
    of fp32 or bf16, the values of kv_int8.dequantize bit for bit (a NaN's payload aside), in one parallel C++ call
    (torch's ops where the library is not available, or for other layouts and dtypes)."""
    heads, positions, width = rows.shape
    if (not available() or dtype not in (torch.float32, torch.bfloat16) or rows.dtype != torch.int8
            or width != kv_int8.width(head_dim) or rows.stride(2) != 1 or rows.stride(1) != width):
        return kv_int8.dequantize(rows, head_dim, dtype)
    out = torch.empty(heads, positions, head_dim, dtype=dtype)
    status = _library().i8a_dequantize(rows.data_ptr(), heads, positions, rows.stride(0), head_dim, out.data_ptr(),
                                       DTYPES[dtype], kernel_threads())
    if status != 0:
        raise ValueError(f"i8a_dequantize failed with status {status}")
    return out


def _check(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, slots: Tensor, positions: Tensor,
           cache_k: Tensor, cache_v: Tensor) -> None:
    batch, heads, dim = q.shape
    kv_heads, cache_dim = cache_k.shape[1], cache_k.shape[3]
    row = kv_int8.width(dim) if cache_k.dtype == torch.int8 else dim
    if k.shape != (batch, kv_heads, dim) or v.shape != k.shape or cache_dim != row or heads % kv_heads:
        raise ValueError(f"shapes q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"cache {tuple(cache_k.shape)} do not fit")
    if not all(t.dtype == torch.float32 and t.is_contiguous() for t in (q, k, v, cos, sin)):
        raise ValueError("q, k, v, cos and sin must be contiguous fp32")
    if cos.shape != sin.shape or cos.shape[1] != dim:
        raise ValueError(f"rope tables {tuple(cos.shape)} do not fit head_dim {dim}")
    if cache_k.dtype not in DTYPES or cache_v.dtype != cache_k.dtype or cache_v.shape != cache_k.shape:
        raise ValueError(f"caches must be fp32, bf16, fp16 or int8 of one shape, got {cache_k.dtype}/{cache_v.dtype}")
    if not (cache_k.is_contiguous() and cache_v.is_contiguous()):
        raise ValueError("caches must be contiguous")
    if slots.dtype != torch.int64 or positions.dtype != torch.int64 or slots.shape != (batch,) or \
            positions.shape != (batch,):
        raise ValueError("slots and positions must be int64 [B]")
