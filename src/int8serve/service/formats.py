"""Wire formats: how an inference route reads its body and writes its answer, around the one request lifecycle.

`inference.py` does everything that is the same for every inference route — auth, the rate limit, the cache, the
engine, metering, the ledger — and asks a `WireFormat` only for what differs between APIs: checking the body into
a `ValidatedRun`, and rendering an `Answer` as a JSON body or as SSE frames. `WorkersAIFormat` is `/ai/run`'s;
`ChatFormat` and `CompletionFormat` are the OpenAI-compatible routes' (one instance per request: they hold the
answer's id, `created` and whether a stream has sent its role yet).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any, Protocol

from int8serve.catalog.card import ModelCard

from .errors import BAD_INPUT, ApiError, ErrorKind, openai_error, success_body
from .protocol.openai import ChatCompletionRequest, CompletionRequest, OpenAIRequest
from .protocol.run import ValidatedRun, validate_run_body
from .streaming import DONE_FRAME, Answer, encode_frame, usage

__all__ = ["ChatFormat", "CompletionFormat", "WireFormat", "WorkersAIFormat"]


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
        """The frame that ends a stream which failed after its 200 headers were sent (no terminator follows)."""
        ...


class WorkersAIFormat:
    """`POST /ai/run/{model}`."""

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


def openai_usage(answer: Answer) -> dict[str, Any]:
    """OpenAI's usage object: the tokens, and how many prompt tokens came from the prefix cache."""
    return {**usage(answer.prompt_tokens, answer.completion_tokens),
            "prompt_tokens_details": {"cached_tokens": answer.cached_tokens}}


class _OpenAIFormat:
    """What chat and completions share: the envelope, the usage chunk, errors in OpenAI's shape."""

    prefix = ""
    obj = ""
    chunk_obj = ""
    request_model: type[OpenAIRequest] = OpenAIRequest

    def __init__(self) -> None:
        self.id = f"{self.prefix}{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.request: OpenAIRequest | None = None

    def model_in_body(self, body: Any) -> str:
        self.request = self.request_model.parse(body)
        return self.request.model

    def validate(self, body: Any, card: ModelCard) -> ValidatedRun:
        assert self.request is not None, "model_in_body parses the body first"
        return self.request.to_run(card)

    def _envelope(self, choices: list[dict[str, Any]], obj: str | None = None) -> dict[str, Any]:
        model = self.request.model if self.request is not None else ""
        return {"id": self.id, "object": obj or self.obj, "created": self.created, "model": model,
                "choices": choices}

    def final_frames(self, answer: Answer, neurons: float) -> Sequence[bytes]:
        """The last chunk: `finish_reason` with the usage on it, as Workers AI sends it (since 2026-02-17); with
        `stream_options.include_usage`, OpenAI's own form instead: the usage alone in one more chunk with no
        choices. Either way the usage comes once, so a client that adds up the chunks' usage counts it once."""
        usage = {**openai_usage(answer), "neurons": neurons}
        last = self._envelope([self._last_choice(answer.openai_finish_reason)], self.chunk_obj)
        if self.request is not None and self.request.include_usage:
            frames = [encode_frame(last), encode_frame({**self._envelope([], self.chunk_obj), "usage": usage})]
        else:
            frames = [encode_frame({**last, "usage": usage})]
        return [*frames, DONE_FRAME]

    def _last_choice(self, finish_reason: str) -> dict[str, Any]:
        raise NotImplementedError

    def error_frame(self, kind: ErrorKind) -> bytes:
        return encode_frame(openai_error(kind.code, kind.template, kind.status))


class ChatFormat(_OpenAIFormat):
    prefix = "chatcmpl-"
    obj = "chat.completion"
    chunk_obj = "chat.completion.chunk"
    request_model = ChatCompletionRequest

    def __init__(self) -> None:
        super().__init__()
        self._role_sent = False

    def json_body(self, answer: Answer) -> Any:
        choice = {"index": 0, "message": {"role": "assistant", "content": answer.text}, "logprobs": None,
                  "finish_reason": answer.openai_finish_reason}
        return {**self._envelope([choice]), "usage": openai_usage(answer)}

    def _delta(self, content: str) -> dict[str, Any]:
        """The first delta opens the message with its role and a `content`, "" if there is no text yet (as OpenAI's
        first chunk): a client adding up the deltas of an answer without text ends with "", as `json_body` has it,
        not None."""
        if self._role_sent:
            return {"content": content} if content else {}
        self._role_sent = True
        return {"role": "assistant", "content": content}

    def delta_frame(self, text: str) -> bytes:
        choice = {"index": 0, "delta": self._delta(text), "logprobs": None, "finish_reason": None}
        return encode_frame(self._envelope([choice], self.chunk_obj))

    def _last_choice(self, finish_reason: str) -> dict[str, Any]:
        return {"index": 0, "delta": self._delta(""), "logprobs": None, "finish_reason": finish_reason}


class CompletionFormat(_OpenAIFormat):
    prefix = "cmpl-"
    obj = "text_completion"
    chunk_obj = "text_completion"
    request_model = CompletionRequest

    def json_body(self, answer: Answer) -> Any:
        choice = {"index": 0, "text": answer.text, "logprobs": None, "finish_reason": answer.openai_finish_reason}
        return {**self._envelope([choice]), "usage": openai_usage(answer)}

    def delta_frame(self, text: str) -> bytes:
        return encode_frame(self._envelope([{"index": 0, "text": text, "logprobs": None, "finish_reason": None}]))

    def _last_choice(self, finish_reason: str) -> dict[str, Any]:
        return {"index": 0, "text": "", "logprobs": None, "finish_reason": finish_reason}
