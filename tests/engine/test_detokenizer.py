"""Streaming deltas, concatenated, must equal SentencePiece's decode, and never split a character."""

from __future__ import annotations

import codecs
import copy
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from int8serve.engine.detokenizer import IncrementalDetokenizer
from int8serve.engine.tokenizer import Tokenizer

LLAMA_VOCAB = 32000
UNK, BOS, EOS = 0, 1, 2
SPACE = 29871  # "▁" in the Llama 2 vocabulary
BYTE_BASE = 3  # <0x00> is id 3, <0xFF> is id 258


def byte_id(value: int) -> int:
    return BYTE_BASE + value


def utf8_ids(text: str) -> list[int]:
    """The byte-fallback ids spelling ``text`` one byte per token."""
    return [byte_id(b) for b in text.encode("utf-8")]


@pytest.fixture(scope="module")
def llama(shared_dir: Path) -> Tokenizer:
    tok = Tokenizer(shared_dir / "models" / "llama2-tokenizer" / "tokenizer.model")
    sp = tok.processor
    assert tok.vocab_size == LLAMA_VOCAB and sp.id_to_piece(SPACE) == "▁"
    assert all(sp.id_to_piece(byte_id(b)) == f"<0x{b:02X}>" for b in range(256))
    return tok


@pytest.fixture(scope="module")
def stories(shared_dir: Path) -> Tokenizer:
    return Tokenizer(shared_dir / "models" / "stories260K" / "hf" / "tokenizer.model")


def stream(tok: Tokenizer, ids: list[int]) -> list[str]:
    """All deltas for ``ids``, the last one being ``flush()``."""
    detok = tok.detokenizer()
    return [detok.push(i) for i in ids] + [detok.flush()]


def is_incomplete_utf8(data: bytes) -> bool:
    """Whether ``data`` is a proper prefix of some valid character (Python's decoder as oracle)."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        return 0 < len(data) < 4 and decoder.decode(data, final=False) == ""
    except UnicodeDecodeError:
        return False


def assert_streams_like_decode(tok: Tokenizer, ids: list[int]) -> None:
    """Concatenation equals decode; no character is ever split or replaced too early.

    After every token: the text emitted so far is a prefix of the final text (deltas are never
    revised, so a U+FFFD is never emitted for a byte that a later byte completes); the only thing
    held back is an incomplete UTF-8 prefix; and ending the stream there gives decode(prefix).
    """
    full = tok.decode(ids)
    detok = tok.detokenizer()
    emitted = ""
    for k, token_id in enumerate(ids, start=1):
        emitted += detok.push(token_id)
        assert full.startswith(emitted)
        assert detok.pending == b"" or is_incomplete_utf8(detok.pending)
        assert emitted + copy.copy(detok).flush() == tok.decode(ids[:k])
    assert emitted + detok.flush() == full


# Id sequences biased toward the interesting parts of the vocabulary: byte tokens (often forming
# valid, truncated or broken UTF-8), control ids, <unk>, the bare "▁" piece and ordinary pieces.
_utf8_runs = st.text(min_size=1, max_size=3).map(utf8_ids)
_single = st.one_of(
    st.integers(0, LLAMA_VOCAB - 1),
    st.integers(BYTE_BASE, BYTE_BASE + 255),
    st.sampled_from([UNK, BOS, EOS, SPACE, 259, 29892, 29889]),
).map(lambda i: [i])
_llama_ids = st.lists(st.one_of(_single, _utf8_runs, _utf8_runs.map(lambda r: r[:-1])), max_size=16).map(
    lambda chunks: [i for chunk in chunks for i in chunk]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=_llama_ids)
def test_random_llama_sequences_stream_like_decode(llama: Tokenizer, ids: list[int]) -> None:
    assert_streams_like_decode(llama, ids)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=st.lists(st.integers(0, 511), max_size=24))
def test_random_stories_sequences_stream_like_decode(stories: Tokenizer, ids: list[int]) -> None:
    # stories260K's model has remove_extra_whitespaces: leading "▁" stripping differs from Llama's.
    assert_streams_like_decode(stories, ids)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.text(max_size=40))
def test_random_text_round_trips_through_the_stream(llama: Tokenizer, text: str) -> None:
    ids = llama.encode(text, bos=True)
    assert_streams_like_decode(llama, ids)


def test_every_two_byte_run_matches_decode(llama: Tokenizer) -> None:
    """Exhaustive over all 65536 two-byte runs: validity and replacement rules equal SentencePiece's."""
    for first in range(256):
        for second in range(256):
            ids = [byte_id(first), byte_id(second)]
            assert "".join(stream(llama, ids)) == llama.decode(ids), (hex(first), hex(second))


def test_euro_over_three_byte_tokens(llama: Tokenizer) -> None:
    ids = utf8_ids("€")
    assert len(ids) == 3
    assert stream(llama, ids) == ["", "", "€", ""]


def test_emoji_over_four_byte_tokens(llama: Tokenizer) -> None:
    ids = utf8_ids("😀")
    assert len(ids) == 4
    assert stream(llama, ids) == ["", "", "", "😀", ""]


def test_cjk_text(llama: Tokenizer) -> None:
    text = "日本語のテキストです。中文测试"
    ids = llama.encode(text)
    deltas = stream(llama, ids)
    assert "".join(deltas) == text
    assert_streams_like_decode(llama, utf8_ids(text))
    assert stream(llama, utf8_ids("日本")) == ["", "", "日", "", "", "本", ""]


def test_leading_space_is_stripped_once(llama: Tokenizer) -> None:
    hi = llama.processor.piece_to_id("▁Hi")
    assert stream(llama, [hi, hi]) == ["Hi", " Hi", ""]
    assert stream(llama, [BOS, hi]) == ["", "Hi", ""]  # control tokens do not count as text
    assert stream(llama, [BOS, EOS, BOS, hi]) == ["", "", "", "Hi", ""]
    assert stream(llama, [SPACE, hi]) == ["", " Hi", ""]  # only the first piece loses its "▁"
    assert stream(llama, [byte_id(0x41), hi]) == ["A", " Hi", ""]  # a byte is text
    assert stream(llama, [byte_id(0x20), hi]) == [" ", " Hi", ""]  # a space byte is not stripped
    assert stream(llama, [UNK, hi]) == [" ⁇ ", " Hi", ""]


def continuation(tok: Tokenizer, prompt: list[int], ids: list[int]) -> str:
    detok = tok.detokenizer(after=prompt)
    return "".join(detok.push(i) for i in ids) + detok.flush()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(prompt=st.text(min_size=1, max_size=30), ids=_llama_ids)
def test_a_continuation_is_the_end_of_decoding_prompt_and_reply(llama: Tokenizer, prompt: str,
                                                                 ids: list[int]) -> None:
    """A raw prompt's reply: what decoding prompt and reply together adds to the prompt's own decode."""
    prompt_ids = llama.encode(prompt)
    whole, alone = llama.decode(prompt_ids + ids), llama.decode(prompt_ids)
    assert whole.startswith(alone) and continuation(llama, prompt_ids, ids) == whole[len(alone):]


def test_a_continuation_keeps_the_first_space(llama: Tokenizer, stories: Tokenizer) -> None:
    for tok, prompt in ((llama, "Once upon"), (stories, "Once upon")):
        a_time = tok.encode("Once upon a time")[len(tok.encode(prompt)):]
        assert tok.decode(a_time) == "a time"  # decoded alone, the first piece loses its space
        assert continuation(tok, tok.encode(prompt), a_time) == " a time"
        assert continuation(tok, [BOS], a_time) == "a time"  # a prompt of no text is no text to continue
    euro = utf8_ids("€")
    # ids no text encodes: the prompt's incomplete bytes stay its own, the reply's lone byte is its own U+FFFD
    assert continuation(llama, llama.encode("Price:") + euro[:2], euro[2:]) == "\ufffd"


def test_leading_space_with_remove_extra_whitespaces(stories: Tokenizer) -> None:
    sp = stories.processor
    space, the = sp.piece_to_id("▁"), sp.piece_to_id("▁the")
    assert stream(stories, [space, space, the, the]) == ["", "", "the", " the", ""]
    assert "".join(stream(stories, [space, space, the])) == sp.decode([space, space, the]) == "the"


def test_invalid_bytes_become_one_replacement_each(llama: Tokenizer) -> None:
    truncated = utf8_ids("€")[:2]
    assert llama.decode(truncated) == "\ufffd\ufffd"  # one per byte, not per maximal subpart
    assert stream(llama, truncated) == ["", "", "\ufffd\ufffd"]
    assert stream(llama, [*truncated, byte_id(0x41)]) == ["", "", "\ufffd\ufffdA", ""]
    assert stream(llama, [byte_id(0xFF), byte_id(0xC0)]) == ["\ufffd", "\ufffd", ""]
    surrogate = [byte_id(0xED), byte_id(0xA0), byte_id(0x80)]
    assert stream(llama, surrogate) == ["", "\ufffd\ufffd", "\ufffd", ""]


def test_a_non_byte_piece_ends_a_byte_run(llama: Tokenizer) -> None:
    first, *rest = utf8_ids("€")
    ids = [first, BOS, *rest]
    assert llama.decode(ids) == "\ufffd" * 3
    # 0x82 and 0xAC can no longer start a character: each is replaced as soon as it arrives.
    assert stream(llama, ids) == ["", "\ufffd", "\ufffd", "\ufffd", ""]


def test_encoded_replacement_character_is_one_character(llama: Tokenizer) -> None:
    ids = utf8_ids("\ufffd")
    assert stream(llama, ids) == ["", "", "\ufffd", ""] and llama.decode(ids) == "\ufffd"


def test_unknown_and_control_ids(llama: Tokenizer) -> None:
    ids = [BOS, UNK, EOS, UNK]
    assert "".join(stream(llama, ids)) == llama.decode(ids) == " ⁇  ⁇ "


def test_out_of_range_ids_are_rejected(llama: Tokenizer) -> None:
    detok = llama.detokenizer()
    for bad in (-1, LLAMA_VOCAB):
        with pytest.raises(IndexError):
            detok.push(bad)


def test_flush_twice_and_reuse_after_flush(llama: Tokenizer) -> None:
    detok = llama.detokenizer()
    assert detok.push(byte_id(0xE2)) == ""
    assert detok.flush() == "\ufffd"
    assert detok.flush() == ""


def test_detokenizer_is_independent_per_stream(llama: Tokenizer) -> None:
    a, b = llama.detokenizer(), llama.detokenizer()
    assert isinstance(a, IncrementalDetokenizer)
    a.push(byte_id(0xE2))
    assert b.push(byte_id(0x41)) == "A"
    assert a.pending == b"\xe2" and b.pending == b""
