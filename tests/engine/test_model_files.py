"""check_model_files: a model's files checked from their configs and headers, before `serve` loads anything.

Every form of model the loader takes passes; each damage is refused with the loader's own error naming the file, and
the loader refuses the same copy too (the check says early what the load would say late, never something else). The
check reads no tensor data and imports no torch (tests/test_cli_imports.py and the last test here).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import pytest
import sentencepiece
import tokenizers
import torch
from safetensors.torch import save
from tests.engine.test_gguf import one_score_fewer, q8_0_where_possible, write_gguf
from tests.engine.test_loader import rewrite_safetensors

from int8serve.engine.config import ConfigError
from int8serve.engine.demo import DEMO_CONFIG, demo_model_dir
from int8serve.engine.errors import CheckpointError
from int8serve.engine.gguf_file import config_from_gguf
from int8serve.engine.gguf_loader import GGUFFile, write_tokenizer
from int8serve.engine.loader import LoadedModel, copy_tokenizer, load_model, save_int8_checkpoint
from int8serve.engine.model_files import check_model_files, safetensors_shapes
from int8serve.engine.packed_checkpoint import save_packed_checkpoint
from int8serve.engine.tokenizer import AnyTokenizer, Tokenizer, load_tokenizer


@pytest.fixture(scope="module")
def stories_int8_folder(stories_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_int8_checkpoint(load_model(stories_hf, "int8", quantizer="rtn"), tmp_path_factory.mktemp("q8") / "m")


SAMPLE_TEXT = "Once upon a time, Lily said: \"Héllo, wörld!\" 42 times.\n"


def test_every_form_of_model_passes_with_its_own_tokenizer(
        stories_hf: Path, stories_meta: Path, smollm2_gguf: Path, stories_int8: LoadedModel, stories_int8_folder: Path,
        stories_tokenizer: Tokenizer, smollm2_tokenizer: AnyTokenizer, tmp_path: Path) -> None:
    """The tokenizer the check returns is the model's: the vocabulary its config names, the ids its tokenizer gives."""
    packed = save_packed_checkpoint(stories_int8, tmp_path / "packed")  # the model cache's copy
    demo = demo_model_dir(tmp_path)
    stories = (stories_tokenizer, stories_int8.config.vocab_size)
    expected: dict[Path, tuple[AnyTokenizer, int]] = {
        stories_hf: stories, stories_meta: stories, stories_int8_folder: stories, packed: stories,
        smollm2_gguf: (smollm2_tokenizer, config_from_gguf(GGUFFile.open(smollm2_gguf)).vocab_size),
        demo: (load_tokenizer(demo / "tokenizer.model"), DEMO_CONFIG["vocab_size"]),
    }
    for model, (tokenizer, vocab_size) in expected.items():
        checked = check_model_files(model)
        assert type(checked) is type(tokenizer), model
        assert checked.vocab_size == vocab_size, model
        assert checked.encode(SAMPLE_TEXT, bos=True) == tokenizer.encode(SAMPLE_TEXT, bos=True), model


def copy(source: Path, folder: Path) -> Path:
    shutil.copytree(source, folder)
    folder.chmod(0o755)
    for file in folder.iterdir():
        file.chmod(0o644)
    return folder


def edit_config(folder: Path, **changes: object) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


def cut(file: Path, keep: float = 0.6) -> None:
    data = file.read_bytes()
    file.write_bytes(data[:int(len(data) * keep)])


def with_header(header: bytes, data: bytes = bytes(131)) -> bytes:
    """A safetensors file's bytes: `header` (its length first) and `data`."""
    return len(header).to_bytes(8, "little") + header + data


def header_edited(data: bytes, change: Callable[[dict], object]) -> bytes:
    """The safetensors file `data` with its JSON header rewritten by `change`, its tensor data left as it is."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + size])
    change(header)
    return with_header(json.dumps(header).encode(), data[8 + size:])


def edit_header(file: Path, change: Callable[[dict], object]) -> None:
    file.write_bytes(header_edited(file.read_bytes(), change))


def tokenizer_json_only(folder: Path, text: str) -> None:
    """The folder's tokenizer is its tokenizer.json alone (as in SmolLM2's folder), holding `text`."""
    (folder / "tokenizer.model").unlink()
    (folder / "tokenizer.json").write_text(text)


# a tokenizer.json the library reads, but of a kind the engine does not (a Llama folder's, without tokenizer.model)
WORD_LEVEL = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "a": 1}, unk_token="<unk>")).to_str()

# damage to a copy of stories260K's Hugging Face folder -> the error and a fragment of its message
HF_DAMAGE: dict[str, tuple[Callable[[Path], object], type[Exception], str]] = {
    "config not JSON": (lambda f: (f / "config.json").write_text("{"), ConfigError, "config.json: not valid JSON"),
    "config field": (lambda f: edit_config(f, num_attention_heads=None), ConfigError,
                     "missing field 'num_attention_heads'"),
    "not llama": (lambda f: edit_config(f, model_type="qwen2"), ConfigError, "model_type 'qwen2' is not supported"),
    "more layers": (lambda f: edit_config(f, num_hidden_layers=10**7), CheckpointError,
                    "the config describes 10000000 layers, the checkpoint holds weights for 5"),
    "other width": (lambda f: edit_config(f, intermediate_size=4096), CheckpointError,
                    "'layers.0.feed_forward.w1.weight' has shape (172, 64), but the config describes (4096, 64)"),
    "cut weights": (lambda f: cut(f / "model.safetensors"), CheckpointError,
                    "model.safetensors: not a readable safetensors file: cut short, or with bytes added"),
    # the hand-written reading of the header passed these three; the loader's safe_open refused them
    "bytes added": (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes() + bytes(64)),
                    CheckpointError, "model.safetensors: not a readable safetensors file: cut short, or with bytes"),
    "overlapping tensors": (lambda f: edit_header(f / "model.safetensors", lambda h: h[
        "model.layers.0.input_layernorm.weight"].update(data_offsets=[0, 256])), CheckpointError,
        "invalid offset for tensor"),
    "unknown dtype": (lambda f: edit_header(f / "model.safetensors", lambda h: h["model.norm.weight"].update(
        dtype="F12")), CheckpointError, "unknown variant `F12`"),
    "header only": (lambda f: cut(f / "model.safetensors", 0.001), CheckpointError,
                    "model.safetensors: not a readable safetensors file"),
    "no weights": (lambda f: (f / "model.safetensors").unlink(), CheckpointError, "no model.safetensors"),
    "missing tensor": (lambda f: rewrite_safetensors(f / "model.safetensors",
                                                     lambda t: t.pop("model.layers.3.mlp.up_proj.weight")),
                       CheckpointError, "checkpoint has no weights for layers.3.feed_forward.w3.weight"),
    "foreign tensor": (lambda f: rewrite_safetensors(f / "model.safetensors",
                                                     lambda t: t.update({"model.vision.weight": torch.ones(2)})),
                       CheckpointError, "unexpected tensor 'model.vision.weight' for a Llama model"),
    "shard index": (lambda f: (f / "model.safetensors.index.json").write_text('{"weight_map": 5}'), CheckpointError,
                    "not a valid shard index"),
    "missing shard": (lambda f: (f / "model.safetensors.index.json").write_text(
        '{"weight_map": {"a": "model-00002.safetensors"}}'), CheckpointError, "shard files missing"),
    "damaged tokenizer": (lambda f: (f / "tokenizer.model").write_bytes(b"garbage" * 10), CheckpointError,
                          "tokenizer.model: not a valid SentencePiece tokenizer model"),
    # JSON, but no tokenizer: it passed, and serve stopped after listening and quantizing ("Model missing")
    "tokenizer.json not one": (lambda f: tokenizer_json_only(f, '{"version": "1.0"}'), CheckpointError,
                               "tokenizer.json: not a valid tokenizer.json (Model missing"),
    "tokenizer.json of another kind": (lambda f: tokenizer_json_only(f, WORD_LEVEL), CheckpointError,
                                       "tokenizer.json: not a byte-level BPE tokenizer (model 'WordLevel'"),
}


@pytest.mark.parametrize("damage", list(HF_DAMAGE))
def test_a_damaged_folder_is_refused_as_the_loader_refuses_it(damage: str, stories_hf: Path, tmp_path: Path) -> None:
    spoil, error, fragment = HF_DAMAGE[damage]
    folder = copy(stories_hf, tmp_path / "model")
    spoil(folder)
    with pytest.raises(error) as checked:
        check_model_files(folder)
    assert fragment in str(checked.value) and str(folder) in str(checked.value)
    with pytest.raises((CheckpointError, ConfigError)):  # the load says so too, later
        load_model(folder, "int8", quantizer="gptq")


def small_safetensors() -> bytes:
    return save({"a": torch.zeros(4, 8), "b": torch.ones(3, dtype=torch.int8)})


def edited(change: Callable[[dict], object]) -> bytes:
    return header_edited(small_safetensors(), change)


# a damaged safetensors file (from a valid one of tensors a [4, 8] F32 and b [3] I8) -> a fragment of the error
SAFETENSORS_DAMAGE: dict[str, tuple[Callable[[], bytes], str]] = {
    "0 bytes": (lambda: b"", "an empty file, no weights"),
    "5 bytes": (lambda: small_safetensors()[:5], "cut short: fewer than the 8 bytes"),
    "cut in its header": (lambda: small_safetensors()[:40], "cut short, or not a safetensors file: its header runs"),
    "cut in its data": (lambda: small_safetensors()[:-5], "cut short, or with bytes added"),
    "bytes added": (lambda: small_safetensors() + bytes(8), "cut short, or with bytes added"),
    "header length 2^63": (lambda: (1 << 63).to_bytes(8, "little") + small_safetensors()[8:],
                           "not a readable safetensors file: its first 8 bytes give a header longer"),
    "header not JSON": (lambda: with_header(b'{"a": {'), "invalid JSON in header"),
    "header not UTF-8": (lambda: with_header(b'{"\xff": 1}'), "invalid UTF-8 in header"),
    "header a list": (lambda: with_header(b"[1, 2]"), "invalid type: sequence"),
    "header a number": (lambda: with_header(b"5"), "invalid type: integer `5`"),
    "unknown dtype": (lambda: edited(lambda h: h["a"].update(dtype="Q4")), "unknown variant `Q4`"),
    "overlapping offsets": (lambda: edited(lambda h: h["b"].update(data_offsets=[0, 3])), "invalid offset"),
    "a gap between tensors": (lambda: edited(lambda h: h["b"].update(data_offsets=[129, 132])), "invalid offset"),
    "start after end": (lambda: edited(lambda h: h["b"].update(data_offsets=[131, 128])), "invalid offset"),
    "bytes out of the file": (lambda: edited(lambda h: h["b"].update(data_offsets=[128, 1000])),
                              "invalid shape, data type, or offset"),
    "bytes not the shape's": (lambda: edited(lambda h: h["a"].update(shape=[4, 9])),
                              "invalid shape, data type, or offset"),
    "a shape of 2^126 elements": (lambda: edited(lambda h: h["b"].update(shape=[1 << 62, 1 << 62, 4])), "overflow"),
    "a negative dimension": (lambda: edited(lambda h: h["b"].update(shape=[-3])), "expected usize"),
    "no data_offsets": (lambda: edited(lambda h: h["b"].pop("data_offsets")), "missing field `data_offsets`"),
    "an entry not a dict": (lambda: edited(lambda h: h.update(b=5)), "invalid type: integer `5`"),
    "__metadata__ not strings": (lambda: edited(lambda h: h.update(__metadata__={"k": 5})), "expected a string"),
}


@pytest.mark.parametrize("damage", list(SAFETENSORS_DAMAGE))
def test_a_damaged_safetensors_file_is_one_line_naming_it(damage: str, tmp_path: Path) -> None:
    """Read with safetensors' own safe_open, as the loader reads it: the header is refused if it does not describe
    exactly the file's bytes (the hand-written reading took overlapping tensors, gaps, bytes added, unknown dtypes)."""
    make, fragment = SAFETENSORS_DAMAGE[damage]
    file = tmp_path / "model.safetensors"
    file.write_bytes(make())
    with pytest.raises(CheckpointError) as refused:
        safetensors_shapes(file)
    message = str(refused.value)
    assert message.startswith(f"{file}: ") and fragment in message and "\n" not in message, message


def test_a_safetensors_file_that_is_a_folder_or_none(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"/model\.safetensors: not a readable safetensors file \(.*No such file"):
        safetensors_shapes(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=r"/model\.safetensors: a folder, not a safetensors file$"):
        safetensors_shapes(tmp_path / "model.safetensors")


def test_an_undamaged_safetensors_file(tmp_path: Path) -> None:
    (tmp_path / "model.safetensors").write_bytes(small_safetensors())
    assert safetensors_shapes(tmp_path / "model.safetensors") == {"a": (4, 8), "b": (3,)}


def test_no_tokenizer_is_refused(stories_hf: Path, tmp_path: Path) -> None:
    """The loader itself takes a folder without one (the weights alone load); serve and quantize refuse it."""
    folder = copy(stories_hf, tmp_path / "model")
    (folder / "tokenizer.model").unlink()
    (folder / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match=r"no tokenizer\.model or tokenizer\.json"):
        check_model_files(folder)
    (folder / "tokenizer.json").write_text('{"model": ')
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: not a valid tokenizer\.json \(EOF while parsing"):
        check_model_files(folder)


def test_a_folders_own_tokenizer_wins_over_a_tokenizer_model_in_its_parent(
        stories_hf: Path, stories_meta: Path, smollm2_gguf: Path, shared_dir: Path, tmp_path: Path) -> None:
    """A model folder copied into a folder that holds Llama-2's tokenizer.model: the parent's came before the
    folder's own tokenizer.json, and SmolLM2 was run with Llama-2's ids (garbage, rc 0). Only a Meta folder
    (params.json) takes its parent's, where Meta's download puts it, and only when it has none of its own."""
    shutil.copyfile(shared_dir / "models" / "llama2-tokenizer" / "tokenizer.model", tmp_path / "tokenizer.model")
    bpe = copy(stories_hf, tmp_path / "bpe")
    (bpe / "tokenizer.model").unlink()
    copy_tokenizer(write_tokenizer(GGUFFile.open(smollm2_gguf), tmp_path / "built"), bpe)  # SmolLM2's tokenizer.json
    assert check_model_files(bpe).path == bpe / "tokenizer.json"
    assert load_model(bpe, "fp32").tokenizer_path == bpe / "tokenizer.json"

    hf = copy(stories_hf, tmp_path / "hf")
    for name in ("tokenizer.model", "tokenizer.json"):
        (hf / name).unlink()
    with pytest.raises(CheckpointError, match=r"/hf: no tokenizer\.model or tokenizer\.json$"):
        check_model_files(hf)
    assert load_model(hf, "fp32").tokenizer_path is None

    meta = copy(stories_meta, tmp_path / "meta")
    assert check_model_files(meta).path == meta / "tokenizer.model"  # its own first
    (meta / "tokenizer.model").unlink()
    assert check_model_files(meta).path == tmp_path / "tokenizer.model"
    assert load_model(meta, "fp32").tokenizer_path == tmp_path / "tokenizer.model"
    (tmp_path / "tokenizer.model").unlink()
    with pytest.raises(CheckpointError, match=r"no tokenizer\.model or tokenizer\.json, nor a tokenizer\.model in "
                                              r"its parent folder"):
        check_model_files(meta)


@pytest.mark.parametrize(("make", "fragment"), [
    (lambda root: root, "not a model folder: expected int8serve.json, params.json or config.json"),
    (lambda root: root / "none", "no such model folder"),
])
def test_a_folder_that_is_no_model(make: Callable[[Path], Path], fragment: str, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=fragment):
        check_model_files(make(tmp_path))


def test_a_meta_folder_without_usable_shards(stories_meta: Path, tmp_path: Path) -> None:
    folder = copy(stories_meta, tmp_path / "meta")
    (folder / "consolidated.00.pth").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"consolidated\.00\.pth: an empty file"):
        check_model_files(folder)
    (folder / "consolidated.00.pth").unlink()
    with pytest.raises(CheckpointError, match=r"params\.json but no consolidated"):
        check_model_files(folder)


def test_a_damaged_int8_checkpoint(stories_int8_folder: Path, tmp_path: Path) -> None:
    folder = copy(stories_int8_folder, tmp_path / "q8")
    cut(folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="cut short"):
        check_model_files(folder)
    meta = json.loads((folder / "int8serve.json").read_text())
    (folder / "int8serve.json").write_text(json.dumps({**meta, "version": 9}))
    with pytest.raises(CheckpointError, match="format 'int8serve-int8' version 9"):
        check_model_files(folder)
    (folder / "int8serve.json").write_text(json.dumps({**meta, "config": {"dim": "64"}}))
    with pytest.raises(ConfigError, match=r"int8serve\.json"):
        check_model_files(folder)


def test_a_packed_copy_cut_short(stories_int8: LoadedModel, tmp_path: Path) -> None:
    packed = save_packed_checkpoint(stories_int8, tmp_path / "packed")
    cut(packed / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"bytes, int8serve\.json says"):
        check_model_files(packed)


def test_a_damaged_gguf_file(smollm2_gguf: Path, stories_hf: Path, tmp_path: Path) -> None:
    short = tmp_path / "cut.gguf"
    shutil.copyfile(smollm2_gguf, short)
    cut(short)
    with pytest.raises(CheckpointError, match=r"not a readable GGUF file \(.* does not lie within the file"):
        check_model_files(short)
    from gguf import GGMLQuantizationType as T

    q4_0 = write_gguf(tmp_path / "q4.gguf", stories_hf, lambda n, s: T.Q4_0 if "mlp.up" in n else T.F32)
    with pytest.raises(CheckpointError, match=r"tensor type Q4_0 is not supported \(e.g. blk.0.ffn_up.weight"):
        check_model_files(q4_0)
    other = write_gguf(tmp_path / "qwen.gguf", stories_hf, lambda n, s: T.F32, arch="qwen2")
    with pytest.raises(ConfigError, match="architecture 'qwen2' is not supported"):
        check_model_files(other)


def test_a_block_quantized_tensor_whose_rows_are_not_whole_blocks(stories_hf: Path, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """ffn_down [64, 172] declared Q8_0: 344 whole blocks, as the header's check asks, and the shape the config
    describes, so the check passed it and only the load found that rows of 172 values are not whole blocks of 32
    (after the models before it had loaded). The check refuses it now, in the load's words."""
    path = write_gguf(tmp_path / "q8.gguf", stories_hf, q8_0_where_possible)  # ffn_down stays F32: 172 % 32 != 0
    data = bytearray(path.read_bytes())
    name = b"blk.0.ffn_down.weight"
    kind = data.index(name) + len(name) + 4 + 2 * 8  # the name, its number of dimensions (uint32), two uint64 sizes
    assert data[kind - 16:kind + 4] == b"".join(n.to_bytes(8, "little") for n in (172, 64)) + bytes(4)  # F32 = 0
    data[kind:kind + 4] = gguf.GGMLQuantizationType.Q8_0.value.to_bytes(4, "little")
    path.write_bytes(data)
    expected = (f"{path}: Q8_0 tensor 'blk.0.ffn_down.weight' has shape (64, 172): its rows of 172 values do not "
                "split into blocks of 32")
    with pytest.raises(CheckpointError) as checked:
        check_model_files(path)
    assert str(checked.value) == expected
    monkeypatch.setenv("INT8SERVE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(CheckpointError) as loaded:
        load_model(path, "int8", quantizer="rtn")
    assert str(loaded.value) == expected


def byte_level_without_eos(writer: gguf.GGUFWriter, tokenizer_model: Path) -> None:
    """A byte-level BPE (`gpt2`) vocabulary of the model's size with no EOS (no id, none of the end-of-turn tokens):
    its tokenizer.json is written, and the engine's tokenizer refuses it."""
    size = sentencepiece.SentencePieceProcessor(model_file=str(tokenizer_model)).vocab_size()
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "ab", *(f"t{i}" for i in range(3, size))])
    writer.add_token_merges(["a b"])


# a GGUF vocabulary of which the loader makes no tokenizer the engine can use -> what the check and the load say
GGUF_VOCABULARY_DAMAGE: dict[str, tuple[Callable[[gguf.GGUFWriter, Path], None], str]] = {
    "one score fewer": (one_score_fewer, "tokenizer: GGUF vocabulary: 512 tokens, 511 scores, 512 types"),
    "byte-level without EOS": (byte_level_without_eos, "tokenizer: no EOS token (no eos_token in "),
}


@pytest.mark.parametrize("damage", list(GGUF_VOCABULARY_DAMAGE))
def test_a_gguf_vocabulary_the_loader_cannot_use_is_refused_in_the_loaders_words(
        damage: str, stories_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The check passed these (it asked only for the tokenizer's kind, tokens, and merges for `gpt2`); `serve` then
    stopped after listening and loading the models before (the second only when the server loaded its tokenizer)."""
    vocabulary, fragment = GGUF_VOCABULARY_DAMAGE[damage]
    bad = write_gguf(tmp_path / "bad.gguf", stories_hf, lambda n, s: gguf.GGMLQuantizationType.F32,
                     vocabulary=vocabulary)
    with pytest.raises(CheckpointError) as checked:
        check_model_files(bad)
    assert str(checked.value).startswith(f"{bad}: {fragment}"), checked.value
    monkeypatch.setenv("INT8SERVE_CACHE", str(tmp_path / "cache"))  # where the load writes the rebuilt tokenizer
    with pytest.raises(CheckpointError) as loaded:
        load_model(bad, "int8", quantizer="rtn")
    assert str(loaded.value) == str(checked.value)


def test_the_check_reads_no_tensor_and_imports_no_torch(smollm2_gguf: Path, stories_hf: Path) -> None:
    code = ("import sys; from pathlib import Path; from int8serve.engine.model_files import check_model_files; "
            f"check_model_files(Path({str(smollm2_gguf)!r})); check_model_files(Path({str(stories_hf)!r})); "
            "print('torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr
