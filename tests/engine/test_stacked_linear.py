"""Stacked projections: q, k, v (and gate, up) packed end to end and read in one kernel call (StackedInt8Linear,
kernels.stack_packed, Transformer.stack_projections). What must hold: each output bitwise that of the layer's own
call, one copy of each weight, and a stale stack (a layer's weight replaced since) never used."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from int8serve.engine import chunking, kernels
from int8serve.engine.int8 import Int8Linear, StackedInt8Linear, quantize
from int8serve.engine.loader import load_model
from int8serve.engine.model import Transformer

pytestmark = pytest.mark.skipif(not kernels.available(), reason=f"our kernel: {kernels.unavailable_reason()}")


def packed(rows: int, cols: int, group_size: int, seed: int) -> kernels.PackedWeight:
    generator = torch.Generator().manual_seed(seed)
    return kernels.pack_weight(*quantize(torch.randn(rows, cols, generator=generator), group_size), group_size)


def linear(rows: int, cols: int, seed: int, group_size: int = 32) -> Int8Linear:
    layer = Int8Linear(cols, rows)
    generator = torch.Generator().manual_seed(seed)
    layer.set_quantized(*quantize(torch.randn(rows, cols, generator=generator), group_size), group_size)
    return layer


@pytest.mark.parametrize("group_size", [0, 32, 64])
def test_a_stacked_weight_is_its_parts_end_to_end_and_computes_each_row_as_its_part(group_size: int) -> None:
    # 100 and 37 rows are not whole tiles: their padding rows stay between the parts
    parts = [packed(100, 96, group_size, 1), packed(64, 96, group_size, 2), packed(37, 96, group_size, 3)]
    stacked, views, starts = kernels.stack_packed(parts)
    assert starts == [0, 128, 192] and stacked.out_features == 192 + 37 and stacked.in_features == 96
    assert torch.equal(stacked.data, torch.cat([p.data for p in parts]))
    base = stacked.data.data_ptr()
    assert [v.data.data_ptr() - base for v in views] == [0, parts[0].nbytes, parts[0].nbytes + parts[1].nbytes]
    assert stacked.data.data_ptr() % kernels.ALIGNMENT == 0
    for rows in (1, 3, 40):
        x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows))
        together = kernels.int8_gemv(x, stacked, precise=True)
        for part, start in zip(parts, starts, strict=True):
            alone = kernels.int8_gemv(x, part, precise=True)
            assert torch.equal(together[:, start:start + part.out_features], alone)
        for pad in (range(100, 128), range(192 + 37, 192 + 37)):  # padding rows: zero weights and scales
            assert not together[:, list(pad)].any()


def test_weights_already_end_to_end_in_one_storage_are_stacked_without_a_copy() -> None:
    parts = [packed(64, 96, 32, 1), packed(100, 96, 32, 2)]
    whole = torch.cat([p.data for p in parts])  # (torch's allocation is 64-byte aligned)
    adjacent = [kernels.adopt_packed(whole[:parts[0].nbytes], 64, 96, 32),
                kernels.adopt_packed(whole[parts[0].nbytes:], 100, 96, 32)]
    stacked, views, starts = kernels.stack_packed(adjacent)
    assert stacked.data.data_ptr() == whole.data_ptr() and stacked.nbytes == whole.numel()
    assert views == adjacent and starts == [0, 64]
    x = torch.randn(2, 96, generator=torch.Generator().manual_seed(7))
    assert torch.equal(kernels.int8_gemv(x, stacked)[:, 64:], kernels.int8_gemv(x, parts[1]))
    # not end to end (the other order): copied
    copied, _, _ = kernels.stack_packed(adjacent[::-1])
    assert copied.data.untyped_storage().data_ptr() != whole.untyped_storage().data_ptr()


def test_only_weights_of_the_same_inputs_and_scheme_stack() -> None:
    assert not kernels.can_stack([packed(64, 96, 32, 1)])  # one weight is no stack
    assert not kernels.can_stack([packed(64, 96, 32, 1), packed(64, 128, 32, 2)])
    assert not kernels.can_stack([packed(64, 96, 32, 1), packed(64, 96, 0, 2)])
    with pytest.raises(ValueError, match="same inputs and group size"):
        kernels.stack_packed([packed(64, 96, 32, 1), packed(64, 128, 32, 2)])
    assert not StackedInt8Linear.can_stack([linear(64, 96, 1), torch.nn.Linear(96, 64)])
    head = Int8Linear(96, 64, refine_top=4)  # a refined head's rows are recomputed after its call: not stacked
    head.set_packed(packed(64, 96, 32, 3))
    assert not StackedInt8Linear.can_stack([linear(64, 96, 1), head])


@pytest.mark.parametrize("rows", [1, 4, 33, 200])
def test_a_stacked_call_gives_each_layer_its_own_output(rows: int) -> None:
    """Decode rows (one kernel call), and rows the kernel does not take by default (33, 200: the layers one by one,
    on the dense path)."""
    layers = [linear(96, 160, 1), linear(40, 160, 2), linear(40, 160, 3)]
    x = torch.randn(2, rows, 160, generator=torch.Generator().manual_seed(4))
    expected = [layer(x) for layer in layers]
    stack = StackedInt8Linear(layers)
    got = stack(x)
    assert len(got) == 3
    for out, want, layer in zip(got, expected, layers, strict=True):
        assert out.shape == (2, rows, layer.out_features) and out.dtype == torch.float32
        assert torch.equal(out, want)
        assert torch.equal(layer(x), want)  # the layer reads its view of the stacked buffer: the same weight


def test_a_stacked_prefill_chunk_rounds_as_its_layers_do() -> None:
    """A chunk that is not row-exact rounds the kernel's outputs to bf16 (int8.kernel_matmul), stacked or not."""
    layers = [linear(64, 96, 1), linear(64, 96, 2)]
    x = torch.randn(1, 8, 96, generator=torch.Generator().manual_seed(5))
    chunk = chunking.PrefillChunk(rows=8, keys_end=8, row_exact=False)
    token = chunking.CURRENT.set(chunk)
    try:
        expected = [layer(x) for layer in layers]
        got = StackedInt8Linear(layers)(x)
    finally:
        chunking.CURRENT.reset(token)
    for out, want in zip(got, expected, strict=True):
        assert torch.equal(out, want)
        assert torch.equal(out, out.to(torch.bfloat16).float())  # rounded to bf16


def test_a_layer_whose_weight_is_replaced_is_never_read_from_the_stale_stack() -> None:
    layers = [linear(64, 96, 1), linear(64, 96, 2)]
    stack = StackedInt8Linear(layers)
    assert stack.current()
    layers[1].set_quantized(*quantize(torch.randn(64, 96, generator=torch.Generator().manual_seed(9)), 32), 32)
    assert not stack.current()
    x = torch.randn(1, 96, generator=torch.Generator().manual_seed(6))
    got = stack(x)
    assert torch.equal(got[1], layers[1](x)) and torch.equal(got[0], layers[0](x))


@pytest.fixture()
def stories(stories_hf: Path) -> Transformer:
    """A fresh int8 stories260K (the loader stacks its projections), not the session's shared one: tests unstack it."""
    return load_model(stories_hf, "int8").model


def unstacked(model: Transformer) -> None:
    for layer in model.layers:
        layer.attention.qkv = None
        layer.feed_forward.gate_up = None


def test_the_loader_stacks_each_layers_projections_and_keeps_one_copy_of_each_weight(stories: Transformer) -> None:
    layer = stories.layers[0]
    assert layer.attention.qkv is not None and layer.feed_forward.gate_up is not None
    assert layer.attention.qkv.layers == (layer.attention.wq, layer.attention.wk, layer.attention.wv)
    assert layer.feed_forward.gate_up.layers == (layer.feed_forward.w1, layer.feed_forward.w3)
    for stack in (layer.attention.qkv, layer.feed_forward.gate_up):
        buffer = stack.packed.data
        for part in stack.layers:  # each layer's weight is a view into the stacked buffer
            assert part.packed_data.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr()
    names = {name for name, _ in stories.named_buffers()} | set(stories.state_dict())
    assert not any(".qkv." in name or ".gate_up." in name for name in names)  # no second copy, no new names
    stacks = (layer.attention.qkv, layer.feed_forward.gate_up)
    assert stories.stack_projections() == 2 * len(stories.layers)  # idempotent: nothing copied again
    assert (layer.attention.qkv, layer.feed_forward.gate_up) == stacks


def test_stacked_and_unstacked_models_decode_and_prefill_the_same_bits(stories: Transformer) -> None:
    tokens = torch.tensor([[1, 403, 261, 378, 261, 297, 400, 262, 265, 286, 258, 346]])

    def run() -> list[torch.Tensor]:
        cache = stories.new_cache(2, 64)
        out = [stories(tokens, cache, [0], [0], all_logits=True)]
        nxt = out[0][:, -1].argmax(-1, keepdim=True)
        for step in range(4):  # two sequences decoding together, at different positions
            out.append(stories(torch.cat([nxt, nxt]), cache, [0, 1], [tokens.shape[1] + step, step]))
            nxt = out[-1][:1].argmax(-1, keepdim=True)
        return out

    stacked = run()
    unstacked(stories)
    plain = run()
    for a, b in zip(stacked, plain, strict=True):
        assert torch.equal(a, b)


def test_restacking_after_a_weight_is_replaced_uses_the_new_weight(stories: Transformer) -> None:
    attention = stories.layers[0].attention
    old = attention.qkv
    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(attention.wk.out_features, attention.wk.in_features, generator=generator)
    attention.wk.set_quantized(*quantize(weight, 32), 32)
    assert not old.current()
    assert stories.stack_projections() == 2 * len(stories.layers)
    assert attention.qkv is not old and attention.qkv.current()
    x = torch.randn(1, attention.wq.in_features, generator=generator)
    assert torch.equal(attention.qkv(x)[1], attention.wk(x))
