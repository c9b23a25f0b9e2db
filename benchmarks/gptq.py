"""What GPTQ costs per layer of the 7B shape: its inverse-Hessian factor (time and memory) and the whole quantization;
and, with `--calibrate MODEL`, a whole model's calibrated quantization with the layers that share an input quantized
together (the default) or one at a time.

GPTQ (src/int8serve/engine/gptq.py) needs, for each input covariance H, the upper Cholesky factor of H⁻¹. The
textbook route (GPTQ's paper and most implementations) factors H, inverts it from its factor and factors the
inverse again (5/3 K³ flops, three K x K matrices alive beside H); ours factors the reversed H once, in H's own
memory, and inverts the triangle by halves (2/3 K³, two matrices and a quarter). Both run here, alternating, on the
same H, for the three input widths of a Llama-2-7B block; then `quantize_gptq` on each of the block's weight shapes
(random weights: the time and memory do not depend on the values).

    .venv/bin/python -m benchmarks.gptq --write docs/benchmarks.md
    .venv/bin/python -m benchmarks.gptq --shapes --calibrate \
        ../shared/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf --write docs/benchmarks.md

The calibration compares `engine/calibration.py`'s two ways (`MERGE_BYTES`: small layers sharing an input in one
column loop, or each layer alone) in alternating rounds, each a fresh process loading the model as `int8serve`
does; both must give the same int8 model (a hash of every int8 weight and scale), or the benchmark stops.

Each measurement runs in a child process of its own, so that its peak resident size (VmHWM) is its own; "above
H" is the peak less the process's size once H is built.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from benchmarks.common import display_command, publish
from benchmarks.machine import machine_description

# (output rows N, input columns K) of a Llama-2-7B block's weights, by the input they read
SHAPES = {"wq, wk, wv, wo": (4096, 4096), "w1, w3": (11008, 4096), "w2": (4096, 11008)}
CALIBRATION_ROWS = 2048  # as engine/calibration.py

_CHILD = """
import json, sys
from benchmarks.gptq import child_measure
print(json.dumps(child_measure(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
"""
_CALIBRATION_CHILD = """
import json, sys
from benchmarks.gptq import child_calibrate
print(json.dumps(child_calibrate(sys.argv[1], int(sys.argv[2]))))
"""
WAYS = {"together": None, "one at a time": 0}  # calibration.MERGE_BYTES for each way (None: the default)


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
    from int8serve.engine.loader import give_back_freed_memory

    generator = torch.Generator().manual_seed(0)
    covariance = gptq.InputCovariance(k)
    covariance.add(torch.randn(CALIBRATION_ROWS, k, generator=generator))
    weight = torch.randn(n, k, generator=generator).half() if what == "quantize" else None
    give_back_freed_memory()
    before = peak_rss()
    started = time.perf_counter()
    if what == "textbook":
        textbook_factor(covariance.matrix)
    elif what == "ours":  # as engine/calibration.py calls it: H handed over, damped and freed in place
        gptq.InverseHessianFactor.taking(covariance)
    else:
        gptq.quantize_gptq(weight, covariance.matrix, 32)
    return {"seconds": time.perf_counter() - started, "above_h": peak_rss() - before}


def child_calibrate(model: str, merge_bytes: int) -> dict[str, float | str]:
    """In a fresh process: load `model` as int8 with GPTQ (no int8 cache), `calibration.MERGE_BYTES` set to
    `merge_bytes` (-1: left as it is); the load's time, the GPTQ calls' time and count, a hash of the int8 layers."""
    from int8serve.engine import calibration, int8
    from int8serve.engine.loader import load_model

    if merge_bytes >= 0:
        calibration.MERGE_BYTES = merge_bytes
    quantize, spent = calibration.quantize_gptq, {"seconds": 0.0, "calls": 0}

    def timed(*args: object, **kwargs: object) -> tuple[torch.Tensor, torch.Tensor]:
        started = time.perf_counter()
        try:
            return quantize(*args, **kwargs)
        finally:
            spent["seconds"] += time.perf_counter() - started
            spent["calls"] += 1

    calibration.quantize_gptq = timed
    started = time.perf_counter()
    loaded = load_model(Path(model), "int8", quantizer="gptq")
    seconds = time.perf_counter() - started
    digest = hashlib.sha256()
    for name, module in sorted(loaded.model.named_modules(), key=lambda item: item[0]):
        if isinstance(module, int8.Int8Linear):
            for tensor in module.quantized():
                digest.update(name.encode() + tensor.contiguous().view(torch.uint8).numpy().tobytes())
    return {"load": seconds, "gptq": spent["seconds"], "calls": spent["calls"], "hash": digest.hexdigest()[:16]}


def _child(script: str, *args: str) -> dict:
    result = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=False,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    if result.returncode != 0:
        raise SystemExit(f"benchmarks.gptq: a measurement failed:\n{result.stderr.strip()}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def measure(what: str, n: int, k: int) -> dict[str, float]:
    return _child(_CHILD, what, str(n), str(k))


def calibrate(model: str, way: str) -> dict[str, float | str]:
    merge_bytes = WAYS[way]
    return _child(_CALIBRATION_CHILD, model, str(-1 if merge_bytes is None else merge_bytes))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of each comparison")
    parser.add_argument("--shapes", nargs="*", choices=list(SHAPES), default=list(SHAPES),
                        help="which of the block's weight shapes (default: all three; none: only --calibrate)")
    parser.add_argument("--divide", type=int, default=1, metavar="D",
                        help="divide each shape's N and K by D (a quick run; the section says so)")
    parser.add_argument("--calibrate", metavar="MODEL",
                        help="also a whole model's calibrated quantization (a folder or .gguf file), both ways")
    parser.add_argument("--write", type=Path, help="also write the sections into this Markdown file")
    args = parser.parse_args(argv)
    if args.divide < 1 or args.rounds < 1:
        parser.error("--divide and --rounds must be at least 1")
    if not args.shapes and not args.calibrate:
        parser.error("nothing to measure: give --shapes or --calibrate")
    command = display_command("gptq", sys.argv[1:] if argv is None else argv, hidden=["--write"])
    if args.shapes:
        publish(per_layer_report(args, command), args.write, "gptq.py")
    if args.calibrate:
        publish(calibration_report(args, command), args.write, "gptq.py", f"calibrate {Path(args.calibrate).name}")


def _run_header(command: str, started: float, load_before: float) -> str:
    return (f"`{command}` — {machine_description()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {time.time() - started:.0f} s, load average "
            f"{load_before:.1f} at the start and {os.getloadavg()[0]:.1f} at the end.")


def per_layer_report(args: argparse.Namespace, command: str) -> str:
    started, load_before = time.time(), os.getloadavg()[0]
    rows = []
    for label in args.shapes:
        n, k = (size // args.divide for size in SHAPES[label])
        runs: dict[str, list[dict[str, float]]] = {"textbook": [], "ours": []}
        for round_ in range(args.rounds):
            for what in (("textbook", "ours") if round_ % 2 == 0 else ("ours", "textbook")):
                runs[what].append(measure(what, n, k))
                print(label, what, runs[what][-1], file=sys.stderr)
        whole = measure("quantize", n, k)
        print(label, "quantize", whole, file=sys.stderr)
        rows.append((label, n, k, runs, whole))
    shape = "the 7B shape" if args.divide == 1 else f"the 7B shape divided by {args.divide}"
    lines = [
        f"## GPTQ per layer of {shape} (`benchmarks/gptq.py`)",
        "",
        _run_header(command, started, load_before) + " The factor of H⁻¹ by the textbook route (on a copy of H) "
        "and by ours (H handed over, as the calibration does), alternating, "
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
    return "\n".join(lines)


def calibration_report(args: argparse.Namespace, command: str) -> str:
    started, load_before = time.time(), os.getloadavg()[0]
    runs: dict[str, list[dict]] = {way: [] for way in WAYS}
    for round_ in range(args.rounds):
        for way in (list(WAYS) if round_ % 2 == 0 else list(WAYS)[::-1]):
            runs[way].append(calibrate(args.calibrate, way))
            print(way, runs[way][-1], file=sys.stderr)
    hashes = {run["hash"] for way_runs in runs.values() for run in way_runs}
    if len(hashes) != 1:
        raise SystemExit(f"benchmarks.gptq: the two ways gave different int8 models ({sorted(hashes)})")

    def mean(way: str, key: str) -> float:
        return sum(run[key] for run in runs[way]) / len(runs[way])

    together, alone = "together", "one at a time"
    lines = [
        f"## GPTQ calibration of {Path(args.calibrate).name}: layers sharing an input together or one at a time "
        "(`benchmarks/gptq.py`)",
        "",
        _run_header(command, started, load_before) + f" {args.rounds} alternating rounds (means), each a fresh "
        "process loading the model as int8 with GPTQ (no int8 cache). Both ways gave the same int8 model (hash "
        f"{hashes.pop()} of every int8 weight and scale).",
        "",
        "| way | GPTQ calls | their time | the whole load |",
        "|---|---|---|---|",
    ]
    for way in WAYS:
        each = " / ".join(f"{run['gptq']:.2f}" for run in runs[way])
        lines.append(f"| {way} | {runs[way][0]['calls']} | {mean(way, 'gptq'):.2f} s ({each}) | "
                     f"{mean(way, 'load'):.2f} s |")
    lines += ["", f"Together ÷ one at a time: GPTQ's time **{mean(together, 'gptq') / mean(alone, 'gptq'):.2f}×**, "
              f"the whole load {mean(together, 'load') / mean(alone, 'load'):.2f}×."]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
