"""The model cache's copy: int8 weights stored in our kernel's packed layout and memory-mapped back at load.

An int8 checkpoint as `int8serve quantize` writes it (format versions 1 and 2) holds plain int8 [N, K] weights and
their scales: loading it reads every byte into fresh memory and repacks each weight into the kernel's tiles
(gemv.cpp), which made a later start of the 7B shape take ~20 s on an idle 2-core machine. This format (version 3)
stores what the model holds instead: each `Int8Linear`'s packed bytes with its bf16 scales among them (the
`packed_data` tensor, kernels.PackedWeight), beside the full-precision embeddings and norms, in one safetensors file.
Loading maps the file (one private memory map of the whole file, map_safetensors): nothing is read, copied or
repacked; pages come in from the page cache as the first forward touches them, and the mapping is the model's only
copy of its weights (issue 10's rule: one packed copy). The writer puts the weights of each stack of projections (q,
k, v; gate, up: StackedInt8Linear) one after the other, so the stack is a view of the mapping too.

The kernel needs each packed weight 64-byte aligned, and a mapping keeps the file's alignment, so the writer puts
every tensor at a multiple of 64 bytes: the header is padded to end there, the packed data (multiples of 64 bytes)
come first, then the fp32 tensors. The layout is the same on every kernel path (`kernels.LAYOUT`), so one copy serves
any CPU; `int8serve.json` records it, and a copy of another layout is refused with a CheckpointError (the model cache
then rebuilds it).
"""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import threading
from pathlib import Path

import torch
from torch import Tensor, nn

from . import kernels
from .errors import CheckpointError
from .int8 import Int8Linear
from .loader import (
    EMBEDDING_DTYPES,
    INT8_FORMAT,
    PACKED_FORMAT_VERSION,
    RESIDUAL,
    RESIDUAL_SCALE,
    LoadedModel,
    check_config_fits,
    check_finite,
    copy_tokenizer,
    find_tokenizer,
    int8_config,
)
from .model import Transformer
from .model_files import PACKED_WEIGHTS, check_packed_size, safetensors_header

WEIGHTS = PACKED_WEIGHTS
_DTYPES = {torch.uint8: "U8", torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
_DTYPE_NAMES = {name: dtype for dtype, name in _DTYPES.items()}


def save_packed_checkpoint(loaded: LoadedModel, destination: str | Path,
                           source_identity: dict[str, object] | None = None) -> Path:
    """Write an int8 model as int8serve.json (version 3) + model.safetensors (packed layout) + its tokenizer;
    `source_identity` (what the model cache keys the copy by) is recorded in int8serve.json when given.

    Tensors are written one at a time from the model's own copies, so writing costs no second copy of the model (a
    layer on torch's stock kernels is packed as it is written: twice, for its data and then for its scales, rather
    than keeping every packed copy until the scales' turn comes).
    """
    model = loaded.model
    if model.precision != "int8":
        raise ValueError("only an int8 model can be saved in the packed layout")
    folder = Path(destination)
    folder.mkdir(parents=True, exist_ok=True)
    packed: list[tuple[str, Int8Linear]] = []
    dense: list[tuple[str, Tensor]] = []
    for name, module in model.named_modules():
        if isinstance(module, Int8Linear):
            packed.append((name, module))
        for parameter_name, parameter in module.named_parameters(prefix=name, recurse=False):
            dense.append((parameter_name, parameter.data))
    # (name, dtype, shape, the tensor when it is written); aligned by this order (see the module's docstring)
    entries: list[tuple[str, torch.dtype, tuple[int, ...], object]] = []
    for name, module in packed:
        nbytes = kernels.packed_nbytes(module.out_features, module.in_features, module.group_size)
        entries.append((f"{name}.packed_data", torch.uint8, (nbytes,), lambda m=module: m.packed_copy().data))
    for name, tensor in dense:  # fp32, but for 16-bit embeddings (loader.EMBEDDING_DTYPES), stored as they are
        entries.append((name, tensor.dtype, tuple(tensor.shape), lambda t=tensor: t))
    for name, module in packed:  # the output head's residual (Int8Linear.set_residual): bf16 scales, then bytes, last
        if module.residual is not None:
            for suffix, tensor in ((RESIDUAL_SCALE, module.residual_scale), (RESIDUAL, module.residual)):
                entries.append((name + suffix, tensor.dtype, tuple(tensor.shape), lambda t=tensor: t))
    size = _write_aligned_safetensors(folder / WEIGHTS, entries)
    meta = {"format": INT8_FORMAT, "version": PACKED_FORMAT_VERSION, "layout": kernels.LAYOUT,
            "config": loaded.config.to_dict(),
            "group_sizes": {name: module.group_size for name, module in packed},
            "weights_bytes": size, "source": str(loaded.path),
            **({"source_identity": source_identity} if source_identity is not None else {}),
            "note": "int8serve's own cache format (the kernel's packed layout); `int8serve quantize` writes the "
                    "portable one"}
    (folder / "int8serve.json").write_text(json.dumps(meta, indent=2) + "\n")
    if loaded.tokenizer_path is not None:
        copy_tokenizer(loaded.tokenizer_path, folder)  # tokenizer.model, or tokenizer.json + tokenizer_config.json
    return folder


def _write_aligned_safetensors(path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...], object]]) -> int:
    """A safetensors file with the tensors in `entries`' order, the header padded so that the data starts at a
    multiple of kernels.ALIGNMENT; returns the file's size."""
    header: dict[str, object] = {"__metadata__": {"format": "int8serve-packed"}}
    offset = 0
    for name, dtype, shape, _ in entries:
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        header[name] = {"dtype": _DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-(8 + len(encoded)) % kernels.ALIGNMENT)  # the format allows trailing spaces
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little") + encoded)
        for name, dtype, shape, produce in entries:
            tensor = produce()  # type: ignore[operator]
            if tensor.dtype != dtype or tuple(tensor.shape) != shape:
                raise ValueError(f"{name}: {tensor.dtype} {list(tensor.shape)}, expected {dtype} {list(shape)}")
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())
    return 8 + len(encoded) + offset


def check_packed_meta(folder: Path, meta: dict) -> None:
    """Raise CheckpointError unless `meta` (int8serve.json) describes a packed copy this version can map."""
    if meta.get("format") != INT8_FORMAT or meta.get("version") != PACKED_FORMAT_VERSION:
        raise CheckpointError(f"{folder}: format {meta.get('format')!r} version {meta.get('version')!r} (an older "
                              "int8serve's plain int8 weights, repacked at every start), not the packed layout "
                              f"(version {PACKED_FORMAT_VERSION}) that later starts map")
    if meta.get("layout") != kernels.LAYOUT:
        raise CheckpointError(f"{folder}: packed layout {meta.get('layout')}, this version reads {kernels.LAYOUT}")
    check_packed_size(folder, meta)


def load_packed(folder: Path, meta: dict) -> LoadedModel:
    """Map the packed copy in `folder` (int8serve.json already read into `meta`) into an int8 Transformer."""
    check_packed_meta(folder, meta)
    config = int8_config(folder, meta)
    group_sizes = meta.get("group_sizes", {})
    weights = folder / WEIGHTS
    _prefetch(weights)
    try:
        mapped = map_safetensors(weights)
        check_config_fits(config, {name: tuple(t.shape) for name, t in mapped.items()}, weights)
        with torch.device("meta"):
            model = Transformer(config, "int8")
        stored = set(mapped)
        used: set[str] = set()

        def take(name: str) -> Tensor:
            if name not in stored:
                raise CheckpointError(f"{weights}: no tensor '{name}'")
            used.add(name)
            return mapped[name]

        for name, module in model.named_modules():
            if isinstance(module, Int8Linear):
                packed = kernels.adopt_packed(take(f"{name}.packed_data"), module.out_features,
                                              module.in_features, int(group_sizes[name]))
                module.set_packed(packed)
                if name + RESIDUAL in stored:  # (copies written before the residual have none)
                    check_finite(weights, name + RESIDUAL_SCALE, take(name + RESIDUAL_SCALE))
                    module.set_residual_quantized(take(name + RESIDUAL), take(name + RESIDUAL_SCALE))
            for parameter_name, parameter in list(module.named_parameters(recurse=False)):
                full_name = f"{name}.{parameter_name}" if name else parameter_name
                tensor = take(full_name)
                allowed = EMBEDDING_DTYPES if full_name == "tok_embeddings.weight" else (torch.float32,)
                if tensor.dtype not in allowed or tensor.shape != parameter.shape:
                    raise CheckpointError(f"{weights}: tensor '{full_name}' is {tensor.dtype} "
                                          f"{list(tensor.shape)}, the config describes {list(parameter.shape)}")
                check_finite(weights, full_name, tensor)  # the norms and embeddings: a few MB, not the int8 weights
                setattr(module, parameter_name, nn.Parameter(tensor, requires_grad=False))
    except CheckpointError:
        raise
    except (OSError, ValueError, KeyError, TypeError) as err:  # a cut or damaged file, a missing entry
        raise CheckpointError(f"{weights}: not a usable packed copy ({type(err).__name__}: {err})") from err
    if stored - used:
        raise CheckpointError(f"{weights}: unexpected tensors {', '.join(sorted(stored - used)[:5])}")
    model.stack_projections()  # decode reads q, k, v (gate, up) in one kernel call
    return LoadedModel(model.eval(), config, find_tokenizer(folder), "int8", folder)


def map_safetensors(path: Path) -> dict[str, Tensor]:
    """Every tensor of the safetensors file at `path`, as a view into one private memory map of the whole file: nothing
    is read or copied (pages come from the page cache when touched, and other processes mapping the file share them),
    and tensors stored one after the other are adjacent in memory too. safetensors' `safe_open` maps each tensor on
    its own, so two adjacent in the file are not in memory, and the stacked projections (int8.StackedInt8Linear) read
    adjacent weights as one without copying them. Raises ValueError (or OSError) for a file that is not one."""
    with open(path, "rb") as f:
        header_bytes, header, size = safetensors_header(f)
        whole = torch.frombuffer(mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY), dtype=torch.uint8)
    base, data_bytes = 8 + header_bytes, size - 8 - header_bytes
    tensors = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (start, end) = _DTYPE_NAMES[entry["dtype"]], entry["shape"], entry["data_offsets"]
        if not (all(isinstance(n, int) and n >= 0 for n in [*shape, start, end]) and start <= end <= data_bytes
                and end - start == torch.Size(shape).numel() * dtype.itemsize and (base + start) % dtype.itemsize == 0):
            raise ValueError(f"tensor '{name}': {entry['dtype']} {shape} at bytes {start}..{end} of {data_bytes}")
        tensors[name] = whole[base + start:base + end].view(dtype).view(shape)
    return tensors


def _prefetch(path: Path) -> None:
    """Ask the kernel to read `path` into the page cache in the background (no-op where it is there already): after a
    reboot the mapped pages would otherwise come from the disk one fault at a time, during the first forward."""

    def advise() -> None:
        with contextlib.suppress(OSError), open(path, "rb") as f:
            os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)

    if hasattr(os, "posix_fadvise"):
        threading.Thread(target=advise, name="int8serve-prefetch", daemon=True).start()
