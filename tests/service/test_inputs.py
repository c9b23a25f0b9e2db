"""Unit tests of the request checks, without a server: body parsing, schema wording, parameters, auth, frames."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from int8serve.catalog.card import ModelCard, builtin_cards
from int8serve.engine.chat_template import render_prompt
from int8serve.engine.tokenizer import Tokenizer
from int8serve.service.auth import TokenTable, authenticate
from int8serve.service.errors import ApiError
from int8serve.service.protocol.body import OPENAI_WORDING, parse_json_body, schema_error_detail
from int8serve.service.protocol.run import RunRequest, tokenize_run, validate_run_body
from int8serve.service.streaming import encode_frame

from .conftest import ACCOUNT, OTHER_ACCOUNT, OTHER_TOKEN, TOKEN, TOKENS


@pytest.fixture(scope="module")
def card() -> ModelCard:
    return builtin_cards()[0]


def _fails(call: Any) -> ApiError:
    with pytest.raises(ApiError) as info:
        call()
    return info.value


def test_parse_json_body() -> None:
    assert parse_json_body(b'\xef\xbb\xbf{"prompt": "h\xc3\xa9"}') == {"prompt": "hé"}  # a UTF-8 BOM is fine
    assert parse_json_body(b'{"p": "\\ud83d\\ude00"}') == {"p": "😀"}  # an escaped surrogate pair is fine
    assert _fails(lambda: parse_json_body(b"")).code == 3003
    assert _fails(lambda: parse_json_body(b"{'a': 1}")).code == 5006
    err = _fails(lambda: parse_json_body(b"\xc3"))
    assert err.message.startswith("AiError: Bad input: Error: the request body is not valid UTF-8")
    # arrays and objects nest at most 64 deep (a top-level object is 1)
    for allowed, refused in ((b"[" * 64 + b"]" * 64, b"[" * 65 + b"]" * 65),
                             (b'{"a": ' + b"[" * 63 + b"]" * 63 + b"}", b'{"a": ' + b"[" * 64 + b"]" * 64 + b"}"),
                             (b'{"a": ' * 64 + b"1" + b"}" * 64, b'{"a": ' * 65 + b"1" + b"}" * 65)):
        parse_json_body(allowed)
        err = _fails(lambda refused=refused: parse_json_body(refused))
        assert err.code == 5006 and err.message.endswith("nests arrays and objects more than 64 deep")


def test_schema_wording(card: ModelCard) -> None:
    check = card.input_validator
    assert schema_error_detail(check, {"prompt": "hi"}) is None
    assert schema_error_detail(check, {}) == ("oneOf at '/' not met, 0 matches: required properties at '/' are "
                                              "'prompt', required properties at '/' are 'messages'", None)
    assert schema_error_detail(check, {"messages": [{"role": "user"}]}) == (
        "oneOf at '/' not met, 0 matches: required properties at '/' are 'prompt', "
        "required properties at '/messages/0' are 'content'", None)
    assert schema_error_detail(check, "text") == ("Type mismatch of '/', 'object' not in 'string'", None)
    assert schema_error_detail(check, {"prompt": "hi", "stream": 1}) == (  # oneOf's branches both complain
        "oneOf at '/' not met, 0 matches: Type mismatch of '/stream', 'boolean' not in 'integer', required "
        "properties at '/' are 'messages'", None)
    assert schema_error_detail(card.input_validator.evolve(schema={"properties": {"max_tokens": {"maximum": 9}}}),
                               {"max_tokens": 10}) == ("Value at '/max_tokens' must be <= 9, got 10", "max_tokens")
    # the OpenAI routes: the branch the body chose, fields as OpenAI's clients name them
    assert schema_error_detail(check, {"messages": [{"role": "user", "content": "a" * 4097}]}, OPENAI_WORDING) == (
        "String at 'messages[0].content' is longer than 4096 characters (4097)", "messages")
    assert schema_error_detail(check, {"prompt": "a" * 4097, "raw": True}, OPENAI_WORDING) == (
        "String at 'prompt' is longer than 4096 characters (4097)", "prompt")
    assert schema_error_detail(check, {}, OPENAI_WORDING) == (  # no branch chosen: both
        "oneOf at 'body' not met, 0 matches: required properties at 'body' are 'prompt', required properties at "
        "'body' are 'messages'", None)


def build_run_request(body: Any, card: ModelCard, tokenizer: Tokenizer, window: int) -> RunRequest:
    return tokenize_run(validate_run_body(body, card), tokenizer, window)


def test_build_run_request(card: ModelCard, stories_tokenizer: Tokenizer) -> None:
    run = build_run_request({"prompt": "Hi", "stream": True, "seed": 3, "options": {"rejectIfBusy": True}},
                            card, stories_tokenizer, 512)
    assert run.prompt_ids == tuple(stories_tokenizer.encode_segments(render_prompt("Hi")))
    checked = run.checked
    assert (checked.stream, checked.reject_if_busy, checked.form, checked.raw, checked.max_tokens) == (
        True, True, "prompt", False, 256)
    assert (checked.params.seed, checked.params.temperature, checked.params.top_k, checked.params.top_p) == (
        3, 0.6, 0, 1.0)
    room = 512 - len(stories_tokenizer.encode("Hi", bos=True))
    exact = build_run_request({"prompt": "Hi", "raw": True, "max_tokens": room}, card, stories_tokenizer, 512)
    assert exact.prompt_tokens + exact.checked.max_tokens == 512
    err = _fails(lambda: build_run_request({"prompt": "Hi", "raw": True, "max_tokens": room + 1}, card,
                                           stories_tokenizer, 512))
    assert (err.status, err.code) == (413, 5021)
    assert "(513) exceeded this model context window limit (512)." in err.message
    assert build_run_request({"prompt": "Hi", "max_tokens": 7.0}, card, stories_tokenizer, 512).checked.max_tokens == 7


def test_a_fitted_max_tokens_is_bounded_by_the_room_and_reserved_at_its_worst(card: ModelCard,
                                                                            stories_tokenizer: Tokenizer) -> None:
    """OpenAI's routes without max_tokens: the card's 256, or the room the prompt leaves if less; the daily
    allocation prices both ends of what such a request may be (a long prompt beside a short reply costs more
    where input tokens cost more)."""
    fitted = dataclasses.replace(validate_run_body({"prompt": "word " * 165, "raw": True}, card), fit_max_tokens=True)
    run = tokenize_run(fitted, stories_tokenizer, 512)
    assert 256 < run.prompt_tokens < 512 and run.checked.max_tokens == 512 - run.prompt_tokens
    assert tokenize_run(fitted, stories_tokenizer, 2048).checked.max_tokens == 256
    err = _fails(lambda: tokenize_run(fitted, stories_tokenizer, run.prompt_tokens))
    assert (err.status, err.code, err.fields["prompt_tokens"]) == (413, 5021, run.prompt_tokens)
    assert fitted.worst_cases(10_000, 512) == ((256, 256), (511, 1))
    assert fitted.worst_cases(100, 512) == ((100, 256), (100, 256))
    assert dataclasses.replace(fitted, fit_max_tokens=False).worst_cases(10_000, 512) == ((256, 256),)


def test_numbers_are_bounded_when_parsed() -> None:
    """A number of any size in any field is a 400, never an exception: integers of more than 30 digits and floats
    that overflow are not JSON numbers here."""
    assert parse_json_body(b'{"seed": 123456789012345678901234567890}') == {"seed": 123456789012345678901234567890}
    for content in (b'{"max_tokens": 1' + b"0" * 400 + b"}", b'{"seed": -' + b"9" * 5000 + b"}",
                    b'{"temperature": 1e400}', b'{"top_p": -1.5e999}'):
        err = _fails(lambda content=content: parse_json_body(content))
        assert (err.status, err.code) == (400, 5006)
        assert "not valid JSON" in err.message and len(err.message) < 200


def test_message_count_is_capped_before_the_schema(card: ModelCard) -> None:
    too_many = {"messages": [{"role": "system", "content": ""}] * 257}
    err = _fails(lambda: validate_run_body(too_many, card))
    assert err.message.endswith("Array at '/messages' must have at most 256 items (257)")
    assert validate_run_body({"messages": [{"role": "user", "content": "x"}] * 256}, card).form == "messages"


def test_authenticate() -> None:
    tokens = TokenTable(TOKENS)
    assert authenticate({"authorization": f"Bearer {TOKEN}"}, ACCOUNT, tokens) == ACCOUNT
    assert authenticate({"authorization": f"bearer   {OTHER_TOKEN}"}, OTHER_ACCOUNT, tokens) == OTHER_ACCOUNT
    assert authenticate({"x-auth-email": "a@b.c", "x-auth-key": TOKEN}, ACCOUNT, tokens) == ACCOUNT
    # Authorization wins when both are sent
    assert _fails(lambda: authenticate({"authorization": "Bearer nope", "x-auth-email": "a@b.c",
                                        "x-auth-key": TOKEN}, ACCOUNT, tokens)).status == 401
    assert _fails(lambda: authenticate({"authorization": f"Bearer {TOKEN}"}, OTHER_ACCOUNT, tokens)).status == 403
    assert _fails(lambda: authenticate({}, ACCOUNT, tokens)).code == 9106
    assert _fails(lambda: authenticate({"authorization": f"Bearer {TOKEN[:-1]}"}, ACCOUNT, tokens)).status == 401
    sent = [TOKEN, TOKEN + "1", TOKEN[:-1], "", "m\u00e9", "\udcff"]  # (a lone surrogate: no 500 either)
    assert [tokens.account(token) for token in sent] == [ACCOUNT] + [None] * 5


def test_frames_are_compact_utf8() -> None:
    assert encode_frame({"response": "é 世 \"q\"\n"}) == 'data: {"response":"é 世 \\"q\\"\\n"}\n\n'.encode()
