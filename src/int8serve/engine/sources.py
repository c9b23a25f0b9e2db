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


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model its config describes."""


class TensorSource:
    """Named tensors of a checkpoint, read lazily."""

    def names(self) -> list[str]:
        raise NotImplementedError

    def get(self, name: str) -> Tensor:
        raise NotImplementedError


class SafetensorsSource(TensorSource):
    def __init__(self, files: Iterable[Path]) -> None:
        self._handles = {}
        self._where: dict[str, Path] = {}
        for file in files:
            try:
                handle = safe_open(str(file), framework="pt", device="cpu")
            except (SafetensorError, OSError, ValueError) as err:
                raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from err
            self._handles[file] = handle
            for key in handle.keys():  # noqa: SIM118 - safe_open has keys() but is not a Mapping
                self._where[key] = file

    def names(self) -> list[str]:
        return list(self._where)

    def get(self, name: str) -> Tensor:
        file = self._where[name]
        try:
            return self._handles[file].get_tensor(name)
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"{file}: tensor '{name}' is unreadable ({err})") from err


def torch_load(file: Path) -> dict[str, Tensor]:
    """A state dict from a .bin/.pth file: memory-mapped when the file allows it, never executing code."""
    try:
        try:
            data = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:
            if "mmap" not in str(err):  # legacy (non-zip) files cannot be memory-mapped
                raise
            data = torch.load(file, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as err:  # torch raises many kinds for a corrupt or malicious file
        raise CheckpointError(f"{file}: not a readable PyTorch checkpoint ({type(err).__name__}: {err})") from err
    if not isinstance(data, dict) or not all(isinstance(v, Tensor) for v in data.values()):
        raise CheckpointError(f"{file}: expected a flat dict of tensors")
    return data


class TorchFilesSource(TensorSource):
    """Hugging Face `pytorch_model*.bin` shards: each tensor lives whole in one file."""

    def __init__(self, files: Iterable[Path]) -> None:
        self._tensors: dict[str, Tensor] = {}
        for file in files:
            self._tensors.update(torch_load(file))

    def names(self) -> list[str]:
        return list(self._tensors)

    def get(self, name: str) -> Tensor:
        return self._tensors[name]


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
        self._shards = [torch_load(file) for file in files]
        self._files = files
        first = set(self._shards[0])
        for file, shard in zip(files[1:], self._shards[1:], strict=True):
            if set(shard) != first:
                raise CheckpointError(f"{file}: holds other tensors than {files[0]}")

    def names(self) -> list[str]:
        return list(self._shards[0])

    def get(self, name: str) -> Tensor:
        parts = [shard[name] for shard in self._shards]
        if len(parts) == 1:
            return parts[0]
        dim = meta_shard_dim(name)
        return parts[0] if dim is None else torch.cat(parts, dim=dim)


def hf_weight_files(folder: Path) -> TensorSource:
    """The weights of a Hugging Face folder: one or sharded safetensors, else one or sharded .bin files."""
    for index_name, opener in (("model.safetensors.index.json", SafetensorsSource),
                               ("pytorch_model.bin.index.json", TorchFilesSource)):
        index = folder / index_name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as err:
                raise CheckpointError(f"{index}: not a valid shard index ({err})") from err
            files = [folder / name for name in dict.fromkeys(weight_map.values())]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index}: shard files missing: {', '.join(missing)}")
            return opener(files)
    if (folder / "model.safetensors").is_file():
        return SafetensorsSource([folder / "model.safetensors"])
    if (folder / "pytorch_model.bin").is_file():
        return TorchFilesSource([folder / "pytorch_model.bin"])
    raise CheckpointError(f"{folder}: no model.safetensors, sharded safetensors index or pytorch_model.bin")
