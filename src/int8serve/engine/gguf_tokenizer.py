"""The SentencePiece `tokenizer.model` of a GGUF file, rebuilt from the vocabulary the file carries.

A GGUF file holds no `tokenizer.model`, only what llama.cpp needs of it: each piece with its score and type
(`tokenizer.ggml.tokens/scores/token_type`), the special ids, and a few normalizer flags. The engine's tokenizer
is SentencePiece itself (ids must equal the original's, see tokenizer.py), so this writes those pieces back into a
SentencePiece `ModelProto`: a BPE model with byte fallback, the identity normalizer, and the flags the file gives
(llama.cpp's defaults otherwise). The few protobuf fields are encoded here by hand: the format is stable and small,
and it spares a dependency on `protobuf`.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass

# SentencePiece's piece types (sentencepiece_model.proto) are llama.cpp's token types, value for value.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_BPE = 2  # TrainerSpec.ModelType


@dataclass(frozen=True)
class Vocabulary:
    """What a GGUF file says about its SentencePiece tokenizer."""

    tokens: Sequence[str]
    scores: Sequence[float]
    types: Sequence[int]
    bos_id: int = 1
    eos_id: int = 2
    unk_id: int = 0
    pad_id: int = -1
    add_space_prefix: bool = True  # `tokenizer.ggml.add_space_prefix`, SentencePiece's add_dummy_prefix
    remove_extra_whitespaces: bool = False  # `tokenizer.ggml.remove_extra_whitespaces` (Llama 2: false)


def model_proto(vocab: Vocabulary) -> bytes:
    """A serialized SentencePiece ModelProto holding `vocab`; ValueError for a vocabulary SentencePiece would refuse
    (or that is not one: numbers for tokens, text for scores)."""
    _check(vocab)
    pieces = b"".join(_message(1, _piece(t, s, k)) for t, s, k in zip(vocab.tokens, vocab.scores, vocab.types,
                                                                          strict=True))
    return pieces + _message(2, _trainer_spec(vocab)) + _message(3, _normalizer_spec(vocab))


def _check(vocab: Vocabulary) -> None:
    if not len(vocab.tokens) == len(vocab.scores) == len(vocab.types):
        raise ValueError(f"GGUF vocabulary: {len(vocab.tokens)} tokens, {len(vocab.scores)} scores, "
                         f"{len(vocab.types)} types")
    for what, values, kinds in (("tokens", vocab.tokens, str), ("scores", vocab.scores, int | float),
                                ("token types", vocab.types, int)):
        wrong = next((v for v in values if isinstance(v, bool) or not isinstance(v, kinds)), None)
        if wrong is not None:
            raise ValueError(f"GGUF vocabulary: {what} must be {kinds.__name__ if kinds is str else 'numbers'}, "
                             f"got {wrong!r}")
    if len(set(vocab.tokens)) != len(vocab.tokens):
        seen: set[str] = set()
        duplicate = next(t for t in vocab.tokens if t in seen or seen.add(t))
        raise ValueError(f"GGUF vocabulary: the token {duplicate!r} is there more than once")


def _piece(token: str, score: float, kind: int) -> bytes:
    kind = kind if NORMAL <= kind <= BYTE else NORMAL
    return _bytes(1, token.encode("utf-8")) + _float(2, score) + _int(3, kind)


def _trainer_spec(vocab: Vocabulary) -> bytes:
    byte_fallback = any(kind == BYTE for kind in vocab.types)
    return (_int(3, _BPE) + _int(4, len(vocab.tokens))
            + _int(25, 1)  # split_digits
            + _int(26, 1)  # allow_whitespace_only_pieces: a run of spaces is one piece, as in Llama 2
            + _int(35, int(byte_fallback))
            + _int(40, vocab.unk_id) + _int(41, vocab.bos_id) + _int(42, vocab.eos_id) + _int(43, vocab.pad_id)
            + _bytes(45, _piece_name(vocab, vocab.unk_id, "<unk>"))
            + _bytes(46, _piece_name(vocab, vocab.bos_id, "<s>"))
            + _bytes(47, _piece_name(vocab, vocab.eos_id, "</s>")))


def _piece_name(vocab: Vocabulary, index: int, default: str) -> bytes:
    return (vocab.tokens[index] if 0 <= index < len(vocab.tokens) else default).encode("utf-8")


def _normalizer_spec(vocab: Vocabulary) -> bytes:
    return (_bytes(1, b"identity") + _bytes(2, b"") + _int(3, int(vocab.add_space_prefix))
            + _int(4, int(vocab.remove_extra_whitespaces)) + _int(5, 1))


# --- protobuf wire format: varint (0), 32-bit (5) and length-delimited (2) fields -----------------------------------


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int32 values are ten-byte two's complement varints
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _int(field: int, value: int) -> bytes:
    return _varint(field << 3) + _varint(value)


def _float(field: int, value: float) -> bytes:
    return _varint(field << 3 | 5) + struct.pack("<f", value)


def _bytes(field: int, value: bytes) -> bytes:
    return _varint(field << 3 | 2) + _varint(len(value)) + value


_message = _bytes
