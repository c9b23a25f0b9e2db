"""Generation of one sequence: chunked prefill, then one token per step until EOS, max_tokens or the context end.

This is the plain loop used by `int8serve generate`, perplexity and the tests. The server's scheduler runs the
same model steps for several sequences at once.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .model import KVCache, Transformer
from .sampling import Sampler
from .sampling_params import SamplingParams

PREFILL_CHUNK = 512  # tokens per prefill forward: bounds the activation memory of a long prompt


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prefill_seconds: float = 0.0
    decode_seconds: float = 0.0
    finish_reason: str = ""  # "stop" (EOS) or "length" (max_tokens or context end)
    token_ids: list[int] = field(default_factory=list)

    @property
    def prefill_tok_s(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else 0.0

    @property
    def decode_tok_s(self) -> float:
        # the first token comes out of the prefill; the decode steps made the rest
        steps = self.generated_tokens - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds else 0.0


def prefill(model: Transformer, prompt_ids: Sequence[int], cache: KVCache, slot: int,
            chunk: int = PREFILL_CHUNK) -> torch.Tensor:
    """Run the prompt through the model in chunks; returns the fp32 logits [V] after its last token."""
    logits = None
    for start in range(0, len(prompt_ids), chunk):
        piece = torch.tensor([list(prompt_ids[start:start + chunk])], dtype=torch.long)
        logits = model(piece, cache, [slot], [start])[0]
    if logits is None:
        raise ValueError("the prompt is empty")
    return logits


def generate(model: Transformer, prompt_ids: Sequence[int], params: SamplingParams, max_tokens: int,
             stop_ids: int | Collection[int], cache: KVCache | None = None,
             stats: GenerationStats | None = None) -> Iterator[int]:
    """Yield generated token ids until one of `stop_ids` (EOS, end of turn: not yielded). Fills `stats` as it goes."""
    stops = frozenset({stop_ids} if isinstance(stop_ids, int) else stop_ids)
    stats = stats if stats is not None else GenerationStats()
    cache = cache or model.new_cache(1, min(model.config.max_seq_len, len(prompt_ids) + max_tokens))
    if len(prompt_ids) >= cache.max_seq_len:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit a context of {cache.max_seq_len}")
    sampler = Sampler(params, model.config.vocab_size, prompt_ids)
    stats.prompt_tokens = len(prompt_ids)
    started = time.perf_counter()
    logits = prefill(model, prompt_ids, cache, slot=0)
    stats.prefill_seconds = time.perf_counter() - started
    position = len(prompt_ids)
    stats.finish_reason = "length"
    decode_started = time.perf_counter()
    while stats.generated_tokens < max_tokens:
        token = sampler.sample(logits)
        if token in stops:
            stats.finish_reason = "stop"
            break
        sampler.observe(token)
        stats.generated_tokens += 1
        stats.token_ids.append(token)
        yield token
        if stats.generated_tokens >= max_tokens or position >= cache.max_seq_len:
            break
        logits = model(torch.tensor([[token]]), cache, [0], [position])[0]
        position += 1
        stats.decode_seconds = time.perf_counter() - decode_started
