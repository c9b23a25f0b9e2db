"""Byte-level BPE tokenizers (GPT-2 style: SmolLM2 and most models after Llama 2), beside SentencePiece.

A byte-level BPE tokenizer maps text to UTF-8 bytes, each byte to a printable character (GPT-2's
`bytes_to_unicode`), splits the text with a regular expression ("pre-tokenization") and merges characters by a
ranked list of merges. The `tokenizers` library does exactly this for a Hugging Face `tokenizer.json`; so this module
- loads a `tokenizer.json` (plus the `tokenizer_config.json` beside it, which names the BOS/EOS tokens), and
- writes one from a GGUF file's `gpt2` vocabulary: tokens, merges, token types, the special ids and
  `tokenizer.ggml.pre`, the name llama.cpp gives the pre-tokenizer's regular expression.

What the engine asks of it is what `tokenizer.Tokenizer` gives for SentencePiece: ids for a rendered chat template
(`encode_segments`), text for ids (whole, and streamed by `detokenizer.ByteDetokenizer`), BOS/EOS and the ids that
end a reply (`stop_ids`). Special tokens typed by a user stay text: text is encoded with the library's
`encode_special_tokens`, so "<|im_end|>" in a message is the ids of its characters; only the template's `Control`
markers become control ids. A raw prompt (`RawText`) is in the model's own format: it is encoded with the special
tokens parsed, as the library encodes by default ("<|im_end|>" is its id), and one that starts with the BOS the
tokenizer would add gets no second one.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, processors

from .chat_template import Control, RawText, Segment
from .detokenizer import ByteDetokenizer

__all__ = ["END_OF_TURN_TOKENS", "BPETokenizer", "byte_level_json"]

# Special tokens that end a reply whenever a vocabulary has them (llama.cpp's end-of-generation tokens, the ones the
# engine's models use): a chat model ends its turn with one of these even where its EOS is another token.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")

# llama.cpp's `tokenizer.ggml.pre` names -> the pre-tokenizer of the model's own tokenizer.json. "smollm" (and the
# StarCoder family it comes from) first splits every digit off, then applies GPT-2's expression; "gpt-2" is GPT-2's
# expression alone. Any other name is refused: a wrong expression gives ids the model was not trained on.
_DIGITS_THEN_GPT2 = ("smollm", "starcoder", "refact")
_GPT2 = ("gpt-2", "gpt2", "default")
SUPPORTED_PRE = (*_DIGITS_THEN_GPT2, *_GPT2)

_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types (gguf.TokenType)


def byte_level_json(tokens: Sequence[str], merges: Sequence[str], types: Sequence[int] | None, pre: str | None,
                    bos_id: int | None, eos_id: int | None, add_bos: bool) -> tuple[str, str]:
    """A GGUF `gpt2` vocabulary as (tokenizer.json, tokenizer_config.json) text.

    Control tokens (type 3) become special added tokens, user-defined ones (type 4) plain added tokens, as llama.cpp
    and Hugging Face's converter treat them. Raises ValueError for a vocabulary that cannot be this kind.
    """
    for what, values in (("tokens", tokens), ("merges", merges)):
        wrong = next((value for value in values if not isinstance(value, str)), None)
        if wrong is not None:
            raise ValueError(f"{what} must be text, got {wrong!r}")
    pre = pre or "default"
    if pre not in SUPPORTED_PRE:
        raise ValueError(f"pre-tokenizer {pre!r} is not supported (supported: {', '.join(SUPPORTED_PRE)})")
    types = list(types) if types is not None else [1] * len(tokens)
    if len(types) != len(tokens):
        raise ValueError(f"{len(tokens)} tokens but {len(types)} token types")
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise ValueError("the vocabulary has duplicate tokens")
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep or left not in vocab or right not in vocab:
            raise ValueError(f"merge {merge!r} is not two tokens of the vocabulary")
        if left + right not in vocab:  # the library would panic (a BaseException) on it
            raise ValueError(f"merge {merge!r} makes {left + right!r}, no token of the vocabulary")
        pairs.append((left, right))
    tok = tokenizers.Tokenizer(models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if pre in _DIGITS_THEN_GPT2 else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False)
                            for t, kind in zip(tokens, types, strict=True) if kind == _CONTROL])
    tok.add_tokens([tokenizers.AddedToken(t, special=False, normalized=False)
                    for t, kind in zip(tokens, types, strict=True) if kind == _USER_DEFINED])
    if add_bos and bos_id is not None:
        if not 0 <= bos_id < len(tokens):
            raise ValueError(f"the BOS id {bos_id} is no token of the vocabulary ({len(tokens)} tokens)")
        bos = tokens[bos_id]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, bos_id)])
    config = {"add_bos_token": add_bos,
              "bos_token": tokens[bos_id] if bos_id is not None and 0 <= bos_id < len(tokens) else None,
              "eos_token": tokens[eos_id] if eos_id is not None and 0 <= eos_id < len(tokens) else None}
    return tok.to_str(), json.dumps(config, indent=2) + "\n"


class BPETokenizer:
    """A byte-level BPE tokenizer loaded from a `tokenizer.json` (and the `tokenizer_config.json` beside it)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {self.path}")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.path))
        except Exception as exc:  # the library raises a bare Exception for a malformed file
            raise ValueError(f"{self.path}: not a valid tokenizer.json ({exc})") from exc
        definition = json.loads(self.path.read_text(encoding="utf-8"))
        decoder = definition.get("decoder") or {}
        if decoder.get("type") != "ByteLevel" or (definition.get("model") or {}).get("type") != "BPE":
            model = (definition.get("model") or {}).get("type")
            raise ValueError(f"{self.path}: not a byte-level BPE tokenizer (model {model!r}, decoder "
                             f"{decoder.get('type')!r}); a SentencePiece model needs its tokenizer.model")
        self._tok.encode_special_tokens = True  # typed special tokens stay text; controls come from the template
        config = _read_config(self.path.with_name("tokenizer_config.json"))
        self._add_bos, bos = self._bos_from_post_processor()
        self._bos_id = bos if bos is not None else self._id_of_config(config, "bos_token")
        eos = self._id_of_config(config, "eos_token")
        if eos is None:
            eos = next((i for t in END_OF_TURN_TOKENS if (i := self._special_id(t)) is not None), None)
        if eos is None:
            raise ValueError(f"{self.path}: no EOS token (no eos_token in tokenizer_config.json, and none of "
                             f"{', '.join(END_OF_TURN_TOKENS)} is a special token)")
        self._eos_id = eos

    def _bos_from_post_processor(self) -> tuple[bool, int | None]:
        """Whether the tokenizer puts a token before the text (its BOS), and which."""
        plain = self._tok.encode("a", add_special_tokens=False).ids
        full = self._tok.encode("a").ids
        if len(full) > len(plain) and full[-len(plain):] == plain:
            return True, full[0]
        return False, None

    def _id_of_config(self, config: dict[str, Any], key: str) -> int | None:
        value = config.get(key)
        if isinstance(value, dict):
            value = value.get("content")
        return self._tok.token_to_id(value) if isinstance(value, str) else None

    def _special_id(self, token: str) -> int | None:
        index = self._tok.token_to_id(token)
        return index if index is not None and index in self._special_ids else None

    @cached_property
    def _special_ids(self) -> frozenset[int]:
        return frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    @property
    def bos_id(self) -> int:
        """The id a sequence starts with when the model wants one; else the configured BOS (or EOS) for reference."""
        return self._bos_id if self._bos_id is not None else self._eos_id

    @property
    def add_bos(self) -> bool:
        """Whether sequences start with BOS (SmolLM2: no)."""
        return self._add_bos

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @cached_property
    def stop_ids(self) -> frozenset[int]:
        """EOS and every end-of-turn special token of the vocabulary: generating one ends the reply."""
        return frozenset({self._eos_id, *(i for t in END_OF_TURN_TOKENS if (i := self._special_id(t)) is not None)})

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_id(self, token: str) -> int | None:
        """The id of a token spelled `token` (a special token, e.g. "<|im_start|>"), or None."""
        return self._tok.token_to_id(token)

    def encode(self, text: str, bos: bool = False) -> list[int]:
        """Ids of `text` (special tokens typed in it stay text), optionally after BOS."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if bos else ids

    def encode_segments(self, segments: Iterable[Segment]) -> list[int]:
        """Ids of a rendered template: BOS first if the model wants one, controls as their ids, text encoded (a raw
        prompt's special tokens as their ids, its own leading BOS being the first)."""
        ids = [self.bos_id] if self._add_bos else []
        for index, segment in enumerate(segments):
            if isinstance(segment, RawText):
                raw = self._parsing_special_tokens.encode(segment, add_special_tokens=False).ids
                ids.extend(raw[1:] if index == 0 and self._add_bos and raw[:1] == [self.bos_id] else raw)
            elif isinstance(segment, str):
                ids.extend(self._tok.encode(segment, add_special_tokens=False).ids)
            elif segment is Control.BOS:
                if not (index == 0 and self._add_bos):
                    ids.append(self.bos_id)
            elif segment is Control.EOS:
                ids.append(self.eos_id)
            elif isinstance(segment, Control):
                control = self._special_id(segment.value)
                if control is None:
                    raise ValueError(f"{self.path}: no special token {segment.value!r}: this model does not use "
                                     "the template that wrote it")
                ids.append(control)
            else:
                raise TypeError(f"a segment is a str or a Control, not {type(segment).__name__}")
        return ids

    @cached_property
    def _parsing_special_tokens(self) -> tokenizers.Tokenizer:
        """The same tokenizer reading the special tokens spelled in text (a raw prompt's), a copy made on first use:
        the flag is the tokenizer's own, and other threads encode plain text with `_tok` meanwhile."""
        tok = tokenizers.Tokenizer.from_str(self._tok.to_str())
        tok.encode_special_tokens = False
        return tok

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` without special tokens, as `tokenizers` decodes them."""
        return self._tok.decode(list(ids), skip_special_tokens=True)

    def detokenizer(self, after: Sequence[int] = ()) -> ByteDetokenizer:
        """A fresh streaming detokenizer for one sequence (the byte table is shared). `after` changes nothing: a
        byte-level token's text is the same after any prompt."""
        return ByteDetokenizer(self._token_bytes)

    @cached_property
    def _token_bytes(self) -> tuple[bytes, ...]:
        """Each id's bytes as the ByteLevel decoder gives them; b"" for special tokens (skipped)."""
        vocab = self._tok.get_vocab(with_added_tokens=True)
        table = [b""] * self.vocab_size
        for token, index in vocab.items():
            if index not in self._special_ids:
                table[index] = _byte_level_bytes(token)
        return tuple(table)

    def __repr__(self) -> str:
        return f"BPETokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    return config if isinstance(config, dict) else {}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map of the 256 bytes to printable characters (the one `tokenizers`' ByteLevel uses)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


_CHAR_TO_BYTE = {char: byte for byte, char in _bytes_to_unicode().items()}


def _byte_level_bytes(token: str) -> bytes:
    """A token's bytes: each character mapped back to its byte, or (a token with other characters, such as an
    added token with a space) its own UTF-8, as the ByteLevel decoder does."""
    try:
        return bytes(_CHAR_TO_BYTE[char] for char in token)
    except KeyError:
        return token.encode("utf-8")
