"""Decode plans (engine/decode_plan.py): a decode step's layers as precomputed kernel calls. What must hold: the same
bits as the modules (logits and every key and value written), at any batch and on GQA models and padded stacks; a
plan made again when a weight it points into is replaced; the modules used where a plan would hide something (hooks,
the profiler) or cannot run (a stale stack), and when INT8SERVE_DECODE_PLAN=off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from benchmarks.engine import LinearClock, build_random_int8_model, fill_cache
from torch import Tensor

from int8serve.engine import decode_plan, kernels
from int8serve.engine.config import ModelConfig
from int8serve.engine.int8 import Int8Linear, quantize
from int8serve.engine.kernels import attention as attention_kernel
from int8serve.engine.loader import LoadedModel, load_model
from int8serve.engine.model import KVCache, Transformer

pytestmark = pytest.mark.skipif(not (kernels.available() and attention_kernel.available()),
                                reason=f"our kernels: {kernels.unavailable_reason()}")

# GQA (8 heads, 2 kv heads: q, k, v of 64, 16, 16 rows: padding rows in the stack) and a hidden size of 200 (gate
# and up not whole tiles of 64)
ODD = ModelConfig(dim=64, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=300, hidden_dim=200, max_seq_len=96)


def decode(model: Transformer, steps: int, starts: list[int], seed: int = 0) -> tuple[list[Tensor], KVCache]:
    """`steps` decode steps of len(starts) rows from `starts` (slot i at starts[i]): the logits of each, the cache."""
    cache = model.new_cache(len(starts), max(starts) + steps + 1)
    fill_cache(cache)
    generator = torch.Generator().manual_seed(seed)
    logits = []
    for step in range(steps):
        tokens = torch.randint(3, model.config.vocab_size, (len(starts), 1), generator=generator)
        logits.append(model(tokens, cache, list(range(len(starts))), [s + step for s in starts]))
    return logits, cache


def plan_of(model: Transformer) -> decode_plan.DecodePlan:
    """The plan of a batch-1 step at position 0 on a new cache."""
    cache = model.new_cache(1, 8)
    model(torch.tensor([[5]]), cache, [0], [0])
    (plan,) = cache.decode_plans.values()
    return plan


def assert_same(planned: tuple[list[Tensor], KVCache], modules: tuple[list[Tensor], KVCache]) -> None:
    assert all(torch.equal(a, b) for a, b in zip(planned[0], modules[0], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(planned[1].k + planned[1].v, modules[1].k + modules[1].v, strict=True))


@pytest.fixture
def runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batch size of each step that ran through a plan."""
    seen: list[int] = []
    real = decode_plan.DecodePlan.run

    def spy(plan: decode_plan.DecodePlan, x: Tensor, step: object) -> Tensor:
        seen.append(plan.batch)
        return real(plan, x, step)

    monkeypatch.setattr(decode_plan.DecodePlan, "run", spy)
    return seen


def both_ways(model: Transformer, monkeypatch: pytest.MonkeyPatch, steps: int, starts: list[int]
              ) -> tuple[tuple[list[Tensor], KVCache], tuple[list[Tensor], KVCache]]:
    monkeypatch.setenv(decode_plan.ENV, "off")
    modules = decode(model, steps, starts)
    monkeypatch.delenv(decode_plan.ENV)
    return decode(model, steps, starts), modules


@pytest.mark.parametrize("kv_cache", ["bf16", "fp16", "int8"])
@pytest.mark.parametrize("starts", [[0], [7], [30, 3, 17], [5, 5, 40, 0]])
def test_a_plan_gives_the_modules_bits_on_gqa_and_padded_stacks(starts: list[int], kv_cache: str, runs: list[int],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_random_int8_model(ODD, group_size=32)
    model.set_kv_cache(kv_cache)
    planned, modules = both_ways(model, monkeypatch, 4, starts)
    assert planned[1].k[0].dtype == model.cache_dtype == {"bf16": torch.bfloat16, "fp16": torch.float16,
                                                                 "int8": torch.int8}[kv_cache]
    assert runs == [len(starts)] * 4  # every step of the second run through the plan, none of the first
    assert_same(planned, modules)


@pytest.mark.parametrize("name", ["stories_int8", "smollm2_int8"])
def test_a_plan_gives_the_modules_bits_on_real_models(name: str, request: pytest.FixtureRequest, runs: list[int],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    loaded: LoadedModel = request.getfixturevalue(name)
    planned, modules = both_ways(loaded.model, monkeypatch, 3, [12, 0, 33, 9])
    assert runs == [4] * 3
    assert_same(planned, modules)
    one_planned, one_modules = both_ways(loaded.model, monkeypatch, 2, [20])
    assert_same(one_planned, one_modules)


def test_a_plan_gives_the_modules_bits_with_an_int8_kv_cache_on_smollm2(smollm2_int8: LoadedModel, runs: list[int],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    model = smollm2_int8.model  # head_dim 64: the vector paths' int8 rows (2 groups of 32)
    model.set_kv_cache("int8")
    try:
        planned, modules = both_ways(model, monkeypatch, 2, [12, 0, 33, 9])
    finally:
        model.set_kv_cache("bf16")  # (a fixture of the whole session)
    assert runs == [4] * 2 and planned[1].k[0].dtype == torch.int8
    assert_same(planned, modules)


def test_a_replaced_weight_makes_the_plan_again_and_a_stale_stack_runs_the_modules(
        stories_hf: Path, runs: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    model = load_model(stories_hf, "int8").model  # its own copy: weights are replaced below
    cache = model.new_cache(1, 32)
    model(torch.tensor([[5]]), cache, [0], [0])
    (plan,) = cache.decode_plans.values()
    generator = torch.Generator().manual_seed(9)
    output = model.layers[1].attention.wo
    output.set_quantized(*quantize(torch.randn(output.out_features, output.in_features, generator=generator), 32), 32)
    assert not plan.current()
    planned, modules = both_ways(model, monkeypatch, 2, [3])
    assert_same(planned, modules)  # the new weight, in both
    plan = plan_of(model)
    down = model.layers[0].feed_forward.w2
    model.layers[0].feed_forward.w2 = replacement = Int8Linear(down.in_features, down.out_features)
    replacement.set_quantized(*quantize(torch.randn(down.out_features, down.in_features, generator=generator), 32), 32)
    assert not plan.current()  # another module where the plan had one
    planned, modules = both_ways(model, monkeypatch, 2, [3])
    assert_same(planned, modules)
    runs.clear()
    query = model.layers[0].attention.wq  # part of a stack: the stack is stale until stacked again
    query.set_quantized(*quantize(torch.randn(query.out_features, query.in_features, generator=generator), 32), 32)
    assert not decode_plan.usable(model)
    stale, modules = both_ways(model, monkeypatch, 2, [3])
    assert runs == [] and all(torch.equal(a, b) for a, b in zip(stale[0], modules[0], strict=True))
    model.stack_projections()
    restacked, modules_again = both_ways(model, monkeypatch, 2, [3])
    assert runs == [1, 1]
    assert_same(restacked, modules_again)
    assert torch.equal(restacked[0][0], stale[0][0])


def test_hooks_the_profiler_and_the_setting_send_steps_through_the_modules(
        runs: list[int], monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_random_int8_model(ODD, group_size=32)
    called: list[int] = []
    handle = model.layers[2].feed_forward.w2.register_forward_hook(lambda *_: called.append(1))
    decode(model, 2, [4])
    assert called == [1, 1] and runs == []  # the hook fired: the modules ran
    handle.remove()
    with torch.profiler.profile() as profile:
        decode(model, 1, [4])
    assert runs == [] and any(e.key == "int8serve::int8_gemv" for e in profile.key_averages())
    monkeypatch.setenv(decode_plan.ENV, "off")
    decode(model, 1, [4])
    assert runs == []
    monkeypatch.setenv(decode_plan.ENV, "sometimes")
    with pytest.raises(ValueError, match="INT8SERVE_DECODE_PLAN='sometimes'"):
        decode(model, 1, [4])
    monkeypatch.delenv(decode_plan.ENV)
    decode(model, 1, [4])
    assert runs == [1]


def test_a_slot_twice_at_one_position_is_refused_as_by_the_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_random_int8_model(ODD, group_size=32)
    cache = model.new_cache(2, 16)
    for setting in ("off", "auto"):
        monkeypatch.setenv(decode_plan.ENV, setting)
        with pytest.raises(ValueError, match="a slot twice at one position"):
            model(torch.tensor([[5], [6]]), cache, [1, 1], [3, 3])


def test_the_benchmarks_clock_splits_a_planned_step_and_its_hooks_leave_the_plan_running(runs: list[int]) -> None:
    model = build_random_int8_model(ODD, group_size=32)
    with LinearClock(model) as clock:
        decode(model, 2, [4, 9])  # the layers through the plan, the output head through its module (hooked)
        inside = clock.take()
        assert clock.take() == 0.0
    assert runs == [2, 2] and inside > 0
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())  # removed when it closed
    assert decode_plan.LINEAR_TIMER.get() is None
    timer = decode_plan.LinearTimer()
    token = decode_plan.LINEAR_TIMER.set(timer)
    try:
        decode(model, 1, [4])  # no hooks at all: the plan's own clock alone
    finally:
        decode_plan.LINEAR_TIMER.reset(token)
    assert timer.seconds > 0 and runs == [2, 2, 1]


def test_the_start_up_line_says_how_decode_steps_run(stories_fp32: LoadedModel,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    model = build_random_int8_model(ODD, group_size=32)
    assert decode_plan.describe(model).startswith("decode steps: each layer's kernel calls replayed from a plan")
    monkeypatch.setenv(decode_plan.ENV, "off")
    assert decode_plan.describe(model) == "decode steps: through the modules (INT8SERVE_DECODE_PLAN=off)"
    monkeypatch.delenv(decode_plan.ENV)
    monkeypatch.setenv(attention_kernel.ENV, "torch")
    assert decode_plan.describe(model) == "decode steps: through the modules (INT8SERVE_ATTENTION=torch)"
    monkeypatch.delenv(attention_kernel.ENV)
    assert decode_plan.describe(stories_fp32.model) == "decode steps: through the modules (the fp32 model)"
