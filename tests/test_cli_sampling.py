"""`int8serve generate` samples as `serve` does for the same card: a sampling flag left unset takes the card's
default (the built-in SmolLM2 card's temperature 0.2 and top_p 0.9, Llama-2's 0.6), a flag given wins; and it
prompts the model as `serve` does for the same --model (the card's template and default system prompt)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from int8serve import cli
from int8serve.catalog.registry import Catalog
from int8serve.cli import UsageError, _sampling_params, build_parser, model_spec
from int8serve.engine import generate as engine_generate
from int8serve.engine.model_files import check_model_files
from int8serve.engine.sampling_params import SamplingParams
from int8serve.model_specs import served_model_specs
from int8serve.service.protocol.run import run_body_model

SMOLLM2 = "@hf/huggingfacetb/smollm2-135m-instruct"
LLAMA = "@cf/meta/llama-2-7b-chat-int8"
QUESTION = "What is the capital of France?"


def params(model: str, *flags: str) -> SamplingParams:
    args = build_parser().parse_args(["generate", "--model", model, *flags, "Hello"])
    return _sampling_params(args, model_spec(args.model)[1])


def test_unset_flags_take_the_cards_defaults(smollm2_gguf: Path, stories_hf: Path) -> None:
    built_in = params(f"{SMOLLM2}={smollm2_gguf}")
    assert (built_in.temperature, built_in.top_p, built_in.top_k) == (0.2, 0.9, 0)
    llama = params(f"{LLAMA}={stories_hf}")
    assert (llama.temperature, llama.top_p, llama.repetition_penalty) == (0.6, 1.0, 1.0)


def test_given_flags_win_and_the_seed_is_kept(smollm2_gguf: Path) -> None:
    given = params(f"{SMOLLM2}={smollm2_gguf}", "--temperature", "0", "--top-p", "0.5", "--top-k", "7",
                   "--presence-penalty", "0.5", "--seed", "0")
    assert (given.temperature, given.top_p, given.top_k, given.presence_penalty, given.seed) == (0, 0.5, 7, 0.5, 0)


def test_a_flag_out_of_range_is_a_usage_error(stories_hf: Path) -> None:
    with pytest.raises(UsageError, match=r"--top-p must be between 0\.001 and 1"):
        params(f"{LLAMA}={stories_hf}", "--top-p", "1.5")


@pytest.mark.parametrize(("flag", "value", "bounds", "shown"), [
    ("--frequency-penalty", "inf", "-2 and 2", "inf"),
    ("--presence-penalty", "nan", "-2 and 2", "nan"),
    ("--frequency-penalty", "1e39", "-2 and 2", "1e+39"),
    ("--presence-penalty", "-2.5", "-2 and 2", "-2.5"),
    ("--temperature", "inf", "0 and 5", "inf"),
    ("--temperature", "6", "0 and 5", "6"),
    ("--top-k", "51", "1 and 50", "51"),
    ("--top-k", "7" * 400, "1 and 50", f"{'7' * 40}... (400 characters)"),  # was a traceback (OverflowError)
    ("--temperature", "1e300", "0 and 5", "1e+300"),
    ("--repetition-penalty", "3", "0 and 2", "3"),
])
def test_the_flags_take_the_ranges_the_api_takes(stories_hf: Path, flag: str, value: str, bounds: str,
                                                 shown: str) -> None:
    """The flags skipped the API's ranges: an infinite or NaN penalty crashed mid-generation with a traceback, or
    (greedy) printed "⁇ ⁇ ⁇" with exit 0; temperature inf sampled uniform noise. What the server refuses, generate
    now refuses before the model loads."""
    with pytest.raises(UsageError) as refused:
        params(f"{LLAMA}={stories_hf}", flag, value)
    assert str(refused.value) == f"{flag} must be between {bounds} (the range the API takes for {LLAMA}), got {shown}"


def test_the_api_ranges_ends_are_taken(stories_hf: Path) -> None:
    edge = params(f"{LLAMA}={stories_hf}", "--temperature", "5", "--frequency-penalty", "-2", "--presence-penalty",
                  "2", "--top-k", "50", "--repetition-penalty", "0")
    assert (edge.temperature, edge.frequency_penalty, edge.presence_penalty, edge.top_k) == (5, -2, 2, 50)
    assert edge.repetition_penalty == 1.0  # 0 = off, as the API reads it


def test_a_plain_path_is_prompted_as_serve_prompts_it(smollm2_gguf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A plain --model PATH runs under the Llama-2 card in serve (llama2, its default system prompt); generate took
    chatml for a vocabulary holding <|im_start|> (SmolLM2's), so the same seed did not give the server's text."""
    tokenizer = check_model_files(smollm2_gguf)  # as serve builds it
    loaded = SimpleNamespace(config=SimpleNamespace(max_seq_len=8192), model=None)
    monkeypatch.setattr(cli, "open_model", lambda *args, **kwargs: (loaded, tokenizer))
    prompts: list[list[int]] = []

    def generated(model: object, prompt_ids: list[int], *args: object, **kwargs: object) -> Iterator[int]:
        prompts.append(list(prompt_ids))
        yield from ()

    monkeypatch.setattr(engine_generate, "generate", generated)
    cli.main(["generate", "--model", str(smollm2_gguf), "--dtype", "fp32", "--seed", "1", QUESTION])
    (spec,) = served_model_specs([str(smollm2_gguf)])  # what serve runs for the same --model
    card = Catalog.load().get(spec.name or "")
    body = run_body_model(card).model_validate({"prompt": QUESTION})
    assert card.prompt_template == "llama2"
    assert prompts == [tokenizer.encode_segments(body.to_run(card).segments)]
