"""benchmarks/attention_builds.py: builds of attention.cpp are compiled, checked for the same bits and timed case by
case, a build that gives other bits stops the run, and the report is a row per case and cache."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch
from benchmarks.gemv_builds import Variant
from tests.variant_builds import VariantBuilds

from benchmarks import attention_builds as bench
from int8serve.engine.kernels import attention


@pytest.fixture
def small_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """5 kv heads of 32 (a task of 4 heads, then one of 1) in 2 layers, short rows: a quick run of the real code."""
    monkeypatch.setattr(bench, "HEADS", 5)
    monkeypatch.setattr(bench, "HEAD_DIM", 32)
    monkeypatch.setattr(bench, "LAYERS", 2)
    monkeypatch.setattr(bench, "CASES", {"b1@40": (40,), "b4@40-37": (40, 39, 38, 37)})


@pytest.mark.builds(attention=["one=-DINT8SERVE_ATTENTION_HEADS_TOGETHER=1"])
def test_one_head_at_a_time_and_four_side_by_side_agree_and_are_timed(variant_builds: VariantBuilds,
                                                                       small_shape: None) -> None:
    libraries = {**variant_builds.libraries("attention", ["one=-DINT8SERVE_ATTENTION_HEADS_TOGETHER=1"]),
                 "four": attention._library()}  # the default build
    for kv_cache in ("bf16", "int8"):
        step = bench.Step((40, 39, 38, 37), kv_cache)
        seconds = bench.time_case(libraries, step, "auto", rounds=2, order=bench.random.Random(0))
        assert all(len(times) == 2 and min(times) > 0 for times in seconds.values())
        row_bytes = 32 * 2 if kv_cache == "bf16" else 32 + 4  # int8 rows: the values, then one fp32 scale
        assert step.kv_bytes() == (41 + 40 + 39 + 38) * 5 * row_bytes * 2 * 2


def test_a_build_with_other_bits_stops_the_run(small_shape: None) -> None:
    library = attention._library()
    skewed = object()  # stands for a second build: the same library, its outputs nudged by attend

    class Skewed(bench.Step):
        def attend(self, lib: ctypes.CDLL, impl: str) -> list[torch.Tensor]:
            out = super().attend(library, impl)
            return [o + 1e-6 for o in out] if lib is skewed else out

    step = Skewed((40,), "bf16")
    with pytest.raises(SystemExit, match="other bits"):
        bench.time_case({"first": library, "second": skewed}, step, "auto", 1, bench.random.Random(0))  # type: ignore


def test_variants_revisions_and_the_reference() -> None:
    args = bench.parse_args(["--revision", "HEAD~1"])
    assert args.variant == [Variant("HEAD~1", (), "HEAD~1"), Variant("now", ())]  # the revision is the reference
    args = bench.parse_args(["--variant", "a=-DINT8SERVE_ATTENTION_HEADS_TOGETHER=1", "--variant", "b="])
    assert [v.label for v in args.variant] == ["a", "b"]
    for bad in (["--variant", "only="], ["--variant", "x=", "--variant", "x=-DY=1"], ["--revision", "H", "--rounds",
                                                                                      "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


def test_the_report_has_a_row_per_case_and_cache(tmp_path: Path, small_shape: None,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[Variant] = []

    def compiled(variant: Variant, folder: Path, source: Path, opener: object) -> ctypes.CDLL:
        built.append(variant)  # the library already built: no compiler run here
        assert source == attention.SOURCE
        return attention._library()

    monkeypatch.setattr(bench, "compile_variant", compiled)
    out = tmp_path / "bench.md"
    bench.main(["--revision", "HEAD~1", "--cases", "b1@40", "b4@40-37", "--kv-cache", "bf16", "int8", "--rounds",
                "2", "--write", str(out)])
    assert [v.label for v in built] == ["HEAD~1", "now"]
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| b")]
    assert [row.split(" | ")[:2] for row in rows] == [["| b1@40", "bf16"], ["| b4@40-37", "bf16"],
                                                       ["| b1@40", "int8"], ["| b4@40-37", "int8"]]
    assert all("x** (" in row for row in rows)
    assert "--revision 'HEAD~1'" in text and "--write" not in text and f"path {attention.resolve('auto')}" in text
