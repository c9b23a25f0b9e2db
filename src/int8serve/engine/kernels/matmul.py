"""The prefill (dense) matmul on CPUs with AMX-BF16 or AVX512-BF16, read straight from the packed int8 weight
(matmul.cpp).

A prefill chunk of more rows than `int8.kernel_rows()` is compute-bound. Without this kernel each int8 layer first
dequantizes its whole weight into a bf16 buffer in memory (2 bytes a weight written, then read back by oneDNN, which
reorders it once more); on a Sapphire Rapids that was ~20% of the matmul's time. Here the weight's bf16 tiles are made
a few at a time, while the previous ones multiply, from the one packed copy decode reads. Each output is the same sum
over the same bf16 values as the dense path's (the dequantized weight's bits exactly), accumulated in fp32 in a fixed
order: a row's result does not depend on how many rows come with it (oneDNN's AMX kernels round a row by its
company, see int8.dense_matmul). The sums stay fp32, where the dense path's bf16 matmul rounds them to bf16: more
accurate (the note above MAX_ROWS).

Two paths (`PATHS`), chosen from the CPU's flags: `amx` multiplies with AMX-BF16 tiles (Sapphire Rapids and later);
`avx512bf16` with vdpbf16ps on zmm registers (AMD Zen 4, and Intel CPUs whose tile state Linux refuses). They sum in
different orders, so their bits differ; each is row-exact on its own. Where the CPU has neither (or the library cannot
be built) `available()` is False and Int8Linear keeps the dequantize-and-oneDNN path.

INT8SERVE_PREFILL_MATMUL chooses how prefill chunks multiply (read when used; the engine decides row-exactness once,
at start):
- `auto` (the default): our int8 kernel takes calls of up to `int8.KERNEL_ROWS` rows on every path, and every call
  on the vnni512, avx2 and avxvnni paths (int8.kernel_rows): there prefill computes every row as decode does
  (row-exact: decode's accuracy, and the prefix cache keeps replies too, chunking.py). On the amx path longer calls
  take this kernel (AMX-BF16, much faster there than our int8 tiles); where our int8 kernel does not take them and
  this kernel is not available, dequantize + oneDNN.
- `row-exact`: on the amx path our int8 kernel takes every prefill call too (an AMX-INT8 GEMM), so that prefill is
  row-exact there as well, with decode's accuracy; slower prefill (int8.py has the figures). Elsewhere the default.
- `bf16`: this kernel takes the calls of more than `int8.KERNEL_ROWS` rows where the CPU has AMX-BF16 or AVX512-BF16,
  whatever our int8 kernel's path (on the vnni512 path: faster prefill than the row-exact default, less accurate, not
  row-exact; int8.py has the figures). Where the CPU has neither, the default (the start line says so).
- `dense`: never this kernel: dequantize + oneDNN (to compare the two). On the vnni512, avx2 and avxvnni paths,
  where our int8 kernel takes every prefill call by default, dequantize + oneDNN's bf16 or fp32 matmul instead.
- `int8`: our int8 kernel takes every prefill call with one int8 pass a row (activations rounded to int8 per 32
  values, as llama.cpp's Q8_0 computes), where decode takes two (int8.PRECISE_ACTIVATIONS): faster where the CPU
  has int8 dot products, and less accurate, so it is an option (int8.py has the figures). Not row-exact: the prefix
  cache keeps prompts only.
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

from .builds import build
from .cpu import cpu_flags
from .library import Loaded, kernel_threads, load_library, open_library, required
from .packed import TILE_ROWS, PackedWeight

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("matmul.cpp")
ABI_VERSION = 4  # must match i8m_abi_version() in matmul.cpp
PATHS = {"amx": 1, "avx512bf16": 2}  # i8m_matmul's `impl`; the first a CPU has is the default
# Int8Linear keeps the kernel's fp32 sums (`matmul`'s round_bf16 False); the dense path's bf16 matmul rounds its
# outputs to bf16. Of prefill's three roundings (inputs, weights, outputs) that one cost the most: stories260K over
# tinystories.txt, GPTQ per 32, 256-row windows (benchmarks/accuracy.py's `prefill (dense)`; AMD EPYC Zen 4,
# 2026-12-04) measures KLD 0.000537, top-1 98.70%, PPL ratio 1.00037 with the sums kept, against 0.000635 / 98.58% /
# 1.00078 rounded (decode's two int8 passes: 0.000481 / 98.75%). Attention in fp32 instead of bf16 on top: 0.000528,
# not worth its time. Since the output head refines its largest logits from ~16-bit rows (int8.Int8Linear.set_residual;
# `bf16 kernel` mode, 2026-12-05): 0.000473 / 98.81% / 1.00055, within issue #10's targets (decode's: 0.000418).
# The longest call each path takes in Int8Linear (None: any); longer ones would dequantize for oneDNN. Measured
# against dequantize + oneDNN's bf16 matmul (benchmarks/prefill_paths.py, docs/benchmarks.md): on an AMD EPYC Zen 4
# (2 threads, 2026-12-02, the three 7B shapes, three runs) the vector path is 1.40-1.53x at 48 rows, 1.15-1.20x at 128
# (the server's chunks), 0.98-1.08x at 256, 0.94-1.02x at 384, 0.92-1.02x at 512; the tile path is faster at every
# size measured (Sapphire Rapids). The vector path took calls of up to 256 rows until its fp32 sums were kept
# (`matmul`, round_bf16): one numerics for every prefill call is worth the little the longest calls lose. On the same
# Zen 4 model (2026-12-04, 2 threads, medians of 2 weight copies x 3 rounds) 512 rows took 1.00-1.04x oneDNN's time
# per 7B shape (q, k, v 131.8 ms against 127.1, o 46.0 against 46.0), and a 512-token prompt in one forward through
# 8 layers of the 7B shape ran at 1.003x the speed of the 256-row limit (5 alternating rounds), through 32 layers at
# 0.994x (4 rounds; 28.4 tok/s both).
MAX_ROWS: dict[str, int | None] = {"amx": None, "avx512bf16": None}
ENV = "INT8SERVE_PREFILL_MATMUL"
SETTINGS = ("auto", "row-exact", "bf16", "dense", "int8")
ROW_MULTIPLE = 32  # the kernel takes rows in pairs of 16-row tiles: fewer are padded with zero rows
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
# The CPU flags (/proc/cpuinfo) the library needs at all, and those the amx path needs besides
VECTOR_FLAGS = frozenset({"avx512_bf16", "avx512bw", "avx512vl"})
AMX_FLAGS = frozenset({"amx_bf16", "amx_tile"})
STATUS = {-1: "the CPU cannot run that path (no AMX-BF16 or AVX512-BF16, or Linux refused the tile state)",
          -2: "out of memory for its buffers", -3: "bad sizes"}


def _open(path: Path) -> ctypes.CDLL:
    lib = open_library(path, "i8m_abi_version", ABI_VERSION)
    lib.i8m_cpu_has.argtypes = [_INT]
    lib.i8m_cpu_has.restype = _INT
    lib.i8m_matmul.argtypes = [_P, _INT, _I64, _I64, _P, _I64, _I64, _P, _I64, _INT, _INT, _INT]
    lib.i8m_matmul.restype = _INT
    return lib


def _setting() -> str:
    return os.environ.get(ENV, "auto").strip().lower() or "auto"


def row_exact_requested() -> bool:
    """Whether INT8SERVE_PREFILL_MATMUL=row-exact asks our int8 kernel to take whole prefill chunks (see above)."""
    return _setting() == "row-exact"


def int8_requested() -> bool:
    """Whether INT8SERVE_PREFILL_MATMUL=int8 asks our int8 kernel to take every prefill call with one int8 pass a
    row (see above)."""
    return _setting() == "int8"


def bf16_requested() -> bool:
    """Whether INT8SERVE_PREFILL_MATMUL=bf16 asks this kernel to take prefill calls of more than int8.KERNEL_ROWS rows
    on every path (on the vnni512 path faster than its default, not row-exact; see above)."""
    return _setting() == "bf16"


def dense_requested() -> bool:
    """Whether INT8SERVE_PREFILL_MATMUL=dense asks prefill to dequantize for oneDNN (on the vnni512, avx2 and avxvnni
    paths too, whose int8 kernel otherwise takes every prefill call: int8.kernel_rows)."""
    return _setting() == "dense"


def setting_problem() -> str | None:
    """Why INT8SERVE_PREFILL_MATMUL turns the kernel off, if it does: "dense", or a value it does not take (the kernel
    is then not used and the start line says why, as for INT8SERVE_KERNEL)."""
    setting = _setting()
    if setting in SETTINGS and setting != "dense":  # (with int8 our int8 kernel takes every call: kernel_rows)
        return None
    if setting not in SETTINGS:
        _warn_once(f"{ENV}={setting!r}: expected one of {', '.join(SETTINGS)}; taken as auto without this kernel")
        return f"{ENV}={setting!r} is not one of {', '.join(SETTINGS)}"
    return f"{ENV}={setting}"


@functools.cache
def _warn_once(message: str) -> None:
    log.warning(message)


@functools.cache
def _load() -> Loaded:
    """The loaded library if this CPU runs one of its paths, else the reason it is not used (logged once where the CPU
    could)."""
    if not cpu_flags() >= VECTOR_FLAGS:  # (no library built where it cannot run)
        return "this CPU has neither AMX-BF16 nor AVX512-BF16"
    lib = load_library(SOURCE, _open, build)
    if isinstance(lib, str):
        log.warning("our bf16 prefill matmul not available, prefill dequantizes for oneDNN: %s", lib)
        return lib
    if not lib.i8m_cpu_has(0):
        reason = "the CPU check of matmul.cpp refused this CPU"
        log.warning("our bf16 prefill matmul not available, prefill dequantizes for oneDNN: %s", reason)
        return reason
    if cpu_flags() >= AMX_FLAGS and not lib.i8m_cpu_has(PATHS["amx"]):
        log.warning("Linux did not grant the AMX tile state (arch_prctl): our bf16 prefill matmul takes its "
                    "AVX512-BF16 path")
    return lib


@functools.cache  # (Int8Linear asks at every prefill call; the CPU and the process's tile permission do not change)
def paths() -> tuple[str, ...]:
    """The kernel's paths this CPU and process can run, the default first (none where it is not available)."""
    lib = _load()
    if isinstance(lib, str):
        return ()
    return tuple(name for name, impl in PATHS.items() if lib.i8m_cpu_has(impl))


def path() -> str | None:
    """The path Int8Linear's prefill takes when the kernel is enabled: the first of `paths()`."""
    available_paths = paths()
    return available_paths[0] if available_paths else None


def available() -> bool:
    """Whether this CPU and process can run the kernel (whatever INT8SERVE_PREFILL_MATMUL says)."""
    return not isinstance(_load(), str)


def enabled() -> bool:
    """Whether Int8Linear's prefill path uses the kernel: available, and not turned off by INT8SERVE_PREFILL_MATMUL."""
    return setting_problem() is None and available()


def max_rows() -> int | None:
    """The longest call the default path takes (MAX_ROWS; None: any), or 0 where the kernel is not available."""
    default = path()
    return MAX_ROWS[default] if default is not None else 0


def takes(rows: int) -> bool:
    """Whether Int8Linear gives a call (or a prefill chunk) of `rows` rows to the kernel: enabled, and its path takes
    that many (MAX_ROWS)."""
    limit = max_rows()
    return enabled() and (limit is None or rows <= limit)


def unavailable_reason() -> str | None:
    """Why the kernel is not used, or None if it is."""
    loaded = _load()
    return loaded if isinstance(loaded, str) else setting_problem()


def matmul(rows: Tensor, weight: PackedWeight, round_bf16: bool = False, path: str | None = None,
           library: ctypes.CDLL | None = None) -> Tensor:
    """rows [M, K] (any float dtype; multiplied as bf16) @ dequantized(weight).T -> fp32 [M, N].

    The weight's values are its bf16 dequantization (int8 x bf16 scale, rounded to the nearest even bf16), as the
    dense path's buffer holds them; the sums are fp32 (kept: more accurate, see the note above MAX_ROWS), or rounded to
    bf16 at the end with `round_bf16`, as the dense path's bf16 matmul returns them. `path`: one of `PATHS` (None: the
    default, `path()`). `library`: another build of matmul.cpp (benchmarks/matmul_builds.py; None: the project's).
    Raises RuntimeError if the kernel or that path is not available here.
    """
    loaded = required(_load() if library is None else library, "our bf16 prefill matmul is not available")
    if path is not None and path not in PATHS:
        raise ValueError(f"unknown prefill matmul path {path!r}: expected one of {', '.join(PATHS)}")
    m, k = rows.shape
    if k != weight.in_features:
        raise ValueError(f"rows of {k} values for a weight of {weight.in_features} inputs")
    n_padded = -(-weight.out_features // TILE_ROWS) * TILE_ROWS
    m_padded = -(-m // ROW_MULTIPLE) * ROW_MULTIPLE
    x = rows if rows.dtype in (torch.float32, torch.bfloat16) else rows.float()
    x = x.contiguous()  # the kernel rounds fp32 to bf16 as it packs the rows for its tiles, zero padded
    out = torch.empty(m_padded, n_padded, dtype=torch.float32)  # (the vector path leaves the padding rows alone)
    status = loaded.i8m_matmul(x.data_ptr(), int(x.dtype == torch.float32), m, k, weight.data.data_ptr(),
                               n_padded // TILE_ROWS, weight.group_size, out.data_ptr(), n_padded, int(round_bf16),
                               PATHS[path] if path is not None else 0, kernel_threads())
    if status != 0:
        raise RuntimeError(f"i8m_matmul failed: {STATUS.get(status, status)}")
    if n_padded != weight.out_features:
        return out[:m, :weight.out_features].contiguous()
    return out[:m]
