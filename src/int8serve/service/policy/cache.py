"""The inference response cache: identical requests answered from a stored answer (card `infer_response_cache`).

Whose answers: by default each account has its own cache (`--cache-scope account`): the account is part of the
key, so no request of one account can read another's entries, or learn from the timing of its answer that one
exists; and the in-process cache keeps each account's entries in a partition of its own, bounded per account, so
one account filling the cache evicts only its own answers. `--cache-scope global` shares answers between accounts
(an operator's choice for one trusted tenant: then an account can tell from a fast HIT what others asked).

What makes two requests identical — the key (`cache_key`) — is, besides the account, everything that can change the
output: the model, the request form (`prompt` or `messages`) and `raw`, the prompt token ids after the chat
template, `max_tokens` and every sampling parameter, seed and stop strings included (all fields of
`SamplingParams`, so a parameter added later joins the key by itself). `stream` is not in it: a streamed request
can be answered from an entry a non-streamed one made, and the other way round.

What is stored (`CachedAnswer`) is format-neutral: the text deltas as the engine produced them and the token
counts. A replay therefore sends the same SSE frames as the original stream, and a JSON answer the same text.
Only complete answers (finish `stop` or `length`) are stored — never an aborted stream or an error.

Where: `MemoryCache` (this process; LRU partitions per account, each bounded in entries and bytes, each entry with
its TTL) by default; `RedisCache` (`SET ... EX ttl`, shared by replicas) with `--redis-url`, falling back to the
memory cache while Redis is away (`fallback.py`). Entries larger than the per-account byte bound are never stored.

Clocks: in this process an entry's expiry and age run on the monotonic clock, so a wall-clock step (NTP, a resumed
VM) neither keeps an entry past its TTL nor ages a fresh one. A shared entry lives as long as Redis' TTL says, and its
age is read from the wall-clock time its writer stamped in it (`CachedAnswer.created`); a stamp in the future (this
replica's clock stepped back since, or behind the writer's) tells no age, so a request that bounds the age does not
take that entry: it is answered anew, and the new answer replaces the entry.

Per request, AI Gateway's headers are honoured: `cf-aig-skip-cache: true` neither reads nor writes the cache;
`cf-aig-cache-ttl: N` stores the answer for N seconds — at most the server's `--cache-ttl`, so that no client keeps
entries longer than the operator allows — and only accepts a stored answer younger than N seconds (the older names
`cf-skip-cache` / `cf-cache-ttl` work too). The answer says `cf-aig-cache-status: HIT` or `MISS`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import sys
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import NamedTuple, Protocol, TypeVar

import redis.asyncio

from ..protocol.run import RunRequest
from .fallback import SharedStateGuard

__all__ = [
    "CACHE_SCOPES",
    "CACHE_STATUS_HEADER",
    "CacheDirectives",
    "CacheKey",
    "CachedAnswer",
    "MemoryCache",
    "RedisCache",
    "ResponseCache",
    "cache_key",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
Clock = Callable[[], float]

CACHE_STATUS_HEADER = "cf-aig-cache-status"
KEY_VERSION = 2
CACHE_SCOPES = ("account", "global")
_TRUE = ("true", "1", "yes")
MAX_TTL_DIGITS = 9
# what an in-memory entry holds besides its deltas and key: the answer object and its fields, the entry's tuple, its
# place in the partition (~380 bytes, measured with tracemalloc)
ENTRY_OVERHEAD_BYTES = 512


class CacheKey(NamedTuple):
    owner: str  # the account whose answers these are ("" when the cache is shared by all accounts)
    digest: str


def cache_key(owner: str, model: str, run: RunRequest, weights: str = "") -> CacheKey:
    """`owner`'s key for `run` on `model` served by `weights` (the engine's fingerprint: another model under the same
    name never answers from it): a digest of the owner and of everything that changes the output (not `stream`)."""
    material = {
        "v": KEY_VERSION,
        "owner": owner,
        "model": model,
        "weights": weights,
        "form": run.checked.form,
        "raw": run.checked.raw,
        "prompt_ids": list(run.prompt_ids),
        "max_tokens": run.checked.max_tokens,
        "params": dataclasses.asdict(run.checked.params),
    }
    blob = json.dumps(material, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return CacheKey(owner, hashlib.sha256(blob).hexdigest())


@dataclass(frozen=True)
class CachedAnswer:
    deltas: tuple[str, ...]
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str
    created: float  # unix time it was stored

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), ensure_ascii=False, separators=(",", ":")).encode("utf-8")

    @classmethod
    def from_bytes(cls, blob: bytes) -> CachedAnswer:
        data = json.loads(blob)
        return cls(deltas=tuple(data["deltas"]), prompt_tokens=int(data["prompt_tokens"]),
                   completion_tokens=int(data["completion_tokens"]), finish_reason=str(data["finish_reason"]),
                   created=float(data["created"]))


@dataclass(frozen=True)
class CacheDirectives:
    """AI Gateway's per-request cache headers."""

    skip: bool = False
    ttl: int | None = None  # seconds; None = the operator's TTL

    @classmethod
    def from_headers(cls, headers: Mapping[str, str], max_ttl: int) -> CacheDirectives:
        """The request's directives; its TTL at most `max_ttl` (an unreadable TTL is ignored: a gateway header
        never fails a request)."""
        skip = (headers.get("cf-aig-skip-cache") or headers.get("cf-skip-cache") or "").strip().lower() in _TRUE
        raw_ttl = (headers.get("cf-aig-cache-ttl") or headers.get("cf-cache-ttl") or "").strip()
        ttl = None
        if raw_ttl.isascii() and raw_ttl.isdigit():  # more digits than MAX_TTL_DIGITS: above any maximum
            ttl = max_ttl if len(raw_ttl) > MAX_TTL_DIGITS else min(int(raw_ttl), max_ttl)
        return cls(skip=skip, ttl=ttl or None)


class CacheStore(Protocol):
    async def get(self, key: CacheKey, max_age: float | None = None) -> CachedAnswer | None: ...

    async def put(self, key: CacheKey, answer: CachedAnswer, ttl: int) -> None: ...


class _Entry(NamedTuple):
    stored: float  # the cache's clock (monotonic)
    expires: float
    size: int
    answer: CachedAnswer


def _held_bytes(answer: CachedAnswer, digest: str) -> int:
    """The memory an in-memory entry holds, which its partition's byte bound counts: each delta is a str object of
    its own, ~50 bytes over its text (a token's delta is a few characters: ~10x its JSON, which was counted)."""
    return (ENTRY_OVERHEAD_BYTES + sys.getsizeof(answer.deltas) + sum(map(sys.getsizeof, answer.deltas))
            + sys.getsizeof(digest))


class _Partition:
    """One owner's entries: least recently used first out, bounded in number and in bytes."""

    def __init__(self) -> None:
        self.entries: OrderedDict[str, _Entry] = OrderedDict()
        self.bytes = 0

    def drop(self, digest: str) -> None:
        self.bytes -= self.entries.pop(digest).size


class MemoryCache:
    """Entries in this process, in one LRU partition per owner, each bounded by `max_entries` and `max_bytes`; their
    expiry and age on `clock` (monotonic: wall-clock steps do not move them)."""

    def __init__(self, max_entries: int, max_bytes: int, clock: Clock = time.monotonic) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._partitions: dict[str, _Partition] = {}

    def __len__(self) -> int:
        return sum(len(p.entries) for p in self._partitions.values())

    @property
    def bytes(self) -> int:
        return sum(p.bytes for p in self._partitions.values())

    async def get(self, key: CacheKey, max_age: float | None = None) -> CachedAnswer | None:
        """The entry for `key`, unless expired or older than `max_age` seconds."""
        partition = self._partitions.get(key.owner)
        entry = partition.entries.get(key.digest) if partition is not None else None
        if partition is None or entry is None:
            return None
        now = self._clock()
        if entry.expires <= now:
            self._drop(key.owner, key.digest)
            return None
        if max_age is not None and now - entry.stored > max_age:
            return None
        partition.entries.move_to_end(key.digest)
        return entry.answer

    async def put(self, key: CacheKey, answer: CachedAnswer, ttl: int) -> None:
        size = _held_bytes(answer, key.digest)
        if size > self.max_bytes:
            return  # larger than a whole partition: not stored
        partition = self._partitions.setdefault(key.owner, _Partition())
        if key.digest in partition.entries:
            partition.drop(key.digest)
        now = self._clock()
        partition.entries[key.digest] = _Entry(now, now + ttl, size, answer)
        partition.bytes += size
        while len(partition.entries) > self.max_entries or partition.bytes > self.max_bytes:
            partition.drop(next(iter(partition.entries)))

    def _drop(self, owner: str, digest: str) -> None:
        partition = self._partitions[owner]
        partition.drop(digest)
        if not partition.entries:
            del self._partitions[owner]


class RedisCache:
    """Entries as `<prefix>:cache:v1:<key>` strings with a Redis TTL; entries over `max_entry_bytes` are skipped.
    Their age is `clock` (the wall clock, as their `created`) minus their `created`."""

    def __init__(self, client: redis.asyncio.Redis, prefix: str, max_entry_bytes: int,
                 clock: Clock = time.time) -> None:
        self.client = client
        self.prefix = prefix
        self.max_entry_bytes = max_entry_bytes
        self._clock = clock

    def _key(self, key: CacheKey) -> str:
        return f"{self.prefix}:cache:v{KEY_VERSION}:{key.digest}"

    async def get(self, key: CacheKey, max_age: float | None = None) -> CachedAnswer | None:
        """The entry for `key`, unless older than `max_age` seconds or, then, stamped in the future (no known age)."""
        blob = await self.client.get(self._key(key))
        if blob is None:
            return None
        try:
            answer = CachedAnswer.from_bytes(blob)
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring an unreadable cache entry %s", key.digest)
            return None
        if max_age is not None and not 0.0 <= self._clock() - answer.created <= max_age:
            return None
        return answer

    async def put(self, key: CacheKey, answer: CachedAnswer, ttl: int) -> None:
        blob = answer.to_bytes()
        if len(blob) <= self.max_entry_bytes:
            await self.client.set(self._key(key), blob, ex=ttl)


class ResponseCache:
    """The cache the pipeline talks to: shared when Redis is configured and answering, else in this process.
    `clock` (the wall clock) stamps the answers' `created`."""

    def __init__(self, default_ttl: int, local: MemoryCache, shared: CacheStore | None = None,
                 guard: SharedStateGuard | None = None, clock: Clock = time.time, scope: str = "account") -> None:
        if (shared is None) != (guard is None):
            raise ValueError("a shared cache and its guard go together")
        if scope not in CACHE_SCOPES:
            raise ValueError(f"the cache scope is one of {', '.join(CACHE_SCOPES)}, got {scope!r}")
        self.default_ttl = default_ttl
        self.scope = scope
        self.local = local
        self._shared = shared
        self._guard = guard
        self._clock = clock

    def key(self, account: str, model: str, run: RunRequest, weights: str = "") -> CacheKey:
        """The key of `account`'s request: its own unless the cache is shared by all accounts."""
        return cache_key(account if self.scope == "account" else "", model, run, weights)

    def directives(self, headers: Mapping[str, str]) -> CacheDirectives:
        return CacheDirectives.from_headers(headers, max_ttl=self.default_ttl)

    async def get(self, key: CacheKey, directives: CacheDirectives) -> CachedAnswer | None:
        """A stored answer for `key`, unless skipped or older than the request's own TTL."""
        if directives.skip:
            return None
        return await self._route(lambda store: store.get(key, directives.ttl))

    async def put(self, key: CacheKey, answer: CachedAnswer, directives: CacheDirectives) -> None:
        if directives.skip:
            return
        ttl = directives.ttl or self.default_ttl
        await self._route(lambda store: store.put(key, answer, ttl))

    def answer(self, deltas: tuple[str, ...], prompt_tokens: int, completion_tokens: int,
               finish_reason: str) -> CachedAnswer:
        return CachedAnswer(deltas, prompt_tokens, completion_tokens, finish_reason, created=self._clock())

    async def _route(self, operation: Callable[[CacheStore], Awaitable[T]]) -> T:
        if self._guard is None or self._shared is None:
            return await operation(self.local)
        shared = self._shared
        return await self._guard.call("cache", lambda: operation(shared), lambda: operation(self.local))
