"""Perplexity over a text, and how far int8 drifts from the fp32 reference on the same windows.

The text is cut into non-overlapping windows of `window` tokens, each fed after a BOS; a model trained without
one (SmolLM2: `add_bos_token` false) gets none, and each window's first token is then context, not predicted.
With a reference model the report adds llama.cpp's `--kl-divergence` figures: the PPL ratio, the mean KL
divergence KL(ref || model) per token, and the top-1 agreement (how often both models' most likely next token is
the same).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm import tqdm

from .model import Transformer


@dataclass
class PerplexityReport:
    tokens: int
    windows: int
    perplexity: float
    reference_perplexity: float | None = None
    kld: float | None = None  # mean KL(reference || model) in nats per token
    top1: float | None = None  # agreement in percent

    @property
    def ratio(self) -> float | None:
        if self.reference_perplexity is None:
            return None
        return self.perplexity / self.reference_perplexity

    def lines(self, label: str = "model", reference_label: str = "fp32") -> list[str]:
        out = [f"{label}: PPL {self.perplexity:.4f} over {self.tokens} tokens in {self.windows} windows"]
        if self.reference_perplexity is not None:
            out.append(f"{reference_label}: PPL {self.reference_perplexity:.4f}")
            out.append(f"PPL ratio {self.ratio:.5f}  KLD {self.kld:.6f}  top-1 {self.top1:.2f}%")
        return out


def windows_of(ids: Sequence[int], window: int) -> list[list[int]]:
    """Non-overlapping windows of `window` target tokens; a shorter tail is dropped (if there is a full one)."""
    if window < 2:
        raise ValueError("window must be at least 2 tokens")
    full = [list(ids[i:i + window]) for i in range(0, len(ids) - window + 1, window)]
    return full or ([list(ids)] if len(ids) >= 2 else [])


def evaluate(model: Transformer, ids: Sequence[int], window: int, bos_id: int | None,
             reference: Transformer | None = None, progress: bool = False) -> PerplexityReport:
    chunks = windows_of(ids, window)
    if not chunks:
        raise ValueError("the text is too short: it needs at least 2 tokens")
    cache = model.new_cache(1, min(window, model.config.max_seq_len))
    ref_cache = reference.new_cache(1, min(window, reference.config.max_seq_len)) if reference else None
    nll = ref_nll = kld = 0.0
    agree = count = 0
    for chunk in tqdm(chunks, desc="perplexity", unit="window", disable=not progress, leave=False):
        # predict chunk[i] from BOS + chunk[:i] (without a BOS: chunk[i] from chunk[:i], i >= 1)
        inputs = torch.tensor([[bos_id, *chunk[:-1]]] if bos_id is not None else [chunk[:-1]])
        targets = torch.tensor(chunk if bos_id is not None else chunk[1:])
        logp = model(inputs, cache, [0], [0], all_logits=True)[0].log_softmax(-1)  # [T, V]
        nll -= logp.gather(1, targets[:, None]).sum().item()
        count += len(targets)
        if reference is not None:
            ref_logp = reference(inputs, ref_cache, [0], [0], all_logits=True)[0].log_softmax(-1)
            ref_nll -= ref_logp.gather(1, targets[:, None]).sum().item()
            kld += (ref_logp.exp() * (ref_logp - logp)).sum().item()
            agree += int((ref_logp.argmax(-1) == logp.argmax(-1)).sum())
    report = PerplexityReport(tokens=count, windows=len(chunks), perplexity=math.exp(nll / count))
    if reference is not None:
        report.reference_perplexity = math.exp(ref_nll / count)
        report.kld = kld / count
        report.top1 = 100.0 * agree / count
    return report
