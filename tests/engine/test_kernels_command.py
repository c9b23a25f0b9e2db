"""`python -m int8serve.engine.kernels`, which `make install` runs: every library built (or found) and said, with the
decode kernel's path on this CPU; exit 1, with the reason for each, where the decode kernel is not in use."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.fresh_cache import fresh_cache

from int8serve.engine import kernels
from int8serve.engine.kernels.__main__ import LIBRARIES


def run_command(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    cache = fresh_cache(tmp_path / "cache")  # the suite's builds: nothing is compiled again
    return subprocess.run([sys.executable, "-m", "int8serve.engine.kernels"], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "INT8SERVE_CACHE": str(cache), **env})


def test_every_library_is_built_and_the_decode_path_said(tmp_path: Path) -> None:
    assert kernels.available(), kernels.unavailable_reason()
    done = run_command(tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for name in LIBRARIES:
        (line,) = [line for line in lines if line.startswith(f"{name}: ")]
        said = line.removeprefix(f"{name}: ")
        # a library built into the cache, or the reason this CPU does not use it (matmul.cpp without AVX-512 BF16)
        assert said.startswith(str(tmp_path / "cache" / "kernels")) or said.startswith("not used: "), line
    assert lines[-1] == kernels.describe()
    assert f"int8 decode kernel: {kernels.path()}" in lines[-1]


def test_without_the_decode_kernel_each_reason_is_said_and_the_status_is_1(tmp_path: Path) -> None:
    done = run_command(tmp_path, INT8SERVE_KERNELS="0")
    assert done.returncode == 1
    for name in LIBRARIES:
        assert f"{name}: not used: disabled by INT8SERVE_KERNELS=0" in done.stdout
    assert "torch's stock int8 kernels in use: disabled by INT8SERVE_KERNELS=0" in done.stdout
