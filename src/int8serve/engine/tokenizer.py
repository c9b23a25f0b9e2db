"""The Llama tokenizer: SentencePiece ids for text and for rendered chat templates; `load_tokenizer` for any model.

`load_tokenizer(path)` gives the tokenizer a model's files name: a SentencePiece ``tokenizer.model`` (this module's
:class:`Tokenizer`) or a byte-level BPE ``tokenizer.json`` (:class:`~int8serve.engine.bpe_tokenizer.BPETokenizer`,
SmolLM2). Both give the same interface: ``encode``, ``encode_segments``, ``decode``, ``detokenizer()``, ``bos_id``,
``add_bos``, ``eos_id``, ``stop_ids``, ``token_id``, ``vocab_size``.

The engine needs three things from a tokenizer: ids for a prompt rendered by
:mod:`int8serve.engine.chat_template`, text for generated ids (whole, and streamed with
:class:`~int8serve.engine.detokenizer.IncrementalDetokenizer`), and the BOS/EOS ids. This wraps
``sentencepiece.SentencePieceProcessor`` loaded from a ``tokenizer.model`` file.

How a rendered template becomes ids (:meth:`Tokenizer.encode_segments`) -- facts checked against
the Hugging Face ``tokenizer.json`` of Llama 2 and stories260K (``tokenizers`` 0.23):

* HF splits the text on its special tokens ``<s>``/``</s>``/``<unk>`` first and normalizes each
  piece between them separately, so every such piece gets its own ``▁`` dummy prefix
  (``</s><s>[INST]`` gives ``▁[``, id 518, like Meta's per-turn encoding). Encoding each text
  segment with SentencePiece (which adds the dummy prefix per call) therefore gives the same ids.
  Adjacent text must be one segment for this to hold; the template merges it.
* HF's post-processor always prepends BOS, so a template starting with ``<s>`` (messages without a
  system prompt) gets *two* BOS from ``tokenizer(text)``. We emit exactly one, as Workers AI
  recommends (§6.1) and as Meta's reference encoder does; this is the only difference from
  ``hf.encode(text)``, and it equals ``hf.encode(text, add_special_tokens=False)`` in that case.
* HF turns ``<s>``/``</s>``/``<unk>`` typed *inside user content* into control ids as well; we do
  not (the template marks its own controls as :class:`~int8serve.engine.chat_template.Control`),
  so a user cannot forge turn boundaries. Plain text gives identical ids in SentencePiece, in HF
  with ``encode_special_tokens = True``, and here.
* A raw prompt (:class:`~int8serve.engine.chat_template.RawText`) is in the model's own format, and is read as HF
  reads it: split on the model's special pieces (its control pieces, ``<s>``/``</s>``, and its unknown piece
  ``<unk>``: HF's special tokens, spelled as the model spells them), each one its id, each piece of text between
  encoded on its own. One BOS: a prompt that starts with its own ``<s>`` gets no second one.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path

import sentencepiece

from int8serve.engine.bpe_tokenizer import BPETokenizer
from int8serve.engine.chat_template import Control, RawText, Segment
from int8serve.engine.detokenizer import IncrementalDetokenizer, PieceTable
from int8serve.engine.errors import CheckpointError

__all__ = ["AnyTokenizer", "Tokenizer", "load_tokenizer"]


class Tokenizer:
    """A SentencePiece tokenizer loaded from a ``tokenizer.model`` file."""

    def __init__(self, model_path: str | Path) -> None:
        self.path = Path(model_path)
        self._sp = _load(self.path)
        if self._sp.bos_id() < 0 or self._sp.eos_id() < 0:
            raise ValueError(f"{self.path}: the tokenizer model defines no BOS or no EOS piece")

    @property
    def bos_id(self) -> int:
        """Id of ``<s>``, the beginning-of-sequence control token."""
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        """Id of ``</s>``, the end-of-sequence control token."""
        return self._sp.eos_id()

    @property
    def add_bos(self) -> bool:
        """Sequences start with BOS (Llama 2 and stories260K were trained so)."""
        return True

    @property
    def stop_ids(self) -> frozenset[int]:
        """The ids that end a reply: EOS."""
        return frozenset({self.eos_id})

    def token_id(self, token: str) -> int | None:
        """The id of the piece spelled `token`, or None."""
        index = self._sp.piece_to_id(token)
        return None if index == self._sp.unk_id() and token != self._sp.id_to_piece(index) else index

    @property
    def vocab_size(self) -> int:
        """Number of pieces, i.e. one more than the largest valid id."""
        return self._sp.get_piece_size()

    @property
    def processor(self) -> sentencepiece.SentencePieceProcessor:
        """The underlying SentencePiece processor (read-only use)."""
        return self._sp

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """SentencePiece ids of ``text``, optionally after BOS. Typed ``<s>`` stays text."""
        ids = self._sp.encode(text)
        return [self.bos_id, *ids] if bos else ids

    def encode_segments(self, segments: Iterable[Segment]) -> list[int]:
        """Ids of a rendered template: exactly one leading BOS, controls as ids, text encoded.

        A BOS marker at the very start is the leading BOS itself, not a second one. Later markers
        (the ``</s><s>`` between turns) become their ids. A raw prompt's special pieces are their ids,
        its own leading ``<s>`` being the leading BOS.
        """
        ids = [self.bos_id]
        for index, segment in enumerate(segments):
            if segment is Control.BOS:
                if index > 0:
                    ids.append(self.bos_id)
            elif segment is Control.EOS:
                ids.append(self.eos_id)
            elif isinstance(segment, RawText):
                raw = self._encode_raw(segment)
                ids.extend(raw[1:] if index == 0 and raw[:1] == [self.bos_id] else raw)
            elif isinstance(segment, str):
                ids.extend(self._sp.encode(segment))
            elif isinstance(segment, Control):
                raise ValueError(f"{self.path}: no control token {segment.value!r}: this model does not use the "
                                 "template that wrote it")
            else:
                raise TypeError(f"a segment is a str or a Control, not {type(segment).__name__}")
        return ids

    def _encode_raw(self, text: str) -> list[int]:
        """Ids of a raw prompt's text: its special pieces as their ids, the text between them encoded."""
        ids: list[int] = []
        for index, part in enumerate(self._special_spelling.split(text)):
            if index % 2:  # a special piece (the pattern's one group)
                ids.append(self._special_pieces[part])
            elif part:
                ids.extend(self._sp.encode(part))
        return ids

    @cached_property
    def _special_pieces(self) -> dict[str, int]:
        """The pieces a raw prompt may spell to get their ids, as HF's tokenizer.json makes them special tokens: BOS,
        EOS and the other control pieces, and the unknown piece (``<s>``, ``</s>``, ``<unk>``), spelled as the model
        spells them."""
        sp = self._sp
        special = {sp.bos_id(), sp.eos_id(), *(i for i in range(sp.get_piece_size())
                                               if sp.is_control(i) or sp.is_unknown(i))}
        return {piece: index for index in sorted(special) if (piece := sp.id_to_piece(index))}

    @cached_property
    def _special_spelling(self) -> re.Pattern[str]:
        """Any special piece, the longest where several start at one place (HF's matching), as the one group."""
        spellings = sorted(self._special_pieces, key=len, reverse=True)
        return re.compile("(" + "|".join(map(re.escape, spellings)) + ")")

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``, exactly as ``SentencePieceProcessor.decode`` gives it."""
        return self._sp.decode(list(ids))

    def detokenizer(self, after: Sequence[int] = ()) -> IncrementalDetokenizer:
        """A fresh streaming detokenizer for one sequence (the piece table is shared); with `after` (a raw prompt's
        ids) its text continues theirs: the first piece keeps its leading space."""
        return IncrementalDetokenizer(self._piece_table, after)

    @cached_property
    def _piece_table(self) -> PieceTable:
        return PieceTable.from_processor(self._sp)

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def _load(path: Path) -> sentencepiece.SentencePieceProcessor:
    """Load a SentencePiece model, with errors that name the file."""
    if not path.exists():
        raise FileNotFoundError(f"{path}: tokenizer model not found")
    if not path.is_file():
        raise ValueError(f"{path}: the tokenizer model is not a file")
    sp = sentencepiece.SentencePieceProcessor()
    try:
        sp.Load(str(path))
    except (RuntimeError, OSError) as exc:
        raise ValueError(f"{path}: not a valid SentencePiece tokenizer model ({exc})") from exc
    return sp


AnyTokenizer = Tokenizer | BPETokenizer


def load_tokenizer(path: str | Path) -> AnyTokenizer:
    """The tokenizer in the file `path`: SentencePiece for a ``.model`` file, byte-level BPE for a ``.json`` one.

    Raises CheckpointError for a file that is not a usable tokenizer (garbage, empty, cut short)."""
    path = Path(path)
    try:
        return BPETokenizer(path) if path.suffix == ".json" else Tokenizer(path)
    except ValueError as err:  # a damaged or foreign file: a CheckpointError (a ValueError) that names it
        if isinstance(err, CheckpointError):
            raise
        message = str(err) if str(path) in str(err) else f"{path}: {err}"
        raise CheckpointError(message) from err

