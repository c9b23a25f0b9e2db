"""Decode attention on the Llama-2-7B shape with a bf16 KV cache and with an int8 one (`--kv-cache int8`,
engine/kv_int8.py), in one run.

The int8 cache holds 144 bytes a row of a 7B head against 256 in bf16; decode attention reads every row of its rows'
past positions, so it should take up to 0.56x the time where it waits on memory. This script times the attention
kernel alone (rotary embedding, cache write, attention) for all 32 layers, each layer over its own cache (so no layer
finds its keys in a CPU cache), the two caches alternating round by round on the same random keys and values, for
each attention path the CPU runs, at batch 1 and 4 at the engine benchmark's positions and at a long context.

With `--prefill`, it also times what a prompt costs with each cache: a prompt prefilled in the server's chunks of 128
tokens (as the engine cuts them, row-exact where the model is) through a few layers of the 7B shape, the caches
alternating. With an int8 cache every chunk writes its rows as int8 and reads its slot's rows back for SDPA.

    .venv/bin/python -m benchmarks.kv_cache                      # every path; --paths avx2 for one
    .venv/bin/python -m benchmarks.kv_cache --prefill 1024 --cases   # only the prefill comparison
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch

from benchmarks.engine import LLAMA2_7B, build_random_int8_model
from benchmarks.machine import cpu_label
from benchmarks.row_exact import prefill
from int8serve.engine import kv_int8
from int8serve.engine.config import ModelConfig
from int8serve.engine.int8 import DEFAULT_GROUP_SIZE
from int8serve.engine.kernels import attention as attention_kernel
from int8serve.engine.model import Transformer, rope_tables

HEADS, HEAD_DIM = 32, 128  # Llama-2-7B
CASES = {"batch 1 at 512": [512], "batch 4 at 512/384/256/128": [512, 384, 256, 128],
         "batch 4 at 2040": [2040] * 4}


def caches(layers: int, slots: int, positions: int, seed: int = 0) -> dict[str, list[tuple[torch.Tensor, ...]]]:
    """{"bf16": [(keys, values)] a layer, "int8": the same values as int8 rows}."""
    generator = torch.Generator().manual_seed(seed)
    made: dict[str, list[tuple[torch.Tensor, ...]]] = {"bf16": [], "int8": []}
    for _ in range(layers):
        pair = [torch.randn(slots, HEADS, positions, HEAD_DIM, generator=generator) * 0.5 for _ in range(2)]
        made["bf16"].append(tuple(t.to(torch.bfloat16) for t in pair))
        made["int8"].append(tuple(kv_int8.quantize(t) for t in pair))
    return made


def measure(path: str, starts: list[int], layers: int, rounds: int) -> dict[str, float]:
    """Median ms of the layers' attention for each cache, and the median of the per-round ratios bf16 / int8."""
    held = caches(layers, len(starts), max(starts) + 8)
    cos, sin = rope_tables(HEAD_DIM, max(starts) + 8, 10000.0)
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(len(starts), HEADS, HEAD_DIM, generator=generator) for _ in range(3))
    slots, positions = torch.arange(len(starts)), torch.tensor(starts)
    times: dict[str, list[float]] = {"bf16": [], "int8": []}
    for round_ in range(rounds + 1):
        for kind in ("bf16", "int8") if round_ % 2 else ("int8", "bf16"):
            started = time.perf_counter()
            for keys, values in held[kind]:
                attention_kernel.decode_attention(q, k, v, cos, sin, slots, positions, keys, values, path)  # type: ignore[arg-type]
            if round_:  # the first is a warm-up
                times[kind].append(time.perf_counter() - started)
    ratios = [b / i for b, i in zip(times["bf16"], times["int8"], strict=True)]
    return {"bf16": statistics.median(times["bf16"]) * 1e3, "int8": statistics.median(times["int8"]) * 1e3,
            "ratio": statistics.median(ratios)}


def prefill_seconds(model: Transformer, tokens: list[int], chunk: int = 128) -> float:
    """Seconds to prefill `tokens` into a new cache in aligned chunks, as the engine does (row-exact where the model
    makes them so)."""
    cache = model.new_cache(1, len(tokens) + chunk)
    return prefill(model, tokens, cache, chunk, model.row_exact_prefill(chunk, 4))


def measure_prefill(prompt: int, layers: int, rounds: int) -> dict[str, float]:
    """Median seconds of a `prompt`-token prefill with each cache, and the median of the per-round int8 / bf16."""
    model = build_random_int8_model(ModelConfig(**{**LLAMA2_7B.to_dict(), "n_layers": layers}),
                                    group_size=DEFAULT_GROUP_SIZE)
    tokens = torch.randint(3, LLAMA2_7B.vocab_size, (prompt,), generator=torch.Generator().manual_seed(2)).tolist()
    times: dict[str, list[float]] = {"bf16": [], "int8": []}
    for round_ in range(rounds + 1):
        for kind in ("bf16", "int8") if round_ % 2 else ("int8", "bf16"):
            model.set_kv_cache(kind)
            seconds = prefill_seconds(model, tokens)
            if round_:
                times[kind].append(seconds)
    ratios = [i / b for b, i in zip(times["bf16"], times["int8"], strict=True)]
    return {"bf16": statistics.median(times["bf16"]), "int8": statistics.median(times["int8"]),
            "ratio": statistics.median(ratios)}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", nargs="+", choices=["avx512", "avx2", "scalar"],
                        help="attention paths (default: the vector paths this CPU runs)")
    parser.add_argument("--layers", type=int, default=32, help="layers, each with its own caches (default 32)")
    parser.add_argument("--rounds", type=int, default=16, help="timed rounds of each cache (default 16)")
    parser.add_argument("--cases", nargs="*", choices=list(CASES), default=list(CASES), metavar="CASE",
                        help=f"which of: {'; '.join(CASES)} (default all; none: only --prefill)")
    parser.add_argument("--prefill", type=int, metavar="TOKENS",
                        help="also time a prompt of TOKENS prefilled in chunks of 128 with each cache")
    parser.add_argument("--prefill-layers", type=int, default=4, help="layers of the 7B shape for --prefill (4)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    paths = args.paths or [p for p in attention_kernel.cpu_paths()[::-1] if p != "scalar"]
    print(f"{cpu_label()}, 2 threads, {args.layers} layers, {args.rounds} rounds alternating")
    print("| path | rows | bf16 cache, ms | int8 cache, ms | bf16 ÷ int8 (median of the rounds) |")
    print("|---|---|---|---|---|")
    for path in paths:
        for case in args.cases:
            result = measure(path, CASES[case], args.layers, args.rounds)
            print(f"| {path} | {case} | {result['bf16']:.1f} | {result['int8']:.1f} | {result['ratio']:.2f}x |",
                  flush=True)
    if args.prefill:
        result = measure_prefill(args.prefill, args.prefill_layers, max(2, args.rounds // 4))
        print(f"\nPrefill, {args.prefill} tokens in chunks of 128, {args.prefill_layers} layers of the 7B shape: bf16 "
              f"cache {result['bf16']:.2f} s, int8 cache {result['int8']:.2f} s, int8 ÷ bf16 {result['ratio']:.3f} "
              "(median of the rounds)")


if __name__ == "__main__":
    main()
