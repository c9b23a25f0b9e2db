"""The demo tokenizer trains from the shipped text, quickly, quietly and deterministically."""

from __future__ import annotations

from pathlib import Path

import pytest

from int8serve.engine.demo_tokenizer import DEMO_VOCAB_SIZE, demo_text, train_demo_tokenizer
from int8serve.engine.tokenizer import Tokenizer

ROUND_TRIP_TEXTS = [
    "Once upon a time, a lighthouse keeper wrote down the weather.",
    "  two leading spaces, three   inside, one trailing ",
    "line one\nline two\n\n\ttabbed",
    "café naïve crème brûlée €2.50",
    "日本語のテキスト 中文 한국어",
    "emoji 😀🎉👍🏽",
    "digits 0123456789 and 3.14159",
    "[INST] <<SYS>>\nsystem\n<</SYS>>\n\nhello [/INST]",
    "<s> typed tags </s>",
    "\x00\x01\x7f",
]


@pytest.fixture(scope="module")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_demo_tokenizer(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def demo(demo_model: Path) -> Tokenizer:
    return Tokenizer(demo_model)


def test_shipped_text_is_a_few_tens_of_kb() -> None:
    text = demo_text()
    assert 20_000 <= len(text.encode("utf-8")) <= 100_000
    assert len(text.split()) > 4000


def test_writes_tokenizer_model_in_out_dir(tmp_path: Path) -> None:
    out_dir = tmp_path / "new" / "dir"
    path = train_demo_tokenizer(out_dir)
    assert path == out_dir / "tokenizer.model"
    assert path.is_file()
    assert sorted(p.name for p in out_dir.iterdir()) == ["tokenizer.model"]


def test_training_is_quiet_and_deterministic(
    tmp_path: Path, demo_model: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """(Its speed is not asserted: a wall-clock bound flakes on a busy machine.)"""
    again = train_demo_tokenizer(tmp_path)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert again.read_bytes() == demo_model.read_bytes()


def test_special_ids_like_llama(demo: Tokenizer) -> None:
    sp = demo.processor
    assert demo.vocab_size == DEMO_VOCAB_SIZE
    assert (sp.unk_id(), demo.bos_id, demo.eos_id, sp.pad_id()) == (0, 1, 2, -1)
    assert [sp.id_to_piece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert sum(sp.is_byte(i) for i in range(demo.vocab_size)) == 256


@pytest.mark.parametrize("text", ROUND_TRIP_TEXTS)
def test_round_trip(demo: Tokenizer, text: str) -> None:
    ids = demo.encode(text)
    assert 0 not in ids, "byte fallback means no <unk>"
    assert demo.decode(ids) == text
    assert demo.decode(demo.encode(text, bos=True)) == text


def test_non_ascii_uses_byte_fallback(demo: Tokenizer) -> None:
    sp = demo.processor
    ids = demo.encode("😀")
    assert [sp.id_to_piece(i) for i in ids if sp.is_byte(i)] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]


def test_streaming_matches_decode(demo: Tokenizer) -> None:
    for text in ROUND_TRIP_TEXTS:
        ids = demo.encode(text, bos=True)
        detok = demo.detokenizer()
        assert "".join(detok.push(i) for i in ids) + detok.flush() == text


def test_english_is_compressed(demo: Tokenizer) -> None:
    text = "The river does not hurry, and it does not wait."
    assert len(demo.encode(text)) < len(text) / 2
