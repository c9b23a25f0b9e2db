"""Building our C++ kernels (gemv.cpp, activation.cpp, attention.cpp, matmul.cpp) into the cache of built libraries.

Why a module of its own: the four libraries are compiled the same way, with one compiler command, flags and cache
key, so that a library built once serves every later start; this is that one way. The library is compiled on first
use with the system C++ compiler (g++; $CXX overrides) straight into a cache directory ($INT8SERVE_CACHE, else
$XDG_CACHE_HOME/int8serve, else ~/.cache/int8serve), keyed by a hash of the source, the headers it may include, the
flags and the compiler's version. Each is a plain C ABI with no torch or Python headers, so it builds in seconds,
needs no ninja and does not depend on torch's version. Loading a built library is library.py's part.
"""

from __future__ import annotations

import contextlib
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
from pathlib import Path

from ...durable import replace_durably
from ..cache_files import cache_dir, scratch_folder, usual_mode

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gemv.cpp")  # the decode kernel (gemv.py): what `build` builds unless told
LIBRARY = "int8serve_kernels.so"  # a built library's name in its cache folder (one folder per build key)

# each of GCC's parallel jobs holds a part of the program in memory; a container's CPU quota does not show in the
# affinity, which may list a large host's every CPU
MAX_BUILD_JOBS = 8
# -ffp-contract=off: the scalar path must round exactly like the vector paths (explicit fma only). No -march: the
# vector functions carry their own target attributes and are only called after a runtime CPU check.
CXXFLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-fopenmp", "-ffp-contract=off", "-fvisibility=hidden",
            "-Wall", "-Wextra", "-Wno-uninitialized", "-Wno-maybe-uninitialized"]


class BuildError(RuntimeError):
    """A library that cannot be built (no compiler, a failed compile) or opened (another ABI version)."""


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise BuildError("no C++ compiler found (set CXX, or install g++)")
    return cxx


@functools.cache
def _compiler_version(cxx: str) -> str:
    """`cxx --version`: part of each build's key, and it says whether the compiler is GCC."""
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as error:
        raise BuildError(f"cannot run {cxx}: {error}") from error


def _parallel_flags(cxx: str) -> list[str]:
    """GCC's link-time optimizer, which splits a source's code generation into parts compiled side by side, one per
    CPU this process may use. GCC compiles a source on one core otherwise, and attention.cpp's many template
    instances took 36 s to build on an AMD EPYC Zen 4 (2 cores; 80 s on a Zen 1), a server's first start and the
    test suite's longest wait: 20 s so (gemv.cpp 5.0 -> 3.1 s). The code is the same: the optimizer decides inlining
    over the whole source before it splits it. A number of jobs rather than `auto` (GCC 10 and later only)."""
    if "Free Software Foundation" not in _compiler_version(cxx):
        return []  # other compilers (clang) build on one core, as before
    return [f"-flto={min(len(os.sched_getaffinity(0)), MAX_BUILD_JOBS)}"]


def _command(cxx: str, output: Path, source: Path = SOURCE) -> list[str]:
    return [cxx, *CXXFLAGS, *_parallel_flags(cxx), str(source), "-o", str(output)]


def _build_key(cxx: str, source: Path = SOURCE) -> str:
    version = _compiler_version(cxx)
    # the flags without the number of jobs: the same library whatever the number of CPUs
    flags = [*CXXFLAGS, *(flag.partition("=")[0] for flag in _parallel_flags(cxx))]
    digest = hashlib.sha256()
    headers = [h.read_bytes() for h in sorted(source.parent.glob("*.h"))]  # what the sources #include
    for part in (source.read_bytes(), *headers, " ".join(flags).encode(), cxx.encode(), version.encode()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def build(verbose: bool = False, source: Path = SOURCE) -> Path:
    """Compile `source` (gemv.cpp; attention.cpp for attention.py) into the cache (once per source, flags and
    compiler) and return the library's path.

    Concurrent first uses (several test workers, server processes) serialize on an flock, which the kernel drops if
    its holder dies. The library is written to a temporary name, synced and renamed into place, then its size and
    sha256 are recorded beside it: a library that does not match its record (cut short by a power loss, emptied,
    overwritten) or has none is said so in the log and built again, never loaded (a cut-short one crashed every start
    with SIGBUS). A cache that cannot be written costs a warning and a build in a temporary folder.
    """
    cxx = _compiler()
    library = cache_dir() / "kernels" / _build_key(cxx, source) / LIBRARY
    if _damage(library) is None:
        return library
    try:
        return _build_in_cache(cxx, source, library, verbose)
    except OSError as error:  # a read-only or full cache
        log.warning("cannot write the kernel cache %s (%s); building %s in a temporary folder, again at every start",
                    library.parent, error, source.name)
        library = scratch_folder("kernels") / LIBRARY
        _compile(cxx, source, library, verbose)
        return library



def _record(library: Path) -> Path:
    """Where `build` records the size and sha256 of `library`, once it is in place."""
    return library.with_name(library.name + ".sha256")


def _damage(library: Path) -> str | None:
    """None when `library` is the file its build recorded; else what is wrong with it ("missing" when absent)."""
    try:
        data = library.read_bytes()
    except FileNotFoundError:
        return "missing"
    try:
        recorded = _record(library).read_text().split()
    except FileNotFoundError:
        return "no record of a finished build (a build cut short, or one made before int8serve recorded them)"
    found = [str(len(data)), hashlib.sha256(data).hexdigest()]
    if recorded != found:
        return f"{found[0]} bytes, sha256 {found[1][:16]}; the build recorded {' '.join(recorded)[:90]}"
    return None


def _build_in_cache(cxx: str, source: Path, library: Path, verbose: bool) -> Path:
    """Build `library` under the cache's lock, unless another process did meanwhile; a damaged one is replaced."""
    library.parent.mkdir(parents=True, exist_ok=True)
    with open(library.parent / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        damage = _damage(library)
        if damage is None:
            return library
        if damage != "missing":
            log.warning("the cached kernel library %s cannot be used, building it again: %s", library, damage)
            discard_library(library)
        _compile(cxx, source, library, verbose)
    return library


def _compile(cxx: str, source: Path, library: Path, verbose: bool) -> None:
    """Compile to a temporary name, sync, rename to `library`, then record its size and sha256 beside it."""
    fd, tmp_name = tempfile.mkstemp(suffix=".so", dir=library.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        start = time.perf_counter()
        try:
            result = subprocess.run(_command(cxx, tmp, source), capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.SubprocessError) as error:
            raise BuildError(f"{cxx} failed to run: {error}") from error
        if result.returncode != 0:
            raise BuildError(f"compiling {source.name} failed ({result.returncode}):\n{result.stderr[-4000:]}")
        if verbose:
            print(f"built {library} in {time.perf_counter() - start:.1f} s", file=sys.stderr)
        log.info("built %s in %.1f s", library, time.perf_counter() - start)
        data = tmp.read_bytes()
        usual_mode(tmp, executable=True)  # mkstemp's 0600, which the linker made 0711: loadable by its owner only
        replace_durably(tmp, library)
        record = _record(library).with_suffix(f".{os.getpid()}.partial")
        record.write_text(f"{len(data)} {hashlib.sha256(data).hexdigest()}\n")
        replace_durably(record, _record(library))
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def discard_library(library: Path) -> None:
    """Remove a cached library and its record (a process that loaded it keeps its unlinked file)."""
    for file in (library, _record(library)):
        with contextlib.suppress(FileNotFoundError):
            file.unlink()

