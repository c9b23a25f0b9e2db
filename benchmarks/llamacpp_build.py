"""Build llama.cpp's `llama-bench` and `llama-batched-bench` once, from the sources inside the `llama-cpp-python`
source distribution on PyPI, into the int8serve cache directory.

Why from that sdist: it is a pinned, published copy of llama.cpp that `pip download` fetches through the package
index we already use, so the comparison in `benchmarks/vs_llamacpp.py` names an exact llama.cpp and needs no git
access. The build is native (`GGML_NATIVE=ON`: the compiler targets this CPU, as a user building llama.cpp for it
would), CPU only, static, and only the two benchmark tools; it takes ~10 minutes on 2 cores and is skipped when the
binaries are already in `<cache>/llama.cpp/llama-cpp-python-<version>-<BUILD_TAG>/bin`. With `--isa avx2` the
compiler is held to AVX2 (`GGML_NATIVE=OFF`, no AVX-512 or AVX-VNNI), into `...-<BUILD_TAG>-avx2/bin`: the code an
AVX2-only CPU (a Zen 2/3) runs, for `vs_llamacpp.py --isa avx2` on a CPU that has more. `--isa avxvnni` adds AVX-VNNI
(still no AVX-512), into `...-avxvnni/bin`: the code of Intel's client CPUs since Alder Lake (whose P-cores are the
Sapphire Rapids' Golden Cove cores without AVX-512 or AMX) and other AVX-VNNI CPUs without AVX-512. `--isa
avx512vnni` allows AVX-512 with VNNI but neither AVX512-BF16 nor AMX, into `...-avx512vnni/bin`: the code of Intel's
Cascade Lake and Ice Lake Xeons.

One patch is applied to the sources before building (`patch_amx`): on CPUs with AMX (Sapphire Rapids and later)
the GGML_NATIVE build uses llama.cpp's AMX kernels for Q8_0, which die with SIGILL at their first `tileloadd` on
this project's machines: the tile configuration is built on the stack and the compiler drops the stores (the
intrinsic is not seen as reading it), and worker threads never ask the kernel for the AMX tile-data permission.
The patch makes the configuration static and asks for the permission in every thread, as the open upstream fix
does (ggml-org/llama.cpp#26954). Without it, llama.cpp on such a CPU runs only with `--repack 0` (no AMX, and no
other repacked layout exists for Q8_0 on x86), about 3x slower at prefill, which would flatter us.

    python -m benchmarks.llamacpp_build            # build (or say where the cached build is)
    python -m benchmarks.llamacpp_build --isa avx2 # the AVX2-only build, in a folder of its own
    python -m benchmarks.llamacpp_build --isa avxvnni  # AVX2 + AVX-VNNI, no AVX-512 (Intel client CPUs)
    python -m benchmarks.llamacpp_build --isa avx512vnni  # AVX-512 + VNNI, no BF16 or AMX (Cascade/Ice Lake)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from int8serve.engine.cache_files import cache_dir

__all__ = ["DEFAULT_VERSION", "BuildError", "LlamaCpp", "ensure_built"]

DEFAULT_VERSION = "0.3.36"
BUILD_TAG = "amxfix1"  # changes whenever the build (flags, patch) changes, so that an older build is not reused
TARGETS = ("llama-bench", "llama-batched-bench")
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_CUDA=OFF", "-DLLAMA_CURL=OFF",
               "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DGGML_OPENMP=ON")
# What the compiler may use: "native" all this CPU has (as a user building llama.cpp for it would); "avx2" the code of
# an AVX2-only CPU (a Zen 2/3, an older Xeon) on any newer one, to compare the two engines' AVX2 code where no such
# CPU is at hand (vs_llamacpp.py --isa avx2 holds ours to its avx2 paths alike); "avxvnni" that and AVX-VNNI, the code
# of an AVX-VNNI CPU without AVX-512 (Intel's Alder Lake and later client CPUs; vs_llamacpp.py --isa avxvnni), where
# llama.cpp's Q8_0 dot products use vpdpbusd on ymm registers; "avx512vnni" AVX-512 with VNNI, no AVX512-BF16 or AMX
# (Intel's Cascade Lake and Ice Lake; vs_llamacpp.py --isa avx512vnni).
_X86 = ("-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_BMI2=ON")
ISA_FLAGS = {
    "native": ("-DGGML_NATIVE=ON",),
    "avx2": (*_X86, "-DGGML_AVX512=OFF", "-DGGML_AVX_VNNI=OFF"),
    "avxvnni": (*_X86, "-DGGML_AVX512=OFF", "-DGGML_AVX_VNNI=ON"),
    "avx512vnni": (*_X86, "-DGGML_AVX_VNNI=OFF", "-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON", "-DGGML_AVX512_VBMI=OFF",
                   "-DGGML_AVX512_BF16=OFF", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"),
}
# How a build held to an ISA describes itself (LlamaCpp.describe)
ISA_WORDS = {"avx2": "AVX2 only", "avxvnni": "AVX2 and AVX-VNNI only (no AVX-512)",
             "avx512vnni": "AVX-512 with VNNI only (no AVX512-BF16, no AMX)"}


class BuildError(RuntimeError):
    """Building llama.cpp failed for a reason a user can act on (the message says which)."""


@dataclass(frozen=True)
class LlamaCpp:
    """A built llama.cpp: where its binaries are and what it was built from."""

    bin_dir: Path
    version: str
    info: dict[str, str]

    @property
    def bench(self) -> Path:
        return self.bin_dir / "llama-bench"

    @property
    def batched_bench(self) -> Path:
        return self.bin_dir / "llama-batched-bench"

    @classmethod
    def at(cls, bin_dir: Path) -> LlamaCpp:
        """The binaries in `bin_dir` (built by this module or otherwise)."""
        missing = [t for t in TARGETS if not os.access(bin_dir / t, os.X_OK)]
        if missing:
            raise BuildError(f"{bin_dir} has no {', '.join(missing)}")
        info_path = bin_dir.parent / "build-info.json"
        info = json.loads(info_path.read_text()) if info_path.is_file() else {}
        return cls(bin_dir, info.get("llama_cpp_python", "?"), info)

    def describe(self) -> str:
        if not self.info:  # binaries this module did not build (--llama-bin): their options are not known here
            return (f"llama.cpp binaries in `{self.bin_dir}`, not built by `benchmarks/llamacpp_build.py` "
                    "(their build options are not recorded here)")
        isa = self.info.get("isa", "native")
        if isa in ISA_WORDS:
            return (f"llama.cpp from the `llama-cpp-python` {self.version} sdist, built for {ISA_WORDS[isa]} (`"
                    + " ".join(ISA_FLAGS[isa]) + "`, CPU only)")
        patch = ", with the AMX fix of ggml-org/llama.cpp#26954" if self.info.get("amx_patch") == "True" else ""
        return f"llama.cpp from the `llama-cpp-python` {self.version} sdist (`GGML_NATIVE=ON`, CPU only{patch})"


def build_root(version: str, isa: str = "native") -> Path:
    """Each build in its own folder (the native one where it always was)."""
    suffix = "" if isa == "native" else f"-{isa}"
    return cache_dir() / "llama.cpp" / f"llama-cpp-python-{version}-{BUILD_TAG}{suffix}"


def log(message: str) -> None:
    print(f"[llama.cpp build] {message}", file=sys.stderr, flush=True)


def cached(version: str, isa: str = "native") -> LlamaCpp | None:
    """The cached build of `version` for `isa`, if both binaries are there and run."""
    root = build_root(version, isa)
    bins = root / "bin"
    if not all(os.access(bins / t, os.X_OK) for t in TARGETS):
        return None
    info_path = root / "build-info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    return LlamaCpp(bins, version, info)


def require_tools() -> tuple[str, str]:
    cmake = shutil.which("cmake")
    if not cmake:
        raise BuildError("cmake is not installed (e.g. `apt-get install cmake`); it is needed once to build llama.cpp")
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        raise BuildError("no C++ compiler found (install g++, or set CXX); it is needed once to build llama.cpp")
    return cmake, cxx


def run(command: Sequence[str], what: str, log_path: Path, cwd: Path | None = None) -> None:
    """Run `command`, its output into `log_path`; a failure raises BuildError with the log's tail."""
    log(f"{what}: {' '.join(command)}")
    with log_path.open("a") as output:
        result = subprocess.run(list(command), stdout=output, stderr=subprocess.STDOUT, cwd=cwd, check=False)
    if result.returncode != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-30:])
        raise BuildError(f"{what} failed (exit {result.returncode}); full log in {log_path}:\n{tail}")


def download_sdist(version: str, into: Path, log_path: Path) -> Path:
    into.mkdir(parents=True, exist_ok=True)
    found = sorted(into.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not found:
        run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
             "--dest", str(into), f"llama-cpp-python=={version}"],
            f"downloading the llama-cpp-python {version} sdist from PyPI", log_path)
        found = sorted(into.glob(f"llama_cpp_python-{version}.tar.gz"))
    if not found:
        raise BuildError(f"pip did not leave llama_cpp_python-{version}.tar.gz in {into}; see {log_path}")
    return found[0]


def extract_llama_cpp(sdist: Path, into: Path) -> Path:
    """Unpack only `vendor/llama.cpp` of the sdist; returns its folder."""
    prefix = sdist.name.removesuffix(".tar.gz") + "/vendor/llama.cpp/"
    if into.exists():
        shutil.rmtree(into)
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith(prefix)]
        if not members:
            raise BuildError(f"{sdist} has no vendor/llama.cpp folder")
        archive.extractall(into, members=members, filter="data")
    return into / prefix.rstrip("/")


AMX_CONFIG_OLD = "    alignas(64) tile_config_t tc = {};\n"
AMX_CONFIG_NEW = """    // int8serve patch (ggml-org/llama.cpp#26954): static, so that the compiler keeps the stores
    // into it, and the AMX tile-data permission asked for in this thread before the first tile instruction
    alignas(64) static thread_local tile_config_t tc = {};
#if defined(__linux__)
    syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */);
#endif
"""


def patch_amx(source: Path) -> bool:
    """Apply the AMX fix to llama.cpp's sources (see the module docstring); False if they do not need it."""
    mmq = source / "ggml" / "src" / "ggml-cpu" / "amx" / "mmq.cpp"
    text = mmq.read_text() if mmq.is_file() else ""
    if AMX_CONFIG_OLD not in text:
        log("AMX patch not applied: these sources do not have the code it fixes")
        return False
    if "#include <sys/syscall.h>" not in text:
        text = "#include <sys/syscall.h>\n#include <unistd.h>\n" + text
    mmq.write_text(text.replace(AMX_CONFIG_OLD, AMX_CONFIG_NEW, 1))
    return True


def build(version: str, isa: str = "native") -> LlamaCpp:
    cmake, cxx = require_tools()
    flags = (*CMAKE_FLAGS, *ISA_FLAGS[isa])
    root = build_root(version, isa)
    root.mkdir(parents=True, exist_ok=True)
    log_path = root / "build.log"
    log_path.write_text("")
    started = time.monotonic()
    sdist = download_sdist(version, root / "sdist", log_path)
    source = extract_llama_cpp(sdist, root / "src")
    patched = patch_amx(source)
    build_dir = root / "build"
    run([cmake, "-S", str(source), "-B", str(build_dir), f"-DCMAKE_CXX_COMPILER={cxx}", *flags],
        "configuring llama.cpp", log_path)
    jobs = str(os.cpu_count() or 2)
    run([cmake, "--build", str(build_dir), "--config", "Release", "-j", jobs, "--target", *TARGETS],
        f"building {', '.join(TARGETS)} (~10 minutes on 2 cores)", log_path)
    bins = root / "bin"
    bins.mkdir(exist_ok=True)
    for target in TARGETS:
        shutil.copy2(build_dir / "bin" / target, bins / target)
    info = {"llama_cpp_python": version, "isa": isa, "amx_patch": str(patched), "cmake_flags": " ".join(flags),
            "compiler": cxx,
            "built": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "build_seconds": f"{time.monotonic() - started:.0f}"}
    (root / "build-info.json").write_text(json.dumps(info, indent=1))
    log(f"built in {info['build_seconds']} s: {bins}")
    return LlamaCpp(bins, version, info)


def ensure_built(version: str = DEFAULT_VERSION, isa: str = "native") -> LlamaCpp:
    """The cached build of llama.cpp `version` for `isa` (ISA_FLAGS), built first if missing. Raises BuildError with
    a clear message."""
    found = cached(version, isa)
    if found:
        log(f"using the cached build in {found.bin_dir}")
        return found
    return build(version, isa)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--llama-cpp-python", default=DEFAULT_VERSION, metavar="VERSION",
                        help=f"the llama-cpp-python sdist whose llama.cpp to build (default {DEFAULT_VERSION})")
    parser.add_argument("--isa", choices=tuple(ISA_FLAGS), default="native",
                        help="native: all this CPU has (default); avx2: AVX2 code only, as on a Zen 2/3; avxvnni: "
                             "AVX2 and AVX-VNNI, no AVX-512, as on Intel's client CPUs since Alder Lake; avx512vnni: "
                             "AVX-512 with VNNI, no AVX512-BF16 or AMX, as on Cascade Lake and Ice Lake Xeons")
    args = parser.parse_args(argv)
    try:
        built = ensure_built(args.llama_cpp_python, args.isa)
    except BuildError as error:
        sys.exit(f"error: {error}")
    print(built.bin_dir)


if __name__ == "__main__":
    main()
