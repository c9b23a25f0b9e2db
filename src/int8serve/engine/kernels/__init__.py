"""Our own C++ kernels for int8 models on every x86-64 CPU; this package's names are the decode kernel's API.

`torch._weight_int8pack_mm` is compute-bound at a few rows (on a Sapphire Rapids about 23 GB/s of weights on 2
cores while memory delivers 36-66 GB/s; on an AVX2 EPYC 9.3 GB/s of ~20) and takes only per-channel scales, hence
our decode kernel, gemv.cpp: int8 weights x int8 activations (per-32-value scales), fp32 out. Beside it, one library
each for the feed-forward's SiLU and RMSNorm (activation.py), decode attention (attention.py) and the bf16 prefill
matmul (matmul.py).

The package is split by concern, and this file only gathers the decode kernel's names, so that
`from int8serve.engine import kernels; kernels.int8_gemv(...)` reads as before:
- builds.py: compiling each C++ source into the cache of built libraries (`build`, `BuildError`);
- library.py: opening a built library with ctypes, the one way all four are loaded (`load_library`), and the
  threads kernel calls may use (`kernel_threads`, `limit_threads`);
- gemv.py: the decode kernel's library (its ABI and ctypes declarations);
- cpu.py: the CPU's flags and which decode path runs here (`available`, `path`, `describe`);
- packed.py: the packed weight layout (`PackedWeight`, `pack_weight`, ...) and the calls of the decode kernel
  (`int8_gemv`, `quantize_activations`, `dequantize`).
Nothing here raises at import time: without a compiler, or where a library does not build or load, `available()`
is False with a logged reason, and callers keep torch's kernels.

A test that replaces one of these functions replaces it where its callers look it up: callers outside this package
go through the package (`kernels.available`), the modules inside it call each other directly, so a test of their
internals patches the module that defines the name (e.g. `packed._pack_torch`).
"""

from __future__ import annotations

from ..cache_files import cache_dir  # (tests find the build cache through it, as kernels.cache_dir)
from ..variables import env_choice  # (decode_plan reads its variable through it, as kernels.env_choice)
from .builds import CXXFLAGS, LIBRARY, MAX_BUILD_JOBS, SOURCE, BuildError, build, discard_library
from .cpu import ENV_PATH, available, cpu_flags, cpu_has, describe, path, requested_path, unavailable_reason
from .gemv import ABI_VERSION, PATHS, Impl, loaded
from .library import kernel_threads, limit_threads, load_library, open_built, open_library
from .packed import (
    ALIGNMENT,
    GROUP,
    GROUP_BYTES,
    HUGE_PAGE,
    HUGE_PAGE_MIN_BYTES,
    LAYOUT,
    SCALE_BYTES,
    TILE_ROWS,
    PackedWeight,
    adopt_packed,
    can_stack,
    check_group_size,
    dequantize,
    int8_gemv,
    pack_weight,
    packed_nbytes,
    quantize_activations,
    row_scales,
    stack_packed,
    unpack_weight,
    weight_groups,
    weight_rows,
)

__all__ = [
    "ABI_VERSION", "ALIGNMENT", "CXXFLAGS", "ENV_PATH", "GROUP", "GROUP_BYTES", "HUGE_PAGE", "HUGE_PAGE_MIN_BYTES",
    "LAYOUT", "LIBRARY", "MAX_BUILD_JOBS", "PATHS", "SCALE_BYTES", "SOURCE", "TILE_ROWS", "BuildError", "Impl",
    "PackedWeight", "adopt_packed", "available", "build", "cache_dir", "can_stack", "check_group_size", "cpu_flags",
    "cpu_has", "dequantize", "describe", "discard_library", "env_choice", "int8_gemv", "kernel_threads",
    "limit_threads", "load_library", "loaded", "open_built", "open_library", "pack_weight", "packed_nbytes", "path",
    "quantize_activations", "requested_path", "row_scales", "stack_packed", "unavailable_reason", "unpack_weight",
    "weight_groups", "weight_rows",
]
