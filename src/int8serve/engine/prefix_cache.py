"""The prefix cache: keys and values of prompt prefixes kept across requests, copied into a slot instead of computed.

Every `/ai/run` prompt starts with the same default system prompt and chat clients resend the whole conversation
each turn, so most of a prompt was prefilled a moment ago. Prompts are cut into blocks of `block_tokens` tokens; a
block is known by a hash chained over every token before it and its own (vLLM's automatic prefix caching), so two
prompts share exactly the blocks of their common prefix. After each prefill chunk the engine stores the new full
blocks of the sequence (`store`), so a request can reuse a prefix that another running sequence is still
prefilling; before prefilling it copies the longest cached chain into its slot (`lookup`, `load`) and prefills only
the rest.

Only prefill computes what is stored: generated tokens are computed by the decode path, whose numbers differ from
prefill's, so a reply is reusable only once a later prompt has prefilled it. That, with prefill chunks that end at
the same absolute positions whatever was reused (`scheduler.py`), makes the cache exact: a request's logits are the
same bits with or without it.

Memory is bounded by `capacity_tokens` (reserved once; pages are touched as blocks are written). The least recently
used block goes first; a chain is touched from its last block to its first, so a block's descendants always go
before it and nothing unreachable stays behind.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .model import KVCache

__all__ = ["DEFAULT_BLOCK_TOKENS", "PrefixCache", "PrefixHit", "PrefixStats"]

DEFAULT_BLOCK_TOKENS = 16


@dataclass(frozen=True)
class PrefixHit:
    """The cached blocks that begin a prompt: `tokens` = len(blocks) × block size."""

    blocks: tuple[int, ...] = ()
    tokens: int = 0


@dataclass
class PrefixStats:
    hits: int = 0  # lookups that reused at least one block
    lookups: int = 0
    reused_tokens: int = 0
    stored_blocks: int = 0
    evicted_blocks: int = 0


class PrefixCache:
    """Keys and values of cached prefix blocks, for every layer: k[layer], v[layer] [blocks, n_kv_heads, B, D]."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, capacity_tokens: int,
                 block_tokens: int = DEFAULT_BLOCK_TOKENS) -> None:
        if block_tokens < 1 or capacity_tokens < block_tokens:
            raise ValueError(f"the prefix cache needs room for one block of {block_tokens} tokens at least")
        self.block_tokens = block_tokens
        self.capacity_blocks = capacity_tokens // block_tokens
        shape = (self.capacity_blocks, config.n_kv_heads, block_tokens, config.head_dim)
        self.k = [torch.empty(shape, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.empty(shape, dtype=dtype) for _ in range(config.n_layers)]
        self._block_of: dict[bytes, int] = {}  # chain hash -> block id
        self._hash_of: dict[int, bytes] = {}
        self._recent: OrderedDict[int, None] = OrderedDict()  # block ids, least recently used first
        self._free = list(range(self.capacity_blocks - 1, -1, -1))
        self.stats = PrefixStats()

    @property
    def capacity_tokens(self) -> int:
        return self.capacity_blocks * self.block_tokens

    @property
    def cached_tokens(self) -> int:
        return len(self._hash_of) * self.block_tokens

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def clear(self) -> None:
        """Forget every block (the engine's thread must not be using the cache meanwhile)."""
        self._block_of.clear()
        self._hash_of.clear()
        self._recent.clear()
        self._free = list(range(self.capacity_blocks - 1, -1, -1))

    def lookup(self, tokens: Sequence[int], limit: int) -> PrefixHit:
        """The longest cached chain of full blocks that begins `tokens`, covering at most `limit` tokens."""
        blocks = []
        for key in self._chain(tokens, limit // self.block_tokens):
            block = self._block_of.get(key)
            if block is None:
                break
            blocks.append(block)
        self._touch(blocks)
        self.stats.lookups += 1
        if blocks:
            self.stats.hits += 1
            self.stats.reused_tokens += len(blocks) * self.block_tokens
        return PrefixHit(tuple(blocks), len(blocks) * self.block_tokens)

    def load(self, hit: PrefixHit, cache: KVCache, slot: int) -> None:
        """Copy the blocks of `hit` into positions [0, hit.tokens) of `slot`."""
        b = self.block_tokens
        for layer in range(len(self.k)):
            for i, block in enumerate(hit.blocks):
                cache.k[layer][slot, :, i * b:(i + 1) * b] = self.k[layer][block]
                cache.v[layer][slot, :, i * b:(i + 1) * b] = self.v[layer][block]

    def store(self, tokens: Sequence[int], cache: KVCache, slot: int, computed: int) -> None:
        """Keep the full blocks of tokens[:computed] (prefilled in `slot`) that are not cached yet."""
        stored = []
        for i, key in enumerate(self._chain(tokens, computed // self.block_tokens)):
            block = self._block_of.get(key)
            if block is None:
                block = self._allocate(protect=stored)
                if block is None:
                    break
                self._copy_in(block, cache, slot, i)
                self._block_of[key], self._hash_of[block] = block, key
                self.stats.stored_blocks += 1
            stored.append(block)
        self._touch(stored)

    # ---- internals ----

    def _chain(self, tokens: Sequence[int], n_blocks: int) -> list[bytes]:
        """The chained hash of each of the first `n_blocks` full blocks of `tokens`."""
        b, keys, previous = self.block_tokens, [], b""
        for i in range(min(n_blocks, len(tokens) // b)):
            block = array("q", tokens[i * b:(i + 1) * b]).tobytes()
            previous = hashlib.blake2b(previous + block, digest_size=16).digest()
            keys.append(previous)
        return keys

    def _touch(self, blocks: Sequence[int]) -> None:
        for block in reversed(blocks):  # the first block ends most recent: descendants are evicted first
            self._recent[block] = None
            self._recent.move_to_end(block)

    def _allocate(self, protect: Sequence[int]) -> int | None:
        if self._free:
            return self._free.pop()
        for block in self._recent:  # least recently used first, never a block of the chain being stored
            if block not in protect:
                del self._recent[block]
                del self._block_of[self._hash_of.pop(block)]
                self.stats.evicted_blocks += 1
                return block
        return None

    def _copy_in(self, block: int, cache: KVCache, slot: int, index: int) -> None:
        b = self.block_tokens
        for layer in range(len(self.k)):
            self.k[layer][block] = cache.k[layer][slot, :, index * b:(index + 1) * b]
            self.v[layer][block] = cache.v[layer][slot, :, index * b:(index + 1) * b]
