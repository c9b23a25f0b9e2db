"""The model against Hugging Face transformers' LlamaForCausalLM, and the KV cache's batching contract."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from int8serve.engine import kernels, kv_int8
from int8serve.engine import model as model_module
from int8serve.engine.kernels import attention as attention_kernel
from int8serve.engine.kernels import matmul as prefill_matmul
from int8serve.engine.loader import load_model
from int8serve.engine.model import apply_rope, rope_tables, silu_rows

TOKENS = [1, 403, 407, 261, 378, 100, 20, 300, 5, 77, 12, 499]


def hf_logits(path: Path, ids: list[int]) -> torch.Tensor:
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def our_logits(path: Path, ids: list[int], precision: str = "fp32") -> torch.Tensor:
    model = load_model(path, precision).model
    return model(torch.tensor([ids]), model.new_cache(1, len(ids)), [0], [0], all_logits=True)[0]


def test_stories260k_fp32_logits_match_transformers(stories_hf: Path) -> None:
    diff = (our_logits(stories_hf, TOKENS) - hf_logits(stories_hf, TOKENS)).abs().max().item()
    assert diff <= 1e-4


@pytest.mark.parametrize(
    ("name", "overrides"),
    [
        ("multi-head", dict(num_attention_heads=4, num_key_value_heads=4)),
        ("grouped-query", dict(num_attention_heads=8, num_key_value_heads=2)),
        ("untied-odd-sizes", dict(hidden_size=48, intermediate_size=77, num_attention_heads=6,
                                  num_key_value_heads=3, vocab_size=203, tie_word_embeddings=False)),
        ("tied-theta", dict(tie_word_embeddings=True, rope_theta=500000.0)),
    ],
)
def test_random_configs_match_transformers(tmp_path: Path, name: str, overrides: dict) -> None:
    values = dict(hidden_size=64, intermediate_size=160, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=256, max_position_embeddings=128, rms_norm_eps=1e-5,
                  tie_word_embeddings=False)
    values.update(overrides)
    torch.manual_seed(hash(name) % 1000)
    LlamaForCausalLM(LlamaConfig(**values)).save_pretrained(tmp_path)
    ids = torch.randint(0, values["vocab_size"], (20,)).tolist()
    diff = (our_logits(tmp_path, ids) - hf_logits(tmp_path, ids)).abs().max().item()
    assert diff <= 1e-4, name


def test_hf_and_meta_layouts_give_identical_logits(stories_hf: Path, stories_meta: Path) -> None:
    for precision in ("fp32", "int8"):
        hf, meta = our_logits(stories_hf, TOKENS, precision), our_logits(stories_meta, TOKENS, precision)
        assert torch.equal(hf, meta), precision


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_chunked_prefill_and_decode_equal_one_forward(stories_hf: Path, precision: str) -> None:
    model = load_model(stories_hf, precision).model
    ids = torch.tensor([TOKENS])
    whole = model(ids, model.new_cache(1, 32), [0], [0], all_logits=True)[0]
    cache = model.new_cache(2, 32)
    pieces = [model(ids[:, :5], cache, [1], [0], all_logits=True)[0]]
    pieces += [model(ids[:, i:i + 1], cache, [1], [i], all_logits=True)[0] for i in range(5, len(TOKENS))]
    # int8 routes 1-row and many-row matmuls through different kernels (both bf16): they agree to rounding
    tolerance = 1e-4 if precision == "fp32" else 0.25
    assert (torch.cat(pieces) - whole).abs().max().item() <= tolerance
    # the next token agrees wherever the top two logits are further apart than twice the tolerance (rounding within
    # it cannot swap them): every position for fp32, all but near-ties for int8
    top2 = whole.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * tolerance
    assert clear.sum().item() >= len(TOKENS) // 2
    assert torch.equal(torch.cat(pieces).argmax(-1)[clear], whole.argmax(-1)[clear])


def test_batched_decode_rows_are_independent(stories_int8) -> None:
    """Sequences at different positions in different slots decode together as they would alone."""
    model = stories_int8.model
    prompts = [TOKENS[:3], TOKENS[:7], TOKENS[2:11]]
    alone, cache = [], model.new_cache(4, 32)
    for i, prompt in enumerate(prompts):
        solo = model.new_cache(1, 32)
        model(torch.tensor([prompt]), solo, [0], [0])
        alone.append(model(torch.tensor([[9]]), solo, [0], [len(prompt)]))
        model(torch.tensor([prompt]), cache, [i + 1], [0])
    together = model(torch.tensor([[9], [9], [9]]), cache, [1, 2, 3], [len(p) for p in prompts])
    assert torch.equal(torch.cat(alone), together)


@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_last_logits_spare_the_last_layers_other_rows(stories_fp32, stories_int8, precision: str) -> None:
    """Without all_logits the last layer's output projection and feed-forward take only each sequence's last row:
    the cache gets the same keys and values as with all_logits, and the logits are the last rows' (bit for bit
    through our int8 kernel, whose rows are independent of the rows around them)."""
    model = (stories_int8 if precision == "int8" else stories_fp32).model
    tokens = torch.tensor([TOKENS, TOKENS[::-1]])
    seen: dict[str, list[int]] = {"first": [], "last": []}
    hooks = [block.feed_forward.register_forward_pre_hook(
        lambda _module, args, name=name: seen[name].append(args[0].shape[1]))
        for name, block in (("first", model.layers[0]), ("last", model.layers[-1]))]
    try:
        everything = model.new_cache(3, 32)
        full = model(tokens, everything, [2, 0], [0, 0], all_logits=True)[:, -1]
        assert seen == {"first": [len(TOKENS)], "last": [len(TOKENS)]}
        seen["first"].clear(), seen["last"].clear()
        spared = model.new_cache(3, 32)
        last = model(tokens, spared, [2, 0], [0, 0])
        assert seen == {"first": [len(TOKENS)], "last": [1]}
    finally:
        for hook in hooks:
            hook.remove()
    for layer in range(model.config.n_layers):
        for slot in (2, 0):  # (the rest of a new cache is uninitialised memory)
            assert torch.equal(everything.k[layer][slot, :, :len(TOKENS)], spared.k[layer][slot, :, :len(TOKENS)])
            assert torch.equal(everything.v[layer][slot, :, :len(TOKENS)], spared.v[layer][slot, :, :len(TOKENS)])
    if precision == "int8":
        assert torch.equal(last, full)
    else:  # fp32 matmuls round a row by the rows beside it
        assert torch.allclose(last, full, atol=1e-5, rtol=0)


def test_forward_rejects_positions_past_the_cache(stories_fp32) -> None:
    model = stories_fp32.model
    with pytest.raises(ValueError, match="exceeds the KV cache"):
        model(torch.tensor([[1, 2, 3]]), model.new_cache(1, 2), [0], [0])


def test_small_decode_steps_run_the_kernels_on_one_thread(stories_int8, monkeypatch: pytest.MonkeyPatch) -> None:
    """A decode step below SINGLE_THREAD_STEP_WORK calls our kernels with one thread, prefill and bigger steps with
    torch's count (model.py: on a busy machine each parallel region of a tiny step waits for the second thread)."""
    if not kernels.available():
        pytest.skip(f"our kernels are unavailable here: {kernels.unavailable_reason()}")
    model, seen = stories_int8.model, []
    gemv = kernels.int8_gemv

    def recording(*args: object, **kwargs: object) -> torch.Tensor:
        seen.append(kernels.kernel_threads())
        return gemv(*args, **kwargs)

    def threads_of(tokens: list[list[int]], starts: list[int]) -> set[int]:
        seen.clear()
        model(torch.tensor(tokens), cache, list(range(len(tokens))), starts)
        return set(seen)

    monkeypatch.setattr(kernels, "int8_gemv", recording)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        cache = model.new_cache(2, 32)
        assert threads_of([TOKENS[:5]], [0]) == {2}  # prefill
        assert threads_of([[9]], [5]) == {1}
        monkeypatch.setattr(model_module, "SINGLE_THREAD_STEP_WORK", 2 * model.int8_weights)
        assert threads_of([[9], [9]], [6, 0]) == {2}  # two rows: as much work as the threshold
        assert threads_of([[9]], [7]) == {1}
    finally:
        torch.set_num_threads(threads)
    assert kernels.kernel_threads() == threads  # the limit ends with the step


@pytest.mark.parametrize(("batch", "seq", "heads"), [(1, 512, 32), (4, 1, 32), (1, 7, 9), (2, 3, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_in_halves_is_the_textbook_formula_bit_for_bit(batch: int, seq: int, heads: int,
                                                            dtype: torch.dtype) -> None:
    cos, sin = rope_tables(128, 4096, 10000.0)
    generator = torch.Generator().manual_seed(batch * seq + heads)
    x = (torch.randn(batch, seq, heads, 128, generator=generator) * 3).to(dtype)
    positions = torch.randint(0, 4096, (batch, seq), generator=generator)
    c, s = cos[positions][:, :, None, :], sin[positions][:, :, None, :]
    rotated = torch.cat([-x[..., 64:], x[..., :64]], dim=-1)  # rotate_half
    assert torch.equal(apply_rope(x, cos[positions], sin[positions]), x * c + rotated * s)


@pytest.mark.parametrize("shape", [(1, 172), (5, 172), (3, 4, 11008), (2, 64)])
def test_silu_rows_is_each_rows_own_silu(shape: tuple[int, ...]) -> None:
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(len(shape))) * 4
    rows = x.reshape(-1, shape[-1])
    expected = torch.stack([F.silu(row) for row in rows.unbind(0)]).view(shape)
    got = silu_rows(x)
    assert got.shape == x.shape and torch.equal(got, expected)


def kernel_and_torch_runs(model, monkeypatch: pytest.MonkeyPatch) -> list[tuple[torch.Tensor, object]]:
    """TOKENS prefilled 4 at once, then decoded a step at a time, through the attention kernel (`auto`) and through the
    torch path: [(the steps' logits, the cache)] for each, in that order."""
    ids = torch.tensor([TOKENS])
    runs = []
    for setting in ("auto", "torch"):
        monkeypatch.setenv(attention_kernel.ENV, setting)
        cache = model.new_cache(1, 32)
        model(ids[:, :4], cache, [0], [0])
        steps = [model(ids[:, i:i + 1], cache, [0], [i]) for i in range(4, len(TOKENS))]
        runs.append((torch.cat(steps), cache))
    return runs


@pytest.mark.parametrize(("kind", "dtype"), [("int8", torch.int8), ("fp16", torch.float16)])
def test_another_kv_cache_holds_the_same_rows_through_the_kernel_and_the_torch_path(
        kind: str, dtype: torch.dtype, stories_int8, monkeypatch: pytest.MonkeyPatch) -> None:
    """--kv-cache int8 or fp16: decode steps through the attention kernel (its store) and through the torch path
    (INT8SERVE_ATTENTION=torch: kv_int8.quantize and each row dequantized, or write_rows, with fp32 matmuls) after the
    same prefill write the same rows from the same keys and values (the first layer's, whose inputs the two paths
    share) and agree on the logits as closely as they do with a bf16 cache."""
    model = stories_int8.model
    model.set_kv_cache(kind)
    try:
        (kernel_logits, kernel_cache), (torch_logits, torch_cache) = kernel_and_torch_runs(model, monkeypatch)
        assert kernel_cache.k[0].dtype == dtype
        if kind == "int8":
            assert kernel_cache.k[0].shape[-1] == kv_int8.width(model.config.head_dim)
        assert torch.equal(kernel_cache.k[0][0, :, :len(TOKENS)], torch_cache.k[0][0, :, :len(TOKENS)])
        assert torch.equal(kernel_cache.v[0][0, :, :len(TOKENS)], torch_cache.v[0][0, :, :len(TOKENS)])
        # the torch path rounds each attention output to bf16 (its bf16 cache's dtype): with a bf16 cache the two paths'
        # logits differ by up to 0.022 here, with the int8 one 0.019; a misread scale would move them by whole units
        assert (kernel_logits - torch_logits).abs().max().item() <= 0.05
        assert torch.equal(kernel_logits.argmax(-1), torch_logits.argmax(-1))
    finally:
        model.set_kv_cache("bf16")


def test_an_fp16_kv_cache_stores_values_beyond_its_range_as_its_largest(stories_int8) -> None:
    """An outlier beyond fp16's range becomes +-65504 in both write paths (NaN stays NaN), not an infinity that would
    make every later score of its row NaN."""
    rows = torch.tensor([[[1e6, -1e6, 70000.0, 1.5, float("nan")]]])  # [Hkv 1, T 1, D 5]
    cache = torch.zeros(1, 1, 2, 5, dtype=torch.float16)
    model_module.write_rows(cache, 0, 1, rows)
    assert cache[0, 0, 1, :4].tolist() == [65504.0, -65504.0, 65504.0, 1.5] and cache[0, 0, 1, 4].isnan()
    if not attention_kernel.available():
        pytest.fail(f"the attention kernel did not build: {attention_kernel.unavailable_reason()}")
    heads, dim = 2, 8
    cos, sin = rope_tables(dim, 4, 10000.0)
    q, v = torch.randn(1, heads, dim), torch.randn(1, heads, dim)
    k = torch.randn(1, heads, dim)
    k[0, 0, 0], k[0, 1, 3] = 1e6, -2e5
    cache_k, cache_v = (torch.zeros(1, heads, 4, dim, dtype=torch.float16) for _ in range(2))
    out = attention_kernel.decode_attention(q, k, v, cos, sin, torch.tensor([0]), torch.tensor([0]), cache_k, cache_v)
    assert cache_k[0, 0, 0, 0].item() == 65504.0 and cache_k[0, 1, 0, 3].item() == -65504.0  # position 0: no rotation
    assert torch.isfinite(cache_k).all() and torch.isfinite(out).all()


def test_only_int8_models_take_an_int8_kv_cache(stories_fp32, stories_int8) -> None:
    with pytest.raises(ValueError, match="fp32 reference model keeps an fp32 KV cache"):
        stories_fp32.model.set_kv_cache("int8")
    with pytest.raises(ValueError, match="must be one of bf16, fp16, int8"):
        stories_int8.model.set_kv_cache("fp8")
    assert stories_fp32.model.cache_dtype == torch.float32 and stories_int8.model.cache_dtype == torch.bfloat16


AMX_FLAGS = frozenset({"avx512f", "amx_tile", "amx_bf16", "amx_int8"})


@pytest.mark.parametrize("flags", [AMX_FLAGS, frozenset({"avx512f", "avx2"})], ids=["amx", "no amx"])
def test_the_default_kv_cache_is_fp16_where_prefill_is_row_exact(stories_int8, flags: frozenset[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Row-exact prefill attends through our attention kernel, which reads fp16 as fast as bf16: fp16 on any CPU."""
    monkeypatch.setenv(prefill_matmul.ENV, "row-exact")
    monkeypatch.setattr(kernels, "cpu_flags", lambda: flags)
    model = stories_int8.model
    if not model.row_exact_prefill(128, 4, torch.float16):
        pytest.fail(f"INT8SERVE_PREFILL_MATMUL=row-exact did not make prefill row-exact: kernel "
                    f"{kernels.unavailable_reason()}, attention {attention_kernel.unavailable_reason()}")
    kind, why = model.default_kv_cache(128, 4)
    assert (kind, why) == ("fp16", "prefill attends through our attention kernel, which reads fp16 as fast as bf16")
    assert model.kv_cache == "bf16"  # asking changes nothing


@pytest.mark.parametrize(("flags", "expected"), [(AMX_FLAGS, "bf16"), (frozenset({"avx512f", "avx2"}), "fp16")],
                         ids=["amx", "no amx"])
def test_the_default_kv_cache_where_prefill_attends_through_sdpa(stories_int8, flags: frozenset[str], expected: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Prefill through SDPA (here: one int8 pass a row, never row-exact): bf16 where SDPA multiplies it on AMX tiles,
    fp16 elsewhere; the reason names which."""
    monkeypatch.setenv(prefill_matmul.ENV, "int8")
    monkeypatch.setattr(kernels, "cpu_flags", lambda: flags)
    model = stories_int8.model
    assert not model.row_exact_prefill(128, 4, torch.float16)
    kind, why = model.default_kv_cache(128, 4)
    assert kind == expected and why.startswith("prefill attends through SDPA")
    assert ("AMX tiles" in why) == (expected == "bf16")


def test_the_fp32_model_has_no_default_kv_cache_to_choose(stories_fp32) -> None:
    with pytest.raises(ValueError, match="fp32 reference model keeps an fp32 KV cache"):
        stories_fp32.model.default_kv_cache(128, 4)
