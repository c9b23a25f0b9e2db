"""Decode attention and prefill on the Llama-2-7B shape with each KV cache the engine keeps (`--kv-cache`: bf16, the
default; fp16, the same bytes with 3 more bits of mantissa; int8, engine/kv_int8.py), in one run.

The int8 cache holds 144 bytes a row of a 7B head against 256 in bf16 or fp16; decode attention reads every row of its
rows' past positions, so it should take up to 0.56x the time where it waits on memory. An fp16 cache reads the same
bytes as bf16 but converts them differently (F16C on the AVX2 path). This script times the attention kernel alone
(rotary embedding, cache write, attention) for all 32 layers, each layer over its own cache (so no layer finds its
keys in a CPU cache), the caches alternating round by round on the same random keys and values, for each attention
path the CPU runs, at batch 1 and 4 at the engine benchmark's positions and at a long context.

With `--prefill`, it also times what a prompt costs with each cache: a prompt prefilled in the server's chunks of 128
tokens (as the engine cuts them, row-exact where the model is; `INT8SERVE_PREFILL_MATMUL` chooses as in the server)
through a few layers of the 7B shape, the caches alternating. Where prefill is not row-exact, SDPA reads each chunk's
keys back from the cache (an int8 cache's as bf16, an fp16 cache's as fp32: model.py says why).

Every ratio is bf16's time over the other cache's, the median of the rounds' ratios: above 1, faster than bf16.

    .venv/bin/python -m benchmarks.kv_cache                      # every path and cache; --paths avx2 for one
    .venv/bin/python -m benchmarks.kv_cache --kinds bf16 fp16 --prefill 1024 --cases   # only prefill, two caches
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
from int8serve.engine.int8 import DEFAULT_GROUP_SIZE, describe_dense
from int8serve.engine.kernels import attention as attention_kernel
from int8serve.engine.model import KV_CACHES, Transformer, rope_tables

HEADS, HEAD_DIM = 32, 128  # Llama-2-7B
CASES = {"batch 1 at 512": [512], "batch 4 at 512/384/256/128": [512, 384, 256, 128],
         "batch 4 at 2040": [2040] * 4}


def caches(layers: int, slots: int, positions: int, kinds: Sequence[str] = tuple(KV_CACHES),
           seed: int = 0) -> dict[str, list[tuple[torch.Tensor, ...]]]:
    """{kind: [(keys, values)] a layer}: the same random values in each cache (int8 rows for "int8")."""
    generator = torch.Generator().manual_seed(seed)
    made: dict[str, list[tuple[torch.Tensor, ...]]] = {kind: [] for kind in kinds}
    for _ in range(layers):
        pair = [torch.randn(slots, HEADS, positions, HEAD_DIM, generator=generator) * 0.5 for _ in range(2)]
        for kind in kinds:
            made[kind].append(tuple(kv_int8.quantize(t) if kind == "int8" else t.to(KV_CACHES[kind]) for t in pair))
    return made


def alternating(kinds: Sequence[str], round_: int) -> Sequence[str]:
    """The caches in the order of a round: forward, then backward, so that none is always first after a pause."""
    return kinds if round_ % 2 == 0 else kinds[::-1]


def summary(times: dict[str, list[float]], scale: float) -> dict[str, float]:
    """{kind: median time * scale, "bf16 / kind": median of the rounds' bf16 time over kind's}."""
    result = {kind: statistics.median(seconds) * scale for kind, seconds in times.items()}
    for kind, seconds in times.items():
        if kind != "bf16":
            result[f"bf16 / {kind}"] = statistics.median(b / o for b, o in zip(times["bf16"], seconds, strict=True))
    return result


def measure(path: str, starts: list[int], layers: int, rounds: int, kinds: Sequence[str]) -> dict[str, float]:
    """Median ms of the layers' attention with each cache, and the medians of the per-round ratios to bf16."""
    held = caches(layers, len(starts), max(starts) + 8, kinds)
    cos, sin = rope_tables(HEAD_DIM, max(starts) + 8, 10000.0)
    generator = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(len(starts), HEADS, HEAD_DIM, generator=generator) for _ in range(3))
    slots, positions = torch.arange(len(starts)), torch.tensor(starts)
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for round_ in range(rounds + 1):
        for kind in alternating(kinds, round_):
            started = time.perf_counter()
            for keys, values in held[kind]:
                attention_kernel.decode_attention(q, k, v, cos, sin, slots, positions, keys, values, path)  # type: ignore[arg-type]
            if round_:  # the first is a warm-up
                times[kind].append(time.perf_counter() - started)
    return summary(times, 1e3)


def prefill_seconds(model: Transformer, tokens: list[int], chunk: int = 128) -> float:
    """Seconds to prefill `tokens` into a new cache in aligned chunks, as the engine does (row-exact where the model
    makes them so)."""
    cache = model.new_cache(1, len(tokens) + chunk)
    return prefill(model, tokens, cache, chunk, model.row_exact_prefill(chunk, 4))


def measure_prefill(prompt: int, layers: int, rounds: int, kinds: Sequence[str]) -> dict[str, float]:
    """Median seconds of a `prompt`-token prefill with each cache, and the medians of the per-round ratios to bf16."""
    model = build_random_int8_model(ModelConfig(**{**LLAMA2_7B.to_dict(), "n_layers": layers}),
                                    group_size=DEFAULT_GROUP_SIZE)
    tokens = torch.randint(3, LLAMA2_7B.vocab_size, (prompt,), generator=torch.Generator().manual_seed(2)).tolist()
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for round_ in range(rounds + 1):
        for kind in alternating(kinds, round_):
            model.set_kv_cache(kind)
            seconds = prefill_seconds(model, tokens)
            if round_:
                times[kind].append(seconds)
    return summary(times, 1.0)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--paths", nargs="+", choices=["avx512", "avx2", "scalar"],
                        help="attention paths (default: the vector paths this CPU runs)")
    parser.add_argument("--kinds", nargs="+", choices=list(KV_CACHES), default=list(KV_CACHES), metavar="KIND",
                        help=f"caches to compare, bf16 always among them (of: {', '.join(KV_CACHES)}; default all)")
    parser.add_argument("--layers", type=int, default=32, help="layers, each with its own caches (default 32)")
    parser.add_argument("--rounds", type=int, default=16, help="timed rounds of each cache (default 16)")
    parser.add_argument("--cases", nargs="*", choices=list(CASES), default=list(CASES), metavar="CASE",
                        help=f"which of: {'; '.join(CASES)} (default all; none: only --prefill)")
    parser.add_argument("--prefill", type=int, metavar="TOKENS",
                        help="also time a prompt of TOKENS prefilled in chunks of 128 with each cache")
    parser.add_argument("--prefill-layers", type=int, default=4, help="layers of the 7B shape for --prefill (4)")
    args = parser.parse_args(argv)
    kinds = ["bf16"] + [kind for kind in dict.fromkeys(args.kinds) if kind != "bf16"]
    others = kinds[1:]
    torch.set_num_threads(2)
    paths = args.paths or [p for p in attention_kernel.cpu_paths()[::-1] if p != "scalar"]
    print(f"{cpu_label()}, 2 threads, {args.layers} layers, {args.rounds} rounds alternating")
    print("| path | rows | " + " | ".join(f"{kind} cache, ms" for kind in kinds) + " | "
          + " | ".join(f"bf16 ÷ {kind}" for kind in others) + " |")
    print("|---|---|" + "---|" * (len(kinds) + len(others)))
    for path in paths:
        for case in args.cases:
            result = measure(path, CASES[case], args.layers, args.rounds, kinds)
            print(f"| {path} | {case} | " + " | ".join(f"{result[kind]:.1f}" for kind in kinds) + " | "
                  + " | ".join(f"{result[f'bf16 / {kind}']:.3f}x" for kind in others) + " |", flush=True)
    if args.prefill:
        result = measure_prefill(args.prefill, args.prefill_layers, max(2, args.rounds // 4), kinds)
        print(f"\nPrefill, {args.prefill} tokens in chunks of 128, {args.prefill_layers} layers of the 7B shape, "
              f"{describe_dense().removeprefix('prefill matmuls: ')}: "
              + ", ".join(f"{kind} cache {result[kind]:.2f} s" for kind in kinds) + "; "
              + ", ".join(f"bf16 ÷ {kind} {result[f'bf16 / {kind}']:.3f}x" for kind in others)
              + " (medians of the rounds)")


if __name__ == "__main__":
    main()
