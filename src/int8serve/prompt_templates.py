"""The chat templates a card may name (its `prompt_template` property), by name.

Each served model renders `prompt` and `messages` with its own template, as Workers AI's catalog gives each model
one (`llama2` for the seed's card, `chatml` for SmolLM2). The card only names it; this table says which names this
build can render, and `serve` refuses at start a card naming one it cannot (a clear error, not a 500 later). The
renderers themselves are the engine's (`engine/chat_template.py`): this module only looks them up, so that the
service and the command line ask one place.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .engine import chat_template
from .engine.chat_template import Segment

__all__ = ["TEMPLATES", "PromptTemplate", "UnknownTemplateError", "template_named"]


@dataclass(frozen=True)
class PromptTemplate:
    """How one template renders a `prompt`-mode request (raw or not) and a list of chat messages into segments."""

    name: str
    render_prompt: Callable[[str, bool], list[Segment]]
    render_messages: Callable[[Sequence[Mapping[str, Any]]], list[Segment]]


TEMPLATES: dict[str, PromptTemplate] = {
    "llama2": PromptTemplate("llama2", chat_template.render_prompt, chat_template.render_messages),
    # "chatml" (SmolLM2) comes with the engine's ChatML renderer (issue 15, the engine half)
}


class UnknownTemplateError(ValueError):
    """A card names a template this build cannot render."""


def template_named(name: str) -> PromptTemplate:
    """The template called `name`, else `UnknownTemplateError` naming the ones there are."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise UnknownTemplateError(f"unknown prompt template {name!r} (known: {', '.join(sorted(TEMPLATES))})"
                                   ) from None
