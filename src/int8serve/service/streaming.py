"""Turning an engine request's token events into an answer: collected into one JSON result, or streamed as SSE.

Streaming wire format (contract §2.1), byte for byte:

    data: {"response":"New"}\\n\\n
    data: {"response":" York"}\\n\\n
    ...
    data: {"response":"","usage":{"prompt_tokens":P,"completion_tokens":C,"total_tokens":P+C}}\\n\\n
    data: [DONE]\\n\\n

with `Content-Type: text/event-stream` exactly. JSON is compact and UTF-8 is sent as is (`ensure_ascii=False`).
The engine's detokenizer never splits a character and gives "" for a token that completes none; such empty deltas
are not sent. The concatenated deltas therefore equal the collected answer for the same seed.

Each frame is handed to the server as soon as its token exists. When the client goes away, the stream is closed
(Starlette cancels it on `http.disconnect`, or the next write fails) and the engine request is cancelled in a
`finally`, so its slot is free at the next engine step. The same holds for a collected answer: a watcher on the
ASGI `receive` channel cancels the engine request when the client disconnects while it waits.

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
from dataclasses import dataclass
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Message, Receive, Scope, Send

from int8serve.engine.scheduler import RequestHandle

from .errors import INTERNAL, REQUEST_ABORTED, UNAVAILABLE, ApiError

__all__ = [
    "DONE_FRAME",
    "SSE_CONTENT_TYPE",
    "Completion",
    "EventStreamResponse",
    "collect",
    "encode_frame",
    "sse_frames",
    "usage",
]

log = logging.getLogger(__name__)

SSE_CONTENT_TYPE = "text/event-stream"
DONE_FRAME = b"data: [DONE]\n\n"
_FINISHED = ("stop", "length")


def encode_frame(payload: Any) -> bytes:
    """One SSE event: `data: <compact JSON>` and a blank line."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str

    def result(self) -> dict[str, Any]:
        """The `result` object of a non-streamed `/ai/run` answer."""
        return {"response": self.text, "tool_calls": [],
                "usage": usage(self.prompt_tokens, self.completion_tokens)}


# --- collected --------------------------------------------------------------------------------------------------


async def collect(handle: RequestHandle, receive: Receive | None = None) -> Completion:
    """Wait for the whole answer. With `receive`, a client disconnect cancels the engine request (→ 408/3008).

    Raises ApiError when the engine fails (500/3043) or drops the request while shutting down (503/3040).
    """
    disconnected = asyncio.Event()
    watcher = asyncio.create_task(_watch_disconnect(receive, handle, disconnected)) if receive else None
    parts: list[str] = []
    try:
        async for event in handle.events():
            parts.append(event.text)
            if event.finish_reason is not None:
                if event.finish_reason in _FINISHED:
                    return Completion("".join(parts), event.prompt_tokens, event.completion_tokens,
                                      event.finish_reason)
                if event.finish_reason == "cancelled":
                    raise ApiError(REQUEST_ABORTED if disconnected.is_set() else UNAVAILABLE)
                log.error("request %s failed in the engine: %s", handle.request.request_id, event.error)
                raise ApiError(INTERNAL)
        raise ApiError(INTERNAL)  # the event stream ended without a final event: a bug
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


async def sse_frames(handle: RequestHandle) -> AsyncIterator[bytes]:
    """The SSE body of one request; cancels the engine request however the iteration ends."""
    try:
        async for event in handle.events():
            if event.text:
                yield encode_frame({"response": event.text})
            if event.finish_reason is None:
                continue
            if event.finish_reason in _FINISHED:
                yield encode_frame({"response": "", "usage": usage(event.prompt_tokens, event.completion_tokens)})
                yield DONE_FRAME
            else:
                if event.finish_reason != "cancelled":
                    log.error("request %s failed in the engine: %s", handle.request.request_id, event.error)
                kind = INTERNAL if event.finish_reason != "cancelled" else UNAVAILABLE
                yield encode_frame({"response": "", "errors": [{"code": kind.code, "message": kind.template}]})
            return
    finally:
        handle.cancel()


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
