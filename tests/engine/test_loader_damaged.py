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
from safetensors.torch import load_file
from tests.engine.test_loader import expect_error
from tests.engine.test_loader import rewrite_safetensors as rewrite

from int8serve.engine import loader
from int8serve.engine.config import ConfigError, ModelConfig, weight_shapes
from int8serve.engine.errors import CheckpointError
from int8serve.engine.int8 import Int8Linear
from int8serve.engine.loader import load_model, save_int8_checkpoint
from int8serve.engine.model import Transformer, rope_tables
from int8serve.engine.tokenizer import load_tokenizer


@pytest.fixture
def model(stories_hf: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(stories_hf, folder)
    return folder


def expect(path: Path, fragments: tuple[str, ...], error: type[Exception] = CheckpointError, **kw: object) -> str:
    """The int8 load of `path` raises `error`, one line holding every fragment."""
    message = expect_error(path, error, *fragments, precision="int8", **kw)
    assert "\n" not in message
    return message


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


# --- a config that does not describe the weights -----------------------------------------------------------------


def test_weight_shapes_are_the_models() -> None:
    config = ModelConfig(dim=64, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=300, hidden_dim=200, head_dim=16)
    for precision in ("fp32", "int8"):
        with torch.device("meta"):
            model = Transformer(config, precision)
        built = {f"{name}.weight": (m.out_features, m.in_features) if isinstance(m, Int8Linear) else
                 tuple(m.weight.shape) for name, m in model.named_modules() if hasattr(m, "weight")}
        assert built == weight_shapes(config)


@pytest.fixture
def never_built(monkeypatch: pytest.MonkeyPatch) -> None:
    """A config the weights refute must be refused before the model is built (10^7 layers took minutes)."""
    def refuse(*args: object, **kw: object) -> None:
        raise AssertionError("the model was built")

    monkeypatch.setattr(loader, "Transformer", refuse)


@pytest.mark.parametrize(("changes", "fragments"), [
    ({"num_hidden_layers": 10**7}, ("the config describes 10000000 layers, the checkpoint holds weights for 5",)),
    ({"num_hidden_layers": 4}, ("unexpected tensor 'layers.4.", "the config describes 4 layers")),
    ({"hidden_size": 10**9, "head_dim": None}, ("'tok_embeddings.weight' has shape (512, 64)", "(512, 1000000000)")),
    ({"vocab_size": 10**9}, ("'tok_embeddings.weight' has shape (512, 64)", "(1000000000, 64)")),
])
def test_a_config_the_weights_refute_is_refused_before_building(model: Path, never_built: None, changes: dict,
                                                                 fragments: tuple[str, ...]) -> None:
    config = json.loads((model / "config.json").read_text())
    config.update(changes)
    (model / "config.json").write_text(json.dumps(config))
    expect(model, (str(model), *fragments))


def test_a_context_of_ten_billion_positions_costs_nothing_until_used(model: Path) -> None:
    """max_position_embeddings 10^10 used to build 40 GB rotary tables at once; they grow as caches need them, to
    the same bits as tables built at once."""
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 10**10}))
    loaded = load_model(model, "int8", quantizer="rtn")
    assert loaded.config.max_seq_len == 10**10 and loaded.model.rope_cos.shape[0] <= 4096
    cache = loaded.model.new_cache(1, 4200)  # past the first block of the tables
    cos, sin = rope_tables(loaded.config.head_dim, 4200, loaded.config.rope_theta)
    assert torch.equal(loaded.model.rope_cos[:4200], cos) and torch.equal(loaded.model.rope_sin[:4200], sin)
    # every position attended to is written (rows past 4096 alone would read the cache's unwritten memory)
    tokens = torch.tensor([[1, *([403, 407, 261] * 1400)[:4199]]])
    logits = loaded.model(tokens, cache, [0], [0], all_logits=True)
    assert logits.shape == (1, 4200, 512) and bool(torch.isfinite(logits).all())


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
