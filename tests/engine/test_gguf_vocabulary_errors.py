"""A GGUF vocabulary SentencePiece cannot hold (numbers for tokens, text for scores, too few types, a token twice)
is one CheckpointError naming the file, said before any tokenizer file is written."""

from __future__ import annotations

from pathlib import Path

import pytest

from int8serve.engine.errors import CheckpointError
from int8serve.engine.gguf_loader import GGUFFile, write_tokenizer

TOKENS = ["<unk>", "<s>", "</s>", "a", "b"]


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"tokenizer.ggml.tokens": [0, 1, 2, 3, 4]}, "tokens must be str, got 0"),
    ({"tokenizer.ggml.scores": ["a"] * 5}, "scores must be numbers, got 'a'"),
    ({"tokenizer.ggml.token_type": [1] * 3}, "5 tokens, 5 scores, 3 types"),
    ({"tokenizer.ggml.token_type": [1, 1, 1, 1, "x"]}, "token types must be numbers, got 'x'"),
    ({"tokenizer.ggml.tokens": ["<unk>", "<s>", "</s>", "a", "a"]}, "the token 'a' is there more than once"),
])
def test_a_vocabulary_sentencepiece_cannot_hold_is_refused(tmp_path: Path, changes: dict, fragment: str) -> None:
    metadata = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": TOKENS,
                "tokenizer.ggml.scores": [0.0] * 5, "tokenizer.ggml.token_type": [2, 3, 3, 1, 1], **changes}
    file = GGUFFile(tmp_path / "vocab.gguf", metadata, {})
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'vocab.gguf'}: tokenizer: .*{fragment}"):
        write_tokenizer(file, tmp_path / "tokenizers")
    assert not (tmp_path / "tokenizers").exists()


def test_a_good_vocabulary_is_written(tmp_path: Path) -> None:
    metadata = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": TOKENS,
                "tokenizer.ggml.scores": [0.0, 0.0, 0.0, -1, -2.5], "tokenizer.ggml.token_type": [2, 3, 3, 1, 1]}
    assert write_tokenizer(GGUFFile(tmp_path / "vocab.gguf", metadata, {}), tmp_path).is_file()


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"tokenizer.ggml.merges": [5, 6]}, "merges must be text, got 5"),
    ({"tokenizer.ggml.tokens": ["a", "b", 7, "<e>"]}, "tokens must be text, got 7"),
])
def test_a_byte_level_vocabulary_of_numbers_is_refused(tmp_path: Path, changes: dict, fragment: str) -> None:
    """Numbers where a `gpt2` vocabulary holds text ended the start with an AttributeError or a TypeError."""
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab", "<e>"],
                "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.eos_token_id": 3, **changes}
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'vocab.gguf'}: tokenizer: {fragment}"):
        write_tokenizer(GGUFFile(tmp_path / "vocab.gguf", metadata, {}), tmp_path / "tokenizers")
