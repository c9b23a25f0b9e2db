"""A config that describes an impossible or ambiguous model is one ConfigError naming the file and the field.

Nothing is rounded or defaulted: `hidden_size: 64.7` is not 64, `num_key_value_heads: 0` is not "as many as the
query heads". The configs are the stories260K model's, edited in a copy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from int8serve.engine.config import ConfigError, ModelConfig, config_from_hf, config_from_meta
from int8serve.engine.loader import int8_config


@pytest.fixture
def hf_config(stories_hf: Path, tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    shutil.copyfile(stories_hf / "config.json", path)
    return path


def edit(path: Path, **changes: Any) -> Path:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(("changes", "fragment"), [
    ({"num_attention_heads": "abc"}, "'num_attention_heads' must be a whole number, got 'abc'"),
    ({"num_attention_heads": None}, "missing field 'num_attention_heads'"),
    ({"num_attention_heads": 0}, "'num_attention_heads' must be at least 1"),
    ({"hidden_size": 64.7}, "'hidden_size' must be a whole number, got 64.7"),
    ({"hidden_size": "64"}, "'hidden_size' must be a whole number"),
    ({"hidden_size": True}, "'hidden_size' must be a whole number"),
    ({"num_hidden_layers": -3}, "'num_hidden_layers' must be at least 1, got -3"),
    ({"num_key_value_heads": 0}, "'num_key_value_heads' must be at least 1, got 0"),
    ({"max_position_embeddings": 0}, "'max_position_embeddings' must be at least 1"),
    ({"rope_parameters": "yarn"}, "rope_parameters / rope_scaling must be an object, got 'yarn'"),
    ({"eos_token_id": []}, "'eos_token_id' is an empty list"),
    ({"eos_token_id": ["x"]}, "'eos_token_id' must be a whole number"),
    ({"rms_norm_eps": "x"}, "'rms_norm_eps' must be a positive number"),
    ({"rms_norm_eps": float("inf")}, "'rms_norm_eps' must be a positive number, got inf"),
    ({"rope_theta": -1}, "'rope_theta' must be a positive number, got -1"),
    ({"vocab_size": 10**400}, "'vocab_size' must be at most 2147483647, got an integer of 1329 bits"),
    ({"num_hidden_layers": 1e300}, "'num_hidden_layers' must be at most 2147483647, got 1e+300"),
    ({"head_dim": 7}, "head_dim 7 must be even"),
])
def test_a_bad_hf_field_is_one_error_naming_the_file(hf_config: Path, changes: dict, fragment: str) -> None:
    edit(hf_config, **changes)
    with pytest.raises(ConfigError) as info:
        config_from_hf(hf_config)
    assert str(info.value).startswith(f"{hf_config}: "), info.value
    assert fragment in str(info.value)


def test_whole_numbers_written_as_floats_and_eos_lists_are_read(hf_config: Path) -> None:
    config = config_from_hf(edit(hf_config, hidden_size=64.0, eos_token_id=[2, 7], num_key_value_heads=None))
    assert (config.dim, config.eos_id, config.n_kv_heads) == (64, 2, config.n_heads)
    assert isinstance(config.dim, int)


def test_a_bad_meta_field_is_one_error_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "params.json"
    path.write_text(json.dumps({"dim": 64, "n_layers": 2, "n_heads": "8", "vocab_size": 32}))
    with pytest.raises(ConfigError, match=rf"^{path}: 'n_heads' must be a whole number, got '8'$"):
        config_from_meta(path, None, tied=False)


SIZES = {"dim": 64, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "vocab_size": 8, "hidden_dim": 8}


@pytest.mark.parametrize(("config", "fragment"), [
    (None, "expected an object of fields, got NoneType"),
    ([], "expected an object of fields, got list"),
    ({**SIZES, "dim": "64"}, "dim must be a whole number"),
    ({**SIZES, "n_layers": 2.5}, "n_layers must be a whole number"),
])
def test_an_int8_checkpoints_config_is_checked(tmp_path: Path, config: Any, fragment: str) -> None:
    with pytest.raises(ConfigError) as info:
        int8_config(tmp_path, {"config": config})
    assert str(info.value).startswith(f"{tmp_path / 'int8serve.json'}: ") and fragment in str(info.value)


def test_model_config_refuses_non_integer_sizes() -> None:
    with pytest.raises(ConfigError, match="vocab_size must be a whole number"):
        ModelConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=4, vocab_size=8.0, hidden_dim=8)  # type: ignore[arg-type]


@pytest.mark.parametrize("changes", [{"rope_theta": "10000"}, {"norm_eps": None}, {"norm_eps": float("nan")},
                                     {"tie_embeddings": "yes"}])
def test_an_int8_checkpoints_config_is_checked_field_by_field(changes: dict) -> None:
    """int8serve.json's config goes through ModelConfig: every field of the right type, not only the sizes."""
    values = {**ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=32, hidden_dim=96).to_dict(),
              **changes}
    with pytest.raises(ConfigError, match=next(iter(changes))):
        ModelConfig.from_dict(values)
