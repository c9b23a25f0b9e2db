"""Turning an engine request's token events into an answer: collected, or streamed as server-sent events.

The pieces here know nothing of a wire format: `collect` gathers a request's events into an `Answer` (its text
deltas and token counts) and `EventStreamResponse` sends SSE frames; the frames themselves come from a wire format
(`formats.py`), and the request pipeline (`pipeline.py`) puts them together with metering and the cache. The
Workers AI stream (contract §2.1) is, byte for byte:

    data: {"response":"New"}\\n\\n
    data: {"response":" York"}\\n\\n
    ...
    data: {"response":"","usage":{"prompt_tokens":P,"completion_tokens":C,"total_tokens":P+C,"neurons":N}}\\n\\n
    data: [DONE]\\n\\n

with `Content-Type: text/event-stream` exactly. JSON is compact and UTF-8 is sent as is (`ensure_ascii=False`).
The engine's detokenizer never splits a character and gives "" for a token that completes none; such empty deltas
are not sent. The concatenated deltas therefore equal the collected answer for the same seed, and an `Answer`'s
deltas replayed from the response cache give the same frames again.

Each frame is handed to the server as soon as its token exists. When the client goes away, the stream is closed
(Starlette cancels it on `http.disconnect`, or the next write fails) and the engine request is cancelled, so its
slot is free at the next engine step. The same holds for a collected answer: a watcher on the ASGI `receive`
channel cancels the engine request when the client disconnects while it waits (the answer is then "aborted").

An engine failure after the 200 headers are out cannot become an HTTP error any more: the stream then ends with
one error frame, `data: {"response":"","errors":[{"code":3043,"message":"Internal server error"}]}`, and no
`[DONE]`, so clients that wait for `[DONE]` can tell a broken answer from a finished one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from int8serve.engine.scheduler import RequestHandle, TokenEvent

__all__ = [
    "DONE_FRAME",
    "SSE_CONTENT_TYPE",
    "Answer",
    "AnswerBuilder",
    "EventStreamResponse",
    "collect",
    "encode_frame",
    "usage",
]

log = logging.getLogger(__name__)

SSE_CONTENT_TYPE = "text/event-stream"
DONE_FRAME = b"data: [DONE]\n\n"
COMPLETE = ("stop", "length")
ABORTED = "aborted"  # our own finish reason: the client went away (the engine says "cancelled")


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
    finish_reason: str  # "stop" or "length" (complete), "aborted" (client gone), "cancelled", "error"
    started: bool = True  # the engine had taken the request into a slot
    error: str | None = None

    @property
    def text(self) -> str:
        return "".join(self.deltas)

    @property
    def complete(self) -> bool:
        return self.finish_reason in COMPLETE


@dataclass
class AnswerBuilder:
    """Accumulates a request's token events into an `Answer`."""

    prompt_tokens: int = 0
    deltas: list[str] = field(default_factory=list)
    completion_tokens: int = 0
    finish_reason: str | None = None
    started: bool = False
    error: str | None = None

    def add(self, event: TokenEvent) -> None:
        if event.text:
            self.deltas.append(event.text)
        self.prompt_tokens = event.prompt_tokens
        self.completion_tokens = max(self.completion_tokens, event.completion_tokens)
        self.started = self.started or event.started_at > 0 or event.token_id is not None
        if event.finish_reason is not None:
            self.finish_reason, self.error = event.finish_reason, event.error

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def answer(self, aborted: bool = False) -> Answer:
        reason = ABORTED if aborted else (self.finish_reason or "error")
        return Answer(tuple(self.deltas), self.prompt_tokens, self.completion_tokens, reason, self.started,
                      self.error)


# --- collected --------------------------------------------------------------------------------------------------


async def collect(handle: RequestHandle, receive: Receive | None = None) -> Answer:
    """Wait for the whole answer. With `receive`, a client disconnect cancels the engine request, and the answer's
    finish reason is then "aborted" (with the tokens generated until then)."""
    disconnected = asyncio.Event()
    watcher = asyncio.create_task(_watch_disconnect(receive, handle, disconnected)) if receive else None
    builder = AnswerBuilder(prompt_tokens=len(handle.request.prompt_ids))
    try:
        async for event in handle.events():
            builder.add(event)
        return builder.answer(aborted=disconnected.is_set() and builder.finish_reason == "cancelled")
    finally:
        handle.cancel()  # no-op when finished; frees the slot when we leave early
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


async def _watch_disconnect(receive: Receive, handle: RequestHandle, disconnected: asyncio.Event) -> None:
    while True:
        message: Message = await receive()
        if message["type"] == "http.disconnect":
            disconnected.set()
            handle.cancel()
            return


# --- streamed ---------------------------------------------------------------------------------------------------


class EventStreamResponse(StreamingResponse):
    """A 200 `text/event-stream` answer (that exact Content-Type: Starlette would append a charset) which runs
    `on_close` when the response ends for any reason, even if the body iterator never started."""

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None],
                 headers: dict[str, str] | None = None) -> None:
        merged = {"content-type": SSE_CONTENT_TYPE, "cache-control": "no-cache", "x-accel-buffering": "no",
                  **(headers or {})}
        super().__init__(content, status_code=200, headers=merged)
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
