"""Sampling: greedy, seeds, filters and penalties with the semantics users expect from HF/OpenAI."""

from __future__ import annotations

import pytest
import torch

from int8serve.engine.sampling import Sampler
from int8serve.engine.sampling_params import SamplingParams


def draws(params: SamplingParams, logits: torch.Tensor, n: int = 50) -> list[int]:
    sampler = Sampler(params, logits.numel())
    return [sampler.sample(logits) for _ in range(n)]


def test_greedy_takes_the_argmax() -> None:
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert draws(SamplingParams(temperature=0), logits, 5) == [1] * 5


def test_same_seed_same_draws_and_different_seed_differs() -> None:
    logits = torch.randn(100)
    a = draws(SamplingParams(temperature=1.0, seed=42), logits)
    assert a == draws(SamplingParams(temperature=1.0, seed=42), logits)
    assert a != draws(SamplingParams(temperature=1.0, seed=43), logits)


def test_unseeded_samplers_get_different_seeds() -> None:
    assert Sampler(SamplingParams(), 10).seed != Sampler(SamplingParams(), 10).seed


def test_top_k_and_top_p_limit_the_candidates() -> None:
    logits = torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0, 0.0])
    assert set(draws(SamplingParams(temperature=5.0, top_k=2, seed=1), logits, 200)) == {0, 1}
    probs = torch.softmax(logits, -1)  # 0.636, 0.234, 0.086 ...: top_p 0.8 keeps the first two
    assert probs[:1].sum() < 0.8 <= probs[:2].sum()
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.8, seed=1), logits, 300)) == {0, 1}
    assert set(draws(SamplingParams(temperature=1.0, top_p=0.01, seed=1), logits, 50)) == {0}


def test_repetition_penalty_is_multiplicative_over_prompt_and_output() -> None:
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0), 4, prompt_ids=[0])
    sampler.observe(2)
    out = sampler._penalize(torch.tensor([4.0, 3.0, -1.0, 1.0]))
    assert out.tolist() == [2.0, 3.0, -2.0, 1.0]


def test_frequency_and_presence_penalties_are_additive_over_output() -> None:
    sampler = Sampler(SamplingParams(temperature=0, frequency_penalty=0.5, presence_penalty=1.0), 3, [1])
    for token in (0, 0, 2):
        sampler.observe(token)
    out = sampler._penalize(torch.zeros(3))
    assert out.tolist() == [-2.0, 0.0, -1.5]  # prompt tokens are not penalised


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
                                 dict(repetition_penalty=0), dict(seed=-5)])
def test_invalid_params_are_refused(bad: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**bad)


@pytest.mark.parametrize(("bad", "message"), [
    (dict(temperature=float("inf")), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(top_p=float("nan")), "top_p must be in"),
    (dict(repetition_penalty=float("inf")), "repetition_penalty must be a finite number > 0"),
    (dict(frequency_penalty=float("inf")), "frequency_penalty must be a finite number"),
    (dict(frequency_penalty=float("nan")), "frequency_penalty must be a finite number"),
    (dict(presence_penalty=float("-inf")), "presence_penalty must be a finite number"),
])
def test_non_finite_params_are_refused(bad: dict, message: str) -> None:
    """An infinite or NaN temperature or penalty reached the logits: sampling raised mid-generation ("probability
    tensor contains either inf, nan..."), greedy decoding picked token 0 every step, temperature inf sampled
    uniform noise."""
    with pytest.raises(ValueError, match=message):
        SamplingParams(**bad)


@pytest.mark.parametrize("params", [dict(temperature=1e-320), dict(temperature=1e-39), dict(temperature=1e-7),
                                    dict(temperature=1e-320, top_k=3), dict(temperature=1e-39, top_p=0.5),
                                    dict(temperature=0.7, repetition_penalty=1e-320),
                                    dict(temperature=1e-320, repetition_penalty=1e-320, top_k=2, top_p=0.9)])
def test_tiny_temperatures_and_penalties_sample_the_most_likely_token(params: dict) -> None:
    """Values the API admits (1e-320 is within 0-5): dividing by them overflows the logits to infinity, which
    made softmax NaN and torch.multinomial raise."""
    logits = torch.tensor([0.5, 3.0, -2.0, 2.9, 1.0])
    sampler = Sampler(SamplingParams(seed=7, **params), logits.numel(), prompt_ids=[1])
    picked = [sampler.sample(logits) for _ in range(20)]
    if params.get("repetition_penalty"):  # the seen token's logit saturates at the largest float: it wins
        assert torch.isfinite(sampler._penalize(logits.clone())).all()
        assert picked == [1] * 20
    else:
        assert picked == [1] * 20  # as good as greedy: the distance to the best, divided by ~0, is -inf


def test_an_ordinary_temperature_keeps_its_bits() -> None:
    """The overflow-safe form is taken only where the plain one overflows, so seeded draws do not change."""
    logits = torch.randn(1000) * 20
    sampler = Sampler(SamplingParams(temperature=0.3, seed=1), logits.numel())
    assert torch.equal(sampler._scaled(logits), logits / 0.3)
