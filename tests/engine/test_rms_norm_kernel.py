"""RMSNorm of int8 models in one kernel call (engine/kernels/activation.py): the sum of squares in its documented
order (8 lanes, then a fixed tree), so the same bits on every path and for every row whatever comes with it, as close
to the exact value as torch's six ops; and the model uses it for int8 models only."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from int8serve.engine.kernels import activation
from int8serve.engine.model import RMSNorm

PATHS = [pytest.param(path, marks=pytest.mark.skipif(not activation.runs(path),
                                                      reason=f"this CPU cannot run the {path} path"))
         for path in ("avx512", "avx2", "scalar")]
EPS = 1e-5


def rows(count: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(count, dim, generator=generator) * 3
    x[0, : min(dim, 3)] = torch.tensor([200.0, -0.001, 1e-20])[: min(dim, 3)]  # an outlier, a tiny value
    return x, 0.5 + torch.rand(dim, generator=generator)


def documented_order(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The kernel's arithmetic one IEEE fp32 operation at a time (activation.cpp's comment), in numpy float32
    scalars (torch's 0-d tensor ops did not round every step to fp32: dims 200 and 576 came out 1 ulp off)."""
    f32 = np.float32
    out = np.empty(tuple(x.shape), dtype=f32)
    for r, row in enumerate(x.numpy()):
        lanes = [f32(0.0)] * 8
        for i, value in enumerate(row):
            lanes[i % 8] = f32(lanes[i % 8] + f32(value * value))
        total = f32(f32(f32(lanes[0] + lanes[1]) + f32(lanes[2] + lanes[3]))
                    + f32(f32(lanes[4] + lanes[5]) + f32(lanes[6] + lanes[7])))
        scale = f32(f32(1.0) / np.sqrt(f32(f32(total / f32(row.size)) + f32(eps))))
        out[r] = weight.numpy() * (row * scale)
    return torch.from_numpy(out)


def torch_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dim", [1, 7, 64, 100, 200, 576])  # below, at and past a vector, with tails
def test_every_path_follows_the_documented_order_bit_for_bit(path: str, dim: int) -> None:
    x, weight = rows(5, dim)
    assert torch.equal(activation.rms_norm(x, weight, EPS, path), documented_order(x, weight, EPS))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("dim", [4096, 4099])
def test_every_path_gives_the_scalar_bits_and_the_exact_value(path: str, dim: int) -> None:
    x, weight = rows(40, dim)
    got = activation.rms_norm(x, weight, EPS, path)
    assert torch.equal(got, activation.rms_norm(x, weight, EPS, "scalar"))
    exact = torch_rms_norm(x.double(), weight.double(), EPS)
    ours = ((got.double() - exact).abs() / exact.abs().clamp_min(1e-30)).max().item()
    theirs = ((torch_rms_norm(x, weight, EPS).double() - exact).abs() / exact.abs().clamp_min(1e-30)).max().item()
    assert ours <= max(2 * theirs, 1e-6)


def test_a_row_does_not_depend_on_the_rows_with_it() -> None:
    x, weight = rows(300, 4096)  # enough rows for both threads
    whole = activation.rms_norm(x.view(3, 100, 4096), weight, EPS)
    assert whole.shape == (3, 100, 4096)
    for start, stop in [(0, 1), (7, 9), (150, 300), (299, 300)]:
        assert torch.equal(activation.rms_norm(x[start:stop], weight, EPS), whole.view(300, 4096)[start:stop])


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="fp32"):
        activation.rms_norm(torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(3), EPS)
    with pytest.raises(ValueError, match="fp32"):
        activation.rms_norm(torch.ones(2, 3), torch.ones(4), EPS)
    with pytest.raises(ValueError, match="fp32"):
        activation.rms_norm(torch.ones(2, 0), torch.ones(0), EPS)


def test_int8_models_use_the_kernel_and_the_fp32_reference_keeps_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    x, weight = rows(4, 64)
    fused, plain = RMSNorm(64, EPS, kernel=True), RMSNorm(64, EPS)
    fused.weight.data.copy_(weight)
    plain.weight.data.copy_(weight)
    assert torch.equal(fused(x), activation.rms_norm(x, weight, EPS))
    assert torch.equal(plain(x), torch_rms_norm(x, weight, EPS))
    monkeypatch.setattr(activation, "available", lambda: False)  # no compiler: torch's ops, the same formula
    assert torch.equal(fused(x), plain(x))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("count, dim", [(1, 7), (4, 100), (4, 4096), (33, 576)])  # one thread and both
def test_the_fused_residual_add_gives_the_bits_of_the_add_then_the_norm(path: str, count: int, dim: int) -> None:
    x, weight = rows(count, dim)
    delta = torch.randn(count, dim, generator=torch.Generator().manual_seed(5)) * 0.01
    expected_x = x + delta
    expected = activation.rms_norm(expected_x, weight, EPS, path)
    stream = x.clone()
    got = activation.add_rms_norm(stream, delta, weight, EPS, path)
    assert torch.equal(stream, expected_x)  # the residual stream holds the sum, as torch's add gives it
    assert torch.equal(got, expected)
    assert torch.equal(got, documented_order(expected_x, weight, EPS))


def test_the_fused_residual_add_refuses_what_it_cannot_update_in_place() -> None:
    x, weight = rows(4, 8)
    with pytest.raises(ValueError, match="contiguous fp32"):
        activation.add_rms_norm(x.t().contiguous().t(), x, weight, EPS)  # not contiguous: no in-place update
    with pytest.raises(ValueError, match="contiguous fp32"):
        activation.add_rms_norm(x, x[:2], weight, EPS)
    with pytest.raises(ValueError, match="contiguous fp32"):
        activation.add_rms_norm(x.double(), x.double(), weight, EPS)
