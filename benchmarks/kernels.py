"""Decode kernels on the Llama-2-7B linear shapes: our int8 GEMV (int8serve.engine.kernels) vs torch's int8pack.

Candidates, for M = 1, 2, 4 activation rows (decode of 1-4 sequences) by default:
- `int8pack`: `torch._weight_int8pack_mm` with bf16 activations and bf16 scales (Int8Linear's decode path today);
- `kernel`: `int8serve.engine.kernels.int8_gemv` on a weight packed once, fp32 activations quantized per 32 values
  to int8 inside the call, AVX-512 VNNI, fp32 output;
- `precise`: the same with precise=True (each row quantized twice, the row and its quantization error: 2M int8 rows);
- with --dense also `dense`: Int8Linear's path for many rows (dequantize into a reused bf16 buffer, `F.linear`),
  to see up to which M the kernel should be used (e.g. --dense --rows 8 16 32 64 128 --threads 2).

Each shape rotates through more than 1.3 GB of distinct weights (every copy its own memory and its own bytes), so
no call finds its weight in a cache. The machine is shared and its memory bandwidth drifts by 2x within seconds,
so the candidates are interleaved: every round times a run of calls of each candidate in turn (alternating which
goes first) and samples the read bandwidth (fp32 sum over 1 GiB, 2 threads) just before; the tables give medians
over all rounds and the median of the per-round speed-ups over int8pack. GB/s counts int8 weight bytes (N*K) per
call.

Accuracy: relative error ||y - y_ref|| / ||y_ref|| of each candidate against the fp64 product of the same
activations with the dequantized int8 weight (so weight quantization itself is not counted), for Gaussian
activations and for activations with outlier channels (1% of the channels 30x larger, as trained LLMs have).

The 7B estimate sums the linears of one decode step: 32 x (4 qkvo + 2 gate/up + 1 down) + lm_head, at 2 threads;
attention, norms and Python come on top (about 57 ms per batch-1 step in docs/benchmarks.md).

With --quality it instead measures what the kernel's int8 activations cost on a real trained model (stories260K
and tinystories.txt from the shared folder), against the fp32 model, for several Int8Linear forwards patched in
for every row count (so that prefill goes through the decode kernel too): perplexity ratio, KL divergence and
top-1 agreement over the corpus (engine.perplexity.evaluate), and greedy generations compared token by token.

    .venv/bin/python -m benchmarks.kernels                 # about 5 minutes
    .venv/bin/python -m benchmarks.kernels --rounds 3 --threads 2 --rows 1   # quick look
    .venv/bin/python -m benchmarks.kernels --quality       # about a minute
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from int8serve.engine import kernels
from int8serve.engine.generate import generate
from int8serve.engine.int8 import COMPUTE_DTYPE, Int8Linear
from int8serve.engine.loader import load_model
from int8serve.engine.perplexity import evaluate
from int8serve.engine.sampling_params import SamplingParams
from int8serve.engine.tokenizer import Tokenizer

SHAPES = [(4096, 4096, "qkvo"), (4096, 11008, "gate/up"), (11008, 4096, "down"), (4096, 32000, "lm_head")]
BLOCK_MIX = {"qkvo": 4, "gate/up": 2, "down": 1}
N_LAYERS = 32
OURS = ("kernel", "precise")
ROTATION_BYTES = 1.3e9
QUIET = 0.15  # share of the CPUs used by other processes below which the machine counts as quiet


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------------------------
# the machine


def _jiffies() -> tuple[int, int]:
    """(busy jiffies of the machine, jiffies of this process)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return sum(fields) - fields[3] - fields[4], int(own[11]) + int(own[12])


class OtherLoad:
    """Share of the CPUs that other processes used since construction."""

    def __init__(self) -> None:
        self.start, self.t0 = _jiffies(), time.perf_counter()

    def share(self) -> float:
        busy, own = _jiffies()
        ticks = (time.perf_counter() - self.t0) * os.sysconf("SC_CLK_TCK") * (os.cpu_count() or 1)
        return max(0.0, (busy - self.start[0]) - (own - self.start[1])) / ticks if ticks else 0.0


def wait_quiet(max_seconds: float) -> float:
    """Wait (up to max_seconds) until other processes use < 15% of the CPUs for a second; return their share."""
    deadline = time.perf_counter() + max_seconds
    while True:
        probe = OtherLoad()
        time.sleep(1.0)
        share = probe.share()
        if share < QUIET or time.perf_counter() >= deadline:
            return share
        log(f"  waiting for a quiet machine (others use {share:.0%} of the CPUs)")
        time.sleep(3.0)


class Bandwidth:
    def __init__(self, gib: float = 1.0) -> None:
        self.buffer = torch.rand(int(gib * 2**30) // 4)

    def sample(self, threads: int = 2) -> float:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            started = time.perf_counter()
            self.buffer.sum()
            return self.buffer.nbytes / (time.perf_counter() - started) / 1e9
        finally:
            torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------------------------
# candidates


@dataclass
class ShapeData:
    k: int
    n: int
    label: str
    int8: list[Tensor]  # distinct copies for int8pack
    packed: list[kernels.PackedWeight]  # distinct copies for the kernel
    scale: Tensor  # fp32 [N]
    scale_bf16: Tensor
    buffer: Tensor | None = None  # the dense path's reused bf16 weight

    @classmethod
    def make(cls, k: int, n: int, label: str, generator: torch.Generator) -> ShapeData:
        block = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)
        # bf16-exact scales, as quantize_per_channel makes them
        scale = (torch.rand(n, generator=generator) * 0.02 + 0.002).to(torch.bfloat16).float()
        copies = math.ceil(ROTATION_BYTES / (n * k))
        int8 = [torch.roll(block, shifts=i + 1, dims=0) for i in range(copies)]
        # the kernel's copies hold other rows again, so that no page repeats another anywhere
        packed = [kernels.pack_weight(torch.roll(block, shifts=-(i + 1), dims=0), scale) for i in range(copies)]
        return cls(k, n, label, int8, packed, scale, scale.to(torch.bfloat16))

    def call(self, name: str, x: Tensor, index: int) -> Tensor:
        if name == "int8pack":
            return torch._weight_int8pack_mm(x.to(torch.bfloat16), self.int8[index], self.scale_bf16)
        if name == "dense":
            if self.buffer is None:
                self.buffer = torch.empty(self.n, self.k, dtype=torch.bfloat16)
            torch.mul(self.int8[index], self.scale_bf16[:, None], out=self.buffer)
            return torch.nn.functional.linear(x.to(torch.bfloat16), self.buffer)
        return kernels.int8_gemv(x, self.packed[index], precise=name == "precise")

    def reference(self, name: str, x: Tensor, index: int) -> Tensor:
        weight = kernels.unpack_weight(self.packed[index]) if name in OURS else self.int8[index]
        return x.double() @ (weight.double() * self.scale.double()[:, None]).T


def relative_error(data: ShapeData, name: str, x: Tensor) -> float:
    got = data.call(name, x, 0).double()
    ref = data.reference(name, x, 0)
    return ((got - ref).norm() / ref.norm()).item()


def activations(kind: str, m: int, k: int, generator: torch.Generator) -> Tensor:
    x = torch.randn(m, k, generator=generator)
    if kind == "outliers":
        channels = torch.randperm(k, generator=generator)[: max(1, k // 100)]
        x[:, channels] *= 30.0
    return x


# ---------------------------------------------------------------------------------------------------------------
# timing


@dataclass
class Result:
    label: str
    k: int
    n: int
    m: int
    threads: int
    candidates: tuple[str, ...] = ("int8pack", "kernel")
    seconds: dict[str, list[float]] = field(default_factory=dict)
    speedups: dict[str, list[float]] = field(default_factory=dict)  # per round: int8pack's time / this one's
    bandwidth: list[float] = field(default_factory=list)
    other_load: float = 0.0

    def speedup(self, name: str) -> float:
        return statistics.median(self.speedups[name])

    def median(self, name: str) -> float:
        return statistics.median(self.seconds[name])

    def gb_s(self, name: str) -> float:
        return self.n * self.k / self.median(name) / 1e9


def time_shape(data: ShapeData, m: int, threads: int, rounds: int, budget: float, bandwidth: Bandwidth,
               generator: torch.Generator, candidates: tuple[str, ...]) -> Result:
    result = Result(data.label, data.k, data.n, m, threads, candidates)
    result.seconds = {c: [] for c in candidates}
    result.speedups = {c: [] for c in candidates if c != "int8pack"}
    x = torch.randn(m, data.k, generator=generator)
    copies = len(data.int8)
    torch.set_num_threads(threads)
    for name in candidates:  # warm-up (and the kernel's one-time build/load)
        data.call(name, x, copies - 1)
    load = OtherLoad()
    index = 0
    for r in range(rounds):
        result.bandwidth.append(bandwidth.sample())
        torch.set_num_threads(threads)
        order = candidates if r % 2 == 0 else candidates[::-1]
        per_round: dict[str, list[float]] = {}
        for name in order:
            times: list[float] = []
            while len(times) < 3 or (sum(times) < budget and len(times) < copies):
                index = (index + 1) % copies
                started = time.perf_counter()
                data.call(name, x, index)
                times.append(time.perf_counter() - started)
            per_round[name] = times
            result.seconds[name] += times
        for name in result.speedups:
            result.speedups[name].append(statistics.median(per_round["int8pack"]) / statistics.median(per_round[name]))
    result.other_load = load.share()
    return result


# ---------------------------------------------------------------------------------------------------------------
# report


def step_bytes() -> int:
    per_block = sum(BLOCK_MIX[label] * k * n for k, n, label in SHAPES if label in BLOCK_MIX)
    head = next(k * n for k, n, label in SHAPES if label == "lm_head")
    return N_LAYERS * per_block + head


def step_seconds(results: Sequence[Result], m: int, threads: int, name: str) -> float | None:
    by_label = {r.label: r for r in results if r.m == m and r.threads == threads}
    if any(label not in by_label for _, _, label in SHAPES):
        return None
    block = sum(count * by_label[label].median(name) for label, count in BLOCK_MIX.items())
    return N_LAYERS * block + by_label["lm_head"].median(name)


def report(results: Sequence[Result], errors: dict[tuple[str, str, str], float], rows: Sequence[int],
           threads_list: Sequence[int], machine: str) -> str:
    others = [c for c in results[0].candidates if c != "int8pack"] if results else []
    lines = [
        "## Decode kernels: int8serve.engine.kernels vs `_weight_int8pack_mm`",
        "",
        f"- Command: `{' '.join(['.venv/bin/python -m benchmarks.kernels', *sys.argv[1:]])}`",
        f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {machine}",
        "- GB/s = int8 weight bytes / median call time, weights rotated through > 1.3 GB; `×` = median over rounds of "
        "(int8pack time / this candidate's time), measured back to back; `bw` = fp32-sum read bandwidth (2 threads) "
        "sampled before each round (median); `% bw` = kernel GB/s / bw.",
        "",
        "| shape K→N | M | threads | int8pack GB/s | " + " | ".join(f"{c} GB/s | ×" for c in others)
        + " | bw GB/s | " + " | ".join(f"{c} % bw" for c in OURS if c in others) + " | others' CPU |",
        "|---|---|---|---|" + "---|---|" * len(others) + "---|" + "---|" * len([c for c in OURS if c in others])
        + "---|",
    ]
    for r in results:
        bw = statistics.median(r.bandwidth)
        cells = " | ".join(f"{r.gb_s(c):.1f} | **{r.speedup(c):.2f}×**" for c in others)
        shares = " | ".join(f"{100 * r.gb_s(c) / bw:.0f}%" for c in OURS if c in others)
        lines.append(f"| {r.k}→{r.n} ({r.label}) | {r.m} | {r.threads} | {r.gb_s('int8pack'):.1f} | {cells} "
                     f"| {bw:.1f} | {shares} | {r.other_load:.0%} |")
    paths = ("int8pack", *OURS)
    lines += ["", "Accuracy: relative error ‖y − y_ref‖ / ‖y_ref‖ against fp64 (the same activations times the "
              "dequantized int8 weight), M = 4:", "",
              "| shape K→N | " + " | ".join(f"{p}, Gaussian x" for p in paths) + " | "
              + " | ".join(f"{p}, outlier channels" for p in paths) + " |",
              "|---|" + "---|" * (2 * len(paths))]
    for k, n, label in SHAPES:
        if (label, "int8pack", "gaussian") not in errors:
            continue
        cells = [f"{errors[(label, p, kind)]:.1e}" for kind in ("gaussian", "outliers") for p in paths]
        lines.append(f"| {k}→{n} ({label}) | " + " | ".join(cells) + " |")
    total = step_bytes()
    lines += ["", f"Llama-2-7B step, linears only: 32 × (4 qkvo + 2 gate/up + 1 down) + lm_head = {total / 1e9:.2f} GB "
              "of int8 weights; tok/s = M / step time; roofline = bytes / median bw of those rows:", "",
              "| M | threads | int8pack ms | tok/s | " + " | ".join(f"{c} ms | tok/s | ×" for c in others)
              + " | kernel % of roofline |",
              "|---|---|---|---|" + "---|---|---|" * len(others) + "---|"]
    for threads in threads_list:
        for m in rows:
            base = step_seconds(results, m, threads, "int8pack")
            ours = {c: step_seconds(results, m, threads, c) for c in others}
            if base is None or any(v is None for v in ours.values()):
                continue
            bws = [bw for r in results if r.m == m and r.threads == threads for bw in r.bandwidth]
            roof = total / (statistics.median(bws) * 1e9)
            cells = " | ".join(f"{1e3 * t:.0f} | {m / t:.2f} | {base / t:.2f}×" for t in ours.values() if t)
            kernel = ours.get("kernel")
            share = f"{100 * roof / kernel:.0f}%" if kernel else "—"
            lines.append(f"| {m} | {threads} | {1e3 * base:.0f} | {m / base:.2f} | {cells} | {share} |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------
# quality on a trained model

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def _int8pack_forward(self: Int8Linear, x: Tensor) -> Tensor:
    """Int8Linear's decode path at every row count: int8pack with bf16 activations (dense bf16 where K % 16 != 0)."""
    rows = x.reshape(-1, self.in_features).to(COMPUTE_DTYPE)
    scale = self.scale.to(COMPUTE_DTYPE)
    if self.in_features % 16 == 0:
        out = torch._weight_int8pack_mm(rows, self.weight, scale)
    else:
        out = torch.nn.functional.linear(rows, self.weight.to(COMPUTE_DTYPE) * scale[:, None])
    out = out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
    return self._refine(x, out) if self.refine_top else out


def _fp32_weight_only_forward(self: Int8Linear, x: Tensor) -> Tensor:
    """The int8 weights in exact fp32 arithmetic: weight quantization error only (the best an int8 kernel can do)."""
    return x.float() @ (self.weight.float() * self.scale[:, None]).T


def _kernel_forward(refine: bool, precise: bool = False) -> Callable[[Int8Linear, Tensor], Tensor]:
    def forward(self: Int8Linear, x: Tensor) -> Tensor:
        packed = getattr(self, "_bench_packed", None)
        if packed is None:
            packed = self._bench_packed = kernels.pack_weight(self.weight, self.scale)
        out = kernels.int8_gemv(x.reshape(-1, self.in_features), packed, precise=precise)
        out = out.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        return self._refine(x, out) if refine and self.refine_top else out
    return forward


QUALITY_VARIANTS: dict[str, Callable[[Int8Linear, Tensor], Tensor]] = {
    "int8 weights, fp32 math (weight error only)": _fp32_weight_only_forward,
    "int8pack, bf16 activations + head refine (today's decode path)": _int8pack_forward,
    "kernel, int8 activations per 32 + head refine": _kernel_forward(refine=True),
    "kernel, int8 activations per 32, no head refine": _kernel_forward(refine=False),
    "kernel precise (2 int8 passes per row) + head refine (int8.py patch)": _kernel_forward(refine=True, precise=True),
}


@contextlib.contextmanager
def patched_forward(forward: Callable[[Int8Linear, Tensor], Tensor]) -> Iterator[None]:
    original = Int8Linear.forward
    Int8Linear.forward = forward  # type: ignore[method-assign]
    try:
        yield
    finally:
        Int8Linear.forward = original  # type: ignore[method-assign]


def greedy(model: torch.nn.Module, prompt: list[int], tokens: int, eos: int) -> list[int]:
    params = SamplingParams(temperature=0.0, seed=0)
    return list(generate(model, prompt, params, tokens, eos))


def quality(args: argparse.Namespace) -> str:
    model_dir = SHARED / "models" / "stories260K" / "hf"
    corpus = (SHARED / "corpus" / "tinystories.txt").read_text()
    tokenizer = Tokenizer(model_dir / "tokenizer.model")
    fp32 = load_model(model_dir, "fp32").model
    int8 = load_model(model_dir, "int8").model
    widths = sorted({(m.in_features, m.out_features) for m in int8.modules() if isinstance(m, Int8Linear)})
    ids = tokenizer.encode(corpus)[: args.quality_tokens]
    paragraphs = [p for p in corpus.split("\n") if len(p.split()) > 12]
    step = max(1, len(paragraphs) // args.prompts)
    prompts = [tokenizer.encode(" ".join(p.split()[:8]), bos=True) for p in paragraphs[::step][: args.prompts]]
    reference = [greedy(fp32, p, args.greedy_tokens, tokenizer.eos_id) for p in prompts]
    lines = [
        "## Decode kernel quality: stories260K (trained), tinystories.txt",
        "",
        f"- Linear shapes (K→N): {', '.join(f'{k}→{n}' for k, n in widths)}; the kernel pads K to a multiple of 32 "
        "with zeros (172 → 192); int8pack needs K % 16 == 0, so its row falls back to a dense bf16 matmul for 172.",
        f"- Every Int8Linear call of the int8 model goes through the named path, at every row count. Reference: the "
        f"fp32 model. Perplexity over the first {len(ids)} tokens in windows of {args.window}; greedy: "
        f"{len(prompts)} prompts (8 words from paragraphs across the corpus) × up to {args.greedy_tokens} tokens.",
        "",
        "| path | PPL ratio | KLD (nats/token) | top-1 agreement | greedy tokens equal to fp32 "
        "| mean identical prefix |",
        "|---|---|---|---|---|---|",
    ]
    for label, forward in QUALITY_VARIANTS.items():
        with patched_forward(forward):
            rep = evaluate(int8, ids, args.window, tokenizer.bos_id, reference=fp32)
            outputs = [greedy(int8, p, args.greedy_tokens, tokenizer.eos_id) for p in prompts]
        equal = total = 0
        prefixes = []
        for ref, got in zip(reference, outputs, strict=True):
            length = max(len(ref), len(got))
            equal += sum(a == b for a, b in zip(ref, got, strict=False))
            total += length
            prefix = next((i for i, (a, b) in enumerate(zip(ref, got, strict=False)) if a != b),
                          min(len(ref), len(got)))
            prefixes.append(prefix)
        lines.append(f"| {label} | {rep.ratio:.5f} | {rep.kld:.6f} | {rep.top1:.2f}% | {100 * equal / total:.1f}% "
                     f"| {statistics.mean(prefixes):.1f} |")
        log(lines[-1])
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4], metavar="M")
    parser.add_argument("--threads", type=int, nargs="+", default=[2, 1])
    parser.add_argument("--rounds", type=int, default=6, help="interleaved rounds per (shape, M, threads)")
    parser.add_argument("--budget", type=float, default=0.25, help="seconds of calls per candidate and round")
    parser.add_argument("--shapes", nargs="+", default=[label for _, _, label in SHAPES],
                        choices=[label for _, _, label in SHAPES])
    parser.add_argument("--wait-quiet", type=float, default=60.0, metavar="SECONDS",
                        help="wait up to this long before each shape for other processes to leave the CPUs")
    parser.add_argument("--dense", action="store_true", help="also time Int8Linear's dense (dequantize) path")
    parser.add_argument("--quality", action="store_true", help="measure accuracy on stories260K instead of speed")
    parser.add_argument("--quality-tokens", type=int, default=32768, help="corpus tokens for perplexity/KLD")
    parser.add_argument("--window", type=int, default=256, help="perplexity window in tokens")
    parser.add_argument("--prompts", type=int, default=12, help="greedy prompts")
    parser.add_argument("--greedy-tokens", type=int, default=128, help="greedy tokens per prompt")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    if not kernels.available():
        raise SystemExit(f"the kernel is not available: {kernels.unavailable_reason()}")
    if args.quality:
        print(quality(args))
        return
    log(f"kernel library built/loaded in {time.perf_counter() - started:.1f} s")
    machine = (f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()})")
    generator = torch.Generator().manual_seed(0)
    candidates = ("int8pack", *OURS, "dense") if args.dense else ("int8pack", *OURS)
    bandwidth = Bandwidth()
    results: list[Result] = []
    errors: dict[tuple[str, str, str], float] = {}
    for k, n, label in SHAPES:
        if label not in args.shapes:
            continue
        log(f"{label}: {k}→{n}, building {math.ceil(ROTATION_BYTES / (n * k))} copies of each weight ...")
        data = ShapeData.make(k, n, label, generator)
        for kind in ("gaussian", "outliers"):
            x = activations(kind, 4, k, generator)
            for name in ("int8pack", *OURS):
                errors[(label, name, kind)] = relative_error(data, name, x)
        for threads in args.threads:
            for m in args.rows:
                result = None
                for attempt in range(3):  # measure again when others used the CPUs meanwhile; keep the least disturbed
                    share = wait_quiet(args.wait_quiet)
                    if share >= QUIET:
                        log(f"  machine still busy ({share:.0%} of the CPUs used by others): measuring anyway")
                    again = time_shape(data, m, threads, args.rounds, args.budget, bandwidth, generator, candidates)
                    if result is None or again.other_load < result.other_load:
                        result = again
                    if result.other_load < QUIET:
                        break
                    log(f"  others used {again.other_load:.0%} of the CPUs during attempt {attempt + 1}")
                assert result is not None
                results.append(result)
                speeds = ", ".join(f"{c} {result.gb_s(c):.1f} GB/s" for c in candidates)
                log(f"  M={m} threads={threads}: {speeds}, kernel speed-up {result.speedup('kernel'):.2f}, bw "
                    f"{statistics.median(result.bandwidth):.1f}, others {result.other_load:.0%}")
        del data
    print(report(results, errors, args.rows, args.threads, machine))


if __name__ == "__main__":
    main()
