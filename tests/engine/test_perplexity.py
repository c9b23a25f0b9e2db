"""int8 quality against the fp32 reference on real text (issue #10's acceptance thresholds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from int8serve.engine import int8, kernels
from int8serve.engine.kernels import matmul as prefill_matmul
from int8serve.engine.perplexity import PerplexityReport, evaluate, windows_of

# Issue #10's targets for the default scheme, int8 against fp32 on stories260K over tinystories.txt (256-token windows)
TARGET_KLD, TARGET_TOP1, TARGET_RATIO = 0.0005, 98.7, 1.001
# What prefill through oneDNN's bf16 matmul (INT8SERVE_PREFILL_MATMUL=dense, or CPUs where our kernels did not build)
# is held to: its KLD is above the issue's target (its outputs rounded to bf16; Zen 4, 2026-12-05, with the head's
# residual: KLD 0.000572, top-1 98.71%, PPL ratio 1.00098). Our bf16 kernel, which keeps its fp32 sums, meets the
# targets since the output head refines its top logits from ~16-bit rows (Int8Linear.set_residual): 0.000473 /
# 98.81% / 1.00057 on that Zen 4, against 0.000537 / 98.70% / 1.00037 before.
BF16_PREFILL_KLD, BF16_PREFILL_TOP1 = 0.0006, 98.6


@pytest.fixture(scope="module")
def corpus_ids(shared_dir: Path, stories_tokenizer) -> list[int]:
    return stories_tokenizer.encode((shared_dir / "corpus" / "tinystories.txt").read_text(encoding="utf-8"))


def drift(stories_int8, stories_fp32, stories_tokenizer, ids: list[int]) -> PerplexityReport:
    report = evaluate(stories_int8.model, ids, 256, stories_tokenizer.bos_id, reference=stories_fp32.model)
    assert report.tokens >= 100_000 - 256
    assert 3.0 < report.reference_perplexity < 10.0  # a trained model, not noise (vocab 512)
    return report


def describe(report: PerplexityReport, how: str) -> str:
    return f"{how}: KLD {report.kld:.6f}, top-1 {report.top1:.2f}%, PPL ratio {report.ratio:.5f}"


def prefill_is_row_exact() -> bool:
    """Whether this CPU's prefill multiplies every row as decode does (our kernel, two int8 passes a row)."""
    return (kernels.available() and int8.kernel_rows() == int8.ALL_ROWS and int8.PRECISE_ACTIVATIONS
            and not prefill_matmul.int8_requested())


@pytest.fixture(scope="module")
def row_exact_reports() -> dict[str, PerplexityReport]:
    """The report of the windows computed as decode computes them, once per module: on CPUs whose prefill already
    does, the prefill test leaves its report here and the decode test reads it (the same computation)."""
    return {}


def test_prefill_matches_fp32_on_tinystories(corpus_ids, stories_fp32, stories_int8, stories_tokenizer,
                                             row_exact_reports) -> None:
    """The prefill path (each 256-token window one forward) as this CPU computes it: decode's two int8 passes a row on
    AVX2, AVX-VNNI and AVX-512 VNNI CPUs without AMX (the issue's targets; 0.000418 / 98.90% on a Zen 4), our bf16
    kernel with its fp32 sums kept on AMX CPUs (the issue's targets too; 0.000473 / 98.81% on a Zen 4 through its
    AVX512-BF16 code with INT8SERVE_PREFILL_MATMUL=bf16), oneDNN's matmul elsewhere (the bounds above)."""
    report = drift(stories_int8, stories_fp32, stories_tokenizer, corpus_ids)
    message = describe(report, int8.describe_dense())
    assert report.ratio <= TARGET_RATIO, message
    if prefill_is_row_exact():
        row_exact_reports["row-exact"] = report
    if prefill_is_row_exact() or (kernels.available() and prefill_matmul.takes(256)):
        assert report.kld <= TARGET_KLD, message
        assert report.top1 >= TARGET_TOP1, message
    else:
        assert report.kld <= BF16_PREFILL_KLD, message
        assert report.top1 >= BF16_PREFILL_TOP1, message


def test_decode_numerics_meet_the_issue_targets(corpus_ids, stories_fp32, stories_int8, stories_tokenizer,
                                                row_exact_reports, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every row through our kernel with two int8 passes, as each decode step computes it, on this CPU's kernel path:
    the default scheme meets the issue's targets on every CPU (0.000418 / 98.90% on a Zen 4)."""
    assert kernels.available(), f"our kernel did not build here: {kernels.unavailable_reason()}"
    monkeypatch.delenv(prefill_matmul.ENV, raising=False)  # (whatever prefill was asked to do)
    monkeypatch.setattr(int8, "KERNEL_ROWS", int8.ALL_ROWS)  # 256-row windows go through the kernel, as decode rows
    assert prefill_is_row_exact(), int8.describe_dense()
    report = row_exact_reports.get("row-exact") or drift(stories_int8, stories_fp32, stories_tokenizer, corpus_ids)
    message = describe(report, f"our kernel's {kernels.path()} path, two int8 passes a row")
    assert report.ratio <= TARGET_RATIO, message
    assert report.kld <= TARGET_KLD, message
    assert report.top1 >= TARGET_TOP1, message


def test_windows() -> None:
    assert windows_of(list(range(10)), 4) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert windows_of([1, 2, 3], 8) == [[1, 2, 3]]
    with pytest.raises(ValueError):
        windows_of([1, 2, 3], 1)
