"""From the bytes of an `/ai/run` request to a checked `RunRequest` the engine can take.

Everything that can make a request fail is checked here, before the engine sees it and before a single byte of a
200 is sent (a streamed answer cannot turn into an error once its headers are out). In order:

1. the body: at most `max_bytes` (413/3006, judged on `Content-Length` and on the bytes actually read), not empty
   (400/3003), JSON whatever the `Content-Type` says (curl `-d` sends form-urlencoded) → else 400/5006;
2. the card's own input JSON Schema (`json_schema.input`), with messages worded like Workers AI's validator
   (`oneOf at '/' not met, 0 matches: required properties at '/' are 'prompt', ...`) → 400/5006;
3. what the card's schema does not say but today's Workers AI schema does (contract §7.1): `lora` → 405/5005
   (this model has no LoRA); `response_format` / `tools` / `functions` → 400/5006 (not supported by this model);
   `prompt` not empty; `raw`, `stream`, `options.rejectIfBusy` booleans; the sampling parameters' types and ranges
   (`temperature` 0–5, default 0.6; `top_p` 0.001–1; `top_k` 1–50; `seed` 1–9999999999; `repetition_penalty`
   0–2; `frequency_penalty` / `presence_penalty` −2–2) → 400/5006. Other unknown top-level fields are ignored: the
   llama-2 schema has no `additionalProperties: false`, and clients add harmless extras;
4. `max_tokens` (default: the card schema's default, 256) between 1 and the card's `sequence_length_limit`
   → 400/5006;
5. the chat template (`raw` prompt as is, otherwise the Workers AI llama2 template), tokenization, and the context
   window: prompt tokens + `max_tokens` ≤ min(card `context_length_limit`, engine context) → else 413/5021.

Steps 2-4 and rendering the template (which only looks at the messages, and refuses ones it cannot render) are
`validate_run_body`; tokenizing and the context window are `tokenize_run`. The request pipeline runs the rate
limit between the two, so that a refused body never counts against it and a limited caller never costs a
tokenization (`build_run_request` does both at once).

`repetition_penalty` is multiplicative (Hugging Face semantics), where 0 would divide by zero; since the schema
allows 0, it is read as "no penalty" (1.0).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import jsonschema
from starlette.requests import ClientDisconnect, Request

from int8serve.catalog.card import ModelCard
from int8serve.engine.chat_template import Segment, render_messages, render_prompt
from int8serve.engine.sampling import SamplingParams

from .errors import (
    BAD_INPUT,
    CONTEXT_WINDOW,
    INCOMPLETE_REQUEST,
    LORA_UNSUPPORTED,
    REQUEST_TOO_LARGE,
    ApiError,
)

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "PARAMETER_RANGES",
    "RunRequest",
    "ValidatedRun",
    "build_run_request",
    "parse_json_body",
    "read_body",
    "schema_error_detail",
    "tokenize_run",
    "validate_run_body",
]

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: 256 messages of the schema's 4096 characters fit with room to spare
DEFAULT_TEMPERATURE = 0.6  # Workers AI's default for this model (contract §7.1) when the card declares none

# name -> (JSON type, minimum, maximum), today's Workers AI schema for this model (contract §7.1)
PARAMETER_RANGES: dict[str, tuple[str, float, float]] = {
    "temperature": ("number", 0, 5),
    "top_p": ("number", 0.001, 1),
    "top_k": ("integer", 1, 50),
    "seed": ("integer", 1, 9_999_999_999),
    "repetition_penalty": ("number", 0, 2),
    "frequency_penalty": ("number", -2, 2),
    "presence_penalty": ("number", -2, 2),
}
UNSUPPORTED_FEATURES = ("response_format", "tools", "functions")
RENDERED_ROLES = ("system", "user", "assistant")


class PromptTokenizer(Protocol):
    def encode_segments(self, segments: Iterable[Segment]) -> list[int]: ...


@dataclass(frozen=True)
class RunRequest:
    """A validated request with its prompt tokenized, ready for `Engine.submit`."""

    checked: ValidatedRun
    prompt_ids: tuple[int, ...]

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt_ids)


# --- 1. the body -----------------------------------------------------------------------------------------------


async def read_body(request: Request, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> bytes:
    """The raw body, refused (413/3006) as soon as it is known to exceed `max_bytes`: from `Content-Length` before
    reading anything, else while reading (chunked uploads, or a header that lies)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
        raise ApiError(REQUEST_TOO_LARGE)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise ApiError(REQUEST_TOO_LARGE)
            chunks.append(chunk)
    except ClientDisconnect:
        raise ApiError(INCOMPLETE_REQUEST, what="body") from None
    return b"".join(chunks)


def parse_json_body(raw: bytes) -> Any:
    """JSON whatever the Content-Type; empty → 3003; not UTF-8, not JSON (NaN and Infinity included) or holding
    a lone UTF-16 surrogate escape → 5006."""
    if not raw.strip():
        raise ApiError(INCOMPLETE_REQUEST, what="body")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ApiError(BAD_INPUT, detail=f"the request body is not valid UTF-8 ({err.reason} at byte {err.start})"
                       ) from None
    try:
        value = json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as err:
        raise ApiError(BAD_INPUT, detail=f"the request body is not valid JSON ({err})") from None
    try:  # "\ud800" is valid JSON but not Unicode: nothing downstream (tokenizer, logs) could use it
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        bad = err.object[err.start:err.end].encode("unicode_escape").decode("ascii")
        raise ApiError(BAD_INPUT, detail=f"the request body is not valid Unicode (lone surrogate {bad})") from None
    return value


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


# --- 2. the card's schema --------------------------------------------------------------------------------------


def schema_error_detail(validator: jsonschema.protocols.Validator, instance: Any) -> str | None:
    """The first schema violation of `instance`, worded like Workers AI's messages; None when valid."""
    error = next(iter(validator.iter_errors(instance)), None)
    return None if error is None else _describe(error, validator)


def _pointer(path: Iterable[Any]) -> str:
    return "/" + "/".join(str(p).replace("~", "~0").replace("/", "~1") for p in path)


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _type_mismatch(where: str, expected: str | Sequence[str], value: Any) -> str:
    wanted = expected if isinstance(expected, str) else "' or '".join(expected)
    return f"Type mismatch of '{where}', '{wanted}' not in '{_json_type(value)}'"


def _describe(error: jsonschema.ValidationError, validator: jsonschema.protocols.Validator) -> str:
    where = _pointer(error.absolute_path)
    keyword, expected, instance = error.validator, error.validator_value, error.instance
    if keyword == "required":
        missing = [p for p in expected if isinstance(instance, dict) and p not in instance]
        return f"required properties at '{where}' are " + ", ".join(f"'{p}'" for p in missing)
    if keyword == "type":
        return _type_mismatch(where, expected, instance)
    if keyword in ("oneOf", "anyOf"):
        matches = sum(1 for branch in expected if validator.evolve(schema=branch).is_valid(instance))
        text = f"{keyword} at '{where}' not met, {matches} matches"
        if error.context:  # each branch's complaints, in order; the same complaint from two branches once
            text += ": " + ", ".join(dict.fromkeys(_describe(sub, validator) for sub in error.context))
        return text
    if keyword == "maxLength":
        return f"String at '{where}' is longer than {expected} characters ({len(instance)})"
    if keyword == "minLength":
        return f"String at '{where}' is shorter than {expected} characters ({len(instance)})"
    if keyword in ("maximum", "exclusiveMaximum", "minimum", "exclusiveMinimum"):
        relation = {"maximum": "<=", "exclusiveMaximum": "<", "minimum": ">=", "exclusiveMinimum": ">"}[keyword]
        return f"Value at '{where}' must be {relation} {expected}, got {json.dumps(instance)}"
    if keyword in ("maxItems", "minItems"):
        relation = "at most" if keyword == "maxItems" else "at least"
        return f"Array at '{where}' must have {relation} {expected} items ({len(instance)})"
    if keyword == "enum":
        return f"Value at '{where}' must be one of {json.dumps(expected)}"
    if keyword == "additionalProperties" and isinstance(instance, dict):
        known = set((error.schema or {}).get("properties", {}))
        extra = [k for k in instance if k not in known]
        return ", ".join(f"Additional or unevaluated properties '{where.rstrip('/')}/{k}' at '{where}' not allowed"
                         for k in extra)
    return f"{error.message} at '{where}'"


# --- 3.-5. our checks, the template and the limits -------------------------------------------------------------


def build_run_request(body: Any, card: ModelCard, tokenizer: PromptTokenizer, context_window: int) -> RunRequest:
    """Validate a parsed `/ai/run` body for `card` and turn it into prompt ids and sampling parameters.

    `context_window` is the largest prompt + `max_tokens` the server accepts: min(card limit, engine context).
    The two halves are `validate_run_body` (steps 2-4, and rendering the template, which only looks at the
    messages) and `tokenize_run` (step 5); the request pipeline runs the rate limit between them.
    """
    return tokenize_run(validate_run_body(body, card), tokenizer, context_window)


@dataclass(frozen=True)
class ValidatedRun:
    """A body that passed every check that does not need the tokenizer: its template is rendered, not tokenized."""

    segments: tuple[Segment, ...]
    max_tokens: int
    params: SamplingParams
    stream: bool
    reject_if_busy: bool
    form: str  # "prompt" or "messages"
    raw: bool  # prompt form only: no chat template


def validate_run_body(body: Any, card: ModelCard) -> ValidatedRun:
    """Steps 2-4 for `card`, and the chat template (400 for messages it cannot render); raises ApiError."""
    detail = schema_error_detail(card.input_validator, body)
    if detail is not None:
        raise ApiError(BAD_INPUT, detail=detail)
    if not isinstance(body, dict):  # a schema without "type": "object"
        raise ApiError(BAD_INPUT, detail=_type_mismatch("/", "object", body))

    if body.get("lora") is not None:
        raise ApiError(LORA_UNSUPPORTED, model=card.name)
    for name in UNSUPPORTED_FEATURES:
        if _feature_requested(name, body.get(name)):
            raise ApiError(BAD_INPUT, detail=f"'/{name}' is not supported by the model {card.name}")

    form = "messages" if "messages" in body else "prompt"
    raw = _boolean(body, "raw")
    stream = _boolean(body, "stream")
    reject_if_busy = _reject_if_busy(body.get("options"))
    params = _sampling_params(body, card)
    max_tokens = _max_tokens(body, card)

    if form == "prompt":
        prompt = body.get("prompt")
        if not isinstance(prompt, str):
            raise ApiError(BAD_INPUT, detail="required properties at '/' are 'prompt'")
        if not prompt:
            raise ApiError(BAD_INPUT, detail="String at '/prompt' is shorter than 1 characters (0)")
        segments = render_prompt(prompt, raw=raw)
    else:
        segments = _render_messages(body.get("messages"))
    return ValidatedRun(segments=tuple(segments), max_tokens=max_tokens, params=params, stream=stream,
                        reject_if_busy=reject_if_busy, form=form, raw=raw and form == "prompt")


def tokenize_run(checked: ValidatedRun, tokenizer: PromptTokenizer, context_window: int) -> RunRequest:
    """Step 5: the prompt ids, and prompt + `max_tokens` within `context_window` (else 413/5021)."""
    prompt_ids = tuple(tokenizer.encode_segments(checked.segments))
    estimated = len(prompt_ids) + checked.max_tokens
    if estimated > context_window:
        raise ApiError(CONTEXT_WINDOW, tokens=estimated, limit=context_window)
    return RunRequest(checked=checked, prompt_ids=prompt_ids)


def _feature_requested(name: str, value: Any) -> bool:
    """Is a feature this model lacks actually asked for? Empty values and plain-text output are harmless."""
    if value is None or value == [] or value == {}:
        return False
    return not (name == "response_format" and isinstance(value, dict) and value.get("type") in (None, "text"))


def _boolean(body: Mapping[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(BAD_INPUT, detail=_type_mismatch(f"/{name}", "boolean", value))
    return value


def _reject_if_busy(options: Any) -> bool:
    if options is None:
        return False
    if not isinstance(options, dict):
        raise ApiError(BAD_INPUT, detail=_type_mismatch("/options", "object", options))
    value = options.get("rejectIfBusy")
    if value is None:
        return False
    if not isinstance(value, bool):
        raise ApiError(BAD_INPUT, detail=_type_mismatch("/options/rejectIfBusy", "boolean", value))
    return value


def _number(body: Mapping[str, Any], name: str, kind: str, low: float, high: float) -> float | int | None:
    """A numeric field checked for type and range (null = not given); integers may be written 5.0."""
    value = body.get(name)
    if value is None:
        return None
    where = f"/{name}"
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ApiError(BAD_INPUT, detail=_type_mismatch(where, kind, value))
    if kind == "integer":
        if not float(value).is_integer():
            raise ApiError(BAD_INPUT, detail=_type_mismatch(where, kind, value))
        value = int(value)
    if not low <= value <= high:
        raise ApiError(BAD_INPUT, detail=f"Value at '{where}' must be between {_show(low)} and {_show(high)}, "
                                         f"got {json.dumps(value)}")
    return value


def _show(number: float) -> str:
    return str(int(number)) if float(number).is_integer() else str(number)


def _sampling_params(body: Mapping[str, Any], card: ModelCard) -> SamplingParams:
    values = {name: _number(body, name, *spec) for name, spec in PARAMETER_RANGES.items()}
    temperature = values["temperature"]
    if temperature is None:
        temperature = _schema_default(card.input_schema, "temperature", DEFAULT_TEMPERATURE)
    repetition_penalty = values["repetition_penalty"]
    return SamplingParams(
        temperature=float(temperature),
        top_p=float(values["top_p"]) if values["top_p"] is not None else 1.0,
        top_k=int(values["top_k"]) if values["top_k"] is not None else 0,
        repetition_penalty=float(repetition_penalty) if repetition_penalty else 1.0,  # 0 = off
        frequency_penalty=float(values["frequency_penalty"] or 0.0),
        presence_penalty=float(values["presence_penalty"] or 0.0),
        seed=int(values["seed"]) if values["seed"] is not None else None,
    )


def _max_tokens(body: Mapping[str, Any], card: ModelCard) -> int:
    value = body.get("max_tokens")
    if value is None:
        return card.default_max_tokens
    if isinstance(value, bool) or not isinstance(value, int | float) or not float(value).is_integer():
        raise ApiError(BAD_INPUT, detail=_type_mismatch("/max_tokens", "integer", value))
    value = int(value)
    if value < 1:
        raise ApiError(BAD_INPUT, detail=f"Value at '/max_tokens' must be at least 1, got {value}")
    if value > card.sequence_length_limit:
        raise ApiError(BAD_INPUT, detail=f"Value at '/max_tokens' must be at most {card.sequence_length_limit} "
                                         f"(this model's sequence length limit), got {value}")
    return value


def _render_messages(messages: Any) -> list[Segment]:
    if not isinstance(messages, list):
        raise ApiError(BAD_INPUT, detail=_type_mismatch("/messages", "array", messages))
    for index, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(BAD_INPUT, detail=_type_mismatch(f"/messages/{index}", "object", message))
    if not any(m.get("role") in RENDERED_ROLES for m in messages):
        raise ApiError(BAD_INPUT, detail="no message with role 'system', 'user' or 'assistant' at '/messages'")
    try:
        return render_messages(messages)
    except ValueError as err:
        raise ApiError(BAD_INPUT, detail=f"{err} at '/messages'") from None


def _schema_branches(schema: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    yield schema
    for key in ("oneOf", "anyOf", "allOf"):
        for branch in schema.get(key) or []:
            if isinstance(branch, Mapping):
                yield branch


def _schema_default(schema: Mapping[str, Any], name: str, fallback: float) -> float:
    """The `default` the card's input schema declares for property `name` (any branch), else `fallback`."""
    for branch in _schema_branches(schema):
        spec = (branch.get("properties") or {}).get(name)
        if isinstance(spec, Mapping) and isinstance(spec.get("default"), int | float) \
                and not isinstance(spec.get("default"), bool):
            return float(spec["default"])
    return fallback
