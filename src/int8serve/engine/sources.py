"""Read-only, lazy views of checkpoint files: name -> tensor, one tensor at a time, memory-mapped.

Loading a 7B fp16 checkpoint must never hold the whole fp16 model in memory, so a source hands out single tensors
straight from memory-mapped files and the loader quantizes each before asking for the next. `torch.load` is always
called with `weights_only=True`: a checkpoint must never run code.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor

from .errors import CheckpointError
from .model_files import hf_weight_paths, unreadable_safetensors


class TensorSource:
    """Named tensors of a checkpoint, read lazily."""

    def names(self) -> list[str]:
        raise NotImplementedError

    def get(self, name: str) -> Tensor:
        raise NotImplementedError

    def shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape, where the format says it without reading the data."""
        return tuple(self.get(name).shape)


_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class SafetensorsSource(TensorSource):
    """Tensors of safetensors files, each read with plain file reads into its own fresh buffer.

    The library validates each file's header once. The data is then read with `readinto` rather than through a
    memory map: pages of a mapped file that have been touched count as resident until the mapping goes away,
    which would put the whole fp16 checkpoint into the peak memory of an int8 load.
    """

    def __init__(self, files: Iterable[Path]) -> None:
        self._where: dict[str, Path] = {}
        self._headers: dict[Path, tuple[int, dict]] = {}  # file -> (header size, header), read once
        for file in files:
            try:
                with safe_open(str(file), framework="pt", device="cpu") as handle:
                    for key in handle.keys():  # noqa: SIM118 - safe_open has keys() but is not a Mapping
                        self._where[key] = file
            except (SafetensorError, OSError, ValueError) as err:
                raise unreadable_safetensors(file, err) from err

    def names(self) -> list[str]:
        return list(self._where)

    def _header(self, file: Path) -> tuple[int, dict]:
        if file not in self._headers:
            with open(file, "rb") as f:
                size = int.from_bytes(f.read(8), "little")
                self._headers[file] = size, json.loads(f.read(size))
        return self._headers[file]

    def shape(self, name: str) -> tuple[int, ...]:
        file = self._where[name]
        try:
            shape = self._header(file)[1][name]["shape"]
            if not all(isinstance(n, int) and n >= 0 for n in shape):
                raise ValueError(f"shape {shape}")
            return tuple(shape)
        except (OSError, KeyError, TypeError, ValueError) as err:
            raise CheckpointError(f"{file}: tensor '{name}' is unreadable ({err})") from err

    def get(self, name: str) -> Tensor:
        file = self._where[name]
        try:
            header_size, header = self._header(file)
            entry = header[name]
            with open(file, "rb") as f:
                begin, end = entry["data_offsets"]
                data = torch.empty(end - begin, dtype=torch.uint8)
                f.seek(8 + header_size + begin)
                if f.readinto(data.numpy()) != end - begin:
                    raise OSError("file is truncated")
            return data.view(_SAFETENSORS_DTYPES[entry["dtype"]]).reshape(entry["shape"])
        except (OSError, KeyError, ValueError) as err:
            raise CheckpointError(f"{file}: tensor '{name}' is unreadable ({err})") from err


def torch_load(file: Path) -> tuple[dict[str, Tensor], bool]:
    """A state dict from a .bin/.pth file, never executing code; and whether it is memory-mapped (legacy
    non-zip files cannot be, and are read whole)."""
    try:
        try:
            data, mapped = torch.load(file, map_location="cpu", weights_only=True, mmap=True), True
        except RuntimeError as err:
            if "mmap" not in str(err):
                raise
            data, mapped = torch.load(file, map_location="cpu", weights_only=True), False
    except FileNotFoundError:
        raise
    except Exception as err:  # torch raises many kinds for a corrupt or malicious file
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise CheckpointError(f"{file}: not a readable PyTorch checkpoint ({type(err).__name__}: {first_line})") \
            from err
    if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
        raise CheckpointError(f"{file}: expected a flat dict of tensors")
    return data, mapped


class _TorchFile:
    """One .bin/.pth file: re-mapped for every tensor read and the tensor copied out (as SafetensorsSource
    does), except legacy files, which cannot be mapped and stay loaded."""

    def __init__(self, path: Path) -> None:
        self.path = path
        data, mapped = torch_load(path)
        self.names = list(data)
        self.shapes = {name: tuple(tensor.shape) for name, tensor in data.items()}
        self._kept = None if mapped else data

    def get(self, name: str) -> Tensor:
        if self._kept is not None:
            return self._kept[name]
        return torch_load(self.path)[0][name].clone()


class TorchFilesSource(TensorSource):
    """Hugging Face `pytorch_model*.bin` shards: each tensor lives whole in one file."""

    def __init__(self, files: Iterable[Path]) -> None:
        self._where: dict[str, _TorchFile] = {}
        for path in files:
            file = _TorchFile(path)
            self._where.update(dict.fromkeys(file.names, file))

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> Tensor:
        return self._where[name].get(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._where[name].shapes[name]


# Meta's model-parallel shards split each weight along one dimension (Meta's llama/model.py: Column-, Row-
# ParallelLinear and ParallelEmbedding); norms are replicated.
META_SHARD_DIM = {
    "tok_embeddings": 1,
    "attention.wq": 0, "attention.wk": 0, "attention.wv": 0, "attention.wo": 1,
    "feed_forward.w1": 0, "feed_forward.w3": 0, "feed_forward.w2": 1,
    "output": 0,
}


def meta_shard_dim(name: str) -> int | None:
    for part, dim in META_SHARD_DIM.items():
        if name.startswith(part + ".") or f".{part}." in name:
            return dim
    return None


class MetaShardsSource(TensorSource):
    """Meta `consolidated.NN.pth` shards, concatenated along each weight's split dimension on demand."""

    def __init__(self, files: list[Path]) -> None:
        self._shards = [_TorchFile(file) for file in files]
        first = set(self._shards[0].names)
        for shard in self._shards[1:]:
            if set(shard.names) != first:
                raise CheckpointError(f"{shard.path}: holds other tensors than {files[0]}")

    def names(self) -> list[str]:
        return list(self._shards[0].names)

    def shape(self, name: str) -> tuple[int, ...]:
        shapes = [shard.shapes[name] for shard in self._shards]
        dim = meta_shard_dim(name)
        if len(shapes) == 1 or dim is None or any(len(s) <= dim for s in shapes):
            return shapes[0]
        return (*shapes[0][:dim], sum(s[dim] for s in shapes), *shapes[0][dim + 1:])

    def get(self, name: str) -> Tensor:
        parts = [shard.get(name) for shard in self._shards]
        if len(parts) == 1:
            return parts[0]
        dim = meta_shard_dim(name)
        return parts[0] if dim is None else torch.cat(parts, dim=dim)


def hf_weight_files(folder: Path) -> TensorSource:
    """The weights of a Hugging Face folder: one or sharded safetensors, else one or sharded .bin files."""
    files, kind = hf_weight_paths(folder)
    return SafetensorsSource(files) if kind == "safetensors" else TorchFilesSource(files)
