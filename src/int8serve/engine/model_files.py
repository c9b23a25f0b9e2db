"""A model's files checked without reading a tensor: what `int8serve serve` runs over every model before it loads any.

`serve` loads its models one after the other while it already listens, and loading one takes seconds (minutes for a
7B to quantize). A folder that is no model, a config.json that is not JSON or does not describe the weights, a
missing or broken tokenizer or a weight file cut short used to be found only when that model's turn came, after
every model before it had loaded. `check_model_files` reads what describes a model (config.json, params.json or
int8serve.json, the safetensors or GGUF headers, the folder's listing) and builds its tokenizer with the code the
loader and the server build it with (tokenizer.load_tokenizer; a GGUF file's rebuilt from its vocabulary by
gguf_tokenizer.write_tokenizer, into a temporary folder: a fraction of a second for SmolLM2's 49k tokens). It imports
no torch and raises the loader's own errors (CheckpointError, ConfigError, naming the file), so `serve` refuses
such a model in a second, before it listens. What only the tensor data can tell (NaN weights, a damaged .pth or
.bin) is still found while loading.

The loader (loader.py, gguf_loader.py, sources.py) decides the same things with the functions here: which format a
folder is, where its tokenizer is, how checkpoint names map onto the model's, which shard files an index names, and
whether the config describes the weights' shapes. So a model this check passes is one the loader takes, but for
what only loading tells: the tensor data, and the shapes in a .pth or .bin (a pickle, not read without torch). One it
refuses is one the loader refuses too, but for a folder without a tokenizer, which the loader takes (the weights
alone load) and no command does: serve, generate and eval-ppl need it to run the model, and `quantize` runs this
check on its source before loading, so that it never writes a checkpoint that could not be served.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, BinaryIO

from safetensors import SafetensorError, safe_open

from .config import ModelConfig, config_from_hf, config_from_meta, naming, read_json, weight_shapes
from .errors import CheckpointError
from .tensor_names import model_name
from .tokenizer import AnyTokenizer, load_tokenizer

if TYPE_CHECKING:
    from .gguf_file import GGUFFile

__all__ = ["check_config_fits", "check_model_files", "detect_format", "find_tokenizer", "hf_to_internal",
           "hf_weight_paths", "int8_config", "missing_tokenizer", "safetensors_header", "safetensors_shapes",
           "shard_files", "unreadable_safetensors"]

INT8_FORMAT = "int8serve-int8"
INT8_FORMAT_VERSION = 2  # 2: "group_size" (0 = per channel), scales [N] or [N, ceil(K / group_size)]
READABLE_VERSIONS = (1, 2)  # 1: per-channel scales [N] only
PACKED_FORMAT_VERSION = 3  # the model cache's copy in the kernel's packed layout (packed_checkpoint.py)
PACKED_WEIGHTS = "model.safetensors"  # the packed copy's one weight file

MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
# what safetensors' errors about a file's length mean (a download cut short, most often)
_SAFETENSORS_SAYS = {
    "header too large": "its first 8 bytes give a header longer than the library's limit of 100 MB",
    "header too small": "cut short: fewer than the 8 bytes that give its header's length",
    "invalid header length": "cut short, or not a safetensors file: its header runs past the end of the file",
    "file not fully covered": "cut short, or with bytes added: its tensors do not end where the file does",
}

_HF_NAMES = [
    (r"model\.embed_tokens\.weight", "tok_embeddings.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.weight", r"layers.\1.attention.wq.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.weight", r"layers.\1.attention.wk.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.weight", r"layers.\1.attention.wv.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", r"layers.\1.attention.wo.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", r"layers.\1.feed_forward.w1.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", r"layers.\1.feed_forward.w2.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", r"layers.\1.feed_forward.w3.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attention_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.ffn_norm.weight"),
]
# Tensors some checkpoints carry that the model recomputes instead.
IGNORED = re.compile(r"(.*rotary_emb\.inv_freq|rope\.freqs)$")


def hf_to_internal(name: str) -> str | None:
    """The model's name for the Hugging Face tensor `name` (None: not a tensor of a Llama model)."""
    return model_name(name, _HF_NAMES)


def find_tokenizer(folder: Path) -> Path | None:
    """The folder's tokenizer.model, else its tokenizer.json (a byte-level BPE model such as SmolLM2 has no
    tokenizer.model); else, for a Meta folder only, the tokenizer.model one level up, where Meta's download puts it
    beside the model folders. Any other folder's parent may hold another model's tokenizer: a SmolLM2 folder copied
    beside Llama-2's tokenizer.model was run with Llama-2's ids when the parent's came before its own tokenizer.json."""
    candidates = [folder / "tokenizer.model", folder / "tokenizer.json"]
    if _meta_layout(folder):
        candidates.append(folder.parent / "tokenizer.model")
    return next((candidate for candidate in candidates if candidate.is_file()), None)


def missing_tokenizer(folder: Path) -> str:
    """What a folder without a tokenizer (find_tokenizer) is said to lack."""
    above = ", nor a tokenizer.model in its parent folder" if _meta_layout(folder) else ""
    return f"{folder}: no tokenizer.model or tokenizer.json{above}"


def _meta_layout(folder: Path) -> bool:
    return (folder / "params.json").is_file() and not (folder / "int8serve.json").is_file()


def detect_format(folder: Path) -> str:
    if not folder.exists():
        raise CheckpointError(f"{folder}: no such model folder")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: a model is a folder (config.json, params.json or int8serve.json) or a "
                              ".gguf file")
    for marker, kind in (("int8serve.json", "int8"), ("params.json", "meta"), ("config.json", "hf")):
        if (folder / marker).is_file():
            return kind
    raise CheckpointError(f"{folder}: not a model folder: expected int8serve.json, params.json or config.json")


def check_config_fits(config: ModelConfig, shapes: dict[str, tuple[int, ...]], where: Path) -> None:
    """Refuse a config that does not describe the checkpoint's weights (`shapes`, by model name), before the model is
    built: a config of 10^7 layers or a width of 10^9 would otherwise be built (or allocated) first."""
    layers = sorted({int(m.group(1)) for name in shapes if (m := re.match(r"layers\.(\d+)\.", name))})
    held = layers[-1] + 1 if layers else 0
    if held > config.n_layers:
        extra = next(name for name in shapes if name.startswith(f"layers.{held - 1}."))
        raise CheckpointError(f"{where}: unexpected tensor '{extra}': the config describes {config.n_layers} layers")
    if held < config.n_layers:
        raise CheckpointError(f"{where}: the config describes {config.n_layers} layers, the checkpoint holds weights "
                              f"for {held}")
    for name, expected in weight_shapes(config).items():
        if name in shapes and tuple(shapes[name]) != expected:
            raise CheckpointError(f"{where}: tensor '{name}' has shape {tuple(shapes[name])}, but the config "
                                  f"describes {expected}")


def int8_config(folder: Path, meta: dict) -> ModelConfig:
    """The model config an int8 checkpoint's int8serve.json (read into `meta`) records."""
    with naming(folder / "int8serve.json"):
        return ModelConfig.from_dict(meta.get("config"))


def check_int8_format(folder: Path, meta: dict, versions: tuple[int, ...]) -> None:
    """Refuse an int8serve.json (read into `meta`) of another format, or of a version not in `versions`."""
    if meta.get("format") != INT8_FORMAT or meta.get("version") not in versions:
        raise CheckpointError(f"{folder / 'int8serve.json'}: format {meta.get('format')!r} version "
                              f"{meta.get('version')!r}, expected {INT8_FORMAT!r} version "
                              f"{' or '.join(map(str, (*READABLE_VERSIONS, PACKED_FORMAT_VERSION)))}")


def check_packed_size(folder: Path, meta: dict) -> None:
    """Refuse a packed copy whose weight file is not the size its int8serve.json (`meta`) records."""
    weights = folder / PACKED_WEIGHTS
    size = weights.stat().st_size if weights.is_file() else None
    if size != meta.get("weights_bytes"):
        raise CheckpointError(f"{weights}: {size} bytes, int8serve.json says {meta.get('weights_bytes')} (a copy "
                              "cut short or changed)")


# --- weight files -------------------------------------------------------------------------------------------------


def hf_weight_paths(folder: Path) -> tuple[list[Path], str]:
    """The weight files of a Hugging Face folder and their kind ("safetensors" or "bin"): the shards an index names,
    else one model.safetensors, else one pytorch_model.bin."""
    for index_name, kind in (("model.safetensors.index.json", "safetensors"), ("pytorch_model.bin.index.json", "bin")):
        index = folder / index_name
        if index.is_file():
            files = shard_files(index)
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{index}: shard files missing: {', '.join(missing)}")
            return files, kind
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"], "safetensors"
    if (folder / "pytorch_model.bin").is_file():
        return [folder / "pytorch_model.bin"], "bin"
    raise CheckpointError(f"{folder}: no model.safetensors, sharded safetensors index or pytorch_model.bin")


def shard_files(index: Path) -> list[Path]:
    """The shard files a `*.index.json` names: file names inside its folder (a path that leads out of it, such as
    `../x.safetensors` or `/etc/x`, is refused)."""
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{index}: not a valid shard index ({type(err).__name__}: {err})") from err
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: not a valid shard index ('weight_map' must map tensor names to file names)")
    files = []
    for name in dict.fromkeys(weight_map.values()):
        parts = PurePosixPath(name).parts
        if not parts or PurePosixPath(name).is_absolute() or ".." in parts or "\\" in name:
            raise CheckpointError(f"{index}: shard {name!r} is not a file name inside the model folder")
        files.append(index.parent / name)
    return files


def safetensors_header(f: BinaryIO) -> tuple[int, dict, int]:
    """The header of the safetensors file open as `f` (read from its start): its size in bytes, the header, and the
    file's size. Raises ValueError (or OSError) for a file that is not one. Only for packed_checkpoint.map_safetensors,
    which maps the whole file at once and needs where the data starts; a model's files are checked, and read, with
    the library's safe_open (safetensors_shapes, sources.SafetensorsSource)."""
    size = os.fstat(f.fileno()).st_size
    header_bytes = int.from_bytes(f.read(8), "little")
    if size < 8 or header_bytes > min(size - 8, MAX_HEADER_BYTES):
        raise ValueError(f"a header of {header_bytes} bytes in a file of {size}")
    header = json.loads(f.read(header_bytes))
    if not isinstance(header, dict):
        raise ValueError("the header is not a JSON object")
    return header_bytes, header, size


def safetensors_shapes(file: Path) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in a safetensors file, read with the library's safe_open as the loader reads the file
    (sources.SafetensorsSource): it refuses a header that does not describe exactly the file's bytes (a file cut short
    or with bytes added, tensors that overlap, leave gaps or do not fit their shape, an unknown dtype) and reads no
    tensor. framework="numpy" imports numpy, not torch."""
    if file.is_dir():  # safe_open says "No such device"
        raise CheckpointError(f"{file}: a folder, not a safetensors file")
    try:
        _check_not_empty([file])
        with safe_open(str(file), framework="numpy") as handle:
            return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}  # noqa: SIM118
    except (SafetensorError, OSError) as err:
        raise unreadable_safetensors(file, err) from err


def unreadable_safetensors(file: Path, err: Exception) -> CheckpointError:
    """The error for a safetensors file the library refuses with `err`: one line naming the file, with what its words
    for a file cut short mean."""
    said = " ".join(str(err).split())
    meaning = next((f": {words}" for phrase, words in _SAFETENSORS_SAYS.items() if phrase in said), "")
    return CheckpointError(f"{file}: not a readable safetensors file{meaning} ({said})")


# --- the check ----------------------------------------------------------------------------------------------------


def check_model_files(path: Path) -> AnyTokenizer:
    """Raise CheckpointError or ConfigError (naming the file) if `path`, a model folder or a .gguf file, is not one
    the loader can load and serve, as far as its config, its weight files' headers and its tokenizer (built as the
    loader and the server build it) tell; else that tokenizer (whether the card's template can use it is the
    caller's to ask). Reads no tensor data and imports no torch."""
    if path.suffix == ".gguf" and path.is_file():
        return _check_gguf(path)
    kind = detect_format(path)
    if kind == "int8":
        return _check_int8(path)
    if kind == "meta":
        return _check_meta(path)
    return _check_hf(path)


def _check_hf(folder: Path) -> AnyTokenizer:
    config = config_from_hf(folder / "config.json")
    files, kind = hf_weight_paths(folder)
    if kind == "bin":  # a pickle: its shapes are not told without torch
        _check_not_empty(files)
    else:
        shapes = {}
        for file in files:
            for name, shape in safetensors_shapes(file).items():
                if IGNORED.fullmatch(name):
                    continue
                internal = hf_to_internal(name)
                if internal is None:
                    raise CheckpointError(f"{folder}: unexpected tensor '{name}' for a Llama model")
                shapes[internal] = shape
        _check_weights(config, shapes, folder)
    return _check_tokenizer(folder)


def _check_meta(folder: Path) -> AnyTokenizer:
    shards = sorted(folder.glob("consolidated.*.pth"))
    if not shards:
        raise CheckpointError(f"{folder}: params.json but no consolidated.*.pth weights")
    _check_not_empty(shards)
    tokenizer = _check_tokenizer(folder)
    vocab = tokenizer.vocab_size if tokenizer.path.suffix == ".model" else None  # as loader._open_meta counts it
    config_from_meta(folder / "params.json", vocab, tied=False)  # whether the head is tied: only the .pth tells
    return tokenizer


def _check_int8(folder: Path) -> AnyTokenizer:
    meta = read_json(folder / "int8serve.json")
    check_int8_format(folder, meta, (*READABLE_VERSIONS, PACKED_FORMAT_VERSION))
    config = int8_config(folder, meta)
    if meta.get("version") == PACKED_FORMAT_VERSION:  # the cache's packed copy: its tensors are named otherwise
        check_packed_size(folder, meta)
    elif not (folder / "model.safetensors").is_file():
        raise CheckpointError(f"{folder}: int8serve.json but no model.safetensors")
    else:
        _check_weights(config, safetensors_shapes(folder / "model.safetensors"), folder)
    return _check_tokenizer(folder)


def _check_gguf(path: Path) -> AnyTokenizer:
    from .gguf_file import GGUFFile, check_tensor_types, config_from_gguf, internal_name

    file = GGUFFile.open(path)
    config = config_from_gguf(file)
    check_tensor_types(file)
    shapes = {}
    for name, info in file.tensors.items():
        if IGNORED.fullmatch(name):
            continue
        internal = internal_name(name)
        if internal is None:
            raise CheckpointError(f"{path}: unexpected tensor '{name}' for a Llama model")
        shapes[internal] = info.shape
    _check_weights(config, shapes, path)
    return _check_gguf_tokenizer(file)


def _check_gguf_tokenizer(file: GGUFFile) -> AnyTokenizer:
    """The file's tokenizer rebuilt and loaded as the loader does it (gguf_tokenizer.built_tokenizer), into a
    temporary folder rather than the cache."""
    from .gguf_tokenizer import built_tokenizer

    try:
        with tempfile.TemporaryDirectory(prefix="int8serve-check-") as scratch:
            return built_tokenizer(file, Path(scratch))[1]
    except OSError as err:
        raise CheckpointError(f"{file.path}: its tokenizer could not be checked ({err})") from err


def _check_weights(config: ModelConfig, shapes: dict[str, tuple[int, ...]], where: Path) -> None:
    """The config describes the weights (`shapes`, by model name), and every weight the model needs is there."""
    check_config_fits(config, shapes, where)
    missing = [name for name in weight_shapes(config)
               if name not in shapes and not (name == "output.weight" and config.tie_embeddings)]
    if missing:
        raise CheckpointError(f"{where}: checkpoint has no weights for {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))


def _check_not_empty(files: list[Path]) -> None:
    for file in files:
        if file.stat().st_size == 0:
            raise CheckpointError(f"{file}: an empty file, no weights")


def _check_tokenizer(folder: Path) -> AnyTokenizer:
    """The folder's tokenizer, loaded as the server loads it (tokenizer.load_tokenizer); refused if there is none or
    its file is not a tokenizer the engine can use."""
    tokenizer = find_tokenizer(folder)
    if tokenizer is None:
        raise CheckpointError(missing_tokenizer(folder))
    return load_tokenizer(tokenizer)
