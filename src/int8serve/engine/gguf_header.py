"""A GGUF file's header, read in one pass: its metadata and its tensor directory (no tensor data).

The `gguf` package's `GGUFReader` builds a numpy view for every element of every metadata array before it can be
asked anything: for a chat model's vocabulary (SmolLM2: 49,152 tokens and 48,900 merges, ~250,000 views) that is
1.5 s on a quiet Sapphire Rapids and up to ~10 s on a busy EPYC, paid at every start and every CLI command that
opens the file. This reads the same header with `struct` over the file's bytes: the same values as
`GGUFReader(...).fields[key].contents()` and the same tensor names, types, shapes and offsets (tests/engine/
test_gguf_header.py compares the two), in a few tens of milliseconds. The type tables (value types, block sizes of
the quantized tensor types) are the `gguf` package's own.

Format (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): magic "GGUF", version (2 or 3), tensor count,
metadata count, the metadata (key, value type, value), the tensor directory (name, dimensions, type, offset from
the data section), then the data section at the next multiple of `general.alignment` (default 32). Integers are
little-endian, or all big-endian in a file written for such a machine (told by the version's byte order).

An array of numbers (or booleans) is read as one numpy array, a `NumberArray`: a 30 MB uint8 array (some files
carry such) costs its 30 MB, where a list of Python numbers cost 10-16 times that while loading. It reads as the
list it stands for (len, indexing, iteration of Python numbers, equality with a list), so the tokenizer's scores
and token types are used as before. Arrays of strings (a vocabulary, its merges) stay lists of str.
"""

from __future__ import annotations

import mmap
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLQuantizationType, GGUFValueType

__all__ = ["GGUFHeader", "HeaderTensor", "NumberArray", "read_header"]

SUPPORTED_VERSIONS = (2, 3)
# Arrays of arrays exist (llama.cpp writes none deeper than 2); a crafted file nesting thousands deep must be an error,
# not Python's recursion limit.
MAX_ARRAY_DEPTH = 8
# Scalar value types: their struct code (string and array are read by hand)
_SCALARS = {GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H",
            GGUFValueType.INT16: "h", GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i",
            GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?", GGUFValueType.UINT64: "Q",
            GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d"}
_ITERATION_CHUNK = 65536  # a NumberArray's elements become Python numbers this many at a time
_REPR_ITEMS = 8  # a longer NumberArray shows this many values in its repr (error messages quote values)


class NumberArray(Sequence[Any]):
    """A metadata array of numbers held as one numpy array (`values`, in the machine's byte order), read as the list
    of Python numbers it stands for: indexing and iteration give Python ints, floats or bools, it equals a list of
    the same values, and numpy takes it as `values` without a copy."""

    __slots__ = ("values",)
    __hash__ = None  # type: ignore[assignment]  # equal to a list, which has no hash either

    def __init__(self, values: np.ndarray) -> None:
        self.values = values

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return NumberArray(self.values[index])
        return self.values[index].item()

    def __iter__(self) -> Iterator[Any]:
        for start in range(0, len(self.values), _ITERATION_CHUNK):
            yield from self.values[start:start + _ITERATION_CHUNK].tolist()

    def __eq__(self, other: object) -> bool:
        if isinstance(other, NumberArray):
            return len(self) == len(other) and bool(np.all(self.values == other.values))
        if isinstance(other, list):
            return len(self) == len(other) and all(mine == theirs for mine, theirs in zip(self, other, strict=True))
        return NotImplemented

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        return np.array(self.values, dtype=dtype, copy=copy)

    def __repr__(self) -> str:
        if len(self) <= _REPR_ITEMS:
            return repr(self.values.tolist())
        shown = ", ".join(map(repr, self.values[:_REPR_ITEMS].tolist()))
        return f"[{shown}, ... ({len(self)} {self.values.dtype} values)]"


@dataclass(frozen=True)
class HeaderTensor:
    name: str
    type: GGMLQuantizationType
    dims: tuple[int, ...]  # as stored: the fastest-varying dimension first (torch's shape is these reversed)
    data_offset: int  # from the start of the file
    n_bytes: int


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    metadata: dict[str, Any]  # key -> value (a value the format cannot hold as one Python value: None)
    tensors: list[HeaderTensor]
    data_offset: int


class _Cursor:
    """Reads the header's fields in order from `buffer` (an mmap of the file), in one byte order."""

    def __init__(self, buffer: mmap.mmap, order: str) -> None:
        self.buffer, self.order, self.offset = buffer, order, 0

    def scalar(self, code: str) -> Any:
        (value,) = struct.unpack_from(self.order + code, self.buffer, self.offset)
        self.offset += struct.calcsize(code)
        return value

    def array(self, code: str, count: int) -> NumberArray:
        """`count` values of the struct type `code`, copied once out of the file into the machine's byte order."""
        file_type = np.dtype(code).newbyteorder(self.order)
        size = count * file_type.itemsize
        self._check_room(size, f"an array of {count} values")
        # a copy (the map is closed once the header is read), the one allocation: the view into the map costs nothing
        values = np.frombuffer(self.buffer, file_type, count, self.offset).astype(np.dtype(code))
        self.offset += size
        return NumberArray(values)

    def raw_string(self) -> bytes:
        length = self.scalar("Q")
        self._check_room(length, f"a string of {length} bytes")
        data = self.buffer[self.offset:self.offset + length]
        self.offset += length
        return data

    def _check_room(self, size: int, what: str) -> None:
        if self.offset + size > len(self.buffer):
            raise ValueError(f"{what} at offset {self.offset} runs past the end of the file")

    def value(self, value_type: int, depth: int = 0) -> Any:
        """One value of `value_type`; strings that are not UTF-8 read as None (the whole array, for an array)."""
        if depth > MAX_ARRAY_DEPTH:
            raise ValueError(f"metadata arrays nested more than {MAX_ARRAY_DEPTH} deep at offset {self.offset}")
        kind = GGUFValueType(value_type)
        if kind in _SCALARS:
            return self.scalar(_SCALARS[kind])
        if kind == GGUFValueType.STRING:
            return _text(self.raw_string())
        if kind == GGUFValueType.ARRAY:
            item_type, count = self.scalar("I"), self.scalar("Q")
            item_kind = GGUFValueType(item_type)
            if item_kind in _SCALARS:
                return self.array(_SCALARS[item_kind], count)
            items = [self.value(item_type, depth + 1) for _ in range(count)]
            return None if item_kind == GGUFValueType.STRING and None in items else items
        raise ValueError(f"unknown metadata value type {value_type}")


def _text(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def read_header(path: Path) -> GGUFHeader:
    """The header of the GGUF file at `path`. Raises ValueError for a file that is not GGUF or is cut short."""
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buffer:
        try:
            return _read(buffer)
        except struct.error as err:
            raise ValueError(f"the header is cut short ({err})") from err


def _read(buffer: mmap.mmap) -> GGUFHeader:
    if len(buffer) < 24 or struct.unpack_from("<I", buffer, 0)[0] != GGUF_MAGIC:
        raise ValueError("GGUF magic invalid")
    order = "<" if struct.unpack_from("<I", buffer, 4)[0] & 0xFFFF else ">"  # a swapped file's version reads 0
    cursor = _Cursor(buffer, order)
    cursor.offset = 4
    version = cursor.scalar("I")
    if version not in SUPPORTED_VERSIONS:
        raise ValueError(f"GGUF version {version} (this reader knows {', '.join(map(str, SUPPORTED_VERSIONS))})")
    tensor_count, metadata_count = cursor.scalar("Q"), cursor.scalar("Q")
    metadata: dict[str, Any] = {}
    for _ in range(metadata_count):
        key = cursor.raw_string().decode("utf-8", errors="replace")
        metadata[key] = cursor.value(cursor.scalar("I"))
    directory = []
    for _ in range(tensor_count):
        name = cursor.raw_string().decode("utf-8")
        dims = tuple(cursor.array("Q", cursor.scalar("I")))
        directory.append((name, dims, GGMLQuantizationType(cursor.scalar("I")), cursor.scalar("Q")))
    alignment = metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ValueError(f"invalid general.alignment {alignment!r}: must be a power of two")
    data_offset = -(-cursor.offset // alignment) * alignment
    tensors = []
    for name, dims, kind, offset in directory:
        block, block_bytes = GGML_QUANT_SIZES[kind]
        elements = 1
        for size in dims:
            elements *= size
        n_bytes = elements * block_bytes // block
        if elements % block or data_offset + offset + n_bytes > len(buffer):
            raise ValueError(f"tensor '{name}' ({kind.name} {list(dims)}: {n_bytes} bytes at offset {offset} of the "
                             f"data) does not lie within the file ({len(buffer)} bytes)")
        tensors.append(HeaderTensor(name, kind, dims, data_offset + offset, n_bytes))
    if len({t.name for t in tensors}) != len(tensors):
        raise ValueError("duplicated tensor names")
    return GGUFHeader(version, metadata, tensors, data_offset)
