"""benchmarks/gemv_builds.py: variants are -D defines only, each build is compiled and timed, and every build gives
the same bits (a prefetch hint must never change a result)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
from tests.variant_builds import VariantBuilds

from benchmarks import gemv_builds


def test_a_variant_is_a_label_and_defines() -> None:
    variant = gemv_builds.parse_variant("no prefetch=-DINT8SERVE_PREFETCH_BYTES=0")
    assert variant == gemv_builds.Variant("no prefetch", ("-DINT8SERVE_PREFETCH_BYTES=0",))
    assert gemv_builds.parse_variant("default=").defines == ()
    assert gemv_builds.parse_variant("one core=-fno-lto -DX=1").defines == ("-fno-lto", "-DX=1")
    for bad in ("no label", "=-DX=1", "fast=-O0", "march=-march=native", "lto=-flto=8"):
        with pytest.raises(argparse.ArgumentTypeError):
            gemv_builds.parse_variant(bad)


def test_one_variant_is_refused() -> None:
    with pytest.raises(SystemExit):
        gemv_builds.parse_args(["--variant", "only="])


def test_builds_are_timed_and_agree(tmp_path: Path) -> None:
    libraries = {v.label: gemv_builds.compile_variant(v, tmp_path)
                 for v in map(gemv_builds.parse_variant, gemv_builds.DEFAULT_VARIANTS)}
    # the default build is the kernels' own cached library: only the other one was compiled here
    assert [path.name for path in tmp_path.iterdir()] == ["variant0.so"]
    timing = gemv_builds.time_shape(libraries, 192, 160, rows=3, rounds=2, calls=2, threads=1, rotation_bytes=1e5)
    assert timing.outputs_equal
    assert all(len(seconds) == 2 and min(seconds) > 0 for seconds in timing.seconds.values())
    args = gemv_builds.parse_args(["--rows", "3", "--shapes", "qkvo"])
    text = gemv_builds.report(args, [("qkvo", 3, timing)], 0.0)
    assert "no prefetch ÷ default" in text and "4096→4096 (qkvo) | 3 |" in text and "outputs differ" not in text


# INT8SERVE_FAR_HINT_SINGLE_PASS and INT8SERVE_L2_HINT_ALWAYS override the AMD rule of single-pass calls (gemv.cpp)
FAR_HINTS = ["default=", "never=-DINT8SERVE_FAR_HINT_SINGLE_PASS=0", "always=-DINT8SERVE_FAR_HINT_SINGLE_PASS=1",
             "L2 always=-DINT8SERVE_L2_HINT_ALWAYS=1"]


@pytest.mark.builds(gemv=FAR_HINTS)
def test_the_far_hints_forced_either_way_give_the_same_bits(variant_builds: VariantBuilds) -> None:
    libraries = variant_builds.libraries("gemv", FAR_HINTS)  # 1 row is one pass
    timing = gemv_builds.time_shape(libraries, 4096, 192, rows=1, rounds=1, calls=1, threads=2, rotation_bytes=1e5)
    assert timing.outputs_equal


FOUR_ROW_DECODE = ["assembly=", "intrinsics=-DINT8SERVE_WIDE_DECODE_ASM=0"]


@pytest.mark.builds(gemv=FOUR_ROW_DECODE)
def test_the_four_row_decode_in_assembly_and_in_intrinsics_give_the_same_bits(
        variant_builds: VariantBuilds, monkeypatch: pytest.MonkeyPatch) -> None:
    # 4 rows of precise activations on the avx2 path: half_sums<4> (gemv.cpp), assembly by default
    monkeypatch.setenv("INT8SERVE_KERNEL", "avx2")
    libraries = variant_builds.libraries("gemv", FOUR_ROW_DECODE)
    for rows in (3, 4):
        timing = gemv_builds.time_shape(libraries, 320, 4096 + 96, rows=rows, rounds=1, calls=1, threads=2,
                                        rotation_bytes=1e5)
        assert timing.outputs_equal


def test_a_revision_is_built_from_its_own_sources(tmp_path: Path) -> None:
    args = gemv_builds.parse_args(["--revision", "HEAD", "--rows", "1"])
    assert [(v.label, v.revision) for v in args.variant] == [("now", None), ("HEAD", "HEAD")]
    assert "--revision HEAD" in gemv_builds.command_line(args)
    libraries = {v.label: gemv_builds.compile_variant(v, tmp_path) for v in args.variant}
    assert (tmp_path / "sources0" / "gemv.cpp").read_text().startswith("//")  # the revision's own file was built
    assert sorted(path.name for path in tmp_path.iterdir()) == ["sources0", "variant0.so"]  # "now": the cached one
    timing = gemv_builds.time_shape(libraries, 192, 160, rows=2, rounds=1, calls=1, threads=1, rotation_bytes=1e5)
    assert timing.outputs_equal  # every revision since the packed layout v2 gives these bits
    text = gemv_builds.report(args, [("qkvo", 2, timing)], 0.0)
    assert "HEAD: the sources at HEAD" in text and "HEAD ÷ now" in text


def test_a_revision_git_does_not_know_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="no-such-revision"):
        gemv_builds.revision_sources("no-such-revision", tmp_path / "src")
    with pytest.raises(SystemExit):
        gemv_builds.parse_args(["--variant", "HEAD=", "--revision", "HEAD"])  # two builds, one label


GEMM_FORMS = ["older forms=-DINT8SERVE_WIDE6_DOT=0 -DINT8SERVE_WIDE6_ADD=0 -DINT8SERVE_EXACT_BROADCAST_REG=0",
              "newer forms=-DINT8SERVE_WIDE6_DOT=1 -DINT8SERVE_WIDE6_ADD=1 -DINT8SERVE_EXACT_BROADCAST_REG=1"]


@pytest.mark.builds(gemv=GEMM_FORMS)
def test_each_register_block_and_broadcast_form_of_the_gemms_gives_the_same_bits(
        variant_builds: VariantBuilds, monkeypatch: pytest.MonkeyPatch) -> None:
    """The 16-bit GEMM's 6 x 16 and 3 x 32 blocks (INT8SERVE_WIDE6_DOT on the avxvnni path, INT8SERVE_WIDE6_ADD on the
    avx2 path) and the vnni512 GEMM's broadcasts in a register or as memory operands (INT8SERVE_EXACT_BROADCAST_REG):
    each CPU runs one of each by default (gemv.cpp), and every one must give the same bits. Row counts with 6-row
    blocks and each kind of tail."""
    from int8serve.engine import kernels

    libraries = variant_builds.libraries("gemv", GEMM_FORMS)
    paths = [path for path in ("avx2", "avxvnni", "vnni512") if kernels.cpu_has(path)]
    assert "avx2" in paths, "every x86 machine of this project has AVX2"
    for path in paths:
        monkeypatch.setenv(kernels.ENV_PATH, path)
        for rows in (17, 40):
            timing = gemv_builds.time_shape(libraries, 192, 4096 + 96, rows=rows, rounds=1, calls=1, threads=2,
                                            rotation_bytes=1e5)
            assert timing.outputs_equal, (path, rows)
