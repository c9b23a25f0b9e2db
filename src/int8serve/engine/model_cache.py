"""The first start quantizes once: an int8 copy of each full-precision source, kept in `$INT8SERVE_CACHE/models/`.

Quantizing Llama-2-7B from fp16 reads 13.5 GB and rounds 6.7 billion weights. So when `--model` is a Hub id, a
full-precision folder or a GGUF file, the first start writes the int8 model into the cache and later starts map it
instead. The copy is stored in our kernel's packed layout (packed_checkpoint.py): a later start maps the file and
neither reads, copies nor repacks the weights.

The key is the source and the quantization, never a guess:
- the source: a Hub snapshot by repo and commit (immutable); anything else by its resolved path and the name, size
  and modification time of each file (hashing 13 GB at every start would cost more than it saves);
- the quantization: the int8 format's name and version, the quantizer (gptq or rtn) and its code and calibration
  text, so that a change to how weights are rounded (group-wise scales, say) can never load a copy made the old way.
  The code is taken as its syntax tree without docstrings (`code_fingerprint`): a new version that changes only
  comments, docstrings or layout there keeps the copy.
How the copy is stored (the packed layout and its version) is not in the key: a copy stored another way (an older
int8serve's plain int8 checkpoint), cut short or otherwise unusable (NaN norms or embeddings: bytes overwritten in
place, which no size check sees) is said so once in the log and rebuilt in place. A copy whose tokenizer files are
not the source folder's (an older int8serve copied the tokenizer.model of the folder above the source when the source
had its own tokenizer.json) gets the source's, said once in the log: its weights are kept.
Written atomically (a partial folder renamed into place) under a lock, so that two servers starting together
quantize once: the second waits, then loads the first one's copy. A full disk or an unwritable cache costs a
warning, never the start.

A new key leaves the copies of the old keys where they are (~7 GB each for a 7B): a server of another version on the
same host may still map one, so they are never removed here. Each copy records which source it was made from
(`source_identity` in its int8serve.json), and writing a new copy says in one log line which other copies of the
same source (a Hub repo, or a path) the cache holds, their size and the `rm -r` that frees them. A copy written
before that field, which records only the path it was given (`source`), is counted when that path is absolute.
"""

from __future__ import annotations

import ast
import contextlib
import dataclasses
import filecmp
import hashlib
import inspect
import json
import logging
import os
import re
import shlex
import shutil
import textwrap
from pathlib import Path
from typing import Any

from ..durable import fsync_folder, replace_durably, write_whole
from . import calibration, gptq, int8
from .cache_files import cache_dir, locked
from .config import ConfigError, read_json
from .errors import CheckpointError
from .loader import (
    DEFAULT_QUANTIZER,
    INT8_FORMAT,
    INT8_FORMAT_VERSION,
    TOKENIZER_FILES,
    LoadedModel,
    copy_tokenizer,
    detect_format,
    find_tokenizer,
    give_back_freed_memory,
    load_model,
    tokenizer_files,
)
from .model import Precision
from .packed_checkpoint import load_packed, save_packed_checkpoint

log = logging.getLogger(__name__)


def models_dir() -> Path:
    return cache_dir() / "models"


def quantization_settings(group_size: int = int8.DEFAULT_GROUP_SIZE,
                          quantizer: str = DEFAULT_QUANTIZER) -> dict[str, str | int]:
    """What decides the bytes of an int8 copy besides its source."""
    code = "".join(map(code_fingerprint, (int8.quantize, int8._quantize_groups, int8.Int8Linear.set_residual)))
    if quantizer == "gptq":
        code += code_fingerprint(gptq) + code_fingerprint(calibration) + calibration.calibration_text()
    return {"format": INT8_FORMAT, "version": INT8_FORMAT_VERSION, "group_size": group_size,
            "quantizer": f"{quantizer}-{hashlib.sha256(code.encode()).hexdigest()[:16]}"}


def code_fingerprint(code: object) -> str:
    """The syntax tree of a function's or module's source without its docstrings: what it computes, so that a change
    to a comment, a docstring or the layout of the quantizing code keeps the key (and a 7B's copy: ~23 minutes of
    GPTQ and 7 GB of disk) while any change to a statement makes a new one."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(code)))  # type: ignore[arg-type]
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return _tree_text(tree)


def _tree_text(node: object) -> str:
    """`node` as text, as `ast.dump` writes it but the same on every Python: no empty or None field (3.12 added
    `type_params=[]` to every function, 3.13 leaves such fields out), and no line or column numbers."""
    if isinstance(node, ast.AST):
        fields = (f"{name}={_tree_text(value)}" for name, value in ast.iter_fields(node)
                  if value is not None and value != [])
        return f"{type(node).__name__}({', '.join(fields)})"
    if isinstance(node, list):
        return f"[{', '.join(map(_tree_text, node))}]"
    return repr(node)


def source_identity(source: Path) -> dict[str, object]:
    """What identifies the weights at `source`: a Hub snapshot's repo and commit, else its files' stat."""
    named = _named_source(source)
    if "hub" in named:
        return named
    files = [source] if source.is_file() else sorted(p for p in source.iterdir() if p.is_file())
    return {**named, "files": [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]}


def _named_source(source: Path) -> dict[str, object]:
    """Where the weights at `source` come from, without their version: a Hub snapshot's repo (and commit), else the
    resolved path. Reads no file, so that it also names a source that is gone."""
    resolved = source.resolve() if source.is_file() else source
    snapshots = resolved.parent
    if snapshots.name == "snapshots" and snapshots.parent.name.startswith("models--"):
        return {"hub": snapshots.parent.name.removeprefix("models--").replace("--", "/"), "commit": resolved.name}
    return {"path": str(source.resolve())}


def _source_name(identity: dict[str, Any]) -> str | None:
    """What every copy of one source shares, whatever the source's version and the quantization: the Hub repo, or
    the path."""
    if isinstance(identity.get("hub"), str):
        return f"hub:{identity['hub']}"
    return identity["path"] if isinstance(identity.get("path"), str) else None


def cache_folder(source: Path, group_size: int = int8.DEFAULT_GROUP_SIZE,
                 quantizer: str = DEFAULT_QUANTIZER) -> Path:
    """`models/<readable name>-<key>`: the key hashes the source's identity and the quantization settings."""
    identity = source_identity(source)
    settings = quantization_settings(group_size, quantizer)
    key = hashlib.sha256(json.dumps([identity, settings], sort_keys=True).encode()).hexdigest()[:20]
    label = str(identity.get("hub") or source.resolve().name)
    return models_dir() / f"{re.sub(r'[^A-Za-z0-9._-]+', '--', label)[:80]}-{key}"


def cacheable(source: Path, precision: Precision) -> bool:
    """An int8 load of a full-precision source that is not itself one of our copies. Elsewhere in the cache is fine:
    the built-in model's GGUF lives there, and the demo model's int8 folder is int8 already."""
    if precision != "int8" or source.resolve().is_relative_to(models_dir().resolve()):
        return False
    return source.is_file() or detect_format(source) != "int8"


def load_cached(source: Path, precision: Precision = "int8", progress: bool = False,
                use_cache: bool = True, group_size: int = int8.DEFAULT_GROUP_SIZE,
                quantizer: str = DEFAULT_QUANTIZER) -> LoadedModel:
    """`load_model(source)`, through the int8 cache when it applies; `path` stays the source."""
    if not use_cache or not cacheable(source, precision):
        return load_model(source, precision, progress, group_size, quantizer)
    folder = cache_folder(source, group_size, quantizer)
    identity = source_identity(source)
    loaded = _load_copy(folder, source)
    other_tokenizer = loaded is not None and _other_tokenizer(folder, source)
    if loaded is None or _stored_apart(loaded) or other_tokenizer:
        with contextlib.ExitStack() as stack:
            if not _enter_lock(stack, folder, source):
                if loaded is None:
                    return load_model(source, precision, progress, group_size, quantizer)
                if other_tokenizer:  # the copy cannot be mended: the source's own is served
                    loaded = dataclasses.replace(loaded, tokenizer_path=find_tokenizer(source))
                return dataclasses.replace(loaded, path=source)
            if loaded is None:
                loaded = _load_copy(folder, source, quiet=True)  # another process may have written it meanwhile
                if loaded is None:
                    return _quantize_and_store(source, identity, folder, progress, group_size, quantizer)
            if _other_tokenizer(folder, source):  # (another process may have replaced it meanwhile)
                loaded = _replace_tokenizer(loaded, folder, source)
            if _stored_apart(loaded):
                _rewrite_in_stack_order(loaded, identity, folder)
    return dataclasses.replace(loaded, path=source)


def _enter_lock(stack: contextlib.ExitStack, folder: Path, source: Path) -> bool:
    """Take the lock on `folder` into `stack`; False, with a warning, when the cache cannot be written (read-only, or
    no room even for the lock): the model is then served without it."""
    try:
        stack.enter_context(locked(folder))
    except OSError as err:
        log.warning("cannot write to the model cache %s (%s); serving %s without writing to it", folder.parent, err,
                    source)
        return False
    return True


def _stored_apart(loaded: LoadedModel) -> int:
    """How many of the model's stacks of projections had to be copied at load: their weights do not lie end to end in
    the file (a copy written before int8serve stacked q, k, v and gate, up stored gate, down, up)."""
    return sum(stack.copied for stack in loaded.model.stacks())


def _other_tokenizer(folder: Path, source: Path) -> bool:
    """Whether the copy in `folder` holds other tokenizer files (names or bytes) than the folder `source` gives
    (find_tokenizer). A copy written before a folder's own tokenizer.json came first holds the tokenizer.model of the
    source's parent folder, which is another model's: the cache's key covers only the source's own files, so such a
    copy is still found. A GGUF source's tokenizer is rebuilt from the file, never looked up: nothing to compare."""
    if not source.is_dir():
        return False
    wanted = _source_tokenizer_files(source)
    held = {name: folder / name for name in TOKENIZER_FILES if (folder / name).is_file()}
    return held.keys() != wanted.keys() or any(not filecmp.cmp(held[name], wanted[name], shallow=False)
                                               for name in held)


def _source_tokenizer_files(source: Path) -> dict[str, Path]:
    tokenizer = find_tokenizer(source)
    return tokenizer_files(tokenizer) if tokenizer is not None else {}


def _replace_tokenizer(loaded: LoadedModel, folder: Path, source: Path) -> LoadedModel:
    """Give the copy in `folder` the source's tokenizer files in place of its own (nothing is quantized again), each
    renamed into place, then remove those the source does not have: a reader finds the old tokenizer or the new one.
    A failed write is said, and the source's tokenizer served."""
    tokenizer, wanted = find_tokenizer(source), _source_tokenizer_files(source)
    held = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    log.info("the cached int8 copy %s holds another tokenizer (%s) than its source %s (%s): written by an older "
             "int8serve, which took a tokenizer.model in the folder above the source before the source's own, or "
             "changed since; replacing the copy's", folder, " + ".join(held) or "none", source,
             " + ".join(wanted) or "none")
    partial = folder.with_name(f".partial-{folder.name}-tokenizer-{os.getpid()}")
    try:
        partial.mkdir()
        if tokenizer is not None:
            copy_tokenizer(tokenizer, partial)
        # tokenizer.model or tokenizer.json (what find_tokenizer picks) last, once its tokenizer_config.json is there
        for name in sorted(wanted, key=lambda name: name != "tokenizer_config.json"):
            replace_durably(partial / name, folder / name)
        for name in set(held) - set(wanted):
            (folder / name).unlink()
        fsync_folder(folder)
    except OSError as err:
        log.warning("could not replace the tokenizer of the int8 copy %s (%s); serving the source's own", folder,
                    err)
        return dataclasses.replace(loaded, tokenizer_path=tokenizer)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return dataclasses.replace(loaded, tokenizer_path=find_tokenizer(folder))


def _rewrite_in_stack_order(loaded: LoadedModel, identity: dict[str, object], folder: Path) -> None:
    """Write the copy again from the model just loaded (its weights as they are: nothing is quantized again), in the
    order that lets later starts map every stack in place. Without this each start would copy those stacks: ~2.9 GB
    more resident memory and a slower start on the 7B."""
    log.info("the cached int8 copy %s stores %d stacks of projections apart (written by an older int8serve), which "
             "this start had to copy; writing it again once, in stack order", folder, _stored_apart(loaded))
    try:
        _store(loaded, identity, folder, keep_old_until_written=True)
    except OSError as err:
        log.warning("could not write the int8 copy again to %s (%s); serving from the old one, which later starts "
                    "copy in part again", folder, err)


def _load_copy(folder: Path, source: Path, quiet: bool = False) -> LoadedModel | None:
    """The copy in `folder` mapped into a model; None when there is none, or (said unless `quiet`) when it cannot be
    used as it is: written by an older version, cut short, damaged."""
    if not (folder / "int8serve.json").is_file():
        return None
    try:
        loaded = load_packed(folder, read_json(folder / "int8serve.json"))
    except (CheckpointError, ConfigError) as err:
        if not quiet:
            log.warning("the cached int8 copy of %s cannot be used, rebuilding it: %s", source, err)
        return None
    log.info("mapped the int8 copy of %s from the cache: %s", source, folder)
    return loaded


def _quantize_and_store(source: Path, identity: dict[str, object], folder: Path, progress: bool, group_size: int,
                        quantizer: str) -> LoadedModel:
    log.info("quantizing %s to int8 with %s (once: later starts load the copy written to %s)", source, quantizer,
             folder)
    loaded = load_model(source, "int8", progress, group_size, quantizer)
    try:
        _store(loaded, identity, folder)
    except OSError as err:
        log.warning("could not write the int8 copy to %s (%s); serving without it, the next start quantizes "
                    "again", folder, err)
        return loaded
    _say_other_copies(source, identity, folder)
    # Serve from the copy just written, mapped as a later start maps it (the same bits): the quantized model's fresh
    # memory (the 7B's 7.3 GB) is given back, and the first start serves in a later start's memory, where pages come
    # in as forwards read them (the output head's residual only where its rows are read).
    mapped = _load_copy(folder, source, quiet=True)
    if mapped is None:
        return loaded
    del loaded
    give_back_freed_memory()
    return dataclasses.replace(mapped, path=source)


def _store(loaded: LoadedModel, identity: dict[str, object], folder: Path, keep_old_until_written: bool = False
           ) -> None:
    """Write the checkpoint beside `folder` and rename it into place (durable.write_whole, in `.partial-<name>-<pid>`):
    a reader sees all of it or nothing. A copy already there is removed first (an unusable one: its space may be
    needed), or with `keep_old_until_written` only once the new one is written (a usable one, which a failed write
    must not cost)."""
    for pattern in (f".partial-{folder.name}-*", f".stale-{folder.name}-*"):  # left by a process that died
        for stale in folder.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
    if folder.exists() and not keep_old_until_written:
        _discard(folder)
    needed = _nbytes(loaded)
    free = shutil.disk_usage(folder.parent).free
    if free < needed * 1.05:
        raise OSError(f"{needed / 1e9:.1f} GB needed, {free / 1e9:.1f} GB free")
    write_whole(folder, lambda partial: save_packed_checkpoint(loaded, partial, source_identity=identity),
                make_room=_discard)


def _say_other_copies(source: Path, identity: dict[str, Any], folder: Path) -> None:
    """One log line naming the cache's other copies of `source` beside the one just written to `folder`, their size
    and how to remove them. They are left alone: a server of another int8serve version may be mapping one."""
    try:
        others = [(other, _folder_bytes(other)) for other in _other_copies(identity, folder)]
    except OSError:  # an unreadable cache folder: nothing to say
        return
    if not others:
        return
    listed = ", ".join(f"{other} ({_size(size)})" for other, size in others)
    log.info("the model cache also holds %d other int8 %s of %s (another int8serve version's, other quantization "
             "settings' or an earlier version of its files'), %s in all: %s; kept, as a server may still map one; "
             "if none does, `rm -r %s` frees the space", len(others), "copy" if len(others) == 1 else "copies",
             source, _size(sum(size for _, size in others)), listed,
             " ".join(shlex.quote(str(other)) for other, _ in others))


def _other_copies(identity: dict[str, Any], folder: Path) -> list[Path]:
    """The copies in `folder`'s cache, other than `folder`, that were made from the same source as `identity`'s."""
    name = _source_name(identity)
    others = []
    for entry in sorted(folder.parent.iterdir()):
        if entry == folder or entry.name.startswith(".") or not entry.is_dir():  # .partial-*, .stale-*: in writing
            continue
        try:
            meta = read_json(entry / "int8serve.json")
        except ConfigError:
            continue
        if name is not None and _copy_source_name(meta) == name:
            others.append(entry)
    return others


def _copy_source_name(meta: dict[str, Any]) -> str | None:
    """The source a copy's int8serve.json says it was made from; None when it cannot say for sure."""
    identity = meta.get("source_identity")
    if isinstance(identity, dict):
        return _source_name(identity)
    given = meta.get("source")  # a copy written before source_identity: the path as --model gave it
    if isinstance(given, str) and Path(given).is_absolute():  # a relative one was relative to an unknown folder
        return _source_name(_named_source(Path(given)))
    return None


def _folder_bytes(folder: Path) -> int:
    return sum(file.stat().st_size for file in folder.rglob("*") if file.is_file())


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.1f} GB" if nbytes >= 1e8 else f"{nbytes / 1e6:.1f} MB"


def _discard(folder: Path) -> None:
    """Remove a copy; a process that mapped it keeps its (unlinked) files."""
    stale = folder.with_name(f".stale-{folder.name}-{os.getpid()}")
    os.rename(folder, stale)
    shutil.rmtree(stale, ignore_errors=True)


def _nbytes(loaded: LoadedModel) -> int:
    model = loaded.model
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
