"""int8serve against llama.cpp on the same CPU, in the same run, on the same random weights (issue #10, item 5).

Why: a user choosing how to serve Llama-2-7B on a CPU compares us with llama.cpp first, and figures measured on
another day (or another CPU) do not compare: this machine's bandwidth drifts by 2x within seconds and others share
its cores. So this script builds llama.cpp here, gives both engines the same weights, and alternates them within
one run; the ratios ours ÷ llama.cpp are the result, the absolute figures are context.

1. llama.cpp's `llama-bench` and `llama-batched-bench` are built once from the llama.cpp sources inside the
   `llama-cpp-python` sdist on PyPI (`benchmarks/llamacpp_build.py`; ~10 minutes on 2 cores, cached).
2. One random int8 model of the Llama-2-7B shape (`benchmarks/engine.py`'s `build_random_int8_model`, scales
   rounded to bf16 so that fp16 holds them exactly) is written twice: as our int8 checkpoint (`int8serve.json` +
   `model.safetensors`) and as a GGUF Q8_0 file whose blocks hold the very same int8 values and scales (a Q8_0
   block is 32 int8 values and an fp16 scale). The weights have our default scheme, a scale per 32 input values
   (`--group-size`, as `int8serve quantize` and `serve` make them), which is Q8_0's own: each block keeps its
   scale; with a coarser scheme (64, 128, 0 = per row) a scale is repeated over its blocks. q/k rows go to GGUF in
   Meta's interleaved rotary order, as llama.cpp's converter writes them; the vocabulary is synthetic (`<unk>`,
   `<s>`, `</s>`, the 256 byte tokens, then filler pieces): the weights are random, so no text is meaningful anyway.
   Only the token embedding differs: ours is fp32, llama.cpp's is Q8_0 of it (a lookup, never streamed).
3. In rounds that alternate the engine that goes first (llama.cpp then ours, then ours then llama.cpp, ...), with
   2 threads each: decode tok/s at batch 1 (`llama-bench -n 32`; ours: 32 steps from position 0), aggregate decode
   tok/s of 4 sequences (`llama-batched-bench -npp 64 -ntg 32 -npl 4`; ours: 4 cache slots at position 64 decoding
   32 steps together through one model forward per step) and prefill tok/s of a 512-token prompt
   (`llama-bench -p 512`; ours: `generate.prefill`, one forward of 512 tokens). Ours also prefills the same prompt
   as the server's scheduler does, in aligned chunks of its default 128 tokens (row-exact where the scheduler would
   make them so), against the same llama.cpp figure: alone in the engine (512 tokens a step where the bf16 prefill
   kernel takes the chunks, else one chunk: `scheduler.solo_prefill_chunks`) and beside running streams (one chunk a
   step). Ours runs in a child process per round, so only one engine's weights are in memory at a time.
4. The table (both engines, ratios, the bandwidth roofline measured in this run, CPU and flags, our kernel path)
   goes into this script's section of docs/benchmarks.md with --write.

With `--gguf FILE` the weights are a real model's GGUF file instead (issue 15: SmolLM2-135M-Instruct.Q4_1.gguf,
the built-in model): llama.cpp runs the file as it is (Q4_1), int8serve loads it as `serve --model FILE` does (the
Q4_1 weights dequantized, then GPTQ-rounded to our int8 format, once, into the model cache; each round's child maps
that copy). The weights then differ in format, not in the model: what is compared is what a user of each gets from
the same file. The issue #10 goals are for the 7B shape and are not applied.

    python -m benchmarks.vs_llamacpp --layers 2                      # quick check (~5 minutes after the build)
    python -m benchmarks.vs_llamacpp --write docs/benchmarks.md     # 32 layers: ~14 GB of files, ~30 minutes
    python -m benchmarks.vs_llamacpp --gguf ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \
        --rounds 3 --write docs/benchmarks.md                       # SmolLM2: ~5 minutes after the build
    python -m benchmarks.vs_llamacpp --isa avx2 --write docs/benchmarks.md  # both engines' AVX2 code
    python -m benchmarks.vs_llamacpp --isa avxvnni --write docs/benchmarks.md  # AVX2 + AVX-VNNI code
    python -m benchmarks.vs_llamacpp --isa avx512vnni --write docs/benchmarks.md  # AVX-512 VNNI, no BF16 or AMX

Our side keeps the server's default KV cache (`--kv-cache auto`: fp16, or bf16 where prefill attends through SDPA on
AMX tiles; the report names it), llama.cpp its default f16. With `--kv-cache int8` both engines keep 8-bit keys and
values: ours `--kv-cache int8` (engine/kv_int8.py), llama.cpp `-ctk q8_0 -ctv q8_0`; `--kv-cache fp16` or `bf16` hold
ours to one 16-bit cache; with `--batch-prompt N` the 4 sequences decode from position N instead of 64, where the keys
and values they read weigh more beside the weights (4 x 2048 positions of the 7B: 4.3 GB of bf16 a step, 7.0 GB of
weights). Each makes its own section, without the issue's goals (they are for the defaults).

With `--isa avx2` both engines run the code of an AVX2-only CPU (a Zen 2/3) on this one: llama.cpp built for AVX2
only (`llamacpp_build.py --isa avx2`), ours with `INT8SERVE_KERNEL=avx2`, `INT8SERVE_ATTENTION=avx2` and
`INT8SERVE_ACTIVATION=avx2` (our kernels' AVX2 paths; prefill then multiplies through the int8 kernel's avx2 GEMM,
as on an AVX2-only CPU), torch's own operations held to AVX2 (`ATEN_CPU_CAPABILITY=avx2`) and oneDNN too
(`ONEDNN_MAX_CPU_ISA=AVX2`). The section is kept apart from the native one. `--isa avxvnni` holds both to AVX2 and
AVX-VNNI, the code of an AVX-VNNI CPU without AVX-512 (Intel's client CPUs since Alder Lake, whose P-cores are this
project's Sapphire Rapids' cores without AVX-512 or AMX): llama.cpp built so (`llamacpp_build.py --isa avxvnni`), ours
with `INT8SERVE_KERNEL=avxvnni` (its GEMM multiplies prefill with vpdpwssd) and oneDNN at `AVX2_VNNI`; a section of its
own too. `--isa avx512vnni` holds both to AVX-512 with VNNI, without AVX512-BF16 or AMX: the code of Intel's Cascade
Lake and Ice Lake Xeons (llama.cpp built so; ours `INT8SERVE_KERNEL=vnni512`, whose GEMM takes prefill as on a Zen 4,
the avx512 attention and activation kernels, oneDNN at `AVX512_CORE_VNNI`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import gc
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from benchmarks.common import write_section
from benchmarks.engine import (
    LLAMA2_7B,
    BandwidthProbe,
    build_random_int8_model,
    decode_bytes_per_step,
    fill_cache,
    int8_linears,
    measure_bandwidth,
    random_tokens,
    server_kv_cache,
    time_decode,
    time_prefill,
    time_runs,
)
from benchmarks.llamacpp_build import DEFAULT_VERSION, ISA_FLAGS, BuildError, LlamaCpp, ensure_built
from benchmarks.machine import CpuShares, QuietWaiter, cpu_label, huge_pages_gb, machine_description, rss_gb
from int8serve.engine.cache_files import cache_dir
from int8serve.engine.chunking import aligned_chunk
from int8serve.engine.config import ModelConfig
from int8serve.engine.int8 import COMPUTE_DTYPE, DEFAULT_GROUP_SIZE, GROUP_SIZES, Int8Linear
from int8serve.engine.loader import LoadedModel, save_int8_checkpoint
from int8serve.engine.model import Transformer
from int8serve.engine.model_cache import load_cached
from int8serve.engine.scheduler import DEFAULT_PREFILL_CHUNK, DEFAULT_SOLO_PREFILL_TOKENS, solo_prefill_chunks

SCRIPT = "vs_llamacpp.py"
WEIGHTS_VERSION = 2  # bump when the files written change, so that cached ones are rewritten
QK8_0 = 32  # values per Q8_0 block
THREADS = 2
PROMPT = 512  # prefill figure: tokens of one prompt
GEN = 32  # decode figures: tokens generated per sequence
BATCH = 4  # sequences decoding together
BATCH_PROMPT = 64  # tokens of each sequence's prompt before the batched decode (llama-batched-bench -npp)
# issue #10: ours ÷ llama.cpp (the prefill goal holds for the server's chunking too: it is what users get)
GOALS = {"decode_b1": 1.05, "decode_b4": 1.3, "prefill": 2.0, "prefill_server": 2.0, "prefill_busy": 2.0}
LABELS = {"decode_b1": "decode tok/s, batch 1",
          "decode_b4": f"aggregate decode tok/s, {BATCH} sequences",
          "prefill": f"prefill tok/s, {PROMPT}-token prompt",
          "prefill_server": f"prefill tok/s, the same prompt alone in the server: its {DEFAULT_PREFILL_CHUNK}-token "
                            f"chunks, {DEFAULT_SOLO_PREFILL_TOKENS} tokens a step where the bf16 prefill kernel "
                            "takes them, else one chunk (llama.cpp: the figure above)",
          "prefill_busy": f"prefill tok/s, the same prompt beside running streams: one {DEFAULT_PREFILL_CHUNK}-token "
                          "chunk a step, the decode steps between them not counted (llama.cpp: the figure above)"}
# what --isa avx2 / avxvnni set for our side (the child process inherits it, and reads it before torch starts); our
# attention and activation kernels have no AVX-VNNI code of their own (their avx2 paths), nor has torch
AVX2_SETTINGS = {"INT8SERVE_KERNEL": "avx2", "INT8SERVE_ATTENTION": "avx2", "INT8SERVE_ACTIVATION": "avx2",
                 "ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
ISA_SETTINGS = {"avx2": AVX2_SETTINGS,
                "avxvnni": {**AVX2_SETTINGS, "INT8SERVE_KERNEL": "avxvnni", "ONEDNN_MAX_CPU_ISA": "AVX2_VNNI"},
                "avx512vnni": {"INT8SERVE_KERNEL": "vnni512", "INT8SERVE_ATTENTION": "avx512",
                               "INT8SERVE_ACTIVATION": "avx512", "ATEN_CPU_CAPABILITY": "avx512",
                               "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}}
ISA_CPU_FLAGS = {"avx2": ("avx2",), "avxvnni": ("avx2", "avx_vnni"),  # what the CPU needs for each (/proc/cpuinfo)
                 "avx512vnni": ("avx512f", "avx512bw", "avx512vl", "avx512_vnni")}
ISA_CODE = {"avx2": "AVX2 code", "avxvnni": "AVX2 and AVX-VNNI code",  # the section's words for what both ran
            "avx512vnni": "AVX-512 VNNI code without BF16 or AMX"}
ISAS = tuple(ISA_FLAGS)  # --isa (llamacpp_build's): each engine's fastest code, or both held to older code (docstring)
assert set(ISAS) == {"native", *ISA_SETTINGS}, "every llama.cpp build held to an ISA needs our side's settings above"
KV_ENV = "INT8SERVE_KV_CACHE"  # --kv-cache for our child process (the server's variable of the same setting)
PREFILL_ENV = "INT8SERVE_PREFILL_MATMUL"  # --prefill-matmul int8 or bf16 for our child process
# Our --kv-cache -> llama.cpp's flags: its default KV cache is f16, beside our 16-bit ones (auto: fp16, or bf16 on AMX
# CPUs whose prefill attends through SDPA, Transformer.default_kv_cache)
LLAMA_KV = {"auto": [], "fp16": [], "bf16": [], "int8": ["-ctk", "q8_0", "-ctv", "q8_0"]}


def llama_cpp_tools(batch_prompt: int = BATCH_PROMPT, kv_cache: str = "auto") -> dict[str, str]:
    """How llama.cpp measures each figure (the report's first column)."""
    kv = "".join(f" {word}" for word in LLAMA_KV[kv_cache])
    return {"decode_b1": f"`llama-bench -n {GEN}{kv}`",
            "decode_b4": f"`llama-batched-bench -npp {batch_prompt} -ntg {GEN} -npl {BATCH}{kv}`",
            "prefill": f"`llama-bench -p {PROMPT}{kv}`",
            "prefill_server": f"`llama-bench -p {PROMPT}{kv}`",
            "prefill_busy": f"`llama-bench -p {PROMPT}{kv}`"}


def log(message: str) -> None:
    print(f"[vs_llamacpp] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# The same weights, twice


def model_config(layers: int) -> ModelConfig:
    return dataclasses.replace(LLAMA2_7B, n_layers=layers)


def build_model(config: ModelConfig, group_size: int = DEFAULT_GROUP_SIZE, seed: int = 0) -> Transformer:
    """`build_random_int8_model` with its scales rounded to bf16: exact in our kernel's bf16 and in Q8_0's fp16."""
    model = build_random_int8_model(config, seed, group_size)
    for linear in int8_linears(model):
        q, scale = linear.quantized()
        linear.set_quantized(q, scale.to(COMPUTE_DTYPE).float())
    return model


def meta_rotary_order(rows: Tensor, n_heads: int) -> Tensor:
    """q/k rows (or their scales) in our Hugging Face rotary order -> GGUF's (Meta's) interleaved order.

    The inverse of `loader.unpermute_meta_rotary`: llama.cpp's converter applies the same permutation."""
    shape = rows.shape
    head_rows = shape[0] // n_heads
    return rows.reshape(n_heads, 2, head_rows // 2, -1).transpose(1, 2).reshape(shape)


def q8_0_blocks(q: Tensor, scales: Tensor) -> np.ndarray:
    """int8 [N, K] with its scales ([N] per row, or [N, G] per group of K / G values, a multiple of 32) -> Q8_0 bytes
    [N, K / 32 * 34]: per block of 32 values its fp16 scale, then the values."""
    n, k = q.shape
    if k % QK8_0:
        raise ValueError(f"Q8_0 needs rows of a multiple of {QK8_0} values, not {k}")
    groups = scales.reshape(n, -1)
    if (k // QK8_0) % groups.shape[1]:
        raise ValueError(f"{groups.shape[1]} scale groups per row do not split {k // QK8_0} blocks of {QK8_0}")
    exact = groups.to(torch.float16)
    if not torch.equal(exact.float(), groups.float()):
        raise ValueError("a scale is not exact in fp16: the GGUF would hold other weights than ours")
    per_block = exact.repeat_interleave(k // QK8_0 // groups.shape[1], dim=1).contiguous()
    d = per_block.view(torch.uint8).reshape(n, k // QK8_0, 2)
    values = q.view(torch.uint8).reshape(n, k // QK8_0, QK8_0)
    return torch.cat([d, values], dim=2).reshape(n, -1).numpy()


def q8_0_from_float(weight: Tensor) -> np.ndarray:
    """fp32 [N, K] -> Q8_0 bytes, quantized per block of 32 as llama.cpp does (scale = absmax / 127)."""
    n, k = weight.shape
    blocks = weight.float().reshape(n, k // QK8_0, QK8_0)
    d = (blocks.abs().amax(dim=2) / 127.0).to(torch.float16)
    safe = torch.where(d > 0, d.float(), torch.ones_like(d, dtype=torch.float32))
    values = torch.round(blocks / safe[..., None]).clamp(-127, 127).to(torch.int8)
    raw = torch.cat([d.contiguous().view(torch.uint8).reshape(n, -1, 2), values.view(torch.uint8)], dim=2)
    return raw.reshape(n, -1).numpy()


GGUF_LINEARS = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
                "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w2": "ffn_down",
                "feed_forward.w3": "ffn_up"}


def gguf_tensors(model: Transformer) -> Iterator[tuple[str, np.ndarray, bool]]:
    """(GGUF name, data, is Q8_0) of every tensor, made one at a time (the 7B file is written as it is made)."""
    config = model.config
    yield "token_embd.weight", q8_0_from_float(model.tok_embeddings.weight), True
    for index, layer in enumerate(model.layers):
        yield f"blk.{index}.attn_norm.weight", layer.attention_norm.weight.float().numpy(), False
        for ours, theirs in GGUF_LINEARS.items():
            linear: Int8Linear = layer.get_submodule(ours)
            q, scale = linear.quantized()
            heads = {"attention.wq": config.n_heads, "attention.wk": config.n_kv_heads}.get(ours)
            if heads:
                q, scale = meta_rotary_order(q, heads), meta_rotary_order(scale, heads)
            yield f"blk.{index}.{theirs}.weight", q8_0_blocks(q, scale), True
        yield f"blk.{index}.ffn_norm.weight", layer.ffn_norm.weight.float().numpy(), False
    yield "output_norm.weight", model.norm.weight.float().numpy(), False
    yield "output.weight", q8_0_blocks(*model.output.quantized()), True


def synthetic_vocab(size: int) -> tuple[list[str], list[float], list[int]]:
    """A SentencePiece-style vocabulary llama.cpp accepts: <unk>, <s>, </s>, the 256 byte pieces, then fillers."""
    import gguf

    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    if size < len(tokens) + 1:
        raise ValueError(f"a vocabulary of {size} is too small for the {len(tokens)} special and byte tokens")
    tokens += [f"▁t{i}" for i in range(size - len(tokens))]
    types += [gguf.TokenType.NORMAL] * (size - len(types))
    scores = [0.0] * 259 + [-float(i) for i in range(size - 259)]
    return tokens, scores, [int(t) for t in types]


def gguf_metadata(writer: object, config: ModelConfig) -> None:
    import gguf

    assert isinstance(writer, gguf.GGUFWriter)
    writer.add_name(f"random int8 Llama-2-7B shape, {config.n_layers} layers (benchmarks/{SCRIPT})")
    writer.add_context_length(config.max_seq_len)
    writer.add_embedding_length(config.dim)
    writer.add_block_count(config.n_layers)
    writer.add_feed_forward_length(config.hidden_dim)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, scores, types = synthetic_vocab(config.vocab_size)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(config.bos_id)
    writer.add_eos_token_id(config.eos_id)
    writer.add_unk_token_id(0)


def write_gguf(model: Transformer, path: Path) -> None:
    """The model as a GGUF Q8_0 file (llama architecture), its tensors written one at a time."""
    import gguf

    writer = gguf.GGUFWriter(None, "llama")
    gguf_metadata(writer, model.config)
    for name, data, quantized in gguf_tensors(model):  # first pass: shapes and sizes only
        writer.add_tensor_info(name, data.shape, data.dtype, data.nbytes,
                               raw_dtype=gguf.GGMLQuantizationType.Q8_0 if quantized else None)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for _, data, _ in gguf_tensors(model):
        writer.write_tensor_data(data)
    writer.close()


@dataclass(frozen=True)
class WeightFiles:
    checkpoint: Path  # what our side loads: our int8 checkpoint folder, or (--gguf) the GGUF file itself
    gguf: Path
    ours_bytes: int  # int8 weights + bf16 scales our decode step reads
    q8_0_bytes: int  # weights a llama.cpp decode step reads (all linears and the head, not the embedding lookup)
    gguf_type: str = "Q8_0"  # the file's quantization, as llama.cpp names it
    description: str = ""  # the model, for the report (--gguf)


def weights_dir(root: Path, layers: int, group_size: int = DEFAULT_GROUP_SIZE) -> Path:
    return root / f"llama2-7b-shape-{layers}L-g{group_size}-v{WEIGHTS_VERSION}"


def write_weights(config: ModelConfig, folder: Path, group_size: int = DEFAULT_GROUP_SIZE) -> WeightFiles:
    """Both files of one random model into `folder` (skipped when a finished earlier run left them there)."""
    done = folder / "done.json"
    if done.is_file():
        info = json.loads(done.read_text())
        log(f"reusing the weights in {folder}")
        return WeightFiles(folder / "int8", folder / "model-q8_0.gguf", info["ours_bytes"], info["q8_0_bytes"])
    folder.mkdir(parents=True, exist_ok=True)
    log(f"writing the same random weights ({config.n_layers} layers) as an int8 checkpoint and a GGUF Q8_0 file ...")
    started = time.perf_counter()
    model = build_model(config, group_size)
    ours_bytes = decode_bytes_per_step(model)
    q8_0_bytes = sum(lin.in_features * lin.out_features // QK8_0 * (QK8_0 + 2) for lin in int8_linears(model))
    source = Path(f"random int8 weights, Llama-2-7B shape, {config.n_layers} layers (benchmarks/{SCRIPT})")
    save_int8_checkpoint(LoadedModel(model, config, None, "int8", source), folder / "int8",
                         overwrite=True)  # a run cut short left its part
    write_gguf(model, folder / "model-q8_0.gguf")
    del model
    gc.collect()
    done.write_text(json.dumps({"ours_bytes": ours_bytes, "q8_0_bytes": q8_0_bytes}))
    log(f"  written in {time.perf_counter() - started:.0f} s")
    return WeightFiles(folder / "int8", folder / "model-q8_0.gguf", ours_bytes, q8_0_bytes)


def gguf_files(path: Path) -> WeightFiles:
    """A real model's GGUF file (--gguf): our int8 copy of it made (or found) in the model cache, as `serve` would
    make it, and the bytes each engine's decode step reads."""
    import gguf

    log(f"loading {path} as int8serve serves it (int8, through the model cache: quantized once) ...")
    started = time.perf_counter()
    loaded = load_cached(path)
    ours_bytes = decode_bytes_per_step(loaded.model)
    config = loaded.config
    del loaded
    gc.collect()
    log(f"  ready in {time.perf_counter() - started:.0f} s")
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    head = "output.weight" if "output.weight" in tensors else "token_embd.weight"  # tied: the embedding is the head
    matrices = [t for n, t in tensors.items() if (n.startswith("blk.") and len(t.shape) == 2) or n == head]
    theirs = sum(int(t.n_bytes) for t in matrices)
    file_type = gguf.LlamaFileType(int(reader.fields["general.file_type"].contents())).name.removeprefix("MOSTLY_")
    name = reader.fields["general.name"].contents() if "general.name" in reader.fields else path.stem
    description = (f"{name} ({config.n_layers} layers, dim {config.dim}, {config.n_heads}/{config.n_kv_heads} "
                   f"query/key-value heads, vocab {config.vocab_size}, "
                   f"{'tied' if config.tie_embeddings else 'untied'} head)")
    return WeightFiles(path, path, ours_bytes, theirs, file_type, description)


# ---------------------------------------------------------------------------------------------------------------
# Our side


class NoProbe(BandwidthProbe):
    """`time_decode` samples the bandwidth before each step; this run measures it once per round instead."""

    def __init__(self) -> None:
        pass

    def sample(self) -> float:
        return float("nan")


@dataclass
class Figure:
    """One engine's figure in one round: tok/s and the share of the CPUs other processes used meanwhile."""

    tok_s: float
    other_load: float


def ours_prefill(model: Transformer, prompt: int, reps: int = 2) -> Figure:
    """tok/s of prefilling one `prompt`-token prompt (`generate.prefill`, as the engine does), mean of `reps`
    after a short warm-up prompt long enough to take the prefill (dense) path."""
    timing = time_prefill(model, model.new_cache(1, prompt + 8), prompt, reps, warmup_tokens=64)
    return Figure(prompt / statistics.mean(timing.seconds), timing.other_load)


def ours_server_prefill(model: Transformer, prompt: int, alone: bool, chunk: int = DEFAULT_PREFILL_CHUNK,
                        reps: int = 2) -> Figure:
    """tok/s of prefilling one `prompt`-token prompt as the scheduler does: aligned chunks of `chunk` tokens,
    row-exact where the model makes them so (`Transformer.row_exact_prefill`, with the server's 4 slots); `alone`
    in the engine, as many chunks a step as the scheduler then takes (`solo_prefill_chunks`), else one; mean of
    `reps` after one warm-up prefill of the whole prompt."""
    row_exact = model.row_exact_prefill(chunk, BATCH)
    chunks = solo_prefill_chunks(model, chunk) if alone else 1
    cache = model.new_cache(1, prompt + chunk)
    tokens = random_tokens((prompt,), model.config.vocab_size, torch.Generator().manual_seed(2)).tolist()

    def run() -> None:
        done = 0
        while done < prompt:
            end, how = aligned_chunk(done, prompt, chunk, cache.max_seq_len, row_exact=row_exact, chunks=chunks)
            model(torch.tensor([tokens[done:end]]), cache, [0], [done], prefill=how)
            done = end

    run()
    timing = time_runs(run, reps)
    return Figure(prompt / statistics.mean(timing.seconds), timing.other_load)


def ours_decode(model: Transformer, batch: int, start: int, gen: int) -> Figure:
    """tok/s of `batch` slots decoding `gen` steps together from position `start` (tokens ÷ total time)."""
    cache = model.new_cache(batch, start + gen + 8)
    fill_cache(cache)
    timing = time_decode(model, cache, list(range(batch)), [start] * batch, gen, NoProbe(), warmup=1)
    return Figure(batch * gen / sum(timing.seconds), timing.other_load)


def measure_ours(model: Transformer, prompt: int = PROMPT, gen: int = GEN,
                 batch_prompt: int = BATCH_PROMPT, names: Sequence[str] = tuple(GOALS)) -> dict[str, Figure]:
    """Our figures `names`, defined as llama.cpp's tools define theirs (see the module docstring)."""
    figures = {}
    for name, measure in (("decode_b1", lambda: ours_decode(model, 1, 0, gen)),
                          ("decode_b4", lambda: ours_decode(model, BATCH, batch_prompt, gen)),
                          ("prefill", lambda: ours_prefill(model, prompt)),
                          ("prefill_server", lambda: ours_server_prefill(model, prompt, alone=True)),
                          ("prefill_busy", lambda: ours_server_prefill(model, prompt, alone=False))):
        if name not in names:
            continue
        figures[name] = measure()
        log(f"    {name}: {figures[name].tok_s:.2f} tok/s (others used {figures[name].other_load:.0%} of the CPUs)")
    return figures


def ours_child(checkpoint: Path, batch_prompt: int = BATCH_PROMPT) -> None:
    """In the child process: load our checkpoint (or map the cached int8 copy of a GGUF file), measure our figures
    (with the path settings the parent's --isa put in the environment, and its --kv-cache), print them as JSON on
    stdout."""
    torch.set_num_threads(THREADS)
    started = time.perf_counter()
    model = load_cached(checkpoint).model
    model.set_kv_cache(server_kv_cache(model, os.environ.get(KV_ENV, "auto")))
    log(f"  ours: loaded in {time.perf_counter() - started:.0f} s, resident {rss_gb():.2f} GB, "
        f"{huge_pages_gb():.2f} GB of it on 2 MB pages; {model.kv_cache} KV cache")
    figures = measure_ours(model, batch_prompt=batch_prompt)
    log(f"  ours: {huge_pages_gb():.2f} GB on 2 MB pages after measuring")
    print(json.dumps({"kv_cache": model.kv_cache,
                      "figures": {name: dataclasses.asdict(f) for name, f in figures.items()}}))


def run_ours(checkpoint: Path, batch_prompt: int = BATCH_PROMPT) -> tuple[dict[str, Figure], str]:
    """Our figures, measured in a child process (so that our weights leave memory before llama.cpp runs), and the
    KV cache it kept."""
    command = [sys.executable, "-m", "benchmarks.vs_llamacpp", "--ours-child", str(checkpoint),
               "--batch-prompt", str(batch_prompt)]
    result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=False,
                            env={**os.environ, "OMP_NUM_THREADS": str(THREADS)})
    if result.returncode != 0:
        raise RuntimeError(f"measuring int8serve failed (exit {result.returncode}); see its output above")
    return parse_ours(result.stdout)


def parse_ours(stdout: str) -> tuple[dict[str, Figure], str]:
    """ours_child's last line: our figures and the KV cache it kept."""
    measured = json.loads(stdout.splitlines()[-1])
    return {name: Figure(**values) for name, values in measured["figures"].items()}, measured["kv_cache"]


def prefill_path() -> str:
    """What our prefill multiplies with (`int8.describe_dense`, the start line's words), as this process's settings
    make it (the child inherits them)."""
    try:
        from int8serve.engine import int8
        return int8.describe_dense()
    except Exception as error:  # (a report line, never a reason to lose the run's figures)
        return f"prefill matmuls: unknown ({error})"


def kernel_path() -> str:
    """Which decode/prefill kernel path `Int8Linear` uses, as the kernels module says; "stock" if it cannot say.

    Read defensively: the module's API changes while the kernels are being wired."""
    chosen = os.environ.get("INT8SERVE_KERNEL")
    try:
        from int8serve.engine import kernels
    except Exception:
        kernels = None
    for name in ("kernel_path", "active_path", "path_in_use", "selected_path", "current_path", "describe"):
        function = getattr(kernels, name, None)
        if callable(function):
            with contextlib.suppress(Exception):
                described = str(function())
                return described + (f" (INT8SERVE_KERNEL={chosen})" if chosen else "")
    return "stock" + (f" (INT8SERVE_KERNEL={chosen} set, but the kernels module does not say which path)"
                      if chosen else "")


# ---------------------------------------------------------------------------------------------------------------
# llama.cpp's side


def run_tool(command: Sequence[object]) -> tuple[str, str]:
    """stdout and stderr of one llama.cpp tool run; a failure raises RuntimeError with the end of its log."""
    words = [str(c) for c in command]
    log(f"  llama.cpp: {shlex.join(words)}")
    result = subprocess.run(words, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{Path(words[0]).name} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
    return result.stdout, result.stderr


def llama_bench(llama: LlamaCpp, gguf_path: Path, prompt: int, gen: int, reps: int, repack: bool,
                kv_cache: str = "auto") -> float:
    """Mean tok/s of one llama-bench test (prompt tokens or generated tokens) over `reps` repetitions."""
    out, _ = run_tool([llama.bench, "-m", gguf_path, "-t", THREADS, "-p", prompt, "-n", gen, "-r", reps,
                       "--repack", int(repack), *LLAMA_KV[kv_cache], "-o", "json"])
    rows = json.loads(out)
    if len(rows) != 1:
        raise RuntimeError(f"llama-bench printed {len(rows)} results, expected 1:\n{out}")
    return float(rows[0]["avg_ts"])


def batched_bench(llama: LlamaCpp, gguf_path: Path, repack: bool, batch_prompt: int = BATCH_PROMPT,
                  kv_cache: str = "auto") -> float:
    """Aggregate decode tok/s of BATCH sequences (S_TG of llama-batched-bench)."""
    context = BATCH * (batch_prompt + GEN) + 64
    out, err = run_tool([llama.batched_bench, "-m", gguf_path, "-t", THREADS, "-tb", THREADS, "-c", context,
                         "-npp", batch_prompt, "-ntg", GEN, "-npl", BATCH, "--output-format", "jsonl",
                         *LLAMA_KV[kv_cache], *([] if repack else ["--no-repack"])])
    rows = [json.loads(line) for line in (out + "\n" + err).splitlines() if line.startswith('{"n_kv_max"')]
    if len(rows) != 1:
        raise RuntimeError(f"llama-batched-bench printed {len(rows)} JSON results, expected 1:\n{out[-2000:]}")
    return float(rows[0]["speed_tg"])


def measure_llamacpp(llama: LlamaCpp, gguf_path: Path, reps: int, repack: bool,
                     names: Sequence[str] = tuple(GOALS), batch_prompt: int = BATCH_PROMPT,
                     kv_cache: str = "auto") -> dict[str, Figure]:
    figures = {}
    for name, measure in (("decode_b1", lambda: llama_bench(llama, gguf_path, 0, GEN, reps, repack, kv_cache)),
                          ("decode_b4", lambda: batched_bench(llama, gguf_path, repack, batch_prompt, kv_cache)),
                          ("prefill", lambda: llama_bench(llama, gguf_path, PROMPT, 0, reps, repack, kv_cache))):
        if name not in names:
            continue
        load = CpuShares()
        tok_s = measure()
        figures[name] = Figure(tok_s, load.others())
        log(f"    {name}: {tok_s:.2f} tok/s (others used {figures[name].other_load:.0%} of the CPUs)")
    for name in ("prefill_server", "prefill_busy"):
        if name in names:
            figures[name] = figures["prefill"]  # llama.cpp's one prefill figure, against each of ours
    return figures


# ---------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class Round:
    first: str  # "llama.cpp" or "int8serve"
    bandwidth: float  # GB/s, 2 threads, at the start of the round
    llama: dict[str, Figure]
    ours: dict[str, Figure]
    ours_kv_cache: str  # the KV cache our child kept


def run_round(index: int, llama: LlamaCpp, files: WeightFiles, args: argparse.Namespace, quiet: QuietWaiter) -> Round:
    first = "llama.cpp" if index % 2 == 0 else "int8serve"
    bandwidth = measure_bandwidth(quiet, THREADS)
    log(f"round {index + 1}: {first} first; read bandwidth {bandwidth:.1f} GB/s")
    results: dict[str, dict[str, Figure]] = {}
    kv_cache = args.kv_cache
    for engine in ([first, *({"llama.cpp", "int8serve"} - {first})]):
        quiet.wait()
        if engine == "int8serve":
            results[engine], kv_cache = run_ours(files.checkpoint, args.batch_prompt)
        else:
            results[engine] = measure_llamacpp(llama, files.gguf, args.reps, args.llama_repack,
                                               batch_prompt=args.batch_prompt, kv_cache=args.kv_cache)
        log(f"  {engine}: " + ", ".join(f"{k} {v.tok_s:.2f} tok/s" for k, v in results[engine].items()))
    return Round(first, bandwidth, results["llama.cpp"], results["int8serve"], kv_cache)


def mean_of(rounds: Sequence[Round], engine: str, name: str) -> float:
    return statistics.mean((r.llama if engine == "llama.cpp" else r.ours)[name].tok_s for r in rounds)


# ---------------------------------------------------------------------------------------------------------------
# Report


def cpu_model() -> str:
    """lscpu's family and model numbers: a virtual machine often hides the CPU's name ("Intel(R) Xeon(R)
    Processor"), and they tell its generation."""
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    fields = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in lscpu.splitlines() if ":" in line)}
    return f"family {fields.get('CPU family', '?')} model {fields.get('Model', '?')}"


def ratio_cell(rounds: Sequence[Round], name: str, goals: bool = True) -> str:
    ratio = mean_of(rounds, "int8serve", name) / mean_of(rounds, "llama.cpp", name)
    per_round = " / ".join(f"{r.ours[name].tok_s / r.llama[name].tok_s:.2f}" for r in rounds)
    if not goals:
        return f"**{ratio:.2f}×** (rounds: {per_round})"
    verdict = "met" if ratio >= GOALS[name] else "not met"
    return f"**{ratio:.2f}×** (rounds: {per_round}; goal ≥ {GOALS[name]}×: {verdict})"


def results_table(rounds: Sequence[Round], gguf_type: str = "Q8_0", goals: bool = True,
                  tools: dict[str, str] | None = None) -> list[str]:
    tools = tools or llama_cpp_tools()
    lines = [f"| | llama.cpp {gguf_type} (per round) | int8serve (per round) | int8serve ÷ llama.cpp (means of the "
             "rounds) |", "|---|---|---|---|"]
    for name, label in LABELS.items():
        if name not in rounds[0].ours:  # (a figure not measured)
            continue
        theirs = " / ".join(f"{r.llama[name].tok_s:.2f}" for r in rounds)
        ours = " / ".join(f"{r.ours[name].tok_s:.2f}" for r in rounds)
        lines.append(f"| {label} ({tools[name]}) | {theirs} | {ours} | "
                     f"{ratio_cell(rounds, name, goals)} |")
    return lines


def roofline_line(rounds: Sequence[Round], files: WeightFiles) -> str:
    bandwidths = [r.bandwidth for r in rounds]
    best = max(bandwidths)
    ours_b1, theirs_b1 = mean_of(rounds, "int8serve", "decode_b1"), mean_of(rounds, "llama.cpp", "decode_b1")
    ours_roof, theirs_roof = best * 1e9 / files.ours_bytes, best * 1e9 / files.q8_0_bytes
    return (f"Bandwidth roofline of the moment: read bandwidth (fp32 sum over 2 GiB, 2 threads, best of 5) "
            f"{', '.join(f'{b:.1f}' for b in bandwidths)} GB/s at the start of each round. At the best of these, "
            f"a batch-1 step that reads each weight once allows {ours_roof:.2f} tok/s for ours "
            f"({files.ours_bytes / 1e9:.2f} GB of int8 weights + bf16 scales: {ours_b1 / ours_roof:.0%} reached) and "
            f"{theirs_roof:.2f} tok/s for llama.cpp ({files.q8_0_bytes / 1e9:.2f} GB of {files.gguf_type}: "
            f"{theirs_b1 / theirs_roof:.0%} reached).")


def other_load_line(rounds: Sequence[Round]) -> str:
    shares = [f.other_load for r in rounds for f in (*r.llama.values(), *r.ours.values())]
    return (f"Other processes used {statistics.mean(shares):.0%} of the CPUs on average (at most "
            f"{max(shares):.0%}) during these measurements.")


def weights_lines(args: argparse.Namespace, files: WeightFiles) -> list[str]:
    """The title and the line saying what weights each engine ran."""
    if args.gguf:
        return [f"## int8serve vs llama.cpp: same CPU, same run, same GGUF file ({args.gguf.name})",
                f"- Weights: `{args.gguf.name}`, {files.description}. llama.cpp runs the file as it is "
                f"({files.gguf_type}); int8serve loads it as `serve --model FILE` does: the {files.gguf_type} "
                "weights dequantized, then rounded by GPTQ to its int8 format (a bf16 scale per 32 inputs), once, "
                "into the model cache, which each round maps. The same model, each engine's own format of it."]
    shape = f"{args.layers} layers" + (f", {cpu_label()}" if args.layers == 32 else "")
    held = f", both held to {ISA_CODE[args.isa]}" if args.isa in ISA_CODE else ""
    return [f"## int8serve vs llama.cpp{held}: same CPU, same run, same random weights ({shape})",
            f"- Weights: one random int8 model, {args.layers} of 32 layers of the Llama-2-7B shape (dim 4096, "
            f"hidden 11008, vocab 32000, untied head) with {scale_scheme(args.group_size)}, written as our int8 "
            "checkpoint and as a GGUF Q8_0 file holding the same int8 values and scales."]


def scale_scheme(group_size: int) -> str:
    if group_size == 0:
        return "a bf16 scale per output row (repeated in each Q8_0 block)"
    shared = "Q8_0's own blocks" if group_size == QK8_0 else f"repeated over {group_size // QK8_0} Q8_0 blocks"
    default = ", our default scheme" if group_size == DEFAULT_GROUP_SIZE else ""
    return f"a bf16 scale per {group_size} input values ({shared}{default})"


def kv_cache_line(kv_cache: str, rounds: Sequence[Round]) -> str:
    """Which KV caches the engines kept: ours as its child said (auto: Transformer.default_kv_cache's choice)."""
    if kv_cache == "int8":
        return "- KV caches: ours int8 rows (`--kv-cache int8`), llama.cpp q8_0 (`-ctk q8_0 -ctv q8_0`)."
    ours = " and ".join(dict.fromkeys(r.ours_kv_cache for r in rounds))
    how = "the default, `--kv-cache auto`" if kv_cache == "auto" else f"`--kv-cache {kv_cache}`"
    return f"- KV caches: ours {ours} ({how}), llama.cpp f16 (its default)."


def build_report(args: argparse.Namespace, rounds: Sequence[Round], files: WeightFiles, llama: LlamaCpp) -> str:
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    title, weights = weights_lines(args, files)
    lines = [title, "",
             f"- Command: `{display_command(args)}`",
             f"- Date: {now}; code: {git_revision()}",
             f"- CPU: {machine_description()}, {cpu_model()}; {ram:.0f} GiB RAM; {THREADS} threads for "
             f"each engine; torch {torch.__version__}.",
             f"- Our kernel path: {kernel_path()}; {prefill_path()}.",
             *([isa_line(args.isa)] if args.isa in ISA_SETTINGS else []),
             f"- llama.cpp: {llama.describe()}, binaries in `{llama.bin_dir}`"
             + ("." if args.llama_repack else "; run with `--repack 0` (no AMX path, no repacked weights)."),
             weights,
             f"- {len(rounds)} rounds, alternating which engine goes first; each engine runs alone (ours in a "
             "child process), so only one engine's weights are in memory at a time.",
             kv_cache_line(args.kv_cache, rounds),
             *([f"- Our prefill with one int8 pass a row (`{PREFILL_ENV}=int8`): activations rounded to int8 per 32 "
                "values, as llama.cpp's Q8_0 computes them, instead of our default's numerics (more accurate, "
                "int8.py has the figures); decode unchanged. Not the issue's goals, which are for the defaults."]
               if args.prefill_matmul == "int8" else []),
             *([f"- Our prefill's calls of more than 32 rows through our bf16 kernel (`{PREFILL_ENV}=bf16`, the "
                "default before prefill became row-exact on CPUs with AVX-512 VNNI): faster there, less accurate "
                "(int8.py has the figures); decode unchanged. Not the issue's goals, which are for the defaults."]
               if args.prefill_matmul == "bf16" else []),
             *([f"- Our prefill row-exact on every path (`{PREFILL_ENV}=row-exact`): decode's arithmetic and accuracy "
                "(two int8 passes a row); on AMX CPUs through our AMX-INT8 GEMM instead of the AMX-BF16 kernel, the "
                "default there (slower, more accurate; int8.py has the figures); decode unchanged. Not the issue's "
                "goals, which are for the defaults."]
               if args.prefill_matmul == "row-exact" else []),
             "", *results_table(rounds, files.gguf_type, goals=not args.gguf and not variant(args),
                                tools=llama_cpp_tools(args.batch_prompt, args.kv_cache)), "",
             roofline_line(rounds, files), "",
             other_load_line(rounds), "",
             "The machine is shared with other engineers' work: absolute tok/s are noisy from one minute to the "
             "next. What counts are the ratios, measured from alternating runs of both engines in this same run. "
             f"Definitions: decode = tokens ÷ total time of {GEN} steps after a warm-up step (batch 1 from "
             f"position 0; {BATCH} sequences from position {args.batch_prompt}); prefill = {PROMPT} ÷ mean time of one "
             "prompt in one forward (2 timed, after a 64-token warm-up); in the server = the same prompt in aligned "
             f"chunks of {DEFAULT_PREFILL_CHUNK} tokens, row-exact where the scheduler would make them so, alone "
             f"as many chunks a forward as the scheduler then takes ({DEFAULT_SOLO_PREFILL_TOKENS} tokens where the "
             "bf16 prefill kernel takes them, else one), beside running streams one (2 timed, after one untimed); "
             "llama.cpp's figures are the tools' own "
             f"(`avg_ts` of {args.reps} repetitions, `S_TG`). Ours go through the engine's model forward "
             "(`Transformer`, `generate.prefill`), without the scheduler or the HTTP server."]
    return "\n".join(lines) + "\n"


def isa_line(isa: str) -> str:
    """The report's line on what --isa held both engines to."""
    return (f"- {ISA_CODE[isa]} only (`--isa {isa}`): ours with "
            + " and ".join(f"`{k}={v}`" for k, v in ISA_SETTINGS[isa].items())
            + f"; llama.cpp as the next line says (built for {ISA_CODE[isa]} only, unless --llama-bin named other "
            "binaries).")


# the settings that choose our paths: shown before the command when this run had them (the child inherits them)
PATH_SETTINGS = ("INT8SERVE_KERNEL", "INT8SERVE_ATTENTION", "INT8SERVE_ACTIVATION", "INT8SERVE_PREFILL_MATMUL",
                 "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")


def display_command(args: argparse.Namespace) -> str:
    implied = ISA_SETTINGS.get(args.isa, {})  # (--isa sets them)
    implied = {**implied, **({PREFILL_ENV: args.prefill_matmul} if args.prefill_matmul != "auto" else {})}
    settings = [f"{name}={os.environ[name]}" for name in PATH_SETTINGS if os.environ.get(name) and name not in implied]
    words = [*settings, "python", "-m", "benchmarks.vs_llamacpp"]
    if args.gguf:
        words += ["--gguf", str(args.gguf)]
    elif args.layers != 32:
        words += ["--layers", str(args.layers)]
    if args.rounds != 2:
        words += ["--rounds", str(args.rounds)]
    if args.group_size != DEFAULT_GROUP_SIZE and not args.gguf:
        words += ["--group-size", str(args.group_size)]
    if not args.llama_repack:
        words += ["--no-llama-repack"]
    if args.isa != "native":
        words += ["--isa", args.isa]
    if args.kv_cache != "auto":
        words += ["--kv-cache", args.kv_cache]
    if args.batch_prompt != BATCH_PROMPT:
        words += ["--batch-prompt", str(args.batch_prompt)]
    if args.prefill_matmul != "auto":
        words += ["--prefill-matmul", args.prefill_matmul]
    if args.llama_bin:
        words += ["--llama-bin", str(args.llama_bin)]
    if args.write:
        words += ["--write", str(args.write)]
    return shlex.join(words)


def git_revision() -> str:
    def git(*words: str) -> str:
        return subprocess.run(["git", *words], capture_output=True, text=True, check=False,
                              cwd=Path(__file__).parent).stdout.strip()

    revision = git("rev-parse", "--short", "HEAD") or "?"
    return revision + (" (with uncommitted changes)" if git("status", "--porcelain", "--untracked-files=no") else "")


# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.vs_llamacpp", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", type=Path, metavar="FILE",
                        help="compare on this real model's GGUF file instead of random weights (e.g. "
                             "SmolLM2-135M-Instruct.Q4_1.gguf): llama.cpp runs it as it is, int8serve as `serve "
                             "--model FILE` loads it (int8, through the model cache); --layers is then unused")
    parser.add_argument("--layers", type=int, default=32,
                        help="transformer blocks of the Llama-2-7B shape, the same for both engines (default 32, "
                             "the full model: ~7 GB per file; 2 for a quick run)")
    parser.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=DEFAULT_GROUP_SIZE,
                        help="input values per weight scale of the random weights (0: one per output row; default "
                             f"{DEFAULT_GROUP_SIZE}, our default scheme and Q8_0's block); unused with --gguf")
    parser.add_argument("--rounds", type=int, default=2,
                        help="rounds of both engines; the engine that goes first alternates (default 2)")
    parser.add_argument("--reps", type=int, default=3, help="llama-bench repetitions per test (default 3)")
    parser.add_argument("--work-dir", type=Path, default=cache_dir() / "vs-llamacpp",
                        help="where the two weight files are written, once per --layers "
                             "(default: the int8serve cache dir/vs-llamacpp)")
    parser.add_argument("--llama-cpp-python", default=DEFAULT_VERSION, metavar="VERSION",
                        help=f"the llama-cpp-python sdist whose llama.cpp is built (default {DEFAULT_VERSION})")
    parser.add_argument("--isa", choices=ISAS, default="native",
                        help="native: each engine's fastest code for this CPU (default); avx2: both held to the code "
                             "of an AVX2-only CPU (a Zen 2/3, see above); avxvnni: to AVX2 and AVX-VNNI code, as on "
                             "Intel's client CPUs since Alder Lake; avx512vnni: to AVX-512 with VNNI, no BF16 or AMX, "
                             "as on Cascade Lake and Ice Lake Xeons")
    parser.add_argument("--llama-bin", type=Path, metavar="DIR",
                        help="use the llama-bench and llama-batched-bench in DIR instead of building them")
    parser.add_argument("--no-llama-repack", dest="llama_repack", action="store_false",
                        help="run llama.cpp without its repacked weight layouts (`--repack 0`; on x86 that is its "
                             "AMX path for Q8_0): only to compare with a build whose AMX path crashes")
    parser.add_argument("--wait-quiet", type=float, default=30.0, metavar="SECONDS",
                        help="before each phase wait up to this long for other processes to leave the CPUs "
                             "(default 30)")
    parser.add_argument("--write", type=Path, metavar="FILE",
                        help="replace this script's section of FILE (e.g. docs/benchmarks.md) with the results")
    parser.add_argument("--kv-cache", choices=list(LLAMA_KV), default="auto",
                        help="both engines' KV caches: auto (ours as the server's default: fp16, or bf16 where "
                             "prefill attends through SDPA on AMX tiles; llama.cpp's f16), fp16 or bf16 (ours; "
                             "llama.cpp's f16) or int8 (ours --kv-cache int8, llama.cpp -ctk q8_0 -ctv q8_0); "
                             "another than auto makes its own section")
    parser.add_argument("--batch-prompt", type=int, default=BATCH_PROMPT, metavar="N",
                        help=f"the position the {BATCH} sequences decode from (llama-batched-bench -npp; default "
                             f"{BATCH_PROMPT}); another makes its own section")
    parser.add_argument("--prefill-matmul", choices=["auto", "int8", "bf16", "row-exact"], default="auto",
                        help="our prefill: auto (the default numerics), int8 (one int8 pass a row, llama.cpp's "
                             f"numerics: {PREFILL_ENV}=int8), bf16 (long calls through our bf16 kernel where the "
                             "CPU has it) or row-exact (decode's numerics on every path: on AMX CPUs our AMX-INT8 "
                             "GEMM); another than auto makes its own section, without the goals")
    parser.add_argument("--ours-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.layers < 1 or args.rounds < 1 or args.reps < 1 or args.batch_prompt < 1:
        parser.error("--layers, --rounds, --reps and --batch-prompt must be at least 1")
    if args.gguf and not args.gguf.is_file():
        parser.error(f"--gguf {args.gguf}: no such file")
    return args


def section_label(layers: int, gguf: Path | None = None, cpu: str | None = None, isa: str = "native",
                  kv_cache: str = "auto", batch_prompt: int = BATCH_PROMPT, prefill_matmul: str = "auto") -> str:
    """The full shape has a section per kind of CPU (`cpu`, default this one's `cpu_label()`): the issue's goals are
    per CPU, and a run on one must not erase another's. A quick run's is kept apart (`--layers N`), and so is each
    real model's (`--gguf FILE`: the file's name), a run held to older code (`--isa ...`), and one with other
    KV caches, another batch position or our prefill's int8 pass (`--kv-cache`, `--batch-prompt`,
    `--prefill-matmul`)."""
    label = gguf.name if gguf else (cpu or cpu_label()) if layers == 32 else f"--layers {layers}"
    label = label if isa == "native" else f"{label} --isa {isa}"
    label = label if kv_cache == "auto" else f"{label} --kv-cache {kv_cache}"
    label = label if prefill_matmul == "auto" else f"{label} --prefill-matmul {prefill_matmul}"
    return label if batch_prompt == BATCH_PROMPT else f"{label} --batch-prompt {batch_prompt}"


def variant(args: argparse.Namespace) -> bool:
    """Whether this run's settings are not the defaults the issue's goals are for (--kv-cache, --batch-prompt,
    --prefill-matmul)."""
    return args.kv_cache != "auto" or args.batch_prompt != BATCH_PROMPT or args.prefill_matmul != "auto"


def hold_to_isa(isa: str) -> None:
    """--isa avx2|avxvnni: our side's settings (ISA_SETTINGS) for this process and its children; exits with a clear
    error where the CPU lacks what that code needs or the environment already asks for another path."""
    if isa == "native":
        return
    from int8serve.engine import kernels
    flags = kernels.cpu_flags()
    missing = [flag for flag in ISA_CPU_FLAGS[isa] if flags and flag not in flags]
    if missing:
        sys.exit(f"error: --isa {isa} needs a CPU with {' and '.join(ISA_CPU_FLAGS[isa])}, and this one has no "
                 f"{' or '.join(missing)}")
    for name, value in ISA_SETTINGS[isa].items():
        set_for_our_side(f"--isa {isa}", name, value)


def set_for_our_side(flag: str, name: str, value: str) -> None:
    """Sets the variable `name` that `flag` implies, for this process and our child; exits with a clear error where
    the environment already asks for another value."""
    if os.environ.get(name, value) != value:
        sys.exit(f"error: {flag} sets {name}={value}, but the environment has {name}={os.environ[name]}")
    os.environ[name] = value


def require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        sys.exit("error: the `gguf` package writes the file llama.cpp reads and is not installed: "
                 "`.venv/bin/pip install -e '.[bench]'`")


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    if args.ours_child:
        ours_child(args.ours_child, args.batch_prompt)
        return
    if args.kv_cache != "auto":
        os.environ[KV_ENV] = args.kv_cache  # (our child process reads it)
    if args.prefill_matmul != "auto":
        set_for_our_side(f"--prefill-matmul {args.prefill_matmul}", PREFILL_ENV, args.prefill_matmul)
    require_gguf()
    hold_to_isa(args.isa)
    try:
        llama = LlamaCpp.at(args.llama_bin) if args.llama_bin else ensure_built(args.llama_cpp_python, args.isa)
    except BuildError as error:
        sys.exit(f"error: could not build llama.cpp: {error}")
    files = gguf_files(args.gguf) if args.gguf else \
        write_weights(model_config(args.layers), weights_dir(args.work_dir, args.layers, args.group_size),
                      args.group_size)
    quiet = QuietWaiter(args.wait_quiet)
    try:
        rounds = [run_round(i, llama, files, args, quiet) for i in range(args.rounds)]
    except RuntimeError as error:
        sys.exit(f"error: {error}")
    report = build_report(args, rounds, files, llama)
    print(report)
    if args.write:
        write_section(args.write, report, SCRIPT, section_label(args.layers, args.gguf, isa=args.isa,
                                                                kv_cache=args.kv_cache,
                                                                batch_prompt=args.batch_prompt,
                                                                prefill_matmul=args.prefill_matmul))
        log(f"wrote the section into {args.write}")


if __name__ == "__main__":
    main()
