"""Streaming detokenization: token ids in, text deltas out, identical to SentencePiece's decode.

A streamed response is sent as a series of text deltas, one (possibly empty) per generated token.
Decoding each token on its own is wrong in two ways: byte-fallback tokens (``<0xE2>``, ``<0x82>``,
``<0xAC>`` for "€") carry one UTF-8 byte each, so a character can span several tokens; and
SentencePiece drops the leading space of the first piece of a text. Re-decoding the whole sequence
at every token fixes both but costs O(n) per token. :class:`IncrementalDetokenizer` does it in O(1)
per token by replaying ``SentencePieceProcessor::Decode`` (sentencepiece 0.2, checked empirically
against ``sentencepiece.SentencePieceProcessor.decode``) one piece at a time:

* Control pieces (``<s>``, ``</s>``) decode to nothing and do not change any state.
* The unknown piece decodes to the model's ``unk_surface`` (" ⁇ " for Llama 2), never stripped.
* Normal pieces decode to the piece with ``▁`` replaced by a space. While no text has been produced
  yet, the first normal piece loses one leading ``▁`` (when the model has ``add_dummy_prefix`` or
  ``remove_extra_whitespaces``). Control tokens before it do not count: ``[<s>, ▁Hi]`` gives "Hi".
  After a stripped piece, stripping stops even though the text may still be empty: ``[▁, ▁Hi]``
  gives " Hi" -- except with ``remove_extra_whitespaces`` (stories260K's tokenizer), where it goes
  on until some text is produced: ``[▁, ▁Hi]`` gives "Hi". Byte and unknown pieces produce text,
  so ``[<0x41>, ▁Hi]`` gives "A Hi".
* A run of consecutive byte pieces is decoded as UTF-8, one character at a time; wherever the bytes
  at the current position are not one complete valid character, that *single byte* becomes U+FFFD
  and decoding resumes at the next byte. So ``E2 82`` gives two U+FFFD (not one per maximal subpart
  as Python's ``errors="replace"`` does), and a non-byte piece (even ``<s>``) ends the run:
  ``[<0xE2>, <s>, <0x82>, <0xAC>]`` gives three U+FFFD.

A reply that continues its prompt's text (a raw prompt, a completion) is decoded as the end of ``prompt +
reply``: built with ``after=prompt_ids``, the detokenizer starts in the state those ids leave, so "Once upon" then
``▁a`` gives " a", where the reply decoded alone gives "a" (a chat reply is decoded alone, as Workers AI sends it).

While streaming, the bytes at the end of a run that are a proper prefix of some valid character are
held back (at most 3 bytes) until they complete, are proven invalid, the run ends, or
:meth:`IncrementalDetokenizer.flush` is called. Hence a delta never contains a U+FFFD that a later
byte would have turned into a real character, and the concatenation of all deltas plus ``flush()``
equals ``decode(ids)`` for any id sequence.

Byte-level BPE vocabularies (SmolLM2) have no pieces, only bytes: :class:`ByteDetokenizer` streams them.

Not supported: models with a ``denormalizer_spec`` (SentencePiece then rewrites the whole decoded
text). Llama 2, stories260K and the demo tokenizer have none.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["ByteDetokenizer", "IncrementalDetokenizer", "PieceTable"]

_SPACE_SYMBOL = "\u2581"  # "▁", SentencePiece's whitespace marker
_REPLACEMENT = "\ufffd"
_NOT_A_BYTE = -1


class _SentencePieceLike(Protocol):
    """The part of ``sentencepiece.SentencePieceProcessor`` that the piece table reads."""

    def get_piece_size(self) -> int: ...
    def id_to_piece(self, id: int) -> str: ...
    def piece_to_id(self, piece: str) -> int: ...
    def is_byte(self, id: int) -> bool: ...
    def is_control(self, id: int) -> bool: ...
    def is_unknown(self, id: int) -> bool: ...
    def decode(self, ids: list[int]) -> str: ...


@dataclass(frozen=True)
class PieceTable:
    """What the detokenizer needs to know about every id, read once from a SentencePiece model.

    ``surfaces[i]`` is the text of non-byte piece ``i`` (``▁`` already replaced by a space; "" for
    control pieces), ``byte_values[i]`` the byte of a byte piece (-1 otherwise), ``leading_ws[i]``
    whether piece ``i`` is a normal piece starting with ``▁`` (the only kind SentencePiece strips).
    """

    surfaces: tuple[str, ...]
    byte_values: tuple[int, ...]
    leading_ws: tuple[bool, ...]
    strip_first_ws: bool
    keep_stripping: bool

    @classmethod
    def from_processor(cls, sp: _SentencePieceLike) -> PieceTable:
        """Build the table from a loaded processor (about 0.1 s for a 32000-piece vocabulary)."""
        surfaces, byte_values, leading_ws = [], [], []
        for i in range(sp.get_piece_size()):
            surface, byte, ws = _classify(sp, i)
            surfaces.append(surface)
            byte_values.append(byte)
            leading_ws.append(ws)
        strip, keep = _probe_leading_space(sp, surfaces, leading_ws)
        return cls(tuple(surfaces), tuple(byte_values), tuple(leading_ws), strip, keep)

    def __len__(self) -> int:
        return len(self.surfaces)


def _classify(sp: _SentencePieceLike, i: int) -> tuple[str, int, bool]:
    """Return ``(surface, byte value, starts with ▁)`` for piece ``i``."""
    if sp.is_byte(i):
        return "", int(sp.id_to_piece(i)[3:5], 16), False  # pieces are spelled "<0xAB>"
    if sp.is_control(i):
        return "", _NOT_A_BYTE, False
    if sp.is_unknown(i):
        return sp.decode([i]), _NOT_A_BYTE, False  # the model's unk_surface, e.g. " ⁇ "
    piece = sp.id_to_piece(i)
    return piece.replace(_SPACE_SYMBOL, " "), _NOT_A_BYTE, piece.startswith(_SPACE_SYMBOL)


def _probe_leading_space(
    sp: _SentencePieceLike, surfaces: Sequence[str], leading_ws: Sequence[bool]
) -> tuple[bool, bool]:
    """Find out how this model's decode treats a leading ``▁``: ``(strips it, keeps stripping)``.

    SentencePiece decides from the normalizer spec (``add_dummy_prefix``,
    ``remove_extra_whitespaces``), which the Python wrapper does not expose without protobuf, so
    we ask ``decode`` itself. "Keeps stripping" only makes a difference for the bare ``▁`` piece.
    """
    probe = next((i for i, ws in enumerate(leading_ws) if ws and len(surfaces[i]) > 1), None)
    if probe is None or sp.decode([probe]) != surfaces[probe][1:]:
        return False, False
    bare = sp.piece_to_id(_SPACE_SYMBOL)
    if not (0 <= bare < len(leading_ws) and leading_ws[bare]):
        return True, False
    return True, sp.decode([bare, bare]) == ""


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas whose concatenation equals ``decode(ids)``."""

    def __init__(self, table: PieceTable, after: Sequence[int] = ()) -> None:
        """``after``: ids whose text the stream continues (not emitted): the deltas are then the text that
        ``decode(after + ids)`` adds to ``decode(after)``."""
        self._table = table
        self._pending = b""  # bytes of the current byte run not yet emitted (at most 3)
        self._at_bos = True  # SentencePiece's ``is_bos_ws``: a leading ▁ may still be stripped
        self._ws_seen = False  # the previous non-byte piece had its leading ▁ stripped
        self._text_started = False  # some text (or a byte) has been produced
        for token_id in after:  # once some text is out, no later piece is stripped: the rest changes nothing
            self.push(token_id)
            if self._text_started:
                break
        self._pending = b""  # a prompt is whole characters; nothing of it may leak into the reply

    @property
    def pending(self) -> bytes:
        """The incomplete UTF-8 tail held back from the deltas so far (at most 3 bytes)."""
        return self._pending

    def push(self, token_id: int) -> str:
        """Feed one token id; return the text it makes certain (possibly "")."""
        if not 0 <= token_id < len(self._table):
            raise IndexError(f"token id {token_id} is out of range [0, {len(self._table)})")
        byte = self._table.byte_values[token_id]
        if byte != _NOT_A_BYTE:
            self._text_started = True
            self._pending += bytes((byte,))
            return self._drain(final=False)
        return self._drain(final=True) + self._piece_text(token_id)

    def flush(self) -> str:
        """End of stream: return the held-back bytes, invalid ones as U+FFFD (one per byte)."""
        return self._drain(final=True)

    def _piece_text(self, token_id: int) -> str:
        """Text of a non-byte piece, applying SentencePiece's first-piece ``▁`` stripping."""
        table = self._table
        if self._ws_seen or self._text_started:
            self._at_bos = False
        text = table.surfaces[token_id]
        stripped = self._at_bos and table.strip_first_ws and table.leading_ws[token_id]
        if stripped:
            text = text[1:]
        self._ws_seen = stripped and not table.keep_stripping
        if text:
            self._text_started = True
        return text

    def _drain(self, final: bool) -> str:
        """Decode the pending bytes as far as they are certain; with ``final``, all of them."""
        buf = self._pending
        out: list[str] = []
        pos = 0
        while pos < len(buf):
            need = _sequence_length(buf[pos])
            chunk = buf[pos : pos + need]
            if len(chunk) == need and _is_valid(chunk):
                out.append(chunk.decode("utf-8"))
                pos += need
            elif len(chunk) < need and not final and _is_valid_prefix(chunk, need):
                break
            else:
                out.append(_REPLACEMENT)
                pos += 1
        self._pending = buf[pos:]
        return "".join(out)


def _sequence_length(lead: int) -> int:
    """Bytes SentencePiece reads for a character starting with ``lead`` (1 for invalid leads)."""
    if lead < 0x80:
        return 1
    if lead & 0xE0 == 0xC0:
        return 2
    if lead & 0xF0 == 0xE0:
        return 3
    if lead & 0xF8 == 0xF0:
        return 4
    return 1  # a continuation byte or 0xF8-0xFF: invalid on its own


def _is_valid(chunk: bytes) -> bool:
    """Whether ``chunk`` is exactly one valid UTF-8 character (no overlong, surrogate, > U+10FFFF).

    This is the same set SentencePiece's ``IsValidDecodeUTF8`` accepts (checked exhaustively for
    1- and 2-byte runs in the tests).
    """
    try:
        chunk.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _is_valid_prefix(chunk: bytes, need: int) -> bool:
    """Whether some continuation turns ``chunk`` into a valid ``need``-byte character.

    UTF-8 only restricts the second byte of a sequence to a sub-range of 0x80-0xBF that always
    contains 0x80 or 0xBF (e.g. 0xA0-0xBF after 0xE0, 0x80-0x9F after 0xED), and leaves later bytes
    free in 0x80-0xBF, so padding with all-0x80 or all-0xBF is a complete test.
    """
    missing = need - len(chunk)
    return _is_valid(chunk + b"\x80" * missing) or _is_valid(chunk + b"\xbf" * missing)


class ByteDetokenizer:
    """The streaming detokenizer of a byte-level BPE vocabulary: token ids in, text deltas out.

    Every token is a run of bytes (special tokens none), and the text is their concatenation decoded as UTF-8 with
    each invalid sequence (maximal subpart) replaced by one U+FFFD: what `tokenizers`' ByteLevel decoder gives
    (Rust's `from_utf8_lossy`). Python's incremental UTF-8 decoder with ``errors="replace"`` replaces the same way
    and holds back an incomplete character until it completes or is proven invalid, so a delta never holds part of
    a character, and the deltas plus :meth:`flush` concatenate to the whole decode.
    """

    def __init__(self, token_bytes: Sequence[bytes]) -> None:
        """Byte-level tokens carry their spaces, so a reply reads the same alone or after its prompt."""
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    @property
    def pending(self) -> bytes:
        """The incomplete UTF-8 tail held back from the deltas so far (at most 3 bytes)."""
        return self._decoder.getstate()[0]

    def push(self, token_id: int) -> str:
        """Feed one token id; return the text it makes certain (possibly "")."""
        if not 0 <= token_id < len(self._token_bytes):
            raise IndexError(f"token id {token_id} is out of range [0, {len(self._token_bytes)})")
        return self._decoder.decode(self._token_bytes[token_id])

    def flush(self) -> str:
        """End of stream: the held-back bytes, an incomplete character as U+FFFD."""
        return self._decoder.decode(b"", final=True)
