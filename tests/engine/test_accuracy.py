"""int8 (the default scheme) against fp32 on stories260K through our decode kernel: issue #10's accuracy targets.

Every Int8Linear call is routed through the kernel (the decode path) for whole 256-token windows over
tinystories.txt: the kernel computes each row on its own, so this is what decoding the windows token by token gives
(up to attention's kernels). The kernel path is the one INT8SERVE_KERNEL selects (auto: the CPU's best); to run this
under another path: `INT8SERVE_KERNEL=avx2 pytest tests/engine/test_accuracy.py`. Every path gives the same bits (the
last test checks it), so the figures hold for each. (tests/engine/test_perplexity.py measures the prefill path.)
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from int8serve.engine import int8, kernels
from int8serve.engine.kernels import matmul as prefill_matmul
from int8serve.engine.loader import LoadedModel
from int8serve.engine.perplexity import PerplexityReport, evaluate
from int8serve.engine.tokenizer import Tokenizer

# Issue #10's targets (llama.cpp's Q8_0 on Llama-2-7B measures KLD 0.00037, top-1 98.85%).
TARGET_KLD, TARGET_TOP1, TARGET_RATIO = 0.0005, 98.7, 1.001
# The default scheme (GPTQ calibrated on 2048 tokens of the package's demo_text.txt, a bf16 scale per 32 weights,
# precise activations) measured on a Sapphire Rapids, 2026-12-01: KLD 0.000482, top-1 98.78%, PPL ratio 1.00054.
# Rounding to nearest instead (--quantizer rtn): 0.000636 / 98.51% / 1.00133. GPTQ on 8192 calibration tokens:
# 0.000524 / 98.66% with the bf16 KV cache, 0.000406 / 98.76% with an fp32 one (the KV cache is the next lever).


@pytest.fixture(scope="module")
def kernel_report(shared_dir: Path, stories_fp32: LoadedModel, stories_int8: LoadedModel,
                  stories_tokenizer: Tokenizer) -> Iterator[tuple[PerplexityReport, str]]:
    assert kernels.available(), kernels.unavailable_reason()
    ids = stories_tokenizer.encode((shared_dir / "corpus" / "tinystories.txt").read_text(encoding="utf-8"))
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(int8, "KERNEL_ROWS", 1 << 30)  # every call through the decode kernel
        report = evaluate(stories_int8.model, ids, 256, stories_tokenizer.bos_id, reference=stories_fp32.model)
    yield report, kernels.path()


def describe(report: PerplexityReport, path: str) -> str:
    return (f"kernel path {path}, GPTQ, group size {int8.DEFAULT_GROUP_SIZE}, precise activations "
            f"{int8.PRECISE_ACTIVATIONS}: KLD {report.kld:.6f}, top-1 {report.top1:.2f}%, PPL ratio "
            f"{report.ratio:.5f} over {report.tokens} tokens")


def test_the_default_scheme_is_the_measured_one(stories_int8: LoadedModel) -> None:
    layers = [m for m in stories_int8.model.modules() if isinstance(m, int8.Int8Linear)]
    assert layers and all(m.packed is not None for m in layers)  # the kernel's packed copy, nothing else
    assert {m.group_size for m in layers if m.in_features > int8.DEFAULT_GROUP_SIZE} == {int8.DEFAULT_GROUP_SIZE}


def test_int8_meets_the_issue_targets(kernel_report: tuple[PerplexityReport, str]) -> None:
    report, path = kernel_report
    assert report.tokens >= 100_000 - 256
    message = describe(report, path)
    assert report.kld <= TARGET_KLD, message
    assert report.top1 >= TARGET_TOP1, message
    assert report.ratio <= TARGET_RATIO, message


def test_every_path_gives_the_same_logits(stories_int8: LoadedModel, stories_tokenizer: Tokenizer,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(int8, "KERNEL_ROWS", 1 << 30)
    model = stories_int8.model
    tokens = torch.tensor([stories_tokenizer.encode("Once upon a time, there was a little girl named Lily.", bos=True)])
    cache = model.new_cache(1, 64)
    logits = {}
    for path in kernels.PATHS:
        if kernels.cpu_has(path):
            monkeypatch.setenv(kernels.ENV_PATH, path)
            assert kernels.path() == path
            logits[path] = model(tokens, cache, [0], [0], all_logits=True)
    assert "scalar" in logits and len(logits) >= 2, f"paths run: {list(logits)}"
    for path, value in logits.items():
        assert torch.equal(value, logits["scalar"]), f"path {path} differs from scalar"


def test_one_int8_pass_in_prefill_costs_what_int8_py_says(shared_dir: Path, stories_fp32: LoadedModel,
                                                          stories_int8: LoadedModel, stories_tokenizer: Tokenizer,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """INT8SERVE_PREFILL_MATMUL=int8 (an option: llama.cpp's numerics in prefill) really computes otherwise, and
    costs accuracy in the measured range (int8.py: KLD 0.000956 against 0.000481-0.000635 over the whole corpus)."""
    text = (shared_dir / "corpus" / "tinystories.txt").read_text(encoding="utf-8")
    ids = stories_tokenizer.encode(text)[: 40 * 256]
    monkeypatch.delenv(prefill_matmul.ENV, raising=False)
    default = evaluate(stories_int8.model, ids, 256, stories_tokenizer.bos_id, reference=stories_fp32.model)
    monkeypatch.setenv(prefill_matmul.ENV, "int8")
    one_pass = evaluate(stories_int8.model, ids, 256, stories_tokenizer.bos_id, reference=stories_fp32.model)
    message = f"one int8 pass: KLD {one_pass.kld:.6f}, top-1 {one_pass.top1:.2f}%; default: KLD {default.kld:.6f}"
    assert default.kld < one_pass.kld < 0.0015, message
    assert one_pass.top1 > 97.5, message


def test_an_fp16_kv_cache_is_more_accurate_than_the_bf16_one(kernel_report: tuple[PerplexityReport, str],
                                                              shared_dir: Path, stories_fp32: LoadedModel,
                                                              stories_int8: LoadedModel, stories_tokenizer: Tokenizer,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """--kv-cache fp16 (the same bytes as bf16, 3 more bits of mantissa): the keys' and values' rounding was the
    largest error left (model.KV_CACHES: KLD 0.000308 against 0.000418 over the whole corpus, Zen 4)."""
    bf16, path = kernel_report
    ids = stories_tokenizer.encode((shared_dir / "corpus" / "tinystories.txt").read_text(encoding="utf-8"))
    monkeypatch.setattr(int8, "KERNEL_ROWS", 1 << 30)  # as kernel_report: every call through the decode kernel
    stories_int8.model.set_kv_cache("fp16")
    try:
        fp16 = evaluate(stories_int8.model, ids, 256, stories_tokenizer.bos_id, reference=stories_fp32.model)
    finally:
        stories_int8.model.set_kv_cache("bf16")  # (a fixture of the whole session)
    message = f"fp16 cache: {describe(fp16, path)}; bf16 cache: {describe(bf16, path)}"
    assert fp16.kld < 0.85 * bf16.kld and fp16.kld <= TARGET_KLD, message
    assert fp16.top1 >= bf16.top1 - 0.05 and fp16.ratio <= TARGET_RATIO, message
