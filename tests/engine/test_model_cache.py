"""The first start quantizes once: the int8 copy in $INT8SERVE_CACHE/models, its key, its lock, its atomic write;
later starts map its packed layout without repacking, and an old or damaged copy is rebuilt."""

from __future__ import annotations

import inspect
import json
import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType as GGMLType
from tests.engine.test_gguf import write_gguf
from tests.engine.test_hub import COMMIT, lay_out_hub_cache

from int8serve.builtin_model import BUILTIN
from int8serve.engine import int8, kernels, loader, model_cache, packed_checkpoint
from int8serve.engine.gguf_loader import GGUFFile, write_tokenizer
from int8serve.engine.kernels import packed as packed_layout
from int8serve.engine.loader import LoadedModel, load_model
from int8serve.engine.model_cache import cache_folder, load_cached, models_dir

TOKENS = torch.tensor([[1, 403, 407, 261, 378, 442, 290]])


def logits(loaded: LoadedModel) -> torch.Tensor:
    return loaded.model(TOKENS, loaded.model.new_cache(1, TOKENS.shape[1]), [0], [0], all_logits=True)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("INT8SERVE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def source(tmp_path: Path, stories_hf: Path) -> Path:
    """A private copy of stories260K, so that a test may touch its files."""
    return Path(shutil.copytree(stories_hf, tmp_path / "stories260K"))


@pytest.fixture
def quantized(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The sources `load_model` quantized (rather than loaded from an int8 checkpoint), in order."""
    seen: list[Path] = []
    real = loader.load_model

    def spy(path: Path, precision: str = "int8", progress: bool = False, group_size: int = 32,
            quantizer: str = loader.DEFAULT_QUANTIZER) -> LoadedModel:
        loaded = real(path, precision, progress, group_size, quantizer)
        if precision == "int8" and loaded.source_format != "int8":
            seen.append(Path(path))
        return loaded

    monkeypatch.setattr(model_cache, "load_model", spy)
    return seen


def test_the_first_load_writes_the_copy_and_later_loads_read_it(cache: Path, source: Path,
                                                                  quantized: list[Path]) -> None:
    first = load_cached(source)
    folder = cache_folder(source)
    assert folder.parent == cache / "models" and folder.name.startswith("stories260K-")
    assert {p.name for p in folder.iterdir()} == {"int8serve.json", "model.safetensors", "tokenizer.model"}
    second = load_cached(source)
    assert quantized == [source]  # once
    assert second.source_format == "int8" and second.path == source
    assert second.tokenizer_path == folder / "tokenizer.model"
    assert torch.equal(logits(first), logits(second))
    assert torch.equal(logits(second), logits(load_model(source, "int8")))


def test_the_first_start_serves_from_the_copy_it_wrote(cache: Path, source: Path, quantized: list[Path]) -> None:
    """Mapped as a later start maps it, so that the quantized model's fresh memory is given back (the 7B's 7.3 GB),
    with the same bits as the model quantized in memory."""
    first = load_cached(source)
    assert quantized == [source] and first.path == source and first.source_format == "int8"
    weights = str(cache_folder(source) / "model.safetensors")
    head = first.model.output
    assert head.packed is not None and mapped_files(head.packed.data) == [weights]
    assert head.residual is not None and mapped_files(head.residual) == [weights]
    assert torch.equal(logits(first), logits(load_model(source, "int8")))


def test_no_model_cache_and_fp32_write_nothing(cache: Path, source: Path, quantized: list[Path]) -> None:
    load_cached(source, use_cache=False)
    load_cached(source, "fp32")
    assert not models_dir().exists() or not any(models_dir().iterdir())


def test_an_int8_checkpoint_is_loaded_as_it_is(cache: Path, source: Path, tmp_path: Path) -> None:
    int8 = loader.save_int8_checkpoint(load_model(source, "int8"), tmp_path / "int8")
    assert load_cached(int8).path == int8
    assert not models_dir().exists()


def test_a_gguf_inside_the_cache_is_quantized_once(cache: Path, stories_hf: Path, quantized: list[Path]) -> None:
    """The built-in model's GGUF lives in $INT8SERVE_CACHE/builtin: its int8 copy is kept like any other GGUF's (every
    start quantized it again, 20-25 s, when the cache refused whatever lay inside it)."""
    gguf = write_gguf(builtin_model_path_in(cache), stories_hf, lambda name, shape: GGMLType.F32)
    first = load_cached(gguf)
    second = load_cached(gguf)
    assert quantized == [gguf]  # once
    assert second.source_format == "int8" and second.path == gguf
    assert (cache_folder(gguf) / "int8serve.json").is_file()
    assert torch.equal(logits(first), logits(second))


def builtin_model_path_in(cache: Path) -> Path:
    folder = cache / "builtin" / BUILTIN.folder
    folder.mkdir(parents=True)
    return folder / "stories260K.F32.gguf"


def test_the_key_follows_the_source_and_the_quantization(cache: Path, source: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    before = cache_folder(source)
    assert cache_folder(source) == before  # stable
    weights = source / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    touched = cache_folder(source)
    assert touched != before
    rtn = cache_folder(source, quantizer="rtn")
    assert len({touched, rtn, cache_folder(source, group_size=64)}) == 3
    monkeypatch.setattr(model_cache.calibration, "calibration_text", lambda: "another calibration text")
    assert cache_folder(source) != touched  # GPTQ's copies depend on the calibration text
    assert cache_folder(source, quantizer="rtn") == rtn  # RTN's do not
    monkeypatch.setattr(model_cache, "INT8_FORMAT_VERSION", 99)
    assert cache_folder(source) != touched


def test_comments_docstrings_and_layout_of_the_quantizing_code_keep_the_key(
        cache: Path, source: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A new int8serve whose quantizing code differs only in comments, docstrings or layout keeps the copy (a 7B's
    GPTQ is ~23 minutes and 7 GB of disk); a changed statement makes a new one. Before, any byte of its source did."""
    keys = {quantizer: cache_folder(source, quantizer=quantizer) for quantizer in ("gptq", "rtn")}
    real = inspect.getsource
    gptq_text, quantize_text = real(model_cache.gptq), real(int8.quantize)
    edited: dict[object, str] = {
        model_cache.gptq: gptq_text.replace('"""', '"""Reworded. ', 1) + "\n# a new comment\n",
        int8.quantize: quantize_text.replace("def quantize(weight: Tensor",
                                             "def quantize(  # reflowed\n    weight: Tensor"),
    }
    assert edited[int8.quantize] != quantize_text
    monkeypatch.setattr(model_cache.inspect, "getsource", lambda code: edited.get(code) or real(code))
    assert {quantizer: cache_folder(source, quantizer=quantizer) for quantizer in keys} == keys
    edited[model_cache.gptq] = re.sub(r"(?m)^DAMPING = .*$", "DAMPING = 0.5", gptq_text)  # a statement changes
    assert edited[model_cache.gptq] != gptq_text
    assert cache_folder(source, quantizer="gptq") != keys["gptq"]
    assert cache_folder(source, quantizer="rtn") == keys["rtn"]


def plus_one(x):  # type: ignore[no-untyped-def]  # (no annotations: the fingerprint below stays short)
    """A docstring, left out."""
    return x + 1  # a comment, left out


def test_the_code_fingerprint_is_the_same_on_every_python() -> None:
    """What `code_fingerprint` hashes leaves out the fields one Python version writes and another does not (empty
    lists, None: ast.dump differs between 3.11, 3.12 and 3.13), so a new Python keeps the model cache's copies."""
    assert model_cache.code_fingerprint(plus_one) == (
        "Module(body=[FunctionDef(name='plus_one', args=arguments(args=[arg(arg='x')]), "
        "body=[Return(value=BinOp(left=Name(id='x', ctx=Load()), op=Add(), right=Constant(value=1)))])])")


def test_a_hub_snapshot_is_keyed_by_repo_and_commit(tmp_path: Path, cache: Path, stories_hf: Path) -> None:
    one = lay_out_hub_cache(tmp_path / "hub-a", "tiny-org/stories260K", stories_hf)
    other = lay_out_hub_cache(tmp_path / "hub-b", "tiny-org/stories260K", stories_hf)  # another HF_HUB_CACHE
    assert model_cache.source_identity(one) == {"hub": "tiny-org/stories260K", "commit": COMMIT}
    assert cache_folder(one) == cache_folder(other)
    assert cache_folder(one).name.startswith("tiny-org--stories260K-")


def other_copies_said(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "other int8 cop" in r.getMessage()]


def test_a_new_copy_names_the_other_copies_of_its_source_and_keeps_them(cache: Path, source: Path, tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A new int8serve (another key for the same source) used to write its copy beside the old one (7 GB for a 7B)
    and say nothing of the old one."""
    caplog.set_level("INFO", logger="int8serve.engine.model_cache")
    another_source = Path(shutil.copytree(source, tmp_path / "elsewhere" / "stories260K"))
    load_cached(another_source, quantizer="rtn")
    load_cached(source, quantizer="rtn")
    assert other_copies_said(caplog) == []  # the first copy of each source
    first = cache_folder(source, quantizer="rtn")
    monkeypatch.setattr(model_cache, "INT8_FORMAT_VERSION", 99)  # what a new version's quantizer does to the key
    load_cached(source, quantizer="rtn")
    second = cache_folder(source, quantizer="rtn")
    (said,) = other_copies_said(caplog)
    assert said.startswith(f"the model cache also holds 1 other int8 copy of {source} ")
    size = sum(f.stat().st_size for f in first.iterdir()) / 1e6
    assert f"{first} ({size:.1f} MB)" in said and said.endswith(f"`rm -r {first}` frees the space")
    assert str(cache_folder(another_source, quantizer="rtn")) not in said
    assert (first / "model.safetensors").is_file()  # kept: an older server may map it
    weights = source / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))  # the source changed
    load_cached(source, quantizer="rtn")
    said = other_copies_said(caplog)[-1]
    assert "holds 2 other int8 copies" in said
    assert said.endswith(f"`rm -r {' '.join(sorted(map(str, (first, second))))}` frees the space")
    caplog.clear()
    load_cached(source, quantizer="rtn")  # mapped, nothing written: nothing said
    assert other_copies_said(caplog) == []


def test_a_copy_that_records_only_the_path_it_was_given_still_loads_and_is_named(cache: Path, source: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                                 quantized: list[Path],
                                                                                 caplog: pytest.LogCaptureFixture
                                                                                 ) -> None:
    """Copies written before `source_identity` recorded `source`, the path as given: an absolute one is enough."""
    caplog.set_level("INFO", logger="int8serve.engine.model_cache")
    load_cached(source, quantizer="rtn")
    older = cache_folder(source, quantizer="rtn")
    meta = model_cache.read_json(older / "int8serve.json")
    assert meta["source_identity"] == model_cache.source_identity(source)
    del meta["source_identity"]
    (older / "int8serve.json").write_text(json.dumps(meta))
    assert load_cached(source, quantizer="rtn").source_format == "int8" and quantized == [source]  # mapped
    monkeypatch.setattr(model_cache, "INT8_FORMAT_VERSION", 99)
    load_cached(source, quantizer="rtn")
    (said,) = other_copies_said(caplog)
    assert f"`rm -r {older}`" in said
    meta["source"] = "stories260K"  # relative: to the folder that server started in, which it does not say
    (older / "int8serve.json").write_text(json.dumps(meta))
    monkeypatch.setattr(model_cache, "INT8_FORMAT_VERSION", 100)
    load_cached(source, quantizer="rtn")
    assert f"{older}" not in other_copies_said(caplog)[-1]


def test_a_second_process_waits_for_the_first_then_loads_its_copy(cache: Path, source: Path,
                                                                   quantized: list[Path]) -> None:
    folder = cache_folder(source)
    done: list[LoadedModel] = []
    with model_cache.locked(folder):  # another server is quantizing
        waiter = threading.Thread(target=lambda: done.append(load_cached(source)))
        waiter.start()
        time.sleep(0.5)
        assert not done  # it waits for the lock
        model_cache._store(load_model(source, "int8"), model_cache.source_identity(source), folder)  # it lands
    waiter.join(timeout=60)
    assert done and done[0].source_format == "int8"  # loaded, not quantized again
    assert quantized == []


def test_a_failed_write_leaves_nothing_and_still_serves(cache: Path, source: Path,
                                                       monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    def disk_full(loaded: LoadedModel, destination: Path, **_options: object) -> None:
        Path(destination).mkdir(parents=True)
        (Path(destination) / "model.safetensors").write_bytes(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_cache, "save_packed_checkpoint", disk_full)
    loaded = load_cached(source)
    assert torch.equal(logits(loaded), logits(load_model(source, "int8")))
    assert loaded.source_format == "hf"  # the model quantized in memory, no copy to map
    assert [p.name for p in models_dir().iterdir() if not p.name.endswith(".lock")] == []
    assert "could not write the int8 copy" in caplog.text and "No space left on device" in caplog.text


def test_a_read_only_cache_costs_a_warning_not_the_start(read_only_cache: Path, source: Path,
                                                          caplog: pytest.LogCaptureFixture) -> None:
    """The lock beside the copy could not be made: the start ended with EROFS's traceback."""
    loaded = load_cached(source)
    assert torch.equal(logits(loaded), logits(load_model(source, "int8")))
    assert caplog.text.count("cannot write to the model cache") == 1 and "Read-only file system" in caplog.text
    assert list(read_only_cache.iterdir()) == []


def test_a_gguf_with_a_read_only_cache_keeps_its_tokenizer_in_a_temporary_folder(
        read_only_cache: Path, stories_hf: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    gguf = write_gguf(tmp_path / "stories260K.F32.gguf", stories_hf, lambda name, shape: GGMLType.F32)
    expected = logits(load_model(gguf, "int8"))
    for use_cache in (False, True):  # --no-model-cache too: it still wrote the rebuilt tokenizer into the cache
        loaded = load_cached(gguf, use_cache=use_cache)
        assert loaded.tokenizer_path is not None and loaded.tokenizer_path.is_file()
        assert not loaded.tokenizer_path.is_relative_to(read_only_cache)
        assert torch.equal(logits(loaded), expected)
    assert "tokenizer into the cache" in caplog.text and list(read_only_cache.iterdir()) == []


def test_a_partial_copy_left_by_a_crash_is_ignored_and_removed(cache: Path, source: Path) -> None:
    folder = cache_folder(source)
    stale = folder.with_name(f".partial-{folder.name}-12345")
    stale.mkdir(parents=True)
    (stale / "model.safetensors").write_bytes(b"half")
    load_cached(source)
    assert not stale.exists() and (folder / "int8serve.json").is_file()


def tokenizer_files_in(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in loader.TOKENIZER_FILES if (folder / name).is_file()}


def copy_beside_llama2_tokenizer(stories_hf: Path, tmp_path: Path, shared_dir: Path, smollm2_gguf: Path | None
                                 ) -> Path:
    """stories260K in a folder that holds Llama-2's tokenizer.model, with SmolLM2's tokenizer.json (and its
    tokenizer_config.json) from `smollm2_gguf`, or none. Quantized with rtn: no calibration text is tokenized."""
    shutil.copyfile(shared_dir / "models" / "llama2-tokenizer" / "tokenizer.model", tmp_path / "tokenizer.model")
    source = Path(shutil.copytree(stories_hf, tmp_path / "stories260K"))
    for name in loader.TOKENIZER_FILES:
        (source / name).unlink()
    if smollm2_gguf is not None:
        loader.copy_tokenizer(write_tokenizer(GGUFFile.open(smollm2_gguf), tmp_path / "built"), source)
    return source


def give_the_parents_tokenizer(folder: Path) -> None:
    """The copy as int8serve wrote it before a folder's own tokenizer.json came first: the parent's tokenizer.model."""
    for name in loader.TOKENIZER_FILES:
        (folder / name).unlink(missing_ok=True)
    loader.copy_tokenizer(folder.parents[2] / "tokenizer.model", folder)  # cache/models/<copy>: beside the cache


@pytest.mark.parametrize("own", [True, False])
def test_a_copy_holding_the_parent_folders_tokenizer_gets_the_sources_own(
        cache: Path, stories_hf: Path, smollm2_gguf: Path, tmp_path: Path, shared_dir: Path, quantized: list[Path],
        own: bool, caplog: pytest.LogCaptureFixture) -> None:
    """A copy written before cfea3d1 kept the Llama-2 tokenizer.model of the source's parent folder: the key covers the
    source's own files only, so later starts mapped it and tokenized with Llama-2's ids. It gets the source's own
    files (none, for a source without any: generate and serve then say it has none), without quantizing again."""
    source = copy_beside_llama2_tokenizer(stories_hf, tmp_path, shared_dir, smollm2_gguf if own else None)
    expected = logits(load_cached(source, quantizer="rtn"))
    folder = cache_folder(source, quantizer="rtn")
    wanted = tokenizer_files_in(source)
    assert tokenizer_files_in(folder) == wanted
    assert set(wanted) == ({"tokenizer.json", "tokenizer_config.json"} if own else set())
    give_the_parents_tokenizer(folder)
    with caplog.at_level("INFO", logger="int8serve.engine.model_cache"):
        mended = load_cached(source, quantizer="rtn")
        again = load_cached(source, quantizer="rtn")
    said = [r.getMessage() for r in caplog.records if "holds another tokenizer" in r.getMessage()]
    assert len(said) == 1 and "(tokenizer.model)" in said[0]
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert tokenizer_files_in(folder) == wanted
    expected_path = folder / "tokenizer.json" if own else None
    assert mended.tokenizer_path == expected_path and again.tokenizer_path == expected_path
    assert quantized == [source]  # the weights kept
    assert torch.equal(logits(mended), expected)
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []


def test_a_copys_tokenizer_that_cannot_be_replaced_is_not_served(
        cache: Path, stories_hf: Path, smollm2_gguf: Path, tmp_path: Path, shared_dir: Path,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    source = copy_beside_llama2_tokenizer(stories_hf, tmp_path, shared_dir, smollm2_gguf)
    load_cached(source, quantizer="rtn")
    folder = cache_folder(source, quantizer="rtn")
    give_the_parents_tokenizer(folder)

    def disk_full(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_cache, "replace_durably", disk_full)
    assert load_cached(source, quantizer="rtn").tokenizer_path == source / "tokenizer.json"
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "No space left on device" in warnings[0] and "serving the source's own" in warnings[0]
    assert set(tokenizer_files_in(folder)) == {"tokenizer.model"}
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []


def test_quantizing_by_blocks_of_rows_gives_the_same_bits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading quantizes a weight a few rows at a time (bounded temporaries): the same bits as all at once."""
    from int8serve.engine import int8

    weight = torch.randn(50, 64, generator=torch.Generator().manual_seed(0)).half()
    weight[3] = 0  # an all-zero row stays zero
    whole = int8.quantize(weight, 32)
    monkeypatch.setattr(int8, "QUANTIZE_CHUNK", 7 * 64)  # 7 rows at a time
    for ours, expected in zip(int8.quantize(weight, 32), whole, strict=True):
        assert torch.equal(ours, expected)


@pytest.fixture
def repacked(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every packing of a weight into the kernel's layout (in C++ or torch) and every plain-weight assignment."""
    calls: list[str] = []
    for owner, name in ((kernels, "pack_weight"), (packed_layout, "_pack_torch"), (int8.Int8Linear, "set_quantized")):
        real = getattr(owner, name)

        def spy(*args: object, _real: object = real, _name: str = name, **kwargs: object) -> object:
            calls.append(_name)
            return _real(*args, **kwargs)  # type: ignore[operator]

        monkeypatch.setattr(owner, name, spy)
    return calls


def mapped_files(tensor: torch.Tensor) -> list[str]:
    """The files whose memory mapping holds `tensor`'s data (empty for anonymous memory)."""
    address = tensor.data_ptr()
    found = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        low, high = (int(part, 16) for part in fields[0].split("-"))
        if low <= address < high and len(fields) == 6:
            found.append(fields[5])
    return found


def test_a_later_load_maps_the_packed_copy_without_repacking(cache: Path, source: Path,
                                                              repacked: list[str]) -> None:
    fresh = load_model(source, "int8")  # a fresh quantization, as --no-model-cache does
    load_cached(source)
    repacked.clear()
    later = load_cached(source)
    assert repacked == []  # nothing packed, nothing assigned as plain int8: the stored layout is used as it is
    weights = str(cache_folder(source) / "model.safetensors")
    for module in later.model.modules():
        if isinstance(module, int8.Int8Linear):
            assert module.packed is not None and module.weight is None  # one copy: the packed one
            assert mapped_files(module.packed.data) == [weights]  # the file's pages, not a copy in fresh memory
            assert module.packed.data.data_ptr() % kernels.ALIGNMENT == 0
    assert mapped_files(later.model.tok_embeddings.weight) == [weights]
    for layer in later.model.layers:  # each stack of projections is a view of the mapping: nothing copied
        for stack in (layer.attention.qkv, layer.feed_forward.gate_up):
            assert stack is not None and mapped_files(stack.packed.data) == [weights]
            assert stack.packed.data.data_ptr() == stack.layers[0].packed.data.data_ptr()
    assert torch.equal(logits(later), logits(fresh))  # bit for bit
    assert torch.equal(logits(load_model(cache_folder(source))), logits(fresh))  # --model may name the copy itself


def store_gate_and_up_apart(folder: Path) -> None:
    """Rewrite the copy's file with each layer's down weight between its gate and up weights, the order in which
    int8serve stored them before it stacked projections."""
    weights = folder / "model.safetensors"
    tensors = sorted(packed_checkpoint.map_safetensors(weights).items(), key=lambda item: item[1].data_ptr())
    names = [name for name, _ in tensors]
    for down in [name for name in names if name.endswith("feed_forward.w2.packed_data")]:
        names.remove(down)
        names.insert(names.index(down.replace(".w2.", ".w3.")), down)
    by_name = dict(tensors)
    entries = [(name, by_name[name].dtype, tuple(by_name[name].shape), lambda t=by_name[name]: t) for name in names]
    packed_checkpoint._write_aligned_safetensors(folder / "rewritten", entries)
    os.replace(folder / "rewritten", weights)


def test_a_copy_that_stores_gate_and_up_apart_is_written_again_in_stack_order(
        cache: Path, source: Path, quantized: list[Path], repacked: list[str],
        caplog: pytest.LogCaptureFixture) -> None:
    expected = logits(load_cached(source))
    folder = cache_folder(source)
    store_gate_and_up_apart(folder)
    repacked.clear()
    with caplog.at_level("INFO", logger="int8serve.engine.model_cache"):
        old = load_cached(source)
        new = load_cached(source)
    layers = len(old.model.layers)
    assert [stack.copied for stack in old.model.stacks()] == [False, True] * layers  # q, k, v stayed adjacent
    rewrites = [r.getMessage() for r in caplog.records if "writing it again once" in r.getMessage()]
    assert len(rewrites) == 1 and f"stores {layers} stacks of projections apart" in rewrites[0]
    assert not [r for r in caplog.records if r.levelname == "WARNING"]
    assert quantized == [source] and repacked == []  # written from the loaded weights: nothing quantized again
    weights = str(folder / "model.safetensors")
    assert [stack.copied for stack in new.model.stacks()] == [False] * (2 * layers)
    assert all(mapped_files(stack.packed.data) == [weights] for stack in new.model.stacks())
    assert torch.equal(logits(old), expected) and torch.equal(logits(new), expected)
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []


def test_a_failed_rewrite_keeps_the_old_copy(cache: Path, source: Path, quantized: list[Path],
                                            monkeypatch: pytest.MonkeyPatch,
                                            caplog: pytest.LogCaptureFixture) -> None:
    expected = logits(load_cached(source))
    folder = cache_folder(source)
    store_gate_and_up_apart(folder)

    def disk_full(*_args: object, **_options: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_cache, "save_packed_checkpoint", disk_full)
    with caplog.at_level("INFO", logger="int8serve.engine.model_cache"):
        served = load_cached(source)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "No space left on device" in warnings[0] and "serving from the old one" in warnings[0]
    assert torch.equal(logits(served), expected)
    monkeypatch.setattr(model_cache, "save_packed_checkpoint", packed_checkpoint.save_packed_checkpoint)
    assert torch.equal(logits(load_cached(source)), expected)  # the old copy is still there: not quantized again
    assert quantized == [source]


def test_an_older_int8_copy_is_rebuilt_once_and_said_so(cache: Path, source: Path, quantized: list[Path],
                                                       caplog: pytest.LogCaptureFixture) -> None:
    folder = cache_folder(source)
    folder.parent.mkdir(parents=True)
    loader.save_int8_checkpoint(load_model(source, "int8"), folder)  # what the cache held before: version 2
    with caplog.at_level("INFO", logger="int8serve.engine.model_cache"):
        rebuilt = load_cached(source)
        again = load_cached(source)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "cannot be used, rebuilding it" in warnings[0] and "version 2" in warnings[0]
    assert quantized == [source]  # rebuilt from the source, once
    assert model_cache.read_json(folder / "int8serve.json")["version"] == loader.PACKED_FORMAT_VERSION
    assert torch.equal(logits(rebuilt), logits(again))
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".")] == []  # the old copy is gone


@pytest.mark.parametrize("damage", ["cut short", "header", "layout", "missing tensor", "0xff data", "layers"])
def test_a_damaged_copy_is_detected_and_rebuilt(cache: Path, source: Path, quantized: list[Path], damage: str,
                                                monkeypatch: pytest.MonkeyPatch,
                                                caplog: pytest.LogCaptureFixture) -> None:
    expected = logits(load_cached(source))
    folder = cache_folder(source)
    weights, meta_file = folder / "model.safetensors", folder / "int8serve.json"
    meta = model_cache.read_json(meta_file)
    if damage == "cut short":
        with open(weights, "r+b") as f:
            f.truncate(weights.stat().st_size - 4096)
    elif damage == "header":  # the same size, a header that is not JSON
        with open(weights, "r+b") as f:
            f.seek(8)
            f.write(b"\xff" * 16)
    elif damage == "0xff data":  # the same size, the data overwritten: NaN norms and embeddings
        header_bytes = int.from_bytes(weights.read_bytes()[:8], "little")
        with open(weights, "r+b") as f:
            f.seek(8 + header_bytes)
            f.write(b"\xff" * (weights.stat().st_size - 8 - header_bytes))
    elif damage == "layout":  # written by a version whose kernel tiles its weights another way
        monkeypatch.setattr(kernels, "LAYOUT", {**kernels.LAYOUT, "version": kernels.LAYOUT["version"] + 1})
    elif damage == "layers":  # a config the weights refute, refused before the model is built
        meta["config"]["n_layers"] = 10**7
        meta_file.write_text(json.dumps(meta))
    else:
        meta["group_sizes"].pop("layers.0.attention.wq")
        meta_file.write_text(json.dumps(meta))
    quantized.clear()
    with caplog.at_level("WARNING", logger="int8serve.engine.model_cache"):
        rebuilt = load_cached(source)
    assert quantized == [source]
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "cannot be used, rebuilding it" in warnings[0], warnings
    assert torch.equal(logits(rebuilt), expected)
    quantized.clear()
    assert torch.equal(logits(load_cached(source)), expected) and quantized == []  # the new copy is good


def test_without_the_kernel_the_packed_copy_is_unpacked_for_torchs_kernels(cache: Path, source: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    load_cached(source)  # written with the kernel
    monkeypatch.setattr(kernels, "available", lambda: False)
    stock = load_model(source, "int8")
    later = load_cached(source)
    assert all(m.packed is None and m.weight is not None
               for m in later.model.modules() if isinstance(m, int8.Int8Linear))
    assert torch.equal(logits(later), logits(stock))


def test_a_copy_written_without_the_kernel_serves_the_kernel_later(cache: Path, source: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as without_kernel:
        without_kernel.setattr(kernels, "available", lambda: False)
        load_cached(source)  # quantized for torch's kernels; the copy is packed as it is written
    later = load_cached(source)
    assert all(m.packed is not None for m in later.model.modules() if isinstance(m, int8.Int8Linear))
    assert torch.equal(logits(later), logits(load_model(source, "int8")))
