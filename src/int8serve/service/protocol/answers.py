"""The answers of the HTTP API, as pydantic models for the OpenAPI document (`/openapi.json`, `/docs`).

Routes build their answers byte for byte (compact JSON, exact envelopes, SSE frames), so these models describe them
for users and tools (client generators, schemathesis) rather than produce them; `tests/service/test_openapi.py`
checks that real answers validate against them.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

__all__ = ["ERROR_RESPONSES", "OPENAI_ERROR_RESPONSES", "SSE_RESPONSE"]


class ErrorItem(BaseModel):
    code: int = Field(description="Workers AI's or Cloudflare's numbered error code, e.g. 5006, 3021, 10000")
    message: str
    error_chain: list[dict[str, Any]] | None = None


class ErrorEnvelope(BaseModel):
    """Cloudflare's v4 envelope of an error: `result` is `{}` for Workers AI errors, `null` for API errors."""

    success: Literal[False]
    errors: list[ErrorItem]
    messages: list[Any]
    result: dict[str, Any] | None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(description="prompt tokens whose keys and values came from the prefix cache")


class OpenAIUsage(Usage):
    prompt_tokens_details: PromptTokensDetails


class RunResult(BaseModel):
    response: str
    tool_calls: list[Any]
    usage: Usage


class RunEnvelope(BaseModel):
    """A non-streamed `/ai/run` answer; its neurons are in the `cf-ai-neurons` header."""

    result: RunResult
    success: Literal[True]
    errors: list[Any]
    messages: list[Any]


class OpenAIErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: int | str = Field(description="the Workers AI code, or OpenAI's own where its clients branch on it "
                                        "(`context_length_exceeded`)")


class OpenAIError(BaseModel):
    error: OpenAIErrorBody


class ChatMessageOut(BaseModel):
    role: Literal["assistant"]
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: OpenAIUsage


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: None
    finish_reason: Literal["stop", "length"]


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: OpenAIUsage


class ModelEntry(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelEntry]


def _errors(model: type[BaseModel], statuses: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": model, "description": text} for status, text in statuses.items()}


_STATUSES = {
    400: "bad input (5006), missing credentials (9106), malformed headers (6003), unknown model (5007)",
    401: "unknown token (10000)", 403: "a token of another account (10000)", 405: "LoRA not supported (5005)",
    408: "the body did not arrive in time (3007)", 413: "body too large (3006) or context window exceeded (5021)",
    429: "rate limit (3021), daily allocation (3036) or capacity (3040), with Retry-After",
    500: "internal error (3043)", 503: "loading or shutting down (3040)",
}
ERROR_RESPONSES = _errors(ErrorEnvelope, _STATUSES)
OPENAI_ERROR_RESPONSES = _errors(OpenAIError, {
    **_STATUSES, 404: "unknown model (5007)", 413: "body too large (3006)",
    400: "bad input (5006), context window exceeded (`context_length_exceeded`)",
    401: "missing credentials (9106), a malformed Authorization header (6003) or an unknown token (10000)",
})
SSE_RESPONSE: dict[str, Any] = {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                                "description": "with `stream: true`: server-sent events, one `data: {...}` frame per "
                                               "text delta, a usage frame with neurons, then `data: [DONE]`"}
