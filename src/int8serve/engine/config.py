"""The model's shape, read from a Hugging Face `config.json` or a Meta `params.json`.

Both formats describe the same Llama 2 architecture with different names; this module turns either into one
`ModelConfig` so that the rest of the engine never needs to know where a checkpoint came from. `weight_shapes` says
the shape of each weight a config implies, without torch: a config can be checked against a checkpoint's headers
before anything is built or loaded (model_files.py).
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file is missing, unreadable or describes an impossible model."""


# Sizes that must be whole numbers >= 1 (a config that says otherwise is refused, never rounded or defaulted)
_WHOLE_FIELDS = ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "max_seq_len")


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
        for name in (*_WHOLE_FIELDS, "head_dim", "bos_id", "eos_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"model config: {name} must be a whole number, got {value!r}")
        for name in ("norm_eps", "rope_theta"):
            if not _positive_number(getattr(self, name)):
                raise ConfigError(f"model config: {name} must be a positive number, got {getattr(self, name)!r:.60}")
        if not isinstance(self.tie_embeddings, bool):
            raise ConfigError(f"model config: tie_embeddings must be true or false, got {self.tie_embeddings!r:.60}")
        for name in _WHOLE_FIELDS:
            if getattr(self, name) <= 0:
                raise ConfigError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.head_dim < 0:
            raise ConfigError(f"model config: head_dim must be positive (0: dim // n_heads), got {self.head_dim}")
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(f"model config: n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"model config: head_dim {self.head_dim} must be even for rotary embeddings")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Any) -> ModelConfig:
        if not isinstance(values, dict):
            raise ConfigError(f"model config: expected an object of fields, got {type(values).__name__}")
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


def config_from_hf(path: Path) -> ModelConfig:
    """Read a Hugging Face `LlamaForCausalLM` config.json."""
    data = read_json(path)
    model_type = data.get("model_type", "llama")
    if model_type != "llama":
        raise ConfigError(f"{path}: model_type '{model_type}' is not supported (only 'llama')")
    rope = data.get("rope_parameters") or data.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"{path}: rope_parameters / rope_scaling must be an object, got {rope!r}")
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
        raise ConfigError(f"{path}: rope scaling {rope} is not supported")
    n_heads = whole(data, "num_attention_heads", path)
    return _build(path, dict(
        dim=whole(data, "hidden_size", path),
        n_layers=whole(data, "num_hidden_layers", path),
        n_heads=n_heads,
        n_kv_heads=whole(data, "num_key_value_heads", path, default=n_heads),
        vocab_size=whole(data, "vocab_size", path),
        hidden_dim=whole(data, "intermediate_size", path),
        norm_eps=_number(data, "rms_norm_eps", path, 1e-5),
        rope_theta=_number(data, "rope_theta", path, _number(rope, "rope_theta", path, 10000.0)),
        max_seq_len=whole(data, "max_position_embeddings", path, default=4096, maximum=None),
        tie_embeddings=bool(data.get("tie_word_embeddings", False)),
        head_dim=whole(data, "head_dim", path, default=0, minimum=0),
        bos_id=whole(data, "bos_token_id", path, default=1, minimum=None),
        eos_id=_eos(data, path),
    ))


_REQUIRED = object()


MAX_WHOLE = 2**31 - 1


def whole(data: dict[str, Any], key: str, path: Path, default: Any = _REQUIRED, minimum: int | None = 1,
          maximum: int | None = MAX_WHOLE) -> int:
    """`data[key]` as a whole number (an integral float such as 64.0 is one) of at least `minimum`; absent or null:
    `default`. Anything else (64.7, "64", true, 0 heads) is refused: rounding or defaulting would load another
    model than the file describes."""
    value = data.get(key)
    if value is None:
        if default is _REQUIRED:
            raise ConfigError(f"{path}: missing field '{key}'")
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or (isinstance(value, float)
                                                                          and not value.is_integer()):
        raise ConfigError(f"{path}: '{key}' must be a whole number, got {value!r}")
    if minimum is not None and value < minimum:
        raise ConfigError(f"{path}: '{key}' must be at least {minimum}, got {int(value)}")
    if maximum is not None and value > maximum:  # no model has a width or a vocabulary past 2^31
        shown = f"{value:.3g}" if isinstance(value, float) else f"an integer of {value.bit_length()} bits"
        raise ConfigError(f"{path}: '{key}' must be at most {maximum}, got {shown}")
    return int(value)


def _number(data: dict[str, Any], key: str, path: Path, default: float) -> float:
    value = data.get(key)
    if value is None:
        return default
    if not _positive_number(value):
        raise ConfigError(f"{path}: '{key}' must be a positive number, got {value!r:.60}")
    return float(value)


def _positive_number(value: Any) -> bool:
    """A finite number above 0 (not a bool; an integer too large for a float is not one)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(float(value)) and value > 0
    except OverflowError:
        return False


def _eos(data: dict[str, Any], path: Path) -> int:
    """`eos_token_id`: one id, or a list of them (the first is the model's EOS); absent or null: 2."""
    value = data.get("eos_token_id")
    if isinstance(value, list):
        if not value:
            raise ConfigError(f"{path}: 'eos_token_id' is an empty list")
        return whole({"eos_token_id": value[0]}, "eos_token_id", path, minimum=0)
    return whole(data, "eos_token_id", path, default=2, minimum=0)


def _build(path: Path, fields: dict[str, Any]) -> ModelConfig:
    with naming(path):
        return ModelConfig(**fields)


@contextlib.contextmanager
def naming(path: Path) -> Iterator[None]:
    """ModelConfig's errors inside the block name the file `path` instead of "model config"."""
    try:
        yield
    except ConfigError as err:
        raise ConfigError(f"{path}: {str(err).removeprefix('model config: ')}") from err


def config_from_meta(path: Path, tokenizer_vocab_size: int | None, tied: bool) -> ModelConfig:
    """Read a Meta `params.json`; `vocab_size: -1` means "take it from the tokenizer"."""
    data = read_json(path)
    vocab = whole(data, "vocab_size", path, default=-1, minimum=None)
    if vocab <= 0:
        if tokenizer_vocab_size is None:
            raise ConfigError(f"{path}: vocab_size is {vocab} and no tokenizer.model was found to take it from")
        vocab = tokenizer_vocab_size
    dim = whole(data, "dim", path)
    n_heads = whole(data, "n_heads", path)
    multiplier = data.get("ffn_dim_multiplier")
    if multiplier is not None:
        multiplier = _number(data, "ffn_dim_multiplier", path, 1.0)
    return _build(path, dict(
        dim=dim,
        n_layers=whole(data, "n_layers", path),
        n_heads=n_heads,
        n_kv_heads=whole(data, "n_kv_heads", path, default=n_heads),
        vocab_size=vocab,
        hidden_dim=meta_hidden_dim(dim, whole(data, "multiple_of", path, default=256), multiplier),
        norm_eps=_number(data, "norm_eps", path, 1e-5),
        rope_theta=_number(data, "rope_theta", path, 10000.0),
        max_seq_len=whole(data, "max_seq_len", path, default=4096, maximum=None),
        tie_embeddings=tied,
    ))


def weight_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every weight a checkpoint holds for `config` (the output head's even where tied), by the
    Transformer's names, without building it (tests/engine/test_loader_damaged.py holds the two equal)."""
    q, kv = config.n_heads * config.head_dim, config.n_kv_heads * config.head_dim
    layer = {"attention.wq": (q, config.dim), "attention.wk": (kv, config.dim), "attention.wv": (kv, config.dim),
             "attention.wo": (config.dim, q), "feed_forward.w1": (config.hidden_dim, config.dim),
             "feed_forward.w3": (config.hidden_dim, config.dim), "feed_forward.w2": (config.dim, config.hidden_dim),
             "attention_norm": (config.dim,), "ffn_norm": (config.dim,)}
    shapes = {"tok_embeddings.weight": (config.vocab_size, config.dim), "norm.weight": (config.dim,),
              "output.weight": (config.vocab_size, config.dim)}
    for index in range(config.n_layers):
        shapes.update({f"layers.{index}.{name}.weight": shape for name, shape in layer.items()})
    return shapes
