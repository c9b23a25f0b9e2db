"""SmolLM2-135M-Instruct from its real Q4_1 GGUF, end to end: shape, weights, ChatML answers, the CLI.

The weights are checked against the `gguf` package's own reader and dequantizer (llama.cpp's reference Python),
independently of the engine's loader; answers against what transformers gives on the same dequantized weights
(../shared/PROVENANCE.md: "What is the capital of France?" -> "The capital of France is Paris.").
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import gguf
import pytest
import torch
from tests.engine.test_gguf import llama_cpp_permute

from int8serve.cli import main
from int8serve.engine.chat_template import get_template
from int8serve.engine.generate import generate
from int8serve.engine.int8 import Int8Linear, dequantize
from int8serve.engine.loader import LoadedModel, load_model, save_int8_checkpoint
from int8serve.engine.packed_checkpoint import save_packed_checkpoint
from int8serve.engine.sampling_params import SamplingParams
from int8serve.engine.scheduler import Engine, GenerationRequest
from int8serve.engine.tokenizer import AnyTokenizer, load_tokenizer
from int8serve.model_specs import BUILTIN_CARD

GREEDY = SamplingParams(temperature=0)


@pytest.fixture(scope="module")
def reader(smollm2_gguf: Path) -> gguf.GGUFReader:
    return gguf.GGUFReader(smollm2_gguf)


def reference_weight(reader: gguf.GGUFReader, name: str) -> torch.Tensor:
    tensor = next(t for t in reader.tensors if t.name == name)
    return torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())


def test_the_models_shape(smollm2_fp32: LoadedModel) -> None:
    config = smollm2_fp32.config
    assert (config.n_layers, config.dim, config.n_heads, config.n_kv_heads, config.head_dim) == (30, 576, 9, 3, 64)
    assert (config.vocab_size, config.hidden_dim, config.rope_theta, config.norm_eps) == (49152, 1536, 100000.0, 1e-5)
    assert config.tie_embeddings and config.max_seq_len == 8192
    assert smollm2_fp32.source_format == "gguf" and smollm2_fp32.tokenizer_path.name == "tokenizer.json"


def test_weights_are_the_gguf_packages_dequantized_ones(smollm2_fp32: LoadedModel, reader: gguf.GGUFReader) -> None:
    weights = smollm2_fp32.model.state_dict()
    assert torch.equal(weights["layers.0.feed_forward.w2.weight"], reference_weight(reader, "blk.0.ffn_down.weight"))
    assert torch.equal(weights["layers.29.attention.wv.weight"], reference_weight(reader, "blk.29.attn_v.weight"))
    # q/k rows: llama.cpp's converter permuted them to Meta's order, the loader permutes them back
    wq = weights["layers.3.attention.wq.weight"].numpy()
    assert torch.equal(torch.from_numpy(llama_cpp_permute(wq, 9)), reference_weight(reader, "blk.3.attn_q.weight"))
    wk = weights["layers.3.attention.wk.weight"].numpy()
    assert torch.equal(torch.from_numpy(llama_cpp_permute(wk, 3)), reference_weight(reader, "blk.3.attn_k.weight"))
    embedding = reference_weight(reader, "token_embd.weight")  # Q8_0
    assert torch.equal(weights["tok_embeddings.weight"], embedding)
    assert torch.equal(weights["output.weight"], embedding)  # tied: the head is the embedding


def test_the_int8_head_is_the_quantized_embedding(smollm2_int8: LoadedModel, smollm2_fp32: LoadedModel) -> None:
    head = smollm2_int8.model.output
    assert isinstance(head, Int8Linear)
    embedding = smollm2_fp32.model.tok_embeddings.weight
    error = (dequantize(*head.quantized()) - embedding).abs()
    assert error.max() <= embedding.abs().max() / 127  # within a quantization step of the largest scale


def chat(loaded: LoadedModel, tokenizer: AnyTokenizer, question: str, max_tokens: int = 24) -> str:
    segments = get_template("chatml").render_messages([{"role": "user", "content": question}])
    ids = tokenizer.encode_segments(segments)
    return tokenizer.decode(generate(loaded.model, ids, GREEDY, max_tokens, tokenizer.stop_ids))


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_greedy_chatml_answers_paris(precision: str, smollm2_fp32: LoadedModel, smollm2_int8: LoadedModel,
                                     smollm2_tokenizer: AnyTokenizer) -> None:
    loaded = smollm2_fp32 if precision == "fp32" else smollm2_int8
    assert chat(loaded, smollm2_tokenizer, "What is the capital of France?") == "The capital of France is Paris."


def test_generation_stops_at_the_end_of_turn(smollm2_int8: LoadedModel, smollm2_tokenizer: AnyTokenizer) -> None:
    segments = get_template("chatml").render_messages([{"role": "user", "content": "What is the capital of France?"}])
    ids = smollm2_tokenizer.encode_segments(segments)
    tokens = list(generate(smollm2_int8.model, ids, GREEDY, 64, smollm2_tokenizer.eos_id))
    assert len(tokens) < 64  # <|im_end|> came (not yielded) long before the limit
    model = smollm2_int8.model
    logits = model(torch.tensor([ids + tokens]), model.new_cache(1, 64), [0], [0])[0]
    assert int(logits.argmax()) in smollm2_tokenizer.stop_ids


@pytest.fixture
def _cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INT8SERVE_CACHE", str(tmp_path / "cache"))


@pytest.mark.usefixtures("_cache")
def test_cli_generate_with_the_models_own_template(smollm2_gguf: Path, capsys: pytest.CaptureFixture) -> None:
    # under its card (chatml): a plain PATH runs under the Llama-2 card's template, as serve runs it
    main(["generate", "--model", f"{BUILTIN_CARD}={smollm2_gguf}", "--dtype", "fp32", "--no-system",
          "--temperature", "0", "--max-tokens", "16", "What is the capital of France?"])
    captured = capsys.readouterr()
    assert captured.out == "The capital of France is Paris.\n"
    assert "finish stop" in captured.err


@pytest.mark.usefixtures("_cache")
def test_cli_eval_ppl_on_bpe_text(smollm2_gguf: Path, shared_dir: Path, capsys: pytest.CaptureFixture) -> None:
    main(["eval-ppl", "--model", str(smollm2_gguf), "--dtype", "fp32", "--text", str(shared_dir / "corpus" /
          "tinystories.txt"), "--window", "128", "--max-windows", "2"])
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("fp32: PPL ") and line.endswith("over 254 tokens in 2 windows")  # no BOS: 127 a window
    assert 1.5 < float(line.split()[2]) < 15  # a trained model on simple stories


def test_the_engine_serves_it_with_bpe_streaming_and_its_stop_tokens(smollm2_int8: LoadedModel,
                                                                     smollm2_tokenizer: AnyTokenizer) -> None:
    """The scheduler path the server runs: streamed BPE text, finished by <|im_end|> (not yielded, no text)."""
    engine = Engine(smollm2_int8.model, smollm2_tokenizer, max_slots=2, max_seq_len=256, prefill_chunk=32)
    try:
        engine.start()
        segments = get_template("chatml").render_messages([{"role": "user", "content": "What is the capital of "
                                                                                        "France?"}])
        request = GenerationRequest(smollm2_tokenizer.encode_segments(segments), 24, GREEDY)
        events = list(engine.submit(request).iter_events(timeout=120))
    finally:
        engine.stop()
    assert "".join(e.text for e in events) == "The capital of France is Paris."
    assert events[-1].finish_reason == "stop"
    assert not {e.token_id for e in events} & smollm2_tokenizer.stop_ids


def help_of(command: str) -> str:
    """`int8serve COMMAND --help`'s text."""
    with pytest.raises(SystemExit), contextlib.redirect_stdout(io.StringIO()) as out:
        main([command, "--help"])
    return out.getvalue()


@pytest.mark.parametrize("layout", ["portable", "packed"])
def test_int8_checkpoints_keep_the_bpe_tokenizer(layout: str, smollm2_int8: LoadedModel, tmp_path: Path) -> None:
    """`int8serve quantize` (portable) and the model cache (packed) write tokenizer.json + tokenizer_config.json, and
    the copy loads, tokenizes and answers as the model it was written from."""
    if layout == "portable":
        folder = save_int8_checkpoint(smollm2_int8, tmp_path / "int8")
        loaded = load_model(folder, "int8")
    else:
        folder = save_packed_checkpoint(smollm2_int8, tmp_path / "packed")
        loaded = load_model(folder, "int8")
    assert {p.name for p in folder.iterdir()} >= {"tokenizer.json", "tokenizer_config.json"}
    if layout == "portable":  # what `quantize --help` says it writes
        help_text = " ".join(help_of("quantize").split())
        assert all(p.name in help_text for p in folder.iterdir()), sorted(p.name for p in folder.iterdir())
        assert "tokenizer.json + tokenizer_config.json for a byte-level BPE" in help_text
    assert loaded.tokenizer_path == folder / "tokenizer.json"
    tokenizer = load_tokenizer(loaded.tokenizer_path)
    assert (tokenizer.eos_id, tokenizer.add_bos, tokenizer.stop_ids) == (2, False, {0, 2})
    assert chat(loaded, tokenizer, "What is the capital of France?") == "The capital of France is Paris."
