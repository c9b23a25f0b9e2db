"""The Llama 2 architecture in plain PyTorch: RMSNorm, rotary embeddings, grouped-query attention, SwiGLU.

In the spirit of gpt-fast's `model.py` and Meta's reference `llama/model.py`, with two additions for serving:
- every linear layer is either a full-precision `nn.Linear` (the fp32 reference) or an `Int8Linear`;
- attention reads and writes a `KVCache` with one preallocated row per *slot*, so that several sequences at
  different positions decode together in one forward (continuous batching).

Rotary embeddings use the Hugging Face convention (`rotate_half`: the first and second half of each head are the
pair). Meta checkpoints store interleaved pairs; the loader permutes their q/k rows once at load time.
Weight names follow Meta's layout (`layers.N.attention.wq`, `feed_forward.w1`, ...).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import allocator, chunking, decode_plan, kernels, kv_int8
from .config import ModelConfig
from .int8 import COMPUTE_DTYPE, DequantBuffer, Int8Linear, StackedInt8Linear, kernel_rows, kernel_takes
from .kernels import activation as activation_kernel
from .kernels import attention as attention_kernel
from .kernels import matmul as prefill_matmul

Precision = Literal["fp32", "int8"]
MIN_PREFILL_QUERIES = 16
# The KV caches an int8 model can keep (--kv-cache): bf16; fp16, the same bytes with 10 bits of mantissa instead of 7
# (stories260K against fp32 in decode's numerics: KLD 0.000308 against 0.000418; decode attention 0.97-1.00x as fast,
# Zen 4; values beyond its range are stored as +-FP16_MAX, see write_rows); or int8 rows with a scale per 32 values
# (kv_int8.py).
KV_CACHES = {"bf16": COMPUTE_DTYPE, "fp16": torch.float16, "int8": torch.int8}
# The flags of a CPU whose torch SDPA multiplies bf16 on AMX tiles: there SDPA reads bf16 keys ~2.7x faster than an
# fp16 cache's (as fp32; fp16 itself no faster), a 128-row chunk at 896 positions 3.5 against 9.6 ms a 7B layer
# (Emerald Rapids, 2 threads): 0.905-0.947x the speed of a 1024-token prefill (`benchmarks/kv_cache.py --kinds bf16
# fp16 --prefill 1024 --cases`); elsewhere fp16 keys as fp32 cost SDPA 0.995x (Zen 4).
SDPA_BF16_TILE_FLAGS = frozenset({"amx_bf16", "amx_tile"})
FP16_MAX = 65504.0  # the largest finite fp16 value
# A decode step of fewer int8 multiply-adds than this (rows x the int8 linears' weights) runs our kernels on one thread.
# Its parallel regions are each a few microseconds of work, and on a busy machine each waits for the second thread to
# be scheduled: measured on 2 loaded cores (SmolLM2-135M, 135 M weights, 211 kernel calls a step), a parallel region
# after any serial gap took ~7.7 ms; a batch-1 step took 60-110 ms with 2 threads against 15-21 ms on one, a batch-4
# step 93-137 ms (2 threads, gemv.cpp's per-call threshold alone) against 48-52 ms. Quiet, a second thread could
# save at most half of the weight reads. 1 G keeps SmolLM2-135M on one thread up to 7 rows, SmolLM2-360M up to 2;
# models of 1B weights or more (TinyLlama, 7B) keep torch's thread count at any batch.
SINGLE_THREAD_STEP_WORK = 1_000_000_000


class RMSNorm(nn.Module):
    """kernel=True (int8 models): one call of our kernel a row where it is available (kernels/activation.py), which
    sums the squares in its own fixed order; the fp32 reference model keeps torch's six ops."""

    def __init__(self, dim: int, eps: float, kernel: bool = False) -> None:
        super().__init__()
        self.eps = eps
        self.kernel = kernel
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        if self.kernel and x.dtype is torch.float32 and activation_kernel.available():
            return activation_kernel.rms_norm(x, self.weight, self.eps)
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight.float() * normed).to(x.dtype)


def rope_tables(head_dim: int, max_seq_len: int, theta: float, start: int = 0) -> tuple[Tensor, Tensor]:
    """cos, sin [max_seq_len, head_dim] in fp32 for positions start.., halves duplicated for rotate_half."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device="cpu") / head_dim))
    angles = torch.outer(torch.arange(start, start + max_seq_len, dtype=torch.float32, device="cpu"), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + rotate_half(x) * sin, rotate_half(x) = cat(-x2, x1), computed half by half in place: the same
    roundings (x1 c - x2 s is x1 c + (-x2) s exactly), without the concatenated copy (a 512-token prefill of the 7B
    shape: 9.0 -> 1.1 ms a call, two calls a layer, on a Sapphire Rapids)."""
    # x [B, T, H, D]; cos/sin [B, T, D]
    half = x.shape[-1] // 2
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    out = x * cos
    out[..., :half].sub_(x[..., half:] * sin[..., :half])  # on views: `out[...] -= ` would copy the half back again
    out[..., half:].add_(x[..., :half] * sin[..., half:])
    return out


class KVCache:
    """Keys and values of every layer for `n_slots` sequences of up to `max_seq_len` tokens.

    k[layer], v[layer]: [n_slots, n_kv_heads, max_seq_len, head_dim], or for an int8 cache [..., kv_int8.width(
    head_dim)] bytes a row (values and their scales). Memory is reserved with torch.empty, so pages are only touched
    as positions are written.
    """

    def __init__(self, config: ModelConfig, n_slots: int, max_seq_len: int, dtype: torch.dtype) -> None:
        if max_seq_len > config.max_seq_len:
            raise ValueError(f"KV cache of {max_seq_len} positions exceeds the model's {config.max_seq_len}")
        shape = (n_slots, config.n_kv_heads, max_seq_len, kv_int8.row_size(config.head_dim, dtype))
        self.n_slots = n_slots
        self.head_dim = config.head_dim
        self.max_seq_len = max_seq_len
        self.dtype = dtype
        self.k = [torch.empty(shape, dtype=dtype) for _ in range(config.n_layers)]
        self.v = [torch.empty(shape, dtype=dtype) for _ in range(config.n_layers)]
        self.decode_plans: dict[tuple, decode_plan.DecodePlan] = {}  # by batch size and settings (plan_for)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


def write_rows(cache: Tensor, slot: int, start: int, rows: Tensor) -> None:
    """cache[slot, :, start:start + T] = rows [Hkv, T, D] fp32, in the cache's dtype (rounded, or int8 rows). An fp16
    cache takes values beyond its range as +-FP16_MAX (NaN stays NaN), as the attention kernel stores them, rather
    than as infinities that would turn every later score of the row into NaN."""
    end = start + rows.shape[1]
    if cache.dtype == torch.int8:
        attention_kernel.quantize_into(cache[slot, :, start:end], rows.float())
    elif cache.dtype == torch.float16:
        cache[slot, :, start:end] = rows.clamp(-FP16_MAX, FP16_MAX)
    else:
        cache[slot, :, start:end] = rows


def read_rows(cache: Tensor, slot: int, end: int, head_dim: int, dtype: torch.dtype) -> Tensor:
    """cache[slot, :, :end] as [Hkv, end, D]: a view, or for an int8 cache its values as `dtype` (a copy)."""
    rows = cache[slot, :, :end]
    return attention_kernel.dequantize_rows(rows, head_dim, dtype) if cache.dtype == torch.int8 else rows


@dataclass(frozen=True)
class KernelStep:
    """A decode step (or a row-exact prefill chunk) whose rows all attend in one kernel call per layer
    (kernels/attention.py); made once a forward."""

    slots: Tensor  # int64 [B * T]: the slot of each row (a chunk's T rows share one)
    positions: Tensor  # int64 [B * T]: each row's token
    cos: Tensor  # fp32 [max_seq_len, D]: the whole tables, the kernel picks each row's position
    sin: Tensor
    impl: attention_kernel.Impl


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, linear: type[nn.Module], **kw: object) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = linear(config.dim, config.n_heads * config.head_dim, **kw)
        self.wk = linear(config.dim, config.n_kv_heads * config.head_dim, **kw)
        self.wv = linear(config.dim, config.n_kv_heads * config.head_dim, **kw)
        self.wo = linear(config.n_heads * config.head_dim, config.dim, **kw)
        self.qkv: StackedInt8Linear | None = None  # wq, wk, wv in one kernel call (Transformer.stack_projections)

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x [..., dim] -> q, k, v [..., heads * head_dim] (no rope yet)."""
        if self.qkv is not None:
            q, k, v = self.qkv(x)
            return q, k, v
        return self.wq(x), self.wk(x), self.wv(x)

    def forward(self, x: Tensor, cos: Tensor | None, sin: Tensor | None, cache_k: Tensor, cache_v: Tensor,
                slots: Sequence[int], starts: Sequence[int], step: KernelStep | None = None,
                last_only: bool = False) -> Tensor:
        """x [B, T, dim] -> [B, T, dim], or [B, 1, dim] with `last_only`: every row's keys and values go into the
        cache, but only the last row of each sequence goes through the output projection."""
        if step is not None:
            return self._kernel_decode(x, cache_k, cache_v, step, last_only)
        assert cos is not None and sin is not None
        batch, seq, _ = x.shape
        q, k, v = self.project(x)
        q = apply_rope(q.reshape(batch, seq, self.n_heads, self.head_dim), cos, sin)
        k = apply_rope(k.reshape(batch, seq, self.n_kv_heads, self.head_dim), cos, sin)
        v = v.reshape(batch, seq, self.n_kv_heads, self.head_dim)
        dim = self.head_dim
        out = torch.empty(batch, seq, self.n_heads, dim, dtype=COMPUTE_DTYPE if cache_k.dtype == torch.int8
                          else cache_k.dtype)
        # One sequence at a time: each reads its own slot up to its own position, without copying the cache (an
        # int8 cache's values are made fp32 for a decode step, as the kernel reads them, or bf16 for SDPA)
        chunk = chunking.CURRENT.get()
        decoding = chunk is None and seq == 1  # (a one-token prefill chunk computes as prefill)
        for row, (slot, start) in enumerate(zip(slots, starts, strict=True)):
            end = start + seq
            write_rows(cache_k, slot, start, k[row].transpose(0, 1))
            write_rows(cache_v, slot, start, v[row].transpose(0, 1))
            if chunk is not None and chunk.keys_end > end:  # the keys of the aligned chunk, zeros past the prompt
                cache_k[slot, :, end:chunk.keys_end] = 0  # (an int8 row of zeros is zeros with scale 0)
                cache_v[slot, :, end:chunk.keys_end] = 0
                end = chunk.keys_end
            if decoding:
                keys, values = (read_rows(cache, slot, end, dim, torch.float32) for cache in (cache_k, cache_v))
                out[row, 0] = self._decode_attention(q[row, 0], keys, values)
                continue
            # each aligned chunk of a prefill forward attends as its own forward would (chunking.py)
            for first, rows, keys_end in chunk.pieces(start, seq) if chunk is not None else [(0, seq, end)]:
                keys, values = (read_rows(cache, slot, keys_end, dim, COMPUTE_DTYPE) for cache in (cache_k, cache_v))
                if keys.dtype == torch.float16:  # SDPA over fp16 keys ran 0.91x its speed over bf16 ones, over fp32
                    keys, values = keys.float(), values.float()  # 0.99x (Zen 4, a 1024-token prompt, 4 7B layers)
                out[row, first:first + rows] = self._prefill_attention(q[row, first:first + rows], keys, values,
                                                                       start + first, chunk.rows if chunk else None)
        del q, k, v  # (v is a view of the projections' output: gone before wo's call, as are q and k)
        return self._output(out.reshape(batch, seq, -1).to(x.dtype), last_only)

    def _output(self, attended: Tensor, last_only: bool) -> Tensor:
        # attended [B, T, heads * head_dim] -> wo's [B, T, dim], or [B, 1, dim] of the last rows
        return self.wo(attended[:, -1:].contiguous() if last_only else attended)

    def _kernel_decode(self, x: Tensor, cache_k: Tensor, cache_v: Tensor, step: KernelStep,
                       last_only: bool = False) -> Tensor:
        """x [B, T, dim] -> [B, T, dim]: every row's rope, cache write and attention in one kernel call."""
        batch, seq, _ = x.shape
        rows = batch * seq
        q, k, v = self.project(x)
        q = q.reshape(rows, self.n_heads, self.head_dim).contiguous()
        k = k.reshape(rows, self.n_kv_heads, self.head_dim).contiguous()
        v = v.reshape(rows, self.n_kv_heads, self.head_dim).contiguous()
        out = attention_kernel.decode_attention(q, k, v, step.cos, step.sin, step.slots, step.positions, cache_k,
                                                cache_v, step.impl)  # fp32 [B * T, H, D]
        return self._output(out.view(batch, seq, -1), last_only)

    def _prefill_attention(self, queries: Tensor, keys: Tensor, values: Tensor, start: int,
                           chunk_rows: int | None = None) -> Tensor:
        """A chunk's queries [T, H, D] at positions start.. against keys/values [Hkv, L, D] -> [T, H, D].

        Causal: position p sees keys [0, p]. SDPA's flash kernel multiplies its queries in blocks of 32 or more, and
        rounds a row by the size of its block (on an AMD Zen 5, a block of 1-3 rows differently from one of 4 or
        more) and runs another kernel for a single query; so, in an aligned prefill chunk (`chunk_rows`), the queries
        go in at their places among the chunk's `chunk_rows` rows, copies of the first one elsewhere: every call has
        the same blocks whatever rows the prefix cache supplied and wherever the prompt ends (chunking.py). Outside
        one, at least MIN_PREFILL_QUERIES go in, the padding before them.
        """
        seq = queries.shape[0]
        if chunk_rows is None:
            before, after = max(0, MIN_PREFILL_QUERIES - seq), 0
        else:
            before = start % chunk_rows
            after = chunk_rows - before - seq
        positions = torch.arange(start - before, start + seq + after).clamp(min=start)  # padding: the first query's
        padded = torch.cat([queries[:1].expand(before, -1, -1), queries, queries[:1].expand(after, -1, -1)])
        mask = torch.arange(keys.shape[1])[None, :] <= positions[:, None]
        attended = F.scaled_dot_product_attention(padded.transpose(0, 1).to(keys.dtype)[None], keys[None],
                                                  values[None], attn_mask=mask, enable_gqa=True)
        return attended[0, :, before:before + seq].transpose(0, 1)

    def _decode_attention(self, query: Tensor, keys: Tensor, values: Tensor) -> Tensor:
        """One new token: query [H, D] against keys/values [Hkv, L, D] -> [H, D].

        Plain fp32 matmuls: measured 4x faster than SDPA's bf16 flash kernel for one query row on this CPU
        (0.48 vs 2.1 ms per layer at 512 positions), and more exact.
        """
        group = self.n_heads // self.n_kv_heads
        q = query.float().view(self.n_kv_heads, group, self.head_dim)  # heads sharing a kv head side by side
        scores = torch.matmul(q, keys.float().transpose(1, 2)) * self.head_dim**-0.5  # [Hkv, group, L]
        weights = torch.softmax(scores, dim=-1)
        return torch.matmul(weights, values.float()).view(self.n_heads, self.head_dim).to(query.dtype)


class FeedForward(nn.Module):
    def __init__(self, config: ModelConfig, linear: type[nn.Module], **kw: object) -> None:
        super().__init__()
        # (in this order, which is also the packed copy's: gate and up adjacent there, a stack without a copy)
        self.w1 = linear(config.dim, config.hidden_dim, **kw)  # gate
        self.w3 = linear(config.dim, config.hidden_dim, **kw)  # up
        self.w2 = linear(config.hidden_dim, config.dim, **kw)  # down
        self.gate_up: StackedInt8Linear | None = None  # w1 and w3 in one kernel call (Transformer.stack_projections)

    def forward(self, x: Tensor) -> Tensor:
        if self.gate_up is not None:
            gate, up = self.gate_up(x)
        else:
            gate, up = self.w1(x), self.w3(x)
        if isinstance(self.w1, Int8Linear) and activation_kernel.available():
            # one pass, each element alike wherever it sits (kernels/activation.py); the fp32 reference keeps torch's
            hidden = activation_kernel.silu_mul(gate, up)
        else:
            hidden = silu_rows(gate) * up
        del gate, up  # (the projections' output, 45 MB at 512 rows of the 7B shape, freed before down's call)
        return self.w2(hidden)


def silu_rows(x: Tensor) -> Tensor:
    """F.silu of each row [..., hidden] on its own.

    torch's vectorized loop computes the last numel % 32 elements of a call (and of each thread's share) with a scalar
    exp that rounds differently from its vector exp, so over a whole [rows, hidden] tensor a row's bits would depend
    on how many rows came with it whenever hidden is not a multiple of 32 (stories260K: 172). Row by row, a token's
    SiLU is the same in a decode step and in any prefill chunk (row-exact prefill, chunking.py). The fp32 model, and
    int8 models without the SiLU kernel (kernels/activation.py, which int8 models use), take this path.
    """
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] == 1:
        return F.silu(x)
    out = torch.empty_like(rows)
    for row, destination in zip(rows.unbind(0), out.unbind(0), strict=True):  # in place: no stack of the rows after
        torch.ops.aten.silu.out(row, out=destination)
    return out.view(x.shape)


class TransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig, linear: type[nn.Module], **kw: object) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(config.dim, config.norm_eps, kernel=linear is Int8Linear)
        self.attention = Attention(config, linear, **kw)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps, kernel=linear is Int8Linear)
        self.feed_forward = FeedForward(config, linear, **kw)

    def forward(self, x: Tensor, cos: Tensor | None, sin: Tensor | None, cache_k: Tensor, cache_v: Tensor,
                slots: Sequence[int], starts: Sequence[int], step: KernelStep | None = None,
                last_only: bool = False) -> Tensor:
        """x [B, T, dim] -> [B, T, dim]; with `last_only` -> [B, 1, dim], the last row of each sequence (the model's
        last layer when only the last logits are wanted: the other rows' keys and values are all that is kept of
        them, and those are written before the output projection)."""
        attended = self.attention(self.attention_norm(x), cos, sin, cache_k, cache_v, slots, starts, step, last_only)
        h = (x[:, -1:] if last_only else x) + attended
        return h + self.feed_forward(self.ffn_norm(h))


def _dense_linear(in_features: int, out_features: int) -> nn.Linear:
    return nn.Linear(in_features, out_features, bias=False)


ROPE_BLOCK = 4096  # positions of the rotary tables built at once (Transformer.cover_positions)


class Transformer(nn.Module):
    """Llama 2. Build it on the meta device and let a loader assign the weights (see `loader.py`)."""

    def __init__(self, config: ModelConfig, precision: Precision = "fp32") -> None:
        super().__init__()
        if precision not in ("fp32", "int8"):
            raise ValueError(f"precision must be 'fp32' or 'int8', got {precision!r}")
        self.config = config
        self.precision = precision
        self.kv_cache = "bf16" if precision == "int8" else "fp32"  # the caches new_cache makes (set_kv_cache)
        allocator.tune()  # the forwards' activations come and go by megabytes (allocator.py)
        if precision == "int8":
            buffer = DequantBuffer()  # shared by every layer
            linear, kw, head_kw = Int8Linear, {"buffer": buffer}, {"buffer": buffer, "refine_top": 16}
        else:
            linear, kw, head_kw = _dense_linear, {}, {}
        # Given its weight, nn.Embedding skips its random init, which on the meta device goes through torch._refs and
        # imports torch._dynamo: 1-2 s of CPU (10 s of wall on a busy machine) of every start, for nothing.
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.dim,
                                           _weight=torch.empty(config.vocab_size, config.dim), _freeze=True)
        self.layers = nn.ModuleList(TransformerBlock(config, linear, **kw) for _ in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps, kernel=precision == "int8")
        self.output = linear(config.dim, config.vocab_size, **head_kw)
        # plain attributes: not weights, never on the meta device; grown as caches need them (cover_positions)
        self.rope_cos, self.rope_sin = rope_tables(config.head_dim, ROPE_BLOCK, config.rope_theta)
        # multiply-adds of the int8 linears per row (0 in fp32): how much work a decode step is
        self.int8_weights = sum(m.in_features * m.out_features for m in self.modules() if isinstance(m, Int8Linear))

    def stack_projections(self) -> int:
        """Put each layer's q, k and v weights, and its gate and up weights, end to end in one buffer each, so that
        decode reads each set in one kernel call (StackedInt8Linear; the model keeps one copy of every weight). Called
        by the loaders once the weights are set; again after a layer's weight is replaced, it stacks anew what changed.
        A no-op without our kernel, for the fp32 model, or for shapes that cannot be stacked. Returns the stacked
        sets."""
        stacked = 0
        for layer in self.layers:
            for owner, name, parts in ((layer.attention, "qkv", ("wq", "wk", "wv")),
                                       (layer.feed_forward, "gate_up", ("w1", "w3"))):
                stack = getattr(owner, name)
                if stack is not None and stack.current():
                    stacked += 1
                    continue
                linears = [getattr(owner, part) for part in parts]
                if StackedInt8Linear.can_stack(linears):
                    setattr(owner, name, StackedInt8Linear(linears))
                    stacked += 1
        return stacked

    def stacks(self) -> list[StackedInt8Linear]:
        """The stacks of projections that stack_projections made."""
        return [stack for layer in self.layers for stack in (layer.attention.qkv, layer.feed_forward.gate_up)
                if stack is not None]

    @property
    def cache_dtype(self) -> torch.dtype:
        return KV_CACHES[self.kv_cache] if self.precision == "int8" else torch.float32

    def set_kv_cache(self, kind: str) -> None:
        """The KV caches `new_cache` makes from now on: "bf16" (a new model's), "fp16" (the same memory, more precise
        within fp16's range: KV_CACHES) or "int8" (kv_int8.py: 0.56x the memory and the bytes decode attention reads,
        at the cost of each key and value's rounding to int8). The server's default, `--kv-cache auto`, is what
        default_kv_cache gives. Int8 models only: the fp32 model is the reference and keeps fp32 caches."""
        if kind not in KV_CACHES:
            raise ValueError(f"KV cache must be one of {', '.join(KV_CACHES)}, got {kind!r}")
        if self.precision != "int8":
            raise ValueError("the fp32 reference model keeps an fp32 KV cache; --kv-cache applies to int8 models")
        self.kv_cache = kind

    def default_kv_cache(self, prefill_chunk: int, max_slots: int) -> tuple[str, str]:
        """The KV cache `--kv-cache auto` (the server's default) gives this int8 model, and why in a few words.

        fp16 is the more accurate cache in the same memory (stories260K against fp32 in decode's numerics: KLD
        0.000308 against bf16's 0.000418) and decode attention reads it as fast (0.97-1.01x, the avx512 and avx2
        paths, Zen 4 and Emerald Rapids); so is a row-exact prefill, whose attention is the same kernel. Only SDPA
        on AMX tiles reads bf16 faster (SDPA_BF16_TILE_FLAGS): where prefill attends through SDPA on such a CPU (its
        default prefill, the bf16 kernel), the cache stays bf16.
        """
        if self.precision != "int8":
            raise ValueError("the fp32 reference model keeps an fp32 KV cache; --kv-cache applies to int8 models")
        if self.row_exact_prefill(prefill_chunk, max_slots, KV_CACHES["fp16"]):
            return "fp16", "prefill attends through our attention kernel, which reads fp16 as fast as bf16"
        if kernels.cpu_flags() >= SDPA_BF16_TILE_FLAGS:
            return "bf16", "prefill attends through SDPA, which multiplies bf16 keys on this CPU's AMX tiles"
        return "fp16", "prefill attends through SDPA, as fast over fp16 keys as over bf16 ones on a CPU without AMX"

    def kv_cache_for(self, kind: str, prefill_chunk: int, max_slots: int) -> tuple[str, str | None]:
        """The cache `--kv-cache kind` gives this int8 model, and why where `kind` is "auto" (default_kv_cache's
        choice; None for a kind asked for)."""
        return self.default_kv_cache(prefill_chunk, max_slots) if kind == "auto" else (kind, None)

    def new_cache(self, n_slots: int, max_seq_len: int | None = None) -> KVCache:
        cache = KVCache(self.config, n_slots, max_seq_len or self.config.max_seq_len, self.cache_dtype)
        self.cover_positions(cache.max_seq_len)
        return cache

    def cover_positions(self, positions: int) -> None:
        """Rotary tables for positions 0..positions - 1 at least. They are built for the contexts actually used, not
        for the config's max_seq_len: a config may say 10^10 (a 40 GB table), and the served context is the card's.
        Built a block of ROPE_BLOCK positions at a time, so that a position's row is the same bits whatever the
        table's length."""
        have = self.rope_cos.shape[0]
        if positions <= have:
            return
        blocks = [rope_tables(self.config.head_dim, ROPE_BLOCK, self.config.rope_theta, start)
                  for start in range(have, positions, ROPE_BLOCK)]
        self.rope_cos = torch.cat([self.rope_cos, *(cos for cos, _ in blocks)])
        self.rope_sin = torch.cat([self.rope_sin, *(sin for _, sin in blocks)])

    @torch.inference_mode()
    def forward(self, tokens: Tensor, cache: KVCache, slots: Sequence[int], starts: Sequence[int],
                all_logits: bool = False, prefill: chunking.PrefillChunk | None = None) -> Tensor:
        """tokens [B, T] for B sequences in cache rows `slots`, the first token of row b at position starts[b].

        Returns fp32 logits [B, V] for the last position of each row, or [B, T, V] with all_logits. `prefill`: this
        is a chunk of a prompt, computed as its whole aligned chunk would be (chunking.py).
        """
        if prefill is not None:  # (where the rows of each call lie: PrefillChunk.placements)
            prefill = replace(prefill, ends=tuple(start + tokens.shape[1] for start in starts))
        token = chunking.CURRENT.set(prefill)
        try:
            return self._forward(tokens, cache, slots, starts, all_logits)
        finally:
            chunking.CURRENT.reset(token)

    def _forward(self, tokens: Tensor, cache: KVCache, slots: Sequence[int], starts: Sequence[int],
                 all_logits: bool) -> Tensor:
        batch, seq = tokens.shape
        if len(slots) != batch or len(starts) != batch:
            raise ValueError(f"{batch} rows but {len(slots)} slots and {len(starts)} starts")
        if max(starts) + seq > cache.max_seq_len:
            raise ValueError(f"position {max(starts) + seq} exceeds the KV cache's {cache.max_seq_len}")
        self.cover_positions(cache.max_seq_len)  # (a cache made without new_cache)
        one_thread = seq == 1 and batch * self.int8_weights < SINGLE_THREAD_STEP_WORK
        with kernels.limit_threads(1) if one_thread else contextlib.nullcontext():
            return self._layers(tokens, cache, slots, starts, all_logits)

    def _layers(self, tokens: Tensor, cache: KVCache, slots: Sequence[int], starts: Sequence[int],
                all_logits: bool) -> Tensor:
        seq = tokens.shape[1]
        step = self._kernel_step(seq, cache, slots, starts)
        cos = sin = None
        if step is None:  # the kernel applies rope itself
            positions = torch.tensor(list(starts))[:, None] + torch.arange(seq)[None, :]  # [B, T]
            cos, sin = self.rope_cos[positions], self.rope_sin[positions]  # [B, T, D]
        x = self.tok_embeddings(tokens).float()  # the residual stream stays fp32
        # (a kernel step outside a prefill chunk is a decode step: _kernel_step)
        plan = decode_plan.plan_for(self, cache, step, len(slots)) if step is not None and \
            chunking.CURRENT.get() is None else None
        if plan is not None:  # the same kernel calls, without the modules around them (decode_plan.py)
            x = plan.run(x, step)
        else:
            last = len(self.layers) - 1
            for i, layer in enumerate(self.layers):
                # Past the last layer's attention only the logits are left to compute: without all_logits, only the
                # last row's (a 512-token prompt of the 7B shape: 2.3% of its multiply-adds spared, as llama.cpp does)
                x = layer(x, cos, sin, cache.k[i], cache.v[i], slots, starts, step,
                          last_only=i == last and seq > 1 and not all_logits)
        if not all_logits:
            x = x[:, -1:, :]
        logits = self.output(self.norm(x)).float()
        return logits if all_logits else logits[:, 0, :]

    def row_exact_prefill(self, prefill_chunk: int, max_slots: int, cache_dtype: torch.dtype | None = None) -> bool:
        """Whether prefill chunks of `prefill_chunk` rows can be computed row-exact (chunking.py): every row with the
        bits its decode step would give, so that the keys and values decode writes equal prefill's.

        It needs int8 layers that run our kernel for whole chunks and for every decode batch (its rows are bitwise
        independent; the dense path is not), and the attention kernel for a bf16/fp16/fp32 cache. Where prefill takes
        the dense path for speed (by default on the amx path for chunks of more than `int8.kernel_rows()` = 32 rows,
        as the default 128, where the vnni512, avx2 and avxvnni paths' kernel takes every chunk;
        INT8SERVE_PREFILL_MATMUL=row-exact gives the amx path's every call too, =bf16 and =dense give the vnni512 path's
        chunks back to the bf16 kernel or the dense path; =int8 gives prefill one int8 pass a row where decode takes
        two), or the attention kernel is off, prefill keeps its own numerics and
        generated tokens are not reusable (the prefix cache keeps prompts only). Decided once, when an engine is made:
        changing INT8SERVE_ATTENTION, INT8SERVE_KERNEL or INT8SERVE_PREFILL_MATMUL in a running process is not
        supported. `cache_dtype`: for caches of that dtype instead of those new_cache makes.
        """
        return (self._packed_int8() and max(prefill_chunk, max_slots) <= kernel_rows()
                and not prefill_matmul.int8_requested()
                and (cache_dtype or self.cache_dtype) in attention_kernel.DTYPES
                and attention_kernel.setting() != "torch"
                and attention_kernel.available())

    def prefill_rows_independent(self, prefill_chunk: int) -> bool:
        """Whether each row of a prefill chunk of `prefill_chunk` rows gets the same bits however many rows go through
        the int8 layers with it, so that several aligned chunks may share one forward (chunking.py).

        It holds where every int8 layer takes such chunks through our int8 kernel or our bf16 prefill kernel, which
        compute each row on its own; not on the dense path (oneDNN rounds a row by its company), nor for the fp32 or
        bf16 reference models. Decided once, when an engine is made, as row_exact_prefill is.
        """
        return self._packed_int8() and (kernel_takes(prefill_chunk) or prefill_matmul.takes(prefill_chunk))

    def _packed_int8(self) -> bool:
        """An int8 model whose every int8 layer holds its weight packed for our kernels."""
        linears = [m for m in self.modules() if isinstance(m, Int8Linear)]
        return self.precision == "int8" and bool(linears) and all(m.packed is not None for m in linears)

    def prefill_makes_tiles(self, prefill_chunk: int) -> bool:
        """Whether prefill chunks of `prefill_chunk` rows go through our bf16 prefill kernel, which makes each weight's
        bf16 tiles once per call: there several aligned chunks in one forward are faster than one a step (a 512-token
        prompt of the 7B shape in four 128-token chunks: 1.20-1.29x in one forward on a Sapphire Rapids,
        benchmarks/vs_llamacpp.py; 1.40x through 8 layers). Our int8 kernel's GEMMs multiply 128 and 512 rows at the
        same rate (row-exact chunks through 8 layers, 4 a forward: 1.02x), not worth the wait of a request that
        arrives meanwhile."""
        return self.prefill_rows_independent(prefill_chunk) and not kernel_takes(prefill_chunk)

    def _kernel_step(self, seq: int, cache: KVCache, slots: Sequence[int], starts: Sequence[int]
                     ) -> KernelStep | None:
        """A KernelStep when this forward is a decode step the attention kernel can take, or a row-exact prefill
        chunk, else None (torch path).

        Other prefill chunks keep the torch path: the prefix cache's exactness is defined by it (chunking.py).
        """
        chunk = chunking.CURRENT.get()
        if chunk is not None and chunk.row_exact:
            impl = attention_kernel.setting()
            if impl == "torch" or cache.dtype not in attention_kernel.DTYPES or not attention_kernel.available():
                raise RuntimeError("a row-exact prefill chunk needs the attention kernel (see row_exact_prefill)")
            positions = torch.tensor(list(starts), dtype=torch.int64)[:, None] + torch.arange(seq)[None, :]
            return KernelStep(torch.tensor(slots, dtype=torch.int64).repeat_interleave(seq), positions.reshape(-1),
                              self.rope_cos, self.rope_sin, impl)
        if seq != 1 or chunk is not None or cache.dtype not in attention_kernel.DTYPES:
            return None
        impl = attention_kernel.setting()
        if impl == "torch" or not attention_kernel.available():
            return None
        return KernelStep(torch.tensor(slots, dtype=torch.int64), torch.tensor(starts, dtype=torch.int64),
                          self.rope_cos, self.rope_sin, impl)
