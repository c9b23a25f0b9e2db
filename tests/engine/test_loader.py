"""The checkpoint loader: every folder format gives the model `transformers` computes, and bad input fails clearly.

Formats: Hugging Face (safetensors or .bin, single or sharded, tied or untied head), Meta's original layout
(`params.json` + `consolidated.NN.pth`, one or several model-parallel shards), and the int8 checkpoint that
`save_int8_checkpoint` writes. The small models are random (seeded) and written by the tests themselves; the
real stories260K model in the shared data folder checks the HF and Meta layouts against each other.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tests.file_modes import modes
from transformers import LlamaConfig, LlamaForCausalLM

from int8serve.engine.config import ConfigError, meta_hidden_dim
from int8serve.engine.errors import CheckpointError
from int8serve.engine.int8 import DEFAULT_GROUP_SIZE, Int8Linear
from int8serve.engine.loader import LoadedModel, load_model, save_int8_checkpoint, unpermute_meta_rotary

# The small random model: GQA (4 query heads, 2 kv heads), head_dim 16. Its SwiGLU width is the one Meta's formula
# gives for dim 64 and multiple_of 32, so the same weights can also be written in Meta's layout.
DIM, N_LAYERS, N_HEADS, N_KV_HEADS, VOCAB = 64, 2, 4, 2, 128
MULTIPLE_OF = 32
HIDDEN = 192  # == meta_hidden_dim(DIM, MULTIPLE_OF, None), checked in a test
NORM_EPS = 1e-6  # not the loader's default 1e-5, so that a dropped value shows
MAX_POS = 64
TOKENS = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))
STORIES_VOCAB = 512


# --- helpers -------------------------------------------------------------------------------------------------------


def make_hf_model(seed: int = 0, **overrides: object) -> LlamaForCausalLM:
    """A seeded random LlamaForCausalLM whose logits are O(1), so that any misplaced weight shows clearly."""
    values = dict(hidden_size=DIM, num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
                  num_key_value_heads=N_KV_HEADS, intermediate_size=HIDDEN, vocab_size=VOCAB,
                  max_position_embeddings=MAX_POS, rms_norm_eps=NORM_EPS, tie_word_embeddings=False)
    values.update(overrides)
    config = LlamaConfig(**values)
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):  # not all ones: a swapped or missing norm must change the logits
                param.copy_(1 + 0.3 * torch.randn(param.shape, generator=generator))
            elif "embed_tokens" in name:
                param.copy_(torch.randn(param.shape, generator=generator))
            else:
                param.copy_(torch.randn(param.shape, generator=generator) / param.shape[1] ** 0.5)
    return model


def hf_logits(model: LlamaForCausalLM, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    with torch.no_grad():
        return model(tokens).logits.float()


def our_logits(loaded: LoadedModel, tokens: torch.Tensor = TOKENS) -> torch.Tensor:
    batch, seq = tokens.shape
    cache = loaded.model.new_cache(batch, seq)
    return loaded.model(tokens, cache, list(range(batch)), [0] * batch, all_logits=True)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def state_dict_of(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """Independent contiguous copies (torch.save of a view would store its whole base storage)."""
    return {name: tensor.detach().clone().contiguous() for name, tensor in model.state_dict().items()}


def write_hf_bin(model: LlamaForCausalLM, folder: Path, n_shards: int = 1, legacy: bool = False) -> None:
    """The pre-safetensors HF layout (transformers 5 no longer writes it): pytorch_model.bin, or shards + index."""
    model.config.save_pretrained(folder)
    state = state_dict_of(model)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    # Checkpoints from older transformers versions carry the rotary inverse frequencies; the loader ignores them.
    inv_freq = 1.0 / 10000 ** (torch.arange(0, DIM // N_HEADS, 2).float() / (DIM // N_HEADS))
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = inv_freq
    if n_shards == 1:
        torch.save(state, folder / "pytorch_model.bin", _use_new_zipfile_serialization=not legacy)
        return
    names = list(state)
    weight_map = {}
    for shard in range(n_shards):
        filename = f"pytorch_model-{shard + 1:05d}-of-{n_shards:05d}.bin"
        part = {name: state[name] for name in names[shard::n_shards]}
        torch.save(part, folder / filename, _use_new_zipfile_serialization=not legacy)
        weight_map.update(dict.fromkeys(part, filename))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
             "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))


def permute_to_meta(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF q/k rows (rotate_half halves) -> Meta's interleaved rotary pairs: the inverse of `unpermute_meta_rotary`."""
    out_features, in_features = weight.shape
    return (weight.view(n_heads, 2, out_features // n_heads // 2, in_features)
            .transpose(1, 2).reshape(out_features, in_features))


def hf_to_meta_state(model: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The same weights under Meta's names, with q/k rows in Meta's interleaved order (and Meta's rope.freqs)."""
    config = model.config
    hf = state_dict_of(model)
    state = {"tok_embeddings.weight": hf["model.embed_tokens.weight"], "norm.weight": hf["model.norm.weight"]}
    if not config.tie_word_embeddings:
        state["output.weight"] = hf["lm_head.weight"]
    names = {"self_attn.q_proj": "attention.wq", "self_attn.k_proj": "attention.wk", "self_attn.v_proj": "attention.wv",
             "self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.down_proj": "feed_forward.w2",
             "mlp.up_proj": "feed_forward.w3", "input_layernorm": "attention_norm",
             "post_attention_layernorm": "ffn_norm"}
    for layer in range(config.num_hidden_layers):
        for hf_name, meta_name in names.items():
            tensor = hf[f"model.layers.{layer}.{hf_name}.weight"]
            if meta_name == "attention.wq":
                tensor = permute_to_meta(tensor, config.num_attention_heads)
            elif meta_name == "attention.wk":
                tensor = permute_to_meta(tensor, config.num_key_value_heads)
            state[f"layers.{layer}.{meta_name}.weight"] = tensor.contiguous()
    head_dim = config.hidden_size // config.num_attention_heads
    state["rope.freqs"] = 1.0 / 10000 ** (torch.arange(0, head_dim, 2).float() / head_dim)
    return state


def meta_split_dim(name: str) -> int | None:
    """Meta's model parallelism: ColumnParallelLinear splits dim 0, RowParallelLinear and ParallelEmbedding dim 1."""
    if name == "output.weight" or re.search(r"\.(wq|wk|wv|w1|w3)\.weight$", name):
        return 0
    if name == "tok_embeddings.weight" or re.search(r"\.(wo|w2)\.weight$", name):
        return 1
    return None  # norms and rope.freqs are replicated


def write_meta(folder: Path, state: dict[str, torch.Tensor], params: dict, n_shards: int = 1) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "params.json").write_text(json.dumps(params))
    for shard in range(n_shards):
        part = {}
        for name, tensor in state.items():
            dim = meta_split_dim(name)
            piece = tensor if dim is None or n_shards == 1 else tensor.chunk(n_shards, dim=dim)[shard]
            part[name] = piece.clone().contiguous()
        torch.save(part, folder / f"consolidated.{shard:02d}.pth")


def meta_params(model: LlamaForCausalLM, **overrides: object) -> dict:
    config = model.config
    params = {"dim": config.hidden_size, "n_layers": config.num_hidden_layers, "n_heads": config.num_attention_heads,
              "n_kv_heads": config.num_key_value_heads, "vocab_size": config.vocab_size, "multiple_of": MULTIPLE_OF,
              "norm_eps": config.rms_norm_eps}
    params.update(overrides)
    return params


def expect_error(path: Path, error: type[Exception], *fragments: str, precision: str = "fp32", **kw: object) -> str:
    """load_model(path) raises exactly `error` and its message contains every fragment."""
    with pytest.raises(error) as info:
        load_model(path, precision, **kw)  # type: ignore[arg-type]
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def rewrite_safetensors(file: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    tensors = load_file(str(file))
    edit(tensors)
    save_file(tensors, str(file))


def model_tensors(loaded: LoadedModel) -> dict[str, torch.Tensor]:
    return {**dict(loaded.model.named_parameters()), **dict(loaded.model.named_buffers())}


# --- fixtures --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_model() -> LlamaForCausalLM:
    return make_hf_model(seed=0)


@pytest.fixture(scope="module")
def hf_reference(hf_model: LlamaForCausalLM) -> torch.Tensor:
    logits = hf_logits(hf_model)
    assert logits.abs().max() > 1.0  # large enough that a 1e-4 tolerance is a real check
    return logits


@pytest.fixture(scope="module")
def hf_folder(hf_model: LlamaForCausalLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The random model as one model.safetensors (read-only use; tests that damage it copy it first)."""
    folder = tmp_path_factory.mktemp("hf") / "model"
    hf_model.save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    return folder


@pytest.fixture(scope="module")
def hf_sharded_folder(hf_model: LlamaForCausalLM, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("hf-sharded") / "model"
    hf_model.save_pretrained(folder, max_shard_size="50KB")
    assert (folder / "model.safetensors.index.json").is_file()
    assert not (folder / "model.safetensors").exists()
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    return folder


@pytest.fixture(scope="module")
def int8_reference(hf_folder: Path) -> torch.Tensor:
    return our_logits(load_model(hf_folder, "int8"))


# --- 1. Hugging Face formats ---------------------------------------------------------------------------------------


HF_FORMATS = ["safetensors", "safetensors-sharded", "bin", "bin-sharded", "bin-legacy"]


def hf_format_folder(kind: str, model: LlamaForCausalLM, hf_folder: Path, hf_sharded_folder: Path,
                     tmp_path: Path) -> Path:
    if kind == "safetensors":
        return hf_folder
    if kind == "safetensors-sharded":
        return hf_sharded_folder
    folder = tmp_path / kind
    folder.mkdir()
    if kind == "bin":
        write_hf_bin(model, folder)
        assert (folder / "pytorch_model.bin").is_file()
    elif kind == "bin-sharded":
        write_hf_bin(model, folder, n_shards=3)
        assert (folder / "pytorch_model.bin.index.json").is_file()
        assert len(list(folder.glob("pytorch_model-*-of-00003.bin"))) == 3
    else:  # the pre-1.6 torch.save format, which cannot be memory-mapped
        write_hf_bin(model, folder, legacy=True)
    assert not list(folder.glob("*.safetensors"))
    return folder


@pytest.mark.parametrize("kind", HF_FORMATS)
def test_hf_formats_match_transformers(kind: str, hf_model: LlamaForCausalLM, hf_reference: torch.Tensor,
                                       int8_reference: torch.Tensor, hf_folder: Path, hf_sharded_folder: Path,
                                       tmp_path: Path) -> None:
    folder = hf_format_folder(kind, hf_model, hf_folder, hf_sharded_folder, tmp_path)
    loaded = load_model(folder, "fp32")
    assert loaded.source_format == "hf"
    assert loaded.path == folder
    assert loaded.tokenizer_path is None  # no tokenizer is needed to load weights
    config = loaded.config
    assert (config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.vocab_size, config.hidden_dim) == (
        DIM, N_LAYERS, N_HEADS, N_KV_HEADS, VOCAB, HIDDEN)
    assert config.norm_eps == NORM_EPS and not config.tie_embeddings and config.max_seq_len == MAX_POS
    assert max_diff(our_logits(loaded), hf_reference) <= 1e-4
    # The int8 model quantizes the very same weights whatever the file format.
    assert torch.equal(our_logits(load_model(folder, "int8")), int8_reference)


def test_tied_head_without_lm_head_matches_transformers(tmp_path: Path) -> None:
    model = make_hf_model(seed=3, tie_word_embeddings=True,
                          rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
    assert model.lm_head.weight is model.model.embed_tokens.weight
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as handle:
        assert "lm_head.weight" not in handle.keys()  # noqa: SIM118 - not a Mapping
    loaded = load_model(tmp_path, "fp32")
    assert loaded.config.tie_embeddings and loaded.config.rope_theta == 1000.0
    assert max_diff(our_logits(loaded), hf_logits(model)) <= 1e-4
    int8 = load_model(tmp_path, "int8")
    assert isinstance(int8.model.output, Int8Linear)
    assert list(int8.model.output.buffers()) and not any(t.is_meta for t in int8.model.output.buffers())
    assert max_diff(our_logits(int8), hf_logits(model)) < 0.05 * hf_logits(model).abs().max()


# --- 2. Meta layout ------------------------------------------------------------------------------------------------


def test_meta_permutation_helper_inverts_the_loaders_unpermute() -> None:
    weight = torch.randn(DIM, DIM)
    meta = permute_to_meta(weight, N_HEADS)
    assert not torch.equal(meta, weight)
    assert torch.equal(unpermute_meta_rotary(meta, N_HEADS), weight)
    kv = torch.randn(N_KV_HEADS * DIM // N_HEADS, DIM)
    assert torch.equal(unpermute_meta_rotary(permute_to_meta(kv, N_KV_HEADS), N_KV_HEADS), kv)


def test_meta_hidden_dim_gives_the_models_intermediate_size() -> None:
    assert meta_hidden_dim(DIM, MULTIPLE_OF, None) == HIDDEN
    assert meta_hidden_dim(DIM, MULTIPLE_OF, 0.5) == 96
    assert meta_hidden_dim(4096, 256, None) == 11008  # Llama-2-7B


@pytest.mark.parametrize("n_shards", [1, 2])
def test_meta_layout_matches_transformers(n_shards: int, hf_model: LlamaForCausalLM, hf_reference: torch.Tensor,
                                          int8_reference: torch.Tensor, tmp_path: Path) -> None:
    folder = tmp_path / "meta"
    write_meta(folder, hf_to_meta_state(hf_model), meta_params(hf_model), n_shards=n_shards)
    assert len(list(folder.glob("consolidated.*.pth"))) == n_shards
    loaded = load_model(folder, "fp32")
    assert loaded.source_format == "meta"
    config = loaded.config
    assert (config.dim, config.n_layers, config.n_heads, config.n_kv_heads, config.vocab_size, config.hidden_dim) == (
        DIM, N_LAYERS, N_HEADS, N_KV_HEADS, VOCAB, HIDDEN)
    assert config.norm_eps == NORM_EPS and not config.tie_embeddings
    assert max_diff(our_logits(loaded), hf_reference) <= 1e-4
    assert torch.equal(our_logits(load_model(folder, "int8")), int8_reference)


def test_meta_ffn_dim_multiplier(tmp_path: Path) -> None:
    model = make_hf_model(seed=4, intermediate_size=96)
    write_meta(tmp_path / "meta", hf_to_meta_state(model), meta_params(model, ffn_dim_multiplier=0.5), n_shards=2)
    loaded = load_model(tmp_path / "meta", "fp32")
    assert loaded.config.hidden_dim == 96
    assert max_diff(our_logits(loaded), hf_logits(model)) <= 1e-4


@pytest.fixture(scope="module")
def vocab512_model() -> LlamaForCausalLM:
    return make_hf_model(seed=5, vocab_size=STORIES_VOCAB)


def test_meta_vocab_from_tokenizer(vocab512_model: LlamaForCausalLM, shared_dir: Path, tmp_path: Path) -> None:
    tokenizer = shared_dir / "models" / "stories260K" / "meta" / "tokenizer.model"
    folder = tmp_path / "meta"
    write_meta(folder, hf_to_meta_state(vocab512_model), meta_params(vocab512_model, vocab_size=-1))
    shutil.copyfile(tokenizer, folder / "tokenizer.model")
    loaded = load_model(folder, "fp32")
    assert loaded.config.vocab_size == STORIES_VOCAB
    assert loaded.tokenizer_path == folder / "tokenizer.model"
    tokens = torch.randint(0, STORIES_VOCAB, (2, 10), generator=torch.Generator().manual_seed(2))
    assert max_diff(our_logits(loaded, tokens), hf_logits(vocab512_model, tokens)) <= 1e-4


def test_meta_vocab_minus_one_without_tokenizer(vocab512_model: LlamaForCausalLM, tmp_path: Path) -> None:
    folder = tmp_path / "meta"  # neither it nor its parent holds a tokenizer.model
    write_meta(folder, hf_to_meta_state(vocab512_model), meta_params(vocab512_model, vocab_size=-1))
    expect_error(folder, ConfigError, str(folder / "params.json"), "vocab_size", "tokenizer.model")


# --- 3. the real stories260K model in both layouts -----------------------------------------------------------------


@pytest.fixture(scope="module")
def stories_dirs(shared_dir: Path) -> tuple[Path, Path]:
    root = shared_dir / "models" / "stories260K"
    assert (root / "hf" / "model.safetensors").is_file() and (root / "meta" / "consolidated.00.pth").is_file()
    return root / "hf", root / "meta"


STORIES_TOKENS = torch.randint(0, STORIES_VOCAB, (3, 24), generator=torch.Generator().manual_seed(7))


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_stories260k_hf_and_meta_give_identical_logits(precision: str, stories_dirs: tuple[Path, Path]) -> None:
    hf_dir, meta_dir = stories_dirs
    hf, meta = load_model(hf_dir, precision), load_model(meta_dir, precision)
    assert (hf.source_format, meta.source_format) == ("hf", "meta")
    assert hf.tokenizer_path == hf_dir / "tokenizer.model" and meta.tokenizer_path == meta_dir / "tokenizer.model"
    for field in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size", "hidden_dim", "norm_eps", "rope_theta"):
        assert getattr(hf.config, field) == getattr(meta.config, field), field
    assert hf.config.vocab_size == STORIES_VOCAB and hf.config.hidden_dim == 172
    assert max_diff(our_logits(hf, STORIES_TOKENS), our_logits(meta, STORIES_TOKENS)) <= 1e-5


def test_stories260k_hf_matches_transformers(stories_dirs: tuple[Path, Path]) -> None:
    reference = LlamaForCausalLM.from_pretrained(stories_dirs[0], dtype=torch.float32, attn_implementation="eager")
    expected = hf_logits(reference.eval(), STORIES_TOKENS)
    assert max_diff(our_logits(load_model(stories_dirs[0], "fp32"), STORIES_TOKENS), expected) <= 1e-4


# --- 4. int8 checkpoint round trip ---------------------------------------------------------------------------------


def test_int8_checkpoint_round_trip(stories_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    hf_dir = stories_dirs[0]
    original = load_model(hf_dir, "int8")
    destination = tmp_path / "int8"
    assert save_int8_checkpoint(original, destination) == destination
    meta = json.loads((destination / "int8serve.json").read_text())
    assert meta["format"] == "int8serve-int8" and meta["config"]["vocab_size"] == STORIES_VOCAB
    assert (destination / "tokenizer.model").read_bytes() == (hf_dir / "tokenizer.model").read_bytes()

    reloaded = load_model(destination)  # int8 is the default precision
    assert reloaded.source_format == "int8"
    assert original.model.output.residual is not None  # (compared below with every buffer)
    assert reloaded.tokenizer_path == destination / "tokenizer.model"
    assert reloaded.config == original.config
    before, after = model_tensors(original), model_tensors(reloaded)
    assert before.keys() == after.keys()
    int8_layers = [name for name, module in reloaded.model.named_modules() if isinstance(module, Int8Linear)]
    assert len(int8_layers) == 7 * original.config.n_layers + 1  # wq wk wv wo w1 w2 w3 per layer + output
    modules = dict(reloaded.model.named_modules())
    for name in int8_layers:
        weight, scale = modules[name].quantized()
        assert weight.dtype == torch.int8 and scale.dtype == torch.float32
        assert modules[name].group_size == DEFAULT_GROUP_SIZE and meta["group_size"] == DEFAULT_GROUP_SIZE
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype and torch.equal(after[name], tensor), name
    assert torch.equal(our_logits(reloaded, STORIES_TOKENS), our_logits(original, STORIES_TOKENS))

    expect_error(destination, CheckpointError, str(destination), "int8", "fp32")


@pytest.mark.parametrize(("edit", "fragment"), [
    (lambda t: t.update({"layers.0.attention.wq.residual": t["output.residual"][:64].clone()}),
     "unexpected tensor 'layers.0.attention.wq.residual'"),
    (lambda t: t.pop("output.residual_scale"), "unexpected tensor 'output.residual'"),
    (lambda t: t.update({"output.residual": t["output.residual"][:, :16].contiguous()}), "tensor 'output.residual'"),
])
def test_an_int8_checkpoint_refuses_a_residual_that_is_not_the_heads(stories_dirs: tuple[Path, Path], tmp_path: Path,
                                                                      edit: Callable, fragment: str) -> None:
    destination = save_int8_checkpoint(load_model(stories_dirs[0], "int8", quantizer="rtn"), tmp_path / "int8")
    assert load_model(destination).model.output.residual is not None  # rounding to nearest keeps it too
    rewrite_safetensors(destination / "model.safetensors", edit)
    expect_error(destination, CheckpointError, fragment, precision="int8")


def sixteen_bit_copy(hf_dir: Path, destination: Path, dtype: torch.dtype) -> Path:
    shutil.copytree(hf_dir, destination)
    weights = destination / "model.safetensors"
    save_file({name: tensor.to(dtype) for name, tensor in load_file(weights).items()}, weights)
    return destination


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_16_bit_checkpoint_keeps_its_embedding_table_16_bit(stories_dirs: tuple[Path, Path], tmp_path: Path,
                                                               dtype: torch.dtype) -> None:
    # a lookup table, never multiplied: each row is widened to fp32 exactly, so the logits cannot change, and the
    # 7B's table takes 0.26 GB instead of 0.52
    folder = sixteen_bit_copy(stories_dirs[0], tmp_path / "sixteen", dtype)
    source = load_file(folder / "model.safetensors")["model.embed_tokens.weight"]
    for precision in ("int8", "fp32"):
        loaded = load_model(folder, precision, quantizer="rtn")
        table = loaded.model.tok_embeddings.weight
        assert table.dtype == dtype and torch.equal(table, source)
        logits = our_logits(loaded, STORIES_TOKENS)
        loaded.model.tok_embeddings.weight = torch.nn.Parameter(table.float(), requires_grad=False)
        assert torch.equal(our_logits(loaded, STORIES_TOKENS), logits)
    # the int8 checkpoint keeps it as it is, and every other full-precision tensor stays fp32
    reloaded = load_model(save_int8_checkpoint(load_model(folder, "int8", quantizer="rtn"), tmp_path / "int8"))
    assert reloaded.model.tok_embeddings.weight.dtype == dtype
    assert {t.dtype for n, t in reloaded.model.named_parameters() if n != "tok_embeddings.weight"} == {torch.float32}
    assert load_model(stories_dirs[0], "int8", quantizer="rtn").model.tok_embeddings.weight.dtype == torch.float32


@pytest.mark.parametrize("group_size", [0, 64, 128])
def test_int8_checkpoint_keeps_its_group_size(stories_dirs: tuple[Path, Path], tmp_path: Path, group_size: int) -> None:
    original = load_model(stories_dirs[0], "int8", group_size=group_size)
    destination = save_int8_checkpoint(original, tmp_path / "int8")
    assert json.loads((destination / "int8serve.json").read_text())["group_size"] == group_size
    reloaded = load_model(destination, group_size=32)  # a pre-quantized checkpoint keeps its own scheme
    layers = [m for m in reloaded.model.modules() if isinstance(m, Int8Linear)]
    # stories260K's widths: 64 inputs (one group of 64 or 128 is the whole row: per channel) and 172
    assert {m.group_size for m in layers if m.in_features == 172} == {group_size}
    assert torch.equal(our_logits(reloaded, STORIES_TOKENS), our_logits(original, STORIES_TOKENS))


def test_a_version_1_per_channel_checkpoint_still_loads(stories_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    original = load_model(stories_dirs[0], "int8", group_size=0)
    destination = save_int8_checkpoint(original, tmp_path / "int8")
    meta = json.loads((destination / "int8serve.json").read_text())
    del meta["group_size"]
    meta["version"] = 1  # as written before group-wise scales: scales [N]
    (destination / "int8serve.json").write_text(json.dumps(meta))
    reloaded = load_model(destination)
    assert all(m.group_size == 0 for m in reloaded.model.modules() if isinstance(m, Int8Linear))
    assert torch.equal(our_logits(reloaded, STORIES_TOKENS), our_logits(original, STORIES_TOKENS))


def test_int8_checkpoint_never_overwrites_a_model(stories_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    """Not the folder the model came from (its weights are mapped), and not a folder holding a model unless asked."""
    source = tmp_path / "source"
    shutil.copytree(stories_dirs[0], source)
    before = {f.name: f.read_bytes() for f in source.iterdir()}
    loaded = load_model(source, "int8")
    with pytest.raises(ValueError, match="where the model was loaded from"):
        save_int8_checkpoint(loaded, source, overwrite=True)
    assert {f.name: f.read_bytes() for f in source.iterdir()} == before
    destination = save_int8_checkpoint(loaded, tmp_path / "int8")
    written = (destination / "model.safetensors").read_bytes()
    with pytest.raises(FileExistsError, match="already holds a model"):
        save_int8_checkpoint(loaded, destination)
    (destination / "model.safetensors").write_bytes(b"stale")
    assert save_int8_checkpoint(loaded, destination, overwrite=True) == destination
    assert (destination / "model.safetensors").read_bytes() == written
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file"):
        save_int8_checkpoint(loaded, tmp_path / "file")


def test_int8_checkpoint_needs_an_int8_model(stories_dirs: tuple[Path, Path], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="int8"):
        save_int8_checkpoint(load_model(stories_dirs[0], "fp32"), tmp_path / "out")


def test_int8_checkpoint_of_another_format_version_is_refused(hf_folder: Path, tmp_path: Path) -> None:
    destination = save_int8_checkpoint(load_model(hf_folder, "int8"), tmp_path / "int8")
    assert not (destination / "tokenizer.model").exists()  # the source had none
    meta = json.loads((destination / "int8serve.json").read_text())
    meta["version"] = 99
    (destination / "int8serve.json").write_text(json.dumps(meta))
    expect_error(destination, CheckpointError, str(destination / "int8serve.json"), "99", precision="int8")


# --- 6. int8 loading streams: peak memory stays far below the fp32 checkpoint ----------------------------------------

# Measured in a fresh interpreter after imports and after loading a tiny model once (so that torch's one-off
# first-use allocations are not counted). MALLOC_MMAP_THRESHOLD_ pins glibc's mmap threshold: without it glibc
# raises the threshold after the first large free and later multi-megabyte temporaries stay in the brk heap, which
# makes the peak vary by ~150 MB from run to run whatever the loader does.
_PEAK_SCRIPT = textwrap.dedent("""
    import json, sys
    from int8serve.engine.loader import load_model

    def status_kib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))

    load_model(sys.argv[1], "int8")
    # Peak RSS of this process only: ru_maxrss would include the parent's RSS at fork, so reset the
    # high-water mark (VmHWM) instead and read it after the load.
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = status_kib("VmRSS")
    loaded = load_model(sys.argv[2], "int8")
    peak = status_kib("VmHWM")
    tensors = [*loaded.model.parameters(), *loaded.model.buffers()]
    print(json.dumps({"growth": (peak - before) * 1024,
                      "model_bytes": sum(t.numel() * t.element_size() for t in tensors)}))
""")


def write_big_random_hf(folder: Path) -> tuple[int, int]:
    """A ~210 MB fp32 HF folder (hidden 1024, 4 layers, intermediate 2816, vocab 4000); (file size, largest tensor)."""
    dim, layers, hidden, vocab, n_heads, n_kv_heads = 1024, 4, 2816, 4000, 16, 4
    kv = n_kv_heads * dim // n_heads
    shapes = {"model.embed_tokens.weight": (vocab, dim), "model.norm.weight": (dim,), "lm_head.weight": (vocab, dim)}
    for i in range(layers):
        prefix = f"model.layers.{i}."
        shapes |= {prefix + "self_attn.q_proj.weight": (dim, dim), prefix + "self_attn.k_proj.weight": (kv, dim),
                   prefix + "self_attn.v_proj.weight": (kv, dim), prefix + "self_attn.o_proj.weight": (dim, dim),
                   prefix + "mlp.gate_proj.weight": (hidden, dim), prefix + "mlp.up_proj.weight": (hidden, dim),
                   prefix + "mlp.down_proj.weight": (dim, hidden), prefix + "input_layernorm.weight": (dim,),
                   prefix + "post_attention_layernorm.weight": (dim,)}
    generator = torch.Generator().manual_seed(0)
    save_file({name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()},
              str(folder / "model.safetensors"))
    config = {"model_type": "llama", "hidden_size": dim, "num_hidden_layers": layers, "num_attention_heads": n_heads,
              "num_key_value_heads": n_kv_heads, "intermediate_size": hidden, "vocab_size": vocab,
              "max_position_embeddings": 128}
    (folder / "config.json").write_text(json.dumps(config))
    largest = max(torch.Size(shape).numel() for shape in shapes.values()) * 4
    return (folder / "model.safetensors").stat().st_size, largest


@pytest.mark.parametrize("file_format", ["safetensors", "bin"])
def test_int8_loading_peak_memory_is_streaming(hf_folder: Path, tmp_path: Path, file_format: str) -> None:
    big = tmp_path / "big"
    big.mkdir()
    file_size, largest = write_big_random_hf(big)
    warm_up = hf_folder
    if file_format == "bin":
        # The warm-up load reads the same format, so that what the .bin path maps or allocates on first use (as
        # torch's first-use allocations above) is in the baseline. With a safetensors warm-up this run measured
        # 177-186 MB instead of ~117 for a quarter of an hour on 2026-12-06 (a Zen 4, the same code before and
        # after), then never again; the cause was not pinned down (not torch.load's mappings: each is gone once its
        # tensor is copied)
        warm_up = tmp_path / "warm-up"
        shutil.copytree(hf_folder, warm_up)
        for folder in (warm_up, big):
            torch.save(load_file(folder / "model.safetensors"), folder / "pytorch_model.bin")
            (folder / "model.safetensors").unlink()
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(warm_up), str(big)], env=env,
                            capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    measured = json.loads(result.stdout.strip().splitlines()[-1])
    # The int8 model itself, the quantization temporaries of the largest tensor (a float copy and the rounded
    # division), and some slack for the allocator and the interpreter.
    budget = measured["model_bytes"] + 2 * largest + 32 * 2**20
    assert budget < 0.7 * file_size  # otherwise the test could not tell streaming from holding the fp32 model
    assert measured["growth"] < budget, (
        f"peak RSS grew by {measured['growth'] / 2**20:.0f} MiB while loading a {file_size / 2**20:.0f} MiB fp32 "
        f"checkpoint into a {measured['model_bytes'] / 2**20:.0f} MiB int8 model (budget {budget / 2**20:.0f} MiB)")


# --- 7. clear errors -----------------------------------------------------------------------------------------------


def copy_folder(source: Path, tmp_path: Path) -> Path:
    destination = tmp_path / "model"
    shutil.copytree(source, destination)
    return destination


def edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            del config[key]
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def test_missing_folder(tmp_path: Path) -> None:
    expect_error(tmp_path / "nope", CheckpointError, str(tmp_path / "nope"), "no such")


def test_path_is_a_file(hf_folder: Path) -> None:
    expect_error(hf_folder / "config.json", CheckpointError, str(hf_folder / "config.json"), "folder")


def test_folder_without_config(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(b"")
    expect_error(tmp_path, CheckpointError, str(tmp_path), "config.json", "params.json")


def test_config_with_invalid_json(hf_folder: Path, tmp_path: Path) -> None:
    folder = copy_folder(hf_folder, tmp_path)
    (folder / "config.json").write_text('{"hidden_size": 64,')
    expect_error(folder, ConfigError, str(folder / "config.json"), "JSON")


def test_config_without_hidden_size(hf_folder: Path, tmp_path: Path) -> None:
    folder = copy_folder(hf_folder, tmp_path)
    edit_config(folder, hidden_size=None)
    expect_error(folder, ConfigError, str(folder / "config.json"), "hidden_size")


def test_config_of_another_architecture(hf_folder: Path, tmp_path: Path) -> None:
    folder = copy_folder(hf_folder, tmp_path)
    edit_config(folder, model_type="mistral")
    expect_error(folder, ConfigError, str(folder / "config.json"), "mistral", "llama")


def test_config_without_weights(hf_folder: Path, tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copyfile(hf_folder / "config.json", folder / "config.json")
    expect_error(folder, CheckpointError, str(folder), "model.safetensors", "pytorch_model.bin")


def test_corrupt_safetensors(hf_folder: Path, tmp_path: Path) -> None:
    folder = copy_folder(hf_folder, tmp_path)
    (folder / "model.safetensors").write_bytes(os.urandom(4096))
    expect_error(folder, CheckpointError, str(folder / "model.safetensors"), "safetensors")


def test_truncated_safetensors(hf_folder: Path, tmp_path: Path) -> None:
    folder = copy_folder(hf_folder, tmp_path)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    expect_error(folder, CheckpointError, str(folder / "model.safetensors"))


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_bin(legacy: bool, hf_model: LlamaForCausalLM, tmp_path: Path) -> None:
    write_hf_bin(hf_model, tmp_path, legacy=legacy)
    file = tmp_path / "pytorch_model.bin"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    expect_error(tmp_path, CheckpointError, str(file), "not a readable PyTorch checkpoint")


def test_tensor_shape_differs_from_config(hf_folder: Path, tmp_path: Path) -> None:
    folder = copy_folder(hf_folder, tmp_path)
    edit_config(folder, intermediate_size=128)  # the weights are 192 wide
    message = expect_error(folder, CheckpointError, str(folder))
    names = re.findall(r"'([\w.]+)'", message)
    assert any(re.search(r"(mlp\.(gate|up|down)_proj|feed_forward\.w[123])\.weight$", name) for name in names), message
    assert re.search(r"\b192\b", message) and re.search(r"\b128\b", message), message


@pytest.mark.parametrize("precision", ["fp32", "int8"])
@pytest.mark.parametrize(("deleted", "names"), [
    ("model.layers.1.self_attn.v_proj.weight", ("layers.1.attention.wv", "model.layers.1.self_attn.v_proj")),
    ("lm_head.weight", ("output.weight", "lm_head.weight")),
    ("model.norm.weight", ("norm.weight",)),
])
def test_missing_tensor(deleted: str, names: tuple[str, ...], precision: str, hf_folder: Path,
                        tmp_path: Path) -> None:
    folder = copy_folder(hf_folder, tmp_path)
    rewrite_safetensors(folder / "model.safetensors", lambda tensors: tensors.pop(deleted))
    message = expect_error(folder, CheckpointError, str(folder), precision=precision)
    assert any(name in message for name in names), message


@pytest.mark.parametrize(("extra", "names"), [
    ("model.layers.0.self_attn.q_proj.bias", ("model.layers.0.self_attn.q_proj.bias",)),
    ("model.layers.2.mlp.up_proj.weight", ("model.layers.2.mlp.up_proj.weight", "layers.2.feed_forward.w3.weight")),
    ("model.vision_tower.weight", ("model.vision_tower.weight",)),
])
def test_unexpected_tensor(extra: str, names: tuple[str, ...], hf_folder: Path, tmp_path: Path) -> None:
    folder = copy_folder(hf_folder, tmp_path)
    rewrite_safetensors(folder / "model.safetensors", lambda tensors: tensors.update({extra: torch.zeros(HIDDEN, DIM)}))
    message = expect_error(folder, CheckpointError, str(folder), "unexpected")
    assert any(name in message for name in names), message


def test_shard_index_names_a_missing_file(hf_sharded_folder: Path, tmp_path: Path) -> None:
    folder = copy_folder(hf_sharded_folder, tmp_path)
    shard = sorted(folder.glob("model-*-of-*.safetensors"))[1]
    shard.unlink()
    expect_error(folder, CheckpointError, str(folder / "model.safetensors.index.json"), shard.name)


def test_shard_index_with_invalid_json(hf_sharded_folder: Path, tmp_path: Path) -> None:
    folder = copy_folder(hf_sharded_folder, tmp_path)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": ')
    expect_error(folder, CheckpointError, str(folder / "model.safetensors.index.json"))


class _CreatesFileWhenUnpickled:
    """Unpickling this object runs open(marker, "w"): a stand-in for arbitrary code in a malicious checkpoint."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("layout", ["hf", "meta"])
def test_pickled_code_is_refused_not_run(layout: str, hf_model: LlamaForCausalLM, hf_folder: Path,
                                         tmp_path: Path) -> None:
    folder = tmp_path / "model"
    folder.mkdir()
    marker = tmp_path / "marker"
    if layout == "hf":
        shutil.copyfile(hf_folder / "config.json", folder / "config.json")
        file = folder / "pytorch_model.bin"
        tensors = state_dict_of(hf_model)
    else:
        (folder / "params.json").write_text(json.dumps(meta_params(hf_model)))
        file = folder / "consolidated.00.pth"
        tensors = hf_to_meta_state(hf_model)
    torch.save({**tensors, "extra": {"payload": _CreatesFileWhenUnpickled(marker)}}, file)
    expect_error(folder, CheckpointError, str(file))
    assert not marker.exists(), "the checkpoint's pickled code was executed"
    # The payload is live: an unsafe load does run it (so the check above is meaningful).
    torch.load(file, weights_only=False)
    assert marker.exists()


@pytest.mark.usefixtures("umask_022")
def test_a_checkpoint_is_readable_by_other_users(stories_hf: Path, tmp_path: Path) -> None:
    """safetensors' save_file wrote model.safetensors 0600: a checkpoint quantized by one user could not be served by
    another."""
    destination = save_int8_checkpoint(load_model(stories_hf, "int8", quantizer="rtn"), tmp_path / "int8")
    assert set(modes(destination).items()) == {(".", "755"), *((p.name, "644") for p in destination.iterdir())}
