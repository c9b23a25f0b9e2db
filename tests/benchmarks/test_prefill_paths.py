"""benchmarks/prefill_paths.py on a tiny shape: both steps of the dense path are timed against what they replaced."""

from __future__ import annotations

import pytest

from benchmarks import prefill_paths
from int8serve.engine import kernels
from int8serve.engine.kernels import matmul as prefill_matmul


def test_a_tiny_shape_is_measured_and_reported() -> None:
    lines = prefill_paths.measure_shape(64, 96, rows=4, rounds=2, step_rows=(40, 7))
    paths = prefill_matmul.paths()  # the bf16 step, old against each path of our kernel, on the CPUs that have one
    assert len(lines) == 3 + 2 * len(paths) + (2 if kernels.path() == "avx2" else 0)
    assert "dequantize into fp32" in lines[0] and "dequantize into bf16" in lines[1]
    assert "fp32 matmul, 4 rows" in lines[2]
    bf16_steps = lines[3:3 + 2 * len(paths)]  # (then, on the avx2 path, its fp32 step: the test below)
    for line, (rows, path) in zip(bf16_steps, [(rows, path) for rows in (40, 7) for path in paths], strict=True):
        assert f"bf16 prefill step, {rows} rows, our `{path}` path" in line and "TFLOP/s" in line
    assert all(line.rstrip().endswith("× |") for line in lines)
    text = prefill_paths.report(prefill_paths.parse_args(["--rows", "4"]), lines, 0.0)
    assert "| shape K→N | step | old | new |" in text and "prefill matmuls" in text


def test_the_avx2_path_s_prefill_step_is_measured_against_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    """On the avx2 path (an AVX2-only CPU's, forced here) the fp32 step: dequantize + oneDNN against our int8
    kernel's GEMM, for each --step-rows count; the command line shows the setting that forced it."""
    if not kernels.cpu_has("avx2"):
        pytest.skip("this CPU lacks avx2")
    monkeypatch.setenv(kernels.ENV_PATH, "avx2")
    lines = prefill_paths.measure_shape(64, 96, rows=4, rounds=2, step_rows=(40, 7))
    avx2 = [line for line in lines if "our int8 kernel's `avx2` GEMM" in line]
    assert len(avx2) == 2 and "fp32 prefill step, 40 rows" in avx2[0] and "fp32 prefill step, 7 rows" in avx2[1]
    assert all("GFLOP/s" in line and line.rstrip().endswith("× |") for line in avx2)
    text = prefill_paths.report(prefill_paths.parse_args(["--step-rows", "40", "7"]), lines, 0.0)
    assert "`INT8SERVE_KERNEL=avx2 python -m benchmarks.prefill_paths --rows 128 --step-rows 40 7" in text
    assert "our int8 kernel's avx2 path, every call" in text
    assert prefill_paths.section_label().endswith(" INT8SERVE_KERNEL=avx2")  # (a section apart from the CPU's own)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(SystemExit):
        prefill_paths.parse_args(["--rows", "0"])
    with pytest.raises(SystemExit):
        prefill_paths.parse_args(["--step-rows", "128", "0"])
    assert prefill_paths.parse_args(["--bf16-rows", "48", "128"]).step_rows == [48, 128]  # (its former name)
