"""pydantic's complaints about an OpenAI body, as one sentence about what the client sent.

pydantic checks a value against each member of a union (`stop: str | list[str]`) and reports every member's
failure, each located under the member's tag: `stop.constrained-str`, `messages.0.content.list[TextPart].0.type`.
Reporting the first of them tells a client that sent a list of stop sequences that its value "should be a valid
string", naming a tag it never wrote. Here the tags are taken out of the locations (a location is followed through
the body itself: what is not a key or an index of the value there is a tag), and of a union's members the one the
value's type matched speaks: its complaint is about what is inside the value, where the others only say the value
is not of their type. When no member matched, the sentence names every type the field takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from .body import EXPECTED_TYPES, field_path, json_type, top_field

__all__ = ["Problem", "openai_detail", "problems"]

# pydantic's error types that say "not of this type" → the type, as the sentence names it ("an array")
TYPE_NAMES = {kind: f"{'an' if name[0] in 'aeiou' else 'a'} {name}" for kind, name in EXPECTED_TYPES.items()}
UNSUPPORTED_WHEN_GIVEN = ("tools", "functions", "logit_bias")  # accepted empty only


@dataclass(frozen=True)
class Problem:
    """One of pydantic's complaints, located in the body (no union tags)."""

    path: tuple[str | int, ...]
    kind: str
    message: str
    context: dict[str, Any]
    value: Any
    wrong_type: bool  # a union member refused the value's own type (its complaint says nothing inside the value)

    @property
    def field(self) -> str:
        return field_path(self.path)


def problems(err: ValidationError, body: Any) -> list[Problem]:
    """`err`'s complaints about `body`, in pydantic's order, located in the body."""
    out = []
    for error in err.errors(include_url=False):
        path, tagged_last = _located(error["loc"], body, missing=error["type"] == "missing")
        out.append(Problem(path=path, kind=error["type"], message=error["msg"], context=dict(error.get("ctx") or {}),
                           value=error.get("input"), wrong_type=tagged_last and error["type"] in TYPE_NAMES))
    return out


def _located(loc: Sequence[str | int], body: Any, missing: bool) -> tuple[tuple[str | int, ...], bool]:
    """`loc` without union tags, following `body`; and whether the last element was a tag (the complaint is about
    the value itself, against one member)."""
    path: list[str | int] = []
    value, tagged_last = body, False
    for index, part in enumerate(loc):
        last = index == len(loc) - 1
        inside = (isinstance(value, dict) and part in value) or \
            (isinstance(value, list) and isinstance(part, int) and 0 <= part < len(value))
        if inside:
            value = value[part]
        elif not (last and missing and isinstance(value, dict)):  # a missing field is a key the value lacks
            tagged_last = last
            continue
        path.append(part)
    return tuple(path), tagged_last


def openai_detail(err: ValidationError, body: Any) -> tuple[str, str | None]:
    """The sentence for `err` and the top-level field it is about (OpenAI's `param`): every unsupported field if
    there are some, else the most relevant complaint (module docstring)."""
    found = problems(err, body)
    extra = [p for p in found if p.kind == "extra_forbidden"]
    if extra:
        return "unsupported field(s): " + ", ".join(repr(p.field) for p in extra), top_field(extra[0].path)
    relevant = next((p for p in found if not p.wrong_type), None)
    if relevant is None:  # no member of the union took the value's type: name every type it takes
        first = found[0]
        names = dict.fromkeys(TYPE_NAMES[p.kind] for p in found if p.path == first.path)
        return _wrong_type(first.field, " or ".join(names), first.value), top_field(first.path)
    return _sentence(relevant), top_field(relevant.path)


def _sentence(problem: Problem) -> str:
    field, kind = problem.field, problem.kind
    if kind in TYPE_NAMES:
        return _wrong_type(field, TYPE_NAMES[kind], problem.value)
    if kind == "literal_error":
        return f"'{field}' must be {problem.context['expected']} (nothing else is supported), got {problem.value!r}"
    if kind == "too_long" and field in UNSUPPORTED_WHEN_GIVEN:
        return f"'{field}' is not supported by this model"
    if kind == "missing":
        return f"'{field}' is required"
    if kind == "too_short":
        return f"'{field}' must have at least {problem.context['min_length']} item(s), got {len(problem.value)}"
    if kind == "value_error":
        return str(problem.context["error"])
    return f"'{field}': {problem.message}"


def _wrong_type(field: str, expected: str, value: Any) -> str:
    return f"'{field}' must be {expected}, got {json_type(value)}"
