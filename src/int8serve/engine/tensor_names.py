"""The model's own tensor names (`layers.0.attention.wq.weight`, as Meta's checkpoints name them), from those of
another checkpoint format: a table of (pattern, replacement) per format (Hugging Face's in model_files.py, GGUF's in
gguf_file.py), read the one way here."""

from __future__ import annotations

import re
from collections.abc import Sequence

__all__ = ["NameTable", "model_name"]

# (a pattern a whole tensor name matches, the model's name for it: `\1` is the pattern's first group)
NameTable = Sequence[tuple[str, str]]


def model_name(name: str, table: NameTable) -> str | None:
    """The model's name for the tensor `name`, by the first pattern of `table` it matches whole; None if none does
    (a tensor the model has no use for)."""
    for pattern, replacement in table:
        match = re.fullmatch(pattern, name)
        if match is not None:
            return match.expand(replacement)
    return None
