"""Benchmark the int8 engine on a Llama-2-7B-shaped model with random weights, on this CPU.

The model is built directly in int8 (never as a 6.7 GB fp32 model first): `Transformer(config, "int8")` on the
meta device, then every `Int8Linear` gets its own random int8 weight and small random scales (a scale per 32 inputs,
the default scheme; `--group-size`). The weights are
random, so the numbers say how fast the engine is, not what it would write.

Everything is measured in one run, so that ratios are same-run ratios on a shared, noisy machine:
1. read bandwidth: fp32 sum over a 2 GiB buffer, best of 5, before and after the engine runs;
2. prefill: tok/s for one prompt (`generate.prefill`, 1-slot cache, median of 3 after a warm-up);
3. decode: median step time at batch 1 and at batch 4 (4 cache slots at different positions, tokens [4, 1]);
   before every step the bandwidth is sampled again (the host's memory bandwidth drifts by up to 2x within
   seconds), so each step is compared with the bandwidth of the same moment;
4. roofline: int8 weight + scale bytes read per decode step / bandwidth = the ideal step time;
   the non-matmul share of a step (issue #10 item 2: <= 8% at batch 1, <= 12% at batch 4): the same decode steps
   again, each with a clock around every int8 linear call (`LinearClock`: the decode plan's own clock, or forward
   hooks where steps go through the modules), so that a step is split
   into its linears and the rest within itself, not against linears timed at another moment;
5. with --kernels: both linear paths of `Int8Linear` (`torch._weight_int8pack_mm` with bf16 activations, and
   dequantize into a reused bf16 buffer + `F.linear`) on the 7B shapes at several row counts M, rotating through
   more than 1.2 GB of distinct weights per shape so that caches do not flatter; `DENSE_ROWS_THRESHOLD` is chosen
   from this table.

Before each timed phase the script waits for other processes to leave the CPUs, and measures again (keeping the
least disturbed attempt) when they came back during the measurement.

    .venv/bin/python -m benchmarks.engine --layers 2 --kernels          # quick check, ~3 minutes
    .venv/bin/python -m benchmarks.engine --kernels --write docs/benchmarks.md

--write replaces this script's section of the Markdown file (creating the file if needed). The full run takes
10-25 minutes (longer while the machine is busy) and peaks at ~11 GB resident: two at once do not fit in 24 GB.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import gc
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextvars import Token
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from benchmarks.common import display_command, write_section
from benchmarks.machine import QUIET, QUIET_BUDGET, CpuShares, QuietWaiter, least_contended, log, machine_facts, rss_gb
from int8serve.engine import decode_plan, kv_int8
from int8serve.engine.config import ModelConfig
from int8serve.engine.generate import prefill
from int8serve.engine.int8 import (
    COMPUTE_DTYPE,
    DEFAULT_GROUP_SIZE,
    DENSE_ROWS_THRESHOLD,
    GROUP_SIZES,
    Int8Linear,
    StackedInt8Linear,
    describe_dense,
)
from int8serve.engine.kernels import attention as attention_kernel
from int8serve.engine.model import KV_CACHES, KVCache, RMSNorm, Transformer
from int8serve.engine.scheduler import DEFAULT_PREFILL_CHUNK

LLAMA2_7B = ModelConfig(dim=4096, n_layers=32, n_heads=32, n_kv_heads=32, vocab_size=32000, hidden_dim=11008,
                        max_seq_len=4096, tie_embeddings=False)

# From ../shared/reference/cpu-measurements.md (beside the repository): measured on another day, on another CPU.
REFERENCE_FILE = "`../shared/reference/cpu-measurements.md`"
REFERENCE_DAY = "2026-11-24 on a 2 vCPU Sapphire Rapids (AVX-512 VNNI, AMX), 2 threads"
LLAMA_CPP = {"prefill": 44.65, "decode_b1": 3.94, "decode_b4": 10.74}  # Q8_0 7B GGUF
PLAIN_TORCH = {"prefill": 87.6, "decode_b1": 3.20, "decode_b4": 9.49}  # plain PyTorch int8 Llama, same shape

TARGET_ROOFLINE = 0.70  # the target for batch-1 decode
TARGET_REST = {1: 0.08, 4: 0.12}  # issue #10 item 2: the non-matmul share of a decode step, by batch
BANDWIDTH_GIB = 2.0
KERNEL_SHAPES = [(4096, 4096, "qkvo"), (4096, 11008, "gate/up"), (11008, 4096, "down"), (4096, 32000, "lm_head")]
LAYER_MIX = {"qkvo": 4, "gate/up": 2, "down": 1}  # linears per transformer block, by shape
KERNEL_M = [1, 4, 8, 16, 32, 64, 128, 256, 512]
KERNEL_MIN_BYTES = 1.3e9  # distinct weight bytes each shape rotates through
KERNEL_TIME_BUDGET = 2.0  # seconds of timed calls per (shape, M, path); at least 3 calls


# ---------------------------------------------------------------------------------------------------------------
# Bandwidth


class BandwidthProbe:
    """A 2 GiB fp32 buffer; summing it (with all torch threads) measures the read bandwidth at this moment.

    Random contents, so that no two pages are identical (a hypervisor could merge identical pages).
    """

    def __init__(self, gib: float = BANDWIDTH_GIB) -> None:
        self.buffer = torch.rand(int(gib * 2**30) // 4, dtype=torch.float32)

    def sample(self) -> float:
        started = time.perf_counter()
        self.buffer.sum()
        return self.buffer.nbytes / (time.perf_counter() - started) / 1e9

    def best(self, reps: int = 5) -> float:
        return max(self.sample() for _ in range(reps))


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure_bandwidth(quiet: QuietWaiter, threads: int | None = None) -> float:
    """Best of 5 sums over a fresh 2 GiB buffer, in GB/s; the buffer is freed afterwards."""
    quiet.wait()
    probe = BandwidthProbe()
    with torch_threads(threads or torch.get_num_threads()):
        best = probe.best()
    del probe
    gc.collect()
    return best


# ---------------------------------------------------------------------------------------------------------------
# The model


def int8_linears(model: nn.Module) -> list[Int8Linear]:
    return [m for m in model.modules() if isinstance(m, Int8Linear)]


def random_scales(rows: int, in_features: int, generator: torch.Generator, group_size: int = 0) -> Tensor:
    """fp32 scales giving weights of std ~1/sqrt(in_features) for uniform int8 values (whose std is ~73):
    [rows] per channel (group_size 0), else [rows, ceil(in_features / group_size)]."""
    shape = (rows, -(-in_features // group_size)) if group_size else (rows,)
    return (0.5 + torch.rand(shape, generator=generator)) / (73.0 * math.sqrt(in_features))


def build_random_int8_model(config: ModelConfig, seed: int = 0, group_size: int = 0) -> Transformer:
    """The model of `config` with random int8 weights, built on the meta device and then filled.

    One random block is drawn per distinct weight shape; every layer gets its own copy of it, rolled by a different
    number of rows, so that no two layers share storage (shared storage would let caches flatter the result).
    group_size: the weights' scheme (0 = a scale per output channel, else per group of that many inputs).
    """
    with torch.device("meta"):
        model = Transformer(config, "int8")
    generator = torch.Generator().manual_seed(seed)
    blocks: dict[tuple[int, int], Tensor] = {}
    for index, linear in enumerate(int8_linears(model)):
        shape = (linear.out_features, linear.in_features)
        if shape not in blocks:
            blocks[shape] = torch.randint(-127, 128, shape, dtype=torch.int8, generator=generator)
        weight = torch.roll(blocks[shape], shifts=index + 1, dims=0)  # a new tensor with its own memory
        linear.set_quantized(weight, random_scales(shape[0], shape[1], generator, group_size), group_size)
    del blocks
    model.tok_embeddings.weight = nn.Parameter(torch.randn(config.vocab_size, config.dim, generator=generator),
                                               requires_grad=False)
    for norm in (m for m in model.modules() if isinstance(m, RMSNorm)):
        norm.weight = nn.Parameter(torch.ones(config.dim), requires_grad=False)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device: {left[:5]}")
    model.stack_projections()  # as the loaders do
    gc.collect()
    return model.eval()


def describe_scales(group_size: int) -> str:
    if group_size == 0:
        return "a bf16 scale per output channel"
    default = ", the default scheme" if group_size == DEFAULT_GROUP_SIZE else ""
    return f"a bf16 scale per {group_size} input values{default}"


def decode_bytes_per_step(model: Transformer) -> int:
    """Bytes of int8 weights and kernel (bf16) scales that every decode step reads once."""
    return sum(linear.weight_nbytes for linear in int8_linears(model))


def linear_flops_per_token(model: Transformer) -> int:
    return sum(2 * m.in_features * m.out_features for m in int8_linears(model))


def fill_cache(cache: KVCache, seed: int = 1) -> None:
    """Write small random values everywhere: untouched pages would all read the kernel's shared zero page."""
    generator = torch.Generator().manual_seed(seed)
    for tensor in cache.k + cache.v:
        values = torch.randn(*tensor.shape[:-1], cache.head_dim, generator=generator) * 0.5
        tensor.copy_(kv_int8.quantize(values) if tensor.dtype == torch.int8 else values)  # (an int8 cache: rows)


def random_tokens(shape: tuple[int, ...], vocab: int, generator: torch.Generator) -> Tensor:
    return torch.randint(3, vocab, shape, generator=generator)


# ---------------------------------------------------------------------------------------------------------------
# Engine timings


@dataclass
class Timing:
    """Durations in seconds of repeated runs, the bandwidth sampled just before each (if any), other load."""

    seconds: list[float]
    bandwidths: list[float] = field(default_factory=list)
    other_load: float = 0.0
    linear_seconds: list[float] = field(default_factory=list)  # of each run, inside its Int8Linear calls (LinearClock)

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)

    @property
    def best(self) -> float:
        return min(self.seconds)

    @property
    def rest_share(self) -> float:
        """Median over runs of the share of a run spent outside its Int8Linear calls."""
        return statistics.median((s - inside) / s for s, inside in zip(self.seconds, self.linear_seconds, strict=True))

    @property
    def linear_median(self) -> float:
        return statistics.median(self.linear_seconds)

    def roofline_share(self, step_bytes: int) -> float:
        """Median over runs of (ideal time at the bandwidth of that moment) / (measured time)."""
        return statistics.median(step_bytes / bw / 1e9 / s for s, bw in zip(self.seconds, self.bandwidths,
                                                                               strict=True))


def time_prefill(model: Transformer, cache: KVCache, prompt_len: int, reps: int = 3,
                 warmup_tokens: int | None = None) -> Timing:
    """`reps` prefills of one random prompt after a warm-up prefill of its first `warmup_tokens` (default: all)."""
    generator = torch.Generator().manual_seed(2)
    prompt = random_tokens((prompt_len,), model.config.vocab_size, generator).tolist()
    prefill(model, prompt[:warmup_tokens], cache, slot=0)  # warm-up
    return time_runs(lambda: prefill(model, prompt, cache, slot=0), reps)


def time_runs(run: Callable[[], object], reps: int) -> Timing:
    """Seconds of each of `reps` calls of `run`, and the CPU share other processes took meanwhile."""
    load = CpuShares()
    seconds = []
    for _ in range(reps):
        started = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - started)
    return Timing(seconds, other_load=load.others())


class LinearClock:
    """Seconds spent inside a model's int8 linear calls, so that a decode step is split into its linears and the rest
    within the same step: the split does not depend on the bandwidth of another moment.

    Forward hooks on the Int8Linear and StackedInt8Linear modules time the calls made through the modules (their own
    cost, a few microseconds a call, falls outside the calls, so it counts as rest; a layer called from within a
    stacked call counts once). Steps that run through a decode plan (engine/decode_plan.py: the layers' kernel calls
    replayed without the modules) clock their own linear calls (decode_plan.LINEAR_TIMER); the hooks are marked so
    that the plan still runs."""

    def __init__(self, model: nn.Module) -> None:
        self.seconds = 0.0
        self._entered = 0.0
        self._depth = 0
        self._handles = []
        self._timer = decode_plan.LinearTimer()
        self._token: Token | None = decode_plan.LINEAR_TIMER.set(self._timer)
        enter, leave = self._hook(self._enter), self._hook(self._leave)
        for linear in (m for m in model.modules() if isinstance(m, (Int8Linear, StackedInt8Linear))):
            self._handles += [linear.register_forward_pre_hook(enter), linear.register_forward_hook(leave)]

    @staticmethod
    def _hook(method: Callable[..., None]) -> Callable[..., None]:
        def hook(*args: object) -> None:
            method(*args)

        setattr(hook, decode_plan.PLAN_AWARE, True)
        return hook

    def _enter(self, _module: nn.Module, _args: object) -> None:
        if self._depth == 0:
            self._entered = time.perf_counter()
        self._depth += 1

    def _leave(self, _module: nn.Module, _args: object, _output: object) -> None:
        self._depth -= 1
        if self._depth == 0:
            self.seconds += time.perf_counter() - self._entered

    def take(self) -> float:
        """The seconds gathered since the last take."""
        seconds = self.seconds + self._timer.seconds
        self.seconds = self._timer.seconds = 0.0
        return seconds

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self._token is not None:
            decode_plan.LINEAR_TIMER.reset(self._token)
            self._token = None

    def __enter__(self) -> LinearClock:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def time_decode(model: Transformer, cache: KVCache, slots: Sequence[int], starts: Sequence[int], steps: int,
                probe: BandwidthProbe | None, warmup: int = 2, split: bool = False) -> Timing:
    """Durations of `steps` forwards of one new token per slot after `warmup` untimed ones, each just after a
    bandwidth sample (with a probe); with `split`, also the time inside the Int8Linear calls of each (LinearClock)."""
    with LinearClock(model) if split else contextlib.nullcontext() as clock:
        return _time_steps(model, cache, slots, starts, steps, probe, warmup, clock)


def _time_steps(model: Transformer, cache: KVCache, slots: Sequence[int], starts: Sequence[int], steps: int,
                probe: BandwidthProbe | None, warmup: int, clock: LinearClock | None) -> Timing:
    generator = torch.Generator().manual_seed(3)
    positions = list(starts)
    timing = Timing([])
    load = CpuShares()
    for step in range(warmup + steps):
        if step == warmup:
            load = CpuShares()
        tokens = random_tokens((len(slots), 1), model.config.vocab_size, generator)
        bandwidth = probe.sample() if probe is not None else None
        if clock is not None:
            clock.take()
        started = time.perf_counter()
        logits = model(tokens, cache, list(slots), positions)
        if step >= warmup:
            timing.seconds.append(time.perf_counter() - started)
            if bandwidth is not None:
                timing.bandwidths.append(bandwidth)
            if clock is not None:
                timing.linear_seconds.append(clock.take())
        positions = [p + 1 for p in positions]
    timing.other_load = load.others()
    if not torch.isfinite(logits).all():
        log("  warning: non-finite logits (random weights); the timings are still valid")
    return timing


def decode_linears(model: Transformer) -> list[nn.Module]:
    """The int8 linear calls of a decode step, in order: a stack of projections (StackedInt8Linear) as one call."""
    calls: list[nn.Module] = []
    for layer in model.layers:
        attention, ffn = layer.attention, layer.feed_forward
        calls += [attention.qkv] if attention.qkv is not None else [attention.wq, attention.wk, attention.wv]
        calls.append(attention.wo)
        calls += [ffn.gate_up] if ffn.gate_up is not None else [ffn.w1, ffn.w3]
        calls.append(ffn.w2)
    return [*calls, model.output]


def time_linears_only(model: Transformer, rows: int, reps: int = 5) -> Timing:
    """Every int8 linear call of a decode step made once on `rows` rows, in order: the weight part of the step."""
    linears = decode_linears(model)
    inputs = {m.in_features: torch.randn(rows, 1, m.in_features) for m in linears}
    seconds = []
    with torch.inference_mode():
        for linear in linears:  # warm-up
            linear(inputs[linear.in_features])
        load = CpuShares()
        for _ in range(reps):
            started = time.perf_counter()
            for linear in linears:
                linear(inputs[linear.in_features])
            seconds.append(time.perf_counter() - started)
    return Timing(seconds, other_load=load.others())


@dataclass
class ProfileRow:
    name: str
    calls: int
    self_ms: float


def profile_decode_step(model: Transformer, cache: KVCache, start: int, top: int = 8) -> list[ProfileRow]:
    """The ops with the most self CPU time in one batch-1 decode step on slot 0 (torch.profiler)."""
    tokens = torch.tensor([[5]])
    model(tokens, cache, [0], [start])  # warm-up at this position
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        model(tokens, cache, [0], [start])
    rows = [ProfileRow(e.key, e.count, e.self_cpu_time_total / 1e3) for e in prof.key_averages()]
    return sorted(rows, key=lambda r: r.self_ms, reverse=True)[:top]


@dataclass
class AttentionRun:
    """Decode timings with one INT8SERVE_ATTENTION setting (the decode attention path)."""

    setting: str
    path: str  # what the setting ran on this CPU
    kv_cache: str  # the model's KV cache (--kv-cache: bf16, fp16 or int8; auto resolved)
    decode_b1: Timing
    decode_b4: Timing
    split_b1: Timing  # the same steps again, each split into its Int8Linear calls and the rest (LinearClock)
    split_b4: Timing
    planned: bool = False  # whether the steps ran through a decode plan (engine/decode_plan.py), not the modules


@dataclass
class EngineResults:
    layers: int
    group_size: int  # the weights' scale scheme (0: per output channel)
    weight_bytes: int  # read per decode step
    linear_count: int
    flops_per_token: int  # in the linear layers
    build_seconds: float
    rss_gb: float  # after building
    prompt_len: int
    cache_len: int
    prefill: Timing
    decode_b1: Timing
    decode_b4: Timing
    b4_starts: list[int]
    kv_bytes_b1: int  # KV cache bytes a batch-1 step reads (at the middle of the measured steps)
    linears_b1: Timing  # every Int8Linear on 1 row
    linears_b4: Timing  # every Int8Linear on 4 rows
    profile: list[ProfileRow]
    attention: list[AttentionRun]  # one per --attention setting, in run order; decode_b1/b4 are the last one's


def attention_path(setting: str) -> str:
    if setting == "torch" or not attention_kernel.available():
        return "torch, row by row"
    return f"kernel, {attention_kernel.resolve(setting)}"  # type: ignore[arg-type]


def _b4_starts(prompt_len: int) -> list[int]:
    return [prompt_len - i * (prompt_len // 4) for i in range(4)]  # 512, 384, 256, 128 for a 512 prompt


def _decode_run(model: Transformer, cache: KVCache, decode: Callable[..., Timing], setting: str, kv_cache: str,
                prompt_len: int, decode_steps: int, warmup: int, weight_bytes: int, quiet: QuietWaiter
                ) -> AttentionRun:
    """Batch-1 and batch-4 decode steps with one attention setting on `cache`, then split (LinearClock)."""
    attention_kernel.set_setting(setting)
    path = attention_path(setting)
    b4_starts = _b4_starts(prompt_len)
    log(f"decode batch 1, attention {path}, {kv_cache} KV cache: {decode_steps} steps from position {prompt_len} ...")
    decode_b1 = least_contended(functools.partial(decode, [0], [prompt_len]), quiet)
    log(f"  median step {decode_b1.median * 1e3:.1f} ms = {1 / decode_b1.median:.2f} tok/s; median bandwidth "
        f"{statistics.median(decode_b1.bandwidths):.1f} GB/s; "
        f"roofline share {decode_b1.roofline_share(weight_bytes):.0%}")
    log(f"decode batch 4, attention {path}, {kv_cache} KV cache: slots 0-3 from positions {b4_starts} ...")
    decode_b4 = least_contended(functools.partial(decode, [0, 1, 2, 3], b4_starts), quiet)
    log(f"  median step {decode_b4.median * 1e3:.1f} ms = {4 / decode_b4.median:.2f} tok/s aggregate; "
        f"roofline share {decode_b4.roofline_share(weight_bytes):.0%}")
    splits = {}
    for batch, slots, starts in ((1, [0], [prompt_len]), (4, [0, 1, 2, 3], b4_starts)):
        log(f"decode batch {batch}, attention {path}: {decode_steps} steps split into the linears and the rest ...")
        splits[batch] = least_contended(functools.partial(time_decode, model, cache, slots, starts, decode_steps,
                                                          None, warmup, split=True), quiet)
        log(f"  outside the linears: {splits[batch].rest_share:.1%} of a step (median over steps)")
    return AttentionRun(setting, path, kv_cache, decode_b1, decode_b4, splits[1], splits[4],
                        planned=decode_plan.usable(model))


def server_kv_cache(model: Transformer, kind: str) -> str:
    """The KV cache the server keeps for `--kv-cache kind`: auto as Transformer.default_kv_cache gives it for the
    server's default prefill chunks and 4 slots."""
    return model.kv_cache_for(kind, DEFAULT_PREFILL_CHUNK, 4)[0]


def run_engine(config: ModelConfig, prompt_len: int, decode_steps: int, quiet: QuietWaiter,
               attention: Sequence[str] = ("auto",), group_size: int = DEFAULT_GROUP_SIZE,
               kv_caches: Sequence[str] = ("auto",)) -> EngineResults:
    log(f"building a random int8 model: {config.n_layers} layers of the Llama-2-7B shape, "
        f"{describe_scales(group_size)} ...")
    started = time.perf_counter()
    model = build_random_int8_model(config, group_size=group_size)
    build_seconds = time.perf_counter() - started
    weight_bytes = decode_bytes_per_step(model)
    kv_caches = list(dict.fromkeys(server_kv_cache(model, kind) for kind in kv_caches))
    model.set_kv_cache(kv_caches[0])  # (prefill writes into the first)
    resident = rss_gb()
    log(f"  built in {build_seconds:.1f} s; int8 weights + scales {weight_bytes / 1e9:.2f} GB; "
        f"process resident {resident:.2f} GB")
    warmup = 2
    cache_len = max(640, prompt_len + warmup + decode_steps + 8)

    log(f"prefill: {prompt_len}-token prompt, 1-slot {kv_caches[0]} cache of {cache_len} positions ...")
    cache = model.new_cache(1, cache_len)
    prefill_timing = least_contended(functools.partial(time_prefill, model, cache, prompt_len), quiet)
    log(f"  median {prefill_timing.median:.2f} s = {prompt_len / prefill_timing.median:.1f} tok/s "
        f"(others used {prefill_timing.other_load:.0%} of the CPUs)")
    del cache
    gc.collect()

    runs, caches = [], []
    for kv_cache in kv_caches:
        model.set_kv_cache(kv_cache)
        cache = model.new_cache(4, cache_len)
        caches.append(cache)
        fill_cache(cache)
        probe = BandwidthProbe()
        log(f"decode: 4-slot {kv_cache} KV cache of {cache_len} positions ({cache.nbytes() / 1e9:.2f} GB); "
            f"bandwidth sampled before every step; process resident {rss_gb():.2f} GB")
        decode = functools.partial(time_decode, model, cache, steps=decode_steps, probe=probe, warmup=warmup)
        for setting in attention:
            runs.append(_decode_run(model, cache, decode, setting, kv_cache, prompt_len, decode_steps, warmup,
                                    weight_bytes, quiet))
        del probe, decode
    decode_b1, decode_b4 = runs[0].decode_b1, runs[0].decode_b4  # the first KV cache, the first setting
    b4_starts = _b4_starts(prompt_len)
    model.set_kv_cache(kv_caches[0])
    cache = caches[0]
    del caches
    gc.collect()

    middle = prompt_len + warmup + decode_steps // 2
    row_bytes = cache.k[0].shape[-1] * cache.k[0].element_size()  # a key's or value's bytes (kv_int8.row_size)
    kv_bytes_b1 = 2 * config.n_layers * config.n_kv_heads * row_bytes * middle
    linears_b1 = least_contended(functools.partial(time_linears_only, model, 1), quiet)
    linears_b4 = least_contended(functools.partial(time_linears_only, model, 4), quiet)
    quiet.wait()
    profile = profile_decode_step(model, cache, prompt_len)
    log(f"  the linears alone take {linears_b1.median * 1e3:.1f} ms of a {decode_b1.median * 1e3:.1f} ms step at "
        f"batch 1, {linears_b4.median * 1e3:.1f} ms of {decode_b4.median * 1e3:.1f} ms at batch 4")
    results = EngineResults(config.n_layers, group_size, weight_bytes, len(decode_linears(model)),
                            linear_flops_per_token(model), build_seconds, resident, prompt_len, cache_len,
                            prefill_timing, decode_b1, decode_b4, b4_starts, kv_bytes_b1, linears_b1, linears_b4,
                            profile, runs)
    del model, cache
    gc.collect()
    return results


# ---------------------------------------------------------------------------------------------------------------
# Kernels


@dataclass
class KernelTiming:
    k: int
    n: int
    label: str
    m: int
    path: str  # "int8pack" or "dequant"
    seconds: float  # median per call
    calls: int
    other_load: float

    @property
    def weight_gb_s(self) -> float:
        return (self.n * self.k + 2 * self.n) / self.seconds / 1e9

    @property
    def tflop_s(self) -> float:
        return 2 * self.m * self.n * self.k / self.seconds / 1e12


def int8pack_path(x: Tensor, weight: Tensor, scale: Tensor, buffer: Tensor) -> Tensor:
    return torch._weight_int8pack_mm(x, weight, scale)


def dequant_path(x: Tensor, weight: Tensor, scale: Tensor, buffer: Tensor) -> Tensor:
    torch.mul(weight, scale[:, None], out=buffer)  # as Int8Linear.forward does above DENSE_ROWS_THRESHOLD
    return F.linear(x, buffer)


ONE_THREAD = "int8pack, 1 thread"
KernelPath = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]
KERNEL_PATHS: dict[str, KernelPath] = {"int8pack": int8pack_path, "dequant": dequant_path}


class WeightRotation:
    """Distinct int8 weights of one shape, handed out in turn so that no call finds its weight in a cache."""

    def __init__(self, n: int, k: int, generator: torch.Generator) -> None:
        block = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=generator)
        self.weights = [torch.roll(block, shifts=i + 1, dims=0) for i in range(math.ceil(KERNEL_MIN_BYTES / (n * k)))]
        self.index = 0

    def next(self) -> Tensor:
        self.index += 1
        return self.weights[self.index % len(self.weights)]


def time_kernel(label: str, m: int, name: str, x: Tensor, rotation: WeightRotation, scale: Tensor,
                buffer: Tensor) -> KernelTiming:
    """Median time per call of path `name`: at most one pass over the rotation, about 2 s of calls."""
    path = KERNEL_PATHS[name]
    path(x, rotation.next(), scale, buffer)  # warm-up
    load = CpuShares()
    seconds: list[float] = []
    while len(seconds) < len(rotation.weights) and (len(seconds) < 3 or sum(seconds) < KERNEL_TIME_BUDGET):
        weight = rotation.next()
        started = time.perf_counter()
        path(x, weight, scale, buffer)
        seconds.append(time.perf_counter() - started)
    n, k = buffer.shape
    return KernelTiming(k, n, label, m, name, statistics.median(seconds), len(seconds), load.others())


def run_kernels(m_values: Sequence[int], quiet: QuietWaiter) -> list[KernelTiming]:
    """Both Int8Linear paths on every 7B linear shape at every M."""
    results = []
    generator = torch.Generator().manual_seed(4)
    for k, n, label in KERNEL_SHAPES:
        rotation = WeightRotation(n, k, generator)
        scale = random_scales(n, k, generator).to(COMPUTE_DTYPE)
        buffer = torch.zeros(n, k, dtype=COMPUTE_DTYPE)  # reused by every call, touched once up front
        log(f"kernels {k}->{n} ({label}): rotating {len(rotation.weights)} weights, "
            f"{len(rotation.weights) * n * k / 1e9:.2f} GB")
        for m in m_values:
            x = torch.randn(m, k, generator=generator).to(COMPUTE_DTYPE)
            line = []
            for name in KERNEL_PATHS:
                measure = functools.partial(time_kernel, label, m, name, x, rotation, scale, buffer)
                timing = least_contended(measure, quiet, attempts=2)
                results.append(timing)
                line.append(f"{name} {timing.seconds * 1e3:8.2f} ms {timing.weight_gb_s:5.1f} GB/s "
                            f"{timing.tflop_s:6.3f} TFLOP/s")
            log(f"  M={m:<4} " + " | ".join(line))
        x = torch.randn(1, k, generator=generator).to(COMPUTE_DTYPE)
        with torch_threads(1):  # is the decode kernel limited by memory or by the cores?
            timing = least_contended(functools.partial(time_kernel, label, 1, "int8pack", x, rotation, scale, buffer),
                                     quiet, attempts=2)
        timing.path = ONE_THREAD
        results.append(timing)
        log(f"  M=1 on 1 thread: int8pack {timing.seconds * 1e3:.2f} ms {timing.weight_gb_s:.1f} GB/s")
        del rotation, buffer
        gc.collect()
    return results


def layer_seconds(timings: Sequence[KernelTiming], m: int, path: str) -> float:
    """Time of one transformer block's seven linears at M rows on `path`."""
    table = {(t.label, t.m, t.path): t.seconds for t in timings}
    return sum(count * table[(label, m, path)] for label, count in LAYER_MIX.items())


def int8pack_wins_up_to(timings: Sequence[KernelTiming], m_values: Sequence[int]) -> tuple[int, int | None]:
    """(largest M up to which int8pack is faster per block at every tested M, first tested M where it is not)."""
    last_win = 0
    for m in sorted(m_values):
        if layer_seconds(timings, m, "int8pack") >= layer_seconds(timings, m, "dequant"):
            return last_win, m
        last_win = m
    return last_win, None


# ---------------------------------------------------------------------------------------------------------------
# Report


def _times(value: float, reference: float) -> str:
    return f"{value / reference:.2f}×"


def engine_report(r: EngineResults, start_bandwidth: float, best_bandwidth: float) -> list[str]:
    b1_tok_s, b4_tok_s = 1 / r.decode_b1.median, 4 / r.decode_b4.median
    prefill_tok_s = r.prompt_len / r.prefill.median
    b1_bandwidth = statistics.median(r.decode_b1.bandwidths)
    b1_share = r.decode_b1.roofline_share(r.weight_bytes)
    full = r.layers == LLAMA2_7B.n_layers

    def share_at(bandwidth: float, step: float) -> str:
        return f"{r.weight_bytes / bandwidth / 1e9 / step:.0%}"

    lines = [
        f"Model: **{r.layers} of 32 layers** of the Llama-2-7B shape (dim 4096, 32 heads, hidden 11008, vocab 32000, "
        f"untied head), random int8 weights with {describe_scales(r.group_size)}: "
        f"**{r.weight_bytes / 1e9:.3f} GB** of int8 weights + bf16 scales read per decode step. Built directly in "
        f"int8 in {r.build_seconds:.1f} s; process resident size after building {r.rss_gb:.2f} GB (int8 weights + "
        f"the fp32 embedding). KV cache {r.attention[0].kv_cache} in the tables above the split (`--kv-cache`), "
        f"{r.cache_len} positions per slot.",
        "",
        f"Roofline: {r.weight_bytes / 1e9:.3f} GB ÷ bandwidth. At the median bandwidth sampled just before the "
        f"batch-1 steps ({b1_bandwidth:.1f} GB/s) that is {r.weight_bytes / b1_bandwidth / 1e6:.0f} ms per step = "
        f"**{b1_bandwidth * 1e9 / r.weight_bytes:.2f} tok/s**; at the best-of-5 bandwidth measured at the start "
        f"({start_bandwidth:.1f} GB/s) {start_bandwidth * 1e9 / r.weight_bytes:.2f} tok/s. A step reads the weights "
        "once whatever the batch, so the same step time is the ideal at batch 4.",
        "",
        "| | this run | weights streamed | % of roofline, same moment |"
        + (" llama.cpp Q8_0, other day | this ÷ llama.cpp | plain PyTorch int8, other day | this ÷ plain |"
           if full else ""),
        "|---|---|---|---|" + ("---|---|---|---|" if full else ""),
    ]
    rows = [
        ("prefill", f"prefill, {r.prompt_len}-token prompt (median of {len(r.prefill.seconds)})",
         f"{prefill_tok_s:.1f} tok/s ({r.prefill.median:.2f} s)",
         f"{r.flops_per_token * prefill_tok_s / 1e12:.2f} TFLOP/s in the linears", "— (compute-bound)"),
        ("decode_b1", f"decode, batch 1 (median of {len(r.decode_b1.seconds)} steps)",
         f"**{b1_tok_s:.2f} tok/s** ({r.decode_b1.median * 1e3:.0f} ms/step, best {r.decode_b1.best * 1e3:.0f})",
         f"{r.weight_bytes / r.decode_b1.median / 1e9:.1f} GB/s", f"**{b1_share:.0%}**"),
        ("decode_b4", f"decode, batch 4 aggregate (median of {len(r.decode_b4.seconds)} steps)",
         f"{b4_tok_s:.2f} tok/s ({r.decode_b4.median * 1e3:.0f} ms/step, best {r.decode_b4.best * 1e3:.0f})",
         f"{r.weight_bytes / r.decode_b4.median / 1e9:.1f} GB/s",
         f"{r.decode_b4.roofline_share(r.weight_bytes):.0%} (of the step time)"),
    ]
    measured = {"prefill": prefill_tok_s, "decode_b1": b1_tok_s, "decode_b4": b4_tok_s}
    for key, label, value, streamed, share in rows:
        line = f"| {label} | {value} | {streamed} | {share} |"
        if full:
            line += (f" {LLAMA_CPP[key]} tok/s | {_times(measured[key], LLAMA_CPP[key])} |"
                     f" {PLAIN_TORCH[key]} tok/s | {_times(measured[key], PLAIN_TORCH[key])} |")
        lines.append(line)
    verdict = "met" if b1_share >= TARGET_ROOFLINE else "not met"
    lines += [
        "",
        f"**Target, batch-1 decode ≥ {TARGET_ROOFLINE:.0%} of the bandwidth roofline: {verdict}.** "
        f"{b1_share:.0%} against the bandwidth of the same moment; {share_at(start_bandwidth, r.decode_b1.median)} "
        f"against the best-of-5 bandwidth at the start and {share_at(best_bandwidth, r.decode_b1.median)} against "
        f"the best bandwidth seen in the run. Near position {r.prompt_len} a batch-1 step also reads "
        f"{r.kv_bytes_b1 / 1e9:.2f} GB of KV cache ({r.kv_bytes_b1 / r.weight_bytes:.1%} more bytes), not counted "
        "in the roofline.",
        "",
        f"Other processes used {r.prefill.other_load:.0%} (prefill), {r.decode_b1.other_load:.0%} (decode B=1) and "
        f"{r.decode_b4.other_load:.0%} (decode B=4) of the CPUs during these measurements.",
        "",
        f"Where a step goes (issue #10 item 2): the same decode steps run again with a clock around each of the "
        f"{r.linear_count} int8 linear calls (q, k, v and gate, up are one call each, StackedInt8Linear; where the "
        "steps run through a decode plan, engine/decode_plan.py, the plan clocks its own calls, else forward hooks "
        "do), so each step is split into its linears and the rest (attention over the KV cache, norms, rotary "
        "embeddings, residuals, the clock itself and Python) within that step; the shares are medians over the "
        "steps. The linear calls timed alone (same inputs, nothing else) "
        f"stream {r.weight_bytes / r.linears_b1.median / 1e9:.1f} GB/s at batch 1, "
        f"{r.weight_bytes / r.linears_b1.median / 1e9 / b1_bandwidth:.0%} of the median bandwidth sampled before the "
        "batch-1 steps.",
        "",
        "| decode attention (`INT8SERVE_ATTENTION`), KV cache (`--kv-cache`) | batch | step ms | inside the Int8Linear "
        "calls, ms | rest: share of a step | goal | the linears alone, ms (GB/s) |",
        "|---|---|---|---|---|---|---|",
    ]
    verdicts = []
    for run in r.attention:
        run_verdicts = []
        for batch, split, alone in ((1, run.split_b1, r.linears_b1), (4, run.split_b4, r.linears_b4)):
            goal = TARGET_REST[batch]
            met = "met" if split.rest_share <= goal else "not met"
            how = "decode plan" if run.planned else "modules"
            lines.append(f"| {run.path} (`{run.setting}`), {how}, {run.kv_cache} | {batch} | "
                         f"{split.median * 1e3:.0f} | {split.linear_median * 1e3:.0f} | **{split.rest_share:.1%}** | "
                         f"≤ {goal:.0%}: {met} | {alone.median * 1e3:.0f} "
                         f"({r.weight_bytes / alone.median / 1e9:.1f} GB/s) |")
            run_verdicts.append(f"batch {batch}: {split.rest_share:.1%} (goal ≤ {goal:.0%}: {met})")
        verdicts.append(f"{run.path}, {run.kv_cache} KV cache: {'; '.join(run_verdicts)}")
    lines += [
        "",
        f"**The non-matmul share of a decode step ({'. '.join(verdicts[-2:])}).**",
        "",
        "",
        "Ops with the most self time in one profiled batch-1 step (torch.profiler, which slows the step a little; "
        "while it records, steps go through the modules, not a decode plan):",
        "",
        "| op | calls | self ms |",
        "|---|---|---|",
        *(f"| `{p.name}` | {p.calls} | {p.self_ms:.1f} |" for p in r.profile),
    ]
    return lines


def kernel_report(timings: Sequence[KernelTiming], m_values: Sequence[int], bandwidths: dict[int, float]) -> list[str]:
    table = {(t.label, t.m, t.path): t for t in timings}
    lines = [
        "Both `Int8Linear` paths per Llama-2-7B linear shape, bf16 activations [M, K]: median of calls that each use "
        f"the next of > {KERNEL_MIN_BYTES / 1e9:.1f} GB of distinct int8 weights (nothing is found in a cache). "
        "`int8pack` = `torch._weight_int8pack_mm` with bf16 scales; `dequant` = `torch.mul(int8, scale, out=bf16 "
        "buffer)` + `F.linear`, the buffer reused. GB/s counts the int8 weight bytes; TFLOP/s = 2·M·N·K / time. "
        f"Other processes used at most {max(t.other_load for t in timings):.0%} of the CPUs during any row.",
        "",
        "| shape K→N | M | int8pack ms | GB/s | TFLOP/s | dequant ms | GB/s | TFLOP/s | faster |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for k, n, label in KERNEL_SHAPES:
        for m in m_values:
            a, b = table[(label, m, "int8pack")], table[(label, m, "dequant")]
            winner = "int8pack" if a.seconds < b.seconds else "dequant"
            factor = max(a.seconds, b.seconds) / min(a.seconds, b.seconds)
            lines.append(f"| {k}→{n} ({label}) | {m} | {a.seconds * 1e3:.2f} | {a.weight_gb_s:.1f} | "
                         f"{a.tflop_s:.3f} | {b.seconds * 1e3:.2f} | {b.weight_gb_s:.1f} | {b.tflop_s:.3f} | "
                         f"{winner} ({factor:.1f}×) |")
    lines += ["", "Per transformer block (4 × qkvo + 2 × gate/up + 1 × down):", "",
              "| M | int8pack ms | dequant ms | faster |", "|---|---|---|---|"]
    for m in m_values:
        a, b = layer_seconds(timings, m, "int8pack"), layer_seconds(timings, m, "dequant")
        lines.append(f"| {m} | {a * 1e3:.1f} | {b * 1e3:.1f} | "
                     f"{'int8pack' if a < b else 'dequant'} ({max(a, b) / min(a, b):.1f}×) |")
    last_win, first_loss = int8pack_wins_up_to(timings, m_values)
    if first_loss is None:
        verdict = f"`int8pack` is faster per block at every tested M (up to {last_win})."
    else:
        verdict = (f"`int8pack` is faster per block up to M = {last_win} and `dequant` from M = {first_loss}: the "
                   f"crossover lies between {last_win} and {first_loss} rows.")
    lines += ["", f"{verdict} `DENSE_ROWS_THRESHOLD` is {DENSE_ROWS_THRESHOLD} in `int8.py`.", "",
              "Is the decode kernel limited by memory or by the cores? `int8pack` at M = 1 on 1 and on 2 threads "
              f"(the fp32 sum reads {bandwidths[1]:.1f} GB/s on 1 thread and {bandwidths[2]:.1f} GB/s on 2, measured "
              "at the start of the run): a speed-up near 2× means the cores, not memory, set its speed.", "",
              "| shape K→N | 2 threads GB/s | 1 thread GB/s | speed-up from the 2nd thread |", "|---|---|---|---|"]
    for k, n, label in KERNEL_SHAPES:
        two, one = table[(label, 1, "int8pack")], table[(label, 1, ONE_THREAD)]
        lines.append(f"| {k}→{n} ({label}) | {two.weight_gb_s:.1f} | {one.weight_gb_s:.1f} | "
                     f"{one.seconds / two.seconds:.2f}× |")
    return lines


def build_report(args: argparse.Namespace, machine: dict[str, str], bandwidths: list[float], bandwidth_1t: float,
                 engine: EngineResults | None, kernels: list[KernelTiming] | None) -> str:
    now = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    sampled = engine.decode_b1.bandwidths + engine.decode_b4.bandwidths if engine else []
    best = max(bandwidths + sampled)
    lines = [
        "## Engine: Llama-2-7B shape, int8, random weights",
        "",
        f"- Command: `{display_command('engine', sys.argv[1:])}`",
        f"- Date: {now}",
        f"- Machine: {machine['cpu']}, {machine['cores']} cores ({machine['isa']}), {machine['ram']} RAM; "
        f"torch {machine['torch']} (CPU capability {machine['capability']}), {machine['threads']} threads.",
        "- The machine is **shared**: other engineers run tests on it at the same time. Before each timed phase the "
        f"script waited (up to {args.wait_quiet:.0f} s) for other processes to use less than {QUIET:.0%} of the "
        "CPUs, and measured again when they came back meanwhile; the share they used is given with each result. "
        "Trust the ratios within this run, not absolute times.",
        "- The read bandwidth of 2 threads is not stable on this (virtual) machine: it has moved by up to 2x from "
        "one moment to the next (seen repeatedly while writing this benchmark; the host, not this VM, decides). So "
        "each decode step is compared with the bandwidth sampled just before it.",
        f"- Read bandwidth, fp32 sum over {BANDWIDTH_GIB:.0f} GiB, {machine['threads']} threads, best of 5: "
        + ", ".join(f"{b:.1f}" for b in bandwidths)
        + (" GB/s (before and after the engine runs" if len(bandwidths) > 1 else " GB/s (")
        + f"; 1 thread: {bandwidth_1t:.1f} GB/s)"
        + (f"; sampled before each decode step: median {statistics.median(sampled):.1f}, range "
           f"{min(sampled):.1f}–{max(sampled):.1f} GB/s." if sampled else "."),
        "",
    ]
    if engine is not None:
        lines += ["### Prefill and decode", "", *engine_report(engine, bandwidths[0], best), ""]
        if engine.layers == LLAMA2_7B.n_layers:
            lines += [f"The llama.cpp and plain-PyTorch columns are copied from {REFERENCE_FILE}, measured "
                      f"{REFERENCE_DAY}: **another day and another CPU**, so those ratios compare absolute figures, "
                      "not same-run measurements. Only the roofline shares are same-run ratios.", ""]
            if machine["amx"] == "no":
                lines += [f"This CPU has no AMX ({describe_dense()}), where {REFERENCE_FILE} saw 1.7–1.8 "
                          "TFLOP/s with AMX: the prefill comparison with the other day's figures mostly measures "
                          "that difference.", ""]
        else:
            lines += ["Fewer layers than Llama-2-7B: no comparison with the 7B reference figures.", ""]
    if kernels is not None:
        by_threads = {1: bandwidth_1t, 2: bandwidths[0]}
        lines += ["### Kernels: which path for how many rows", "", *kernel_report(kernels, args.kernel_m, by_threads),
                  ""]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=32, help="transformer blocks to build (default 32: the 7B)")
    parser.add_argument("--prompt", type=int, default=512, help="prefill prompt length in tokens (default 512)")
    parser.add_argument("--decode-steps", type=int, default=32, help="timed decode steps per batch size (32)")
    parser.add_argument("--kernels", action="store_true", help="also time both linear paths per 7B shape and M")
    parser.add_argument("--kernel-m", type=int, nargs="+", default=KERNEL_M, metavar="M",
                        help=f"row counts for --kernels (default {' '.join(map(str, KERNEL_M))})")
    parser.add_argument("--attention", nargs="+", default=["auto"], choices=attention_kernel.SETTINGS,
                        metavar="SETTING", help="decode attention settings (INT8SERVE_ATTENTION) to time, in this "
                        "order, e.g. `torch auto` for the row-by-row torch path against the kernel (default auto)")
    parser.add_argument("--kv-cache", nargs="+", default=["auto"], choices=["auto", *KV_CACHES], metavar="KIND",
                        help="KV caches to time decode on, in this order (the server's --kv-cache; default auto, "
                             "the server's default: fp16, or bf16 where prefill attends through SDPA on AMX tiles)")
    parser.add_argument("--group-size", type=int, choices=GROUP_SIZES, default=DEFAULT_GROUP_SIZE,
                        help="input values per weight scale, 0 = one per output channel (default "
                             f"{DEFAULT_GROUP_SIZE}, the default scheme of `int8serve quantize`)")
    parser.add_argument("--no-engine", action="store_true", help="skip the model: bandwidth (and --kernels) only")
    parser.add_argument("--wait-quiet", type=float, default=120, metavar="SECONDS",
                        help="wait up to this long before each timed phase for other processes to leave the CPUs "
                        f"(default 120; at most {QUIET_BUDGET:.0f} s in all; 0 = never wait)")
    parser.add_argument("--write", type=Path, metavar="FILE", help="write the report into this Markdown file")
    args = parser.parse_args(argv)
    if not 1 <= args.layers <= LLAMA2_7B.n_layers:
        parser.error("--layers must be between 1 and 32")
    if args.prompt < 8 or args.decode_steps < 1:
        parser.error("--prompt must be at least 8 and --decode-steps at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    machine = machine_facts()
    log(f"{machine['cpu']}, {machine['cores']} cores, torch {machine['torch']}, {machine['threads']} threads")
    quiet = QuietWaiter(args.wait_quiet)
    bandwidths = [measure_bandwidth(quiet)]
    bandwidth_1t = measure_bandwidth(quiet, threads=1)
    log(f"read bandwidth: {bandwidths[0]:.1f} GB/s ({bandwidth_1t:.1f} GB/s on 1 thread)")
    engine = None
    if not args.no_engine:
        config = ModelConfig(**{**LLAMA2_7B.to_dict(), "n_layers": args.layers})
        engine = run_engine(config, args.prompt, args.decode_steps, quiet, args.attention, args.group_size,
                            args.kv_cache)
        bandwidths.append(measure_bandwidth(quiet))
        log(f"read bandwidth again: {bandwidths[-1]:.1f} GB/s")
    kernels = run_kernels(args.kernel_m, quiet) if args.kernels else None
    report = build_report(args, machine, bandwidths, bandwidth_1t, engine, kernels)
    log("\n" + report)
    if args.write:
        write_section(args.write, report, "engine.py")
        log(f"wrote {args.write}")


if __name__ == "__main__":
    main()
