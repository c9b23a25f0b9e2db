"""GPTQ (engine/gptq.py, engine/calibration.py): the int8 format of round-to-nearest, with smaller output errors."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
import torch

from int8serve.engine import int8
from int8serve.engine.calibration import calibration_windows
from int8serve.engine.gptq import InputCovariance, InverseHessianFactor, quantize_gptq
from int8serve.engine.loader import hf_to_internal, load_model
from int8serve.engine.tokenizer import Tokenizer


def correlated_inputs(rows: int, features: int, seed: int = 0) -> torch.Tensor:
    """Inputs whose features vary together (as a layer's inputs do), some much larger than others."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator) * torch.logspace(0, 1, features)[None, :]
    return torch.randn(rows, features, generator=generator) @ mixing


def output_error(weight: torch.Tensor, q: torch.Tensor, scales: torch.Tensor, x: torch.Tensor) -> float:
    return float(((x @ weight.T - x @ int8.dequantize(q, scales).T) ** 2).sum())


@pytest.mark.parametrize("group_size", [0, 32, 64])
def test_an_identity_hessian_gives_round_to_nearest(group_size: int) -> None:
    # with uncorrelated inputs of equal size there is nothing to compensate: GPTQ must round as RTN does
    weight = torch.randn(48, 100, generator=torch.Generator().manual_seed(1))
    q, scales = quantize_gptq(weight, torch.eye(100), group_size)
    expected_q, expected_scales = int8.quantize(weight, group_size)
    assert torch.equal(q, expected_q)
    assert torch.equal(scales, expected_scales)


@pytest.mark.parametrize("group_size", [0, 32, 128])
def test_gptq_moves_the_outputs_less_than_rounding(group_size: int) -> None:
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(2))
    calibration, held_out = correlated_inputs(2048, 256, seed=3).split(1024)
    covariance = InputCovariance(256)
    covariance.add(calibration)
    assert covariance.rows == 1024
    q, scales = quantize_gptq(weight, covariance.matrix, group_size)
    rtn = int8.quantize(weight, group_size)
    # on inputs it never saw, from the same distribution: measured 82-87% of RTN's squared output error (these
    # seeds are fixed, so the figures are too); a GPTQ that did not compensate would give 100%
    assert output_error(weight, q, scales, held_out) < 0.9 * output_error(weight, *rtn, held_out)


def test_the_format_is_round_to_nearests() -> None:
    weight = torch.randn(16, 70, generator=torch.Generator().manual_seed(5)) * 3
    covariance = InputCovariance(70)
    covariance.add(correlated_inputs(300, 70))
    q, scales = quantize_gptq(weight, covariance.matrix, 32)
    assert q.dtype == torch.int8 and q.shape == (16, 70) and int(q.abs().max()) <= 127
    assert scales.shape == (16, 3)  # 32 + 32 + a short group of 6
    assert torch.equal(scales, scales.to(torch.bfloat16).float())  # bf16-exact, as the kernels read them
    assert int8.group_size_of(scales, 70) == 32


def test_inputs_never_seen_get_zero_weights_and_no_nan() -> None:
    x = correlated_inputs(200, 64)
    x[:, 5] = 0
    covariance = InputCovariance(64)
    covariance.add(x)
    q, scales = quantize_gptq(torch.randn(8, 64), covariance.matrix, 32)
    assert torch.all(q[:, 5] == 0)
    assert torch.isfinite(scales).all()


def test_a_hessian_of_the_wrong_shape_is_refused() -> None:
    with pytest.raises(ValueError, match="hessian of shape"):
        quantize_gptq(torch.randn(4, 64), torch.eye(32), 32)


@pytest.mark.parametrize("features", [70, 701])  # 701: the triangular inverse splits, unevenly, more than once
def test_the_factor_is_the_cholesky_of_the_inverse(features: int) -> None:
    covariance = InputCovariance(features)
    covariance.add(correlated_inputs(2 * features, features, seed=6))
    damped = covariance.matrix.double()
    damped.diagonal().add_(0.01 * damped.diagonal().mean())
    # the textbook route, in float64: invert, then factor
    expected = torch.linalg.cholesky(torch.linalg.inv(damped), upper=True)
    kept = covariance.matrix.clone()
    upper = InverseHessianFactor(covariance.matrix).upper
    assert torch.equal(covariance.matrix, kept)  # the caller's H is left as it was
    assert upper.dtype == torch.float32 and torch.equal(upper, upper.triu())
    assert torch.allclose(upper.double(), expected, rtol=0, atol=1e-4 * float(expected.abs().max()))
    # the calibration hands its H over: the same factor, from H's own memory, which the covariance gives up
    taken = InverseHessianFactor.taking(covariance)
    assert torch.equal(taken.upper, upper) and covariance.matrix is None


def test_a_shared_factor_quantizes_as_the_hessian_does() -> None:
    # the calibration computes one factor per input and gives it to each layer reading that input
    covariance = InputCovariance(96)
    covariance.add(correlated_inputs(400, 96, seed=7))
    factor = InverseHessianFactor(covariance.matrix)
    for seed in (8, 9):
        weight = torch.randn(24, 96, generator=torch.Generator().manual_seed(seed))
        from_factor, from_hessian = quantize_gptq(weight, factor, 32), quantize_gptq(weight, covariance.matrix, 32)
        assert all(torch.equal(a, b) for a, b in zip(from_factor, from_hessian, strict=True))
    with pytest.raises(ValueError, match="factor of shape"):
        quantize_gptq(torch.randn(4, 64), factor, 32)


def test_calibration_windows_are_the_packages_text_in_the_models_tokens(stories_hf: Path) -> None:
    tokenizer = Tokenizer(stories_hf / "tokenizer.model")
    windows = calibration_windows(tokenizer.encode, tokenizer.bos_id, tokens=1024, window=256)
    assert windows.shape == (4, 256)
    assert torch.all(windows[:, 0] == tokenizer.bos_id)
    assert "lighthouse" in tokenizer.processor.decode(windows[0, 1:].tolist())


def test_loading_quantizes_with_gptq_by_default_and_rtn_on_request(stories_hf: Path) -> None:
    gptq = load_model(stories_hf, "int8")
    rtn = load_model(stories_hf, "int8", quantizer="rtn")
    fp32 = load_model(stories_hf, "fp32")
    layer = "layers.0.feed_forward.w2"
    q_gptq, _ = gptq.model.get_submodule(layer).quantized()
    q_rtn, s_rtn = rtn.model.get_submodule(layer).quantized()
    expected = int8.quantize(fp32.model.get_submodule(layer).weight, int8.DEFAULT_GROUP_SIZE)
    assert torch.equal(q_rtn, expected[0]) and torch.equal(s_rtn, expected[1])
    assert not torch.equal(q_gptq, q_rtn)
    # every int8 layer, the head included, was quantized
    assert all(m.packed is not None or m.weight is not None
               for m in gptq.model.modules() if isinstance(m, int8.Int8Linear))


def test_without_a_tokenizer_the_loader_says_it_rounds_instead(stories_hf: Path, tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "no-tokenizer"
    folder.mkdir()
    for file in stories_hf.iterdir():
        if not file.name.startswith("tokenizer"):  # neither tokenizer.model nor tokenizer.json
            shutil.copy(file, folder / file.name)
    with caplog.at_level(logging.WARNING):
        loaded = load_model(folder, "int8")
    assert "no calibration text" in caplog.text
    rtn = load_model(stories_hf, "int8", quantizer="rtn")
    layer = "layers.1.attention.wq"
    assert torch.equal(loaded.model.get_submodule(layer).quantized()[0], rtn.model.get_submodule(layer).quantized()[0])


def test_an_int8_checkpoint_without_a_tokenizer_loads_without_a_word_about_calibration(
        stories_hf: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # its weights are int8 already: nothing is quantized, so "no calibration text: rounding instead" would mislead
    from int8serve.engine.loader import save_int8_checkpoint

    folder = save_int8_checkpoint(load_model(stories_hf, "int8", quantizer="rtn"), tmp_path / "int8")
    for file in folder.glob("tokenizer*"):
        file.unlink()
    with caplog.at_level(logging.INFO):
        loaded = load_model(folder, "int8")
    assert "calibration" not in caplog.text
    assert loaded.source_format == "int8"


def test_an_unknown_quantizer_is_refused(stories_hf: Path) -> None:
    with pytest.raises(ValueError, match="quantizer must be one of gptq, rtn"):
        load_model(stories_hf, "int8", quantizer="awq")


def test_a_16_bit_checkpoint_calibrates_in_its_own_precision_to_the_same_int8(stories_hf: Path,
                                                                              tmp_path: Path) -> None:
    # the calibration block keeps fp16 weights (half an fp32 block's memory) and widens each as it computes:
    # exact, so the int8 model equals the one from the same values stored in fp32
    from safetensors.torch import load_file, save_file

    from int8serve.engine.calibration import _full_precision_block

    tensors = load_file(str(stories_hf / "model.safetensors"))
    copies = {}
    for name, dtype in (("fp16", torch.float16), ("fp16-as-fp32", torch.float32)):
        folder = copies[name] = tmp_path / name
        shutil.copytree(stories_hf, folder)
        save_file({k: v.half().to(dtype).contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    half, wide = (load_model(copies[name], "int8") for name in ("fp16", "fp16-as-fp32"))
    layers = [name for name, m in half.model.named_modules() if isinstance(m, int8.Int8Linear)]
    assert len(layers) == 7 * half.model.config.n_layers + 1
    for layer in layers:
        q_half, s_half = half.model.get_submodule(layer).quantized()
        q_wide, s_wide = wide.model.get_submodule(layer).quantized()
        assert torch.equal(q_half, q_wide) and torch.equal(s_half, s_wide), layer

    internal = {hf_to_internal(name): tensor for name, tensor in tensors.items()}
    block = _full_precision_block(half.model.config, half.model.layers[0],
                                  lambda name: internal[f"layers.0.{name}"].half())
    assert {p.dtype for p in block.attention.parameters()} == {torch.float16}



def test_layers_quantized_together_get_the_bits_they_get_one_at_a_time() -> None:
    # GPTQ treats each output row on its own: the calibration quantizes small layers sharing an input (q, k and v;
    # gate and up) in one column loop, which must change nothing but the time
    covariance = InputCovariance(160)
    covariance.add(correlated_inputs(500, 160, seed=10))
    factor = InverseHessianFactor(covariance.matrix)
    parts = [torch.randn(rows, 160, generator=torch.Generator().manual_seed(rows)) for rows in (40, 24, 24)]
    q, scales = quantize_gptq(torch.cat(parts), factor, 32)
    alone = [quantize_gptq(part, factor, 32) for part in parts]
    assert torch.equal(q, torch.cat([a[0] for a in alone])) and torch.equal(scales, torch.cat([a[1] for a in alone]))


def test_the_calibration_quantizes_small_layers_together_and_large_ones_apart(
        stories_hf: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from int8serve.engine import calibration

    calls: list[int] = []
    real = calibration.quantize_gptq

    def counted(weight: torch.Tensor, *args: object) -> tuple[torch.Tensor, torch.Tensor]:
        calls.append(weight.shape[0])
        return real(weight, *args)

    monkeypatch.setattr(calibration, "quantize_gptq", counted)
    together = load_model(stories_hf, "int8")
    layers = together.model.config.n_layers
    assert len(calls) == 4 * layers + 1  # q, k, v as one; o; gate and up as one; down; the head
    calls.clear()
    monkeypatch.setattr(calibration, "MERGE_BYTES", 0)
    apart = load_model(stories_hf, "int8")
    assert len(calls) == 7 * layers + 1
    for name, module in together.model.named_modules():
        if isinstance(module, int8.Int8Linear):
            assert all(torch.equal(a, b) for a, b in zip(module.quantized(),
                                                          apart.model.get_submodule(name).quantized(), strict=True))
