"""Request bodies: bytes in, a JSON value out, and every complaint about it worded the way Workers AI words it.

Workers AI reads the body as JSON whatever the Content-Type says (curl `-d` sends form-urlencoded), answers an empty
body with 400/3003 and anything else it cannot use with 400/5006, quoting its JSON Schema validator (`oneOf at '/'
not met, 0 matches: required properties at '/' are 'prompt', ...`). Clients show these messages to people, so the
same words are produced here, both for the card's own JSON Schema (`schema_error_detail`) and for the pydantic
models of `protocol/` (`validation_error_detail`). The OpenAI routes check the same schema, but their clients sent
neither Workers AI's pointers nor a `prompt` in a chat: `OPENAI_WORDING` names a field as they do
(`messages[0].content`) and keeps, of the schema's prompt/messages `oneOf`, the branch the body chose.

Parsing is bounded so that no value in a body can cost more than its bytes: a body is at most `max_bytes` (413/3006,
judged on `Content-Length` and on the bytes actually read), an integer literal has at most `MAX_INTEGER_DIGITS`
digits, a number must be finite (`1e400` is not a number here) and arrays and objects nest at most `MAX_JSON_DEPTH`
deep (a value nested hundreds deep is valid JSON, but the pickling that carries a checked body back from a request
worker process, and any recursive walk, would fail on it). The parse runs in a worker thread or process
(`workers.py`), never on the event loop. A body refused before it is read whole (413, or 408 when it stops arriving)
closes the connection: what the client still sends would otherwise be read as its next request.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import jsonschema
from pydantic import ValidationError
from starlette.requests import ClientDisconnect, Request

from ..errors import BAD_INPUT, INCOMPLETE_REQUEST, REQUEST_ABORTED, REQUEST_TOO_LARGE, ApiError

__all__ = [
    "CLOSE",
    "DEFAULT_MAX_BODY_BYTES",
    "EXPECTED_TYPES",
    "MAX_INTEGER_DIGITS",
    "MAX_JSON_DEPTH",
    "OPENAI_WORDING",
    "WORKERS_AI_WORDING",
    "Wording",
    "field_path",
    "json_type",
    "parse_json_body",
    "pointer",
    "read_body",
    "schema_error_detail",
    "top_field",
    "type_mismatch",
    "validation_error_detail",
]

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: 256 messages of the schema's 4096 characters fit with room to spare
MAX_INTEGER_DIGITS = 30  # far beyond any range the API accepts (seed <= 9999999999)
MAX_JSON_DEPTH = 64  # arrays and objects within each other; a request of either API nests 4 or 5 deep
CLOSE = {"connection": "close"}  # for a refusal that leaves part of the body unread


async def read_body(request: Request, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> bytes:
    """The raw body, refused (413/3006) as soon as it is known to exceed `max_bytes`: from `Content-Length` before
    reading anything, else while reading (chunked uploads, or a header that lies). A client that leaves before all
    of it is sent is 408/3008, aborted, as one that leaves while waiting for its answer (nobody reads either)."""
    declared = request.headers.get("content-length", "").strip()
    if declared.isascii() and declared.isdigit() and (len(declared) > 18 or int(declared) > max_bytes):
        raise ApiError(REQUEST_TOO_LARGE, headers=CLOSE)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > max_bytes:
                raise ApiError(REQUEST_TOO_LARGE, headers=CLOSE)
            chunks.append(chunk)
    except ClientDisconnect:  # the client left: aborted, as one that leaves while waiting for its answer
        raise ApiError(REQUEST_ABORTED) from None
    return b"".join(chunks)


def parse_json_body(raw: bytes) -> Any:
    """JSON whatever the Content-Type; empty → 3003; not UTF-8, not JSON (NaN, Infinity, 1e400 and integers of
    more than MAX_INTEGER_DIGITS digits included), nested deeper than MAX_JSON_DEPTH or holding a lone UTF-16
    surrogate escape → 5006."""
    if not raw.strip():
        raise ApiError(INCOMPLETE_REQUEST, what="body")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ApiError(BAD_INPUT, detail=f"the request body is not valid UTF-8 ({err.reason} at byte {err.start})"
                       ) from None
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_int=_bounded_int, parse_float=_finite_float)
    except (ValueError, RecursionError) as err:
        raise ApiError(BAD_INPUT, detail=f"the request body is not valid JSON ({err})") from None
    if _deeper_than(value, MAX_JSON_DEPTH):
        raise ApiError(BAD_INPUT, detail=f"the request body nests arrays and objects more than {MAX_JSON_DEPTH} deep")
    try:  # "\ud800" is valid JSON but not Unicode: nothing downstream (tokenizer, logs) could use it
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as err:
        bad = err.object[err.start:err.end].encode("unicode_escape").decode("ascii")
        raise ApiError(BAD_INPUT, detail=f"the request body is not valid Unicode (lone surrogate {bad})") from None
    return value


def _deeper_than(value: Any, limit: int) -> bool:
    """Whether arrays and objects nest more than `limit` deep in `value` (a top-level object is depth 1): a walk
    without recursion, a level at a time over the containers only (0.07 s for 300,000 of them)."""
    level, depth = ([value] if type(value) in (dict, list) else []), 1
    while level:
        inner: list[Any] = []
        for node in level:
            inner += [c for c in (node.values() if type(node) is dict else node) if type(c) is dict or type(c) is list]
        if inner and depth >= limit:
            return True
        level, depth = inner, depth + 1
    return False


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _bounded_int(literal: str) -> int:
    digits = len(literal.lstrip("-"))
    if digits > MAX_INTEGER_DIGITS:
        raise ValueError(f"an integer of {digits} digits is too large (at most {MAX_INTEGER_DIGITS})")
    return int(literal)


def _finite_float(literal: str) -> float:
    value = float(literal)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"the number {literal[:40]} is out of range")
    return value


# --- wording ----------------------------------------------------------------------------------------------------


def pointer(path: Iterable[Any]) -> str:
    """A JSON pointer (`/messages/0/content`) for a path of keys and indices."""
    return "/" + "/".join(str(p).replace("~", "~0").replace("/", "~1") for p in path)


def field_path(path: Iterable[Any]) -> str:
    """A field as OpenAI's clients name it (`messages[0].content`); `body` for the body itself."""
    text = ""
    for part in path:
        if isinstance(part, int):
            text += f"[{part}]"
        else:
            text += f".{part}" if text else str(part)
    return text or "body"


@dataclass(frozen=True)
class Wording:
    """How a complaint names its place in the body (`locate`), and whether, of a `oneOf` whose branches each require
    their own properties, it reports only the branch the body chose (the one whose required properties it has)."""

    locate: Callable[[Sequence[Any]], str]
    chosen_branch: bool


WORKERS_AI_WORDING = Wording(pointer, chosen_branch=False)  # Workers AI's validator: every branch, JSON pointers
OPENAI_WORDING = Wording(field_path, chosen_branch=True)


def json_type(value: Any) -> str:
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


def type_mismatch(where: str, expected: str | Sequence[str], value: Any) -> str:
    wanted = expected if isinstance(expected, str) else "' or '".join(expected)
    return f"Type mismatch of '{where}', '{wanted}' not in '{json_type(value)}'"


def schema_error_detail(validator: jsonschema.protocols.Validator, instance: Any,
                        wording: Wording = WORKERS_AI_WORDING) -> tuple[str, str | None] | None:
    """The first violation of a card's JSON Schema by `instance`, worded like Workers AI's (or as `wording` says),
    and the top-level field it is about (OpenAI's `param`); None when valid."""
    error = next(iter(validator.iter_errors(instance)), None)
    if error is None:
        return None
    if wording.chosen_branch:
        error = _chosen_branch(error)
    return _describe(error, validator, wording), top_field(error.absolute_path)


def _chosen_branch(error: jsonschema.ValidationError) -> jsonschema.ValidationError:
    """The first complaint of the `oneOf`/`anyOf` branch the instance chose: the one branch that does not miss a
    property it requires (`messages` for a chat); `error` itself when that is not one branch."""
    while error.validator in ("oneOf", "anyOf") and error.context:
        branches: dict[Any, list[jsonschema.ValidationError]] = {}
        for sub in error.context:
            branches.setdefault(sub.relative_schema_path[0], []).append(sub)
        chosen = [subs for subs in branches.values()
                  if not any(s.validator == "required" and s.absolute_path == error.absolute_path for s in subs)]
        if len(chosen) != 1:
            break
        error = chosen[0][0]
    return error


def top_field(path: Iterable[Any]) -> str | None:
    """The body's field a problem at `path` is in (`messages` for `/messages/1/content`); None for the body."""
    first = next(iter(path), None)
    return first if isinstance(first, str) else None


def _describe(error: jsonschema.ValidationError, validator: jsonschema.protocols.Validator, wording: Wording) -> str:
    where = wording.locate(error.absolute_path)
    keyword, expected, instance = error.validator, error.validator_value, error.instance
    if keyword == "required":
        missing = [p for p in expected if isinstance(instance, dict) and p not in instance]
        return f"required properties at '{where}' are " + ", ".join(f"'{p}'" for p in missing)
    if keyword == "type":
        return type_mismatch(where, expected, instance)
    if keyword in ("oneOf", "anyOf"):
        matches = sum(1 for branch in expected if validator.evolve(schema=branch).is_valid(instance))
        text = f"{keyword} at '{where}' not met, {matches} matches"
        if error.context:  # each branch's complaints, in order; the same complaint from two branches once
            text += ": " + ", ".join(dict.fromkeys(_describe(sub, validator, wording) for sub in error.context))
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

        def inside(key: str) -> str:  # Workers AI's words join the pointer and the key as they are
            if wording is WORKERS_AI_WORDING:
                return f"{where.rstrip('/')}/{key}"
            return wording.locate([*error.absolute_path, key])

        return ", ".join(f"Additional or unevaluated properties '{inside(k)}' at '{where}' not allowed" for k in extra)
    return f"{error.message} at '{where}'"


# pydantic's error types → the JSON type the field wanted
# pydantic's error types that say "not of this type" → the JSON type expected
EXPECTED_TYPES = {"int_type": "integer", "int_from_float": "integer", "float_type": "number",
                   "bool_type": "boolean", "string_type": "string", "list_type": "array", "dict_type": "object",
                   "model_type": "object", "model_attributes_type": "object"}


def validation_error_detail(error: ValidationError, wording: Wording = WORKERS_AI_WORDING) -> str:
    """The first problem pydantic found, in Workers AI's words (`Value at '/top_k' must be between 1 and 50, got
    51`); errors raised by our own validators carry their words in their message."""
    first = error.errors(include_url=False)[0]
    where, kind, value = wording.locate(first["loc"]), first["type"], first.get("input")
    if kind in EXPECTED_TYPES:
        return type_mismatch(where, EXPECTED_TYPES[kind], value)
    if kind == "out_of_range":
        return f"Value at '{where}' {first['msg']}, got {json.dumps(value)}"
    if kind == "string_too_long":
        return f"String at '{where}' is longer than {first['ctx']['max_length']} characters ({len(value)})"
    if kind == "string_too_short":
        return f"String at '{where}' is shorter than {first['ctx']['min_length']} characters ({len(value)})"
    if kind == "too_long":
        return f"Array at '{where}' must have at most {first['ctx']['max_length']} items ({len(value)})"
    if kind == "literal_error":
        return f"Value at '{where}' must be one of {first['ctx']['expected']}"
    if kind == "extra_forbidden":
        return f"unsupported field '{where.lstrip('/')}'"
    return f"{first['msg']} at '{where}'"
