"""Our bf16 prefill matmul (engine/kernels/matmul.py), each of its paths this CPU runs (AMX tiles, AVX512-BF16
vectors): the dequantized product, row by row, on any shape."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from int8serve.engine import chunking, int8, kernels
from int8serve.engine.int8 import Int8Linear, quantize
from int8serve.engine.kernels import matmul as prefill_matmul

# What each path needs of the CPU (its flags in /proc/cpuinfo). A CPU that has them runs the path's tests, so that a
# library that fails to build, or to load, fails them instead of skipping them.
NEEDS = {"amx": prefill_matmul.AMX_FLAGS | prefill_matmul.VECTOR_FLAGS, "avx512bf16": prefill_matmul.VECTOR_FLAGS}
CPU_FLAGS = kernels.cpu_flags()
pytestmark = pytest.mark.skipif(not NEEDS["avx512bf16"] <= CPU_FLAGS, reason="bf16 prefill matmul: this CPU lacks "
                                f"{' '.join(sorted(NEEDS['avx512bf16'] - CPU_FLAGS))}")


def skip_reason(name: str) -> str | None:
    """Why path `name` cannot run here: flags the CPU lacks, or (AMX) Linux refusing the tile state; else None."""
    if not NEEDS[name] <= CPU_FLAGS:
        return f"path {name}: this CPU lacks {' '.join(sorted(NEEDS[name] - CPU_FLAGS))}"
    if prefill_matmul.available() and name not in prefill_matmul.paths():
        return f"path {name}: Linux did not grant the AMX tile state"
    return None


def each_path() -> list:
    """Every path of the kernel, skipped with the reason where this CPU cannot run it."""
    return [pytest.param(name, marks=pytest.mark.skipif(skip_reason(name) is not None, reason=str(skip_reason(name))))
            for name in prefill_matmul.PATHS]


@pytest.fixture(autouse=True)
def bf16_prefill(monkeypatch: pytest.MonkeyPatch) -> str | None:
    """Int8Linear's calls of more than 32 rows through this kernel: the default on the amx path; elsewhere (vnni512:
    our int8 kernel takes every call by default) INT8SERVE_PREFILL_MATMUL=bf16 asks for it. Returns the setting."""
    if kernels.path() == "amx":
        monkeypatch.delenv(prefill_matmul.ENV, raising=False)
        return None
    monkeypatch.setenv(prefill_matmul.ENV, "bf16")
    return "bf16"


def test_it_is_built_and_loaded_where_the_cpu_can_run_it() -> None:
    assert prefill_matmul.available(), prefill_matmul.unavailable_reason()
    assert set(prefill_matmul.paths()) == {name for name in prefill_matmul.PATHS if skip_reason(name) is None}


def packed_weight(out_features: int, in_features: int, group_size: int, seed: int = 0
                  ) -> tuple[kernels.PackedWeight, torch.Tensor]:
    """A random packed weight and its bf16 dequantization (the dense path's buffer) as fp32."""
    generator = torch.Generator().manual_seed(seed)
    q, scale = quantize(torch.randn(out_features, in_features, generator=generator), group_size)
    packed = kernels.pack_weight(q, scale, group_size)
    dense = torch.empty(out_features, in_features, dtype=torch.bfloat16)
    kernels.dequantize(packed, dense)
    return packed, dense.float()


SHAPES = [  # rows, outputs, inputs, group size: tails of every dimension, every scheme
    (1, 96, 64, 32), (33, 172, 172, 32), (64, 300, 520, 0), (129, 64, 256, 64), (96, 320, 1024, 128),
    (200, 1100, 4096, 32),
]


@pytest.mark.parametrize("path", each_path())
@pytest.mark.parametrize(("rows", "out_features", "in_features", "group_size"), SHAPES)
def test_it_is_the_product_with_the_dequantized_bf16_weight(rows: int, out_features: int, in_features: int,
                                                            group_size: int, path: str) -> None:
    packed, dense = packed_weight(out_features, in_features, group_size)
    x = torch.randn(rows, in_features)
    exact = x.to(torch.bfloat16).double() @ dense.double().T  # the same bf16 operands, summed exactly
    got = prefill_matmul.matmul(x, packed, round_bf16=False, path=path)
    assert got.dtype == torch.float32 and got.shape == (rows, out_features) and got.is_contiguous()
    assert ((got.double() - exact).norm() / exact.norm()).item() < 1e-5  # fp32 accumulation
    assert torch.equal(prefill_matmul.matmul(x, packed, path=path), got)  # the fp32 sums by default
    rounded = prefill_matmul.matmul(x, packed, round_bf16=True, path=path)
    assert torch.equal(rounded, got.to(torch.bfloat16).float())  # round_bf16: the same sums, rounded once


@pytest.mark.parametrize("path", each_path())
@pytest.mark.parametrize(("out_features", "in_features", "group_size"), [(96, 64, 32), (172, 200, 0), (130, 256, 128)])
def test_each_weight_is_its_dequantization_bit_for_bit(out_features: int, in_features: int, group_size: int,
                                                       path: str) -> None:
    """Rows of the identity pick single weights: each output must be the dense buffer's bf16 value exactly (every
    int8 value, scales from 1e-6 to 1e2)."""
    generator = torch.Generator().manual_seed(3)
    spread = 10.0 ** torch.empty(out_features, 1).uniform_(-6, 2, generator=generator)  # each row its own magnitude
    q, scale = quantize(torch.randn(out_features, in_features, generator=generator) * spread, group_size)
    q[0] = torch.arange(in_features) % 255 - 127  # every weight value, -127 to 127
    packed = kernels.pack_weight(q, scale, group_size)
    dense = torch.empty(out_features, in_features, dtype=torch.bfloat16)
    kernels.dequantize(packed, dense)
    got = prefill_matmul.matmul(torch.eye(in_features), packed, path=path)
    assert torch.equal(got, dense.float().T), f"{(got != dense.float().T).sum().item()} weights differ"


@pytest.mark.parametrize("path", each_path())
def test_a_row_does_not_depend_on_the_rows_with_it(path: str) -> None:
    packed, _ = packed_weight(320, 1024, 32)
    x = torch.randn(160, 1024)
    whole = prefill_matmul.matmul(x, packed, path=path)
    for start, stop in [(0, 1), (5, 8), (100, 160), (0, 159), (31, 95), (6, 13)]:
        assert torch.equal(prefill_matmul.matmul(x[start:stop], packed, path=path), whole[start:stop]), (start, stop)


@pytest.mark.parametrize("path", each_path())
def test_the_thread_count_does_not_change_the_bits(path: str) -> None:
    packed, _ = packed_weight(64 * 7, 512, 32)  # 7 tiles: uneven shares
    x = torch.randn(64, 512)
    together = prefill_matmul.matmul(x, packed, path=path)
    with kernels.limit_threads(1):
        assert torch.equal(prefill_matmul.matmul(x, packed, path=path), together)


def test_the_default_path_is_the_tiles_where_the_cpu_has_them() -> None:
    flags = kernels.cpu_flags()
    expected = "amx" if {"amx_bf16", "amx_tile"} <= flags else "avx512bf16"
    assert prefill_matmul.path() == expected == prefill_matmul.paths()[0]
    x = torch.randn(40, 256)
    packed, _ = packed_weight(128, 256, 32)
    assert torch.equal(prefill_matmul.matmul(x, packed), prefill_matmul.matmul(x, packed, path=expected))
    with pytest.raises(ValueError, match="unknown prefill matmul path 'avx2': expected one of amx, avx512bf16"):
        prefill_matmul.matmul(x, packed, path="avx2")
    for missing in set(prefill_matmul.PATHS) - set(prefill_matmul.paths()):  # e.g. amx on a Zen 4: a clear error
        with pytest.raises(RuntimeError, match="i8m_matmul failed: the CPU cannot run that path"):
            prefill_matmul.matmul(x, packed, path=missing)


def test_a_prefill_chunk_past_the_kernel_rows_takes_it(monkeypatch: pytest.MonkeyPatch, bf16_prefill: str | None
                                                      ) -> None:
    rows = 129  # a default prefill chunk and one more: past our kernel's rows by default on the amx path
    generator = torch.Generator().manual_seed(1)
    layer = Int8Linear(4096, 128)
    q, scale = quantize(torch.randn(128, 4096, generator=generator), 32)
    layer.set_quantized(q, scale, 32)
    x = torch.randn(rows, 4096, generator=generator)
    assert layer.packed is not None and int8.dense_dtype() == torch.bfloat16
    got = layer(x)
    assert torch.equal(got, prefill_matmul.matmul(x, layer.packed))
    how = "on AMX tiles" if prefill_matmul.path() == "amx" else "with AVX512-BF16 dot products"
    assert (f"prefill matmuls: bf16 {how} straight from the int8 weights, sums kept at full precision (our kernel"
            in int8.describe_dense())
    assert int8.kernel_rows() == int8.KERNEL_ROWS  # 128-row prefill chunks: this kernel is faster from 32 rows up
    monkeypatch.setenv(prefill_matmul.ENV, "row-exact")  # our kernel takes every call (amx: its AMX-INT8 GEMM)
    assert int8.kernel_rows() == int8.ALL_ROWS and not torch.equal(layer(x), got)
    # on the amx path the start line says what that costs against the default
    assert ("about half as fast as this CPU's default" in int8.describe_dense()) == (kernels.path() == "amx")
    monkeypatch.setenv(prefill_matmul.ENV, "dense")  # the dequantize-and-oneDNN path: the same values, other sum order
    assert not prefill_matmul.enabled() and f"{prefill_matmul.ENV}=dense" in int8.describe_dense()
    assert int8.kernel_rows() == int8.KERNEL_ROWS
    dense = layer(x)
    assert not torch.equal(dense, got) and ((dense - got).norm() / got.norm()).item() < 1e-2
    token = chunking.CURRENT.set(chunking.PrefillChunk(rows=rows, keys_end=rows))
    if bf16_prefill is None:
        monkeypatch.delenv(prefill_matmul.ENV)
    else:
        monkeypatch.setenv(prefill_matmul.ENV, bf16_prefill)
    try:  # an aligned chunk's tail takes the chunk's path, here the kernel, whatever its own length
        assert torch.equal(layer(x[-3:]), got[-3:])
    finally:
        chunking.CURRENT.reset(token)


def test_prefill_keeps_the_fp32_sums_of_every_call_however_long() -> None:
    """Int8Linear's prefill takes the kernel's fp32 sums, not rounded to bf16 as the dense path's bf16 matmul returns
    them (the more accurate numerics, kernels/matmul.py), and on every path for calls of any length, so that prefill
    has one numerics: a 1040-row call as 130-row ones."""
    assert all(limit is None for limit in prefill_matmul.MAX_ROWS.values())
    generator = torch.Generator().manual_seed(3)
    layer = Int8Linear(512, 192)
    q, scale = quantize(torch.randn(192, 512, generator=generator), 32)
    layer.set_quantized(q, scale, 32)
    x = torch.randn(1040, 512, generator=generator)
    assert layer.packed is not None and prefill_matmul.takes(x.shape[0])
    got = layer(x)
    assert torch.equal(got, prefill_matmul.matmul(x, layer.packed, round_bf16=False))
    assert not torch.equal(got, got.to(torch.bfloat16).float())  # sums, not bf16 values
    for start in range(0, x.shape[0], 130):  # (130 rows: more than the int8 kernel's, a prefill call here too)
        assert torch.equal(layer(x[start:start + 130]), got[start:start + 130])


def test_a_call_longer_than_its_paths_limit_dequantizes_for_onednn(monkeypatch: pytest.MonkeyPatch) -> None:
    layer = Int8Linear(256, 128)
    q, scale = quantize(torch.randn(128, 256), 32)
    layer.set_quantized(q, scale, 32)
    x = torch.randn(int8.KERNEL_ROWS + 9, 256)
    calls = []  # the rows of each call that reached the kernel (oneDNN's sums may have the same bits)
    kernel = prefill_matmul.matmul
    monkeypatch.setattr(prefill_matmul, "matmul", lambda rows, *args, **kwargs: calls.append(len(rows)) or
                        kernel(rows, *args, **kwargs))
    expected = layer(x)
    assert calls == [x.shape[0]]
    monkeypatch.setitem(prefill_matmul.MAX_ROWS, prefill_matmul.path(), x.shape[0] - 1)
    assert not prefill_matmul.takes(x.shape[0]) and prefill_matmul.takes(x.shape[0] - 1)
    assert ((layer(x) - expected).norm() / expected.norm()).item() < 1e-2 and calls == [x.shape[0]]
    assert f"calls of more than {x.shape[0] - 1} rows through oneDNN" in int8.describe_dense()
    layer(x[1:])
    assert calls == [x.shape[0], x.shape[0] - 1]


def test_bad_shapes_are_refused() -> None:
    packed, _ = packed_weight(64, 64, 32)
    with pytest.raises(ValueError, match="rows of 63 values for a weight of 64 inputs"):
        prefill_matmul.matmul(torch.randn(4, 63), packed)


def test_a_setting_it_does_not_take_turns_it_off_and_says_so(monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv(prefill_matmul.ENV, "fast")
    prefill_matmul._warn_once.cache_clear()
    with caplog.at_level("WARNING"):
        assert not prefill_matmul.enabled()
    settings = "auto, row-exact, bf16, dense, int8"
    assert f"INT8SERVE_PREFILL_MATMUL='fast': expected one of {settings}" in caplog.text
    if kernels.path() == "amx":  # the default there: this kernel, now off
        assert (f"our bf16 kernel not used: INT8SERVE_PREFILL_MATMUL='fast' is not one of {settings}"
                in int8.describe_dense())
    else:  # our int8 kernel takes every call by default, and keeps them
        assert ("every call (16-bit activations, each row as decode computes it; INT8SERVE_PREFILL_MATMUL=dense"
                in int8.describe_dense())
        assert f"INT8SERVE_PREFILL_MATMUL='fast' is not one of {settings}, taken as auto" in int8.describe_dense()
    layer = Int8Linear(64, 32)
    q, scale = quantize(torch.randn(32, 64), 32)
    layer.set_quantized(q, scale, 32)
    x = torch.randn(min(int8.kernel_rows(), 200) + 1, 64)
    expected = x @ (q.float() * scale.repeat_interleave(32, 1)).T
    assert ((layer(x) - expected).norm() / expected.norm()).item() < 1e-2  # the dense bf16 path (amx), which works


# Rows whose packed copy (164 MB) does not fit what the process may still map: a clear error, not an abort.
OUT_OF_MEMORY = """
import resource, torch
from int8serve.engine import kernels
from int8serve.engine.int8 import quantize
from int8serve.engine.kernels import matmul
q, scale = quantize(torch.randn(64, 4096), 32)
packed = kernels.pack_weight(q, scale, 32)
matmul.matmul(torch.randn(32, 4096), packed)  # the library loaded, its threads started
x = torch.randn(20000, 4096)
used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + (60 << 20), resource.RLIM_INFINITY))
try:
    matmul.matmul(x, packed)
except RuntimeError as error:
    print(error)
"""


def test_running_out_of_memory_is_an_error_not_an_abort() -> None:
    done = subprocess.run([sys.executable, "-c", OUT_OF_MEMORY], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "i8m_matmul failed: out of memory for its buffers" in done.stdout
