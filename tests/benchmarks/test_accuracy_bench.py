"""benchmarks/accuracy.py: each way of computing is what its name says (the emulations reach every linear layer, the
stacked projections included; `bf16 kernel` asks for our bf16 prefill kernel and gives the setting back), and a
short run writes its table."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from benchmarks import accuracy as bench
from int8serve.engine import int8
from int8serve.engine.kernels import matmul as prefill_matmul
from int8serve.engine.loader import LoadedModel

TOKENS = torch.tensor([[1, 403, 407, 261, 378, 442, 290]])


def forward(loaded: LoadedModel) -> torch.Tensor:
    model = loaded.model
    return model(TOKENS, model.new_cache(1, TOKENS.shape[1]), [0], [0], all_logits=True)


@pytest.mark.parametrize("name", list(bench.EMULATIONS))
def test_an_emulation_reaches_every_linear_layer(name: str, stories_int8: LoadedModel,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    assert any(layer.attention.qkv is not None for layer in stories_int8.model.layers)  # stacked, as loaded
    calls: list[int] = []
    real = int8.kernel_matmul
    monkeypatch.setattr(int8, "kernel_matmul", lambda rows, packed: calls.append(rows.shape[0]) or real(rows, packed))
    forward(stories_int8)
    assert calls  # (our kernel takes these calls when not emulating)
    calls.clear()
    with bench.mode(name):
        emulated = forward(stories_int8)
    assert calls == [] and torch.isfinite(emulated).all()


def test_the_bf16_kernel_mode_sets_and_restores_the_prefill_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(prefill_matmul.ENV, "dense")
    if not prefill_matmul.available():
        with pytest.raises(SystemExit, match="no bf16 prefill kernel"), bench.mode("bf16 kernel"):
            pass
    else:
        with bench.mode("bf16 kernel"):
            assert os.environ[prefill_matmul.ENV] == "bf16" and int8.bf16_kernel_requested()
    assert os.environ[prefill_matmul.ENV] == "dense"


def test_a_short_run_writes_its_table(tmp_path: Path) -> None:
    doc = tmp_path / "bench.md"
    doc.write_text("# Benchmarks\n")
    bench.main(["--quantizers", "rtn", "--group-sizes", "32", "--modes", "kernel precise", "weights only",
                "--tokens", "600", "--drop-head-residual", "--write", str(doc)])
    text = doc.read_text()
    assert "<!-- benchmarks/accuracy.py: begin -->" in text and "dropped (`--drop-head-residual`)" in text
    rows = [line for line in text.splitlines() if line.startswith("| rtn |")]
    assert [row.split(" | ")[2] for row in rows] == ["kernel precise", "weights only"]


def test_the_one_pass_emulation_computes_what_the_kernel_computes(stories_int8: LoadedModel) -> None:
    """`int8 activations per 32` rounds as `kernel` (one int8 pass a row) does: each linear's outputs are the kernel's
    up to the order of sums, where two passes (`kernel precise`) and the asymmetric rounding give others. Compared
    call by call on the same inputs: through a whole forward, one value an order of sums apart on either side of a
    rounding step moves every later layer (on a Sapphire Rapids a forward's logits
    differed by 0.30, from layer 1 on)."""
    model = stories_int8.model
    inputs: dict[str, torch.Tensor] = {}

    def keep_input(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        inputs.setdefault(names[module], args[0].detach().clone())

    linears = {name: layer for name, layer in model.named_modules() if isinstance(layer, int8.Int8Linear)}
    names = {layer: name for name, layer in linears.items()}
    hooks = [layer.register_forward_pre_hook(keep_input) for layer in linears.values()]
    try:
        with bench.mode("weights only"):  # (every Int8Linear is called on its own in the emulations)
            forward(stories_int8)
    finally:
        for hook in hooks:
            hook.remove()
    assert set(inputs) == set(linears)
    outputs = {}
    for mode in ("kernel", "kernel precise", "int8 activations per 32", "int8 activations per 32, asymmetric"):
        with bench.mode(mode):
            outputs[mode] = {name: linears[name](x).float() for name, x in inputs.items()}

    def gap(mode: str) -> float:
        return max((outputs[mode][name] - outputs["kernel"][name]).abs().max().item() for name in inputs)

    emulated = gap("int8 activations per 32")
    assert emulated < 2e-3, emulated
    for other in ("kernel precise", "int8 activations per 32, asymmetric"):
        assert gap(other) > 10 * emulated, other


def test_only_the_named_linears_are_emulated(stories_int8: LoadedModel) -> None:
    """`--only`: the emulation rounds the activations of the named linears and leaves the others' exact."""
    model = stories_int8.model
    with bench.mode("weights only"):
        exact = forward(stories_int8)
    logits = {}
    with bench.mode("int8 activations per 32"):
        everywhere = forward(stories_int8)
        for only in ([], ["wq", "wk", "wv"], list(bench.LINEARS)):
            with bench.emulating_only(model, only):
                logits[len(only)] = forward(stories_int8)
    assert torch.equal(logits[0], exact)
    assert torch.equal(logits[len(bench.LINEARS)], everywhere)
    assert not torch.equal(logits[3], exact) and not torch.equal(logits[3], everywhere)
    assert not any(hasattr(layer, "emulated") for layer in model.modules())  # given back


def test_precise_channels_keep_the_largest_inputs_exact(stories_int8: LoadedModel) -> None:
    """`--precise-channels K`: each linear keeps the K input channels whose largest |x| over the calibration windows
    is largest exact, and the emulation rounds the others; every channel kept is the exact forward."""
    model = stories_int8.model
    largest: dict[str, torch.Tensor] = {}
    linears = {name: layer for name, layer in model.named_modules() if isinstance(layer, int8.Int8Linear)}

    def observe(name: str) -> Callable[[torch.nn.Module, tuple[torch.Tensor, ...]], None]:
        def keep(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:  # (a value returned is the input)
            largest.setdefault(name, args[0].abs().flatten(0, -2).amax(0))
        return keep

    hooks = [layer.register_forward_pre_hook(observe(name)) for name, layer in linears.items()]
    try:
        with bench.mode("weights only"):
            exact = forward(stories_int8)
    finally:
        for hook in hooks:
            hook.remove()
    with bench.mode("int8 activations per 32"):
        none_kept = forward(stories_int8)
    with bench.precise_channels(model, TOKENS, 4):
        for name, layer in linears.items():
            assert sorted(layer.precise.tolist()) == sorted(largest[name].topk(4).indices.tolist()), name
        with bench.mode("int8 activations per 32"):
            four_kept = forward(stories_int8)
    with bench.precise_channels(model, TOKENS, 10_000), bench.mode("int8 activations per 32"):
        all_kept = forward(stories_int8)
    assert torch.equal(all_kept, exact)
    assert not torch.equal(four_kept, exact) and not torch.equal(four_kept, none_kept)
    assert not any(hasattr(layer, "precise") for layer in model.modules())  # given back
