"""Redis as the state replicas share: one URL, one key namespace, calls that fail fast.

`--redis-url redis://[:password@]host:port/db` names the server. All keys int8serve writes start with a prefix
(`int8serve` by default) so that one Redis can hold several deployments, or test runs, side by side; it is set
with a `key_prefix` query parameter that int8serve reads and removes before handing the URL to redis-py:
`redis://127.0.0.1:6379/0?key_prefix=int8serve-staging`.

A server holds at most `REDIS_CONNECTIONS` (32) connections to Redis, in one pool that the rate limiter, the response
cache, the replica count and the daily allocation share, and the open files it budgets at start count them
(`service/connections.py`): without a bound redis-py opened one connection per call in flight, as many as requests
at once (up to `--max-connections`), and could take the descriptors meant for accepting them. A call only holds a
connection for its round trip (a loopback or LAN Redis answers in 0.1-1 ms), so 32 carry tens of thousands of calls
a second, far more than requests a CPU replica serves; a replica also costs Redis only 32 of its clients
(`maxclients`, 10000 by default). A call that finds them all taken waits for one, at most the calls' own timeout;
after that it fails as a call to a lost Redis does, and the request is served in this process (`fallback.py`): all
32 busy that long means Redis is not keeping up. A `max_connections` query parameter lowers the bound (it is read
and removed like `key_prefix`); it cannot raise it past what the descriptor budget counts.

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

__all__ = ["DEFAULT_KEY_PREFIX", "REDIS_CONNECTIONS", "RedisTarget", "RedisUnreachableError", "check_reachable"]

DEFAULT_KEY_PREFIX = "int8serve"
PREFIX_PARAMETER = "key_prefix"
REDIS_CONNECTIONS = 32  # a server's connections to Redis, at most (see the module docstring)
BOUND_PARAMETER = "max_connections"  # lowers it
OUR_PARAMETERS = {PREFIX_PARAMETER, BOUND_PARAMETER}


class RedisUnreachableError(Exception):
    """Redis could not be reached at start-up (the message names the server, never its password)."""


@dataclass(frozen=True)
class RedisTarget:
    url: str  # as redis-py takes it (our own parameters removed)
    key_prefix: str
    max_connections: int = REDIS_CONNECTIONS

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
        bounds = [v for k, v in query if k == BOUND_PARAMETER]
        bound = _connection_bound(bounds[-1]) if bounds else REDIS_CONNECTIONS
        rest = urlencode([(k, v) for k, v in query if k not in OUR_PARAMETERS])
        return cls(url=urlunsplit(parts._replace(query=rest)), key_prefix=prefix, max_connections=bound)

    @property
    def display(self) -> str:
        """The URL without its password, for messages and logs."""
        return hide_password(self.url)

    def key(self, *parts: str) -> str:
        return ":".join((self.key_prefix, *parts))

    def async_pool(self, timeout: float) -> redis.asyncio.BlockingConnectionPool:
        """A connection pool for the event loop, of at most `max_connections`: connections are made lazily, a call
        waits at most `timeout` for a free one, then at most `timeout` for its answer."""
        return redis.asyncio.BlockingConnectionPool.from_url(
            self.url, max_connections=self.max_connections, timeout=timeout, socket_timeout=timeout,
            socket_connect_timeout=timeout, retry=AsyncRetry(NoBackoff(), 0))


def _connection_bound(value: str) -> int:
    """A URL's `max_connections`: 1 to REDIS_CONNECTIONS."""
    bound = int(value) if value.isascii() and value.isdigit() and len(value) <= 6 else 0
    if not 1 <= bound <= REDIS_CONNECTIONS:
        raise ValueError(f"the Redis URL's max_connections must be 1 to {REDIS_CONNECTIONS} (the connections "
                         f"the open files are budgeted for), got {value!r}")
    return bound


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
