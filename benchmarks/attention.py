"""Decode attention alone on the Llama-2-7B shape: the row-by-row torch path against the kernel, in one run.

`benchmarks/engine.py --attention torch auto` times whole decode steps; on a shared machine whose other users
change from second to second, the difference between two such steps (~300 ms each) is mostly noise. This script
times only what the kernel replaced: the attention part of a decode step (rotary embedding, cache write,
attention) for all 32 layers, each layer over its own cache (1.1 GB for 4 slots of 520 positions, so no layer finds
its keys in a CPU cache), alternating the two paths step by step. The projections are identities
(`Attention(config, nn.Identity)`), so nothing but attention is measured. Besides the wall time it reports the CPU
time of the process on 1 thread, which others' load changes much less than the wall time.

    .venv/bin/python -m benchmarks.attention                      # batch 1 at 512, batch 4 at 512/384/256/128
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import time
from collections.abc import Sequence

import torch
from torch import nn

from int8serve.engine.config import ModelConfig
from int8serve.engine.kernels import attention as attention_kernel
from int8serve.engine.model import Attention, KernelStep, KVCache, rope_tables

LLAMA2_7B = ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000, hidden_dim=11008,
                        max_seq_len=4096, tie_embeddings=False)
rope_tables_cache = rope_tables(LLAMA2_7B.head_dim, LLAMA2_7B.max_seq_len, LLAMA2_7B.rope_theta)


def cpu_name() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
    return fields.get("Model name", "?").strip()


def attention_step(attention: Attention, cache: KVCache, x: torch.Tensor, slots: list[int], starts: list[int],
                   path: str) -> None:
    """The attention part of one decode step, all layers: x [B, 1, dim] as q, k and v of every layer."""
    if path == "torch":  # as Transformer._forward and Attention.forward did before the kernel
        positions = torch.tensor(starts)[:, None] + torch.arange(1)[None, :]
        cos, sin = rope_tables_cache[0][positions], rope_tables_cache[1][positions]
        for layer in range(len(cache.k)):
            attention(x, cos, sin, cache.k[layer], cache.v[layer], slots, starts)
        return
    step = KernelStep(torch.tensor(slots), torch.tensor(starts), *rope_tables_cache, path)  # type: ignore[arg-type]
    for layer in range(len(cache.k)):
        attention(x, None, None, cache.k[layer], cache.v[layer], slots, starts, step)


def measure(paths: Sequence[str], batch_starts: list[int], steps: int, threads: int) -> dict[str, list[float]]:
    """{path: [wall s, cpu s] medians per step}, the paths alternating step by step."""
    torch.set_num_threads(threads)
    config = LLAMA2_7B
    attention = Attention(config, nn.Identity).eval()
    cache = KVCache(config, len(batch_starts), max(batch_starts) + 8, torch.bfloat16)
    generator = torch.Generator().manual_seed(0)
    for tensor in cache.k + cache.v:
        tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.5)
    x = torch.randn(len(batch_starts), 1, config.dim, generator=generator)
    slots = list(range(len(batch_starts)))
    walls: dict[str, list[float]] = {p: [] for p in paths}
    cpus: dict[str, list[float]] = {p: [] for p in paths}
    with torch.inference_mode():
        for step in range(steps + 1):
            for path in paths:
                wall, cpu = time.perf_counter(), time.process_time()
                attention_step(attention, cache, x, slots, batch_starts, path)
                if step:  # the first is a warm-up
                    walls[path].append(time.perf_counter() - wall)
                    cpus[path].append(time.process_time() - cpu)
    return {p: [statistics.median(walls[p]), statistics.median(cpus[p])] for p in paths}


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=9, help="timed steps per path and batch (default 9)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch threads (default 1 2)")
    args = parser.parse_args(argv)
    paths = ["torch", *attention_kernel.cpu_paths()[::-1]] if attention_kernel.available() else ["torch"]
    load = os.getloadavg()[0]
    print(f"{cpu_name()}, {os.cpu_count()} CPUs, load average {load:.1f}, torch {torch.__version__}")
    print("| threads | batch (positions) | path | wall ms / step (32 layers) | CPU ms / step | × torch (wall) |")
    print("|---|---|---|---|---|---|")
    for threads in args.threads:
        for starts in ([512], [512, 384, 256, 128]):
            results = measure(paths, starts, args.steps, threads)
            base = results["torch"][0]
            for path, (wall, cpu) in results.items():
                print(f"| {threads} | {len(starts)} ({', '.join(map(str, starts))}) | {path} | {wall * 1e3:.1f} | "
                      f"{cpu * 1e3:.1f} | {base / wall:.1f}× |", flush=True)


if __name__ == "__main__":
    main()
