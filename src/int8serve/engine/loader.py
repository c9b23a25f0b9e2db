"""Load a Llama 2 checkpoint into a `Transformer`, quantizing to int8 on the way in.

Three folder formats are recognised, by the file that describes them:
- `int8serve.json`: a pre-quantized int8 checkpoint written by `int8serve quantize` (fast start);
- `params.json`: Meta's original layout (`consolidated.NN.pth`, interleaved rotary pairs in q/k);
- `config.json`: a Hugging Face `LlamaForCausalLM` folder (safetensors or .bin, single or sharded).

Which format a folder is, where its tokenizer is and whether its config describes its weights are decided in
model_files.py, which `serve` also runs over every model before it loads any.

The model is built on the meta device and each weight is read, converted and assigned one at a time, so peak
memory stays near the final model's size plus one layer.
"""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm import tqdm

from . import calibration
from .cache_files import usual_mode
from .config import ModelConfig, config_from_hf, config_from_meta, read_json
from .errors import CheckpointError
from .int8 import Int8Linear, group_size_of, quantize
from .model import Precision, Transformer
from .model_files import (
    IGNORED,
    INT8_FORMAT,
    INT8_FORMAT_VERSION,
    PACKED_FORMAT_VERSION,
    READABLE_VERSIONS,
    check_config_fits,
    check_int8_format,
    detect_format,
    find_tokenizer,
    hf_to_internal,
    int8_config,
)
from .quant_options import DEFAULT_GROUP_SIZE, DEFAULT_QUANTIZER, QUANTIZERS
from .sources import MetaShardsSource, SafetensorsSource, TensorSource, hf_weight_files
from .tokenizer import load_tokenizer

log = logging.getLogger(__name__)


# The token embeddings are a lookup table, never multiplied: a 16-bit source keeps its dtype (each looked-up row
# is widened to fp32 exactly), which saves 0.26 GB of the 7B's memory against widening the table to fp32.
# Every other full-precision tensor (norms, a full-precision model's layers) is fp32.
EMBEDDING_DTYPES = (torch.float16, torch.bfloat16, torch.float32)



@dataclass
class LoadedModel:
    model: Transformer
    config: ModelConfig
    tokenizer_path: Path | None
    source_format: str  # "hf", "meta", "int8" or "gguf"
    path: Path


def unpermute_meta_rotary(weight: Tensor, n_heads: int) -> Tensor:
    """Meta q/k rows (interleaved rotary pairs) -> Hugging Face order (first half, second half per head)."""
    out_features, in_features = weight.shape
    return (weight.view(n_heads, out_features // n_heads // 2, 2, in_features)
            .transpose(1, 2).reshape(out_features, in_features))


def load_model(path: str | Path, precision: Precision = "int8", progress: bool = False,
               group_size: int = DEFAULT_GROUP_SIZE, quantizer: str = DEFAULT_QUANTIZER) -> LoadedModel:
    """Load the checkpoint folder (or .gguf file) at `path` as an fp32 reference or an int8 model.

    group_size: the int8 scheme when quantizing on load (a scale per `group_size` inputs, 0 = per output channel);
    quantizer: how (QUANTIZERS); a pre-quantized checkpoint keeps the scheme it was written with.
    """
    if quantizer not in QUANTIZERS:
        raise ValueError(f"quantizer must be one of {', '.join(QUANTIZERS)}, got {quantizer!r}")
    folder = Path(path)
    if folder.suffix == ".gguf" and folder.is_file():
        from .gguf_loader import load_gguf

        return load_gguf(folder, precision, progress, group_size=group_size, quantizer=quantizer)
    kind = detect_format(folder)
    tokenizer = find_tokenizer(folder)
    if kind == "int8":
        if precision != "int8":
            raise CheckpointError(f"{folder}: an int8 checkpoint holds no full-precision weights; load the "
                                  "original checkpoint for --dtype fp32")
        meta = read_json(folder / "int8serve.json")
        if meta.get("format") == INT8_FORMAT and meta.get("version") == PACKED_FORMAT_VERSION:
            from .packed_checkpoint import load_packed

            return load_packed(folder, meta)
        config, source, rename = _open_int8(folder, meta)
    elif kind == "meta":
        config, source, rename = _open_meta(folder, tokenizer)
    else:
        config, source, rename = _open_hf(folder)
    check_config_fits(config, shapes_by_model_name(source, hf_to_internal if kind == "hf" else str), folder)
    with torch.device("meta"):
        model = Transformer(config, precision)
    quantizes = precision == "int8" and quantizer == "gptq" and kind != "int8"  # int8 checkpoints are int8 already
    windows = calibration_for(tokenizer, folder) if quantizes else None
    _fill(model, source, rename, folder, progress, group_size, windows)
    if kind == "int8":
        _attach_residuals(model, source, folder)
    model.stack_projections()  # decode reads q, k, v (gate, up) in one kernel call
    return LoadedModel(model.eval(), config, tokenizer, kind, folder)


def shapes_by_model_name(source: TensorSource, internal: Callable[[str], str | None]) -> dict[str, tuple[int, ...]]:
    """Each checkpoint tensor's shape as the file's headers say, by its name in the model (`internal`)."""
    return {name: source.shape(original) for original in source.names() if (name := internal(original))}


def calibration_for(tokenizer: Path | None, folder: Path) -> Tensor | None:
    """GPTQ's calibration windows in the model's own tokens, or None (said in the log) without a tokenizer."""
    if tokenizer is None:
        log.warning("%s: no tokenizer (tokenizer.model or tokenizer.json) beside the weights, so no calibration "
                    "text: quantizing by rounding each "
                    "weight to its nearest int8 step (the 'rtn' quantizer)", folder)
        return None
    tokens = load_tokenizer(tokenizer)  # SentencePiece or byte-level BPE; BOS first where the model has one
    return calibration.calibration_windows(tokens.encode, tokens.bos_id if tokens.add_bos else None)


# A checkpoint weight: a full-precision tensor, or an (int8 weight, scale) pair from a pre-quantized checkpoint.
Weight = Tensor | tuple[Tensor, Tensor]
Renamer = Callable[[str, Tensor], Iterator[tuple[str, Weight]]]


def _open_hf(folder: Path) -> tuple[ModelConfig, TensorSource, Renamer]:
    config = config_from_hf(folder / "config.json")

    def rename(name: str, tensor: Tensor) -> Iterator[tuple[str, Weight]]:
        internal = hf_to_internal(name)
        if internal is None:
            raise CheckpointError(f"{folder}: unexpected tensor '{name}' for a Llama model")
        yield internal, tensor

    return config, hf_weight_files(folder), rename


def _open_meta(folder: Path, tokenizer: Path | None) -> tuple[ModelConfig, TensorSource, Renamer]:
    shards = sorted(folder.glob("consolidated.*.pth"))
    if not shards:
        raise CheckpointError(f"{folder}: params.json but no consolidated.*.pth weights")
    source = MetaShardsSource(shards)
    vocab = load_tokenizer(tokenizer).vocab_size if tokenizer and tokenizer.suffix == ".model" else None
    config = config_from_meta(folder / "params.json", vocab, tied="output.weight" not in source.names())
    heads = {"wq": config.n_heads, "wk": config.n_kv_heads}

    def rename(name: str, tensor: Tensor) -> Iterator[tuple[str, Weight]]:
        match = re.fullmatch(r"layers\.\d+\.attention\.(wq|wk)\.weight", name)
        yield name, unpermute_meta_rotary(tensor, heads[match.group(1)]) if match else tensor

    return config, source, rename


def _open_int8(folder: Path, meta: dict) -> tuple[ModelConfig, TensorSource, Renamer]:
    check_int8_format(folder, meta, READABLE_VERSIONS)
    if not (folder / "model.safetensors").is_file():
        raise CheckpointError(f"{folder}: int8serve.json but no model.safetensors")
    config = int8_config(folder, meta)
    source = SafetensorsSource([folder / "model.safetensors"])

    def rename(name: str, tensor: Tensor) -> Iterator[tuple[str, Weight]]:
        if name.endswith((".scale", RESIDUAL, RESIDUAL_SCALE)):
            return  # assigned together with its int8 weight; a residual once the weights are in (_attach_residuals)
        if tensor.dtype != torch.int8:
            yield name, tensor
            return
        scale_name = name.removesuffix("weight") + "scale"
        if scale_name not in source.names():
            raise CheckpointError(f"{folder}: int8 tensor '{name}' has no '{scale_name}'")
        yield name, (tensor, source.get(scale_name))

    return config, source, rename


# An int8 layer's residual in a checkpoint (Int8Linear.set_residual: the output head's rounding error in 4 bits, with
# scales), stored as "<layer>.residual" and "<layer>.residual_scale"; optional (older checkpoints have none).
RESIDUAL, RESIDUAL_SCALE = ".residual", ".residual_scale"


def _attach_residuals(model: Transformer, source: TensorSource, folder: Path) -> None:
    """Give each int8 layer the residual its checkpoint stores (after its weight: set_quantized drops a residual)."""
    modules = dict(model.named_modules())
    names = set(source.names())
    for name in sorted(n for n in names if n.endswith(RESIDUAL)):
        layer = modules.get(name.removesuffix(RESIDUAL))
        scale_name = name.removesuffix(RESIDUAL) + RESIDUAL_SCALE
        if not isinstance(layer, Int8Linear) or not layer.refine_top or scale_name not in names:
            raise CheckpointError(f"{folder}: unexpected tensor '{name}' (a residual is the output head's, beside "
                                  f"its '{scale_name}')")
        try:
            layer.set_residual_quantized(source.get(name), source.get(scale_name))
        except ValueError as error:
            raise CheckpointError(f"{folder}: tensor '{name}': {error}") from error


def _fill(model: Transformer, source: TensorSource, rename: Renamer, folder: Path, progress: bool,
          group_size: int, calibration_windows: Tensor | None = None) -> None:
    """Assign every checkpoint tensor to the model, then check that nothing is missing.

    With `calibration_windows`, the full-precision weights of int8 layers are left for GPTQ (calibration.py), which
    reads them again one block at a time once the embeddings and norms are in.
    """
    names = [n for n in source.names() if not IGNORED.fullmatch(n)]
    modules = dict(model.named_modules())
    deferred: dict[str, str] = {}  # internal name of a full-precision int8-layer weight -> its checkpoint name
    desc = "loading weights" if model.precision == "fp32" or calibration_windows is not None else "quantizing to int8"
    for name in tqdm(names, desc=desc, unit="tensor", disable=not progress, leave=False):
        for internal, weight in rename(name, source.get(name)):
            if isinstance(weight, tuple):  # an int8 weight: its scales are what can be NaN
                check_finite(folder, internal.removesuffix("weight") + "scale", weight[1])
            else:
                check_finite(folder, name, weight)
            if calibration_windows is not None and _for_int8_layer(modules, internal, weight):
                _check_shape(modules, internal, weight, folder)
                deferred[internal] = name
            else:
                _assign(modules, internal, weight, folder, group_size)
    if model.config.tie_embeddings and _is_unset(model.output) and not deferred:
        _assign(modules, "output.weight", model.tok_embeddings.weight, folder, group_size)
    if deferred:
        def weight_of(internal: str) -> Tensor:
            if internal == "output.weight" and internal not in deferred:  # tied to the embeddings
                return model.tok_embeddings.weight
            if internal not in deferred:
                raise CheckpointError(f"{folder}: checkpoint has no weights for {internal}")
            return next(w for n, w in rename(deferred[internal], source.get(deferred[internal])) if n == internal)

        calibration.quantize_blocks(model, weight_of, calibration_windows, group_size, progress,
                                    after_block=give_back_freed_memory)
        give_back_freed_memory()
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise CheckpointError(f"{folder}: checkpoint has no weights for {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))


def check_finite(where: Path, name: str, tensor: Tensor) -> None:
    """Refuse a float tensor holding NaN or infinity (a damaged file: 0xff bytes read as NaN): loaded, it would
    make every answer NaN, or stop GPTQ in a failed factorization."""
    if tensor.is_floating_point() and not all_finite(tensor):
        raise CheckpointError(f"{where}: tensor '{name}' holds non-finite values (NaN or infinity): the file is "
                              "damaged")


def all_finite(tensor: Tensor, chunk: int = 1 << 22) -> bool:
    """Whether every value is finite, read a chunk at a time (no temporary the size of the tensor)."""
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(flat[start:start + chunk]).all()) for start in range(0, flat.numel(), chunk))


def _for_int8_layer(modules: dict[str, nn.Module], name: str, weight: Weight) -> bool:
    """A full-precision weight that an int8 layer will quantize."""
    return isinstance(modules.get(name.rpartition(".")[0]), Int8Linear) and not isinstance(weight, tuple)


def _is_unset(module: nn.Module) -> bool:
    return any(t.is_meta for t in [*module.parameters(), *module.buffers()])


def _assign(modules: dict[str, nn.Module], name: str, weight: Weight, folder: Path, group_size: int) -> None:
    module_name, _, kind = name.rpartition(".")
    module = modules.get(module_name)
    if module is None or kind != "weight":
        raise CheckpointError(f"{folder}: unexpected tensor '{name}'")
    _check_shape(modules, name, weight, folder)
    if isinstance(module, Int8Linear):
        if isinstance(weight, tuple):
            try:
                module.set_quantized(weight[0], weight[1], group_size_of(weight[1], module.in_features))
            except ValueError as error:
                raise CheckpointError(f"{folder}: tensor '{name}': {error}") from error
        else:
            module.set_quantized(*quantize(weight, group_size), group_size)
            if module.refine_top:
                module.set_residual(weight)  # the refined logits come from ~12-bit rows (the output head)
            give_back_freed_memory()
    elif isinstance(weight, tuple):
        raise CheckpointError(f"{folder}: tensor '{name}' is int8, but that layer stays in full precision")
    else:
        dtype = weight.dtype if name == "tok_embeddings.weight" and weight.dtype in EMBEDDING_DTYPES else torch.float32
        module.weight = nn.Parameter(weight.to(dtype, copy=True).contiguous(), requires_grad=False)


def _check_shape(modules: dict[str, nn.Module], name: str, weight: Weight, folder: Path) -> None:
    module = modules[name.rpartition(".")[0]]
    tensor = weight[0] if isinstance(weight, tuple) else weight
    expected = (module.out_features, module.in_features) if isinstance(module, Int8Linear) else module.weight.shape
    if tuple(tensor.shape) != tuple(expected):
        raise CheckpointError(f"{folder}: tensor '{name}' has shape {tuple(tensor.shape)}, but the config "
                              f"describes {tuple(expected)}")


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc
        return None


def give_back_freed_memory() -> None:
    """Return the heap's free pages to the system. The temporaries of quantizing one weight are freed between int8
    weights that stay, and glibc keeps such holes resident: a 7B first start peaked at 9.46 GB without this (and
    without writing into one preallocated tensor), 7.57 GB with both; the int8 copy is 7.14 GB."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def save_int8_checkpoint(loaded: LoadedModel, destination: str | Path, overwrite: bool = False) -> Path:
    """Write an int8 model as int8serve.json + model.safetensors (+ tokenizer.model, or tokenizer.json and its
    tokenizer_config.json) for fast loading. A folder that holds a model already is refused (FileExistsError)
    unless `overwrite`; the folder the model was loaded from always is (its weights may be mapped in memory). A
    write that fails raises OSError, and leaves what it wrote: durable.write_whole leaves nothing."""
    if loaded.model.precision != "int8":
        raise ValueError("only an int8 model can be saved as an int8 checkpoint")
    folder = Path(destination)
    _check_checkpoint_destination(folder, loaded.path, overwrite)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, Tensor] = {}
    group_sizes = set()
    for name, module in loaded.model.named_modules():
        if isinstance(module, Int8Linear):
            tensors[f"{name}.weight"], tensors[f"{name}.scale"] = module.quantized()  # read from the packed copy
            if module.residual is not None:
                tensors[name + RESIDUAL], tensors[name + RESIDUAL_SCALE] = module.residual, module.residual_scale
            group_sizes.add(module.group_size)
        elif hasattr(module, "weight") and isinstance(module.weight, nn.Parameter):
            tensors[f"{name}.weight"] = module.weight.data
    _save_safetensors({k: v.contiguous() for k, v in tensors.items()}, folder / "model.safetensors")
    usual_mode(folder / "model.safetensors")  # save_file makes it 0600, the other files 0644
    group_size = max(group_sizes, default=0)
    scheme = f"per group of {group_size} input values" if group_size else "per output channel"
    meta = {"format": INT8_FORMAT, "version": INT8_FORMAT_VERSION, "config": loaded.config.to_dict(),
            "quantization": f"weight-only int8, symmetric, {scheme} (scale = absmax/127, rounded up to bf16)",
            "group_size": group_size, "source": str(loaded.path)}
    (folder / "int8serve.json").write_text(json.dumps(meta, indent=2) + "\n")
    if loaded.tokenizer_path is not None:
        copy_tokenizer(loaded.tokenizer_path, folder)
    return folder


def _save_safetensors(tensors: dict[str, Tensor], file: Path) -> None:
    """save_file, its failure to write (a full disk) raised as the OSError it is: safetensors raises its own error
    type, which callers that handle a failed write (OSError) did not catch."""
    try:
        save_file(tensors, str(file))
    except SafetensorError as err:
        code = re.search(r"\(os error (\d+)\)", str(err))
        if code is None:
            raise OSError(f"{file}: {err}") from err
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(file)) from err


def _check_checkpoint_destination(folder: Path, source: Path, overwrite: bool) -> None:
    target = folder.expanduser().resolve()
    if source.exists() and target == source.expanduser().resolve():
        raise ValueError(f"{folder} is where the model was loaded from ({source}); an int8 checkpoint is written "
                         "to another folder")
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{folder} is a file; an int8 checkpoint is a folder")
    held = [name for name in ("int8serve.json", "model.safetensors") if (target / name).exists()]
    if held and not overwrite:
        raise FileExistsError(f"{folder} already holds a model ({', '.join(held)}); remove it or pass overwrite")


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json")  # what copy_tokenizer may write


def copy_tokenizer(tokenizer: Path, folder: Path) -> None:
    """tokenizer.model, or tokenizer.json with the tokenizer_config.json beside it, into `folder`."""
    for name, source in tokenizer_files(tokenizer).items():
        if source.resolve() != (folder / name).resolve():
            shutil.copyfile(source, folder / name)


def tokenizer_files(tokenizer: Path) -> dict[str, Path]:
    """The files copy_tokenizer copies for `tokenizer`, by their name in the copy: tokenizer.model, or tokenizer.json
    and the tokenizer_config.json beside it (when there is one)."""
    files = {"tokenizer.model": tokenizer}
    if tokenizer.suffix == ".json":
        files = {"tokenizer.json": tokenizer, "tokenizer_config.json": tokenizer.with_name("tokenizer_config.json")}
    return {name: source for name, source in files.items() if source.is_file()}
