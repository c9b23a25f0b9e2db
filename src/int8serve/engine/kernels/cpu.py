"""Which of the decode kernel's paths runs on this CPU, and whether the kernel can be used here at all.

Why a module of its own: the path is chosen at run time, once, from the CPU (the library's own CPUID check, the flags
Linux lists) and INT8SERVE_KERNEL; every layer call and the start-up line ask for it, and int8.py, model.py and
matmul.py read the CPU's flags for their own choices. Paths, all bitwise identical: `amx` (AMX-INT8 tile
multiplies, up to 16 rows at once; Sapphire Rapids and later), `vnni512` (AVX-512 VNNI), `avxvnni` (AVX-VNNI on
256-bit registers), `avx2` (vpmaddubsw), `scalar` (plain C++). INT8SERVE_KERNEL=auto|amx|vnni512|avxvnni|avx2|scalar
forces one (a path the CPU lacks makes the kernel unavailable, with the reason); INT8SERVE_KERNELS=0 disables the
library altogether.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

from ..variables import env_choice
from .gemv import _IMPLS, PATHS, Impl, _library, _load, loaded

log = logging.getLogger(__name__)

ENV_PATH = "INT8SERVE_KERNEL"
_MISSING = {"amx": "needs amx_tile and amx_int8, the vnni512 path's flags, and Linux's permission to use the tiles",
            "vnni512": "needs avx512f/bw/vl and avx512_vnni", "avxvnni": "needs avx2 and avx_vnni",
            "avx2": "needs avx2", "scalar": "", "auto": ""}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's flags as Linux lists them in /proc/cpuinfo (empty where it cannot be read: not Linux)."""
    try:
        return frozenset(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return frozenset()


def requested_path() -> Impl:
    """The path INT8SERVE_KERNEL asks for (default auto); an unknown name is an error that names the variable."""
    # listed as --help lists them (settings.ENGINE_VARIABLE_HELP), in the order auto prefers the paths
    return env_choice(ENV_PATH, ("auto", *PATHS))  # type: ignore[return-value]


def cpu_has(path: Impl) -> bool:
    """Whether this CPU can run `path` (False when the library is not loaded)."""
    return loaded() and bool(_library().i8s_cpu_has(_IMPLS[path]))


@functools.cache
def _unavailable_reason() -> str | None:
    library = _load()
    reason = library if isinstance(library, str) else None
    if reason is None:
        try:
            wanted = requested_path()
        except ValueError as error:
            reason = str(error)
        else:
            if wanted != "auto" and not cpu_has(wanted):
                reason = f"{ENV_PATH}={wanted}, but this CPU cannot run it ({_MISSING[wanted]})"
    if reason is not None:
        log.warning("int8 decode kernel not available, using torch's kernels instead: %s", reason)
    return reason


def available() -> bool:
    """True when the kernel is built, loaded and its path (INT8SERVE_KERNEL, else the best) runs here. Never raises."""
    return _unavailable_reason() is None


def unavailable_reason() -> str | None:
    return _unavailable_reason()


def path() -> Impl:
    """The path "auto" runs: INT8SERVE_KERNEL if set, else the first of PATHS this CPU has. Needs available()."""
    if not available():
        raise RuntimeError(f"int8serve kernels are not available: {unavailable_reason()}")
    wanted = requested_path()
    return _best_path() if wanted == "auto" else wanted


@functools.cache
def _best_path() -> Impl:
    """The first of PATHS this CPU has (asked of the library once: every layer call resolves its path)."""
    best = _library().i8s_cpu_has(0)
    return next(name for name, number in _IMPLS.items() if number == best)  # type: ignore[return-value]


def describe() -> str:
    """One line for start-up logs: the path in use, or why torch's kernels are used instead."""
    if available():
        return f"int8 decode kernel: {path()} (CPU paths: {', '.join(p for p in PATHS if cpu_has(p))})"
    return f"int8 decode kernel unavailable, torch's stock int8 kernels in use: {unavailable_reason()}"
