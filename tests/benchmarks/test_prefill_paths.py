"""benchmarks/prefill_paths.py on a tiny shape: both steps of the dense path are timed against what they replaced."""

from __future__ import annotations

import pytest

from benchmarks import prefill_paths
from int8serve.engine.kernels import matmul as prefill_matmul


def test_a_tiny_shape_is_measured_and_reported() -> None:
    lines = prefill_paths.measure_shape(64, 96, rows=4, rounds=2, bf16_rows=(40, 7))
    paths = prefill_matmul.paths()  # the bf16 step, old against each path of our kernel, on the CPUs that have one
    assert len(lines) == 3 + 2 * len(paths)
    assert "dequantize into fp32" in lines[0] and "dequantize into bf16" in lines[1]
    assert "fp32 matmul, 4 rows" in lines[2]
    for line, (rows, path) in zip(lines[3:], [(rows, path) for rows in (40, 7) for path in paths], strict=True):
        assert f"bf16 prefill step, {rows} rows, our `{path}` path" in line and "TFLOP/s" in line
    assert all(line.rstrip().endswith("× |") for line in lines)
    text = prefill_paths.report(prefill_paths.parse_args(["--rows", "4"]), lines, 0.0)
    assert "| shape K→N | step | old | new |" in text and "prefill matmuls" in text


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(SystemExit):
        prefill_paths.parse_args(["--rows", "0"])
    with pytest.raises(SystemExit):
        prefill_paths.parse_args(["--bf16-rows", "128", "0"])
