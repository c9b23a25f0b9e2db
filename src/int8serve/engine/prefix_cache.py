"""The prefix cache: keys and values of prompt prefixes kept across requests, copied into a slot instead of computed.

Every `/ai/run` prompt starts with the same default system prompt and chat clients resend the whole conversation
each turn, so most of a prompt was prefilled a moment ago. Prompts are cut into blocks of `block_tokens` tokens; a
block is known by a hash chained over every token before it and its own (vLLM's automatic prefix caching), so two
prompts share exactly the blocks of their common prefix. Where they part inside a block, the cached block's first
positions still serve (each position depends only on the tokens up to it): a lookup ends with the longest partial
match among the blocks that continue its chain, so a prompt reuses its common prefix to the token, as a radix tree
would (SGLang) — the whole system prompt, not only its full blocks. After each prefill chunk the engine stores the
new full blocks of the sequence, and the last, partial one once the prompt is done (`store`), so a request can reuse
a prefix that another running sequence is still prefilling; before prefilling it copies what matches into its slot
(`lookup`, `load`) and prefills only the rest.

What is stored must be what prefill would compute. Prompts are; with prefill chunks that end at the same absolute
positions whatever was reused (`scheduler.py`), that makes the cache exact: a request's logits are the same bits
with or without it. Generated tokens are stored too (by the engine, when a sequence finishes) only where prefill is
row-exact (`chunking.py`: every row computed as its decode step would be, so decode writes prefill's keys and
values); elsewhere decode's numbers differ from prefill's, and a reply is reusable only once a later prompt has
prefilled it. A reply comes back in the next chat turn as text, re-tokenized by the chat template: it is reused up
to the first token whose id differs (token-granular longest common prefix).

Accounts are isolated: a block is reusable only by the owners (accounts) that computed it themselves, or by every
owner when it is public (the card's default system prompt, which the engine warms at start: public text). Otherwise
a request's cached-token count, or its speed, would tell an account which prompt another account had sent. Two
owners that computed the same block share its one copy.

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

from . import kv_int8
from .config import ModelConfig
from .model import KVCache

__all__ = ["DEFAULT_BLOCK_TOKENS", "PUBLIC", "PrefixCache", "PrefixHit", "PrefixStats"]

DEFAULT_BLOCK_TOKENS = 16
PUBLIC = None  # the owner of blocks every owner may reuse


@dataclass(frozen=True)
class PrefixHit:
    """The cached blocks that begin a prompt: all of each block but the last, `tail` positions of the last."""

    blocks: tuple[int, ...] = ()
    tail: int = 0
    tokens: int = 0


@dataclass
class PrefixStats:
    hits: int = 0  # lookups that reused at least one token beyond what the slot held
    reused_tokens: int = 0
    stored_blocks: int = 0
    evicted_blocks: int = 0


@dataclass(frozen=True)
class _Block:
    parent: bytes  # the chain hash of everything before it (b"" for a first block)
    key: bytes  # its own chain hash
    tokens: tuple[int, ...]  # block_tokens of them, or fewer for the end of a prompt


class PrefixCache:
    """Keys and values of cached prefix blocks, for every layer: k[layer], v[layer] [blocks, n_kv_heads, B, D] (an
    int8 cache's rows of values and scales in place of D: kv_int8.py), copied row for row to and from a KVCache."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, capacity_tokens: int,
                 block_tokens: int = DEFAULT_BLOCK_TOKENS) -> None:
        if block_tokens < 1 or capacity_tokens < block_tokens:
            raise ValueError(f"the prefix cache needs room for one block of {block_tokens} tokens at least")
        self.block_tokens = block_tokens
        self.capacity_blocks = capacity_tokens // block_tokens
        row = kv_int8.row_size(config.head_dim, dtype)
        shape = (self.capacity_blocks, config.n_kv_heads, block_tokens, row)
        self.k = [torch.empty(shape, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.empty(shape, dtype=dtype) for _ in range(config.n_layers)]
        self.stats = PrefixStats()
        self.clear()

    @property
    def capacity_tokens(self) -> int:
        return self.capacity_blocks * self.block_tokens

    @property
    def cached_tokens(self) -> int:
        return sum(len(b.tokens) for b in self._blocks.values())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def clear(self) -> None:
        """Forget every block (the engine's thread must not be using the cache meanwhile)."""
        self._blocks: dict[int, _Block] = {}  # block id -> what it holds
        self._by_key: dict[bytes, int] = {}
        self._children: dict[bytes, set[int]] = {}  # chain hash -> the blocks that continue it
        self._readers: dict[int, set[str] | None] = {}  # block id -> the owners that may reuse it (None: all)
        self._recent: OrderedDict[int, None] = OrderedDict()  # block ids, least recently used first
        self._free = list(range(self.capacity_blocks - 1, -1, -1))

    def lookup(self, tokens: Sequence[int], limit: int, held: int = 0, owner: str = "", count: bool = True
               ) -> PrefixHit:
        """The longest prefix of `tokens` cached for `owner`, of at most `limit` tokens: whole blocks, then part of
        one.

        `held`: how many of them the caller already has (a prompt looked up again before each prefill chunk); only
        tokens beyond those count as reused in `stats`. `count=False`: a look that is no request's (the engine's
        warm-up checking what it cached), left out of `stats`."""
        blocks, parent, b = [], b"", self.block_tokens
        for key in self._chain(tokens, limit // b):
            block = self._by_key.get(key)
            if block is None or not self._readable(block, owner):
                break
            blocks.append(block)
            parent = key
        start = len(blocks) * b
        tail, partial = self._best_continuation(parent, tokens[start:min(start + b, limit)], owner)
        if partial is not None:
            blocks.append(partial)
        hit = PrefixHit(tuple(blocks), tail if partial is not None else b, start + tail)
        self._touch(blocks)
        if not count:
            return hit
        if hit.tokens > held:
            self.stats.hits += 1
            self.stats.reused_tokens += hit.tokens - held
        return hit

    def load(self, hit: PrefixHit, cache: KVCache, slot: int) -> None:
        """Copy the blocks of `hit` into positions [0, hit.tokens) of `slot`."""
        b = self.block_tokens
        for layer in range(len(self.k)):
            for i, block in enumerate(hit.blocks):
                n = hit.tail if i == len(hit.blocks) - 1 else b
                cache.k[layer][slot, :, i * b:i * b + n] = self.k[layer][block, :, :n]
                cache.v[layer][slot, :, i * b:i * b + n] = self.v[layer][block, :, :n]

    def store(self, tokens: Sequence[int], cache: KVCache, slot: int, computed: int, final: bool = False,
              owner: str | None = "") -> None:
        """Keep the blocks of tokens[:computed] (prefilled in `slot` for `owner`, or `PUBLIC`) that are not cached
        yet: the full ones, and with `final` (the prompt is done) its last, partial one. A block already cached for
        others becomes `owner`'s too: it computed the same keys and values (the cache is exact)."""
        b, stored, parent = self.block_tokens, [], b""
        ends = list(range(b, computed + 1, b)) + ([computed] if final and computed % b else [])
        for i, end in enumerate(ends):
            piece = tuple(tokens[i * b:end])
            key = _hash(parent, piece)
            block = self._by_key.get(key)
            if block is None:
                block = self._allocate(protect=stored)
                if block is None:
                    break
                self._copy_in(block, cache, slot, i, len(piece))
                self._register(block, _Block(parent, key, piece))
                self._readers[block] = set()
            self._grant(block, owner)
            stored.append(block)
            parent = key
        self._touch(stored)

    # ---- internals ----

    def _chain(self, tokens: Sequence[int], n_blocks: int) -> list[bytes]:
        """The chained hash of each of the first `n_blocks` full blocks of `tokens`."""
        b, keys, previous = self.block_tokens, [], b""
        for i in range(min(n_blocks, len(tokens) // b)):
            previous = _hash(previous, tokens[i * b:(i + 1) * b])
            keys.append(previous)
        return keys

    def _best_continuation(self, parent: bytes, wanted: Sequence[int], owner: str) -> tuple[int, int | None]:
        """Of the blocks of `owner` that continue `parent`, the one sharing the most leading tokens with `wanted`."""
        best, best_block = 0, None
        for block in self._children.get(parent, ()):
            if not self._readable(block, owner):
                continue
            held = self._blocks[block].tokens
            n = next((i for i, (a, c) in enumerate(zip(held, wanted, strict=False)) if a != c),
                     min(len(held), len(wanted)))
            if n > best:
                best, best_block = n, block
        return best, best_block

    def _readable(self, block: int, owner: str) -> bool:
        readers = self._readers[block]
        return readers is PUBLIC or owner in readers

    def _grant(self, block: int, owner: str | None) -> None:
        readers = self._readers[block]
        if owner is PUBLIC:
            self._readers[block] = PUBLIC
        elif readers is not PUBLIC:
            readers.add(owner)

    def _register(self, block: int, entry: _Block) -> None:
        self._blocks[block] = entry
        self._by_key[entry.key] = block
        self._children.setdefault(entry.parent, set()).add(block)
        self.stats.stored_blocks += 1

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
                entry = self._blocks.pop(block)
                del self._by_key[entry.key]
                del self._readers[block]
                siblings = self._children[entry.parent]
                siblings.discard(block)
                if not siblings:  # else an empty set stays for every chain ever evicted: memory without bound
                    del self._children[entry.parent]
                self.stats.evicted_blocks += 1
                return block
        return None

    def _copy_in(self, block: int, cache: KVCache, slot: int, index: int, n: int) -> None:
        b = self.block_tokens
        for layer in range(len(self.k)):
            self.k[layer][block, :, :n] = cache.k[layer][slot, :, index * b:index * b + n]
            self.v[layer][block, :, :n] = cache.v[layer][slot, :, index * b:index * b + n]


def _hash(parent: bytes, tokens: Sequence[int]) -> bytes:
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()
