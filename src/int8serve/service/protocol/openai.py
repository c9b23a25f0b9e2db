"""The OpenAI-compatible request bodies (`chat/completions`, `completions`) as pydantic models.

A body is checked twice, each time for what it is: first against its OpenAI model here (no unknown field; the
fields the SDK or common tools send without effect must have their harmless values), then, turned into the
equivalent Workers AI body, by `validate_run_body` — so types, ranges and defaults are the card's, exactly as on
`/ai/run`: `temperature` 0–5 (a superset of OpenAI's 0–2; default the card's 0.6, not OpenAI's 1), `seed`
1–9999999999, and the extensions `top_k` and `repetition_penalty`. `max_completion_tokens` wins over `max_tokens`
(both given and different: 400); neither given, the reply gets the card's default (256) or the room the prompt
leaves in the context window if less, as OpenAI bounds it (`ValidatedRun.fit_max_tokens`). `stop` is a string or
up to 4 non-empty strings, handed to the engine with the other sampling parameters (so they are part of the response
cache key).

Chat messages go through the card's chat template (`/ai/run` with `messages`); a completion's prompt goes to the
model as it is (`/ai/run` with `raw: true`). Messages as OpenAI's clients send them in a conversation that used tools:
an assistant message with `content: null` (and `tool_calls`, not rendered) is an empty assistant turn, and a `tool`
message is passed on, so that the template drops it as Workers AI drops every role it does not render. A
`developer` message is OpenAI's newer name for a system message and is rendered as one.

Accepted without effect: `user`, `n: 1`, `stream_options` (its `include_usage` is honoured), `logprobs: false` (and a
chat's `0`, its boolean's false; a completion's `logprobs` is a count, whose 0 too asks for the sampled token's log
probability: refused), `top_logprobs: 0`, `echo: false`, `best_of: 1`, `suffix: ""`,
`response_format: {"type": "text"}`, `tools: []`, `tool_choice: "none"|"auto"`, `parallel_tool_calls`, `store: false`,
`metadata`, `logit_bias: {}`, and Workers AI's `options` (`rejectIfBusy`).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from int8serve.catalog.card import ModelCard

from ..errors import BAD_INPUT, ApiError
from .body import OPENAI_WORDING, json_type
from .problems import openai_detail
from .run import JsonInteger, JsonNumber, ValidatedRun, validate_run_body

__all__ = ["MAX_STOP_SEQUENCES", "ChatCompletionRequest", "CompletionRequest", "OpenAIRequest"]

MAX_STOP_SEQUENCES = 4


def _non_empty_stop(value: str) -> str:
    if not value:
        raise PydanticCustomError("empty_stop", "stop sequences must not be empty")
    return value


def _few_stops(value: list[str]) -> list[str]:
    if len(value) > MAX_STOP_SEQUENCES:
        raise PydanticCustomError("too_many_stops", "at most {limit} stop sequences are supported, got {count}",
                                  {"limit": MAX_STOP_SEQUENCES, "count": len(value)})
    return value


def _text_part(kind: str) -> str:
    if kind != "text":
        raise PydanticCustomError("unsupported_part", "only text content parts are supported by this model, got a "
                                                      "part of type '{kind}'", {"kind": kind})
    return kind


# the checks are our functions, for their words; the schema still says what they check (the OpenAPI document)
Stop = Annotated[str, AfterValidator(_non_empty_stop), Field(json_schema_extra={"minLength": 1})]
Stops = Annotated[list[Stop], AfterValidator(_few_stops), Field(json_schema_extra={"maxItems": MAX_STOP_SEQUENCES})]


class TextPart(BaseModel):
    type: Annotated[str, AfterValidator(_text_part)] = Field(json_schema_extra={"enum": ["text"]})
    text: str


class OpenAIMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = Field(description="text, or text content parts (joined); null only for "
                                                             "an assistant message (one that called tools)")

    @model_validator(mode="after")
    def _content_given(self) -> OpenAIMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a '{self.role}' message needs 'content' (only an assistant message may have null)")
        return self

    def workers_ai_message(self) -> dict[str, str]:
        """The message as `/ai/run` takes it: `developer` is a system message, null content is empty."""
        if self.content is None or isinstance(self.content, str):
            text = self.content or ""
        else:
            text = "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool | None = None
    include_obfuscation: Any = None


class TextFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["text"] = "text"


class OpenAIRequest(BaseModel):
    """What chat and completions share."""

    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, description="a served model, e.g. @cf/meta/llama-2-7b-chat-int8")
    max_tokens: JsonInteger | None = None
    max_completion_tokens: JsonInteger | None = None
    temperature: JsonNumber | None = None
    top_p: JsonNumber | None = None
    seed: JsonInteger | None = None
    frequency_penalty: JsonNumber | None = None
    presence_penalty: JsonNumber | None = None
    top_k: JsonInteger | None = Field(None, description="extension: top-k filter (1-50)")
    repetition_penalty: JsonNumber | None = Field(None, description="extension: multiplicative penalty (0-2)")
    stop: Stop | Stops | None = None
    stream: StrictBool | None = None
    stream_options: StreamOptions | None = None
    options: dict[str, Any] | None = Field(None, description="Workers AI's options, e.g. {\"rejectIfBusy\": true}")
    # accepted without effect, with these values only
    user: Any = None
    parallel_tool_calls: Any = None
    metadata: Any = None
    n: Literal[1] | None = None
    logprobs: Literal[False, 0] | None = None
    top_logprobs: Literal[0] | None = None
    echo: Literal[False] | None = None
    best_of: Literal[1] | None = None
    suffix: Literal[""] | None = None
    store: Literal[False] | None = None
    tools: Annotated[list[Any], Field(max_length=0)] | None = None
    functions: Annotated[list[Any], Field(max_length=0)] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    logit_bias: Annotated[dict[str, Any], Field(max_length=0)] | None = None
    response_format: TextFormat | None = None

    @classmethod
    def parse(cls, body: Any) -> OpenAIRequest:
        """`body` checked against this model (400/5006 naming the field)."""
        if not isinstance(body, dict):
            raise ApiError(BAD_INPUT, detail=f"the request body must be a JSON object, got {json_type(body)}")
        try:
            request = cls.model_validate(body)
        except ValidationError as err:
            detail, param = openai_detail(err, body)
            raise ApiError(BAD_INPUT, detail=detail, param=param) from None
        if None not in (request.max_tokens, request.max_completion_tokens) and \
                request.max_tokens != request.max_completion_tokens:
            raise ApiError(BAD_INPUT, detail="'max_tokens' and 'max_completion_tokens' differ: give one of them",
                           param="max_tokens")
        return request

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def to_run(self, card: ModelCard) -> ValidatedRun:
        """The equivalent Workers AI body, checked for `card`, with the stop sequences."""
        body = self._workers_ai_body()
        passed = self.model_dump(include={"temperature", "top_p", "seed", "frequency_penalty", "presence_penalty",
                                          "top_k", "repetition_penalty", "stream", "options"}, exclude_none=True)
        tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if tokens is not None:
            passed["max_tokens"] = tokens
        try:
            checked = validate_run_body({**body, **passed}, card, OPENAI_WORDING)
        except ApiError as err:
            raise self._as_sent(err) from None
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        params = dataclasses.replace(checked.params, stop=tuple(dict.fromkeys(stops)))
        return dataclasses.replace(checked, params=params, fit_max_tokens=tokens is None)

    def _as_sent(self, err: ApiError) -> ApiError:
        """`err` naming `max_completion_tokens` where the client sent that (it reaches the card as `max_tokens`)."""
        if self.max_completion_tokens is None or err.fields.get("param") != "max_tokens":
            return err
        detail = str(err.fields.get("detail", "")).replace("'max_tokens'", "'max_completion_tokens'")
        return ApiError(err.kind, headers=err.headers, error_chain=err.error_chain,
                        **{**err.fields, "detail": detail, "param": "max_completion_tokens"})

    def _workers_ai_body(self) -> dict[str, Any]:
        raise NotImplementedError


class ChatCompletionRequest(OpenAIRequest):
    """`POST chat/completions`: the messages go through the card's chat template."""

    messages: list[OpenAIMessage] = Field(min_length=1)

    def _workers_ai_body(self) -> dict[str, Any]:
        return {"messages": [m.workers_ai_message() for m in self.messages]}


class CompletionRequest(OpenAIRequest):
    """`POST completions`: the prompt goes to the model as it is."""

    prompt: str | list[str] = Field(description="one prompt (a list of one string is accepted)")
    # the legacy API's `logprobs` is a count: 0 too asks for the sampled token's log probability (a chat's is a
    # boolean, where 0 is false)
    logprobs: Literal[False] | None = None

    @field_validator("logprobs", mode="before")
    @classmethod
    def _no_logprobs(cls, value: Any) -> Any:
        if value is not None and value is not False:  # not `in (None, False)`: 0 == False
            raise PydanticCustomError("logprobs", "log probabilities are not supported (only null or false), got "
                                                  "{value}", {"value": repr(value)})
        return value

    @field_validator("prompt", mode="before")
    @classmethod
    def _no_token_ids(cls, value: Any) -> Any:
        if isinstance(value, list) and any(isinstance(p, int | list) and not isinstance(p, bool) for p in value):
            raise PydanticCustomError("token_prompt", "token-id prompts are not supported; give the prompt as text "
                                                      "(a string)")
        return value

    def _workers_ai_body(self) -> dict[str, Any]:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if len(prompts) != 1:
            raise ApiError(BAD_INPUT, detail=f"'prompt' must be one string (batches are not supported), got a list "
                                             f"of {len(prompts)}", param="prompt")
        return {"prompt": prompts[0], "raw": True}
