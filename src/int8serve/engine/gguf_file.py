"""A GGUF file as the engine reads it before any tensor: its tensor directory, the model's config from its metadata,
its tensor names in the model's terms, and whether its tensor types are ones the loader reads.

No torch: `serve` checks a GGUF model with these before it loads anything (model_files.py), and gguf_loader.py
builds the model from the same answers (its tokenizer: gguf_tokenizer.py, used by both the same way).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .config import ConfigError, ModelConfig, whole
from .errors import CheckpointError
from .tensor_names import model_name

# The tensor types the loader reads (gguf_loader.py), the one list of them. Float types are read as they are (the
# name of their torch dtype); block types are dequantized, then quantized to the engine's int8: (weights per block,
# bytes per block). Q8_0: an fp16 scale, then 32 int8. Q4_1: an fp16 scale, an fp16 minimum, then 32 4-bit values.
FLOAT_TYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
BLOCK_TYPES = {"Q8_0": (32, 2 + 32), "Q4_1": (32, 2 + 2 + 32 // 2)}
SUPPORTED_TYPES = (*FLOAT_TYPES, *BLOCK_TYPES)

_NAMES = [
    (r"token_embd\.weight", "tok_embeddings.weight"),
    (r"output_norm\.weight", "norm.weight"),
    (r"output\.weight", "output.weight"),
    (r"blk\.(\d+)\.attn_q\.weight", r"layers.\1.attention.wq.weight"),
    (r"blk\.(\d+)\.attn_k\.weight", r"layers.\1.attention.wk.weight"),
    (r"blk\.(\d+)\.attn_v\.weight", r"layers.\1.attention.wv.weight"),
    (r"blk\.(\d+)\.attn_output\.weight", r"layers.\1.attention.wo.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", r"layers.\1.feed_forward.w1.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", r"layers.\1.feed_forward.w2.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", r"layers.\1.feed_forward.w3.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", r"layers.\1.attention_norm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", r"layers.\1.ffn_norm.weight"),
]


@dataclass(frozen=True)
class TensorInfo:
    type: str  # GGML type name: F32, F16, BF16, Q8_0, ...
    shape: tuple[int, ...]  # PyTorch order: (rows, columns) for a matrix
    offset: int  # absolute position of the data in the file
    nbytes: int


@dataclass
class GGUFFile:
    """The metadata and tensor directory of a GGUF file (no tensor data is read)."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]

    @classmethod
    def open(cls, path: Path) -> GGUFFile:
        from .gguf_header import read_header  # imports the gguf package: only for a GGUF model

        try:
            header = read_header(path)
        except (ValueError, OSError, KeyError) as err:
            raise CheckpointError(f"{path}: not a readable GGUF file ({err})") from err
        tensors = {t.name: TensorInfo(t.type.name, tuple(reversed(t.dims)), t.data_offset, t.n_bytes)
                   for t in header.tensors}
        return cls(path, header.metadata, tensors)

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)


def internal_name(name: str) -> str | None:
    """The model's name for the GGUF tensor `name` (None: not a tensor of a Llama model)."""
    return model_name(name, _NAMES)


def check_tensor_types(file: GGUFFile) -> None:
    """Refuse a file holding tensors of a type the loader cannot read (K-quants, ...), naming the type, or a
    block-quantized tensor whose rows are not whole blocks."""
    unsupported = {info.type for info in file.tensors.values() if info.type not in SUPPORTED_TYPES}
    if unsupported:
        names = [n for n, i in file.tensors.items() if i.type in unsupported][:3]
        raise CheckpointError(f"{file.path}: tensor type {', '.join(sorted(unsupported))} is not supported "
                              f"(e.g. {', '.join(names)}); int8serve reads GGUF files in "
                              f"{', '.join(SUPPORTED_TYPES)}: use llama-2-7b-chat.Q8_0.gguf, or the fp16 one")
    for name, info in file.tensors.items():
        if info.type in BLOCK_TYPES:
            block_matrix_shape(file.path, name, info)


def block_matrix_shape(path: Path, name: str, info: TensorInfo) -> tuple[int, int]:
    """(rows, columns) of a block-quantized tensor (Q8_0, Q4_1), whose every row must be whole blocks; else refused.

    The header's own check asks only that the whole tensor be whole blocks: [64, 172] in Q8_0 (344 blocks) passes
    it, but its rows cannot be read as rows of blocks."""
    block, block_bytes = BLOCK_TYPES[info.type]
    if len(info.shape) != 2:
        raise CheckpointError(f"{path}: {info.type} tensor '{name}' has shape {info.shape}: a block-quantized tensor "
                              "must be a matrix")
    rows, cols = info.shape
    if cols % block:
        raise CheckpointError(f"{path}: {info.type} tensor '{name}' has shape {info.shape}: its rows of {cols} "
                              f"values do not split into blocks of {block}")
    if info.nbytes != rows * cols // block * block_bytes:
        raise CheckpointError(f"{path}: {info.type} tensor '{name}' has shape {info.shape} but {info.nbytes} bytes, "
                              f"not {rows * cols // block * block_bytes}")
    return rows, cols


def config_from_gguf(file: GGUFFile) -> ModelConfig:
    arch = file.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"{file.path}: architecture {arch!r} is not supported (only 'llama')")
    scaling = file.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ConfigError(f"{file.path}: rope scaling {scaling!r} is not supported")
    def size(key: str, **kw: Any) -> int:  # a whole number, checked as config.json's are (never truncated)
        return whole({key: file.get(key)}, key, file.path, **kw)

    try:
        n_heads = size("llama.attention.head_count")
        return ModelConfig(
            dim=size("llama.embedding_length"),
            n_layers=size("llama.block_count"),
            n_heads=n_heads,
            n_kv_heads=size("llama.attention.head_count_kv", default=n_heads),
            vocab_size=len(require(file, "tokenizer.ggml.tokens")),
            hidden_dim=size("llama.feed_forward_length"),
            norm_eps=_f32(file.get("llama.attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=_f32(file.get("llama.rope.freq_base", 10000.0)),
            max_seq_len=size("llama.context_length", default=4096, maximum=None),
            tie_embeddings="output.weight" not in file.tensors,
            head_dim=size("llama.attention.key_length", default=0, minimum=0),
            bos_id=size("tokenizer.ggml.bos_token_id", default=1, minimum=None),
            eos_id=size("tokenizer.ggml.eos_token_id", default=2, minimum=None),
        )
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{file.path}: {err}") from err


def _f32(value: Any) -> float:
    """A float32 metadata value as the decimal it was written from (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def require(file: GGUFFile, key: str) -> Any:
    value = file.get(key)
    if value is None:
        raise ConfigError(f"{file.path}: missing metadata '{key}'")
    return value
