"""The int8 KV cache's rows (engine/kv_int8.py): their layout, the rounding, and that the attention kernel stores
exactly the bytes kv_int8.quantize makes, on every path this CPU runs, edge values included."""

from __future__ import annotations

import pytest
import torch

from int8serve.engine import kv_int8
from int8serve.engine.kernels import attention
from int8serve.engine.model import rope_tables


@pytest.mark.parametrize(("head_dim", "width"), [(128, 144), (64, 72), (8, 12), (6, 12), (40, 48), (33, 44)])
def test_a_row_is_the_values_then_a_scale_per_32_from_a_multiple_of_4(head_dim: int, width: int) -> None:
    assert kv_int8.width(head_dim) == width
    assert kv_int8.row_size(head_dim, torch.int8) == width and kv_int8.row_size(head_dim, torch.bfloat16) == head_dim


def test_each_group_rounds_half_to_even_within_half_a_step_of_its_own_maximum() -> None:
    x = torch.randn(5, 3, 40) * torch.logspace(-3, 3, 40)  # groups of very different magnitudes
    rows = kv_int8.quantize(x)
    assert rows.dtype == torch.int8 and rows.shape == (5, 3, kv_int8.width(40))
    back = kv_int8.dequantize(rows, 40)
    scale = torch.cat([x[..., :32].abs().amax(-1, keepdim=True).expand(-1, -1, 32),
                       x[..., 32:].abs().amax(-1, keepdim=True).expand(-1, -1, 8)], -1) / 127
    assert ((back - x).abs() <= scale / 2 * (1 + 1e-6)).all()
    assert rows[..., :40].abs().max() == 127  # each group's largest value takes the whole range
    # ties go to even: 2.5 and 3.5 steps of a group whose maximum is 127 steps
    tie = torch.tensor([127.0, 2.5, 3.5, -2.5] + [0.0] * 28)
    assert kv_int8.quantize(tie)[:4].tolist() == [127, 2, 4, -2]


def test_zeros_and_non_finite_values_are_stored_as_defined() -> None:
    zeros = kv_int8.quantize(torch.zeros(2, 64))
    assert not zeros.any()  # values and scales: all zero bytes, so a zeroed cache reads as zeros
    assert torch.equal(kv_int8.dequantize(zeros, 64), torch.zeros(2, 64))
    nan = torch.tensor([float("nan"), 1.0] + [0.5] * 30)
    row = kv_int8.quantize(nan)
    assert row[0] == 0 and row[1] == 127 and kv_int8.dequantize(row, 32)[1] == 1.0  # a NaN never sets the scale


def edge_values(dim: int) -> torch.Tensor:
    """Rows of values a cache must store as kv_int8.quantize does: ordinary, zeros, ties, huge, tiny, non-finite."""
    g = torch.Generator().manual_seed(1)
    rows = [torch.randn(dim, generator=g), torch.zeros(dim), torch.full((dim,), 3.0),
            torch.randn(dim, generator=g) * 1e30, torch.randn(dim, generator=g) * 1e-40,
            torch.arange(dim, dtype=torch.float32) - dim / 2]
    special = torch.randn(dim, generator=g)
    special[0], special[min(3, dim - 1)] = float("nan"), float("inf")
    rows.append(special)
    return torch.stack(rows)


@pytest.mark.parametrize("path", ["avx512", "avx2", "scalar"])
@pytest.mark.parametrize("dim", [128, 64, 8, 40])
def test_the_kernel_stores_the_bytes_of_kv_int8_quantize(path: str, dim: int) -> None:
    if path not in attention.cpu_paths():
        pytest.skip(f"this CPU cannot run the {path} path (it runs {attention.cpu_paths()})")
    values = edge_values(dim)  # one row a slot; values are stored as they come (keys after rope)
    batch = values.shape[0]
    cos, sin = rope_tables(dim, 16, 10000.0)
    cache_k = torch.zeros(batch, 1, 16, kv_int8.width(dim), dtype=torch.int8)
    cache_v = torch.zeros_like(cache_k)
    positions = torch.arange(batch, dtype=torch.int64) % 16
    attention.decode_attention(torch.zeros(batch, 1, dim), torch.zeros(batch, 1, dim), values[:, None].contiguous(),
                               cos, sin, torch.arange(batch), positions, cache_k, cache_v, path)  # type: ignore[arg-type]
    for row in range(batch):
        assert torch.equal(cache_v[row, 0, int(positions[row])], kv_int8.quantize(values[row])), row


@pytest.mark.parametrize("dim", [128, 64, 8, 40])
def test_the_kernels_quantize_and_dequantize_give_kv_int8s_bits(dim: int) -> None:
    """The torch path's fast calls (attention.quantize_into, dequantize_rows: a cache slot's slice, strided values as
    a projection's output gives them) against kv_int8's torch ops, edge values included."""
    values = torch.randn(20, 3, dim) * torch.logspace(-3, 3, dim)  # [T, Hkv, D], read as [Hkv, T, D]
    values[2, 1, 0], values[5, 0, -1], values[7] = float("nan"), float("inf"), 0.0
    cache = torch.zeros(2, 3, 40, kv_int8.width(dim), dtype=torch.int8)
    attention.quantize_into(cache[1, :, 11:31], values.transpose(0, 1))
    assert torch.equal(cache[1, :, 11:31], kv_int8.quantize(values.transpose(0, 1)))
    assert not cache[0].any() and not cache[1, :, :11].any() and not cache[1, :, 31:].any()  # nothing else written
    # (the group with an inf has scale inf: its values come back NaN, whose payload torch's own bf16 conversions do
    # not agree on; every other value is compared bit for bit)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):  # fp16: a dtype the C++ call leaves to torch
        got, want = attention.dequantize_rows(cache[1, :, :31], dim, dtype), kv_int8.dequantize(cache[1, :, :31], dim,
                                                                                                 dtype)
        assert got.dtype == dtype and torch.equal(got.isnan(), want.isnan()) and got.isnan().any()
        assert torch.equal(got.nan_to_num(0.0), want.nan_to_num(0.0))
