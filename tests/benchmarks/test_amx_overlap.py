"""benchmarks/amx_overlap.py, briefly: the probe runs where the CPU has AMX-INT8 and says why not elsewhere."""

from __future__ import annotations

import pytest

from benchmarks import amx_overlap
from int8serve.engine import kernels


def test_the_probe_measures_each_variant_or_says_why_it_cannot() -> None:
    if not {"amx_int8", "amx_tile"} <= kernels.cpu_flags():  # e.g. an AMD EPYC: a clear refusal, no traceback
        with pytest.raises(SystemExit, match="this CPU has no AMX-INT8"):
            amx_overlap.run_probe(steps=100)
        return
    cycles = amx_overlap.run_probe(steps=2000)
    assert set(cycles) == set(amx_overlap.VARIANTS) and all(value > 0 for value in cycles.values())
    # four tile products of 16 x 16 x 32 take at least a few cycles each; both together no less than the longer alone
    longer = max(cycles["tiles"], cycles["vector"])
    assert cycles["tiles"] > 8 and cycles["vector"] > 8 and cycles["both"] > 0.9 * longer
    text = amx_overlap.report(cycles, 2000)
    assert "| tiles alone |" in text and "| both, interleaved as in the GEMM |" in text and "behind the other" in text


def test_the_probe_source_has_both_halves_of_the_vector_code() -> None:
    source = amx_overlap.probe_source()
    assert source.count("vcvtdq2ps") == 16 and source.count("tdpbssd") == 1 and "[r7]" in source


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(SystemExit):
        amx_overlap.parse_args(["--steps", "0"])
