"""Generation of one sequence: chunked prefill, then one token per step until EOS, max_tokens or the context end.

This is the plain loop used by `int8serve generate` and the tests. The server's scheduler runs the same model steps
for several sequences at once, and `generate` prefills a prompt as the scheduler does when it is alone in the engine
(`served_prefill`): the same seed gives the server's tokens. Which kernel an int8 layer takes, and what attention
sees, depend on how a prompt is cut into chunks (chunking.py): a prefill in other chunks gives other bits, which a
seeded sample can show (stories260K on a Sapphire Rapids: seeds 2, 3 and 6 of 1-6 gave other text in 256 tokens).
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from .chunking import aligned_chunk
from .model import KVCache, Transformer
from .sampling import Sampler
from .sampling_params import SamplingParams
from .scheduler import DEFAULT_PREFILL_CHUNK, row_exact_prefill, solo_prefill_chunks

PREFILL_CHUNK = 512  # tokens per forward of the plain `prefill`: bounds the activation memory of a long prompt
SLOTS = 4  # the slots `serve` gives a plain --model (its card's max_concurrent_requests), as Engine's default


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
    """Run the prompt through the model in plain forwards of `chunk` tokens, each computed as the tokens it holds
    (the benchmarks time one such forward); returns the fp32 logits [V] after its last token. Not the server's
    numbers: `served_prefill` gives those."""
    logits = None
    for start in range(0, len(prompt_ids), chunk):
        piece = torch.tensor([list(prompt_ids[start:start + chunk])], dtype=torch.long)
        logits = model(piece, cache, [slot], [start])[0]
    if logits is None:
        raise ValueError("the prompt is empty")
    return logits


def served_prefill(model: Transformer, prompt_ids: Sequence[int], cache: KVCache, slot: int,
                   prefill_chunk: int = DEFAULT_PREFILL_CHUNK, max_slots: int = SLOTS) -> torch.Tensor:
    """Prefill the prompt as an engine of `max_slots` slots and `prefill_chunk` tokens a chunk does for a prompt alone
    in it (scheduler.Engine._prefill_chunk): in aligned chunks, row-exact where it would be, several a forward where
    it would take them; returns the fp32 logits [V] after its last token. Attention sees keys up to the end of each
    aligned chunk, at most `cache.max_seq_len`: a cache holding the prompt's last aligned chunk (or the server's
    whole context) gives the server's bits."""
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    row_exact = row_exact_prefill(model, prefill_chunk, max_slots)
    chunks = solo_prefill_chunks(model, prefill_chunk)
    done = 0
    while True:
        end, how = aligned_chunk(done, len(prompt_ids), prefill_chunk, cache.max_seq_len, row_exact=row_exact,
                                 chunks=chunks)
        piece = torch.tensor([list(prompt_ids[done:end])], dtype=torch.long)
        logits = model(piece, cache, [slot], [done], prefill=how)[0]
        if end == len(prompt_ids):
            return logits
        done = end


def generate(model: Transformer, prompt_ids: Sequence[int], params: SamplingParams, max_tokens: int,
             stop_ids: int | Collection[int], cache: KVCache | None = None,
             stats: GenerationStats | None = None, prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
             max_slots: int = SLOTS) -> Iterator[int]:
    """Yield generated token ids until one of `stop_ids` (EOS, end of turn: not yielded). Fills `stats` as it goes.

    The prompt is prefilled as an engine of `max_slots` slots and `prefill_chunk` tokens a chunk would (`serve`'s
    --prefill-chunk and its card's max_concurrent_requests): `served_prefill`."""
    stops = frozenset({stop_ids} if isinstance(stop_ids, int) else stop_ids)
    stats = stats if stats is not None else GenerationStats()
    aligned_end = -(-len(prompt_ids) // prefill_chunk) * prefill_chunk  # the keys its last chunk attends to
    cache = cache or model.new_cache(1, min(model.config.max_seq_len, max(len(prompt_ids) + max_tokens, aligned_end)))
    if len(prompt_ids) >= cache.max_seq_len:
        raise ValueError(f"prompt of {len(prompt_ids)} tokens does not fit a context of {cache.max_seq_len}")
    sampler = Sampler(params, model.config.vocab_size, prompt_ids)
    stats.prompt_tokens = len(prompt_ids)
    started = time.perf_counter()
    logits = served_prefill(model, prompt_ids, cache, 0, prefill_chunk, max_slots)
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
