"""The attention of a row-exact prefill chunk on the Llama-2-7B shape: this build of the attention kernel against
the build of another git revision, in one run.

A row-exact prefill chunk (engine/chunking.py) is 128 rows of one slot at consecutive positions, attended by the
decode attention kernel (kernels/attention.cpp), each row exactly as its decode step would be. How that costs as the
prompt grows is this script's question: it times one chunk's attention (rotary embedding, cache writes, attention;
no projections) for all 32 layers, each over its own bf16 cache of one slot, at chunk starts 0, 512, 1024 and 1920
(`--starts`), alternating the two builds round by round, after checking that both give the same bits (outputs and
cache). Times are medians over the rounds; the ratio is the median of the per-round ratios.

    python -m benchmarks.chunk_attention --revision HEAD~1 --write docs/benchmarks.md     # ~2 minutes
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import display_command, publish
from benchmarks.gemv_builds import compile_source, revision_sources
from benchmarks.machine import CpuShares, cpu_label, machine_description
from int8serve.engine.kernels import attention
from int8serve.engine.model import rope_tables

HEADS, HEAD_DIM, LAYERS, CHUNK = 32, 128, 32, 128  # Llama-2-7B: 32 query and kv heads of 128


def build(source: Path, output: Path) -> ctypes.CDLL:
    """`source` built with the project's own command, opened as attention.py opens its library."""
    compile_source(source, output)
    return attention._open(output)


class Chunk:
    """Random q, k, v of one chunk and each layer's cache of one slot, filled up to the chunk's start."""

    def __init__(self, start: int, max_len: int, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.start, self.max_len = start, max_len
        self.q = torch.randn(CHUNK, HEADS, HEAD_DIM, generator=g)
        self.k = torch.randn(CHUNK, HEADS, HEAD_DIM, generator=g)
        self.v = torch.randn(CHUNK, HEADS, HEAD_DIM, generator=g)
        self.cos, self.sin = rope_tables(HEAD_DIM, max_len, 10000.0)
        self.slots = torch.zeros(CHUNK, dtype=torch.int64)
        self.positions = torch.arange(start, start + CHUNK, dtype=torch.int64)
        self.caches = [(torch.randn(1, HEADS, max_len, HEAD_DIM, generator=g).to(torch.bfloat16),
                        torch.randn(1, HEADS, max_len, HEAD_DIM, generator=g).to(torch.bfloat16))
                       for _ in range(LAYERS)]

    def attend(self, lib: ctypes.CDLL, cache_k: torch.Tensor, cache_v: torch.Tensor) -> torch.Tensor:
        return attention.decode_attention(self.q, self.k, self.v, self.cos, self.sin, self.slots, self.positions,
                                          cache_k, cache_v, library=lib)

    def seconds(self, lib: ctypes.CDLL) -> float:
        """One chunk's attention in all layers (each writes the chunk's keys and values again: the same ones)."""
        started = time.perf_counter()
        for cache_k, cache_v in self.caches:
            self.attend(lib, cache_k, cache_v)
        return time.perf_counter() - started

    def same_bits(self, a: ctypes.CDLL, b: ctypes.CDLL) -> bool:
        """Whether both builds give the first layer the same outputs and write the same cache."""
        results = []
        for lib in (a, b):
            cache_k, cache_v = (t.clone() for t in self.caches[0])
            results.append((self.attend(lib, cache_k, cache_v), cache_k, cache_v))
        return all(torch.equal(x, y) for x, y in zip(*results, strict=True))


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--revision", required=True, help="the git revision whose attention.cpp to compare with")
    parser.add_argument("--starts", type=int, nargs="+", default=[0, 512, 1024, 1920],
                        help="positions where the timed chunk starts (default 0 512 1024 1920)")
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds per start (default 5)")
    parser.add_argument("--write", type=Path, metavar="FILE", help="put the report into FILE's section for it")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="int8serve-chunk-attention-") as tmp:
        now = build(attention.SOURCE, Path(tmp) / "now.so")
        before = build(revision_sources(args.revision, Path(tmp) / "before", attention.SOURCE), Path(tmp) / "then.so")
        shares = CpuShares()
        rows = []
        for start in args.starts:
            chunk = Chunk(start, start + CHUNK)
            if not chunk.same_bits(now, before):
                sys.exit(f"error: the two builds give different bits at start {start}")
            times: dict[str, list[float]] = {"now": [], "before": []}
            chunk.seconds(now), chunk.seconds(before)  # warm-up
            for round_ in range(args.rounds):
                order = [("now", now), ("before", before)] if round_ % 2 == 0 else [("before", before), ("now", now)]
                for name, lib in order:
                    times[name].append(chunk.seconds(lib))
            ratios = [b / n for b, n in zip(times["before"], times["now"], strict=True)]
            rows.append(f"| {start}-{start + CHUNK - 1} | {statistics.median(times['before']) * 1e3:.0f} ms | "
                        f"{statistics.median(times['now']) * 1e3:.0f} ms | **{statistics.median(ratios):.2f}x** "
                        f"({min(ratios):.2f}-{max(ratios):.2f}) |")
            print(rows[-1], flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            check=False).stdout.strip()
    report = "\n".join([
        f"## The attention of a prefill chunk: this build against {args.revision} ({cpu_label()})", "",
        f"- Command: `{display_command('chunk_attention', argv if argv is not None else sys.argv[1:], ['--write'])}`",
        f"- Date: {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC; code: {commit} (working tree); "
        f"CPU: {machine_description()}; 2 threads; other processes used {shares.others():.0%} of the CPUs.",
        f"- One row-exact chunk of {CHUNK} rows of one slot (the 7B shape: {HEADS} heads of {HEAD_DIM}, bf16 cache), "
        f"all {LAYERS} layers, each over its own cache; {args.rounds} alternating rounds, same bits checked first.",
        "", f"| chunk positions | {args.revision} | this build | speed-up (per round) |", "|---|---|---|---|",
        *rows, ""])
    publish(report, args.write, "chunk_attention.py", cpu_label())  # a section per CPU model
    return report


if __name__ == "__main__":
    main()
