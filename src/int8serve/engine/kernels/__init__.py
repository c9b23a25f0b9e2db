"""Our own decode kernel: int8 weights x int8 activations (per-32-value scales), fp32 out, AVX-512 VNNI.

`torch._weight_int8pack_mm` is compute-bound on this CPU at a few rows (about 23 GB/s of weights on 2 cores while
memory delivers 36-66 GB/s). `gemv.cpp` reads a weight repacked once at load time (`pack_weight`) so that one
`vpdpbusd` multiplies 4 weights of 16 output rows with 4 activation bytes; activations are quantized per row in
groups of 32 values with an fp32 scale each (like llama.cpp's Q8_0), accumulation and output are fp32; with
precise=True each row is quantized twice (the row, then its quantization error), for about 16-bit activations at
twice the arithmetic. See the comment at the top of gemv.cpp for the arithmetic, and benchmarks/kernels.py for
speed and accuracy.

The C++ source is compiled on first use with the system C++ compiler (g++; $CXX overrides) straight into a cache
directory ($INT8SERVE_CACHE, else $XDG_CACHE_HOME/int8serve, else ~/.cache/int8serve), keyed by a hash of the
source, the flags and the compiler's version, and loaded with ctypes. It is a plain C ABI with no torch or Python
headers, so it builds in about a second, needs no ninja and does not depend on torch's version. `available()` says
whether the fast path can be used; it is False, with a logged reason, when the CPU lacks AVX-512 VNNI, when the
build or load fails, or when INT8SERVE_KERNELS=0. Callers keep their old path for that case: nothing here raises at
import time.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import functools
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gemv.cpp")
GROUP = 32  # activation values per scale; K is padded (with zeros) to a multiple of this
TILE_ROWS = 64  # output rows per packed tile; N is padded to a multiple of this
Impl = Literal["auto", "vnni", "scalar"]
_IMPLS = {"auto": 0, "vnni": 1, "scalar": 2}
ABI_VERSION = 3  # must match i8s_abi_version() in gemv.cpp
# -ffp-contract=off: the scalar path must round exactly like the vector path (explicit fma only). No -march: the
# AVX-512 functions carry their own target attributes and are only called after a runtime CPU check.
CXXFLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off", "-fvisibility=hidden",
            "-Wall", "-Wextra"]


def cache_dir() -> Path:
    """$INT8SERVE_CACHE, else $XDG_CACHE_HOME/int8serve, else ~/.cache/int8serve (as the demo model's cache)."""
    if os.environ.get("INT8SERVE_CACHE"):
        return Path(os.environ["INT8SERVE_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "int8serve"


class BuildError(RuntimeError):
    pass


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise BuildError("no C++ compiler found (set CXX, or install g++)")
    return cxx


def _command(cxx: str, output: Path, source: Path = SOURCE) -> list[str]:
    return [cxx, *CXXFLAGS, str(source), "-o", str(output)]


def _build_key(cxx: str, source: Path = SOURCE) -> str:
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise BuildError(f"cannot run {cxx}: {error}") from error
    digest = hashlib.sha256()
    for part in (source.read_bytes(), " ".join(CXXFLAGS).encode(), cxx.encode(), version.encode()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def build(verbose: bool = False, source: Path = SOURCE) -> Path:
    """Compile `source` (gemv.cpp; attention.cpp for attention.py) into the cache (once per source, flags and
    compiler) and return the library's path.

    Concurrent first uses (several test workers, server processes) serialize on an flock, which the kernel drops if
    its holder dies, and the library is written to a temporary name and renamed into place, so a half-written file
    is never loaded.
    """
    cxx = _compiler()
    directory = cache_dir() / "kernels" / _build_key(cxx, source)
    library = directory / "int8serve_kernels.so"
    if library.is_file():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if library.is_file():
            return library
        fd, tmp_name = tempfile.mkstemp(suffix=".so", dir=directory)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            command = _command(cxx, tmp, source)
            start = time.perf_counter()
            try:
                result = subprocess.run(command, capture_output=True, text=True, timeout=600)
            except (OSError, subprocess.SubprocessError) as error:
                raise BuildError(f"{cxx} failed to run: {error}") from error
            if result.returncode != 0:
                raise BuildError(f"compiling {source.name} failed ({result.returncode}):\n{result.stderr[-4000:]}")
            if verbose:
                print(f"built {library} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
            log.info("built %s in %.1f s", library, time.perf_counter() - start)
            os.replace(tmp, library)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
    return library


_lib: ctypes.CDLL | None = None
_P, _I64, _INT = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


def _open(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    lib.i8s_abi_version.restype = _INT
    if lib.i8s_abi_version() != ABI_VERSION:
        raise BuildError(f"{path} has ABI version {lib.i8s_abi_version()}, expected {ABI_VERSION}")
    lib.i8s_has_vnni.restype = _INT
    lib.i8s_gemv.argtypes = [_P, _I64, _I64, _P, _P, _I64, _P, _INT, _INT, _INT]
    lib.i8s_gemv.restype = _INT
    lib.i8s_quantize.argtypes = [_P, _I64, _I64, _P, _P, _INT]
    lib.i8s_quantize.restype = _INT
    lib.i8s_pack.argtypes = [_P, _I64, _I64, _P, _INT]
    lib.i8s_pack.restype = None
    return lib


@functools.cache
def _load() -> str | None:
    """Build and load the library; None on success, else the reason it cannot be used."""
    global _lib
    if os.environ.get("INT8SERVE_KERNELS", "1") == "0":
        return "disabled by INT8SERVE_KERNELS=0"
    if sys.platform != "linux" or os.uname().machine not in ("x86_64", "AMD64"):
        return f"needs Linux on x86-64, not {sys.platform}/{os.uname().machine}"
    try:
        _lib = _open(build())
    except Exception as error:  # a missing compiler, a failed build, a bad library: fall back, never crash
        return f"{type(error).__name__}: {error}"
    return None


@functools.cache
def _unavailable_reason() -> str | None:
    reason = _load()
    if reason is None and not _library().i8s_has_vnni():
        reason = "this CPU lacks AVX-512 VNNI (avx512f/bw/vl/vnni)"
    if reason is not None:
        log.warning("int8 decode kernel not available, using torch's kernels instead: %s", reason)
    return reason


def _library() -> ctypes.CDLL:
    reason = _load()
    if reason is not None or _lib is None:
        raise RuntimeError(f"int8serve kernels are not available: {reason}")
    return _lib


def available() -> bool:
    """True when the AVX-512 VNNI kernel is built, loaded and runnable on this CPU. Never raises."""
    return _unavailable_reason() is None


def unavailable_reason() -> str | None:
    return _unavailable_reason()


def loaded() -> bool:
    """True when the library is built and loaded (the scalar path then works on any x86-64 CPU)."""
    return _load() is None


@dataclass(frozen=True)
class PackedWeight:
    """An int8 weight [N, K] and its per-row fp32 scales in the kernel's layout (see gemv.cpp)."""

    data: Tensor  # uint8 [ceil(N/64)*64 * ceil(K/32)*32], 64-byte aligned, values w + 128
    scale: Tensor  # fp32 [ceil(N/64)*64], zero padded
    out_features: int
    in_features: int

    @property
    def nbytes(self) -> int:
        return self.data.numel() + 4 * self.scale.numel()


def _aligned_empty(numel: int, alignment: int = 64) -> Tensor:
    raw = torch.empty(numel + alignment, dtype=torch.uint8, device="cpu")
    offset = (-raw.data_ptr()) % alignment
    return raw[offset:offset + numel]


def pack_weight(weight: Tensor, scale: Tensor) -> PackedWeight:
    """int8 [N, K] + fp32 [N] -> PackedWeight. Done once, when a layer's weight is set.

    In C++ where the library is loaded (about 1 GB/s), else in torch (the same bytes, several times slower).
    """
    if weight.dim() != 2 or weight.dtype != torch.int8:
        raise ValueError(f"weight must be int8 [N, K], got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    if n == 0 or k == 0:
        raise ValueError("empty weight")
    if weight.device.type != "cpu":
        raise ValueError(f"weight must be on the CPU, not {weight.device}")
    if scale.shape != (n,):
        raise ValueError(f"scale must be [{n}], got {tuple(scale.shape)}")
    if weight.min() < -127:
        raise ValueError("weight must lie in [-127, 127] (symmetric quantization)")
    np_, kp = -(-n // TILE_ROWS) * TILE_ROWS, -(-k // GROUP) * GROUP
    padded_scale = torch.zeros(np_, dtype=torch.float32, device="cpu")
    padded_scale[:n] = scale.float()
    if _load() is not None:
        return PackedWeight(_pack_torch(weight, np_, kp), padded_scale, n, k)
    weight = weight.contiguous()
    data = _aligned_empty(np_ * kp)
    _library().i8s_pack(weight.data_ptr(), n, k, data.data_ptr(), torch.get_num_threads())
    return PackedWeight(data, padded_scale, n, k)


def _pack_torch(weight: Tensor, np_: int, kp: int) -> Tensor:
    n, k = weight.shape
    unsigned = weight.contiguous().view(torch.uint8) ^ 0x80  # w + 128 as unsigned bytes (two's complement)
    if (np_, kp) != (n, k):
        padded = torch.full((np_, kp), 0x80, dtype=torch.uint8, device="cpu")  # zero weights
        padded[:n, :k] = unsigned
        unsigned = padded
    # [tile, block, row, group, step] -> [tile, group, block, step, row], moving 4-byte words
    words = unsigned.view(torch.int32).view(np_ // TILE_ROWS, 4, 16, kp // GROUP, 8)
    tiled = words.permute(0, 3, 1, 4, 2)
    data = _aligned_empty(np_ * kp)
    data.view(torch.int32).view(tiled.shape).copy_(tiled)
    return data


def unpack_weight(packed: PackedWeight) -> Tensor:
    """The int8 [N, K] weight back from a PackedWeight (for tests, and for callers that keep only the packed copy)."""
    np_, kp = packed.scale.numel(), packed.data.numel() // packed.scale.numel()
    words = packed.data.view(torch.int32).view(np_ // TILE_ROWS, kp // GROUP, 4, 8, 16)
    rows = (words.permute(0, 2, 4, 1, 3).reshape(np_, kp // 4).view(torch.uint8) ^ 0x80).view(torch.int8)
    return rows[:packed.out_features, :packed.in_features].contiguous()


def weight_rows(packed: PackedWeight, index: Tensor) -> Tensor:
    """Rows `index` (int64 of any shape, each < N) of the int8 weight, read from the packed copy: [*index.shape, K].

    What Int8Linear's top-k refinement needs, should a layer keep only the packed copy of its weight.
    """
    np_, kp = packed.scale.numel(), packed.data.numel() // packed.scale.numel()
    words = packed.data.view(torch.int32).view(np_ // TILE_ROWS, kp // GROUP, 4, 8, 16)
    within = index % TILE_ROWS
    picked = words[index // TILE_ROWS, :, within // 16, :, within % 16]  # [*index.shape, K/32, 8] 4-byte words
    rows = (picked.reshape(*index.shape, kp // 4).view(torch.uint8) ^ 0x80).view(torch.int8)
    return rows[..., :packed.in_features]


def int8_gemv(x: Tensor, weight: Tensor | PackedWeight, scale: Tensor | None = None, *, impl: Impl = "auto",
              precise: bool = False) -> Tensor:
    """x [M, K] (fp32/bf16/fp16) @ (weight * scale[:, None]).T -> fp32 [M, N], activations quantized per 32 values.

    `weight` is best a PackedWeight made once by pack_weight; an int8 [N, K] tensor with `scale` is packed on the
    fly (slow, for tests). impl "auto" uses AVX-512 VNNI where the CPU has it, else the scalar path; both give
    bitwise the same result. Row i of the output depends only on row i of x. Raises if the library is not loaded.

    precise=True quantizes each row twice (the row, then its quantization error), so activations carry ~16 bits
    instead of 8, at the cost of running 2M rows: free while memory-bound (M = 1, 2), twice the compute after.
    """
    lib = _library()
    if not isinstance(weight, PackedWeight):
        if scale is None:
            raise ValueError("an int8 weight needs its scale")
        weight = pack_weight(weight, scale)
    if x.dim() != 2 or x.shape[1] != weight.in_features:
        raise ValueError(f"x must be [M, {weight.in_features}], got {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"x must be float32, bfloat16 or float16, not {x.dtype}")
    x = x.to(device="cpu", dtype=torch.float32).contiguous()
    m = x.shape[0]
    y = torch.empty(m, weight.out_features, dtype=torch.float32)
    args = (x.data_ptr(), m, weight.in_features, weight.data.data_ptr(), weight.scale.data_ptr(), weight.out_features,
            y.data_ptr(), _IMPLS[impl], int(precise), torch.get_num_threads())
    if torch.autograd._profiler_enabled():  # a ctypes call is invisible to torch.profiler unless labelled (~9 us)
        with torch.autograd.profiler.record_function("int8serve::int8_gemv"):
            status = lib.i8s_gemv(*args)
    else:
        status = lib.i8s_gemv(*args)
    if status != 0:
        raise RuntimeError(f"i8s_gemv failed with status {status} (-1: no AVX-512 VNNI, -2: misaligned weight)")
    return y


def quantize_activations(x: Tensor, impl: Impl = "auto") -> tuple[Tensor, Tensor]:
    """x [M, K] -> (int8 [M, Kp], fp32 scales [M, Kp/32]) exactly as the kernel quantizes its input."""
    lib = _library()
    if x.dim() != 2:
        raise ValueError("x must be 2-D")
    x = x.to(device="cpu", dtype=torch.float32).contiguous()
    m, k = x.shape
    kp = -(-k // GROUP) * GROUP
    q = torch.empty(m, kp, dtype=torch.int8)
    scales = torch.empty(m, kp // GROUP, dtype=torch.float32)
    if lib.i8s_quantize(x.data_ptr(), m, k, q.data_ptr(), scales.data_ptr(), _IMPLS[impl]) != 0:
        raise RuntimeError("this CPU lacks AVX-512 VNNI")
    return q, scales
