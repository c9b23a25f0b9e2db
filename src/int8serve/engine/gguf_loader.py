"""`--model file.gguf`: a llama.cpp GGUF file of a Llama model, loaded into the same `Transformer`.

Users of llama.cpp already have Llama-2-7B-chat as GGUF (`llama-2-7b-chat.Q8_0.gguf` is the common int8 copy).
What differs from a Hugging Face folder, and is undone here:
- tensor names (`blk.N.attn_q.weight`, ...) and the model's shape in `llama.*` metadata keys;
- q/k rows in Meta's interleaved rotary order (llama.cpp's converter permutes the Hugging Face rows back);
- no tokenizer file: it is rebuilt from the file's own vocabulary (gguf_tokenizer.py, which `serve`'s check before
  loading uses too): SentencePiece (`tokenizer.ggml.model` "llama") as a tokenizer.model, a byte-level BPE
  vocabulary ("gpt2": tokens and merges) as a Hugging Face tokenizer.json;
- tensor types: F32, F16 and BF16 are read as is; Q8_0 (blocks of 32 int8 with one fp16 scale) is, for now,
  dequantized and quantized again to the engine's int8. `Q8_0_DIRECT` is the hook for loading it without that
  round trip. Q4_1 (blocks of 32 4-bit values with an fp16 scale and an fp16 minimum: SmolLM2-135M-Instruct's
  file) is dequantized as llama.cpp does it and then quantized to our int8 (said once in the log); the list of
  types, with their block sizes, is gguf_file.py's.
Other types (Q4_K, ...) are refused with their name. Tensors are read with plain file reads, one at a time, like
the safetensors source: a memory map would count the whole file as resident.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .config import ModelConfig
from .errors import CheckpointError
from .gguf_file import (
    BLOCK_TYPES,
    FLOAT_TYPES,
    GGUFFile,
    TensorInfo,
    block_matrix_shape,
    check_tensor_types,
    config_from_gguf,
    internal_name,
)
from .gguf_tokenizer import write_tokenizer
from .sources import TensorSource

log = logging.getLogger(__name__)

Q8_0_BLOCK, _Q8_0_BYTES = BLOCK_TYPES["Q8_0"]  # 32 weights: an fp16 scale then 32 int8, 34 bytes
_Q4_1_BYTES = BLOCK_TYPES["Q4_1"][1]  # 32 weights: fp16 scale d, fp16 minimum m, 16 bytes of nibbles
_DTYPES = {name: getattr(torch, dtype) for name, dtype in FLOAT_TYPES.items()}

# The hook for Q8_0 without a round trip through floats: given a layer's name and its Q8_0 weight as (int8 [N, K],
# fp16 scales [N, K // 32]), return what `loader._assign` accepts for that layer, or None to fall back to
# dequantize + per-channel quantize. Set by the engine once it has a group-wise (per-32) int8 weight format.
Q8_0_DIRECT: Callable[[str, Tensor, Tensor], Any] | None = None


class GGUFSource(TensorSource):
    """The tensors of a GGUF file: float types as float tensors, Q8_0 and Q4_1 as their raw blocks
    (uint8 [N, K / 32 * bytes per block])."""

    def __init__(self, file: GGUFFile) -> None:
        self.file = file
        check_tensor_types(file)

    def names(self) -> list[str]:
        return list(self.file.tensors)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.file.tensors[name].shape

    def type_of(self, name: str) -> str:
        return self.file.tensors[name].type

    def get(self, name: str) -> Tensor:
        info = self.file.tensors[name]
        data = _read(self.file.path, info)
        if info.type in _DTYPES:
            return data.view(_DTYPES[info.type]).reshape(info.shape)
        rows, cols = block_matrix_shape(self.file.path, name, info)
        block, nbytes = BLOCK_TYPES[info.type]
        return data.reshape(rows, cols // block * nbytes)


def _read(path: Path, info: TensorInfo) -> Tensor:
    data = torch.empty(info.nbytes, dtype=torch.uint8)
    try:
        with open(path, "rb") as f:
            f.seek(info.offset)
            if f.readinto(data.numpy()) != info.nbytes:
                raise OSError("file is truncated")
    except OSError as err:
        raise CheckpointError(f"{path}: tensor data unreadable ({err})") from err
    return data


def unpack_q8_0(blocks: Tensor) -> tuple[Tensor, Tensor]:
    """Q8_0 blocks uint8 [N, K / 32 * 34] -> (int8 [N, K], fp16 scales [N, K / 32]); no arithmetic."""
    rows = blocks.shape[0]
    grouped = blocks.reshape(rows, -1, _Q8_0_BYTES)
    scales = grouped[:, :, :2].contiguous().view(torch.float16).reshape(rows, -1)
    q = grouped[:, :, 2:].contiguous().view(torch.int8).reshape(rows, -1)
    return q, scales


def dequantize_q8_0(q: Tensor, scales: Tensor) -> Tensor:
    """(int8 [N, K], fp16 scales [N, K / 32]) -> fp32 [N, K], as llama.cpp computes it: q * float(scale)."""
    return (q.view(q.shape[0], -1, Q8_0_BLOCK).float() * scales.float()[:, :, None]).reshape(q.shape)


def dequantize_q4_1(blocks: Tensor) -> Tensor:
    """Q4_1 blocks uint8 [N, K / 32 * 20] -> fp32 [N, K], as llama.cpp computes it: q * float(d) + float(m).

    Each block holds d, m (fp16) then 16 bytes: byte j's low nibble is weight j, its high nibble weight j + 16.
    """
    rows = blocks.shape[0]
    grouped = blocks.reshape(rows, -1, _Q4_1_BYTES)
    d = grouped[:, :, 0:2].contiguous().view(torch.float16).float()  # [N, blocks, 1]
    m = grouped[:, :, 2:4].contiguous().view(torch.float16).float()
    packed = grouped[:, :, 4:]
    q = torch.cat([packed & 0x0F, packed >> 4], dim=-1).float()  # [N, blocks, 32]: low nibbles first
    return (q * d + m).reshape(rows, -1)


# --- tensors into the model --------------------------------------------------------------------------------------


Weight = Tensor | tuple[Tensor, Tensor]


def renamer(source: GGUFSource, config: ModelConfig, precision: str) -> Callable[[str, Tensor], Iterator[
        tuple[str, Weight]]]:
    """GGUF name and tensor -> the engine's name and weight: q/k rows back in Hugging Face order, Q8_0 decoded."""
    from .loader import unpermute_meta_rotary

    heads = {"wq": config.n_heads, "wk": config.n_kv_heads}
    said: list[str] = []  # the block types whose round trip the log has mentioned

    def rename(name: str, tensor: Tensor) -> Iterator[tuple[str, Weight]]:
        internal = internal_name(name)
        if internal is None:
            raise CheckpointError(f"{source.file.path}: unexpected tensor '{name}' for a Llama model")
        rotary = re.fullmatch(r"layers\.\d+\.attention\.(wq|wk)\.weight", internal)

        def rows_in_hf_order(t: Tensor) -> Tensor:  # a row permutation: the same for weights and their scales
            return unpermute_meta_rotary(t, heads[rotary.group(1)]) if rotary else t

        kind = source.type_of(name)
        if kind == "Q8_0":
            q, scales = unpack_q8_0(tensor)
            yield internal, _q8_0(internal, rows_in_hf_order(q), rows_in_hf_order(scales), precision, said)
        elif kind == "Q4_1":
            if precision == "int8" and "Q4_1" not in said:
                said.append("Q4_1")
                log.warning("Q4_1 weights are dequantized and quantized to the engine's int8 (each weight may "
                            "move by up to half an int8 quantization step)")
            yield internal, rows_in_hf_order(dequantize_q4_1(tensor))
        else:
            yield internal, rows_in_hf_order(tensor)

    return rename


def _q8_0(name: str, q: Tensor, scales: Tensor, precision: str, said: list[str]) -> Weight:
    if precision == "int8" and Q8_0_DIRECT is not None:
        direct = Q8_0_DIRECT(name, q, scales)
        if direct is not None:
            return direct
    if precision == "int8" and "Q8_0" not in said:
        said.append("Q8_0")
        log.warning("Q8_0 weights are dequantized and quantized again to the engine's int8 (each "
                    "weight may move by up to half a quantization step)")
    return dequantize_q8_0(q, scales)


def load_gguf(path: Path, precision: str, progress: bool = False, tokenizer_dir: Path | None = None,
              group_size: int | None = None, quantizer: str = "gptq") -> Any:
    """A `LoadedModel` from a GGUF file; its rebuilt tokenizer (tokenizer.model or tokenizer.json) is written into
    `tokenizer_dir`."""
    from .int8 import DEFAULT_GROUP_SIZE
    from .loader import LoadedModel, _fill, calibration_for, check_config_fits, shapes_by_model_name
    from .model import Transformer

    file = GGUFFile.open(path)
    config = config_from_gguf(file)
    source = GGUFSource(file)
    check_config_fits(config, shapes_by_model_name(source, internal_name), path)
    tokenizer = write_tokenizer(file, tokenizer_dir) if tokenizer_dir else _cache_tokenizer(file)
    with torch.device("meta"):
        model = Transformer(config, precision)
    group = DEFAULT_GROUP_SIZE if group_size is None else group_size
    windows = calibration_for(tokenizer, path) if precision == "int8" and quantizer == "gptq" else None
    _fill(model, source, renamer(source, config, precision), path, progress, group, windows)
    model.stack_projections()  # decode reads q, k, v (gate, up) in one kernel call
    return LoadedModel(model.eval(), config, tokenizer, "gguf", path)


def _cache_tokenizer(file: GGUFFile) -> Path:
    """The file's tokenizer in the cache's tokenizers/; in a temporary folder when the cache cannot be written."""
    from .cache_files import cache_dir, scratch_folder

    try:
        return write_tokenizer(file, cache_dir() / "tokenizers")
    except OSError as err:
        scratch = scratch_folder("tokenizer")
        log.warning("cannot write %s's tokenizer into the cache (%s); using a temporary folder, %s", file.path.name,
                    err, scratch)
        return write_tokenizer(file, scratch)
