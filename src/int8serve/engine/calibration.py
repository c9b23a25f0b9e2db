"""Calibrated quantization: the model's blocks run on a calibration text, one at a time, and GPTQ quantizes each.

GPTQ (gptq.py) needs, for each linear layer, the covariance of the inputs it sees. They come from running the
full-precision model over a calibration text: the package's own `demo_text.txt` (our own prose, in no benchmark
corpus, so accuracy measured on tinystories.txt or sotu.txt is measured on text the quantizer never saw), cut into
windows of `WINDOW` tokens. The loader reads one transformer block's full-precision weights at a time, runs the
calibration hidden states through it (fp32), quantizes its seven linear layers into the int8 model, and moves on
with the block's full-precision outputs: peak memory is the int8 model plus one block, as when quantizing without
calibration. The block keeps the checkpoint's 16-bit weights and widens one at a time as it computes (exactly: every
fp16 and bf16 value is an fp32 value), half the memory of an fp32 block for the same outputs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from tqdm import tqdm

from .config import ModelConfig
from .gptq import InputCovariance, InverseHessianFactor, quantize_gptq
from .int8 import Int8Linear
from .model import Transformer, TransformerBlock

__all__ = ["CALIBRATION_TOKENS", "WINDOW", "calibration_windows", "quantize_blocks"]

log = logging.getLogger(__name__)

CALIBRATION_TOKENS = 2048  # measured on stories260K: see docs/benchmarks.md "int8 accuracy"
WINDOW = 256
MERGE_BYTES = 64 << 20  # layers sharing an input are quantized in one loop while their fp32 copy fits in this
# The linear layers of a block, by the input they share (one covariance each).
_INPUTS = {"attention.wq": "attention_in", "attention.wk": "attention_in", "attention.wv": "attention_in",
           "attention.wo": "attention_out", "feed_forward.w1": "ffn_in", "feed_forward.w3": "ffn_in",
           "feed_forward.w2": "ffn_hidden"}

WeightOf = Callable[[str], Tensor]  # an internal weight name ("layers.3.attention.wq.weight") -> full precision


def calibration_text() -> str:
    return (Path(__file__).with_name("demo_text.txt")).read_text(encoding="utf-8")


def calibration_windows(encode: Callable[[str], list[int]], bos_id: int | None, tokens: int = CALIBRATION_TOKENS,
                        window: int = WINDOW) -> Tensor:
    """The calibration text as int64 [S, window] (each window starts with BOS where the model has one)."""
    ids = encode(calibration_text())
    body = window - (bos_id is not None)
    count = max(1, min(tokens, len(ids)) // window)
    rows = [ids[i * body:(i + 1) * body] for i in range(count)]
    rows = [([bos_id] if bos_id is not None else []) + row for row in rows if len(row) == body]
    if not rows:
        raise ValueError(f"the calibration text gives {len(ids)} tokens, fewer than a window of {window}")
    return torch.tensor(rows, dtype=torch.int64)


def quantize_blocks(model: Transformer, weight_of: WeightOf, windows: Tensor, group_size: int,
                    progress: bool = False, after_block: Callable[[], None] | None = None) -> None:
    """Quantize every int8 layer of `model` (its embeddings and norms already loaded) with GPTQ on `windows`;
    `after_block` runs once each block's temporaries are freed (the loader gives the heap back to the system)."""
    config = model.config
    with torch.inference_mode():
        hidden = model.tok_embeddings(windows).float()  # [S, T, dim]
    positions = torch.arange(windows.shape[1])
    model.cover_positions(windows.shape[1])
    cos, sin = model.rope_cos[positions][None], model.rope_sin[positions][None]  # [1, T, D]
    batch = windows.shape[0]
    cos, sin = cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)
    for index in tqdm(range(config.n_layers), desc="quantizing to int8 (GPTQ)", unit="layer", disable=not progress,
                      leave=False):
        block = _full_precision_block(config, model.layers[index],
                                      lambda name, prefix=f"layers.{index}.": weight_of(prefix + name))
        covariances = _record_inputs(block)
        cache = torch.empty(batch, config.n_kv_heads, windows.shape[1], config.head_dim)
        cache_v = torch.empty_like(cache)
        with torch.inference_mode():
            hidden = block(hidden, cos, sin, cache, cache_v, range(batch), [0] * batch)
        for hook in covariances.pop("hooks"):
            hook.remove()
        for key, names in _by_input(model.layers[index]).items():
            factor = InverseHessianFactor.taking(covariances.pop(key))
            _quantize_sharing(block, model.layers[index], names, factor, group_size)
            del factor
        del block, covariances
        if after_block is not None:
            after_block()
    if isinstance(model.output, Int8Linear) and any(t.is_meta for t in model.output.buffers()):
        head = InputCovariance(config.dim)
        with torch.inference_mode():
            head.add(model.norm(hidden))
        weight = weight_of("output.weight")
        model.output.set_quantized(*quantize_gptq(weight, head.matrix, group_size), group_size)
        model.output.set_residual(weight)  # the refined logits come from ~12-bit rows (Int8Linear.set_residual)


def _by_input(block: nn.Module) -> dict[str, list[str]]:
    """The int8 layers of `block` by the input they share, in the block's order."""
    shared: dict[str, list[str]] = {}
    for name, module in block.named_modules():
        if isinstance(module, Int8Linear):
            shared.setdefault(_INPUTS[name], []).append(name)
    return shared


def _quantize_sharing(block: nn.Module, int8_block: nn.Module, names: list[str], factor: InverseHessianFactor,
                      group_size: int) -> None:
    """Quantize the layers `names` of `block`, which share an input and so `factor`, into `int8_block`: together
    when their fp32 copy is small (one column loop instead of several: the same bits, since GPTQ treats each output
    row on its own, and a loop of small layers is mostly the fixed cost of each torch op), else one at a time, each
    full-precision weight freed as soon as it is quantized (a 7B block's first-start memory)."""
    layers = [(name, _module(block, name)) for name in names]
    together = sum(full.weight.numel() for _, full in layers) * 4 <= MERGE_BYTES
    for group in [layers] if together else [[layer] for layer in layers]:
        weight = torch.cat([full.weight for _, full in group]) if len(group) > 1 else group[0][1].weight
        q, scales = quantize_gptq(weight, factor, group_size)
        del weight
        rows = [full.weight.shape[0] for _, full in group]
        for (name, full), part_q, part_scales in zip(group, q.split(rows), scales.split(rows), strict=True):
            _module(int8_block, name).set_quantized(part_q.contiguous(), part_scales.contiguous(), group_size)
            full.weight = None  # its full-precision copy is done with: free it before the next layer


def _module(block: nn.Module, name: str) -> nn.Module:
    return block.get_submodule(name)


class _WideningLinear(nn.Linear):
    """A linear layer that keeps its weight in the checkpoint's precision and computes in its input's (fp32)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype))


def _full_precision_block(config: ModelConfig, int8_block: TransformerBlock, weight_of: Callable[[str], Tensor]
                          ) -> TransformerBlock:
    """A TransformerBlock computing in fp32 with `int8_block`'s norms and the checkpoint's full-precision linear
    weights, kept in their own precision (16 or 32 bits)."""
    with torch.device("meta"):
        block = TransformerBlock(config, lambda i, o: _WideningLinear(i, o, bias=False))
    for name in ("attention_norm", "ffn_norm"):
        setattr(block, name, getattr(int8_block, name))
    for name in _INPUTS:
        linear = _module(block, name)
        weight = weight_of(f"{name}.weight")
        if not weight.is_floating_point():
            raise ValueError(f"{name}.weight is {weight.dtype}, not a full-precision weight")
        if tuple(weight.shape) != (linear.out_features, linear.in_features):
            raise ValueError(f"{name}.weight has shape {tuple(weight.shape)}, expected "
                             f"{(linear.out_features, linear.in_features)}")
        linear.weight = nn.Parameter(weight, requires_grad=False)
    return block


def _record_inputs(block: TransformerBlock) -> dict:
    """Forward hooks adding each shared input of `block`'s linear layers to its covariance (once per input)."""
    covariances: dict = {"hooks": []}
    for name, key in _INPUTS.items():
        if key in covariances:
            continue
        linear = _module(block, name)
        covariance = covariances[key] = InputCovariance(linear.in_features)
        covariances["hooks"].append(linear.register_forward_hook(
            lambda module, inputs, output, c=covariance: c.add(inputs[0])))
    return covariances
