"""The packed copy's format: a plain safetensors file whose every tensor starts at a multiple of 64 bytes, holding
each int8 layer in the kernel's layout; mapped back without copying (test_model_cache proves the start path)."""

from __future__ import annotations

import itertools
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from int8serve.engine import kernels
from int8serve.engine.errors import CheckpointError
from int8serve.engine.int8 import Int8Linear
from int8serve.engine.loader import LoadedModel, load_model
from int8serve.engine.packed_checkpoint import load_packed, map_safetensors, save_packed_checkpoint


def test_every_tensor_is_aligned_and_readable_by_safetensors(tmp_path: Path, stories_int8: LoadedModel) -> None:
    folder = save_packed_checkpoint(stories_int8, tmp_path / "copy")
    weights = folder / "model.safetensors"
    header_size = int.from_bytes(weights.read_bytes()[:8], "little")
    header = json.loads(weights.read_bytes()[8:8 + header_size])
    header.pop("__metadata__")
    assert all((8 + header_size + entry["data_offsets"][0]) % kernels.ALIGNMENT == 0 for entry in header.values())
    modules = dict(stories_int8.model.named_modules())
    with safe_open(str(weights), framework="pt") as handle:  # the library itself validates the file
        for name in handle.keys():  # noqa: SIM118
            module_name, _, kind = name.rpartition(".")
            module = modules[module_name]
            if isinstance(module, Int8Linear) and kind.startswith("residual"):  # the head's (Int8Linear.set_residual)
                assert torch.equal(handle.get_tensor(name), getattr(module, kind))
            elif isinstance(module, Int8Linear):
                assert torch.equal(handle.get_tensor(name), getattr(module.packed, kind.removeprefix("packed_")))
            else:
                assert torch.equal(handle.get_tensor(name), module.weight)
    meta = json.loads((folder / "int8serve.json").read_text())
    assert meta["layout"] == kernels.LAYOUT and meta["weights_bytes"] == weights.stat().st_size
    assert (folder / "tokenizer.model").read_bytes() == stories_int8.tokenizer_path.read_bytes()


def test_the_heads_residual_is_stored_and_mapped_and_an_older_copy_loads(tmp_path: Path,
                                                                         stories_int8: LoadedModel) -> None:
    head = stories_int8.model.output
    assert head.residual is not None and head.residual_scale is not None  # quantizing from fp32 keeps it
    folder = save_packed_checkpoint(stories_int8, tmp_path / "copy")
    meta = json.loads((folder / "int8serve.json").read_text())
    mapped = load_packed(folder, meta).model.output
    assert torch.equal(mapped.residual, head.residual) and torch.equal(mapped.residual_scale, head.residual_scale)
    weights = folder / "model.safetensors"
    tensors = {name: t for name, t in load_file(weights).items() if ".residual" not in name}
    save_file(tensors, weights)  # as written before the residual
    meta["weights_bytes"] = weights.stat().st_size
    older = load_packed(folder, meta).model.output
    assert older.residual is None and older.packed is not None


def test_a_stored_config_that_does_not_fit_the_tensors_is_refused(tmp_path: Path, stories_int8: LoadedModel) -> None:
    folder = save_packed_checkpoint(stories_int8, tmp_path / "copy")
    meta = json.loads((folder / "int8serve.json").read_text())
    meta["config"]["hidden_dim"] += 32
    with pytest.raises(CheckpointError, match=r"not a usable packed copy.*packed data must be uint8"):
        load_packed(folder, meta)


def test_adopt_packed_keeps_aligned_tensors_and_copies_misaligned_ones() -> None:
    q = torch.randint(-127, 128, (70, 96), dtype=torch.int8, generator=torch.Generator().manual_seed(0))
    scale = torch.rand(70, 3).to(torch.bfloat16).float()
    packed = kernels.pack_weight(q, scale, 32)
    same = kernels.adopt_packed(packed.data, 70, 96, 32)
    assert same.data.data_ptr() == packed.data.data_ptr() and same.scale.data_ptr() == packed.scale.data_ptr()
    raw = torch.empty(packed.data.numel() + 1, dtype=torch.uint8)
    start = 1 if raw.data_ptr() % kernels.ALIGNMENT == 0 else 0
    misaligned = raw[start:start + packed.data.numel()].copy_(packed.data)
    assert misaligned.data_ptr() % kernels.ALIGNMENT
    moved = kernels.adopt_packed(misaligned, 70, 96, 32)
    assert moved.data.data_ptr() % kernels.ALIGNMENT == 0 and torch.equal(kernels.unpack_weight(moved), q)
    assert torch.equal(moved.scales(), scale)
    with pytest.raises(ValueError, match="packed data must be uint8"):  # per channel: another size
        kernels.adopt_packed(packed.data, 70, 96, 0)
    with pytest.raises(ValueError, match="packed data must be uint8"):
        kernels.adopt_packed(packed.data, 130, 96, 32)
    with pytest.raises(ValueError, match="packed data must be uint8"):
        kernels.adopt_packed(packed.data.view(torch.int8), 70, 96, 32)


def test_a_16_bit_embedding_table_is_stored_and_mapped_as_it_is(tmp_path: Path, stories_hf: Path) -> None:
    folder = shutil.copytree(stories_hf, tmp_path / "fp16")
    weights = folder / "model.safetensors"
    save_file({name: tensor.half() for name, tensor in load_file(weights).items()}, weights)
    loaded = load_model(folder, "int8", quantizer="rtn")
    copy = save_packed_checkpoint(loaded, tmp_path / "copy")
    mapped = load_packed(copy, json.loads((copy / "int8serve.json").read_text()))
    table = mapped.model.tok_embeddings.weight
    assert table.dtype == torch.float16 and torch.equal(table, loaded.model.tok_embeddings.weight)
    tokens = torch.tensor([[1, 5, 9, 200, 31]])
    cache_a, cache_b = loaded.model.new_cache(1, 8), mapped.model.new_cache(1, 8)
    assert torch.equal(loaded.model(tokens, cache_a, [0], [0]), mapped.model(tokens, cache_b, [0], [0]))


def test_each_stack_of_projections_is_stored_end_to_end_and_mapped_as_one(tmp_path: Path,
                                                                          stories_int8: LoadedModel) -> None:
    folder = save_packed_checkpoint(stories_int8, tmp_path / "copy")
    header_size = int.from_bytes((folder / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((folder / "model.safetensors").read_bytes()[8:8 + header_size])
    for parts in (("wq", "wk", "wv"), ("w1", "w3")):
        kind = "attention" if parts[0] == "wq" else "feed_forward"
        offsets = [header[f"layers.0.{kind}.{part}.packed_data"]["data_offsets"] for part in parts]
        assert all(a[1] == b[0] for a, b in itertools.pairwise(offsets))  # each right after the one before
    mapped = load_packed(folder, json.loads((folder / "int8serve.json").read_text())).model
    for layer, original in zip(mapped.layers, stories_int8.model.layers, strict=True):
        for stack, parts in ((layer.attention.qkv, (layer.attention.wq, layer.attention.wk, layer.attention.wv)),
                             (layer.feed_forward.gate_up, (layer.feed_forward.w1, layer.feed_forward.w3))):
            assert stack is not None and stack.layers == parts
            assert stack.packed.data.data_ptr() == parts[0].packed.data.data_ptr()  # a view, not a copy
        assert torch.equal(layer.attention.qkv.packed.data, original.attention.qkv.packed.data)
    tokens = torch.tensor([[1, 5, 9, 200, 31]])
    expected = stories_int8.model(tokens, stories_int8.model.new_cache(1, 8), [0], [0])
    assert torch.equal(mapped(tokens, mapped.new_cache(1, 8), [0], [0]), expected)


def test_map_safetensors_maps_every_tensor_of_a_file_adjacent_as_stored(tmp_path: Path) -> None:
    tensors = {"a": torch.arange(64, dtype=torch.uint8), "b": torch.arange(10, dtype=torch.float32),
               "c": torch.ones(2, 3, dtype=torch.bfloat16)}
    save_file(tensors, tmp_path / "t.safetensors")
    mapped = map_safetensors(tmp_path / "t.safetensors")
    assert set(mapped) == set(tensors) and all(torch.equal(mapped[n], tensors[n]) for n in tensors)
    assert mapped["a"].untyped_storage().data_ptr() == mapped["b"].untyped_storage().data_ptr()  # one mapping


def _with_header(path: Path, header: dict, data: bytes) -> Path:
    encoded = json.dumps(header).encode()
    path.write_bytes(len(encoded).to_bytes(8, "little") + encoded + data)
    return path


@pytest.mark.parametrize(("header", "data", "error"), [
    ({"x": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, b"\0" * 8, "at bytes 0..16 of 8"),
    ({"x": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16, "F32 \\[3\\]"),
    ({"x": {"dtype": "F32", "shape": [1], "data_offsets": [2, 6]}}, b"\0" * 8, "at bytes 2..6"),
    ({"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 8, "F32 \\[-1\\]"),
    ({"x": {"dtype": "Q99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, "Q99"),
    ({"x": {"dtype": "F32", "shape": [1]}}, b"\0" * 8, "data_offsets"),
    ({"x": "not an entry"}, b"", "string indices"),
])
def test_map_safetensors_refuses_entries_that_do_not_fit_the_file(tmp_path: Path, header: dict, data: bytes,
                                                                  error: str) -> None:
    with pytest.raises((ValueError, KeyError, TypeError), match=error):
        map_safetensors(_with_header(tmp_path / "bad.safetensors", header, data))


def test_map_safetensors_refuses_a_header_longer_than_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes((10**9).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match="a header of 1000000000 bytes in a file of 10"):
        map_safetensors(path)
    path.write_bytes(b"\1\0")
    with pytest.raises(ValueError, match="in a file of 2"):
        map_safetensors(path)
