"""An $INT8SERVE_CACHE of its own for each server or command a test starts, without compiling our kernels again.

Each such process gets an empty cache folder, so that what one test writes there (an int8 copy, the built-in model)
is never what another finds. Only the compiled kernels are shared: compiling them again took ~20 s a process, which
was a third of the suite's time. The tests of building the kernels give the kernels module an empty folder instead.
"""

from __future__ import annotations

from pathlib import Path

from int8serve.engine import kernels

# where this test process compiles our kernels (its $INT8SERVE_CACHE as the suite starts, before any test changes it)
KERNEL_BUILDS = kernels.cache_dir() / "kernels"


def fresh_cache(path: Path) -> Path:
    """`path` as a new $INT8SERVE_CACHE: empty but for `kernels`, a link to this test process's builds (keyed by
    source, flags and compiler, and made under a lock, so a process may add to them)."""
    path.mkdir(parents=True, exist_ok=True)
    KERNEL_BUILDS.mkdir(parents=True, exist_ok=True)
    link = path / "kernels"
    if not link.exists():
        link.symlink_to(KERNEL_BUILDS, target_is_directory=True)
    return path
