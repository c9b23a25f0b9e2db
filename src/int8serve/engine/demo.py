"""The built-in demo model: random weights of the Llama architecture, so that everything runs with no download.

Its output is MEANINGLESS (the weights are random); it exists so that a newcomer can try every command and the
whole API in one step. It is written once as an ordinary Hugging Face folder (config.json, model.safetensors,
tokenizer.model trained from text the package ships) under the cache directory and then loaded through the same
loader as any real checkpoint.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from .cache_files import cache_dir, usual_mode
from .demo_tokenizer import DEMO_VOCAB_SIZE, train_demo_tokenizer

DEMO_VERSION = 1
DEMO_SEED = 1234
DEMO_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 128,
    "intermediate_size": 352,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "num_hidden_layers": 4,
    "vocab_size": DEMO_VOCAB_SIZE,
    "max_position_embeddings": 2048,  # the card's context length
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "torch_dtype": "float32",
}


def demo_model_dir(root: Path | None = None) -> Path:
    """The demo model's folder, made on first use (atomically, so concurrent first uses are safe)."""
    folder = (root or cache_dir()) / f"demo-v{DEMO_VERSION}"
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".demo-", dir=folder.parent))
    try:
        write_demo_model(staging)
        usual_mode(staging, executable=True)  # mkdtemp makes it 0700
        try:
            staging.rename(folder)
        except OSError:  # another process made it first
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def write_demo_model(folder: Path) -> None:
    train_demo_tokenizer(folder)
    (folder / "config.json").write_text(json.dumps(DEMO_CONFIG, indent=2) + "\n")
    save_file(random_hf_weights(DEMO_CONFIG, DEMO_SEED), str(folder / "model.safetensors"))
    usual_mode(folder / "model.safetensors")


def random_hf_weights(config: dict, seed: int) -> dict[str, torch.Tensor]:
    """Seeded random weights with Hugging Face names, scaled so activations stay in a sane range."""
    generator = torch.Generator().manual_seed(seed)
    dim, hidden, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    head_dim = dim // config["num_attention_heads"]
    kv = config["num_key_value_heads"] * head_dim

    def normal(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.02

    weights = {"model.embed_tokens.weight": normal(vocab, dim), "model.norm.weight": torch.ones(dim),
               "lm_head.weight": normal(vocab, dim)}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        weights.update({
            prefix + "self_attn.q_proj.weight": normal(dim, dim),
            prefix + "self_attn.k_proj.weight": normal(kv, dim),
            prefix + "self_attn.v_proj.weight": normal(kv, dim),
            prefix + "self_attn.o_proj.weight": normal(dim, dim),
            prefix + "mlp.gate_proj.weight": normal(hidden, dim),
            prefix + "mlp.up_proj.weight": normal(hidden, dim),
            prefix + "mlp.down_proj.weight": normal(dim, hidden),
            prefix + "input_layernorm.weight": torch.ones(dim),
            prefix + "post_attention_layernorm.weight": torch.ones(dim),
        })
    return weights
