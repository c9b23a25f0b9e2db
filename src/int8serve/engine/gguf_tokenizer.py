"""A GGUF file's tokenizer, rebuilt from the vocabulary the file carries as the files the engine's tokenizer reads.

A GGUF file holds no tokenizer file, only what llama.cpp needs of one. `tokenizer.ggml.model` says which kind:
- "llama", SentencePiece: each piece with its score and type (`tokenizer.ggml.tokens/scores/token_type`), the
  special ids, and a few normalizer flags. The engine's tokenizer is SentencePiece itself (ids must equal the
  original's, see tokenizer.py), so `model_proto` writes those pieces back into a SentencePiece `ModelProto`: a BPE
  model with byte fallback, the identity normalizer, and the flags the file gives (llama.cpp's defaults otherwise).
  The few protobuf fields are encoded here by hand: the format is stable and small, and it spares a dependency on
  `protobuf`.
- "gpt2", byte-level BPE: tokens and merges, written as a Hugging Face tokenizer.json (bpe_tokenizer.py).

`write_tokenizer` is the one way both kinds are built, and loaded once as the server loads them: the loader writes
them into the model cache (gguf_loader.py), `serve`'s check before anything loads (model_files.py) into a temporary
folder, so a vocabulary the load would refuse is refused first, in the same words. No torch.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import CheckpointError
from .gguf_file import GGUFFile, require

if TYPE_CHECKING:
    from .tokenizer import AnyTokenizer

__all__ = ["TOKENIZER_MODELS", "Vocabulary", "model_proto", "tokenizer_files", "vocabulary", "write_tokenizer"]

# tokenizer.ggml.model: "llama" is SentencePiece (rebuilt as a tokenizer.model), "gpt2" byte-level BPE (tokenizer.json)
TOKENIZER_MODELS = ("llama", "gpt2")

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


# --- the tokenizer's files ----------------------------------------------------------------------------------------


def tokenizer_files(file: GGUFFile) -> dict[str, bytes]:
    """The file's tokenizer as files, name -> contents: a SentencePiece `tokenizer.model`, or a byte-level BPE
    `tokenizer.json` and its `tokenizer_config.json`. CheckpointError (naming the file) for a tokenizer of another
    kind or a vocabulary that cannot be one (tokens without scores, a merge of tokens it lacks, ...)."""
    model = file.get("tokenizer.ggml.model")
    if model not in TOKENIZER_MODELS:
        raise CheckpointError(f"{file.path}: tokenizer {model!r} is not supported (only SentencePiece, 'llama', and "
                              "byte-level BPE, 'gpt2')")
    tokens = require(file, "tokenizer.ggml.tokens")
    try:
        if model == "gpt2":
            return _byte_level_files(file, tokens)
        return {"tokenizer.model": model_proto(vocabulary(file))}
    except (TypeError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{file.path}: tokenizer: {err}") from err


def vocabulary(file: GGUFFile) -> Vocabulary:
    """The SentencePiece vocabulary of a file whose `tokenizer.ggml.model` is "llama"."""
    tokens = require(file, "tokenizer.ggml.tokens")
    return Vocabulary(
        tokens=tokens,
        scores=file.get("tokenizer.ggml.scores") or [0.0] * len(tokens),
        types=file.get("tokenizer.ggml.token_type") or [1] * len(tokens),
        bos_id=int(file.get("tokenizer.ggml.bos_token_id", 1)),
        eos_id=int(file.get("tokenizer.ggml.eos_token_id", 2)),
        unk_id=int(file.get("tokenizer.ggml.unknown_token_id", 0)),
        pad_id=int(file.get("tokenizer.ggml.padding_token_id", -1)),
        add_space_prefix=bool(file.get("tokenizer.ggml.add_space_prefix", True)),
        remove_extra_whitespaces=bool(file.get("tokenizer.ggml.remove_extra_whitespaces", False)),
    )


def _byte_level_files(file: GGUFFile, tokens: Sequence[str]) -> dict[str, bytes]:
    from .bpe_tokenizer import byte_level_json

    merges = file.get("tokenizer.ggml.merges")
    if not merges:
        raise CheckpointError(f"{file.path}: a 'gpt2' tokenizer without tokenizer.ggml.merges")
    bos, eos = file.get("tokenizer.ggml.bos_token_id"), file.get("tokenizer.ggml.eos_token_id")
    definition, config = byte_level_json(
        tokens, merges, file.get("tokenizer.ggml.token_type"), file.get("tokenizer.ggml.pre"),
        None if bos is None else int(bos), None if eos is None else int(eos),
        add_bos=bool(file.get("tokenizer.ggml.add_bos_token", False)))
    return {"tokenizer.json": definition.encode("utf-8"), "tokenizer_config.json": config.encode("utf-8")}


def write_tokenizer(file: GGUFFile, folder: Path) -> Path:
    """The file's tokenizer (`tokenizer_files`), content-addressed in `folder` (written once, atomically):
    SentencePiece as `gguf-<hash>.model`, byte-level BPE as `gguf-<hash>/tokenizer.json` beside its
    tokenizer_config.json. It is loaded once as the server loads it (`built_tokenizer`)."""
    return built_tokenizer(file, folder)[0]


def built_tokenizer(file: GGUFFile, folder: Path) -> tuple[Path, AnyTokenizer]:
    """`write_tokenizer`'s file and the tokenizer loaded from it as the server loads it (tokenizer.load_tokenizer),
    so that a tokenizer the engine cannot use (no EOS, a model SentencePiece refuses) is a CheckpointError naming the
    GGUF file, here."""
    from .tokenizer import load_tokenizer

    path = _write(tokenizer_files(file), folder)
    try:
        return path, load_tokenizer(path)
    except CheckpointError as err:
        raise CheckpointError(f"{file.path}: tokenizer: {str(err).removeprefix(f'{path}: ')}") from err


def _write(files: dict[str, bytes], folder: Path) -> Path:
    digest = hashlib.sha256(b"".join(files.values())).hexdigest()[:16]
    if "tokenizer.model" in files:
        path = folder / f"gguf-{digest}.model"
        if not path.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            partial = path.with_suffix(f".{os.getpid()}.partial")
            partial.write_bytes(files["tokenizer.model"])
            os.replace(partial, path)
        return path
    target = folder / f"gguf-{digest}"
    if not (target / "tokenizer.json").is_file():
        partial = folder / f".gguf-{digest}.{os.getpid()}.partial"
        partial.mkdir(parents=True, exist_ok=True)
        for name, contents in files.items():
            (partial / name).write_bytes(contents)
        try:
            os.rename(partial, target)
        except OSError:  # another process wrote it first
            shutil.rmtree(partial, ignore_errors=True)
    return target / "tokenizer.json"


# --- SentencePiece's ModelProto -----------------------------------------------------------------------------------


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
