"""The Workers AI `/ai/run` body as a pydantic model, built for each card from the card's own input JSON Schema.

The card is the source of truth: its JSON Schema validates every body first (Workers AI's wording, `body.py`), and
its `max_tokens` default, `sequence_length_limit` and any range or default it declares for a sampling parameter
reach the model `run_body_model(card)` builds. What the seed's card (2023) does not list but today's Workers AI
schema for this model accepts — the sampling parameters of `WORKERS_AI_PARAMETERS` — is added with Workers AI's
ranges. Unknown top-level fields are ignored (the card has no `additionalProperties: false`, and clients add
harmless extras).

`RunBody.to_run()` turns a body into a `ValidatedRun`: the rendered chat template (not yet tokenized), `max_tokens`,
the engine's `SamplingParams` and the request's options. Beyond the schema it refuses what this model cannot do:
`lora` (405/5005), `response_format` / `tools` / `functions` (400/5006), more than `MAX_MESSAGES` messages, and an
empty prompt. `repetition_penalty` is multiplicative (Hugging Face semantics), where 0 would divide by zero; since
the schema allows 0, it is read as "no penalty" (1.0).

`tokenize_run` is the last step: the prompt ids, and prompt + `max_tokens` within the context window (413/5021).
A run whose `max_tokens` was not given on an OpenAI route (`ValidatedRun.fit_max_tokens`) gets instead, as OpenAI
does, the card's default bounded by the room the prompt leaves, and is refused only when the prompt leaves none.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    create_model,
)
from pydantic_core import PydanticCustomError

from int8serve.catalog.card import ModelCard
from int8serve.catalog.sampling import DEFAULT_TEMPERATURE, WORKERS_AI_PARAMETERS, sampling_parameters
from int8serve.engine.chat_template import Segment
from int8serve.engine.sampling_params import SamplingParams
from int8serve.prompt_templates import render_prompt, template_named

from ..errors import BAD_INPUT, CONTEXT_WINDOW, CONTEXT_WINDOW_PROMPT, LORA_UNSUPPORTED, ApiError
from .body import WORKERS_AI_WORDING, Wording, schema_error_detail, top_field, type_mismatch, validation_error_detail

__all__ = [
    "DEFAULT_TEMPERATURE",
    "MAX_MESSAGES",
    "WORKERS_AI_PARAMETERS",
    "RunBody",
    "RunRequest",
    "ValidatedRun",
    "run_body_model",
    "tokenize_run",
    "validate_run_body",
]

MAX_MESSAGES = 256  # messages per request: 256 × the schema's 4096 characters already fill the body limit
UNSUPPORTED_FEATURES = ("response_format", "tools", "functions")
RENDERED_ROLES = ("system", "user", "assistant")


# --- JSON number types (no strings, no booleans; integers may be written 5.0) ----------------------------------


def _json_number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PydanticCustomError("float_type", "Input should be a valid number")
    return float(value)


def _json_integer(value: Any) -> Any:
    """An int as it is (one too large for a float is a number too: generate's --top-k of 400 digits, which float()
    turned into an OverflowError, a traceback), or a float of no fraction."""
    fraction = isinstance(value, float) and not value.is_integer()
    if isinstance(value, bool) or not isinstance(value, int | float) or fraction:
        raise PydanticCustomError("int_type", "Input should be a valid integer")
    return int(value)


JsonNumber = Annotated[float, BeforeValidator(_json_number)]
JsonInteger = Annotated[int, BeforeValidator(_json_integer)]


def _show(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


def between(low: float, high: float) -> AfterValidator:
    """A range check worded like Workers AI's (`must be between 0 and 5`)."""
    def check(value: float) -> float:
        if not low <= value <= high:
            raise PydanticCustomError("out_of_range", "must be between {low} and {high}",
                                      {"low": _show(low), "high": _show(high)})
        return value
    return AfterValidator(check)


def max_tokens_limit(limit: int) -> AfterValidator:
    def check(value: int) -> int:
        if value < 1:
            raise PydanticCustomError("out_of_range", "must be at least 1")
        if value > limit:
            raise PydanticCustomError("out_of_range", "must be at most {limit} (this model's sequence length limit)",
                                      {"limit": limit})
        return value
    return AfterValidator(check)


# --- the model --------------------------------------------------------------------------------------------------


class RunMessage(BaseModel):
    """One message of the `messages` form; roles other than system, user and assistant are not rendered."""

    model_config = ConfigDict(extra="ignore")
    role: str
    content: str


class RunOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    rejectIfBusy: StrictBool | None = Field(None, description="answer 429/3040 at once instead of waiting for a "
                                                              "free slot")


@dataclass(frozen=True)
class ValidatedRun:
    """A body that passed every check that does not need the tokenizer: its template is rendered, not tokenized."""

    segments: tuple[Segment, ...]
    max_tokens: int
    params: SamplingParams
    stream: bool
    reject_if_busy: bool
    form: Literal["prompt", "messages"]
    raw: bool  # prompt form only: no chat template
    # `max_tokens` is the card's default, bounded by the room the prompt leaves in the context window (the OpenAI
    # routes when the body gives neither max_tokens nor max_completion_tokens); False: it must fit as it is
    fit_max_tokens: bool = False

    def worst_cases(self, prompt_bound: int, window: int) -> tuple[tuple[int, int], ...]:
        """The (prompt tokens, generated tokens) pairs among which the costliest a request could be is, for a
        prompt of at most `prompt_bound` tokens that the context `window` does not refuse: the longest prompt
        beside `max_tokens`, and, when the room bounds `max_tokens`, the longest prompt beside a shorter reply."""
        longest = min(prompt_bound, max(0, window - self.max_tokens))  # more would be refused
        if not self.fit_max_tokens:
            return ((longest, self.max_tokens),)
        fitted = min(prompt_bound, max(0, window - 1))
        return (longest, self.max_tokens), (fitted, max(1, min(self.max_tokens, window - fitted)))

    def prompt_tokens_bound(self) -> int:
        """At most how many tokens the prompt will be, without the tokenizer: a BOS, one id per control, and per
        text segment one per UTF-8 byte plus one (a token covers at least one byte; SentencePiece may add a lone
        dummy prefix; a control token written in a raw prompt, several bytes, is one id, which pays for the dummy
        prefix of the text after it). The daily allocation reserves with it until the prompt is tokenized (and
        checks again in the unlikely case a tokenizer gives more)."""
        return 1 + sum(len(s.encode("utf-8", "surrogatepass")) + 1 if isinstance(s, str) else 1
                       for s in self.segments)


class RunBody(BaseModel):
    """`POST /ai/run/{model}` for the seed's card; `run_body_model(card)` gives any card's own variant."""

    model_config = ConfigDict(extra="allow", title="RunBody")
    prompt: str | None = Field(None, min_length=1, description="a prompt (the chat template is applied unless raw)")
    messages: list[RunMessage] | None = Field(None, max_length=MAX_MESSAGES,
                                               description="chat messages, rendered with the model's chat template")
    raw: StrictBool = Field(False, description="send the prompt to the model as it is, without the chat template")
    stream: StrictBool = Field(False, description="answer as server-sent events")
    max_tokens: Annotated[JsonInteger, max_tokens_limit(1800)] = 256
    temperature: Annotated[JsonNumber, between(0, 5)] = DEFAULT_TEMPERATURE
    top_p: Annotated[JsonNumber, between(0.001, 1)] | None = None
    top_k: Annotated[JsonInteger, between(1, 50)] | None = None
    seed: Annotated[JsonInteger, between(1, 9_999_999_999)] | None = None
    repetition_penalty: Annotated[JsonNumber, between(0, 2)] | None = None
    frequency_penalty: Annotated[JsonNumber, between(-2, 2)] | None = None
    presence_penalty: Annotated[JsonNumber, between(-2, 2)] | None = None
    options: RunOptions | None = None
    lora: Any = Field(None, description="not supported by this model (405/5005)")
    response_format: Any = Field(None, description="plain text only")
    tools: Any = Field(None, description="not supported by this model")
    functions: Any = Field(None, description="not supported by this model")

    def to_run(self, card: ModelCard, wording: Wording = WORKERS_AI_WORDING) -> ValidatedRun:
        """The engine-ready form of this body for `card` (raises ApiError for what the model cannot do, naming
        fields as `wording` does)."""
        if self.lora is not None:
            raise ApiError(LORA_UNSUPPORTED, model=card.name)
        for name in UNSUPPORTED_FEATURES:
            if _feature_requested(name, getattr(self, name)):
                raise ApiError(BAD_INPUT, detail=f"'{wording.locate([name])}' is not supported by the model "
                                                 f"{card.name}", param=name)
        form: Literal["prompt", "messages"] = "messages" if self.messages is not None else "prompt"
        template = template_named(card.prompt_template)  # a served card's template exists (checked at start)
        if form == "prompt":
            if self.prompt is None:
                raise ApiError(BAD_INPUT, detail="required properties at '/' are 'prompt'", param="prompt")
            segments = render_prompt(template, self.prompt, self.raw, card.default_context)
        else:
            segments = _render(self.messages or [], template.render_messages, wording)
        return ValidatedRun(segments=tuple(segments), max_tokens=self.max_tokens, params=self.sampling_params(),
                            stream=self.stream, reject_if_busy=bool(self.options and self.options.rejectIfBusy),
                            form=form, raw=self.raw and form == "prompt")

    def sampling_params(self, stop: tuple[str, ...] = ()) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p if self.top_p is not None else 1.0,
            top_k=self.top_k or 0,
            repetition_penalty=self.repetition_penalty or 1.0,  # 0 = off
            frequency_penalty=self.frequency_penalty or 0.0,
            presence_penalty=self.presence_penalty or 0.0,
            seed=self.seed,
            stop=stop,
        )


def validate_run_body(body: Any, card: ModelCard, wording: Wording = WORKERS_AI_WORDING) -> ValidatedRun:
    """A parsed `/ai/run` body checked for `card`: the message count, the card's JSON Schema, then the model;
    complaints worded as Workers AI words them, or as `wording` says (the OpenAI routes')."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if isinstance(messages, list) and len(messages) > MAX_MESSAGES:  # before the schema: bounds its cost
        raise ApiError(BAD_INPUT, detail=f"Array at '{wording.locate(['messages'])}' must have at most {MAX_MESSAGES} "
                                         f"items ({len(messages)})", param="messages")
    problem = schema_error_detail(card.input_validator, body, wording)
    if problem is not None:
        raise ApiError(BAD_INPUT, detail=problem[0], param=problem[1])
    if not isinstance(body, dict):  # a schema without "type": "object"
        raise ApiError(BAD_INPUT, detail=type_mismatch(wording.locate([]), "object", body))
    try:
        parsed = run_body_model(card).model_validate(body)
    except ValidationError as err:
        raise ApiError(BAD_INPUT, detail=validation_error_detail(err, wording),
                       param=top_field(err.errors(include_url=False)[0]["loc"])) from None
    return parsed.to_run(card, wording)


@functools.cache
def run_body_model(card: ModelCard) -> type[RunBody]:
    """`RunBody` with `card`'s limits and defaults: `max_tokens` (default, at most the sequence length limit) and
    any sampling parameter the card's schema declares (its range and default win over Workers AI's)."""
    fields: dict[str, Any] = {
        "max_tokens": (Annotated[JsonInteger, max_tokens_limit(card.sequence_length_limit)],
                       card.default_max_tokens)}
    for name, merged in sampling_parameters(card.input_schema).items():
        kind = JsonInteger if merged.get("type") == "integer" else JsonNumber
        checked = Annotated[kind, between(merged.get("minimum", float("-inf")), merged.get("maximum", float("inf")))]
        default = merged.get("default")
        fields[name] = (checked, default) if default is not None else (checked | None, None)
    return create_model(f"RunBody_{card.id.replace('-', '_')}", __base__=RunBody, **fields)


def _feature_requested(name: str, value: Any) -> bool:
    """Is a feature this model lacks actually asked for? Empty values and plain-text output are harmless."""
    if value is None or value == [] or value == {}:
        return False
    return not (name == "response_format" and isinstance(value, dict) and value.get("type") in (None, "text"))


def _render(messages: list[RunMessage], render_messages: Callable[[list[dict[str, str]]], list[Segment]],
            wording: Wording) -> list[Segment]:
    if not any(m.role in RENDERED_ROLES for m in messages):
        raise ApiError(BAD_INPUT, detail=f"no message with role 'system', 'user' or 'assistant' at "
                                         f"'{wording.locate(['messages'])}'", param="messages")
    return render_messages([{"role": m.role, "content": m.content} for m in messages])


# --- tokenized --------------------------------------------------------------------------------------------------


class PromptTokenizer(Protocol):
    def encode_segments(self, segments: Iterable[Segment]) -> list[int]: ...


@dataclass(frozen=True)
class RunRequest:
    """A validated request with its prompt tokenized, ready for the engine."""

    checked: ValidatedRun
    prompt_ids: tuple[int, ...]

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


def tokenize_run(checked: ValidatedRun, tokenizer: PromptTokenizer, context_window: int) -> RunRequest:
    """The prompt ids, and prompt + `max_tokens` within `context_window` (else 413/5021); with `fit_max_tokens`,
    `max_tokens` bounded by the room the prompt leaves (413/5021 when it leaves none)."""
    prompt_ids = tuple(tokenizer.encode_segments(checked.segments))
    room = context_window - len(prompt_ids)
    if checked.fit_max_tokens and room < checked.max_tokens:
        if room < 1:
            raise ApiError(CONTEXT_WINDOW_PROMPT, tokens=len(prompt_ids) + 1, limit=context_window,
                           prompt_tokens=len(prompt_ids), max_tokens=1, param=checked.form)
        checked = dataclasses.replace(checked, max_tokens=room)
    estimated = len(prompt_ids) + checked.max_tokens
    if estimated > context_window:
        raise ApiError(CONTEXT_WINDOW, tokens=estimated, limit=context_window, prompt_tokens=len(prompt_ids),
                       max_tokens=checked.max_tokens, param=checked.form)
    return RunRequest(checked=checked, prompt_ids=prompt_ids)
