"""int8 (the default scheme) against fp32 on SmolLM2-135M-Instruct, a real trained model: issue #15's quality goal.

The fp32 reference is the Q4_1 GGUF dequantized; the int8 model is what the server runs (a bf16 scale per 32
weights, precise activations) with every Int8Linear call routed through the decode kernel, as
tests/engine/test_accuracy.py does for stories260K: the figures are what decoding the windows token by token gives.
The corpus is two 256-token windows of sotu.txt and two of tinystories.txt, without BOS (SmolLM2 has none): small
enough for the suite, so the top-1 figure moves in steps of 0.1%. `python -m benchmarks.accuracy --model smollm2`
measures every scheme on more windows (docs/benchmarks.md).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from benchmarks.accuracy import RememberedReference, smollm2_ids

from int8serve.engine import int8, kernels
from int8serve.engine.loader import LoadedModel
from int8serve.engine.perplexity import PerplexityReport, evaluate
from int8serve.engine.tokenizer import AnyTokenizer

WINDOWS = 2  # of each text
# Issue #15's goal: better than weight-only int8 per 32 inputs simulated in fp32 (KLD 0.0012, top-1 98.0%).
GOAL_KLD, GOAL_TOP1 = 0.0013, 97.9
# What the default scheme measures on these windows, with a little margin: a regression guard (every kernel path gives
# the same bits). On a Sapphire Rapids (2 vCPU), 2026-12-01: KLD 0.001163, top-1 96.96%, PPL ratio 1.00156 over 1020
# tokens. On 4 + 4 windows (2040 tokens): KLD 0.001255, top-1 97.55%, PPL ratio 1.00199 (prefill's dense path:
# 0.001509 / 97.40%). The KLD is at the goal, top-1 is not.
MEASURED_KLD, MEASURED_TOP1, MEASURED_RATIO = 0.0013, 96.5, 1.0025


@pytest.fixture(scope="module")
def report(shared_dir: Path, smollm2_fp32: LoadedModel, smollm2_int8: LoadedModel,
           smollm2_tokenizer: AnyTokenizer) -> Iterator[PerplexityReport]:
    assert kernels.available(), kernels.unavailable_reason()
    ids = smollm2_ids(smollm2_tokenizer, WINDOWS, shared=shared_dir)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(int8, "KERNEL_ROWS", 1 << 30)  # every call through the decode kernel
        yield evaluate(smollm2_int8.model, ids, 256, None, reference=RememberedReference(smollm2_fp32.model))


def describe(report: PerplexityReport) -> str:
    return (f"SmolLM2, kernel path {kernels.path()}, group size {int8.DEFAULT_GROUP_SIZE}, precise activations "
            f"{int8.PRECISE_ACTIVATIONS}: KLD {report.kld:.6f}, top-1 {report.top1:.2f}%, PPL ratio "
            f"{report.ratio:.5f} over {report.tokens} tokens")


def test_the_default_scheme_holds_its_measured_accuracy(report: PerplexityReport) -> None:
    print(describe(report))  # the figures, with `pytest -s`
    assert report.tokens == 4 * 255  # no BOS: each window's first token is context
    assert report.kld <= MEASURED_KLD, describe(report)
    assert report.top1 >= MEASURED_TOP1, describe(report)
    assert report.ratio <= MEASURED_RATIO, describe(report)


@pytest.mark.xfail(strict=True, reason="issue #15's goal is not reached by the default int8 scheme on SmolLM2 "
                   "(measured KLD 0.001163, top-1 96.96% here; 0.001255 / 97.55% on 2040 tokens): top-1 is below "
                   "97.9%; an XPASS means it is reached: make this a plain test")
def test_the_default_scheme_meets_the_issue_goal(report: PerplexityReport) -> None:
    assert report.kld <= GOAL_KLD, describe(report)
    assert report.top1 >= GOAL_TOP1, describe(report)
