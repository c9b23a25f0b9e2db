"""The feed-forward gate kernel (engine/kernels/activation.py): silu(gate) * up, the same bits on every path and
for every row whatever comes with it, as close to the exact value as torch's own SiLU."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from int8serve.engine.kernels import activation

PATHS = [pytest.param(path, marks=pytest.mark.skipif(not activation.runs(path),
                                                      reason=f"this CPU cannot run the {path} path"))
         for path in ("avx512", "avx2", "scalar")]


def inputs(rows: int, width: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(rows, width, generator=generator) * 4, torch.randn(rows, width, generator=generator)


def test_the_library_is_built_here() -> None:
    assert activation.available(), "a C++ compiler is on every machine that runs this suite"


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("width", [1, 7, 172, 11008])  # tails of every vector width; stories260K's 172; the 7B's
def test_every_path_gives_the_scalar_bits_and_the_exact_value(path: str, width: int) -> None:
    gate, up = inputs(33, width)
    got = activation.silu_mul(gate, up, path)
    assert torch.equal(got, activation.silu_mul(gate, up, "scalar"))
    exact = F.silu(gate.double()) * up.double()
    ours = ((got.double() - exact).abs() / exact.abs().clamp_min(1e-30)).max().item()
    torch_error = (((F.silu(gate) * up).double() - exact).abs() / exact.abs().clamp_min(1e-30)).max().item()
    assert ours <= max(4 * torch_error, 1e-6)


def test_a_row_does_not_depend_on_the_rows_with_it() -> None:
    gate, up = inputs(300, 11008)  # more than one thread's share
    whole = activation.silu_mul(gate, up)
    for start, stop in [(0, 1), (7, 9), (150, 300), (299, 300)]:
        assert torch.equal(activation.silu_mul(gate[start:stop], up[start:stop]), whole[start:stop])


def test_extremes_stay_finite_where_the_exact_value_is() -> None:
    gate = torch.tensor([-1000.0, -88.0, -87.0, -10.0, 0.0, 10.0, 87.0, 88.0, 1000.0])
    got = activation.silu_mul(gate, torch.ones_like(gate))
    assert torch.isfinite(got).all()
    assert torch.allclose(got, F.silu(gate), rtol=1e-6, atol=1e-30)


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(ValueError, match="fp32 of one shape"):
        activation.silu_mul(torch.ones(2, 3), torch.ones(3, 2))
    with pytest.raises(ValueError, match="fp32 of one shape"):
        activation.silu_mul(torch.ones(2, 3, dtype=torch.bfloat16), torch.ones(2, 3, dtype=torch.bfloat16))


def test_the_setting_chooses_the_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(activation.ENV, raising=False)
    widest = activation.resolve("auto")
    assert activation.resolve() == widest and widest in {"avx512", "avx2", "scalar"}
    monkeypatch.setenv(activation.ENV, "scalar")
    assert activation.resolve() == "scalar"
    gate, up = inputs(3, 100)
    assert torch.equal(activation.silu_mul(gate, up), activation.silu_mul(gate, up, "auto"))
    monkeypatch.setenv(activation.ENV, "avx3")
    with pytest.raises(ValueError, match="INT8SERVE_ACTIVATION='avx3'"):
        activation.silu_mul(gate, up)


@pytest.mark.skipif(activation.runs("avx512"), reason="this CPU runs every path: none can be refused")
def test_a_forced_path_the_cpu_lacks_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(activation.ENV, "avx512")
    with pytest.raises(RuntimeError, match="cannot run the avx512 SiLU path"):
        activation.resolve()
    with pytest.raises(RuntimeError, match="INT8SERVE_ACTIVATION"):
        activation.silu_mul(*inputs(2, 16))


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("rows", [1, 4, 9])  # a decode step's rows: 1 and 4 thread alike at 11008, 9 splits rows
def test_rows_read_in_place_from_a_stacked_output_give_the_contiguous_bits(path: str, rows: int) -> None:
    hidden = 11008
    gate, up = inputs(rows, hidden, seed=rows)
    stacked = torch.cat([gate, up], dim=1)  # [rows, 2 * hidden], as a stacked gate/up projection writes them
    views = stacked[:, :hidden], stacked[:, hidden:]
    assert rows == 1 or not views[0].is_contiguous()
    got = activation.silu_mul(*views, path)
    assert got.is_contiguous() and got.shape == (rows, hidden)
    assert torch.equal(got, activation.silu_mul(gate, up, "scalar"))
    assert torch.equal(stacked, torch.cat([gate, up], dim=1))  # the inputs are only read


def test_rows_with_different_strides_are_copied_first() -> None:
    gate, up = inputs(3, 40)
    wide = torch.zeros(3, 100)
    wide[:, :40] = up
    assert torch.equal(activation.silu_mul(gate, wide[:, :40]), activation.silu_mul(gate, up))
    assert activation.silu_mul(torch.ones(0, 5), torch.ones(0, 5)).shape == (0, 5)


def test_the_rows_entry_point_refuses_overlapping_rows() -> None:
    lib = activation._library()
    gate = torch.ones(2, 8)
    out = torch.empty(2, 8)
    status = lib.i8e_silu_mul_rows(gate.data_ptr(), gate.data_ptr(), out.data_ptr(), 2, 8, 4, 8, 0, 1)  # stride < n
    assert status == -3
