"""The model's shape, read from a Hugging Face `config.json` or a Meta `params.json`.

Both formats describe the same Llama 2 architecture with different names; this module turns either into one
`ModelConfig` so that the rest of the engine never needs to know where a checkpoint came from.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file is missing, unreadable or describes an impossible model."""


@dataclass(frozen=True)
class ModelConfig:
    dim: int  # model width (Llama-2-7B: 4096)
    n_layers: int  # transformer blocks (32)
    n_heads: int  # query heads (32)
    n_kv_heads: int  # key/value heads (32 for 7B; fewer means grouped-query attention)
    vocab_size: int  # 32000
    hidden_dim: int  # SwiGLU inner width (11008)
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_seq_len: int = 4096  # positions the rotary table covers
    tie_embeddings: bool = False  # output head shares the embedding matrix
    head_dim: int = 0  # 0 means dim // n_heads
    bos_id: int = 1
    eos_id: int = 2

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // max(self.n_heads, 1))
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model config: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"model config: head_dim {self.head_dim} must be even for rotary embeddings")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        try:
            return cls(**known)
        except TypeError as err:
            raise ConfigError(f"model config: {err}") from err


def meta_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """SwiGLU width as Meta's reference `llama/model.py` computes it."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * ((hidden + multiple_of - 1) // multiple_of)


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ConfigError(f"{path}: not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object")
    return data


def _require(data: dict[str, Any], key: str, path: Path) -> Any:
    if key not in data:
        raise ConfigError(f"{path}: missing field '{key}'")
    return data[key]


def config_from_hf(path: Path) -> ModelConfig:
    """Read a Hugging Face `LlamaForCausalLM` config.json."""
    data = read_json(path)
    model_type = data.get("model_type", "llama")
    if model_type != "llama":
        raise ConfigError(f"{path}: model_type '{model_type}' is not supported (only 'llama')")
    n_heads = int(_require(data, "num_attention_heads", path))
    rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ConfigError(f"{path}: rope scaling {rope} is not supported")
    try:
        return ModelConfig(
            dim=int(_require(data, "hidden_size", path)),
            n_layers=int(_require(data, "num_hidden_layers", path)),
            n_heads=n_heads,
            n_kv_heads=int(data.get("num_key_value_heads") or n_heads),
            vocab_size=int(_require(data, "vocab_size", path)),
            hidden_dim=int(_require(data, "intermediate_size", path)),
            norm_eps=float(data.get("rms_norm_eps", 1e-5)),
            rope_theta=float(data.get("rope_theta", rope.get("rope_theta", 10000.0))),
            max_seq_len=int(data.get("max_position_embeddings", 4096)),
            tie_embeddings=bool(data.get("tie_word_embeddings", False)),
            head_dim=int(data.get("head_dim") or 0),
            bos_id=int(1 if data.get("bos_token_id") is None else data["bos_token_id"]),
            eos_id=int(_eos(data.get("eos_token_id", 2))),
        )
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{path}: {err}") from err


def _eos(value: Any) -> int:
    return int(value[0] if isinstance(value, list) else (value if value is not None else 2))


def config_from_meta(path: Path, tokenizer_vocab_size: int | None, tied: bool) -> ModelConfig:
    """Read a Meta `params.json`; `vocab_size: -1` means "take it from the tokenizer"."""
    data = read_json(path)
    vocab = int(data.get("vocab_size", -1))
    if vocab <= 0:
        if tokenizer_vocab_size is None:
            raise ConfigError(f"{path}: vocab_size is {vocab} and no tokenizer.model was found to take it from")
        vocab = tokenizer_vocab_size
    dim = int(_require(data, "dim", path))
    n_heads = int(_require(data, "n_heads", path))
    try:
        return ModelConfig(
            dim=dim,
            n_layers=int(_require(data, "n_layers", path)),
            n_heads=n_heads,
            n_kv_heads=int(data.get("n_kv_heads") or n_heads),
            vocab_size=vocab,
            hidden_dim=meta_hidden_dim(dim, int(data.get("multiple_of", 256)), data.get("ffn_dim_multiplier")),
            norm_eps=float(data.get("norm_eps", 1e-5)),
            rope_theta=float(data.get("rope_theta", 10000.0)),
            max_seq_len=int(data.get("max_seq_len", 4096)),
            tie_embeddings=tied,
        )
    except (TypeError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{path}: {err}") from err
