"""benchmarks/matmul_builds.py: builds of matmul.cpp are compiled, checked for the same bits and timed shape by shape
on every path the CPU runs, a build that gives other bits stops the run, and the report is a row per shape and row
count."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest
import torch
from benchmarks.gemv_builds import Variant, parse_variant

from benchmarks import matmul_builds as bench
from int8serve.engine import int8, kernels
from int8serve.engine.kernels import matmul

needs_the_kernel = pytest.mark.skipif(not matmul.available(), reason=f"the bf16 prefill kernel does not run here: "
                                      f"{matmul.unavailable_reason()}")


@pytest.fixture
def small_shapes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two small shapes (two K-blocks, two panels and a part) and few copies: a quick run of the real code."""
    monkeypatch.setattr(bench, "SHAPES", {"a": (512, 576), "b": (288, 128)})
    monkeypatch.setattr(bench, "ROTATION_BYTES", 3 * 512 * 576)


@needs_the_kernel
@pytest.mark.parametrize("path", list(matmul.PATHS))
def test_builds_asking_for_their_bytes_at_other_distances_agree_and_are_timed(tmp_path: Path, small_shapes: None,
                                                                             path: str) -> None:
    if path not in matmul.paths():
        pytest.skip(f"this CPU (or process) cannot run the {path} path")
    one = parse_variant("one ahead=-DINT8SERVE_MATMUL_JOBS_AHEAD=1")
    libraries = {"default": matmul._load(), "one ahead": bench.compile_variant(one, tmp_path, matmul.SOURCE,
                                                                                matmul._open)}
    for rows in (40, 96):
        case = bench.Case("a", rows)
        assert len(case.weights) == 3
        seconds = bench.time_case(libraries, case, path, rounds=2, order=bench.random.Random(0))
        assert all(len(times) == 2 and min(times) > 0 for times in seconds.values())
        assert case.multiply_adds() == rows * 512 * 576
        weight = int8.dequantize(kernels.unpack_weight(case.weights[0]), case.weights[0].scales())
        expected = case.x.to(torch.bfloat16).float() @ weight.to(torch.bfloat16).float().T
        torch.testing.assert_close(case.product(libraries["one ahead"], path), expected, rtol=1e-4, atol=1e-3)


@needs_the_kernel
def test_a_build_with_other_bits_stops_the_run(small_shapes: None) -> None:
    library = matmul._load()
    skewed = object()  # stands for a second build: the same library, its outputs nudged

    class Skewed(bench.Case):
        def product(self, lib: ctypes.CDLL, path: str, copy: int = 0) -> torch.Tensor:
            out = super().product(library, path, copy)  # type: ignore[arg-type]
            return out + 1e-6 if lib is skewed else out

    with pytest.raises(SystemExit, match="other bits"):
        bench.time_case({"first": library, "second": skewed}, Skewed("b", 32), matmul.path(), 1,  # type: ignore
                        bench.random.Random(0))


def test_variants_revisions_and_the_reference() -> None:
    args = bench.parse_args(["--revision", "HEAD~1"])
    assert args.variant == [Variant("HEAD~1", (), "HEAD~1"), Variant("now", ())]  # the revision is the reference
    args = bench.parse_args(["--variant", "a=-DINT8SERVE_MATMUL_JOBS_AHEAD=4", "--variant", "b="])
    assert [v.label for v in args.variant] == ["a", "b"] and args.rows == [128, 512]
    for bad in (["--variant", "only="], ["--variant", "x=", "--variant", "x=-DY=1"], ["--revision", "H", "--rounds",
                "0"], ["--revision", "H", "--rows", "0"], ["--revision", "H", "--path", "sse"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)


@needs_the_kernel
def test_a_path_the_cpu_cannot_run_is_refused_by_name(monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(matmul, "paths", lambda: ("avx512bf16",))  # as on a Zen 4, or where Linux refused the tiles
    with pytest.raises(SystemExit, match="cannot run the amx path; it runs avx512bf16"):
        bench.main(["--revision", "HEAD~1", "--path", "amx"])


@needs_the_kernel
def test_the_report_has_a_row_per_shape_and_row_count(tmp_path: Path, small_shapes: None,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[Variant] = []

    def compiled(variant: Variant, folder: Path, source: Path, opener: object) -> ctypes.CDLL:
        built.append(variant)  # the library already built: no compiler run here
        assert source == matmul.SOURCE
        return matmul._load()  # type: ignore[return-value]

    monkeypatch.setattr(bench, "compile_variant", compiled)
    out = tmp_path / "bench.md"
    bench.main(["--revision", "HEAD~1", "--shapes", "a", "b", "--rows", "32", "64", "--rounds", "2",
                "--write", str(out)])
    assert [v.label for v in built] == ["HEAD~1", "now"]
    text = out.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| shape")]
    assert [row.split(" | ")[:2] for row in rows] == [["| 512→576 (a)", "32"], ["| 512→576 (a)", "64"],
                                                       ["| 288→128 (b)", "32"], ["| 288→128 (b)", "64"]]
    assert all("x** (" in row for row in rows)
    assert "--revision 'HEAD~1'" in text and "--write" not in text and f"path {matmul.path()}" in text
    assert f"<!-- benchmarks/matmul_builds.py {bench.cpu_label()} {matmul.path()}: begin -->" in text
