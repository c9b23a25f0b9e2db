"""What the `--model` entries of a command name: which catalog card serves which weights.

`--model` is given as
* `PATH` (a folder, a .gguf file or a Hub id, see `engine/model_source.py`): served under `--served-model-name`,
  by default the seed's card `@cf/meta/llama-2-7b-chat-int8`, as before several models could be served;
* `NAME=PATH`: the weights at PATH served under the catalog card NAME (`serve` takes several of these, each model
  with its own engine, slots and limits);
* the built-in card's name alone (`@hf/huggingfacetb/smollm2-135m-instruct`): the built-in weights under it;
* nothing: the built-in model (`builtin_model.py`) under its own card.
An entry holding `=` that is an existing path is a path. This module only reads the entries (no torch, no catalog):
whether NAME is a card is the catalog's answer, at start-up.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .builtin_model import builtin_model_path
from .engine.model_source import hub_id_of
from .engine.model_source import resolve as resolve_source

__all__ = ["BUILTIN_CARD", "DEFAULT_SERVED_MODEL", "ModelSpec", "ModelSpecError", "parse_model_entry", "resolve_model",
           "served_model_specs"]

DEFAULT_SERVED_MODEL = "@cf/meta/llama-2-7b-chat-int8"  # the card of a plain --model PATH
BUILTIN_CARD = "@hf/huggingfacetb/smollm2-135m-instruct"  # the built-in model's card (builtin_model.py)


class ModelSpecError(ValueError):
    """An entry that names no model, or entries that clash."""


@dataclass(frozen=True)
class ModelSpec:
    """One model to serve: `name` the card (None: the default for a plain path), `source` what `--model` names
    (None: the built-in weights)."""

    name: str | None
    source: str | None

    @property
    def builtin(self) -> bool:
        return self.source is None

    @property
    def fetched(self) -> bool:
        """The built-in model or a Hub id: resolving it may download it (anything else is a path on disk)."""
        return self.source is None or hub_id_of(self.source) is not None


def parse_model_entry(entry: str) -> ModelSpec:
    """One `--model` entry: `PATH`, `NAME=PATH` or the built-in card's name."""
    entry = str(entry).strip()
    if not entry:
        raise ModelSpecError("expected PATH or NAME=PATH, got an empty value")
    if entry == BUILTIN_CARD:
        return ModelSpec(BUILTIN_CARD, None)
    name, sep, source = entry.partition("=")
    if not sep or Path(entry).expanduser().exists():
        return ModelSpec(None, entry)
    name, source = name.strip(), source.strip()
    if not name or not source or re.search(r"\s", name):
        raise ModelSpecError(f"expected NAME=PATH with NAME a catalog model name (e.g. {DEFAULT_SERVED_MODEL}) "
                             f"and PATH a model, got {entry!r}")
    return ModelSpec(name, source)


def served_model_specs(entries: Sequence[str], served_model_name: str | None = None) -> list[ModelSpec]:
    """The models to serve, each with its card's name: no entry is the built-in model; a plain PATH goes under
    `served_model_name` (default: the seed's card). A card named twice, or two plain paths, are errors."""
    specs = [parse_model_entry(entry) for entry in entries] or [ModelSpec(served_model_name or BUILTIN_CARD, None)]
    plain = [spec for spec in specs if spec.name is None]
    if len(plain) > 1:
        raise ModelSpecError(f"{len(plain)} --model values without a NAME=: give each model its card as NAME=PATH "
                             f"(e.g. --model {DEFAULT_SERVED_MODEL}=PATH)")
    named = [spec if spec.name is not None else ModelSpec(served_model_name or DEFAULT_SERVED_MODEL, spec.source)
             for spec in specs]
    seen: set[str] = set()
    for spec in named:
        assert spec.name is not None
        if spec.name in seen:
            raise ModelSpecError(f"the model {spec.name} is given twice: one --model per card")
        seen.add(spec.name)
    return named


def resolve_model(spec: ModelSpec) -> Path:
    """The local folder or file of `spec`'s weights: the built-in model is fetched, a Hub id downloaded."""
    return builtin_model_path() if spec.builtin else resolve_source(spec.source or "")
