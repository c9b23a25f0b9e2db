"""The chat templates a card may name (its `prompt_template` property), by name.

Each served model renders `prompt` and `messages` with its own template, as Workers AI's catalog gives each model
one (`llama2` for the seed's card, `chatml` for SmolLM2). The card only names it; this table says which names this
build can render, and `serve` refuses at start a card naming one it cannot (a clear error, not a 500 later). The
renderers themselves are the engine's (`engine/chat_template.py`): this module only looks them up, so that the
service and the command line ask one place. A card may also give the system prompt of `prompt`-mode requests
(`default_context`, as Workers AI's catalog does): `render_prompt` applies it.

A template that renders may still write control tokens (chatml's `<|im_start|>`) that the served model's tokenizer
lacks: `missing_control_token` finds that with the tokenizer `serve` builds while checking each model's files
(startup.prepare), so that it stops before it loads or listens (every model, whatever the flags) instead of answering
every request 500.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .engine.chat_template import TEMPLATES, ChatTemplate, Control, Segment

if TYPE_CHECKING:
    from .engine.tokenizer import AnyTokenizer

__all__ = ["TEMPLATES", "PromptTemplate", "UnknownTemplateError", "missing_control_token", "render_prompt",
           "template_named"]


PromptTemplate = ChatTemplate  # name, render_prompt(prompt, raw), render_messages(messages)


class UnknownTemplateError(ValueError):
    """A card names a template this build cannot render."""


def template_named(name: str) -> PromptTemplate:
    """The template called `name`, else `UnknownTemplateError` naming the ones there are."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise UnknownTemplateError(f"unknown prompt template {name!r} (known: {', '.join(sorted(TEMPLATES))})"
                                   ) from None


def render_prompt(template: PromptTemplate, prompt: str, raw: bool = False, system: str | None = None
                  ) -> list[Segment]:
    """A `prompt`-mode request: as it is with `raw`; else `[system, user: prompt]` rendered as messages, where
    `system` is the card's `default_context` (None: the template's own default system prompt; "": none)."""
    if raw or system is None:
        return template.render_prompt(prompt, raw)
    user = {"role": "user", "content": prompt}
    return template.render_messages([{"role": "system", "content": system}, user] if system else [user])


def missing_control_token(tokenizer: AnyTokenizer, template: PromptTemplate, system: str | None = None) -> str | None:
    """The first control token (e.g. `'<|im_start|>'`) that `template` writes and `tokenizer` has no id for, else
    None. What is encoded is what requests render: a `prompt` with the card's `default_context` (`system`) and a chat
    with a system, a user and an assistant turn."""
    chat = [{"role": "system", "content": "Hi"}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hi"}, {"role": "user", "content": "Hi"}]
    for rendering in (render_prompt(template, "Hi", False, system), template.render_messages(chat)):
        for end, segment in enumerate(rendering, 1):
            if isinstance(segment, Control) and not _encodes(tokenizer, rendering[:end]):
                return segment.value
    return None


def _encodes(tokenizer: AnyTokenizer, segments: list[Segment]) -> bool:
    try:
        tokenizer.encode_segments(segments)
    except ValueError:  # the tokenizer's "no control token ...: this model does not use the template that wrote it"
        return False
    return True
