"""Our int8 decode kernel (int8serve.engine.kernels): build, arithmetic of every path, batch invariance, fallback.

The library is built once per machine into the cache (the first test pays the compile, a few seconds) and loaded
once per process. On any x86-64 with a compiler the kernel must be available. Each path (amx, vnni512, avxvnni,
avx2, scalar) is tested against an exact integer reference wherever the CPU can run it; the others are skipped, with
the flag they need as the reason.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from int8serve.engine import int8, kernels
from int8serve.engine.int8 import Int8Linear, quantize_per_channel
from int8serve.engine.kernels import builds as kernel_builds
from int8serve.engine.kernels import cpu as kernel_cpu
from int8serve.engine.kernels import gemv as gemv_kernel
from int8serve.engine.kernels import packed as packed_layout

CPU_FLAGS = set(Path("/proc/cpuinfo").read_text().split())
NEEDS = {"amx": ("amx_tile", "amx_int8", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"),
         "vnni512": ("avx512f", "avx512bw", "avx512vl", "avx512_vnni"), "avxvnni": ("avx2", "avx_vnni"),
         "avx2": ("avx2",), "scalar": ()}
CPU_HAS = {impl: all(flag in CPU_FLAGS for flag in flags) for impl, flags in NEEDS.items()}
IMPLS = [pytest.param(impl, marks=pytest.mark.skipif(
    not CPU_HAS[impl], reason=f"path {impl}: this CPU lacks {' '.join(f for f in flags if f not in CPU_FLAGS)}"))
    for impl, flags in NEEDS.items()]
RUNNABLE = [impl for impl, ok in CPU_HAS.items() if ok]
GROUP_SIZES = [0, 32, 64, 128]  # 0: per channel


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert kernels.loaded(), f"the kernel library did not build/load: {gemv_kernel._load()}"


def random_weight(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 [N, K] in [-127, 127] and positive fp32 scales; small layers through the real quantizer."""
    g = torch.Generator().manual_seed(seed)
    if n * k <= 1 << 20:
        return quantize_per_channel(torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g))
    scale = (torch.rand(n, generator=g) * 0.01 + 1e-4).to(torch.bfloat16).float()  # bf16-exact, as the quantizers
    return torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g), scale


def group_weight(n: int, k: int, group_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 [N, K] and bf16-exact fp32 scales [N, ceil(K / group_size)] (group_size 0: per channel, [N])."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    shape = (n, kernels.weight_groups(k, group_size)) if group_size else (n,)
    return q, (torch.rand(shape, generator=g) * 0.01 + 1e-4).to(torch.bfloat16).float()


def exact_reference(x: torch.Tensor, packed: kernels.PackedWeight, precise: bool = False) -> torch.Tensor:
    """The kernel's result computed another way: exact int64 dot products per 32-value group (precise: each row's
    two int8 rows combined, 256 * dot_hi + dot_lo, and the second row's scale), then the same fp32 roundings in the
    same order (float(dot), inner = fma(dot, xscale, inner) per weight group, acc = fma(inner, wscale, acc)), fma done
    exactly in fp64 and rounded once to fp32."""
    xq, xs = kernels.quantize_activations(x, "scalar", precise=precise)  # [M or 2M, Kp], [M or 2M, G]
    rows, kp = xq.shape
    groups = kp // 32
    w = torch.zeros(packed.out_features, kp, dtype=torch.int64)
    w[:, :packed.in_features] = kernels.unpack_weight(packed).long()
    dots = torch.einsum("mgk,ngk->mng", xq.long().view(rows, groups, 32), w.view(-1, groups, 32))  # [rows, N, G]
    if precise:
        dots, xs = dots[0::2] * 256 + dots[1::2], xs[1::2]
    m = dots.shape[0]
    span = groups if packed.group_size == 0 else packed.group_size // 32
    wscale = packed.scales()  # [N, weight groups]

    def fma(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return (a.double() * b.double() + c.double()).float()  # exact product and sum of fp32s in fp64, one rounding

    acc = torch.zeros(m, packed.out_features)
    for wg in range(wscale.shape[1]):
        inner = torch.zeros(m, packed.out_features)
        for g in range(wg * span, min(groups, (wg + 1) * span)):
            inner = fma(dots[:, :, g].float(), xs[:, g:g + 1], inner)  # (int64 -> fp32: round to nearest even)
        acc = fma(inner, wscale[:, wg][None, :], acc)
    return acc


def quantized_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """fp64 product of the activations *as the kernel quantizes them* with the dequantized weight (fp64)."""
    xq, xs = kernels.quantize_activations(x, "scalar")
    m, kp = xq.shape
    xd = (xq.double().view(m, kp // 32, 32) * xs.double()[:, :, None]).view(m, kp)[:, : x.shape[1]]
    return xd @ weight.T


def test_available_on_any_x86_64_and_auto_takes_the_best_path() -> None:
    assert kernels.available(), kernels.unavailable_reason()
    assert kernels.unavailable_reason() is None
    assert kernels.path() == RUNNABLE[0]  # the first of amx, vnni512, avxvnni, avx2, scalar the CPU can run
    assert {impl: kernels.cpu_has(impl) for impl in NEEDS} == CPU_HAS  # the library's CPUID agrees with the kernel's
    assert kernels.path() in kernels.describe()


def test_the_path_can_be_forced(fresh_load: pytest.MonkeyPatch) -> None:
    fresh_load.setenv("INT8SERVE_KERNEL", "scalar")
    assert kernels.available() and kernels.path() == "scalar"


def test_a_forced_path_the_cpu_lacks_or_an_unknown_name_makes_it_unavailable(fresh_load: pytest.MonkeyPatch) -> None:
    fresh_load.setenv("INT8SERVE_KERNEL", "avx3")
    assert not kernels.available() and "INT8SERVE_KERNEL='avx3'" in (kernels.unavailable_reason() or "")
    missing = [impl for impl in NEEDS if not CPU_HAS[impl]]
    if missing:  # on this project's CPUs every path runs: nothing to force
        kernel_cpu._unavailable_reason.cache_clear()
        fresh_load.setenv("INT8SERVE_KERNEL", missing[0])
        assert not kernels.available() and "cannot run it" in (kernels.unavailable_reason() or "")


def test_library_is_cached_under_int8serve_cache() -> None:
    # a second build call finds the library and returns at once, in the same cache directory
    path = kernels.build()
    assert path.is_file() and kernels.cache_dir() in path.parents
    assert kernels.build() == path


# a fresh process on the cache it is given: loads the gemv library (building it when needed) and multiplies
USE_THE_KERNEL = """
import torch
from int8serve.engine import kernels
from int8serve.engine.kernels import gemv
assert kernels.loaded(), gemv._load()
q, scale = torch.randint(-127, 128, (64, 256), dtype=torch.int8), torch.rand(64) * 0.01
x = torch.randn(2, 256)
got = kernels.int8_gemv(x, kernels.pack_weight(q, scale))
want = x @ (q.float() * scale[:, None]).T
assert (got - want).norm() < 0.02 * want.norm(), (got - want).norm() / want.norm()  # int8 activations
"""
# (an empty or garbage library fails the record's check as one cut short does: a build each costs 5 s)
DAMAGES = {"cut short": lambda good: good[:20_000], "garbage with a matching record": lambda good: b"\x7fELF"}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_a_damaged_cached_library_is_said_so_and_built_again(damage: str, tmp_path: Path) -> None:
    """A library cut short (a power loss during its first build) crashed every start with SIGBUS; an empty or garbage
    one left the kernels off for good. In a subprocess, so that a crash fails this test rather than the suite."""
    good = kernels.build()
    library = tmp_path / good.relative_to(kernels.cache_dir())  # the same key, in a cache of its own
    library.parent.mkdir(parents=True)
    library.write_bytes(DAMAGES[damage](good.read_bytes()))
    record = kernel_builds._record(library)
    shutil.copyfile(kernel_builds._record(good), record)
    if damage == "garbage with a matching record":  # the record checks out: the load fails, not the check
        record.write_text(f"{len(library.read_bytes())} {hashlib.sha256(library.read_bytes()).hexdigest()}\n")
    done = subprocess.run([sys.executable, "-c", USE_THE_KERNEL], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "INT8SERVE_CACHE": str(tmp_path), "INT8SERVE_KERNEL": "auto"})
    assert done.returncode == 0, f"{done.returncode}: {done.stderr[-3000:]}"  # -7 was the SIGBUS
    assert done.stderr.count("building it again") == 1, done.stderr[-3000:]
    assert kernel_builds._damage(library) is None  # rebuilt, and recorded


@pytest.mark.usefixtures("umask_022")
def test_a_library_without_a_record_is_built_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """No record: its build was cut short before the record was written (or made before records were kept). Built
    0755 (mkstemp's 0600, made 0711 by the linker: only its owner could load it from a shared cache)."""
    good = kernels.build()
    monkeypatch.setenv("INT8SERVE_CACHE", str(tmp_path))
    library = kernels.cache_dir() / good.relative_to(good.parents[2])
    library.parent.mkdir(parents=True)
    shutil.copyfile(good, library)
    assert kernels.build() == library
    assert "no record of a finished build" in caplog.text and kernel_builds._damage(library) is None
    assert f"{library.stat().st_mode & 0o777:o}" == "755"


def test_a_read_only_cache_builds_the_library_in_a_temporary_folder(read_only_cache: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Rather than leave the model on torch's kernels (~500 -> 8 tok/s decode on SmolLM2)."""
    from int8serve.engine.kernels import activation

    library = kernels.build(source=activation.SOURCE)
    assert not library.is_relative_to(read_only_cache) and library.is_file()
    assert activation._open(library).i8e_abi_version() == activation.ABI_VERSION
    assert "cannot write the kernel cache" in caplog.text and "Read-only file system" in caplog.text


def test_gcc_builds_on_every_cpu_up_to_a_limit_and_the_key_does_not_count_them(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gcc = kernel_builds._compiler()
    assert "Free Software Foundation" in kernel_builds._compiler_version(gcc), "the project's machines build with GCC"
    keys = set()
    for cpus, jobs in ((1, 1), (3, 3), (64, kernels.MAX_BUILD_JOBS)):
        monkeypatch.setattr(kernel_builds.os, "sched_getaffinity", lambda _pid, n=cpus: set(range(n)))
        command = kernel_builds._command(gcc, tmp_path / "x.so")
        assert [flag for flag in command if "lto" in flag] == [f"-flto={jobs}"]
        keys.add(kernel_builds._build_key(gcc))
    assert len(keys) == 1  # one cached library whatever the number of CPUs
    other = tmp_path / "clang++"  # another compiler: no GCC flags
    other.write_text("#!/bin/sh\necho 'clang version 17.0.6'\n")
    other.chmod(0o755)
    assert not [flag for flag in kernel_builds._command(str(other), tmp_path / "x.so") if "lto" in flag]
    assert kernel_builds._build_key(str(other)) not in keys


def packed_in_torch(q: torch.Tensor, scale: torch.Tensor, group_size: int) -> kernels.PackedWeight:
    """pack_weight's torch version (used where the library is not built)."""
    n, k = q.shape
    data = packed_layout._aligned_empty(kernels.packed_nbytes(n, k, group_size))
    packed = kernels.PackedWeight(data, n, k, group_size)
    packed_layout._pack_torch(q, scale.reshape(n, -1).to(torch.bfloat16), packed)
    return packed


@pytest.mark.parametrize(("n", "k"), [(1, 1), (17, 31), (64, 32), (100, 33), (172, 64), (64, 172), (96, 4096)])
def test_pack_round_trips(n: int, k: int) -> None:
    q, scale = random_weight(n, k, seed=n * k)
    packed = kernels.pack_weight(q, scale)  # in C++
    np_, kp = -(-n // 64) * 64, -(-k // 32) * 32
    # per channel: each tile's K/32 groups of 2048 bytes, then its 64 scales (128 bytes)
    assert packed.data.data_ptr() % 64 == 0 and packed.data.numel() == np_ * kp + np_ // 64 * 128
    assert torch.equal(packed.data, packed_in_torch(q, scale, 0).data)  # the same bytes as the torch version
    assert torch.equal(packed.scales(), scale[:, None])  # bf16-exact scales are kept exactly
    assert packed.scale.shape == (np_ // 64, 1, 64) and not packed.scale.flatten()[n:].any()
    assert torch.equal(kernels.unpack_weight(packed), q)


@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize(("n", "k"), [(17, 31), (100, 172), (130, 256)])
def test_group_scales_round_trip(n: int, k: int, group_size: int) -> None:
    q, scale = group_weight(n, k, group_size, seed=n + k)
    packed = kernels.pack_weight(q, scale, group_size)
    assert packed.weight_groups == -(-k // group_size)
    assert torch.equal(packed.scales(), scale)
    assert torch.equal(packed.data, packed_in_torch(q, scale, group_size).data)
    assert torch.equal(kernels.unpack_weight(packed), q)
    assert torch.equal(kernels.weight_rows(packed, torch.tensor([n - 1, 0])), q[[n - 1, 0]])
    # where the bytes are (packed_layout.h): a tile is its weight groups one after the other, each `span` groups of
    # 2048 bytes (room for all of them, also where K ends earlier) followed by the weight group's 64 bf16 scales
    span, wgroups = group_size // 32, -(-k // group_size)
    tiles = packed.data.view(-1, wgroups, span * 2048 + 128)
    assert tiles.shape[0] == -(-n // 64)
    stored = tiles[:, :, span * 2048:].contiguous().view(torch.bfloat16)  # [tiles, weight groups, 64]
    assert torch.equal(stored.permute(0, 2, 1).reshape(-1, wgroups)[:n].float(), scale)
    row, column = n - 1, k - 1  # the last weight: tile, block, row in block; group, step, byte in step
    group = column // 32
    at = (group // span) * (span * 2048 + 128) + (group % span) * 2048 + (row % 64) // 16 * 512
    at += (column % 32) // 4 * 64 + (row % 16) * 4 + column % 4
    assert tiles[row // 64].flatten()[at].item() == (int(q[row, column]) + 128)
    index = torch.tensor([[0, n - 1], [n // 2, 1 % n]])
    expected = scale[index].repeat_interleave(group_size, dim=-1)[..., :k]
    assert torch.equal(kernels.row_scales(packed, index), expected)
    with pytest.raises(ValueError, match="scale must be"):
        kernels.pack_weight(q, scale[:-1], group_size)


def test_weight_rows_reads_rows_back_from_the_packed_copy() -> None:
    q, scale = random_weight(300, 172, seed=5)
    packed = kernels.pack_weight(q, scale)
    index = torch.tensor([[0, 299, 63], [64, 17, 255]])
    assert torch.equal(kernels.weight_rows(packed, index), q[index])


def test_pack_rejects_bad_weights() -> None:
    with pytest.raises(ValueError, match="int8"):
        kernels.pack_weight(torch.zeros(4, 32), torch.ones(4))
    with pytest.raises(ValueError, match="scale"):
        kernels.pack_weight(torch.zeros(4, 32, dtype=torch.int8), torch.ones(5))
    with pytest.raises(ValueError, match="empty"):
        kernels.pack_weight(torch.zeros(0, 32, dtype=torch.int8), torch.ones(0))
    with pytest.raises(ValueError, match="-127"):
        kernels.pack_weight(torch.full((4, 32), -128, dtype=torch.int8), torch.ones(4))


@pytest.mark.parametrize("impl", IMPLS)
def test_activation_quantization_is_q8_0_like(impl: str) -> None:
    x = torch.randn(3, 100) * torch.tensor([0.01, 1.0, 300.0])[:, None]
    x[1, 32:64] = 0.0  # an all-zero group
    q, s = kernels.quantize_activations(x, impl)
    assert q.shape == (3, 128) and s.shape == (3, 4)
    padded = torch.zeros(3, 128)
    padded[:, :100] = x
    groups = padded.view(3, 4, 32)
    d = groups.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    assert torch.equal(s, d)
    assert torch.equal(q.view(3, 4, 32), torch.round(groups * inv[..., None]).clamp(-127, 127).to(torch.int8))
    # precise: row 2i as above, row 2i + 1 the error left over on the fixed scale d / 256 (exactly 1/256 of d)
    q2, s2 = kernels.quantize_activations(x, impl, precise=True)
    assert q2.shape == (6, 128) and torch.equal(q2[0::2], q) and torch.equal(s2[0::2], s)
    assert torch.equal(s2[1::2], s / 256)
    error = groups - q.view(3, 4, 32).float() * d[..., None]  # (fp32, as the kernel: no fma)
    inv256 = inv * 256
    assert torch.equal(q2[1::2].view(3, 4, 32), torch.round(error * inv256[..., None]).clamp(-127, 127).to(torch.int8))
    assert q2[3, 32:64].eq(0).all()  # the all-zero group: no error, scale 0
    rebuilt = (q2[0::2].double() * 256 + q2[1::2].double()).view(3, 4, 32) * s2[1::2].double()[..., None]
    assert ((rebuilt - groups.double()).abs() <= d.double()[..., None] / 256).all()  # a 16-bit row on the scale d/256


SHAPES = [  # (M, N, K): tiny, odd N, K not a multiple of 32, the 7B shapes at decode sizes
    (1, 1, 1), (2, 17, 31), (3, 100, 33), (4, 64, 64), (1, 172, 64), (4, 64, 172), (7, 130, 96),
    (1, 4096, 4096), (4, 4096, 4096), (2, 11008, 4096), (3, 4096, 11008),
]


@pytest.mark.parametrize(("m", "n", "k"), SHAPES)
def test_matches_the_fp32_product(m: int, n: int, k: int) -> None:
    q, scale = random_weight(n, k, seed=m + n + k)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
    packed = kernels.pack_weight(q, scale)
    got = kernels.int8_gemv(x, packed)
    assert got.dtype == torch.float32 and got.shape == (m, n)
    # exact integer dot products, fp32 accumulation over groups: tight against the quantized activations ...
    weight = q.double() * scale.double()[:, None]
    ref = quantized_reference(x, weight)
    assert ((got.double() - ref).norm(dim=1) <= 1e-6 * ref.norm(dim=1) + 1e-30).all()
    # ... and within activation-quantization error of the fp32 product itself
    exact = x.double() @ weight.T
    if k >= 32:
        assert (got.double() - exact).norm() <= 1.5e-2 * exact.norm()
    # precise: the row and its quantization error as two int8 rows, ~16-bit activations
    precise = kernels.int8_gemv(x, packed, precise=True)
    assert ((precise.double() - exact).norm(dim=1) <= 2e-4 * exact.norm(dim=1) + 1e-30).all()


# (m 9 and 17: more int8 rows than amx's 16 per pass, precise or not, so its tiles are configured twice in a call)
# (9, 70, 300) and (6, 70, 1000): more rows than one pass takes, over several chunks of groups (gemv.cpp, kChunkGroups),
# the last one partial, with weight groups (and per-channel sums) running on from one chunk into the next
# (m >= 16, precise, avx2: the register-blocked GEMM of gemv.cpp; (22, 70, 1000): 7 blocks of 3 rows and one of 1,
# over K-blocks of 4 groups, the last one partial, with per-channel sums running on from one K-block into the next;
# (17, 65, 64): 5 blocks and one of 2; (140, 70, 300): more rows than one pass over the tiles takes, so two passes of
# 72 and 68 rows; the vnni512 path's GEMM takes the same calls in blocks of up to 6 rows over K-blocks of 8 groups:
# (22, 70, 1000) 3 blocks of 6 and one of 4, (17, 65, 64) 6 + 6 + 5, (140, 70, 300) two passes of 72 and 68 rows, the
# K-block of 10 groups split 8 + 2, (19, 70, 300) 6 + 6 + 6 + 1, (18, 70, 300) three of 6, (20, 100, 33) 6 + 6 + 6 + 2,
# (21, 70, 300) 6 + 6 + 6 + 3)
# (the amx path takes calls of more than 4 int8 rows in passes of up to 16, and its span-1 code the passes of 1-4
# output rows: with pairs (precise) the last pass of 9 and 17 rows (1 output row), 10 and 18 (2), 3 and 19 (3), 4 and
# 20 (4); without, the last pass of 17 (1), 18 (2), 19 (3) and 20 rows (4); with pairs, calls of 32 rows and more
# run its GEMM in register blocks of 16 rows over K-blocks of 8 groups: (33, 70, 1000) 16 + 16 + 1 over 4 K-blocks,
# with per-channel sums running on from one K-block into the next; (47, 130, 300) 16 + 16 + 15, the K-block of 10
# groups split 8 + 2, 3 tiles; (40, 65, 33) a padded second group; (140, 70, 300) two passes of 80 and 60 rows)
ODD_SHAPES = [(1, 1, 1), (2, 17, 31), (3, 100, 33), (5, 200, 172), (4, 130, 96), (9, 70, 300), (2, 64, 4096),
              (17, 65, 64), (6, 70, 1000), (22, 70, 1000), (140, 70, 300), (19, 70, 300), (10, 130, 96),
              (18, 70, 300), (20, 100, 33), (21, 70, 300), (33, 70, 1000), (47, 130, 300), (40, 65, 33)]


@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("m", "n", "k"), ODD_SHAPES)
def test_each_path_equals_the_exact_integer_reference(impl: str, m: int, n: int, k: int, group_size: int) -> None:
    q, scale = group_weight(n, k, group_size, seed=m * n + k)
    packed = kernels.pack_weight(q, scale, group_size)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)) * 3
    for precise in (False, True):
        got = kernels.int8_gemv(x, packed, impl=impl, precise=precise)
        assert torch.equal(got, exact_reference(x, packed, precise=precise)), f"path {impl}, precise {precise}"
        assert torch.equal(got, kernels.int8_gemv(x, packed, impl="scalar", precise=precise)), f"path {impl}"
        assert all(torch.equal(a, b) for a, b in zip(kernels.quantize_activations(x, impl, precise),
                                                      kernels.quantize_activations(x, "scalar", precise), strict=True))


def test_activations_near_the_int16_limit_do_not_saturate_avx2() -> None:
    """The worst case for vpmaddubsw: every weight and activation at +-127 (a pair sums to +-32258)."""
    if not CPU_HAS["avx2"]:
        pytest.skip("this CPU lacks avx2")
    q = torch.full((64, 64), 127, dtype=torch.int8)
    q[1::2] = -127
    packed = kernels.pack_weight(q, torch.ones(64))
    x = torch.full((2, 64), 5.0)
    x[1, ::2] = -5.0
    got = kernels.int8_gemv(x, packed, impl="avx2")
    assert torch.equal(got, exact_reference(x, packed))
    assert got[0, 0] == 64 * 127 * 5.0 and got[0, 1] == -64 * 127 * 5.0 and got[1, 0] == 0
    # precise, 16 rows and more (the GEMM's vpmaddwd on 16-bit rows): rows near the 16-bit limit, 256 * 126 + 127
    # (a value 126.498 steps of the group's scale: the second int8 row rounds 0.498 * 256 to 127)
    near = torch.full((14, 64), 5.0 / 127 * 126.498)
    near[:, 0] = 5.0
    near[1::2, 1::2] *= -1
    rows = torch.cat([x, near]).repeat(2, 1)
    assert kernels.quantize_activations(near[:1], "avx2", precise=True)[0][1, 1] == 127
    # the avx2 path's vpmaddwd and the avxvnni path's vpdpwssd, in the GEMM (32 rows) and the 4-row decode assembly;
    # vnni512's GEMM (32 rows), whose sums hold 256 * the high rows' dots before the low rows' are added
    for impl in [path for path in ("avx2", "avxvnni", "vnni512") if kernels.cpu_has(path)]:
        for count in (32, 4):
            wide = kernels.int8_gemv(rows[:count], packed, impl=impl, precise=True)
            assert torch.equal(wide, exact_reference(rows[:count], packed, precise=True)), (impl, count)
            assert torch.equal(wide, kernels.int8_gemv(rows[:count], packed, impl="scalar", precise=True))


@pytest.mark.parametrize("group_size", GROUP_SIZES)
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("n", "k"), [(17, 31), (100, 172), (130, 256), (64, 64), (72, 96), (200, 4096)])
def test_dequantize_reads_the_packed_copy(impl: str, n: int, k: int, group_size: int) -> None:
    """Every path (the vector ones share the AVX2 code: 8 rows of a whole group at a time, the rest scalar)."""
    q, scale = group_weight(n, k, group_size, seed=n)
    packed = kernels.pack_weight(q, scale, group_size)
    scales = kernels.row_scales(packed, torch.arange(n))  # [N, K]
    fp32 = kernels.dequantize(packed, torch.empty(n, k), impl=impl)
    assert torch.equal(fp32, q.float() * scales), f"path {impl}"  # exact
    bf16 = kernels.dequantize(packed, torch.empty(n, k, dtype=torch.bfloat16), impl=impl)
    # torch's bf16 product, bit for bit
    assert torch.equal(bf16, q.to(torch.bfloat16) * scales.to(torch.bfloat16)), f"path {impl}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_streams_a_buffer_larger_than_the_caches(dtype: torch.dtype) -> None:
    """>= 32 MB out: the vector code writes with non-temporal stores; the same bits as the scalar code."""
    if not CPU_HAS["avx2"]:
        pytest.skip("this CPU lacks avx2")
    q, scale = group_weight(4096, 4096, 32, seed=3)
    packed = kernels.pack_weight(q, scale, 32)
    streamed = kernels.dequantize(packed, torch.empty(4096, 4096, dtype=dtype), impl="avx2")
    assert streamed.nbytes >= 32 << 20
    assert torch.equal(streamed, kernels.dequantize(packed, torch.empty(4096, 4096, dtype=dtype), impl="scalar"))


@pytest.mark.parametrize("precise", [False, True])
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(("n", "k"), [(300, 172), (4096, 4096)])
def test_rows_do_not_depend_on_the_batch_or_threads(impl: str, precise: bool, n: int, k: int) -> None:
    q, scale = group_weight(n, k, 32, seed=7)
    packed = kernels.pack_weight(q, scale, 32)
    # 9 rows: passes of 4 + 4 + 1 inside the kernel; 17 (precise, avx2): the GEMM's blocks of 3 + 3 + 3 + 3 + 3 + 2;
    # 33 and 40 (precise): the GEMMs of every path, amx's in register blocks of 16 + 16 + 1 and 16 + 16 + 8
    x = torch.randn(40, k)

    def run(rows: torch.Tensor) -> torch.Tensor:
        return kernels.int8_gemv(rows, packed, impl=impl, precise=precise)

    together = run(x)
    for count in (1, 2, 3, 4, 9, 17, 33):
        assert torch.equal(run(x[:count]), together[:count])
    for i in range(0, 40, 3):
        assert torch.equal(run(x[i : i + 1])[0], together[i])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = run(x)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single, together)


def test_accepts_bf16_and_fp16_activations() -> None:
    q, scale = random_weight(70, 96, seed=3)
    packed = kernels.pack_weight(q, scale)
    x = torch.randn(2, 96)
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(kernels.int8_gemv(x.to(dtype), packed), kernels.int8_gemv(x.to(dtype).float(), packed))


def test_rejects_bad_inputs() -> None:
    q, scale = random_weight(64, 64, seed=1)
    packed = kernels.pack_weight(q, scale)
    with pytest.raises(ValueError, match="x must be"):
        kernels.int8_gemv(torch.zeros(2, 63), packed)
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        kernels.int8_gemv(torch.zeros(2, 64, dtype=torch.float64), packed)
    assert kernels.int8_gemv(torch.zeros(0, 64), packed).shape == (0, 64)


@pytest.fixture
def fresh_load(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Forget the cached load result for one test (whose monkeypatched environment then decides), and again after."""
    gemv_kernel._load.cache_clear()
    kernel_cpu._unavailable_reason.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    gemv_kernel._load.cache_clear()
    kernel_cpu._unavailable_reason.cache_clear()


def test_disabled_by_environment_is_unavailable_not_an_error(fresh_load: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    fresh_load.setenv("INT8SERVE_KERNELS", "0")
    assert not kernels.available()
    assert "INT8SERVE_KERNELS=0" in (kernels.unavailable_reason() or "")
    assert "int8 decode kernel not available" in caplog.text  # the logged warning
    with pytest.raises(RuntimeError, match="not available"):
        kernels.int8_gemv(torch.zeros(1, 32), torch.zeros(64, 32, dtype=torch.int8), torch.ones(64))


def test_a_failing_compiler_makes_it_unavailable_not_an_error(fresh_load: pytest.MonkeyPatch,
                                                              tmp_path: Path) -> None:
    fresh_load.setenv("INT8SERVE_CACHE", str(tmp_path))
    fresh_load.setenv("CXX", "/bin/false")
    assert not kernels.available()
    assert "BuildError" in (kernels.unavailable_reason() or "")
    assert not list(tmp_path.rglob("*.so"))  # nothing half-built is left to be loaded later
    # packing still works (in torch), so a layer can be built either way
    q, scale = random_weight(70, 40, seed=0)
    assert torch.equal(kernels.unpack_weight(kernels.pack_weight(q, scale)), q)


# ---- Int8Linear without our kernel (no compiler, INT8SERVE_KERNELS=0): torch's stock path ----


def make_layer(k: int, n: int) -> Int8Linear:
    layer = Int8Linear(k, n)
    layer.set_quantized(*random_weight(n, k, seed=k))
    return layer


def old_path(layer: Int8Linear, x: torch.Tensor) -> torch.Tensor:
    rows = x.to(int8.COMPUTE_DTYPE)
    return torch._weight_int8pack_mm(rows, layer.weight, layer.scale.to(int8.COMPUTE_DTYPE)).float()


def test_int8linear_without_the_kernel_takes_the_old_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "available", lambda: False)
    layer = make_layer(64, 96)  # the weight is set while the kernel is unavailable
    x = torch.randn(3, 64)
    assert torch.equal(layer(x), old_path(layer, x))


@pytest.mark.skipif(not CPU_HAS["amx"], reason="this CPU lacks amx_tile amx_int8")
def test_amx_and_torchs_own_amx_matmuls_take_turns_on_the_same_threads() -> None:
    """oneDNN's bf16 matmuls configure the AMX tiles their own way on torch's threads, which are also ours: each of
    our calls configures them itself and releases them, so neither disturbs the other."""
    q, scale = group_weight(300, 256, 32, seed=3)
    packed = kernels.pack_weight(q, scale, 32)
    x = torch.randn(6, 256, generator=torch.Generator().manual_seed(5))
    a, b = torch.randn(512, 1024).bfloat16(), torch.randn(1024, 1024).bfloat16()
    expected_gemv, expected_matmul = kernels.int8_gemv(x, packed, impl="scalar", precise=True), a @ b
    for _ in range(3):
        assert torch.equal(kernels.int8_gemv(x, packed, impl="amx", precise=True), expected_gemv)
        assert torch.equal(a @ b, expected_matmul)


def anon_huge_kb(address: int) -> int:
    """AnonHugePages of the mapping of this process that holds `address` (/proc/self/smaps)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(part, 16) for part in head.split("-"))
            inside = start <= address < end
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def test_a_large_packed_weight_lives_on_2mb_pages() -> None:
    q, scale = random_weight(4096, 4096, seed=1)  # 16 MB packed: the threshold
    packed = kernels.pack_weight(q, scale)
    assert packed.data.data_ptr() % kernels.HUGE_PAGE == 0
    x = torch.randn(2, 4096, generator=torch.Generator().manual_seed(2))
    assert torch.equal(kernels.int8_gemv(x, packed), exact_reference(x, packed))
    setting = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    if "[never]" not in setting:  # madvise (the default) or always: the kernel gave it 2 MB pages
        assert anon_huge_kb(packed.data.data_ptr()) >= 16 * 1024 - 2048, setting
    small = kernels.pack_weight(*random_weight(64, 64, seed=3))
    assert small.data.data_ptr() % kernels.ALIGNMENT == 0  # small weights stay in torch's own memory


# 20000 rows of 4096 values under an address-space limit that their outputs fit in but not the library's own buffers
# (the quantized rows, 164 MB with precise activations; 92 MB of copies for i8s_quantize): a clear error from each
# entry point, not an abort of the process (std::bad_alloc leaving the library).
OUT_OF_MEMORY = """
import resource, torch
from int8serve.engine import kernels
packed = kernels.pack_weight(torch.randint(-127, 128, (64, 4096), dtype=torch.int8), torch.rand(64, 128) * 0.01, 32)
kernels.int8_gemv(torch.randn(8, 4096), packed, precise=True)  # the library loaded, its threads started
x = torch.randn(20000, 4096)
used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + (120 << 20), resource.RLIM_INFINITY))
for call in (lambda: kernels.int8_gemv(x, packed, precise=True), lambda: kernels.quantize_activations(x)):
    try:
        call()
    except RuntimeError as error:
        print(error)
"""


def test_running_out_of_memory_is_an_error_not_an_abort() -> None:
    done = subprocess.run([sys.executable, "-c", OUT_OF_MEMORY], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "i8s_gemv failed: out of memory for its buffers (20000 rows of 4096 values)" in done.stdout
    assert "i8s_quantize failed: out of memory for its buffers (20000 rows of 4096 values)" in done.stdout
