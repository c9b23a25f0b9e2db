"""Opening a built kernel library with ctypes, the one way all four are opened; and the threads their calls may use.

Why a module of its own: gemv.py, activation.py, attention.py and matmul.py each declare their own library's
functions, but getting a library to declare them on is the same for all four, and is done here: `load_library`
refuses where no library can run (INT8SERVE_KERNELS=0, not Linux on x86-64), builds the source (builds.build),
opens it refusing another ABI version (`open_library`), replaces a cached library that does not load (`open_built`),
and turns any failure into the reason the caller logs and keeps its torch path for: nothing here raises at import
time, and a library that is not there is a reason, never a crash. `required` is the one error for a call that needs
the library anyway.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from pathlib import Path

import torch

from .builds import LIBRARY, BuildError, build, discard_library

log = logging.getLogger(__name__)

Loaded = ctypes.CDLL | str  # a loaded library, or the reason it cannot be used
_INT = ctypes.c_int


def open_library(path: Path, abi_function: str, abi_version: int) -> ctypes.CDLL:
    """Load a library `build` made, refusing one whose `abi_function()` is not `abi_version`."""
    lib = ctypes.CDLL(str(path))
    function = getattr(lib, abi_function)
    function.restype = _INT
    if function() != abi_version:
        raise BuildError(f"{path} has ABI version {function()}, expected {abi_version}")
    return lib


def load_library(source: Path, opener: Callable[[Path], ctypes.CDLL], builder: Callable[..., Path] = build
                 ) -> Loaded:
    """Build `source` (`builder`, the calling module's `build`, which tests replace) and open it with `opener`; or
    the reason it cannot be used: INT8SERVE_KERNELS=0, not Linux on x86-64, no compiler, a failed build or load."""
    if os.environ.get("INT8SERVE_KERNELS", "1") == "0":
        return "disabled by INT8SERVE_KERNELS=0"
    if sys.platform != "linux" or os.uname().machine not in ("x86_64", "AMD64"):
        return f"needs Linux on x86-64, not {sys.platform}/{os.uname().machine}"
    try:
        return open_built(source, opener, builder)
    except Exception as error:  # a missing compiler, a failed build, a bad library: fall back, never crash
        return f"{type(error).__name__}: {error}"


def open_built(source: Path, opener: Callable[[Path], ctypes.CDLL], builder: Callable[..., Path]) -> ctypes.CDLL:
    """`opener` on the library `builder` made of `source`; a cached one that does not load (its file damaged though
    its record matches) is said so once, deleted and built again, once."""
    library = builder(source=source)
    try:
        return opener(library)
    except (OSError, AttributeError, BuildError) as error:  # dlopen's refusal, a missing symbol, another ABI
        if library.name != LIBRARY:
            raise
        log.warning("the cached kernel library %s does not load (%s); deleting it and building it again", library,
                    error)
        discard_library(library)
    return opener(builder(source=source))


def required(loaded: Loaded, unavailable: str) -> ctypes.CDLL:
    """The library `load_library` gave; RuntimeError "`unavailable`: the reason" when it gave a reason instead."""
    if isinstance(loaded, str):
        raise RuntimeError(f"{unavailable}: {loaded}")
    return loaded


_THREAD_LIMIT: ContextVar[int | None] = ContextVar("int8serve_kernel_thread_limit", default=None)


def kernel_threads() -> int:
    """Threads our kernels (gemv, attention) may use: torch's intra-op count, or fewer inside `limit_threads`."""
    limit = _THREAD_LIMIT.get()
    threads = torch.get_num_threads()
    return threads if limit is None else max(1, min(limit, threads))


@contextlib.contextmanager
def limit_threads(threads: int) -> Iterator[None]:
    """Run this context's kernel calls on at most `threads` threads (a context variable: other threads and torch's
    own ops are unaffected). Used for small decode steps, see model.SINGLE_THREAD_STEP_WORK."""
    token = _THREAD_LIMIT.set(threads)
    try:
        yield
    finally:
        _THREAD_LIMIT.reset(token)
