"""What row-exact prefill costs: the server's prefill of one prompt row-exact and another way, alternating, in one run.

Row-exact prefill (engine/chunking.py) computes every row of a prefill chunk as its decode step would: int8 layers
through our kernel with fp32 outputs, two int8 passes a row, and attention through the decode attention kernel, row by
row. It is what lets the prefix cache keep a reply's tokens (issue 13), and it has decode's accuracy (issue 10). It is
the default where our int8 kernel takes every prefill call (the vnni512, avx2 and avxvnni paths); on the amx path the
default multiplies chunks of more than 32 rows with the AMX-BF16 kernel and attends with SDPA over the chunk, and
`INT8SERVE_PREFILL_MATMUL=row-exact` asks for row-exact chunks. This script prefills one random prompt the way the
engine does (chunks of `--chunk` aligned to the prompt's start, through `Transformer(..., prefill=PrefillChunk)`),
once each way per round: row-exact (the setting `row-exact` for the duration of that prefill) and the other way,
`--other` (INT8SERVE_PREFILL_MATMUL as the environment has it by default; e.g. `--other bf16` where row-exact is the
default), and reports tok/s for both and their ratio.

    .venv/bin/python -m benchmarks.row_exact --model data/llama2-7b-shape-int8 --write docs/benchmarks.md
    .venv/bin/python -m benchmarks.row_exact --model data/llama2-7b-shape-int8 --other bf16     # a Zen 4
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

from benchmarks.common import display_command, environment, write_section
from benchmarks.machine import cpu_label, machine_description
from int8serve.engine import int8
from int8serve.engine.chunking import aligned_chunk
from int8serve.engine.kernels import matmul as prefill_matmul
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


def prefill_way(model: Transformer, prompt: list[int], cache: KVCache, chunk: int, row_exact: bool,
                other: str | None, other_is_row_exact: bool) -> float:
    """Seconds to prefill `prompt` row-exact (INT8SERVE_PREFILL_MATMUL=row-exact), or the other way: the setting
    `other` (None: as the environment has it), its chunks row-exact where that setting makes them so."""
    with environment(prefill_matmul.ENV, "row-exact" if row_exact else other):
        return prefill(model, prompt, cache, chunk, row_exact or other_is_row_exact)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="int8 checkpoint folder")
    parser.add_argument("--prompt", type=int, default=512, help="prompt tokens (default 512)")
    parser.add_argument("--chunk", type=int, default=128, help="prefill chunk, as the server's (default 128)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of (one way, the other way) (default 2)")
    parser.add_argument("--other", choices=[s for s in prefill_matmul.SETTINGS if s != "row-exact"],
                        help="the INT8SERVE_PREFILL_MATMUL setting row-exact prefill is compared with (default: the "
                             "environment's, i.e. this CPU's default; where that is row-exact already, e.g. bf16)")
    parser.add_argument("--write", type=Path, default=None, help="write the result into this Markdown file")
    args = parser.parse_args(argv)
    started = time.monotonic()
    model = load_model(args.model, "int8").model
    with environment(prefill_matmul.ENV, args.other):
        other_is_row_exact = model.row_exact_prefill(args.chunk, 4)
        other = os.environ.get(prefill_matmul.ENV) or "auto"
        how = ("row-exact" if other_is_row_exact else
               f"int8 layers {int8.describe_dense().removeprefix('prefill matmuls: ')}, SDPA over the chunk")
    with environment(prefill_matmul.ENV, "row-exact"):
        if not model.row_exact_prefill(args.chunk, 4):
            raise SystemExit(f"this CPU/model cannot prefill row-exact with chunks of {args.chunk} (see "
                             "Transformer.row_exact_prefill)")
    cache = model.new_cache(1, min(model.config.max_seq_len, args.prompt + 8))
    prompt = torch.randint(3, model.config.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(0))
    tokens = prompt.tolist()
    for row_exact in (True, False):  # warm-up: kernels built, pages touched
        prefill_way(model, tokens[:args.chunk], cache, args.chunk, row_exact, args.other, other_is_row_exact)
    seconds: dict[bool, list[float]] = {False: [], True: []}
    for round_ in range(args.rounds):
        for row_exact in ((False, True) if round_ % 2 == 0 else (True, False)):
            seconds[row_exact].append(prefill_way(model, tokens, cache, args.chunk, row_exact, args.other,
                                                  other_is_row_exact))
            print(f"round {round_ + 1}, row_exact={row_exact}: {seconds[row_exact][-1]:.2f} s", flush=True)
    default, exact = statistics.median(seconds[False]), statistics.median(seconds[True])
    ratio = statistics.median(d / e for d, e in zip(seconds[False], seconds[True], strict=True))
    lines = ["| prefill | median | tok/s |", "|---|---|---|",
             f"| {prefill_matmul.ENV}={other} ({how}) | {default:.2f} s | {args.prompt / default:.2f} |",
             f"| row-exact (our int8 kernel, two int8 passes a row; the decode attention kernel) | {exact:.2f} s | "
             f"{args.prompt / exact:.2f} |",
             f"| row-exact ÷ {other} (speed, the median of the rounds' ratios) | {ratio:.3f}× | |"]
    print("\n".join(lines))
    if args.write is not None:
        command = display_command("row_exact", list(sys.argv[1:] if argv is None else argv), hidden=("--write",))
        body = "\n".join([
            f"## Row-exact prefill: its cost (`benchmarks/row_exact.py`, {args.model.name}, {cpu_label()})", "",
            f"`{command}` — {machine_description()}, {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC, "
            f"{time.monotonic() - started:.0f} s, load average {os.getloadavg()[0]:.1f} at the end. One "
            f"{args.prompt}-token random prompt prefilled as the server does (chunks of {args.chunk}), each way "
            f"{args.rounds} times, alternating; medians.", "", *lines])
        write_section(args.write, body, "row_exact.py", f"{args.model.name} {cpu_label()}")


if __name__ == "__main__":
    main()
