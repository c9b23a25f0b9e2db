"""glibc's malloc, tuned once for the engine's big short-lived tensors.

A prefill chunk allocates and frees tens of activation tensors of several MB per layer (the 7B shape at 512 tokens:
[512, 11008] fp32 is 22.5 MB). By default glibc serves blocks from 128 KB up with fresh mmaps (raising that threshold
only as it sees blocks freed) and hands the top of its heap back to Linux once 2x the threshold is free, so the next
layer's tensors are new pages again, which Linux zeroes on first touch: on a Sapphire Rapids (2 threads) 86,000 page
faults per 512-token prefill of 4 layers, a tenth of its time in the kernel's clear_page. With blocks up to 32 MB
(glibc's largest mmap threshold) on the heap and freed memory kept for the next chunk, there are none, and the same
prefill took 0.85-0.88 s instead of 0.92-0.97 s (dequantize + oneDNN), 0.67-0.69 s instead of 0.76-0.78 s (the AMX
kernel). Memory the process keeps is its largest set of activations at once (a few hundred MB for a
512-token chunk of the 7B shape); weights, KV cache and the dequantization buffer are long-lived.

Nothing happens where the C library is not glibc (`tune()` returns False); environment settings the user made
(MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_, MALLOC_TOP_PAD_) are left as they are.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import os

log = logging.getLogger(__name__)

# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
SETTINGS = {  # parameter -> (value, the environment variable that sets it too)
    M_MMAP_THRESHOLD: (32 << 20, "MALLOC_MMAP_THRESHOLD_"),  # glibc's maximum on 64-bit
    M_TRIM_THRESHOLD: (1 << 30, "MALLOC_TRIM_THRESHOLD_"),
    M_TOP_PAD: (256 << 20, "MALLOC_TOP_PAD_"),
}


@functools.cache
def tune() -> bool:
    """Apply SETTINGS through glibc's mallopt (once per process). True if all were applied."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError) as error:  # not glibc (musl, macOS): its own allocator, left alone
        log.debug("malloc not tuned: %s", error)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    applied = True
    for parameter, (value, variable) in SETTINGS.items():
        if variable in os.environ:
            continue
        if mallopt(parameter, value) != 1:
            log.warning("mallopt(%d, %d) failed: the allocator keeps its default for %s", parameter, value, variable)
            applied = False
    return applied
