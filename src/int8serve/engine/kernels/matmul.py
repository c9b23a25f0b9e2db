"""The prefill (dense) matmul on CPUs with AMX-BF16, read straight from the packed int8 weight (matmul.cpp).

A prefill chunk of more rows than `int8.kernel_rows()` is compute-bound. Without this kernel each int8 layer first
dequantizes its whole weight into a bf16 buffer in memory (2 bytes a weight written, then read back by oneDNN, which
reorders it once more for its tiles); on a Sapphire Rapids that was ~20% of the matmul's time. Here the weight's
bf16 tiles are made in registers a few at a time, while the tiles multiply, from the one packed copy decode reads.
Each output is the same sum over the same bf16 values as the dense path's (the dequantized weight's bits exactly),
accumulated in fp32 in a fixed order: a row's result does not depend on how many rows come with it (oneDNN's AMX
kernels round a row by its company, see int8.dense_matmul).

Where the CPU lacks AMX-BF16 (or the library cannot be built) `available()` is False and Int8Linear keeps the
dequantize-and-oneDNN path.

INT8SERVE_PREFILL_MATMUL chooses how prefill chunks multiply (read when used; the engine decides row-exactness once,
at start):
- `auto` (the default): the fastest measured on this CPU. Our int8 kernel takes calls of up to `int8.KERNEL_ROWS`
  rows; longer ones this kernel where the CPU has AMX-BF16, else dequantize + oneDNN.
- `row-exact`: our int8 kernel takes whole default prefill chunks (up to `int8.KERNEL_ROWS_ROW_EXACT` rows) on the
  CPUs whose kernel path is fast enough at that size (AVX-512 VNNI, AMX), so that prefill computes every row as
  decode would and the prefix cache can keep replies too (chunking.py); slower prefill (int8.py has the figures).
- `dense`: never this kernel: dequantize + oneDNN (to compare the two).
Another value acts as `auto` without this kernel, with a warning (the start line names it).
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from pathlib import Path

import torch
from torch import Tensor

from . import TILE_ROWS, PackedWeight, build, cpu_flags, kernel_threads, load_library, open_library

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("matmul.cpp")
ABI_VERSION = 3  # must match i8m_abi_version() in matmul.cpp
ENV = "INT8SERVE_PREFILL_MATMUL"
SETTINGS = ("auto", "row-exact", "dense")
ROW_MULTIPLE = 32  # the kernel takes rows in pairs of 16-row tiles: fewer are padded with zero rows
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
STATUS = {-1: "the CPU cannot run it (no AMX-BF16, or Linux refused the tile state)",
          -2: "out of memory for its buffers", -3: "bad sizes"}


def _open(path: Path) -> ctypes.CDLL:
    lib = open_library(path, "i8m_abi_version", ABI_VERSION)
    lib.i8m_cpu_ready.restype = _INT
    lib.i8m_matmul.argtypes = [_P, _INT, _I64, _I64, _P, _I64, _I64, _P, _I64, _INT, _INT]
    lib.i8m_matmul.restype = _INT
    return lib


def _setting() -> str:
    return os.environ.get(ENV, "auto").strip().lower() or "auto"


def row_exact_requested() -> bool:
    """Whether INT8SERVE_PREFILL_MATMUL=row-exact asks our int8 kernel to take whole prefill chunks (see above)."""
    return _setting() == "row-exact"


def setting_problem() -> str | None:
    """Why INT8SERVE_PREFILL_MATMUL turns the kernel off, if it does: "dense", or a value it does not take (the kernel
    is then not used and the start line says why, as for INT8SERVE_KERNEL)."""
    setting = _setting()
    if setting in ("auto", "row-exact"):
        return None
    if setting not in SETTINGS:
        _warn_once(f"{ENV}={setting!r}: expected one of {', '.join(SETTINGS)}; prefill dequantizes for oneDNN")
        return f"{ENV}={setting!r} is not one of {', '.join(SETTINGS)}"
    return f"{ENV}={setting}"


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


@functools.cache
def _load() -> ctypes.CDLL | str:
    """The loaded library if this CPU runs it, else the reason it is not used (logged once where the CPU could)."""
    if not {"amx_bf16", "amx_tile", "avx512_bf16", "avx512bw"} <= cpu_flags():  # (no library built where it cannot run)
        return "this CPU has no AMX-BF16"
    lib = load_library(SOURCE, _open, build)
    if isinstance(lib, str):
        log.warning("AMX prefill matmul not available, prefill dequantizes for oneDNN: %s", lib)
        return lib
    if not lib.i8m_cpu_ready():
        reason = "Linux did not grant the AMX tile state (arch_prctl)"
        log.warning("AMX prefill matmul not available, prefill dequantizes for oneDNN: %s", reason)
        return reason
    return lib


def available() -> bool:
    """Whether this CPU and process can run the kernel (whatever INT8SERVE_PREFILL_MATMUL says)."""
    return not isinstance(_load(), str)


def enabled() -> bool:
    """Whether Int8Linear's prefill path uses the kernel: available, and not turned off by INT8SERVE_PREFILL_MATMUL."""
    return setting_problem() is None and available()


def unavailable_reason() -> str | None:
    """Why the kernel is not used, or None if it is."""
    loaded = _load()
    return loaded if isinstance(loaded, str) else setting_problem()


def matmul(rows: Tensor, weight: PackedWeight, round_bf16: bool = True) -> Tensor:
    """rows [M, K] (any float dtype; multiplied as bf16) @ dequantized(weight).T -> fp32 [M, N].

    The weight's values are its bf16 dequantization (int8 x bf16 scale, rounded to the nearest even bf16), as the
    dense path's buffer holds them; the sums are fp32, rounded to bf16 at the end with `round_bf16` (the dense path's
    bf16 output). Raises RuntimeError if the kernel is not available.
    """
    loaded = _load()
    if isinstance(loaded, str):
        raise RuntimeError(f"the AMX prefill matmul is not available: {loaded}")
    m, k = rows.shape
    if k != weight.in_features:
        raise ValueError(f"rows of {k} values for a weight of {weight.in_features} inputs")
    n_padded = -(-weight.out_features // TILE_ROWS) * TILE_ROWS
    m_padded = -(-m // ROW_MULTIPLE) * ROW_MULTIPLE
    x = rows if rows.dtype in (torch.float32, torch.bfloat16) else rows.float()
    x = x.contiguous()  # the kernel rounds fp32 to bf16 as it packs the rows for its tiles, zero padded
    out = torch.empty(m_padded, n_padded, dtype=torch.float32)
    status = loaded.i8m_matmul(x.data_ptr(), int(x.dtype == torch.float32), m, k, weight.data.data_ptr(),
                               n_padded // TILE_ROWS, weight.group_size, out.data_ptr(), n_padded, int(round_bf16),
                               kernel_threads())
    if status != 0:
        raise RuntimeError(f"i8m_matmul failed: {STATUS.get(status, status)}")
    if n_padded != weight.out_features:
        return out[:m, :weight.out_features].contiguous()
    return out[:m]
