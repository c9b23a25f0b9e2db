"""Weight-only int8: the quantizers' arithmetic and the paths of Int8Linear (our kernel with its packed weight, the
dense path that dequantizes from it, and torch's stock kernels when our kernel is unavailable)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from int8serve.engine import chunking, int8, kernels
from int8serve.engine.int8 import COMPUTE_DTYPE, Int8Linear, dequantize, quantize, quantize_per_channel
from int8serve.engine.kernels import matmul as prefill_matmul


def test_quantize_is_symmetric_per_channel_with_bf16_exact_scales() -> None:
    torch.manual_seed(0)
    weight = torch.randn(48, 64) * torch.linspace(0.01, 3, 48)[:, None]
    weight[5] = 0.0  # an all-zero row must survive
    q, scales = quantize_per_channel(weight)
    assert q.dtype == torch.int8 and scales.dtype == torch.float32 and scales.shape == (48,)
    assert q.abs().max() <= 127
    assert torch.equal(scales.to(COMPUTE_DTYPE).float(), scales)  # exact in the kernel's dtype
    exact = weight.abs().amax(1) / 127
    # absmax / 127 rounded up to bf16, or one of the two bf16 values below it (within 3 bf16 ulps)
    assert torch.all(scales <= exact * (1 + 2**-7)) and torch.all(scales >= exact * (1 - 2**-6))
    assert torch.equal(q[5], torch.zeros(64, dtype=torch.int8)) and scales[5] == 0
    error = (dequantize(q, scales) - weight).abs()
    unclamped = q.abs() < 127
    assert torch.all(error[unclamped] <= (scales[:, None] / 2 + 1e-7).expand_as(error)[unclamped])  # nearest


def test_the_scale_is_the_least_squares_choice_among_bf16_neighbours() -> None:
    torch.manual_seed(2)
    weight = torch.randn(256, 96)
    q, scales = quantize(weight, 32)
    error = ((dequantize(q, scales) - weight) ** 2).view(256, 3, 32).sum(-1)
    up = int8._bf16_up(weight.view(256, 3, 32).abs().amax(-1) / 127)  # the plain absmax scale, rounded up
    plain = (torch.round(weight.view(256, 3, 32) / up[..., None]) * up[..., None] - weight.view(256, 3, 32))
    plain_error = (plain ** 2).sum(-1)
    assert torch.all(error <= plain_error)  # never worse per group ...
    assert error.sum() < 0.97 * plain_error.sum()  # ... and better overall
    assert (scales < up).any() and (scales == up).any()


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_quantize_per_group_has_a_scale_per_group_of_inputs(group_size: int) -> None:
    torch.manual_seed(1)
    weight = torch.randn(20, 172) * torch.rand(1, 172) * 3  # columns of different magnitudes
    weight[3, :group_size] = 0.0  # an all-zero group
    q, scales = quantize(weight, group_size)
    groups = -(-172 // group_size)
    assert q.shape == (20, 172) and scales.shape == (20, groups)
    assert torch.equal(scales.to(COMPUTE_DTYPE).float(), scales)
    padded = torch.nn.functional.pad(weight, (0, groups * group_size - 172)).view(20, groups, group_size)
    exact = padded.abs().amax(-1) / 127
    assert torch.all(scales <= exact * (1 + 2**-7)) and torch.all(scales >= exact * (1 - 2**-6))
    assert not q[3, :group_size].any()
    per_group = dequantize(q, scales)
    per_channel = dequantize(*quantize_per_channel(weight))
    assert (per_group - weight).norm() < (per_channel - weight).norm()  # finer scales, smaller error
    half_step = scales.repeat_interleave(group_size, 1)[:, :172] / 2 + 1e-7
    unclamped = q.abs() < 127
    assert torch.all((per_group - weight).abs()[unclamped] <= half_step[unclamped])


def make_layer(in_features: int, out_features: int, refine_top: int = 0,
               group_size: int = 0) -> tuple[Int8Linear, torch.Tensor]:
    torch.manual_seed(in_features + out_features)
    weight = torch.randn(out_features, in_features)
    layer = Int8Linear(in_features, out_features, refine_top=refine_top)
    layer.set_quantized(*quantize(weight, group_size), group_size)
    return layer, dequantize(*layer.quantized())


@pytest.fixture
def stock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers made in this test keep the plain weight for torch's kernels, as without a C++ compiler."""
    monkeypatch.setattr(kernels, "available", lambda: False)


def test_the_layer_keeps_only_the_packed_copy() -> None:
    layer, dense = make_layer(172, 96, group_size=32)
    assert layer.packed is not None and layer.weight is None and layer.scale is None
    assert [b.data_ptr() for b in layer.buffers()] == [layer.packed.data.data_ptr()]  # the scales are within
    assert layer.weight_nbytes == layer.packed.nbytes == 128 * 192 + 2 * 128 * 6
    q, scales = layer.quantized()  # read back through the packed copy
    assert torch.equal(dequantize(q, scales), dense) and scales.shape == (96, 6)


@pytest.mark.parametrize("group_size", [0, 32])
@pytest.mark.parametrize("rows", [1, 4, 33, 64, 129])
@pytest.mark.parametrize("in_features", [64, 172])
def test_kernel_and_dense_paths_match_the_dequantized_product(rows: int, in_features: int, group_size: int) -> None:
    layer, dense = make_layer(in_features, 96, group_size=group_size)
    x = torch.randn(rows, in_features)
    expected = x @ dense.T
    got = layer(x)
    assert got.dtype == torch.float32 and got.shape == (rows, 96)
    relative = (got - expected).norm() / expected.norm()
    if rows <= int8.kernel_rows() and int8.PRECISE_ACTIVATIONS:
        assert relative < 1e-4  # ~16-bit activations, fp32 accumulation
    else:
        assert relative < 1e-2  # 8-bit activations or bf16 dense


@pytest.mark.usefixtures("stock")
@pytest.mark.parametrize("group_size", [0, 32])
@pytest.mark.parametrize("rows", [1, 4, int8.DENSE_ROWS_THRESHOLD + 1])
@pytest.mark.parametrize("in_features", [64, 172])  # 172 is not a multiple of 16: dense path at every size
def test_stock_paths_match_the_dequantized_product(rows: int, in_features: int, group_size: int) -> None:
    layer, dense = make_layer(in_features, 96, group_size=group_size)
    assert layer.packed is None and layer.weight is not None
    x = torch.randn(rows, in_features)
    expected = x @ dense.T
    assert (layer(x) - expected).norm() / expected.norm() < 1e-2  # bf16 activations and outputs


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("group_size", [0, 32])
def test_refined_head_gives_exact_top_logits(kernel: bool, group_size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    if not kernel:
        monkeypatch.setattr(kernels, "available", lambda: False)
    layer, dense = make_layer(64, 300, refine_top=8, group_size=group_size)
    x = torch.randn(3, 64)
    expected = x @ dense.T
    got = layer(x)
    top = expected.topk(8, dim=-1).indices
    assert torch.allclose(got.gather(1, top), expected.gather(1, top), atol=1e-4, rtol=0)
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("group_size", [0, 32])
@pytest.mark.parametrize("in_features", [64, 71])
def test_the_residual_is_4_bit_values_two_a_byte_within_half_a_step(group_size: int, in_features: int) -> None:
    torch.manual_seed(in_features)
    error = torch.randn(5, in_features) * torch.rand(5, 1)
    error[2] = 0.0  # an all-zero row stays zero
    codes, scales = int8.quantize_residual(error, group_size)
    assert codes.dtype == torch.uint8 and codes.shape == (5, -(-in_features // 2))
    assert scales.dtype == torch.bfloat16 and scales.shape == (5, kernels.weight_groups(in_features, group_size))
    values = int8.residual_values(codes, in_features)
    assert values.shape == (5, in_features) and values.abs().max() <= int8.RESIDUAL_LEVELS
    size = group_size or in_features
    per_input = scales.float().repeat_interleave(size, dim=1)[:, :in_features]
    assert torch.all((values * per_input - error).abs() <= per_input * 0.5 * (1 + 2**-7) + 1e-9)
    assert not values[2].any() and not scales[2].any()
    assert int(codes[0, 0] & 15) - 8 == values[0, 0] and int(codes[0, 0] >> 4) - 8 == values[0, 1]  # low first


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("group_size", [0, 32])
def test_a_head_with_its_residual_refines_from_the_original_weight(kernel: bool, group_size: int,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The residual (the rounding error in 4 bits) brings the refined logits ~14x closer to the full-precision
    weight's than the int8 rows alone; the others stay the int8 weight's."""
    if not kernel:
        monkeypatch.setattr(kernels, "available", lambda: False)
    layer, _ = make_layer(64, 300, refine_top=8, group_size=group_size)
    torch.manual_seed(64 + 300)
    original = torch.randn(300, 64)  # make_layer's weight
    x = torch.randn(3, 64)
    without = layer(x)
    layer.set_residual(original)
    assert layer.residual is not None and layer.residual.dtype == torch.uint8 and layer.residual.shape == (300, 32)
    groups = kernels.weight_groups(64, group_size)
    assert layer.residual_scale is not None and layer.residual_scale.shape == (300, groups)
    got = layer(x)
    exact = x @ original.T
    top = got.topk(8, dim=-1).indices
    residual_error = (got.gather(1, top) - exact.gather(1, top)).abs().max()
    int8_error = (without.gather(1, top) - exact.gather(1, top)).abs().max()
    assert residual_error < int8_error / 5, (residual_error, int8_error)
    rest = torch.ones_like(got, dtype=torch.bool).scatter_(1, top, False)
    assert torch.equal(got[rest], without[rest])  # only the refined logits change


def test_only_the_refined_head_keeps_a_residual_of_its_own_shape() -> None:
    layer, dense = make_layer(64, 96, group_size=32)
    with pytest.raises(ValueError, match="output head"):
        layer.set_residual(dense)
    head, dense = make_layer(64, 96, refine_top=4, group_size=32)
    with pytest.raises(ValueError, match="shape"):
        head.set_residual(dense.T.contiguous())
    with pytest.raises(ValueError, match="uint8"):
        head.set_residual_quantized(torch.zeros(96, 64, dtype=torch.int8), torch.ones(96, 2))
    with pytest.raises(ValueError, match="residual scales"):
        head.set_residual_quantized(torch.zeros(96, 32, dtype=torch.uint8), torch.ones(96, 3))
    head.set_residual(dense * 1.01)
    assert head.residual is not None
    head.set_quantized(*quantize(dense, 32), 32)  # a new weight: the old one's error no longer applies
    assert head.residual is None and head.residual_scale is None


@pytest.mark.parametrize("group_size", [0, 32])
def test_rows_do_not_depend_on_the_batch(group_size: int) -> None:
    layer, _ = make_layer(64, 300, refine_top=8, group_size=group_size)
    x = torch.randn(4, 64)
    together = layer(x)
    for i in range(4):
        assert torch.equal(layer(x[i:i + 1]), together[i:i + 1])


@pytest.mark.parametrize("chunk_rows", [32, 33, 128, 129])
def test_a_prefill_chunk_chooses_the_path_by_its_aligned_rows(chunk_rows: int) -> None:
    """Rows computed as part of an aligned chunk of `chunk_rows` give the same bits whatever part is given."""
    layer, _ = make_layer(172, 96, group_size=32)
    x = torch.randn(chunk_rows, 172)
    token = chunking.CURRENT.set(chunking.PrefillChunk(rows=chunk_rows, keys_end=chunk_rows))
    try:
        whole = layer(x)
        tail = layer(x[-3:])
    finally:
        chunking.CURRENT.reset(token)
    assert torch.equal(tail, whole[-3:])
    assert layer.packed is not None
    kernel = kernels.int8_gemv(x[-3:], layer.packed, precise=int8.PRECISE_ACTIVATIONS).to(COMPUTE_DTYPE).float()
    assert torch.equal(kernel, tail) == (chunk_rows <= int8.kernel_rows())  # prefill chunks round to bf16


def test_our_kernel_takes_the_calls_of_each_path_by_default_and_by_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    """By default our kernel takes every call on the vnni512, avx2 and avxvnni paths (row-exact prefill: their GEMMs,
    int8.py has the figures) and calls of up to 32 rows on the amx path, beside which the AMX-BF16 kernel is much
    faster for more; INT8SERVE_PREFILL_MATMUL=row-exact gives the amx path every call too (its AMX-INT8 GEMM),
    =bf16 gives the other paths' long calls to the bf16 kernel where the CPU has it, and =dense gives every path's
    prefill back to the dense path."""
    for path in kernels.PATHS:
        if not kernels.cpu_has(path):
            continue
        monkeypatch.setenv(kernels.ENV_PATH, path)
        monkeypatch.delenv(prefill_matmul.ENV, raising=False)
        assert int8.KERNEL_ROWS == 32
        every_call = path in ("vnni512", "avx2", "avxvnni")
        assert int8.kernel_rows() == (int8.ALL_ROWS if every_call else int8.KERNEL_ROWS), path
        monkeypatch.setenv(prefill_matmul.ENV, " Row-Exact ")  # as the other settings: case and spaces do not matter
        assert prefill_matmul.row_exact_requested()
        assert int8.kernel_rows() == (int8.ALL_ROWS if every_call or path == "amx" else int8.KERNEL_ROWS), path
        monkeypatch.setenv(prefill_matmul.ENV, "bf16")
        bf16_kernel = prefill_matmul.available()  # (the CPU's, whatever path INT8SERVE_KERNEL holds our kernel to)
        assert int8.kernel_rows() == (int8.ALL_ROWS if every_call and not bf16_kernel else int8.KERNEL_ROWS), path
        assert prefill_matmul.setting_problem() is None
        monkeypatch.setenv(prefill_matmul.ENV, "dense")
        assert int8.kernel_rows() == int8.KERNEL_ROWS, path


def test_the_bf16_setting_without_a_bf16_kernel_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    """INT8SERVE_PREFILL_MATMUL=bf16 on a CPU without AMX-BF16 or AVX512-BF16 (the avx2 path's CPUs): prefill stays
    our kernel's, every call, and the start line says why the bf16 kernel is not used."""
    monkeypatch.setenv(kernels.ENV_PATH, "avx2")
    monkeypatch.setenv(prefill_matmul.ENV, "bf16")
    monkeypatch.setattr(prefill_matmul, "available", lambda: False)
    monkeypatch.setattr(prefill_matmul, "unavailable_reason", lambda: "this CPU has neither AMX-BF16 nor AVX512-BF16")
    assert int8.kernel_rows() == int8.ALL_ROWS
    line = int8.describe_dense()
    assert "our int8 kernel's avx2 path, every call" in line
    assert "=bf16 asked for our bf16 kernel, which is not used here: this CPU has neither" in line


@pytest.mark.parametrize("path", ["avx2", "avxvnni", "vnni512"])
def test_the_gemm_paths_multiply_every_prefill_row_as_decode_does(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """On the avx2 path (every x86 CPU can run it), the avxvnni and the vnni512 paths a 128-row prefill chunk and a
    300-row forward go through our kernel's GEMM: each row has the bits of that row alone through the kernel
    (decode's), and the start line says so; with INT8SERVE_PREFILL_MATMUL=dense they dequantize for the dense matmul
    instead, and on the vnni512 path with =bf16 they take the bf16 kernel where the CPU has it."""
    if not kernels.cpu_has(path):
        pytest.skip(f"this CPU lacks the {path} path")
    monkeypatch.setenv(kernels.ENV_PATH, path)
    monkeypatch.delenv(prefill_matmul.ENV, raising=False)
    layer, _ = make_layer(256, 200, group_size=32)
    x = torch.randn(300, 256)
    rows = [layer(x[i:i + 1]) for i in (0, 127, 299)]
    whole = layer(x)
    assert all(torch.equal(whole[i], row[0]) for i, row in zip((0, 127, 299), rows, strict=True))
    token = chunking.CURRENT.set(chunking.PrefillChunk(rows=128, keys_end=128, row_exact=True))
    try:
        chunk = layer(x[:128])
    finally:
        chunking.CURRENT.reset(token)
    assert torch.equal(chunk, whole[:128])
    assert f"our int8 kernel's {path} path, every call" in int8.describe_dense()
    monkeypatch.setenv(prefill_matmul.ENV, "dense")
    assert not torch.equal(layer(x), whole)  # the dense path's fp32 or bf16 sums round otherwise
    assert "our int8 kernel" not in int8.describe_dense()
    if path == "vnni512" and prefill_matmul.available():
        monkeypatch.setenv(prefill_matmul.ENV, "bf16")
        assert layer.packed is not None and torch.equal(layer(x), prefill_matmul.matmul(x, layer.packed))
        how = "on AMX tiles" if prefill_matmul.path() == "amx" else "with AVX512-BF16 dot products"  # the CPU's best
        assert f"bf16 {how}" in int8.describe_dense()


@pytest.mark.parametrize("path", kernels.PATHS)
def test_the_int8_prefill_setting_gives_prefill_one_int8_pass_and_decode_two(path: str,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """INT8SERVE_PREFILL_MATMUL=int8: every prefill call (a chunk, or a call of more rows than any decode step) goes
    through our kernel with one int8 pass a row, as llama.cpp computes; decode calls keep two (precise), and the
    start line says which."""
    if not kernels.cpu_has(path):
        pytest.skip(f"this CPU lacks the {path} path")
    monkeypatch.setenv(kernels.ENV_PATH, path)
    monkeypatch.setenv(prefill_matmul.ENV, "int8")
    assert prefill_matmul.setting_problem() is None and int8.kernel_rows() == int8.ALL_ROWS
    layer, _ = make_layer(256, 200, group_size=32)
    x = torch.randn(300, 256)
    one_pass = kernels.int8_gemv(x, layer.packed, precise=False)
    two_passes = kernels.int8_gemv(x, layer.packed, precise=True)
    assert not torch.equal(one_pass, two_passes)  # (so the comparisons below tell the two apart)
    assert torch.equal(layer(x), one_pass)  # a 300-row forward: prefill
    assert torch.equal(layer(x[:4]), two_passes[:4])  # a 4-row decode step
    token = chunking.CURRENT.set(chunking.PrefillChunk(rows=128, keys_end=128))
    try:
        chunk, short_chunk = layer(x[:128]), layer(x[:3])  # a whole chunk, and the end of a prompt
    finally:
        chunking.CURRENT.reset(token)
    assert torch.equal(chunk, one_pass[:128].to(COMPUTE_DTYPE))  # (a chunk that is not row-exact rounds to bf16)
    assert torch.equal(short_chunk, one_pass[:3].to(COMPUTE_DTYPE))
    assert "one int8 pass a row" in int8.describe_dense()
    assert ("slower than this path's default 16-bit GEMM" in int8.describe_dense()) == (path == "avx2")
    assert ("slower than this CPU's default, bf16 on AMX tiles" in int8.describe_dense()) == (path == "amx")
    monkeypatch.setenv(prefill_matmul.ENV, "auto")
    assert "one int8 pass" not in int8.describe_dense()


def test_fp32_dense_matmuls_go_through_onednn_where_torch_has_it() -> None:
    """The prefill matmul in fp32 (CPUs without native bf16) is oneDNN's, not MKL's (2.3x on an AVX2 EPYC)."""
    assert int8.onednn_fp32() == torch.backends.mkldnn.is_available()
    line = int8.describe_dense()
    assert ("fp32" in line) == (int8.dense_dtype() == torch.float32) and "prefill matmuls" in line
    if int8.dense_dtype() == torch.float32:
        assert ("oneDNN" in line) == int8.onednn_fp32()


def test_without_onednn_the_fp32_matmul_is_torchs_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """A torch without oneDNN: F.linear, and the start line says so."""
    weight, x = torch.randn(int8.ONEDNN_MIN_WEIGHTS // 24 + 1, 24), torch.randn(3, 24)
    with_onednn = int8.dense_matmul(x, weight)
    monkeypatch.setattr(int8, "onednn_fp32", lambda: False)
    monkeypatch.setattr(int8, "dense_dtype", lambda: torch.float32)
    assert torch.allclose(int8.dense_matmul(x, weight), with_onednn, atol=1e-5)
    assert "torch's BLAS" in int8.describe_dense()


AMX_BF16 = "amx_bf16" in Path("/proc/cpuinfo").read_text().split()
BF16_ROWS = pytest.param(COMPUTE_DTYPE, marks=pytest.mark.skipif(
    AMX_BF16, reason="oneDNN's AMX bf16 kernels round a row by how many come with it (see int8.dense_matmul)"))


@pytest.mark.parametrize("dtype", [torch.float32, BF16_ROWS])
@pytest.mark.parametrize("out_features", [300, int8.ONEDNN_MIN_WEIGHTS // 520 + 1])  # F.linear, oneDNN for fp32
def test_dense_matmul_rows_do_not_depend_on_how_many_come_together(dtype: torch.dtype, out_features: int) -> None:
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, 520, generator=generator).to(dtype)
    x = torch.randn(128, 520, generator=generator)
    whole = int8.dense_matmul(x, weight)
    assert whole.dtype == dtype and whole.shape == (128, out_features)
    assert torch.allclose(whole.float(), x @ weight.float().T, rtol=2e-2 if dtype != torch.float32 else 1e-4,
                          atol=0.5 if dtype != torch.float32 else 1e-3)
    for start, stop in [(0, 1), (5, 8), (100, 128), (0, 127), (60, 93)]:
        assert torch.equal(int8.dense_matmul(x[start:stop], weight), whole[start:stop]), (start, stop)


@pytest.mark.parametrize("dtype", [torch.float32, COMPUTE_DTYPE])
def test_a_prefill_chunks_dense_rows_are_those_its_whole_aligned_chunk_gives(dtype: torch.dtype) -> None:
    """Whatever a cached prefix left of an aligned chunk, or wherever the prompt ends, each row of a prefill call gets
    the bits the whole chunk gives it, on every CPU: on AMX CPUs, whose oneDNN bf16 matmul rounds a row by its
    company (above), the call's rows are multiplied at their places among the chunk's (chunking.py)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(1536, 576, generator=generator).to(dtype)  # SmolLM2's gate (64 wide does not show it)
    x = torch.randn(256, 576, generator=generator)

    def call(start: int, stop: int) -> torch.Tensor:  # the rows [start, stop) of a forward that ends at `stop`
        token = chunking.CURRENT.set(chunking.PrefillChunk(rows=128, keys_end=256, ends=(stop,)))
        try:
            return int8.dense_matmul(x[start:stop], weight)
        finally:
            chunking.CURRENT.reset(token)

    whole = torch.cat([call(0, 128), call(128, 256)])
    assert torch.allclose(whole.float(), x @ weight.float().T, rtol=2e-2, atol=0.5)
    for start, stop in [(17, 82), (60, 82), (100, 128), (3, 120), (150, 200), (180, 200), (139, 140), (0, 256)]:
        assert torch.equal(call(start, stop), whole[start:stop]), (start, stop)
        assert torch.equal(call(stop - 1, stop), whole[stop - 1:stop]), stop  # the last row alone (the output head)


def test_set_quantized_rejects_wrong_shapes() -> None:
    layer = Int8Linear(64, 32)
    with pytest.raises(ValueError, match="expected"):
        layer.set_quantized(torch.zeros(32, 63, dtype=torch.int8), torch.ones(32))
    with pytest.raises(ValueError, match="scale"):
        layer.set_quantized(torch.zeros(32, 64, dtype=torch.int8), torch.ones(31))
    with pytest.raises(ValueError, match="group size"):
        layer.set_quantized(torch.zeros(32, 64, dtype=torch.int8), torch.ones(32, 5))


@pytest.mark.usefixtures("stock")
def test_unaligned_weights_are_realigned_for_the_stock_kernel() -> None:
    """A tensor read from a memory-mapped checkpoint can start at any byte; int8pack needs 64-byte alignment."""
    layer, dense = make_layer(64, 96)
    assert layer.weight is not None and layer.scale is not None
    backing = torch.zeros(96 * 64 + 8, dtype=torch.int8)
    unaligned = backing[8:].view(96, 64)
    unaligned.copy_(layer.weight)
    assert unaligned.data_ptr() % 64
    layer.set_quantized(unaligned, layer.scale)
    assert layer.weight.data_ptr() % 64 == 0
    x = torch.randn(5, 64)
    assert (layer(x) - x @ dense.T).norm() / (x @ dense.T).norm() < 1e-2
