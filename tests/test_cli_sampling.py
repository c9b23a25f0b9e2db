"""`int8serve generate` samples as `serve` does for the same card: a sampling flag left unset takes the card's
default (the built-in SmolLM2 card's temperature 0.2 and top_p 0.9, Llama-2's 0.6), a flag given wins."""

from __future__ import annotations

from pathlib import Path

import pytest

from int8serve.cli import UsageError, _sampling_params, build_parser, model_spec
from int8serve.engine.sampling_params import SamplingParams

SMOLLM2 = "@hf/huggingfacetb/smollm2-135m-instruct"
LLAMA = "@cf/meta/llama-2-7b-chat-int8"


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
    with pytest.raises(UsageError, match="top_p"):
        params(f"{LLAMA}={stories_hf}", "--top-p", "1.5")
