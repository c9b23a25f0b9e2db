"""The prefix cache's store: blocks keyed by their whole prefix, copied in and out of slots, bounded, least recently
used first (its use by the scheduler, and exactness, are in test_scheduler.py)."""

from __future__ import annotations

import pytest
import torch

from int8serve.engine.config import ModelConfig
from int8serve.engine.model import KVCache
from int8serve.engine.prefix_cache import PrefixCache

CONFIG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=64, max_seq_len=128)
B = 4  # tokens per block


def filled_cache(slots: int = 2) -> KVCache:
    cache = KVCache(CONFIG, slots, 64, torch.float16)
    for layer in range(CONFIG.n_layers):
        cache.k[layer].copy_(torch.randn_like(cache.k[layer], dtype=torch.float32).half())
        cache.v[layer].copy_(torch.randn_like(cache.v[layer], dtype=torch.float32).half())
    return cache


def test_a_shared_prefix_is_found_block_by_block_and_copied_exactly() -> None:
    prefix = PrefixCache(CONFIG, torch.float16, capacity_tokens=64, block_tokens=B)
    cache = filled_cache()
    prompt = list(range(1, 15))  # 3 full blocks and 2 tokens
    prefix.store(prompt, cache, slot=0, computed=len(prompt))
    assert prefix.cached_tokens == 12 and prefix.stats.stored_blocks == 3
    other = [*prompt[:9], 60, 61, 62, 63]  # shares 2 full blocks (8 tokens) and one more token
    hit = prefix.lookup(other, limit=len(other) - 1)
    assert hit.tokens == 8 and len(hit.blocks) == 2
    prefix.load(hit, cache, slot=1)
    for layer in range(CONFIG.n_layers):
        assert torch.equal(cache.k[layer][1, :, :8], cache.k[layer][0, :, :8])
        assert torch.equal(cache.v[layer][1, :, :8], cache.v[layer][0, :, :8])
    assert prefix.lookup([2, *prompt[1:]], limit=20).tokens == 0  # a different first token: nothing in common
    assert prefix.lookup(prompt, limit=11).tokens == 8  # at most `limit` tokens: the last one is always computed


def test_blocks_are_stored_once_and_only_when_full() -> None:
    prefix = PrefixCache(CONFIG, torch.float16, capacity_tokens=64, block_tokens=B)
    cache = filled_cache()
    prefix.store(list(range(1, 20)), cache, slot=0, computed=6)  # a prefill chunk so far: 1 full block
    assert prefix.cached_tokens == 4
    prefix.store(list(range(1, 20)), cache, slot=0, computed=19)  # the rest of the prompt
    prefix.store(list(range(1, 20)), cache, slot=1, computed=19)  # another sequence, same prompt: nothing new
    assert prefix.cached_tokens == 16 and prefix.stats.stored_blocks == 4


def test_least_recently_used_chains_go_first_descendants_before_ancestors() -> None:
    prefix = PrefixCache(CONFIG, torch.float16, capacity_tokens=4 * B, block_tokens=B)
    cache = filled_cache()
    a = [1] * B + [2] * B + [3] * B  # 3 blocks
    b = [9] * B  # 1 block
    prefix.store(a, cache, 0, len(a))
    prefix.store(b, cache, 1, len(b))
    assert prefix.cached_tokens == 4 * B
    prefix.lookup(b, limit=B)  # b is the most recent
    c = [7] * (2 * B)
    prefix.store(c, cache, 1, len(c))  # needs 2 blocks: a's last two go (its descendants), not its first
    assert prefix.stats.evicted_blocks == 2
    assert prefix.lookup(a, limit=len(a)).tokens == B
    assert prefix.lookup(b, limit=B).tokens == B and prefix.lookup(c, limit=len(c)).tokens == 2 * B


def test_capacity_below_one_block_is_refused() -> None:
    with pytest.raises(ValueError):
        PrefixCache(CONFIG, torch.float16, capacity_tokens=3, block_tokens=B)
