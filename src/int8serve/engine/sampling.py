"""Choosing the next token from logits: penalties, temperature, top-k, top-p, seeded sampling.

Each sequence owns a `Sampler` with its own `torch.Generator`, so a seeded request draws the same random numbers
whatever else runs beside it. Semantics follow the peers users compare against:
- `repetition_penalty` is multiplicative over prompt and generated tokens (Hugging Face / TGI / vLLM);
- `frequency_penalty` and `presence_penalty` are additive over generated tokens (OpenAI / vLLM);
- `temperature == 0` means greedy; `top_k` and `top_p` filter after temperature;
- `stop` strings end the text (applied by the scheduler to the decoded text, `stops.py`).

Every value the API admits must sample: a temperature or a repetition penalty of 1e-320 is in range, and dividing
by it overflows logits to infinity (softmax of inf - inf is NaN, and `torch.multinomial` raises). So the order of
the logits is kept and infinities are avoided: a penalty's overflow saturates at the largest float, and a
temperature that overflows the scaled logits scales their distance to the largest one instead (the largest, and its
ties, at 0): the same distribution wherever the first form is finite, which is used then, so that seeded draws keep
their bits.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable

import torch
from torch import Tensor

from .sampling_params import SamplingParams


class Sampler:
    """Samples the tokens of one sequence; remembers what it has seen for the penalties."""

    def __init__(self, params: SamplingParams, vocab_size: int, prompt_ids: Iterable[int] = ()) -> None:
        self.params = params
        self.seed = params.seed if params.seed is not None else secrets.randbits(63)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.output_counts = torch.zeros(vocab_size, dtype=torch.float32)
        self.seen = torch.zeros(vocab_size, dtype=torch.bool)
        ids = torch.tensor(list(prompt_ids), dtype=torch.long)
        if ids.numel():
            self.seen[ids.clamp(0, vocab_size - 1)] = True

    def observe(self, token_id: int) -> None:
        """Record a generated token (for the penalties)."""
        self.output_counts[token_id] += 1
        self.seen[token_id] = True

    def sample(self, logits: Tensor) -> int:
        """logits [V] (fp32) -> the next token id. Does not record it: call observe()."""
        logits = self._penalize(logits.float().clone())
        if self.params.greedy:
            return int(torch.argmax(logits))
        probs = torch.softmax(self._filter(self._scaled(logits)), dim=-1)
        return int(torch.multinomial(probs, 1, generator=self.generator))

    def _scaled(self, logits: Tensor) -> Tensor:
        """logits / temperature, finite where the logits are (see the module's docstring)."""
        scaled = logits / self.params.temperature
        if not bool(torch.isfinite(scaled).all()) and bool(torch.isfinite(logits).all()):
            distance = logits - logits.max()  # 1e-320 is 0 as a float32: 0 / 0 must not be NaN
            scaled = torch.where(distance == 0, 0.0, distance / self.params.temperature)
        return scaled

    def _penalize(self, logits: Tensor) -> Tensor:
        p = self.params
        if p.repetition_penalty != 1.0:
            seen = logits[self.seen]
            penalized = torch.where(seen < 0, seen * p.repetition_penalty, seen / p.repetition_penalty)
            finite = torch.finfo(logits.dtype).max
            logits[self.seen] = penalized.clamp(-finite, finite)  # a tiny penalty overflows: saturate, keep order
        if p.frequency_penalty or p.presence_penalty:
            logits -= p.frequency_penalty * self.output_counts
            logits -= p.presence_penalty * (self.output_counts > 0).float()
        return logits

    def _filter(self, logits: Tensor) -> Tensor:
        p = self.params
        if p.top_k and p.top_k < logits.numel():
            kth = torch.topk(logits, p.top_k).values[-1]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, descending=True)
            cumulative = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
            # drop a token when the ones before it already reach top_p; the most likely token always stays
            drop_sorted = (cumulative - torch.softmax(sorted_logits, dim=-1)) >= p.top_p
            drop_sorted[0] = False
            logits = logits.masked_fill(torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted), float("-inf"))
        return logits
