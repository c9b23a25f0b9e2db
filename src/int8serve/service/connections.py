"""Connection limits for uvicorn: how many connections, and how long a client may take to send a request's headers.

uvicorn bounds idle keep-alive connections (`timeout_keep_alive`) but not a client that opens a connection and
sends its headers a byte at a time (slowloris): such a connection is held for ever. `HeaderDeadlineProtocol` closes
a connection whose request headers are not complete `header_timeout` seconds after it opened, or after the previous
answer on it ended. The body has a deadline of its own (`RequestLimits.body_timeout`, answered 408/3007), and the
number of open connections is bounded by uvicorn's `limit_concurrency` (beyond it: 503). A connection also buffers
at most `WRITE_BUFFER_BYTES` of answer that its client has not read before the answer waits for it (asyncio's
default is 64 KiB), so a client that stops reading holds little memory, and a stream notices it soon
(`streaming.py` cuts it, or bounds what waits for the connection: `UNSENT_ANSWER_BYTES`).
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

__all__ = ["DEFAULT_HEADER_TIMEOUT", "DEFAULT_MAX_CONNECTIONS", "HeaderDeadlineProtocol", "uvicorn_config"]

DEFAULT_HEADER_TIMEOUT = 10.0
DEFAULT_MAX_CONNECTIONS = 512
WRITE_BUFFER_BYTES = 16 << 10


class HeaderDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol, closing connections whose request headers take longer than `header_timeout`."""

    header_timeout = DEFAULT_HEADER_TIMEOUT

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._seen_cycle: object = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        transport.set_write_buffer_limits(high=WRITE_BUFFER_BYTES)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._arm()  # the next request on this connection has the same deadline

    def handle_events(self) -> None:
        super().handle_events()
        if self.cycle is not None and self.cycle is not self._seen_cycle:  # a request's headers are complete
            self._seen_cycle = self.cycle
            self._disarm()

    def _arm(self) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self._deadline = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.logger.debug("closing a connection whose request headers took over %s s", self.header_timeout)
            self.transport.close()


def uvicorn_config(app: Any, *, host: str, port: int, header_timeout: float = DEFAULT_HEADER_TIMEOUT,
                   max_connections: int = DEFAULT_MAX_CONNECTIONS, **options: Any) -> uvicorn.Config:
    """uvicorn's settings for `app` with int8serve's connection limits."""
    protocol = type("HeaderDeadline", (HeaderDeadlineProtocol,), {"header_timeout": header_timeout})
    return uvicorn.Config(app, host=host, port=port, http=protocol, limit_concurrency=max_connections, **options)
