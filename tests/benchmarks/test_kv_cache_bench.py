"""benchmarks/kv_cache.py: every cache holds the same values, and a short run prints its table."""

from __future__ import annotations

import pytest
import torch

from benchmarks import kv_cache
from int8serve.engine import kv_int8


def test_every_cache_holds_the_same_keys_and_values() -> None:
    held = kv_cache.caches(layers=2, slots=1, positions=8)
    assert set(held) == {"bf16", "fp16", "int8"}
    for (bf16_k, bf16_v), (fp16_k, fp16_v), (int8_k, int8_v) in zip(held["bf16"], held["fp16"], held["int8"],
                                                                     strict=True):
        assert int8_k.shape[-1] == kv_int8.width(kv_cache.HEAD_DIM) and int8_k.dtype == torch.int8
        assert fp16_k.dtype == torch.float16 and fp16_k.shape == bf16_k.shape
        for bf16, fp16, int8 in ((bf16_k, fp16_k, int8_k), (bf16_v, fp16_v, int8_v)):
            # within an int8 step of their group's maximum, and within bf16's rounding of each value
            assert (kv_int8.dequantize(int8, kv_cache.HEAD_DIM) - bf16.float()).abs().max() < bf16.abs().max() / 100
            assert ((fp16.float() - bf16.float()).abs() <= fp16.float().abs() / 128).all()


def test_only_the_caches_asked_for_are_made() -> None:
    assert set(kv_cache.caches(layers=1, slots=1, positions=4, kinds=["bf16", "fp16"])) == {"bf16", "fp16"}


def test_a_short_run_prints_a_row_a_path_with_a_ratio_a_cache(capsys: pytest.CaptureFixture[str]) -> None:
    kv_cache.main(["--paths", "scalar", "--layers", "1", "--rounds", "1", "--cases", "batch 1 at 512"])
    lines = capsys.readouterr().out.splitlines()
    assert "| path | rows | bf16 cache, ms | fp16 cache, ms | int8 cache, ms | bf16 ÷ fp16 | bf16 ÷ int8 |" in lines
    rows = [line for line in lines if line.startswith("| scalar |")]
    assert len(rows) == 1 and rows[0].count("x |") == 2


def test_bf16_is_always_the_reference(capsys: pytest.CaptureFixture[str]) -> None:
    kv_cache.main(["--kinds", "fp16", "--paths", "scalar", "--layers", "1", "--rounds", "1", "--cases",
                   "batch 1 at 512"])
    lines = capsys.readouterr().out.splitlines()
    assert "| path | rows | bf16 cache, ms | fp16 cache, ms | bf16 ÷ fp16 |" in lines


def test_the_prefill_comparison_runs_every_cache(capsys: pytest.CaptureFixture[str]) -> None:
    kv_cache.main(["--cases", "--prefill", "40", "--prefill-layers", "1", "--rounds", "2"])
    out = capsys.readouterr().out
    assert "Prefill, 40 tokens in chunks of 128, 1 layers of the 7B shape, " in out
    assert all(f"{kind} cache " in out for kind in ("bf16", "fp16", "int8"))
    assert "bf16 ÷ fp16 " in out and "bf16 ÷ int8 " in out
