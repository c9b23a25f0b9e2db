"""The inference response cache: identical requests answered from a stored answer (card `infer_response_cache`).

What makes two requests identical — the key (`cache_key`) — is everything that can change the output: the model,
the request form (`prompt` or `messages`) and `raw`, the prompt token ids after the chat template, `max_tokens` and
every sampling parameter, seed included (all fields of `SamplingParams`, so a parameter added later joins the key
by itself). `stream` is not in it: a streamed request can be answered from an entry a non-streamed one made, and
the other way round. A missing key (peers' classic bug, e.g. LiteLLM #894) serves wrong answers as hits; an extra
one only costs hit rate, so the form and `raw` are in even where the token ids already differ.

What is stored (`CachedAnswer`) is format-neutral: the text deltas as the engine produced them and the token
counts. A replay therefore sends the same SSE frames as the original stream, and a JSON answer the same text.
Only complete answers (finish `stop` or `length`) are stored — never an aborted stream or an error.

Where: `MemoryCache` (this process; bounded in entries and bytes, least recently used evicted first, each entry with
its TTL) by default; `RedisCache` (`SET ... EX ttl`, shared by replicas) with `--redis-url`, falling back to the
memory cache while Redis is away (`fallback.py`).

Per request, AI Gateway's headers (contract §10) are honoured: `cf-aig-skip-cache: true` neither reads nor writes
the cache; `cf-aig-cache-ttl: N` stores the answer for N seconds and only accepts a stored answer younger than N
seconds (the older names `cf-skip-cache` / `cf-cache-ttl` work too). The answer says `cf-aig-cache-status: HIT` or
`MISS`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

import redis.asyncio

from ..inputs import RunRequest
from .fallback import SharedStateGuard
from .settings import MAX_CACHE_TTL_SECONDS

__all__ = [
    "CACHE_STATUS_HEADER",
    "CacheDirectives",
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
KEY_VERSION = 1
_TRUE = ("true", "1", "yes")


def cache_key(model: str, run: RunRequest) -> str:
    """A digest of everything that changes the output of `run` on `model` (not `stream`)."""
    material = {
        "v": KEY_VERSION,
        "model": model,
        "form": run.checked.form,
        "raw": run.checked.raw,
        "prompt_ids": list(run.prompt_ids),
        "max_tokens": run.checked.max_tokens,
        "params": dataclasses.asdict(run.checked.params),
    }
    blob = json.dumps(material, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()


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
    def from_headers(cls, headers: Mapping[str, str]) -> CacheDirectives:
        skip = (headers.get("cf-aig-skip-cache") or headers.get("cf-skip-cache") or "").strip().lower() in _TRUE
        raw_ttl = (headers.get("cf-aig-cache-ttl") or headers.get("cf-cache-ttl") or "").strip()
        ttl = None
        if raw_ttl.isascii() and raw_ttl.isdigit() and int(raw_ttl) > 0:
            ttl = min(int(raw_ttl), MAX_CACHE_TTL_SECONDS)
        return cls(skip=skip, ttl=ttl)  # an unreadable TTL is ignored: a gateway header never fails a request


class CacheStore(Protocol):
    async def get(self, key: str) -> CachedAnswer | None: ...

    async def put(self, key: str, answer: CachedAnswer, ttl: int) -> None: ...


class MemoryCache:
    """Least-recently-used entries, bounded in number and in bytes, each expiring after its own TTL."""

    def __init__(self, max_entries: int, max_bytes: int, clock: Clock = time.time) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._clock = clock
        self._entries: OrderedDict[str, tuple[float, int, CachedAnswer]] = OrderedDict()  # key -> (expires, size, a)
        self.bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, key: str) -> CachedAnswer | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry[2]

    async def put(self, key: str, answer: CachedAnswer, ttl: int) -> None:
        size = len(answer.to_bytes()) + len(key)
        if size > self.max_bytes:
            return  # larger than the whole cache: not stored
        if key in self._entries:
            self._drop(key)
        self._entries[key] = (self._clock() + ttl, size, answer)
        self.bytes += size
        while len(self._entries) > self.max_entries or self.bytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        _expires, size, _answer = self._entries.pop(key)
        self.bytes -= size


class RedisCache:
    """Entries as `<prefix>:cache:v1:<key>` strings with a Redis TTL; entries over `max_entry_bytes` are skipped."""

    def __init__(self, client: redis.asyncio.Redis, prefix: str, max_entry_bytes: int) -> None:
        self.client = client
        self.prefix = prefix
        self.max_entry_bytes = max_entry_bytes

    def _key(self, key: str) -> str:
        return f"{self.prefix}:cache:v{KEY_VERSION}:{key}"

    async def get(self, key: str) -> CachedAnswer | None:
        blob = await self.client.get(self._key(key))
        if blob is None:
            return None
        try:
            return CachedAnswer.from_bytes(blob)
        except (ValueError, KeyError, TypeError):
            log.warning("ignoring an unreadable cache entry %s", key)
            return None

    async def put(self, key: str, answer: CachedAnswer, ttl: int) -> None:
        blob = answer.to_bytes()
        if len(blob) <= self.max_entry_bytes:
            await self.client.set(self._key(key), blob, ex=ttl)


class ResponseCache:
    """The cache the pipeline talks to: shared when Redis is configured and answering, else in this process."""

    def __init__(self, default_ttl: int, local: MemoryCache, shared: CacheStore | None = None,
                 guard: SharedStateGuard | None = None, clock: Clock = time.time) -> None:
        if (shared is None) != (guard is None):
            raise ValueError("a shared cache and its guard go together")
        self.default_ttl = default_ttl
        self.local = local
        self._shared = shared
        self._guard = guard
        self._clock = clock

    async def get(self, key: str, directives: CacheDirectives) -> CachedAnswer | None:
        """A stored answer for `key`, unless skipped or older than the request's own TTL."""
        if directives.skip:
            return None
        answer = await self._route(lambda store: store.get(key))
        if answer is not None and directives.ttl is not None and self._clock() - answer.created > directives.ttl:
            return None
        return answer

    async def put(self, key: str, answer: CachedAnswer, directives: CacheDirectives) -> None:
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
