"""Damaged or crafted model files are one CheckpointError (or ConfigError) naming the file, never a traceback.

Each test damages a copy of the stories260K model (tmp_path) the way an auditor did: a garbage, empty or cut
tokenizer, a shard index that is not one or leads out of the folder, an int8 scale of the wrong shape, NaN weights.
The command line prints these errors in one line (tests/test_cli_damaged_inputs.py).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from int8serve.engine.config import ConfigError
from int8serve.engine.errors import CheckpointError
from int8serve.engine.loader import load_model, save_int8_checkpoint
from int8serve.engine.tokenizer import load_tokenizer


@pytest.fixture
def model(stories_hf: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(stories_hf, folder)
    return folder


def expect(path: Path, fragments: tuple[str, ...], error: type[Exception] = CheckpointError, **kw: object) -> str:
    with pytest.raises(error) as info:
        load_model(path, **kw)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def rewrite(file: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file))


# --- tokenizers ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "damage"), [
    ("tokenizer.model", lambda p: p.write_bytes(b"garbage" * 10)),
    ("tokenizer.model", lambda p: p.write_bytes(b"")),
    ("tokenizer.model", lambda p: p.write_bytes(p.read_bytes()[:3000])),
    ("tokenizer.json", lambda p: p.write_text(p.read_text()[:500])),
    ("tokenizer.json", lambda p: p.write_text("[]")),
])
def test_a_damaged_tokenizer_is_a_checkpoint_error_naming_it(model: Path, name: str, damage: Callable) -> None:
    damage(model / name)
    with pytest.raises(CheckpointError, match=str(model / name)):
        load_tokenizer(model / name)


def test_gptq_calibration_with_a_damaged_tokenizer_names_it(model: Path) -> None:
    (model / "tokenizer.model").write_bytes(b"garbage" * 10)
    expect(model, (str(model / "tokenizer.model"), "SentencePiece"), quantizer="gptq")


# --- shard indexes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("index", "fragment"), [
    ({"weight_map": 5}, "not a valid shard index"),
    ({"weight_map": {"a": 5}}, "not a valid shard index"),
    ([1, 2], "not a valid shard index"),
    ({"weight_map": {"a": "../hf/model.safetensors"}}, "'../hf/model.safetensors' is not a file name inside"),
    ({"weight_map": {"a": "/etc/passwd"}}, "'/etc/passwd' is not a file name inside"),
])
def test_a_bad_shard_index_is_refused(model: Path, index: object, fragment: str) -> None:
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    expect(model, (str(model / "model.safetensors.index.json"), fragment))


def test_a_shard_in_a_subfolder_is_still_read(model: Path) -> None:
    (model / "shards").mkdir()
    (model / "model.safetensors").rename(model / "shards" / "model.safetensors")
    names = load_file(str(model / "shards" / "model.safetensors")).keys()
    (model / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": dict.fromkeys(names, "shards/model.safetensors")}))
    assert load_model(model, "fp32").config.n_layers == 5


# --- non-finite weights ----------------------------------------------------------------------------------------------


def poison(file: Path, name: str) -> None:
    rewrite(file, lambda t: t[name].view(-1).__setitem__(3, float("nan")))


@pytest.mark.parametrize("quantizer", ["gptq", "rtn"])
@pytest.mark.parametrize("tensor", ["model.layers.1.mlp.up_proj.weight", "model.embed_tokens.weight"])
def test_non_finite_source_weights_are_refused_naming_the_tensor(model: Path, quantizer: str, tensor: str) -> None:
    poison(model / "model.safetensors", tensor)
    expect(model, (str(model), f"'{tensor}'", "non-finite"), quantizer=quantizer)


def test_a_whole_file_of_nan_is_refused_before_gptq(model: Path) -> None:
    """The auditor's file: every weight NaN, which GPTQ's Cholesky factorization used to fail on."""
    data = bytearray((model / "model.safetensors").read_bytes())
    start = 8 + int.from_bytes(data[:8], "little")
    data[start:] = b"\xff\xff\xc0\x7f" * ((len(data) - start) // 4)
    (model / "model.safetensors").write_bytes(bytes(data))
    expect(model, (str(model), "non-finite"), quantizer="gptq")


# --- int8 checkpoints -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_checkpoint(stories_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_int8_checkpoint(load_model(stories_hf, "int8", quantizer="rtn"), tmp_path_factory.mktemp("q8") / "m")


def test_an_int8_scale_of_the_wrong_shape_is_refused(int8_checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "q8"
    shutil.copytree(int8_checkpoint, folder)
    scale = "layers.0.attention.wq.scale"
    rewrite(folder / "model.safetensors", lambda t: t.update({scale: torch.ones(128)}))
    expect(folder, (str(folder), "layers.0.attention.wq", "scale"))


def test_an_int8_checkpoint_with_a_nan_scale_or_norm_is_refused(int8_checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "q8"
    shutil.copytree(int8_checkpoint, folder)
    poison(folder / "model.safetensors", "layers.2.feed_forward.w2.scale")
    expect(folder, (str(folder), "'layers.2.feed_forward.w2.scale'", "non-finite"))
    shutil.copyfile(int8_checkpoint / "model.safetensors", folder / "model.safetensors")
    poison(folder / "model.safetensors", "norm.weight")
    expect(folder, (str(folder), "'norm.weight'", "non-finite"))


@pytest.mark.parametrize("config", [None, [], {"dim": "64"}])
def test_an_int8_checkpoint_with_a_bad_config_is_refused(int8_checkpoint: Path, tmp_path: Path,
                                                        config: object) -> None:
    folder = tmp_path / "q8"
    shutil.copytree(int8_checkpoint, folder)
    meta = json.loads((folder / "int8serve.json").read_text())
    meta["config"] = config
    (folder / "int8serve.json").write_text(json.dumps(meta))
    expect(folder, (str(folder / "int8serve.json"),), ConfigError)
