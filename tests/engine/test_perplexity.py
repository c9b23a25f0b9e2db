"""int8 quality against the fp32 reference on real text (the issue's acceptance thresholds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from int8serve.engine.perplexity import evaluate, windows_of


def test_int8_matches_fp32_on_tinystories(shared_dir: Path, stories_fp32, stories_int8, stories_tokenizer) -> None:
    text = (shared_dir / "corpus" / "tinystories.txt").read_text(encoding="utf-8")
    ids = stories_tokenizer.encode(text)
    report = evaluate(stories_int8.model, ids, 256, stories_tokenizer.bos_id, reference=stories_fp32.model)
    assert report.tokens >= 100_000 - 256
    assert 3.0 < report.reference_perplexity < 10.0  # a trained model, not noise (vocab 512)
    assert report.ratio <= 1.002
    assert report.kld <= 0.001
    assert report.top1 >= 98.0


def test_windows() -> None:
    assert windows_of(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert windows_of([1, 2, 3], 8) == [[1, 2, 3]]
    with pytest.raises(ValueError):
        windows_of([1, 2, 3], 1)
