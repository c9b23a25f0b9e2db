"""benchmarks/prefill_paths.py on a tiny shape: both steps of the dense path are timed against what they replaced."""

from __future__ import annotations

import pytest

from benchmarks import prefill_paths
from int8serve.engine import int8, kernels
from int8serve.engine.kernels import matmul as prefill_matmul


def test_a_tiny_shape_is_measured_and_reported() -> None:
    lines = prefill_paths.measure_shape(64, 96, rows=4, rounds=2, step_rows=(40, 7))
    wide16 = kernels.path() in int8.WIDE16_PATHS  # (an AVX2-only or AVX-VNNI CPU: its fp32 step, the test below)
    paths = () if wide16 else prefill_matmul.paths()  # the bf16 step, old against each path of our kernel
    # and, where our int8 kernel has a GEMM of decode's numerics beside the bf16 kernel, that GEMM against it
    exact = 1 if paths and kernels.path() in prefill_paths.EXACT_GEMM_PATHS else 0
    assert len(lines) == 3 + 2 * (len(paths) + exact) + (2 if kernels.path() == "avx2" else 4 if wide16 else 0)
    assert "dequantize into fp32" in lines[0] and "dequantize into bf16" in lines[1]
    assert "fp32 matmul, 4 rows" in lines[2]
    bf16_steps = [line for line in lines if "bf16 prefill step" in line]
    for line, (rows, path) in zip(bf16_steps, [(rows, path) for rows in (40, 7) for path in paths], strict=True):
        assert f"bf16 prefill step, {rows} rows, our `{path}` path" in line and "TFLOP/s" in line
    exact_steps = [line for line in lines if "row-exact prefill step" in line]
    assert len(exact_steps) == 2 * exact
    for line, rows in zip(exact_steps, (40, 7), strict=False):
        assert (f"row-exact prefill step, {rows} rows: our int8 kernel's `{kernels.path()}` GEMM" in line
                and f"against our bf16 kernel's `{prefill_matmul.path()}` path" in line)
    assert all(line.rstrip().endswith("× |") for line in lines)
    text = prefill_paths.report(prefill_paths.parse_args(["--rows", "4"]), lines, 0.0)
    assert "| shape K→N | step | old | new |" in text and "prefill matmuls" in text


@pytest.mark.parametrize("path", int8.WIDE16_PATHS)
def test_the_16_bit_gemm_paths_prefill_step_is_measured_against_onednn(path: str, monkeypatch: pytest.MonkeyPatch
                                                                       ) -> None:
    """On the avx2 and avxvnni paths (an AVX2-only or AVX-VNNI CPU's, forced here) the fp32 step: dequantize +
    oneDNN against our int8 kernel's GEMM, for each --step-rows count; the command line shows the setting that forced
    it, and no bf16 step is measured (those CPUs have no bf16 kernel)."""
    if not kernels.cpu_has(path):
        pytest.skip(f"this CPU lacks the {path} path")
    monkeypatch.setenv(kernels.ENV_PATH, path)
    lines = prefill_paths.measure_shape(64, 96, rows=4, rounds=2, step_rows=(40, 7))
    assert not any("bf16 prefill step" in line for line in lines)
    steps = [line for line in lines if f"our int8 kernel's `{path}` GEMM" in line]
    assert len(steps) == 2 and "fp32 prefill step, 40 rows" in steps[0] and "fp32 prefill step, 7 rows" in steps[1]
    # the avxvnni path's GEMM is also timed against the avx2 path's (the same rounds), a line after each
    against_avx2 = [line for line in lines if f"the `{path}` GEMM against the `avx2` one" in line]
    assert len(against_avx2) == (0 if path == "avx2" else 2) and len(lines) == 3 + 2 + len(against_avx2)
    assert all("GFLOP/s" in line and line.rstrip().endswith("× |") for line in steps + against_avx2)
    text = prefill_paths.report(prefill_paths.parse_args(["--step-rows", "40", "7"]), lines, 0.0)
    assert f"`INT8SERVE_KERNEL={path} python -m benchmarks.prefill_paths --rows 128 --step-rows 40 7" in text
    assert f"our int8 kernel's {path} path, every call" in text
    assert prefill_paths.section_label().endswith(f" INT8SERVE_KERNEL={path}")  # (a section apart from the CPU's)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(SystemExit):
        prefill_paths.parse_args(["--rows", "0"])
    with pytest.raises(SystemExit):
        prefill_paths.parse_args(["--step-rows", "128", "0"])
    assert prefill_paths.parse_args(["--bf16-rows", "48", "128"]).step_rows == [48, 128]  # (its former name)
