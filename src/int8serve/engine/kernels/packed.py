"""The packed weight: an int8 weight and its scales in the decode kernel's layout, and the Python calls of the kernel.

Why a module of its own: the layout is the one thing every user of an int8 weight shares, whatever the CPU: the
model's layers (int8.py) hold their weights packed once at load time (`pack_weight`), the model cache stores and
maps them back (`adopt_packed`, packed_checkpoint.py), the prefill matmul (matmul.py) reads the same bytes, and
`int8_gemv`, `quantize_activations` and `dequantize` call gemv.cpp on them. The layout lets one vector instruction
multiply 4 weights of 8 or 16 output rows with 4 activation bytes; activations are quantized per row in groups of 32
values with an fp32 scale each (like llama.cpp's Q8_0), weights carry one bf16 scale per output row, or per group of
32/64/128 input values (`group_size`), accumulation and output are fp32; with precise=True each row is quantized
twice (the row, then its quantization error on 1/256 of its scale), for about 16-bit activations: twice the int8
arithmetic on the paths with int8 dot products, whose two sums are combined exactly before one conversion; the avx2
path multiplies the 16-bit values directly, and so does the avxvnni path in calls of 2 rows and more (with
vpdpwssd). See the comment at the top of gemv.cpp for the arithmetic, and benchmarks/kernels.py for speed and
accuracy. Where the library is not loaded, packing and unpacking run in torch (the same bytes).
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .cpu import path
from .gemv import _IMPLS, Impl, _library, loaded
from .library import kernel_threads

GROUP = 32  # activation values per scale; K is padded (with zeros) to a multiple of this
TILE_ROWS = 64  # output rows per packed tile; N is padded to a multiple of this
# The packed layout (packed_layout.h, gemv.cpp's comment; pack_weight, _pack_torch, unpack_weight; version 2: each
# weight group's scales after its weights, in one buffer). Every path reads the same bytes, so
# a stored packed weight (the model cache's copy) does not depend on the CPU; bump this when the layout changes, and
# copies stored the old way are rebuilt.
LAYOUT = {"name": "int8serve-tiles", "version": 2, "tile_rows": TILE_ROWS, "group": GROUP}
ALIGNMENT = 64  # bytes: gemv.cpp refuses a packed weight whose data is not 64-byte aligned (status -2)


@dataclass(frozen=True)
class PackedWeight:
    """An int8 weight [N, K] and its bf16 scales in the kernel's layout (packed_layout.h, gemv.cpp): one buffer,
    tile by tile of 64 output rows, each weight group's packed bytes followed by its 64 scales.

    group_size 0: one scale per output row; else one per row and group of `group_size` input values.
    """

    data: Tensor  # uint8 [packed_nbytes(N, K, group_size)], 64-byte aligned: values w + 128 and the bf16 scales
    out_features: int
    in_features: int
    group_size: int = 0

    @property
    def nbytes(self) -> int:
        return self.data.numel()

    @property
    def weight_groups(self) -> int:
        return weight_groups(self.in_features, self.group_size)

    @property
    def scale(self) -> Tensor:
        """The scales where they are: bf16 [Np/64, weight groups, 64] (a view into `data`, zero padded rows)."""
        span = _layout(self.in_features, self.group_size)[0]
        return _blocks(self)[..., span * GROUP_BYTES:].view(torch.bfloat16)

    def scales(self) -> Tensor:
        """The scales as fp32 [N, weight groups] (exact: they are bf16)."""
        return self.scale.float().permute(0, 2, 1).reshape(-1, self.weight_groups)[:self.out_features].contiguous()


GROUP_BYTES = TILE_ROWS * GROUP  # one group of 32 inputs of a tile
SCALE_BYTES = 2 * TILE_ROWS  # one weight group's bf16 scales of a tile


def _layout(in_features: int, group_size: int) -> tuple[int, int, int]:
    """(activation groups per weight group, weight groups per row, bytes per weight group of a tile)."""
    groups = -(-in_features // GROUP)
    span = groups if group_size == 0 else group_size // GROUP
    return span, -(-groups // span), span * GROUP_BYTES + SCALE_BYTES


def packed_nbytes(out_features: int, in_features: int, group_size: int) -> int:
    """The bytes of a PackedWeight's `data` for an int8 weight [N, K]: the weights, padded, and their scales."""
    _, wgroups, group_bytes = _layout(in_features, group_size)
    return -(-out_features // TILE_ROWS) * wgroups * group_bytes


def _blocks(packed: PackedWeight) -> Tensor:
    """data as uint8 [tiles, weight groups, bytes per weight group]."""
    _, wgroups, group_bytes = _layout(packed.in_features, packed.group_size)
    return packed.data.view(-1, wgroups, group_bytes)


def adopt_packed(data: Tensor, out_features: int, in_features: int, group_size: int) -> PackedWeight:
    """A PackedWeight over a tensor already in the packed layout (a stored copy, e.g. memory-mapped), without copying
    it unless it is not 64-byte aligned. Raises ValueError when its dtype or size does not fit [N, K]."""
    check_group_size(group_size)
    nbytes = packed_nbytes(out_features, in_features, group_size)
    if data.dtype != torch.uint8 or tuple(data.shape) != (nbytes,):
        raise ValueError(f"packed data must be uint8 [{nbytes}], got {data.dtype} {list(data.shape)}")
    if data.device.type != "cpu" or not data.is_contiguous() or data.data_ptr() % ALIGNMENT:
        data = _aligned_empty(data.numel()).copy_(data)
    return PackedWeight(data, out_features, in_features, group_size)


def can_stack(parts: Sequence[PackedWeight]) -> bool:
    """Whether `parts` can lie end to end as one packed weight (see stack_packed): the same inputs and scheme."""
    return len(parts) > 1 and len({(p.in_features, p.group_size) for p in parts}) == 1


def stack_packed(parts: Sequence[PackedWeight]) -> tuple[PackedWeight, list[PackedWeight], list[int]]:
    """Weights [N_i, K] over the same input as one packed weight whose bytes are theirs end to end: (the stacked
    weight, each part as a view into it, the stacked weight's output row where each part's rows begin). A packed
    weight is a sequence of tiles of 64 output rows, so each output row is computed as in its part alone (gemv.cpp
    computes each tile on its own). A part of N_i rows not a multiple of 64 keeps its padding rows (zero weights and
    scales: outputs 0) between it and the next.

    Parts already end to end in one storage (the packed copy's file maps them so) are used where they are: the stacked
    weight is a view over them, nothing is copied. Others are copied into one new buffer (on 2 MB pages when large)."""
    if not can_stack(parts):
        raise ValueError("only two or more weights of the same inputs and group size can be stacked, got "
                         f"{[(p.out_features, p.in_features, p.group_size) for p in parts]}")
    data = _spanning_view(parts)
    views = list(parts)
    if data is None:
        data, views, offset = _aligned_empty(sum(p.nbytes for p in parts)), [], 0
        for part in parts:
            view = data[offset:offset + part.nbytes]
            view.copy_(part.data)
            views.append(PackedWeight(view, part.out_features, part.in_features, part.group_size))
            offset += part.nbytes
    starts, row = [], 0
    for part in parts:
        starts.append(row)
        row += -(-part.out_features // TILE_ROWS) * TILE_ROWS
    rows = starts[-1] + parts[-1].out_features
    return PackedWeight(data, rows, parts[0].in_features, parts[0].group_size), views, starts


def _spanning_view(parts: Sequence[PackedWeight]) -> Tensor | None:
    """One uint8 view over the bytes of `parts` when they lie end to end in one storage, else None."""
    first = parts[0].data
    storage, end = first.untyped_storage().data_ptr(), first.data_ptr()
    for part in parts:
        if part.data.untyped_storage().data_ptr() != storage or part.data.data_ptr() != end:
            return None
        end += part.nbytes
    return first.as_strided((end - first.data_ptr(),), (1,))


def _aligned_empty(numel: int, alignment: int = ALIGNMENT) -> Tensor:
    if numel >= HUGE_PAGE_MIN_BYTES and hasattr(mmap, "MADV_HUGEPAGE"):
        return _huge_page_empty(numel)
    raw = torch.empty(numel + alignment, dtype=torch.uint8, device="cpu")
    offset = (-raw.data_ptr()) % alignment
    return raw[offset:offset + numel]


# A packed weight of this many bytes or more lives on 2 MB pages. The kernel streams each weight once per step, and
# with 4 KB pages every 4 KB of it costs a TLB miss and stops the hardware prefetchers at the page's end: on a
# Sapphire Rapids (2 threads, precise, streamed weights; 2026-12-02), 4096 -> 11008 and 11008 -> 4096 from 4 KB
# pages against 2 MB pages: 1 row 24.2-24.4 -> 27.1-27.2 GB/s, 4 rows (amx) 20.6-20.8 -> 24.0-24.6 GB/s. What it can
# cost is less than one 2 MB page per weight, past its end (under 2 MB each of the 7B's 96 weights of 11008 rows or
# columns and its output head; the 4096 x 4096 ones are whole pages): about 1.4% of the 7B's weights.
HUGE_PAGE = 2 << 20
HUGE_PAGE_MIN_BYTES = 16 << 20


def _huge_page_empty(numel: int) -> Tensor:
    """uint8 [numel], 2 MB aligned, in private anonymous memory that asks Linux for transparent huge pages (used where
    its setting is `madvise`, the default, or `always`; with `never`, plain pages). The tensor keeps the mapping
    alive; it is unmapped with the last reference."""
    region = mmap.mmap(-1, numel + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # a kernel without THP: plain pages
        region.madvise(mmap.MADV_HUGEPAGE)
    whole = torch.frombuffer(region, dtype=torch.uint8)
    offset = (-whole.data_ptr()) % HUGE_PAGE
    return whole[offset:offset + numel]


def weight_groups(in_features: int, group_size: int) -> int:
    """Scales per output row: 1 per channel (group_size 0), else ceil(K / group_size)."""
    return 1 if group_size == 0 else -(-in_features // group_size)


def check_group_size(group_size: int) -> int:
    if group_size < 0 or group_size % GROUP:
        raise ValueError(f"group size must be 0 (per channel) or a positive multiple of {GROUP}, not {group_size}")
    return group_size


def pack_weight(weight: Tensor, scale: Tensor, group_size: int = 0) -> PackedWeight:
    """int8 [N, K] + scales (fp32 [N] per channel, or [N, ceil(K/group_size)]) -> PackedWeight, once per layer.

    The scales are kept in bf16 (rounded to nearest; the quantizers in int8.py make them bf16-exact, so nothing is
    lost). In C++ where the library is loaded (about 1 GB/s), else in torch (the same bytes, several times slower).
    """
    check_group_size(group_size)
    if weight.dim() != 2 or weight.dtype != torch.int8:
        raise ValueError(f"weight must be int8 [N, K], got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    if n == 0 or k == 0:
        raise ValueError("empty weight")
    if weight.device.type != "cpu":
        raise ValueError(f"weight must be on the CPU, not {weight.device}")
    groups = weight_groups(k, group_size)
    if scale.shape not in ((n, groups), (n,) if groups == 1 else ()):
        raise ValueError(f"scale must be [{n}, {groups}] for group size {group_size}, got {tuple(scale.shape)}")
    if weight.min() < -127:
        raise ValueError("weight must lie in [-127, 127] (symmetric quantization)")
    scale = scale.reshape(n, groups).to(torch.bfloat16).contiguous()
    packed = PackedWeight(_aligned_empty(packed_nbytes(n, k, group_size)), n, k, group_size)
    if not loaded():
        _pack_torch(weight, scale, packed)
        return packed
    weight = weight.contiguous()
    _library().i8s_pack(weight.data_ptr(), n, k, scale.data_ptr(), group_size, packed.data.data_ptr(),
                        torch.get_num_threads())
    return packed


def _pack_torch(weight: Tensor, scale: Tensor, packed: PackedWeight) -> None:
    """What i8s_pack writes, in torch: the int8 [N, K] weight and its bf16 scales [N, weight groups] into `packed`."""
    n, k = weight.shape
    span, wgroups, _ = _layout(k, packed.group_size)
    np_, kp = -(-n // TILE_ROWS) * TILE_ROWS, wgroups * span * GROUP  # K padded to whole weight groups
    unsigned = torch.full((np_, kp), 0x80, dtype=torch.uint8, device="cpu")  # zero weights
    unsigned[:n, :k] = weight.view(torch.uint8) ^ 0x80  # w + 128 as unsigned bytes (two's complement)
    # [tile, block, row, weight group, group, step] -> [tile, weight group, group, block, step, row], 4-byte words
    words = unsigned.view(torch.int32).view(np_ // TILE_ROWS, 4, 16, wgroups, span, 8)
    _words(packed).copy_(words.permute(0, 3, 4, 1, 5, 2))
    padded = torch.zeros(np_, wgroups, dtype=torch.bfloat16)
    padded[:n] = scale
    packed.scale.copy_(padded.view(np_ // TILE_ROWS, TILE_ROWS, wgroups).permute(0, 2, 1))


def _words(packed: PackedWeight) -> Tensor:
    """The weights as int32 words (4 inputs each) [tiles, weight groups, groups, block, step, row] (a view)."""
    span = _layout(packed.in_features, packed.group_size)[0]
    blocks = _blocks(packed)
    return blocks[..., :span * GROUP_BYTES].view(torch.int32).view(*blocks.shape[:2], span, 4, 8, 16)


def unpack_weight(packed: PackedWeight) -> Tensor:
    """The int8 [N, K] weight back from a PackedWeight (the checkpoint writer and tests read it this way)."""
    words = _words(packed)
    tiles, wgroups, span = words.shape[:3]
    rows = words.permute(0, 3, 5, 1, 2, 4).reshape(tiles * TILE_ROWS, wgroups * span * 8)
    signed = (rows.view(torch.uint8) ^ 0x80).view(torch.int8)
    return signed[:packed.out_features, :packed.in_features].contiguous()


def weight_rows(packed: PackedWeight, index: Tensor) -> Tensor:
    """Rows `index` (int64 of any shape, each < N) of the int8 weight, read from the packed copy: [*index.shape, K]."""
    words = _words(packed)
    within = index % TILE_ROWS
    picked = words[index // TILE_ROWS, :, :, within // 16, :, within % 16]  # [*index.shape, wgroups, span, 8] words
    rows = (picked.reshape(*index.shape, -1).view(torch.uint8) ^ 0x80).view(torch.int8)
    return rows[..., :packed.in_features]


def row_scales(packed: PackedWeight, index: Tensor) -> Tensor:
    """The fp32 scale of every weight of rows `index`: [*index.shape, K] (per channel: the row's scale repeated)."""
    picked = packed.scale[index // TILE_ROWS, :, index % TILE_ROWS].float()  # [*index.shape, weight groups]
    if packed.group_size == 0:
        return picked.expand(*index.shape, packed.in_features)
    return picked.repeat_interleave(packed.group_size, dim=-1)[..., :packed.in_features]


def dequantize(packed: PackedWeight, out: Tensor, impl: Impl = "auto") -> Tensor:
    """out [N, K] (fp32 or bf16) = w * scale, read from the packed copy; fp32 is exact, bf16 rounds to nearest even,
    the same bits as torch's bf16 product of the int8 weight and its bf16 scale. The dense (prefill) path's weight.
    impl: the kernel path whose code does it ("auto": `path()`; every vector path runs the AVX2 code)."""
    n, k = packed.out_features, packed.in_features
    if out.shape != (n, k) or not out.is_contiguous() or out.dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"out must be a contiguous fp32 or bf16 [{n}, {k}] tensor, got {out.dtype} {tuple(out.shape)}")
    if loaded():
        status = _library().i8s_dequant(packed.data.data_ptr(), n, k, packed.group_size,
                                        out.data_ptr(), int(out.dtype == torch.bfloat16),
                                        _IMPLS[path() if impl == "auto" else impl], torch.get_num_threads())
        if status != 0:
            raise RuntimeError(f"i8s_dequant failed with status {status}")
        return out
    scales = packed.scales().to(out.dtype)
    if packed.group_size:
        scales = scales.repeat_interleave(packed.group_size, dim=1)[:, :k]
    return torch.mul(unpack_weight(packed), scales, out=out)


def int8_gemv(x: Tensor, weight: Tensor | PackedWeight, scale: Tensor | None = None, *, impl: Impl = "auto",
              precise: bool = False) -> Tensor:
    """x [M, K] (fp32/bf16/fp16) @ (weight * scale).T -> fp32 [M, N], activations quantized per 32 values.

    `weight` is best a PackedWeight made once by pack_weight; an int8 [N, K] tensor with per-channel `scale` is packed
    on the fly (slow, for tests). impl "auto": the path of `path()`; every path gives bitwise the same result. Row i
    of the output depends only on row i of x. Raises if the library is not loaded or the CPU lacks the path.

    precise=True quantizes each row twice (the row, then its quantization error on 1/256 of the row's scale), so
    activations carry ~16 bits instead of 8: free while memory-bound (M = 1, 2), about twice the compute after.
    """
    # (A decode step makes 7 of these calls a layer, 225 a 7B step: the conversion happens only when needed. A call
    # on a tiny weight took 26 us before, 11 after, on a Zen 3; Int8Linear's whole call 40 -> 19-22 us.)
    lib = _library()
    if not isinstance(weight, PackedWeight):
        if scale is None:
            raise ValueError("an int8 weight needs its scale")
        weight = pack_weight(weight, scale)
    if x.dim() != 2 or x.shape[1] != weight.in_features:
        raise ValueError(f"x must be [M, {weight.in_features}], got {tuple(x.shape)}")
    if x.dtype is not torch.float32 or not x.is_contiguous() or not x.is_cpu:
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise ValueError(f"x must be float32, bfloat16 or float16, not {x.dtype}")
        x = x.to(device="cpu", dtype=torch.float32).contiguous()
    if impl == "auto":
        impl = path()
    m = x.shape[0]
    y = torch.empty(m, weight.out_features, dtype=torch.float32)
    args = (x.data_ptr(), m, weight.in_features, weight.data.data_ptr(), weight.out_features, weight.group_size,
            y.data_ptr(), _IMPLS[impl], int(precise), kernel_threads())
    if torch.autograd._profiler_enabled():  # a ctypes call is invisible to torch.profiler unless labelled (~9 us)
        with torch.autograd.profiler.record_function("int8serve::int8_gemv"):
            status = lib.i8s_gemv(*args)
    else:
        status = lib.i8s_gemv(*args)
    if status != 0:
        if status == -4:
            raise RuntimeError(f"i8s_gemv failed: out of memory for its buffers ({m} rows of {weight.in_features} "
                               "values)")
        raise RuntimeError(f"i8s_gemv failed with status {status} (-1: this CPU lacks path {impl!r}, "
                           "-2: misaligned weight, -3: bad arguments)")
    return y


def quantize_activations(x: Tensor, impl: Impl = "auto", precise: bool = False) -> tuple[Tensor, Tensor]:
    """x [M, K] -> (int8 [M, Kp], fp32 scales [M, Kp/32]) exactly as the kernel quantizes its input; precise: 2M rows
    of each, row i's q_hi and scale at 2i, its q_lo (the error, on the scale / 256) at 2i + 1."""
    lib = _library()
    if x.dim() != 2:
        raise ValueError("x must be 2-D")
    x = x.to(device="cpu", dtype=torch.float32).contiguous()
    m, k = x.shape
    kp = -(-k // GROUP) * GROUP
    rows = 2 * m if precise else m
    q = torch.empty(rows, kp, dtype=torch.int8)
    scales = torch.empty(rows, kp // GROUP, dtype=torch.float32)
    status = lib.i8s_quantize(x.data_ptr(), m, k, q.data_ptr(), scales.data_ptr(), _IMPLS[impl], int(precise))
    if status == -4:
        raise RuntimeError(f"i8s_quantize failed: out of memory for its buffers ({m} rows of {k} values)")
    if status != 0:
        raise RuntimeError(f"this CPU lacks path {impl!r}")
    return q, scales
