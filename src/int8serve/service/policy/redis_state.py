"""Redis as the state replicas share: one URL, one key namespace, calls that fail fast.

`--redis-url redis://[:password@]host:port/db` names the server. All keys int8serve writes start with a prefix
(`int8serve` by default) so that one Redis can hold several deployments, or test runs, side by side; it is set
with a `key_prefix` query parameter that int8serve reads and removes before handing the URL to redis-py:
`redis://127.0.0.1:6379/0?key_prefix=int8serve-staging`.

Every client made here fails fast (a short socket timeout, no automatic retries): a lost Redis must turn into the
in-process fallback within a second (`fallback.py`), not into requests stuck in redis-py's reconnection backoff.
At start-up, `check_reachable` turns an unreachable Redis into one clear error.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import redis
import redis.asyncio
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff

from int8serve.redact import hide_password, without

__all__ = ["DEFAULT_KEY_PREFIX", "RedisTarget", "RedisUnreachableError", "check_reachable"]

DEFAULT_KEY_PREFIX = "int8serve"
PREFIX_PARAMETER = "key_prefix"


class RedisUnreachableError(Exception):
    """Redis could not be reached at start-up (the message names the server, never its password)."""


@dataclass(frozen=True)
class RedisTarget:
    url: str  # as redis-py takes it (our own parameter removed)
    key_prefix: str

    @classmethod
    def parse(cls, url: str) -> RedisTarget:
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(f"a Redis URL starts with redis://, rediss:// or unix://, got {hide_password(url)!r}")
        query = parse_qsl(parts.query, keep_blank_values=True)
        prefixes = [v for k, v in query if k == PREFIX_PARAMETER]
        prefix = prefixes[-1] if prefixes else DEFAULT_KEY_PREFIX
        if not prefix or any(c.isspace() for c in prefix):
            raise ValueError(f"the Redis key_prefix must be a non-empty word, got {prefix!r}")
        rest = urlencode([(k, v) for k, v in query if k != PREFIX_PARAMETER])
        return cls(url=urlunsplit(parts._replace(query=rest)), key_prefix=prefix)

    @property
    def display(self) -> str:
        """The URL without its password, for messages and logs."""
        return hide_password(self.url)

    def key(self, *parts: str) -> str:
        return ":".join((self.key_prefix, *parts))

    def async_pool(self, timeout: float) -> redis.asyncio.ConnectionPool:
        """A connection pool for the event loop: connections are made lazily, calls time out after `timeout`."""
        return redis.asyncio.ConnectionPool.from_url(
            self.url, socket_timeout=timeout, socket_connect_timeout=timeout, retry=AsyncRetry(NoBackoff(), 0))


def check_reachable(target: RedisTarget, timeout: float = 3.0) -> None:
    """PING the server once (synchronously, at start-up); raise RedisUnreachableError with a clear message."""
    client = redis.Redis.from_url(target.url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        client.ping()
    except (redis.exceptions.RedisError, OSError) as err:
        raise RedisUnreachableError(f"cannot reach Redis at {target.display}: {without(str(err), target.url)}"
                                    ) from None
    finally:
        client.close()
