"""The decode kernel's library (gemv.cpp): its ABI version, its functions' ctypes declarations and its loading.

Why a module of its own: cpu.py (which paths this CPU runs) and packed.py (packing, and the calls of the kernel)
both call into this one library, loaded once per process through library.load_library as activation.py,
attention.py and matmul.py load theirs. `_IMPLS` are gemv.cpp's numbers of its paths.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path
from typing import Literal

from .builds import SOURCE, build
from .library import Loaded, load_library, open_library, required

Impl = Literal["auto", "amx", "vnni512", "avxvnni", "avx2", "scalar"]
PATHS: tuple[Impl, ...] = ("amx", "vnni512", "avxvnni", "avx2", "scalar")  # in the order auto prefers them
_IMPLS = {"auto": 0, "vnni512": 1, "avxvnni": 2, "avx2": 3, "scalar": 4, "amx": 5}  # gemv.cpp's numbers
ABI_VERSION = 8  # must match i8s_abi_version() in gemv.cpp
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def _open(path: Path) -> ctypes.CDLL:
    lib = open_library(path, "i8s_abi_version", ABI_VERSION)
    lib.i8s_cpu_has.argtypes = [_INT]
    lib.i8s_cpu_has.restype = _INT
    lib.i8s_gemv.argtypes = [_P, _I64, _I64, _P, _I64, _I64, _P, _INT, _INT, _INT]
    lib.i8s_gemv.restype = _INT
    lib.i8s_quantize.argtypes = [_P, _I64, _I64, _P, _P, _INT, _INT]
    lib.i8s_quantize.restype = _INT
    lib.i8s_pack.argtypes = [_P, _I64, _I64, _P, _I64, _P, _INT]
    lib.i8s_pack.restype = None
    lib.i8s_dequant.argtypes = [_P, _I64, _I64, _I64, _P, _INT, _INT, _INT]
    lib.i8s_dequant.restype = _INT
    return lib


@functools.cache
def _load() -> Loaded:
    """The loaded library, or the reason it cannot be used (cpu.unavailable_reason logs it, with the path's)."""
    return load_library(SOURCE, _open, build)


def loaded() -> bool:
    """True when the library is built and loaded (the scalar path then works on any x86-64 CPU)."""
    return not isinstance(_load(), str)


def _library() -> ctypes.CDLL:
    """The loaded library; RuntimeError with the reason when there is none."""
    return required(_load(), "int8serve kernels are not available")
