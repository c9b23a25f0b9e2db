"""Workers AI's sampling parameters, and what a card's input schema declares of them.

The seed's card (2023) lists none of `temperature`, `top_p`, ... that today's Workers AI schema for the model accepts;
`WORKERS_AI_PARAMETERS` holds them with Workers AI's ranges, and a card may declare any of them with its own range
and default, which win (`sampling_parameters`). The card's loader checks those defaults against the result, and the
service builds its request model from the same table, so both read one definition.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["DEFAULT_TEMPERATURE", "WORKERS_AI_PARAMETERS", "declared_properties", "sampling_parameters",
           "schema_branches"]

DEFAULT_TEMPERATURE = 0.6  # Workers AI's default for this model when the card declares none
# today's Workers AI schema for this model: sampling parameters the seed's card does not list (a card may)
WORKERS_AI_PARAMETERS: dict[str, dict[str, Any]] = {
    "temperature": {"type": "number", "minimum": 0, "maximum": 5, "default": DEFAULT_TEMPERATURE},
    "top_p": {"type": "number", "minimum": 0.001, "maximum": 1},
    "top_k": {"type": "integer", "minimum": 1, "maximum": 50},
    "seed": {"type": "integer", "minimum": 1, "maximum": 9_999_999_999},
    "repetition_penalty": {"type": "number", "minimum": 0, "maximum": 2},
    "frequency_penalty": {"type": "number", "minimum": -2, "maximum": 2},
    "presence_penalty": {"type": "number", "minimum": -2, "maximum": 2},
}


def schema_branches(schema: Mapping[str, Any]) -> Iterator[tuple[tuple[str | int, ...], Mapping[str, Any]]]:
    """The schema itself and its direct oneOf/anyOf/allOf branches (where cards list their properties), each with
    its path in the schema."""
    yield (), schema
    for key in ("oneOf", "anyOf", "allOf"):
        branches = schema.get(key)
        if isinstance(branches, list):
            yield from (((key, i), b) for i, b in enumerate(branches) if isinstance(b, Mapping))


def declared_properties(schema: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The property specs of the schema and its direct branches, merged by name (a later branch's keys win)."""
    out: dict[str, dict[str, Any]] = {}
    for _, branch in schema_branches(schema):
        properties = branch.get("properties")
        for name, spec in (properties.items() if isinstance(properties, Mapping) else ()):
            if isinstance(spec, Mapping):
                out.setdefault(name, {}).update(spec)
    return out


def sampling_parameters(schema: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Each of `WORKERS_AI_PARAMETERS` as a request meets it: Workers AI's spec with the card's declaration over it
    (its `type`, `minimum`, `maximum`, `default`)."""
    declared = declared_properties(schema)
    return {name: {**spec, **declared.get(name, {})} for name, spec in WORKERS_AI_PARAMETERS.items()}
