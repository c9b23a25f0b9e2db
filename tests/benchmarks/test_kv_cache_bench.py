"""benchmarks/kv_cache.py: the bf16 and int8 caches hold the same values, and a short run prints its table."""

from __future__ import annotations

import pytest
import torch

from benchmarks import kv_cache
from int8serve.engine import kv_int8


def test_both_caches_hold_the_same_keys_and_values() -> None:
    held = kv_cache.caches(layers=2, slots=1, positions=8)
    for (bf16_k, bf16_v), (int8_k, int8_v) in zip(held["bf16"], held["int8"], strict=True):
        assert int8_k.shape[-1] == kv_int8.width(kv_cache.HEAD_DIM) and int8_k.dtype == torch.int8
        for bf16, int8 in ((bf16_k, int8_k), (bf16_v, int8_v)):  # within an int8 step of their group's maximum
            assert (kv_int8.dequantize(int8, kv_cache.HEAD_DIM) - bf16.float()).abs().max() < bf16.abs().max() / 100


def test_a_short_run_prints_a_row_a_path(capsys: pytest.CaptureFixture[str]) -> None:
    kv_cache.main(["--paths", "scalar", "--layers", "1", "--rounds", "1", "--cases", "batch 1 at 512"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| scalar |")]
    assert len(rows) == 1 and rows[0].endswith("x |")


def test_the_prefill_comparison_runs_both_caches(capsys: pytest.CaptureFixture[str]) -> None:
    kv_cache.main(["--cases", "--prefill", "40", "--prefill-layers", "1", "--rounds", "2"])
    out = capsys.readouterr().out
    assert "Prefill, 40 tokens in chunks of 128, 1 layers of the 7B shape: bf16 cache" in out and "int8 ÷ bf16" in out
