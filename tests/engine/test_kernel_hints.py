"""The kernels' cache hints are in the built code, not only in the sources.

A hint changes no result, so no other test sees it go. GCC 12 removed every call to our small helpers whose only
effect was `_mm_prefetch` (engine/kernels/prefetch.h): the GEMMs' hints for the next K-block were missing from the
library built at 8fca354, decode attention's L2 hints in its score loops from every build. This disassembles the
libraries built from the sources (as the server builds them) and looks for those hints where they are asked for.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import defaultdict
from pathlib import Path

import pytest

from int8serve.engine import kernels
from int8serve.engine.kernels import attention

FUNCTION = re.compile(r"^[0-9a-f]+ <(?P<name>.*)>:$")


def hints_by_function(library: Path) -> dict[str, set[str]]:
    """Each function of `library` (demangled name) -> the prefetch instructions in its code."""
    objdump = shutil.which("objdump")
    assert objdump, "objdump (binutils, installed with the C++ compiler the kernels need) is not on PATH"
    listing = subprocess.run([objdump, "-d", "--no-show-raw-insn", "-C", str(library)], capture_output=True,
                             text=True, timeout=300, check=True).stdout
    hints: dict[str, set[str]] = defaultdict(set)
    name = ""
    for line in listing.splitlines():
        if match := FUNCTION.match(line):
            name = match["name"]
            hints[name] = set()  # (every function, with or without hints)
        elif "prefetch" in line:
            hints[name].add(line.split()[1])
    return hints


def hints_of(hints: dict[str, set[str]], *parts: str) -> set[str]:
    """The hints of every function whose name holds one of `parts` (GCC may inline a helper or clone a function, and
    inline a GEMM's per-tile body into it or not)."""
    names = [name for name in hints if any(part in name for part in parts)]
    return set().union(*(hints[name] for name in names)) if names else set()


@pytest.fixture(scope="module")
def gemv_hints() -> dict[str, set[str]]:
    return hints_by_function(kernels.build())


@pytest.fixture(scope="module")
def attention_hints() -> dict[str, set[str]]:
    return hints_by_function(kernels.build(source=attention.SOURCE))


@pytest.mark.parametrize("gemm", [("gemm_exact_vnni512", "gemm_exact_tile"),
                                  ("gemm_wide16<false>", "gemm_wide16_tile<false>"),
                                  ("gemm_wide16<true>", "gemm_wide16_tile<true>")])
def test_the_gemms_ask_for_their_next_kblock(gemv_hints: dict[str, set[str]], gemm: tuple[str, str]) -> None:
    assert "prefetcht1" in hints_of(gemv_hints, *gemm), f"{gemm[0]} has no L2 hint in the built code"


def test_the_amx_gemm_asks_for_none(gemv_hints: dict[str, set[str]]) -> None:
    """Measured faster without it on a Sapphire Rapids (gemv.cpp, INT8SERVE_AMX_GEMM_HINT): the hint must not come
    back unmeasured, e.g. from a helper shared with the other GEMMs."""
    assert any("gemm_exact_amx" in name for name in gemv_hints), "gemm_exact_amx is not in the built code"
    found = hints_of(gemv_hints, "gemm_exact_amx", "gemm_amx_tile")
    assert "prefetcht1" not in found, f"the AMX GEMM asks for {found}"


@pytest.mark.parametrize("scores", ["scores_hinting_avx512", "scores_hinting_avx2"])
def test_decode_attention_scores_ask_for_rows_into_l2(attention_hints: dict[str, set[str]], scores: str) -> None:
    found = hints_of(attention_hints, scores + "<float")
    assert {"prefetcht0", "prefetcht1"} <= found, f"{scores} (bf16/fp32 cache) has hints {found or 'none'}"


@pytest.mark.parametrize("scores", ["scores_q8_hinting_avx512", "scores_q8_hinting_avx2"])
def test_the_int8_cache_scores_ask_for_keys_only(attention_hints: dict[str, set[str]], scores: str) -> None:
    # kHintQ8Stream: measured slower with the L2 hints, so only the L1 hints of the keys ahead
    assert hints_of(attention_hints, scores) == {"prefetcht0"}
