"""A GGUF vocabulary SentencePiece cannot hold (numbers for tokens, text for scores, too few types, a token twice)
is one CheckpointError naming the file, said before any tokenizer file is written; so is a byte-level vocabulary the
`tokenizers` library cannot hold, and one whose tokenizer is written but is not one the engine can use."""

from __future__ import annotations

from pathlib import Path

import pytest

from int8serve.engine.errors import CheckpointError
from int8serve.engine.gguf_file import GGUFFile
from int8serve.engine.gguf_tokenizer import write_tokenizer
from int8serve.engine.tokenizer import load_tokenizer

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
    # numbers where a `gpt2` vocabulary holds text ended the start with an AttributeError or a TypeError
    ({"tokenizer.ggml.merges": [5, 6]}, "tokenizer: merges must be text, got 5"),
    ({"tokenizer.ggml.tokens": ["a", "b", 7, "<e>"]}, "tokenizer: tokens must be text, got 7"),
    # the library panicked (a BaseException, past every `except Exception`) on a merge that makes no token
    ({"tokenizer.ggml.tokens": ["a", "b", "<e>"]}, "tokenizer: merge 'a b' makes 'ab', no token of the vocabulary"),
    # an IndexError
    ({"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.bos_token_id": 9}, "tokenizer: the BOS id 9 is no token"),
    # written, then refused by the engine's tokenizer (it was, but only when the server loaded it, after the model)
    ({"tokenizer.ggml.eos_token_id": None}, "tokenizer: no EOS token"),
    ({"tokenizer.ggml.merges": []}, "a 'gpt2' tokenizer without tokenizer.ggml.merges"),
    ({"tokenizer.ggml.model": "bert"}, "tokenizer 'bert' is not supported"),
])
def test_a_byte_level_vocabulary_the_engine_cannot_use_is_refused(tmp_path: Path, changes: dict,
                                                                 fragment: str) -> None:
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab", "<e>"],
                "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.eos_token_id": 3, **changes}
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'vocab.gguf'}: {fragment}"):
        write_tokenizer(GGUFFile(tmp_path / "vocab.gguf", metadata, {}), tmp_path / "tokenizers")


def test_a_good_byte_level_vocabulary_is_written(tmp_path: Path) -> None:
    metadata = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab", "<e>"],
                "tokenizer.ggml.merges": ["a b"], "tokenizer.ggml.eos_token_id": 3}
    assert load_tokenizer(write_tokenizer(GGUFFile(tmp_path / "vocab.gguf", metadata, {}), tmp_path)).encode("ab")
