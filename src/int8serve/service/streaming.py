"""What an inference request produced (`Answer`), and how a streamed answer travels: SSE frames with deadlines.

A streamed answer is `text/event-stream` (that exact Content-Type), one `data: <compact JSON>` frame per non-empty
text delta, then the format's final frames. Its 200 headers go out once the engine has taken the request into a
slot: a request still waiting may yet be refused with a status (`inference.py`). Two things can go wrong once the
headers are out, and neither may hold an engine slot:

* the client goes away: a task watching the connection cancels the engine request at once (as one does while the
  request still waits for a slot);
* the client stays connected but stops reading: when one frame cannot be handed to the connection within
  `send_timeout` seconds the stream is cut (the connection is closed) and the engine request cancelled. The frames
  the engine produced meanwhile wait for the connection; once more than `UNSENT_ANSWER_BYTES` of them wait, the
  stream is cut the same way at once (`EventStreamResponse`'s `cut`): the engine does not go on generating for a
  client that does not take what it has.

An engine failure after the headers cannot become an HTTP error any more: the stream then ends with the format's
error frame and no `[DONE]`, so clients that wait for `[DONE]` can tell a broken answer from a finished one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.requests import ClientDisconnect
from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from int8serve.engine.scheduler import FinishReason, TokenEvent

__all__ = [
    "DONE_FRAME",
    "SSE_CONTENT_TYPE",
    "UNSENT_ANSWER_BYTES",
    "Answer",
    "AnswerBuilder",
    "EventStreamResponse",
    "encode_frame",
    "usage",
    "watch_disconnect",
]

log = logging.getLogger(__name__)

SSE_CONTENT_TYPE = "text/event-stream"
DONE_FRAME = b"data: [DONE]\n\n"
UNSENT_ANSWER_BYTES = 16 << 10  # frames of a stream waiting for its connection (besides the connection's own buffer)


def encode_frame(payload: Any) -> bytes:
    """One SSE event: `data: <compact JSON>` and a blank line."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass(frozen=True)
class Answer:
    """What the engine (or the response cache) produced for one request, independent of the wire format."""

    deltas: tuple[str, ...]  # the non-empty text deltas, in order: one SSE frame each
    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason  # CANCELLED: we cancelled it (the client left or stopped reading)
    started: bool = True  # the engine had taken the request into a slot
    error: str | None = None
    cached_tokens: int = 0  # prompt tokens whose keys and values the engine took from its prefix cache

    @property
    def text(self) -> str:
        return "".join(self.deltas)

    @property
    def complete(self) -> bool:
        return self.finish_reason.complete

    @property
    def openai_finish_reason(self) -> str:
        return "length" if self.finish_reason is FinishReason.LENGTH else "stop"


@dataclass
class AnswerBuilder:
    """Accumulates a request's token events into an `Answer`."""

    prompt_tokens: int = 0
    deltas: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: FinishReason | None = None
    started: bool = False
    error: str | None = None
    cached_tokens: int = 0

    def add(self, event: TokenEvent) -> None:
        if event.text:
            self.deltas.append(event.text)
        self.cached_tokens = max(self.cached_tokens, event.cached_tokens)
        self.prompt_tokens = event.prompt_tokens
        self.completion_tokens = max(self.completion_tokens, event.completion_tokens)
        self.started = self.started or event.started_at > 0 or event.token_id is not None
        if event.finish_reason is not None:
            self.finish_reason, self.error = event.finish_reason, event.error

    def answer(self) -> Answer:
        return Answer(tuple(self.deltas), self.prompt_tokens, self.completion_tokens,
                      self.finish_reason or FinishReason.ERROR, self.started, self.error, self.cached_tokens)


async def watch_disconnect(receive: Receive, on_disconnect: Callable[[], None]) -> None:
    """Call `on_disconnect` when the client closes the connection (run as a task; cancel it when done)."""
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            on_disconnect()
            return


class EventStreamResponse(StreamingResponse):
    """A 200 `text/event-stream` answer that cuts a client which stopped reading and runs `on_close` when the
    response ends for any reason, even if the body iterator never started. A client stopped reading when one
    frame cannot be sent within `send_timeout` seconds, or when `cut` is set (its unsent answer grew too large):
    either way the frame being sent is given up, and the stream ends there."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None], *,
                 headers: dict[str, str] | None = None, send_timeout: float | None = None,
                 cut: asyncio.Event | None = None) -> None:
        merged = {"content-type": SSE_CONTENT_TYPE, "cache-control": "no-cache", "x-accel-buffering": "no",
                  **(headers or {})}
        super().__init__(content, status_code=200, headers=merged)
        self._on_close = on_close
        self.send_timeout = send_timeout
        self._cut = cut or asyncio.Event()
        self._sending: asyncio.Timeout | None = None  # the deadline of the frame being sent

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        watchers = [asyncio.create_task(watch_disconnect(receive, self._on_close)),
                    asyncio.create_task(self._cut_when_set())]
        try:
            await self.stream_response(self._with_deadline(send))
        except TimeoutError:  # the client stopped reading: end here, and the server closes the connection
            if self._cut.is_set():
                log.warning("a streamed answer was cut: its client left over %d bytes of it unread",
                            UNSENT_ANSWER_BYTES)
            else:
                log.warning("a streamed answer was cut: its client read nothing for %s s", self.send_timeout)
        except OSError:
            raise ClientDisconnect() from None
        finally:
            for watcher in watchers:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
            self._on_close()

    @property
    def sending(self) -> bool:
        """Whether a frame is being sent now: seen from another task, only while the connection cannot take it."""
        return self._sending is not None

    async def _cut_when_set(self) -> None:
        """Task: once `cut` is set, the frame being sent (if one is) times out now."""
        await self._cut.wait()
        if self._sending is not None:
            self._sending.reschedule(asyncio.get_running_loop().time())

    def _with_deadline(self, send: Send) -> Send:
        timeout = self.send_timeout

        async def send_in_time(message: Message) -> None:
            if self._cut.is_set():
                raise TimeoutError
            try:
                async with asyncio.timeout(timeout) as self._sending:
                    await send(message)
            finally:
                self._sending = None

        return send_in_time
