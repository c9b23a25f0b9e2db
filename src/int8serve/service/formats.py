"""Wire formats: how a route reads a request body and writes an answer, around the one request pipeline.

The pipeline (`pipeline.py`) does everything that is the same for every inference route — auth, the rate limit, the
cache, the engine, metering, the ledger — and asks a `WireFormat` only for what differs between APIs: validating
the body into a `ValidatedRun`, and rendering an `Answer` as a JSON body or as SSE frames. `WORKERS_AI` is the
Workers AI format of `/ai/run`; the OpenAI-compatible routes plug in a format of their own and get the same policy.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from int8serve.catalog.card import ModelCard

from .errors import BAD_INPUT, ApiError, ErrorKind, success_body
from .inputs import ValidatedRun, validate_run_body
from .streaming import DONE_FRAME, Answer, encode_frame, usage

__all__ = ["WORKERS_AI", "WireFormat", "WorkersAIFormat"]


class WireFormat(Protocol):
    def model_in_body(self, body: Any) -> str:
        """The model a body names, for routes without the model in their path (raises ApiError if none)."""
        ...

    def validate(self, body: Any, card: ModelCard) -> ValidatedRun:
        """The parsed JSON body checked for `card` (raises ApiError); no tokenizer needed."""
        ...

    def json_body(self, answer: Answer) -> Any:
        """The body of a non-streamed 200 (neurons travel in the `cf-ai-neurons` header)."""
        ...

    def delta_frame(self, text: str) -> bytes:
        """One SSE frame for a non-empty text delta."""
        ...

    def final_frames(self, answer: Answer, neurons: float) -> Sequence[bytes]:
        """The frames that end a complete stream (usage with neurons, terminator)."""
        ...

    def error_frame(self, kind: ErrorKind) -> bytes:
        """The frame that ends a stream which failed after its 200 headers were sent."""
        ...


class WorkersAIFormat:
    """`POST /ai/run` (contract §1.3-§2.1)."""

    def model_in_body(self, body: Any) -> str:
        raise ApiError(BAD_INPUT, detail="the model is named in the URL: /ai/run/{model}")  # never asked

    def validate(self, body: Any, card: ModelCard) -> ValidatedRun:
        return validate_run_body(body, card)

    def json_body(self, answer: Answer) -> Any:
        return success_body({"response": answer.text, "tool_calls": [],
                             "usage": usage(answer.prompt_tokens, answer.completion_tokens)})

    def delta_frame(self, text: str) -> bytes:
        return encode_frame({"response": text})

    def final_frames(self, answer: Answer, neurons: float) -> Sequence[bytes]:
        final = {"response": "", "usage": {**usage(answer.prompt_tokens, answer.completion_tokens),
                                           "neurons": neurons}}
        return [encode_frame(final), DONE_FRAME]

    def error_frame(self, kind: ErrorKind) -> bytes:
        return encode_frame({"response": "", "errors": [{"code": kind.code, "message": kind.template}]})


WORKERS_AI = WorkersAIFormat()
