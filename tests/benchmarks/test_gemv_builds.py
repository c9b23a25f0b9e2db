"""benchmarks/gemv_builds.py: variants are -D defines only, each build is compiled and timed, and every build gives
the same bits (a prefetch hint must never change a result)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from benchmarks import gemv_builds


def test_a_variant_is_a_label_and_defines() -> None:
    variant = gemv_builds.parse_variant("no prefetch=-DINT8SERVE_PREFETCH_BYTES=0")
    assert variant == gemv_builds.Variant("no prefetch", ("-DINT8SERVE_PREFETCH_BYTES=0",))
    assert gemv_builds.parse_variant("default=").defines == ()
    for bad in ("no label", "=-DX=1", "fast=-O0", "march=-march=native"):
        with pytest.raises(argparse.ArgumentTypeError):
            gemv_builds.parse_variant(bad)


def test_one_variant_is_refused() -> None:
    with pytest.raises(SystemExit):
        gemv_builds.parse_args(["--variant", "only="])


def test_builds_are_timed_and_agree(tmp_path: Path) -> None:
    libraries = {v.label: gemv_builds.compile_variant(v, tmp_path)
                 for v in map(gemv_builds.parse_variant, gemv_builds.DEFAULT_VARIANTS)}
    timing = gemv_builds.time_shape(libraries, 192, 160, rows=3, rounds=2, calls=2, threads=1, rotation_bytes=1e5)
    assert timing.outputs_equal
    assert all(len(seconds) == 2 and min(seconds) > 0 for seconds in timing.seconds.values())
    args = gemv_builds.parse_args(["--rows", "3", "--shapes", "qkvo"])
    text = gemv_builds.report(args, [("qkvo", 3, timing)], 0.0)
    assert "no prefetch ÷ default" in text and "4096→4096 (qkvo) | 3 |" in text and "outputs differ" not in text


def test_the_far_hint_forced_either_way_gives_the_same_bits(tmp_path: Path) -> None:
    # INT8SERVE_FAR_HINT_SINGLE_PASS overrides the AMD rule of single-pass calls (gemv.cpp): 1 row is one pass
    variants = ["default=", "never=-DINT8SERVE_FAR_HINT_SINGLE_PASS=0", "always=-DINT8SERVE_FAR_HINT_SINGLE_PASS=1"]
    libraries = {v.label: gemv_builds.compile_variant(v, tmp_path) for v in map(gemv_builds.parse_variant, variants)}
    timing = gemv_builds.time_shape(libraries, 4096, 192, rows=1, rounds=1, calls=1, threads=2, rotation_bytes=1e5)
    assert timing.outputs_equal
