"""What GPTQ costs per layer of the 7B shape: its inverse-Hessian factor (time and memory) and the whole quantization.

GPTQ (src/int8serve/engine/gptq.py) needs, for each input covariance H, the upper Cholesky factor of H⁻¹. The
textbook route (GPTQ's paper and most implementations) factors H, inverts it from its factor and factors the
inverse again (5/3 K³ flops, three K x K matrices alive beside H); ours factors the reversed H once, in H's own
memory, and inverts the triangle by halves (2/3 K³, two matrices and a quarter). Both run here, alternating, on the
same H, for the three input widths of a Llama-2-7B block; then `quantize_gptq` on each of the block's weight shapes
(random weights: the time
and memory do not depend on the values).

    .venv/bin/python -m benchmarks.gptq --write docs/benchmarks.md

Each measurement runs in a child process of its own, so that its peak resident size (VmHWM) is its own; "above
H" is the peak less the process's size once H is built.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import display_command, write_section
from benchmarks.machine import machine_description

# (output rows N, input columns K) of a Llama-2-7B block's weights, by the input they read
SHAPES = {"wq, wk, wv, wo": (4096, 4096), "w1, w3": (11008, 4096), "w2": (4096, 11008)}
CALIBRATION_ROWS = 2048  # as engine/calibration.py

_CHILD = """
import json, sys
from benchmarks.gptq import child_measure
print(json.dumps(child_measure(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
"""


def peak_rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def textbook_factor(h: torch.Tensor) -> torch.Tensor:
    """GPTQ's usual route to the upper Cholesky factor of (H + damping)⁻¹: factor, invert, factor again."""
    h = h.clone()
    h.diagonal().add_(0.01 * h.diagonal().mean())
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)


def child_measure(what: str, n: int, k: int) -> dict[str, float]:
    """In a fresh process: build H from random calibration rows, then run `what` once."""
    from int8serve.engine import gptq
    from int8serve.engine.loader import _give_back_freed_memory

    generator = torch.Generator().manual_seed(0)
    covariance = gptq.InputCovariance(k)
    covariance.add(torch.randn(CALIBRATION_ROWS, k, generator=generator))
    weight = torch.randn(n, k, generator=generator).half() if what == "quantize" else None
    _give_back_freed_memory()
    before = peak_rss()
    started = time.perf_counter()
    if what == "textbook":
        textbook_factor(covariance.matrix)
    elif what == "ours":  # as engine/calibration.py calls it: H handed over, damped and freed in place
        gptq.InverseHessianFactor.taking(covariance)
    else:
        gptq.quantize_gptq(weight, covariance.matrix, 32)
    return {"seconds": time.perf_counter() - started, "above_h": peak_rss() - before}


def measure(what: str, n: int, k: int) -> dict[str, float]:
    result = subprocess.run([sys.executable, "-c", _CHILD, what, str(n), str(k)], capture_output=True, text=True,
                            check=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of the factor comparison")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES),
                        help="which of the block's weight shapes (default: all three)")
    parser.add_argument("--write", help="also write the section into this Markdown file")
    args = parser.parse_args()
    started, load_before = time.time(), os.getloadavg()[0]
    rows = []
    for label in args.shapes:
        n, k = SHAPES[label]
        runs: dict[str, list[dict[str, float]]] = {"textbook": [], "ours": []}
        for round_ in range(args.rounds):
            for what in (("textbook", "ours") if round_ % 2 == 0 else ("ours", "textbook")):
                runs[what].append(measure(what, n, k))
                print(label, what, runs[what][-1], file=sys.stderr)
        whole = measure("quantize", n, k)
        print(label, "quantize", whole, file=sys.stderr)
        rows.append((label, n, k, runs, whole))
    lines = [
        "## GPTQ per layer of the 7B shape (`benchmarks/gptq.py`)",
        "",
        f"`{display_command('gptq', sys.argv[1:], hidden=['--write'])}` — {machine_description()}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{time.time() - started:.0f} s, load average {load_before:.1f} at the start and {os.getloadavg()[0]:.1f} "
        "at the end. The factor of H⁻¹ by the textbook route (on a copy of H) and by ours (H handed over, as "
        "the calibration does), alternating, "
        f"{args.rounds} rounds (means); then `quantize_gptq` whole (factor, column loop, block updates; a bf16 "
        "scale per 32 weights) once. Each in a process of its own; H from 2048 random rows.",
        "",
        "| layers (N x K) | factor, textbook | factor, ours | ours ÷ textbook (time) | above H, textbook | "
        "above H, ours | quantize_gptq whole |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, n, k, runs, whole in rows:
        def mean(what: str, key: str, runs: dict = runs) -> float:
            return sum(run[key] for run in runs[what]) / len(runs[what])
        lines.append(
            f"| {label} ({n} x {k}) | {mean('textbook', 'seconds'):.2f} s | {mean('ours', 'seconds'):.2f} s | "
            f"**{mean('ours', 'seconds') / mean('textbook', 'seconds'):.2f}×** | "
            f"{mean('textbook', 'above_h') / 1e9:.2f} GB | {mean('ours', 'above_h') / 1e9:.2f} GB | "
            f"{whole['seconds']:.1f} s, {whole['above_h'] / 1e9:.2f} GB above H |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        write_section(Path(args.write), text, "gptq.py")


if __name__ == "__main__":
    main()
