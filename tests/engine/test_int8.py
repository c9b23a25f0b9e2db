"""Weight-only int8: the quantizer's arithmetic and the two kernel paths of Int8Linear."""

from __future__ import annotations

import pytest
import torch

from int8serve.engine import int8
from int8serve.engine.int8 import COMPUTE_DTYPE, Int8Linear, dequantize, quantize_per_channel


def test_quantize_is_symmetric_per_channel_with_bf16_exact_scales() -> None:
    torch.manual_seed(0)
    weight = torch.randn(48, 64) * torch.linspace(0.01, 3, 48)[:, None]
    weight[5] = 0.0  # an all-zero row must survive
    q, scales = quantize_per_channel(weight)
    assert q.dtype == torch.int8 and scales.dtype == torch.float32
    assert q.abs().max() <= 127
    assert torch.equal(scales.to(COMPUTE_DTYPE).float(), scales)  # exact in the kernel's dtype
    exact = weight.abs().amax(1) / 127
    assert torch.all(scales >= exact) and torch.all(scales <= exact * (1 + 2**-7))  # rounded up, by < 1 bf16 ulp
    assert torch.equal(q[5], torch.zeros(64, dtype=torch.int8))
    error = (dequantize(q, scales) - weight).abs()
    assert torch.all(error <= scales[:, None] / 2 + 1e-7)  # round to nearest


def make_layer(in_features: int, out_features: int, refine_top: int = 0) -> tuple[Int8Linear, torch.Tensor]:
    torch.manual_seed(in_features + out_features)
    weight = torch.randn(out_features, in_features)
    layer = Int8Linear(in_features, out_features, refine_top=refine_top)
    layer.set_quantized(*quantize_per_channel(weight))
    return layer, dequantize(layer.weight, layer.scale)


@pytest.mark.parametrize("rows", [1, 4, int8.DENSE_ROWS_THRESHOLD + 1, 64])
@pytest.mark.parametrize("in_features", [64, 172])  # 172 is not a multiple of 16: dense path at every size
def test_both_kernel_paths_match_the_dequantized_product(rows: int, in_features: int) -> None:
    layer, dense = make_layer(in_features, 96)
    x = torch.randn(rows, in_features)
    expected = x @ dense.T
    got = layer(x)
    assert got.dtype == torch.float32 and got.shape == (rows, 96)
    relative = (got - expected).norm() / expected.norm()
    assert relative < 1e-2  # bf16 activations and outputs


def test_refined_head_gives_exact_top_logits() -> None:
    layer, dense = make_layer(64, 300, refine_top=8)
    x = torch.randn(3, 64)
    expected = x @ dense.T
    got = layer(x)
    top = expected.topk(8, dim=-1).indices
    assert torch.allclose(got.gather(1, top), expected.gather(1, top), atol=1e-4, rtol=0)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_rows_do_not_depend_on_the_batch() -> None:
    layer, _ = make_layer(64, 300, refine_top=8)
    x = torch.randn(4, 64)
    together = layer(x)
    for i in range(4):
        assert torch.equal(layer(x[i:i + 1]), together[i:i + 1])


def test_set_quantized_rejects_wrong_shapes() -> None:
    layer = Int8Linear(64, 32)
    with pytest.raises(ValueError, match="expected"):
        layer.set_quantized(torch.zeros(32, 63, dtype=torch.int8), torch.ones(32))
    with pytest.raises(ValueError, match="scale"):
        layer.set_quantized(torch.zeros(32, 64, dtype=torch.int8), torch.ones(31))


def test_unaligned_weights_are_realigned() -> None:
    """A tensor read from a memory-mapped checkpoint can start at any byte; the kernel needs 64-byte alignment."""
    layer, dense = make_layer(64, 96)
    backing = torch.zeros(96 * 64 + 8, dtype=torch.int8)
    unaligned = backing[8:].view(96, 64)
    unaligned.copy_(layer.weight)
    assert unaligned.data_ptr() % 64
    layer.set_quantized(unaligned, layer.scale)
    assert layer.weight.data_ptr() % 64 == 0
    x = torch.randn(5, 64)
    assert (layer(x) - x @ dense.T).norm() / (x @ dense.T).norm() < 1e-2
