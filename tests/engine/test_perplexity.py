"""int8 quality against the fp32 reference on real text (the issue's acceptance thresholds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from int8serve.engine import int8
from int8serve.engine.perplexity import evaluate, windows_of


def test_int8_matches_fp32_on_tinystories(shared_dir: Path, stories_fp32, stories_int8, stories_tokenizer) -> None:
    """The prefill path (256-token windows, each one forward) on whatever CPU runs it: our bf16 kernel with its fp32
    sums kept where the CPU has AVX512-BF16 or AMX (measured on a Zen 4, 2026-12-04: KLD 0.000537, top-1 98.70%, PPL
    ratio 1.00037; 0.000635 / 98.58% / 1.00078 when its sums were rounded to bf16), decode's two int8 passes on AVX2
    (0.000481 / 98.75%), fp32 elsewhere. A prefill that rounds its outputs to bf16 again fails the KLD bound."""
    text = (shared_dir / "corpus" / "tinystories.txt").read_text(encoding="utf-8")
    ids = stories_tokenizer.encode(text)
    report = evaluate(stories_int8.model, ids, 256, stories_tokenizer.bos_id, reference=stories_fp32.model)
    message = f"{int8.describe_dense()}: KLD {report.kld:.6f}, top-1 {report.top1:.2f}%, PPL ratio {report.ratio:.5f}"
    assert report.tokens >= 100_000 - 256
    assert 3.0 < report.reference_perplexity < 10.0  # a trained model, not noise (vocab 512)
    assert report.ratio <= 1.001, message
    assert report.kld <= 0.0006, message
    assert report.top1 >= 98.6, message


def test_windows() -> None:
    assert windows_of(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert windows_of([1, 2, 3], 8) == [[1, 2, 3]]
    with pytest.raises(ValueError):
        windows_of([1, 2, 3], 1)
