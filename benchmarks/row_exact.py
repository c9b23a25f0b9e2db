"""What row-exact prefill costs: the server's prefill of one prompt with and without it, alternating, in one run.

Row-exact prefill (engine/chunking.py) computes every row of a prefill chunk as its decode step would: int8 layers
through our kernel with fp32 outputs (instead of rounded to bf16) and attention through the decode attention kernel,
row by row (instead of SDPA over the chunk). It is what lets the prefix cache keep a reply's tokens (issue 13). This
script prefills one random prompt the way the engine does (chunks of `--chunk` aligned to the prompt's start, through
`Transformer(..., prefill=PrefillChunk)`), once each way per round, and reports tok/s for both and their ratio.

    .venv/bin/python -m benchmarks.row_exact --model data/llama2-7b-shape-int8 --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.common import display_command, write_section
from benchmarks.machine import machine_description
from int8serve.engine.chunking import aligned_chunk
from int8serve.engine.loader import load_model
from int8serve.engine.model import KVCache, Transformer


def prefill(model: Transformer, prompt: list[int], cache: KVCache, chunk: int, row_exact: bool) -> float:
    """Seconds to prefill `prompt` into slot 0 as the engine does."""
    started, done = time.perf_counter(), 0
    while done < len(prompt):
        end, how = aligned_chunk(done, len(prompt), chunk, cache.max_seq_len, row_exact=row_exact)
        model(torch.tensor([prompt[done:end]]), cache, [0], [done], prefill=how)
        done = end
    return time.perf_counter() - started


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="int8 checkpoint folder")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens (default 512)")
    parser.add_argument("--chunk", type=int, default=128, help="prefill chunk, as the server's (default 128)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (one way, the other way) (default 2)")
    parser.add_argument("--write", type=Path, default=None, help="write the result into this Markdown file")
    args = parser.parse_args(argv)
    started = time.monotonic()
    model = load_model(args.model, "int8").model
    if not model.row_exact_prefill(args.chunk, 4):
        raise SystemExit(f"this CPU/model cannot prefill row-exact with chunks of {args.chunk} (see "
                         "Transformer.row_exact_prefill)")
    cache = model.new_cache(1, min(model.config.max_seq_len, args.prompt + 8))
    prompt = torch.randint(3, model.config.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(0))
    tokens = prompt.tolist()
    prefill(model, tokens[:args.chunk], cache, args.chunk, True)  # warm-up: kernels built, pages touched
    prefill(model, tokens[:args.chunk], cache, args.chunk, False)
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for round_ in range(args.rounds):
        for row_exact in ((False, True) if round_ % 2 == 0 else (True, False)):
            seconds[row_exact].append(prefill(model, tokens, cache, args.chunk, row_exact))
            print(f"round {round_ + 1}, row_exact={row_exact}: {seconds[row_exact][-1]:.2f} s", flush=True)
    before, after = statistics.median(seconds[False]), statistics.median(seconds[True])
    lines = ["| prefill numerics | median | tok/s |", "|---|---|---|",
             f"| chunk's own (bf16-rounded int8 outputs, SDPA): before | {before:.2f} s | {args.prompt / before:.2f} |",
             f"| row-exact (fp32 int8 outputs, decode attention kernel): now | {after:.2f} s | "
             f"{args.prompt / after:.2f} |",
             f"| row-exact ÷ before (time) | {after / before:.3f}× | |"]
    print("\n".join(lines))
    if args.write is not None:
        command = display_command("row_exact", list(sys.argv[1:] if argv is None else argv), hidden=("--write",))
        body = "\n".join([
            f"## Row-exact prefill: its cost (`benchmarks/row_exact.py`, {args.model.name})", "",
            f"`{command}` — {machine_description()}, {time.strftime('%Y-%m-%d')}, "
            f"{time.monotonic() - started:.0f} s, load average {os.getloadavg()[0]:.1f} at the end. One "
            f"{args.prompt}-token random prompt prefilled as the server does (chunks of {args.chunk}), each way "
            f"{args.rounds} times, alternating; medians. \"Before\" is the chunk's own numerics of the same code "
            "(as on main before row-exact prefill, but with SiLU row by row in both).", "", *lines])
        write_section(args.write, body, "row_exact.py", args.model.name)


if __name__ == "__main__":
    main()
