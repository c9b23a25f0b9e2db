"""A decode step's transformer layers as one fixed list of kernel calls, made once and replayed every step.

Through the modules, each layer of a decode step is ~40 Python-level operations around its 9 kernel calls (module
calls, reshapes, views, the wrappers' checks, new output tensors), and between two kernel calls the second core
waits for the next parallel region. benchmarks/decode_plan.py on an AVX2-only AMD EPYC Zen 3 (2026-12-03, the two
paths alternating in one process, the same bits): the 7B shape at position 512, batch 1 1.05x and 4 sequences 1.04x
faster steps; SmolLM2-135M, where the modules were most of a step, 1.61x and 1.49x. So a plan holds, for one KV
cache and one batch size, every layer's kernel calls with their arguments worked out (weights, caches, rope tables,
its own input and output buffers), and a step is those calls back to back: RMSNorm, q/k/v (one stacked call),
attention, output projection, residual add and RMSNorm (one call), gate/up (one stacked call), SiLU (all rows in one
call), down projection, and the residual add again in the next layer's first call.

The calls are the modules' own, with the same inputs (kernels/, int8.StackedInt8Linear; the fused add is the same
IEEE add as the modules' `+`): the results are bitwise
those of the module path, which tests assert. A plan is used only where the module path would make exactly these
calls: an int8 model with every layer stacked, our kernels for the linears, attention (kernels/attention.py) and
activations, a decode step (one token per row, not a prefill chunk). It is checked before each step and made again
when anything it refers to was replaced (a layer's weight, a norm's weight, a stack). It is skipped, and the modules
run, while any module has hooks (they would not fire here; a hook marked PLAN_AWARE counts a plan's calls
another way, through LINEAR_TIMER, and does not count), while torch.profiler records (it would not see the
calls), and when INT8SERVE_DECODE_PLAN=off.
"""

from __future__ import annotations

import ctypes
import functools
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from . import kernels
from .int8 import PRECISE_ACTIVATIONS, Int8Linear, StackedInt8Linear, kernel_takes
from .kernels import activation as activation_kernel
from .kernels import attention as attention_kernel
from .kernels import gemv as gemv_kernel

if TYPE_CHECKING:
    from .model import KernelStep, KVCache, Transformer

ENV = "INT8SERVE_DECODE_PLAN"
SETTINGS = ("auto", "off")


def setting() -> str:
    """INT8SERVE_DECODE_PLAN: auto (default: used where it applies) or off (every step through the modules)."""
    return kernels.env_choice(ENV, SETTINGS)


@dataclass
class LinearTimer:
    """Seconds spent in the int8 linear calls of the plans run while it is set (benchmarks/engine.py splits a step
    into its linears and the rest with it)."""

    seconds: float = 0.0


LINEAR_TIMER: ContextVar[LinearTimer | None] = ContextVar("int8serve_decode_plan_timer", default=None)


def usable(model: Transformer) -> bool:
    """Whether decode steps of `model` can run through a plan (kernels, stacks and settings allowing)."""
    return _unusable_because(model) is None


def describe(model: Transformer) -> str:
    """One line for start-up logs: how this model's decode steps run."""
    reason = _unusable_because(model)
    if reason is None:
        return f"decode steps: each layer's kernel calls replayed from a plan ({ENV}=off: through the modules)"
    return f"decode steps: through the modules ({reason})"


def _unusable_because(model: Transformer) -> str | None:
    """Why decode steps of `model` cannot run through a plan, or None when they can."""
    if model.precision != "int8":
        return "the fp32 model"
    if setting() == "off":
        return f"{ENV}=off"
    if not (kernels.available() and attention_kernel.available() and activation_kernel.available()):
        return "our int8, attention or activation kernel is not available"
    if attention_kernel.setting() == "torch":
        return f"{attention_kernel.ENV}=torch"
    if not (model.layers and all(_stackable_layer(layer) for layer in model.layers)):
        return "a layer whose projections are not stacked"
    return None


def _stackable_layer(layer: nn.Module) -> bool:
    attention, feed_forward = layer.attention, layer.feed_forward
    return (isinstance(attention.qkv, StackedInt8Linear) and attention.qkv.current() and len(attention.qkv.layers) == 3
            and isinstance(feed_forward.gate_up, StackedInt8Linear) and feed_forward.gate_up.current()
            and len(feed_forward.gate_up.layers) == 2
            and all(isinstance(m, Int8Linear) and m.packed is not None and not m.refine_top
                    for m in (attention.wo, feed_forward.w2))
            and layer.attention_norm.kernel and layer.ffn_norm.kernel)


# A hook with this attribute set is one a plan may leave out: it counts the plan's calls otherwise (LinearTimer).
PLAN_AWARE = "int8serve_decode_plan_aware"


def _hooked(modules: list[nn.Module]) -> bool:
    """Whether any of `modules` (or every module) has a forward hook a plan would not call."""
    from torch.nn.modules import module as module_globals

    return (_unaware(module_globals._global_forward_hooks) or _unaware(module_globals._global_forward_pre_hooks)
            or any(_unaware(m._forward_hooks) or _unaware(m._forward_pre_hooks) for m in modules))


def _unaware(hooks: dict) -> bool:
    return bool(hooks) and any(not getattr(hook, PLAN_AWARE, False) for hook in hooks.values())


def plan_for(model: Transformer, cache: KVCache, step: KernelStep, batch: int) -> DecodePlan | None:
    """The plan for this decode step (made, or made again, as needed), or None when the modules must run it."""
    if (model.precision != "int8" or torch.autograd._profiler_enabled() or not kernels.available()
            or not kernel_takes(batch) or cache.dtype not in attention_kernel.DTYPES or setting() == "off"):
        return None
    key = (batch, kernels.kernel_threads(), kernels.path(), step.impl, activation_kernel.setting())
    plan = cache.decode_plans.get(key)
    if plan is not None and plan.model is model and plan.current():
        return None if _hooked(plan.modules) else plan
    for stale in [k for k, p in cache.decode_plans.items() if p.model is not model or not p.current()]:
        del cache.decode_plans[stale]  # (none may keep replaced weights alive)
    if not usable(model):
        return None
    plan = cache.decode_plans[key] = DecodePlan(model, cache, batch, *key[1:])
    return None if _hooked(plan.modules) else plan


@dataclass
class _LayerCalls:
    attention_norm: Callable[[], int]  # after the first layer with the previous layer's residual add (_norm_call)
    qkv: tuple
    attention: tuple
    wo: tuple
    ffn_norm: Callable[[], int]  # with the attention's residual add
    gate_up: tuple
    silu: tuple  # every row: gate and up of a row are side by side in the stacked output
    down: tuple


@dataclass
class DecodePlan:
    """The kernel calls of `batch` rows' decode step through `model`'s layers, on `cache`."""

    model: Transformer
    cache: KVCache
    batch: int
    threads: int
    gemv_impl: str
    attention_impl: str
    activation_impl: str
    layers: list[_LayerCalls] = field(init=False)
    modules: list[nn.Module] = field(init=False)

    def __post_init__(self) -> None:
        model, config, rows = self.model, self.model.config, self.batch
        first = model.layers[0]
        qkv_width = first.attention.qkv.packed.out_features
        gate_up_width = first.feed_forward.gate_up.packed.out_features
        f32 = torch.float32
        self.x = torch.empty(rows, config.dim, dtype=f32)  # the residual stream
        self.normed = torch.empty(rows, config.dim, dtype=f32)
        self.qkv = torch.empty(rows, qkv_width, dtype=f32)
        self.attended = torch.empty(rows, config.n_heads * config.head_dim, dtype=f32)
        self.projected = torch.empty(rows, config.dim, dtype=f32)
        self.gate_up = torch.empty(rows, gate_up_width, dtype=f32)
        self.hidden = torch.empty(rows, config.hidden_dim, dtype=f32)
        self.slots = torch.empty(rows, dtype=torch.int64)
        self.positions = torch.empty(rows, dtype=torch.int64)
        self._gemv = gemv_kernel._library().i8s_gemv
        self._attend = attention_kernel._library().i8a_decode
        activations = activation_kernel._library()
        self._rms_norm, self._add_rms_norm = activations.i8e_rms_norm, activations.i8e_add_rms_norm
        self._silu_mul = activations.i8e_silu_mul_rows
        self._converted: list[Tensor] = []  # norm weights converted for the kernel (kept alive: the calls point in)
        self.layers = [self._layer_calls(i, layer) for i, layer in enumerate(model.layers)]
        self.modules = list(model.modules())
        # everything the calls point into, by identity: a replaced one makes the plan stale (and is kept alive here)
        self._refs: list[tuple[object, str | int, object]] = [(model.layers, i, layer)
                                                               for i, layer in enumerate(model.layers)]
        self._refs += [(layer, name, getattr(layer, name)) for layer in model.layers
                       for name in ("attention_norm", "attention", "ffn_norm", "feed_forward")]
        self._refs += [(layer.attention, "wo", layer.attention.wo) for layer in model.layers]
        self._refs += [(layer.feed_forward, "w2", layer.feed_forward.w2) for layer in model.layers]
        self._refs += [(layer.attention, "qkv", layer.attention.qkv) for layer in model.layers]
        self._refs += [(layer.feed_forward, "gate_up", layer.feed_forward.gate_up) for layer in model.layers]
        self._refs += [(linear, "packed", linear.packed) for layer in model.layers
                       for linear in (*layer.attention.qkv.layers, layer.attention.wo,
                                      *layer.feed_forward.gate_up.layers, layer.feed_forward.w2)]
        self._refs += [(norm, "weight", norm.weight) for layer in model.layers
                       for norm in (layer.attention_norm, layer.ffn_norm)]
        self._refs += [(model, "rope_cos", model.rope_cos), (model, "rope_sin", model.rope_sin)]
        self._refs += [(self.cache.k, i, t) for i, t in enumerate(self.cache.k)]
        self._refs += [(self.cache.v, i, t) for i, t in enumerate(self.cache.v)]

    def current(self) -> bool:
        """Whether every weight, table and cache the calls point into is still the model's."""
        return all((owner[key] if isinstance(key, int) else getattr(owner, key)) is held  # type: ignore[index]
                   for owner, key, held in self._refs)

    def _layer_calls(self, index: int, layer: nn.Module) -> _LayerCalls:
        attention, feed_forward, rows = layer.attention, layer.feed_forward, self.batch
        config = self.model.config
        qkv, gate_up = attention.qkv, feed_forward.gate_up
        keys, values = self.cache.k[index], self.cache.v[index]
        at = _address
        q_start, k_start, v_start = qkv.starts
        width = qkv.packed.out_features
        return _LayerCalls(
            # (the first layer's stream has nothing to add yet; each later one adds the previous layer's output)
            attention_norm=self._norm_call(layer.attention_norm, add=index > 0),
            qkv=self._gemv_call(self.normed, qkv.packed, self.qkv),
            attention=(at(self.qkv, q_start), at(self.qkv, k_start), at(self.qkv, v_start), width, width,
                       at(self.model.rope_cos), at(self.model.rope_sin), at(self.slots), at(self.positions), rows,
                       attention.n_heads, attention.n_kv_heads, attention.head_dim, at(keys), at(values),
                       keys.shape[0], keys.shape[2], self.model.rope_cos.shape[0], attention_kernel.DTYPES[keys.dtype],
                       attention.head_dim**-0.5, at(self.attended), attention_kernel.IMPLS[self.attention_impl],
                       self.threads),
            wo=self._gemv_call(self.attended, attention.wo.packed, self.projected),
            ffn_norm=self._norm_call(layer.ffn_norm, add=True),
            gate_up=self._gemv_call(self.normed, gate_up.packed, self.gate_up),
            silu=(at(self.gate_up), at(self.gate_up, gate_up.starts[1]), at(self.hidden), rows, config.hidden_dim,
                  gate_up.packed.out_features, config.hidden_dim, activation_kernel.IMPLS[self.activation_impl],
                  self.threads),
            down=self._gemv_call(self.hidden, feed_forward.w2.packed, self.projected),
        )

    def _norm_call(self, norm: nn.Module, add: bool) -> Callable[[], int]:
        """The call of RMSNorm of the residual stream into `normed`; with `add`, after adding `projected` into the
        stream (i8e_add_rms_norm)."""
        weight = norm.weight.to(torch.float32).contiguous()  # (the module's call converts it the same way)
        self._converted.append(weight)
        kernel, added = (self._add_rms_norm, (_address(self.projected),)) if add else (self._rms_norm, ())
        return functools.partial(kernel, _address(self.x), *added, _address(weight), _address(self.normed),
                                 self.batch, weight.shape[0], ctypes.c_float(norm.eps),
                                 activation_kernel.IMPLS[self.activation_impl], self.threads)

    def _gemv_call(self, inputs: Tensor, packed: kernels.PackedWeight, out: Tensor) -> tuple:
        return (_address(inputs), self.batch, packed.in_features, packed.data.data_ptr(), packed.out_features,
                packed.group_size, _address(out), gemv_kernel._IMPLS[self.gemv_impl], int(PRECISE_ACTIVATIONS),
                self.threads)

    def run(self, x: Tensor, step: KernelStep) -> Tensor:
        """x fp32 [B, 1, dim], the embedded tokens -> [B, 1, dim] after the layers (writing the cache like the
        modules). The result is this plan's buffer: valid until its next step."""
        self.x.copy_(x.view(self.batch, -1))
        self.slots.copy_(step.slots)
        self.positions.copy_(step.positions)
        timer = LINEAR_TIMER.get()
        self._layers(self._gemv if timer is None else _timed(self._gemv, timer))
        return self.x.view(self.batch, 1, -1)

    def _layers(self, linear: Callable[..., int]) -> None:
        """Every layer's calls in order; `linear` makes the int8 linear calls (i8s_gemv, or it with a clock)."""
        attend, silu_mul = self._attend, self._silu_mul
        for calls in self.layers:
            if calls.attention_norm() or linear(*calls.qkv):
                _failed("RMSNorm or q/k/v")
            status = attend(*calls.attention)
            if status:  # (a slot twice at one position: the module path's error)
                raise ValueError(f"i8a_decode failed with status {status}: {attention_kernel.STATUS.get(status, '?')}")
            if linear(*calls.wo):
                _failed("output projection")
            if calls.ffn_norm() or linear(*calls.gate_up):
                _failed("residual add, RMSNorm or gate/up")
            if silu_mul(*calls.silu):
                _failed("SiLU")
            if linear(*calls.down):
                _failed("down projection")
        self.x.add_(self.projected)  # the last layer's output


def _failed(call: str) -> None:
    raise RuntimeError(f"a kernel call of the decode plan failed: {call}")


def _timed(gemv: Callable[..., int], timer: LinearTimer) -> Callable[..., int]:
    """`gemv` with its time added to `timer`."""
    clock = time.perf_counter

    def timed(*args: object) -> int:
        started = clock()
        status = gemv(*args)
        timer.seconds += clock() - started
        return status

    return timed


def _address(tensor: Tensor, offset: int = 0) -> int:
    """The address of `tensor`'s element `offset` (fp32 tensors here)."""
    return tensor.data_ptr() + offset * tensor.element_size()
