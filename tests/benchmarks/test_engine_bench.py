"""benchmarks/engine.py's split of a decode step into its Int8Linear calls and the rest, on a tiny random model."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch

from benchmarks import engine
from int8serve.engine.int8 import DEFAULT_GROUP_SIZE

TINY = dataclasses.replace(engine.LLAMA2_7B, dim=64, n_heads=4, n_kv_heads=4, hidden_dim=96, vocab_size=320,
                           n_layers=2, max_seq_len=256)


@pytest.fixture(scope="module")
def model() -> engine.Transformer:
    return engine.build_random_int8_model(TINY, group_size=DEFAULT_GROUP_SIZE)


def test_the_clock_counts_only_the_time_inside_the_linears(model: engine.Transformer) -> None:
    linears = engine.int8_linears(model)
    assert len(linears) == 7 * TINY.n_layers + 1  # q k v o, gate up down, and the output head
    clock = engine.LinearClock(model)
    try:
        x = torch.randn(1, 1, TINY.dim)
        started = time.perf_counter()
        linears[0](x)
        time.sleep(0.05)  # outside any linear: not counted
        linears[1](x)
        elapsed = time.perf_counter() - started
        inside = clock.take()
        assert 0 < inside < elapsed - 0.05
        assert clock.take() == 0.0  # take() starts again from zero
    finally:
        clock.close()
    linears[0](x)
    assert clock.take() == 0.0  # closed: the hooks are gone


def test_a_split_decode_step_has_its_linears_inside_it(model: engine.Transformer) -> None:
    cache = model.new_cache(4, 64)
    engine.fill_cache(cache)
    for slots, starts in (([0], [8]), ([0, 1, 2, 3], [8, 6, 4, 2])):
        timing = engine.time_decode(model, cache, slots, starts, steps=3, probe=None, warmup=1, split=True)
        assert len(timing.seconds) == len(timing.linear_seconds) == 3
        assert all(0 < inside < step for inside, step in zip(timing.linear_seconds, timing.seconds, strict=True))
        assert 0 < timing.rest_share < 1
        assert timing.bandwidths == []  # no probe, no samples
    assert not any(linear._forward_hooks or linear._forward_pre_hooks for linear in engine.int8_linears(model))


def test_a_stacked_call_is_one_linear_call_and_its_layers_are_not_counted_twice(model: engine.Transformer) -> None:
    calls = engine.decode_linears(model)
    assert len(calls) == 4 * TINY.n_layers + 1  # qkv, o, gate+up, down, and the output head
    stack = model.layers[0].attention.qkv
    assert stack is not None and calls[0] is stack
    clock = engine.LinearClock(model)
    try:
        x = torch.randn(1, 200, TINY.dim)  # rows our kernel does not take: the stack calls its layers one by one
        started = time.perf_counter()
        stack(x)
        elapsed = time.perf_counter() - started
        assert 0 < clock.take() <= elapsed  # the layers' hooks ran inside the stack's: counted once
    finally:
        clock.close()
