"""Prompt templates per model, exactly as Workers AI renders them: ``llama2`` and ``chatml``.

Workers AI clients send either a bare ``prompt`` or a list of chat ``messages``; the model only ever
sees one prompt string. This module reproduces the ``llama2`` template of Cloudflare's own templating
code (``@cloudflare/ai`` 1.0.53, ``generateTgTemplate``) so that the same request gives
the same prompt here as on Workers AI:

* only ``system``, ``user`` and ``assistant`` messages are rendered; any other role is dropped;
* the first user turn after a single system message continues the ``[INST] <<SYS>>`` block
  (``CARRY_SYSTEM_INST``: the user's ``<s>[INST] `` prefix is omitted when exactly one system and
  one user message have been seen);
* content is neither stripped nor validated, and role alternation is not checked.

The rendered prompt is a list of *segments*: text (``str``) or a :class:`Control` marker. The
``<s>``/``</s>`` that the template writes become :data:`Control.BOS`/:data:`Control.EOS`, which the
tokenizer maps to control ids, while the same characters typed by a user inside a message stay
ordinary text. That way a user cannot forge turn boundaries by typing ``</s><s>[INST]``.
A *raw* prompt (``"raw": true``, every ``/v1/completions`` prompt) is the other way round: it is written in the
model's own format ("you must adhere to the specific model's expected formatting", §6.1), so it is one
:class:`RawText` segment, whose control tokens the tokenizer parses (``<s>``, ``</s>``, ``<|im_start|>``: their
ids, as Hugging Face's tokenizers, TGI, vLLM and llama.cpp read a raw prompt). There is no template to protect.
:func:`segments_to_text` gives back the literal string Workers AI's documentation shows.

Models name their template as Workers AI's catalog does (``promptTemplate``); :func:`get_template` gives it by name.
``chatml`` (SmolLM2, ...) writes ``<|im_start|>role\ncontent<|im_end|>\n`` for each system, user and assistant
message (other roles dropped, content untouched, as for ``llama2``), then the generation prompt
``<|im_start|>assistant\n``; its ``<|im_start|>``/``<|im_end|>`` are controls like ``<s>``/``</s>``. In ``prompt``
mode both templates add Workers AI's default system prompt (``chatDefaultContext``), as the catalog's
``defaultContext`` does for llama2; that Workers AI does the same for its chatml models is not confirmed by the
published code we have (docs: ../shared/reference/workers-ai-contract.md §6.1 covers llama2 only).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "TEMPLATES",
    "ChatTemplate",
    "Control",
    "RawText",
    "Segment",
    "get_template",
    "render_chatml_messages",
    "render_messages",
    "render_prompt",
    "segments_to_text",
]

#: ``chatDefaultContext`` of the Workers AI catalog entry: the system prompt used in ``prompt`` mode.
DEFAULT_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)


class Control(enum.Enum):
    """A control token produced by the template; the value is its literal spelling."""

    BOS = "<s>"  # the tokenizer's BOS id
    EOS = "</s>"  # the tokenizer's EOS id
    IM_START = "<|im_start|>"  # ChatML: the special tokens of these spellings
    IM_END = "<|im_end|>"


class RawText(str):
    """A raw prompt's text, in the model's own format: the tokenizer reads the control tokens spelled in it (a plain
    ``str`` segment, a message's text, keeps them as text)."""

    __slots__ = ()


#: One piece of a rendered prompt: literal text (plain, or :class:`RawText`) or a control token.
Segment = str | Control

# The ``llama2`` template of Workers AI: role -> (pre, post), with ``<s>``/``</s>`` as controls.
_SYSTEM_PRE: tuple[Segment, ...] = ("[INST] <<SYS>>\n",)
_SYSTEM_POST: tuple[Segment, ...] = ("\n<</SYS>>\n\n",)
_USER_PRE: tuple[Segment, ...] = (Control.BOS, "[INST] ")
_USER_POST: tuple[Segment, ...] = (" [/INST]",)
_ASSISTANT_PRE: tuple[Segment, ...] = (" ",)
_ASSISTANT_POST: tuple[Segment, ...] = (Control.EOS,)

def render_messages(messages: Sequence[Mapping[str, Any]]) -> list[Segment]:
    """Render chat ``messages`` with the Workers AI ``llama2`` template.

    Messages with a role other than system/user/assistant are dropped. Adjacent text is merged,
    so the result alternates between non-empty strings and :class:`Control` markers.
    """
    pieces: list[Segment] = []
    system_count = 0
    user_count = 0
    for message in messages:
        role = message.get("role")
        if role == "system":
            system_count += 1
            pieces += (*_SYSTEM_PRE, _content_text(message), *_SYSTEM_POST)
        elif role == "user":
            user_count += 1
            carry_system_inst = system_count == 1 and user_count == 1
            pieces += (*(() if carry_system_inst else _USER_PRE), _content_text(message), *_USER_POST)
        elif role == "assistant":
            pieces += (*_ASSISTANT_PRE, _content_text(message), *_ASSISTANT_POST)
    return _merged(pieces)


def render_chatml_messages(messages: Sequence[Mapping[str, Any]]) -> list[Segment]:
    """Render chat ``messages`` with the ``chatml`` template, ending with the generation prompt."""
    pieces: list[Segment] = []
    for message in messages:
        role = message.get("role")
        if role in ("system", "user", "assistant"):
            pieces += (Control.IM_START, f"{role}\n", _content_text(message), Control.IM_END, "\n")
    pieces += (Control.IM_START, "assistant\n")
    return _merged(pieces)


def render_prompt(prompt: str, raw: bool = False) -> list[Segment]:
    """Render a ``prompt``-mode request.

    With ``raw`` the prompt goes to the model as it is, one :class:`RawText` (its ``<s>``/``</s>`` are BOS/EOS).
    Otherwise it becomes ``[system: DEFAULT_SYSTEM_PROMPT, user: prompt]`` rendered as messages.
    """
    if raw:
        return [RawText(prompt)] if prompt else []
    return render_messages([{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": prompt}])


@dataclass(frozen=True)
class ChatTemplate:
    """A prompt template by its catalog name: messages (or a bare prompt) -> segments."""

    name: str
    render_messages: Callable[[Sequence[Mapping[str, Any]]], list[Segment]]
    end_of_turn: Control  # the control a reply ends with (it stops generation)

    def render_prompt(self, prompt: str, raw: bool = False,
                      system: str | None = DEFAULT_SYSTEM_PROMPT) -> list[Segment]:
        """A ``prompt``-mode request: as is with ``raw`` (one :class:`RawText`), else ``[system, user: prompt]``
        rendered as messages (``[user: prompt]`` alone with ``system=None``)."""
        if raw:
            return [RawText(prompt)] if prompt else []
        user = {"role": "user", "content": prompt}
        return self.render_messages([{"role": "system", "content": system}, user] if system is not None else [user])


TEMPLATES = {
    "llama2": ChatTemplate("llama2", render_messages, Control.EOS),
    "chatml": ChatTemplate("chatml", render_chatml_messages, Control.IM_END),
}


def get_template(name: str) -> ChatTemplate:
    """The template Workers AI's catalog calls `name` (``promptTemplate``); ValueError for an unknown one."""
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown prompt template {name!r} (known: {', '.join(TEMPLATES)})") from None


def segments_to_text(segments: Iterable[Segment]) -> str:
    """Join segments into one string, writing controls literally as ``<s>`` / ``</s>``."""
    return "".join(seg.value if isinstance(seg, Control) else seg for seg in segments)


def _content_text(message: Mapping[str, Any]) -> str:
    """Return a message's content, which must be a string (the services join OpenAI's text parts before)."""
    if "content" not in message:
        raise ValueError(f"message with role {message.get('role')!r} has no 'content'")
    content = message["content"]
    if isinstance(content, str):
        return content
    raise ValueError(f"message content must be a string, not {type(content).__name__}")


def _merged(pieces: Sequence[Segment]) -> list[Segment]:
    """`pieces` with adjacent text joined and empty text dropped, in linear time (one join per run of text)."""
    out: list[Segment] = []
    run: list[str] = []
    for piece in pieces:
        if isinstance(piece, Control):
            if run:
                out.append("".join(run))
                run = []
            out.append(piece)
        elif piece:
            run.append(piece)
    if run:
        out.append("".join(run))
    return [seg for seg in out if seg != ""]
