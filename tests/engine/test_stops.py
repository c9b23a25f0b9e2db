"""Stop strings on a stream of text deltas: held back while they may begin, cut at the earliest match."""

from __future__ import annotations

import pytest

from int8serve.engine.stops import StopMatcher


def run(pieces: list[str], stops: list[str]) -> tuple[list[str], bool, str]:
    """The deltas emitted for `pieces`, whether a stop string ended them, and what a flush then gives."""
    matcher, out = StopMatcher(stops), []
    for piece in pieces:
        text, stopped = matcher.push(piece)
        out.append(text)
        if stopped:
            return out, True, matcher.flush()
    return out, False, matcher.flush()


def test_held_back_while_it_may_begin_a_stop_then_cut() -> None:
    assert run(["He", "llo E", "N", "D rest"], ["END"]) == (["He", "llo ", "", ""], True, "")


def test_released_when_it_cannot_be_a_stop_any_more() -> None:
    assert run(["ab", "c", "d"], ["cx", "bcz"]) == (["a", "", "bcd"], False, "")
    assert run(["ab", "c"], ["cx", "bcz"]) == (["a", ""], False, "bc")  # the end of the stream releases it


def test_the_earliest_match_wins() -> None:
    assert run(["xSTOPy"], ["TO", "STOP"]) == (["x"], True, "")


def test_a_stop_split_across_many_deltas() -> None:
    assert run(list("abc<|end|>def"), ["<|end|>"]) == (["a", "b", "c", "", "", "", "", "", "", ""], True, "")


def test_empty_stop_strings_are_refused() -> None:
    with pytest.raises(ValueError):
        StopMatcher([])
    with pytest.raises(ValueError):
        StopMatcher(["a", ""])
