"""The Llama 2 chat template, exactly as Workers AI renders it.

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
:func:`segments_to_text` gives back the literal string Workers AI's documentation shows.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

__all__ = [
    "DEFAULT_SYSTEM_PROMPT",
    "Control",
    "Segment",
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

    BOS = "<s>"
    EOS = "</s>"


#: One piece of a rendered prompt: literal text or a control token.
Segment = str | Control

# The ``llama2`` template of Workers AI: role -> (pre, post), with ``<s>``/``</s>`` as controls.
_SYSTEM_PRE: tuple[Segment, ...] = ("[INST] <<SYS>>\n",)
_SYSTEM_POST: tuple[Segment, ...] = ("\n<</SYS>>\n\n",)
_USER_PRE: tuple[Segment, ...] = (Control.BOS, "[INST] ")
_USER_POST: tuple[Segment, ...] = (" [/INST]",)
_ASSISTANT_PRE: tuple[Segment, ...] = (" ",)
_ASSISTANT_POST: tuple[Segment, ...] = (Control.EOS,)

# Text parts of a list-valued ``content`` are concatenated as they are: the template adds nothing
# the client did not send (no separator), in the same spirit as "content is not stripped".
_CONTENT_PART_SEPARATOR = ""


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


def render_prompt(prompt: str, raw: bool = False) -> list[Segment]:
    """Render a ``prompt``-mode request.

    With ``raw`` the prompt goes to the model untouched (as text: a typed ``<s>`` stays text).
    Otherwise it becomes ``[system: DEFAULT_SYSTEM_PROMPT, user: prompt]`` rendered as messages.
    """
    if raw:
        return [prompt] if prompt else []
    return render_messages([{"role": "system", "content": DEFAULT_SYSTEM_PROMPT}, {"role": "user", "content": prompt}])


def segments_to_text(segments: Iterable[Segment]) -> str:
    """Join segments into one string, writing controls literally as ``<s>`` / ``</s>``."""
    return "".join(seg.value if isinstance(seg, Control) else seg for seg in segments)


def _content_text(message: Mapping[str, Any]) -> str:
    """Return a message's content as one string (a list of text parts is concatenated)."""
    if "content" not in message:
        raise ValueError(f"message with role {message.get('role')!r} has no 'content'")
    content = message["content"]
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return _CONTENT_PART_SEPARATOR.join(_part_text(part) for part in content)
    raise ValueError(f"message content must be a string or a list of text parts, not {type(content).__name__}")


def _part_text(part: Any) -> str:
    """Return the text of one ``{"type": "text", "text": ...}`` content part."""
    if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(part.get("text"), str):
        return part["text"]
    raise ValueError(f"unsupported content part (only {{'type': 'text', 'text': str}} is accepted): {part!r}")


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
