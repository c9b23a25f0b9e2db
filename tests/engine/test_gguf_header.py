"""Our one-pass GGUF header reader against the `gguf` package's GGUFReader: the same metadata values and tensor
directory on SmolLM2's real file and on a file with every metadata type; and a clear error, never a crash or a
huge allocation, for files that are not GGUF, cut short, or lie about their sizes."""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest

from int8serve.engine.errors import CheckpointError
from int8serve.engine.gguf_header import read_header
from int8serve.engine.gguf_loader import GGUFFile


def reference(path: Path) -> tuple[dict[str, Any], list[tuple[str, str, tuple[int, ...], int, int]]]:
    """What GGUFReader says of `path`: metadata (its own GGUF.* fields left out) and tensors."""
    reader = gguf.GGUFReader(path)
    metadata = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    tensors = [(t.name, t.tensor_type.name, tuple(int(n) for n in t.shape), int(t.data_offset), int(t.n_bytes))
               for t in reader.tensors]
    return metadata, tensors


def ours(path: Path) -> tuple[dict[str, Any], list[tuple[str, str, tuple[int, ...], int, int]]]:
    header = read_header(path)
    return header.metadata, [(t.name, t.type.name, t.dims, t.data_offset, t.n_bytes) for t in header.tensors]


def test_smollm2s_header_reads_as_the_gguf_package_reads_it(smollm2_gguf: Path) -> None:
    metadata, tensors = ours(smollm2_gguf)
    expected_metadata, expected_tensors = reference(smollm2_gguf)
    assert metadata == expected_metadata
    assert len(metadata["tokenizer.ggml.tokens"]) == 49152 and len(metadata["tokenizer.ggml.merges"]) > 48000
    assert tensors == expected_tensors


def every_type_gguf(path: Path, alignment: int | None = None) -> Path:
    writer = gguf.GGUFWriter(path, "llama")
    if alignment:
        writer.add_custom_alignment(alignment)
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -100)
    writer.add_uint16("t.u16", 65000)
    writer.add_int16("t.i16", -32000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_float32("t.f32", 0.1)
    writer.add_uint64("t.u64", 2**63 + 5)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float64("t.f64", 0.1)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo ✓")
    writer.add_string("t.empty", "")
    writer.add_array("t.ints", [1, -2, 3])
    writer.add_array("t.floats", [0.5, 1.25])
    writer.add_array("t.strings", ["a", "", "ü"])
    writer.add_array("t.none", [])
    writer.add_tensor("a.weight", np.arange(12, dtype=np.float32).reshape(3, 4))
    writer.add_tensor("b.weight", np.ones((2, 64), dtype=np.float16))
    q8 = gguf.quantize(np.linspace(-1, 1, 4 * 64, dtype=np.float32).reshape(4, 64), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("c.weight", q8, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("alignment", [None, 64])
def test_every_value_type_reads_as_the_gguf_package_reads_it(tmp_path: Path, alignment: int | None) -> None:
    path = every_type_gguf(tmp_path / "every.gguf", alignment)
    metadata, tensors = ours(path)
    assert (metadata, tensors) == reference(path)
    assert metadata["t.str"] == "héllo ✓" and metadata["t.u64"] == 2**63 + 5 and metadata["t.strings"] == ["a", "", "ü"]
    assert [t[1] for t in tensors] == ["F32", "F16", "Q8_0"] and tensors[2][4] == 4 * 2 * 34
    assert all(t[3] % (alignment or 32) == 0 for t in tensors)


def test_a_file_that_is_not_gguf_is_refused_clearly(tmp_path: Path) -> None:
    for name, data in [("empty.gguf", b""), ("text.gguf", b"hello, this is not a model at all\n" * 10),
                       ("version.gguf", b"GGUF" + struct.pack("<IQQ", 99, 0, 0))]:
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match="not a readable GGUF file"):
            GGUFFile.open(tmp_path / name)


def test_a_file_cut_anywhere_in_its_header_is_refused(tmp_path: Path) -> None:
    whole = every_type_gguf(tmp_path / "every.gguf").read_bytes()
    data_start = read_header(tmp_path / "every.gguf").data_offset
    for cut in sorted({8, 20, 30, 64, 200, data_start // 2, data_start - 40}):
        (tmp_path / "cut.gguf").write_bytes(whole[:cut])
        with pytest.raises(CheckpointError, match="not a readable GGUF file"):
            GGUFFile.open(tmp_path / "cut.gguf")


@pytest.mark.parametrize("lie", ["string length", "array count", "tensor dims"])
def test_sizes_past_the_end_of_the_file_are_refused_without_allocating_them(tmp_path: Path, lie: str) -> None:
    header = b"GGUF" + struct.pack("<IQQ", 3, 1 if lie == "tensor dims" else 0, 0 if lie == "tensor dims" else 1)
    key = struct.pack("<Q", 3) + b"key"
    body = {"string length": key + struct.pack("<IQ", 8, 2**62) + b"abc",
            "array count": key + struct.pack("<IIQ", 9, 10, 2**60) + b"\0" * 16,
            "tensor dims": struct.pack("<Q", 1) + b"w" + struct.pack("<I", 2**31) + b"\0" * 16}[lie]
    (tmp_path / "lie.gguf").write_bytes(header + body)
    with pytest.raises(CheckpointError, match=r"runs past the end of the file|cut short"):
        GGUFFile.open(tmp_path / "lie.gguf")


def test_arrays_nested_thousands_deep_are_refused_not_recursed(tmp_path: Path) -> None:
    nested = b"".join(struct.pack("<IQ", 9, 1) for _ in range(5000)) + struct.pack("<IQ", 4, 0)
    body = struct.pack("<Q", 4) + b"deep" + struct.pack("<I", 9) + nested
    (tmp_path / "deep.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + body)
    with pytest.raises(CheckpointError, match="nested more than 8 deep"):
        GGUFFile.open(tmp_path / "deep.gguf")


def test_arrays_of_arrays_still_read(tmp_path: Path) -> None:
    body = struct.pack("<Q", 4) + b"nest" + struct.pack("<IIQ", 9, 9, 2)
    body += struct.pack("<IQ", 5, 2) + struct.pack("<2i", 1, 2) + struct.pack("<IQ", 5, 1) + struct.pack("<i", 3)
    (tmp_path / "nest.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + body)
    assert read_header(tmp_path / "nest.gguf").metadata["nest"] == [[1, 2], [3]]


@pytest.mark.parametrize(("dims", "offset"), [((64, 2**40), 0), ((4,), 10**12), ((3, 4), -40)])
def test_a_tensor_whose_data_is_not_inside_the_file_is_refused(tmp_path: Path, dims: tuple[int, ...],
                                                              offset: int) -> None:
    """dims [64, 2^40] used to reach torch.empty(256 TB); a tensor is checked against the file's size first."""
    path = every_type_gguf(tmp_path / "every.gguf")
    header = read_header(path)
    first = header.tensors[0]  # a.weight: F32 [4, 3] at offset 0
    data = bytearray(path.read_bytes())
    entry = data.index(b"a.weight") + len(b"a.weight")
    assert struct.unpack_from("<I", data, entry)[0] == 2 and first.data_offset == header.data_offset
    # the same number of dimensions (the directory keeps its size): dims, type F32, offset
    new_dims = dims if len(dims) == 2 else (*dims, 1)
    offset = offset if offset >= 0 else len(data) - header.data_offset + offset  # the last 40 bytes hold no 48
    data[entry + 4:entry + 4 + 16 + 12] = struct.pack("<2QIQ", *new_dims, 0, offset)
    (tmp_path / "lie.gguf").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"tensor 'a.weight' .* does not lie within the file"):
        GGUFFile.open(tmp_path / "lie.gguf")


def large_array_gguf(path: Path, values: np.ndarray) -> Path:
    """A GGUF file whose metadata holds `values` as "t.large" and [3, 1, 2] (int32) as "t.small", written by hand:
    GGUFWriter wants a Python list of the values."""
    kind = {np.dtype(np.uint8): gguf.GGUFValueType.UINT8, np.dtype(np.float32): gguf.GGUFValueType.FLOAT32}

    def array(key: str, item_type: int, data: np.ndarray) -> bytes:
        return struct.pack(f"<Q{len(key)}sIIQ", len(key), key.encode(), gguf.GGUFValueType.ARRAY, item_type,
                           len(data)) + data.astype(data.dtype.newbyteorder("<")).tobytes()

    with open(path, "wb") as out:
        out.write(b"GGUF" + struct.pack("<IQQ", 3, 0, 2))
        out.write(array("t.large", kind[values.dtype], values))
        out.write(array("t.small", gguf.GGUFValueType.INT32, np.array([3, 1, 2], dtype=np.int32)))
    return path


@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_a_large_numeric_array_costs_about_its_own_size(tmp_path: Path, dtype: type) -> None:
    """A 16 MB metadata array used to become a list of Python numbers (a pointer each, and the tuple it was unpacked
    into, and an object for each float): 268 MB at the peak for uint8, 168 MB for float32."""
    values = (np.arange(16 * 2**20 // np.dtype(dtype).itemsize) % 251).astype(dtype)
    path = large_array_gguf(tmp_path / "large.gguf", values)
    tracemalloc.start()
    try:
        metadata = read_header(path).metadata
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < values.nbytes * 1.1 + 2**20
    large = metadata["t.large"]
    assert len(large) == len(values) and np.array_equal(np.asarray(large), values)
    assert large[0] == 0 and large[-1] == values[-1].item() and type(large[300]) is type(values[300].item())
    assert metadata["t.small"] == [3, 1, 2] and list(metadata["t.small"]) == [3, 1, 2]


def test_a_numeric_array_reads_as_the_list_it_stands_for(tmp_path: Path) -> None:
    """What the loader does with scores, token types and merges: len, truth, iteration of Python numbers, JSON."""
    path = large_array_gguf(tmp_path / "small.gguf", np.array([0.5, -1.25, 2.0], dtype=np.float32))
    large, small = read_header(path).metadata["t.large"], read_header(path).metadata["t.small"]
    assert large == [0.5, -1.25, 2.0] and [0.5, -1.25, 2.0] == large  # noqa: SIM300 (the list on the left too)
    assert large != [0.5, -1.25] and large != "x"
    assert all(type(v) is float for v in large) and json.dumps(list(large)) == "[0.5, -1.25, 2.0]"
    assert large and len(large) == 3 and -1.25 in large and large[1:] == [-1.25, 2.0] and sorted(small) == [1, 2, 3]
    assert repr(small) == "[3, 1, 2]"


def test_a_big_endian_files_numeric_arrays_read_in_its_byte_order(tmp_path: Path) -> None:
    body = struct.pack(">Q", 4) + b"ints" + struct.pack(">IIQ", 9, 5, 3) + struct.pack(">3i", 1, -2, 70000)
    (tmp_path / "big.gguf").write_bytes(b"GGUF" + struct.pack(">IQQ", 3, 0, 1) + body)
    assert read_header(tmp_path / "big.gguf").metadata["ints"] == [1, -2, 70000]
