"""The decode attention kernel (engine/kernels/attention.py): against the fp32 torch attention, bitwise batch
invariance, every path this CPU can run, the model's use of it and its fallback.

Paths the CPU lacks are skipped with the reason; the scalar path runs everywhere the library builds.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from int8serve.engine import kv_int8
from int8serve.engine.kernels import BuildError, attention
from int8serve.engine.model import apply_rope, rope_tables

ALL_PATHS = ["avx512", "avx2", "scalar"]


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    assert attention.available(), f"the attention kernel did not build/load: {attention.unavailable_reason()}"


def runnable(path: str) -> str:
    if path not in attention.cpu_paths():
        pytest.skip(f"this CPU cannot run the {path} path (it runs {attention.cpu_paths()})")
    return path


class Case:
    """Random queries, new keys/values and a filled cache for `batch` rows of one step."""

    def __init__(self, heads: int, kv_heads: int, dim: int, dtype: torch.dtype, positions: list[int],
                 slots: list[int] | None = None, n_slots: int = 5, max_len: int = 320, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        batch = len(positions)
        self.q = torch.randn(batch, heads, dim, generator=g) * 2  # [B, H, D]
        self.k = torch.randn(batch, kv_heads, dim, generator=g)  # [B, Hkv, D]
        self.v = torch.randn(batch, kv_heads, dim, generator=g)
        self.cos, self.sin = rope_tables(dim, max_len, 10000.0)
        self.cache_k = stored(torch.randn(n_slots, kv_heads, max_len, dim, generator=g), dtype)
        self.cache_v = stored(torch.randn(n_slots, kv_heads, max_len, dim, generator=g), dtype)
        self.slots = torch.tensor(slots if slots is not None else list(range(batch)), dtype=torch.int64)
        self.positions = torch.tensor(positions, dtype=torch.int64)

    def run(self, impl: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The kernel on copies of the caches: (out [B, H, D], cache_k, cache_v) after the call."""
        cache_k, cache_v = self.cache_k.clone(), self.cache_v.clone()
        out = attention.decode_attention(self.q, self.k, self.v, self.cos, self.sin, self.slots, self.positions,
                                         cache_k, cache_v, impl)  # type: ignore[arg-type]
        return out, cache_k, cache_v

    def reference(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The torch path: apply_rope, cache write, fp32 matmuls and softmax, one row at a time."""
        cache_k, cache_v = self.cache_k.clone(), self.cache_v.clone()
        batch, heads, dim = self.q.shape
        kv_heads = self.k.shape[1]
        out = torch.empty(batch, heads, dim)
        for row in range(batch):
            slot, pos = int(self.slots[row]), int(self.positions[row])
            cos, sin = self.cos[pos][None, None], self.sin[pos][None, None]  # [1, 1, D]
            q = apply_rope(self.q[row][None, None], cos, sin)[0, 0]  # [H, D]
            cache_k[slot, :, pos] = stored(apply_rope(self.k[row][None, None], cos, sin)[0, 0], cache_k.dtype)
            cache_v[slot, :, pos] = stored(self.v[row], cache_v.dtype)
            keys, values = read(cache_k[slot, :, :pos + 1], dim), read(cache_v[slot, :, :pos + 1], dim)
            scores = q.view(kv_heads, heads // kv_heads, dim) @ keys.transpose(1, 2) * dim**-0.5
            out[row] = (torch.softmax(scores, -1) @ values).view(heads, dim)
        return out, cache_k, cache_v


def stored(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """fp32 keys or values [..., D] as a cache of `dtype` holds them (int8: kv_int8's rows of values and scales)."""
    return kv_int8.quantize(x) if dtype == torch.int8 else x.to(dtype)


def read(rows: torch.Tensor, dim: int) -> torch.Tensor:
    """A cache's rows [..., row] as fp32 [..., D]."""
    return kv_int8.dequantize(rows, dim) if rows.dtype == torch.int8 else rows.float()


SHAPES = [  # heads, kv heads, head_dim, cache dtype
    (32, 32, 128, torch.bfloat16),  # Llama-2-7B
    (8, 4, 8, torch.bfloat16),  # stories260K: grouped-query, tiny heads
    (8, 2, 64, torch.float32),  # grouped-query, the fp32 reference model's cache
    (6, 3, 24, torch.bfloat16),  # head_dim not a multiple of 16 (masked AVX-512 tail)
    (4, 1, 40, torch.float32),  # one kv head for all
    (8, 4, 32, torch.float16),  # an fp16 cache
    (32, 32, 128, torch.int8),  # int8 caches (kv_int8.py): Llama-2-7B, 4 groups of 32 a row
    (9, 3, 64, torch.int8),  # SmolLM2-135M: 2 groups
    (8, 4, 8, torch.int8),  # stories260K: one short group (the vector paths' int8 rows take the scalar code)
    (6, 3, 40, torch.int8),  # a group of 32 and a short one (likewise)
]


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "dtype"), SHAPES)
def test_matches_the_fp32_torch_attention(path: str, heads: int, kv_heads: int, dim: int, dtype: torch.dtype
                                          ) -> None:
    case = Case(heads, kv_heads, dim, dtype, positions=[0, 17, 319, 64], slots=[3, 0, 4, 1])
    out, cache_k, cache_v = case.run(runnable(path))
    ref, ref_k, ref_v = case.reference()
    assert (out - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    # the key and value it writes are the bits the torch path writes (rope as three rounded ops, then the cast)
    assert torch.equal(cache_k, ref_k) and torch.equal(cache_v, ref_v)


@pytest.mark.parametrize("path", ALL_PATHS)
def test_every_position_from_the_first(path: str) -> None:
    runnable(path)
    for pos in range(0, 40):
        case = Case(8, 4, 8, torch.bfloat16, positions=[pos], seed=pos)
        out, _, _ = case.run(path)
        ref, _, _ = case.reference()
        assert (out - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item()), pos


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "dtype"), [*SHAPES[:3], *SHAPES[6:8]])
def test_a_row_is_bitwise_the_same_whatever_else_is_in_the_batch(path: str, heads: int, kv_heads: int, dim: int,
                                                                 dtype: torch.dtype) -> None:
    runnable(path)
    together = Case(heads, kv_heads, dim, dtype, positions=[200, 3, 97, 150], slots=[2, 4, 0, 1])
    out, cache_k, _ = together.run(path)
    for row in range(4):
        alone = Case(heads, kv_heads, dim, dtype, positions=[200, 3, 97, 150], slots=[2, 4, 0, 1])
        keep = slice(row, row + 1)
        alone.q, alone.k, alone.v = alone.q[keep], alone.k[keep], alone.v[keep]
        alone.slots, alone.positions = alone.slots[keep], alone.positions[keep]
        for threads in (1, 2):
            before = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                solo, solo_k, _ = alone.run(path)
            finally:
                torch.set_num_threads(before)
            assert torch.equal(solo[0], out[row]), (row, threads)
            slot = int(alone.slots[0])
            assert torch.equal(solo_k[slot], cache_k[slot])


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "dtype"), [
    (32, 32, 128, torch.bfloat16),  # Llama-2-7B: kv heads 4 at a time
    (7, 7, 24, torch.bfloat16),  # 4, then 3 (2 and 1), masked AVX-512 tails
    (10, 5, 16, torch.float32),  # 4, then 1; grouped-query
    (12, 6, 32, torch.float16),  # 4, then 2
    (8, 2, 64, torch.bfloat16),  # 2 kv heads, each shared by 4 query heads
    (6, 3, 40, torch.int8),  # int8 rows: a group of 32 and a short one (the scalar code, one head at a time)
    (16, 8, 64, torch.int8),  # int8 rows, 2 groups: 4 and 4
    (7, 7, 32, torch.int8),  # int8 rows, 1 group: 4, then 3
])
def test_a_head_is_bitwise_the_same_alone_and_beside_other_heads(path: str, heads: int, kv_heads: int, dim: int,
                                                                 dtype: torch.dtype) -> None:
    """A decode row's task attends up to 4 kv heads side by side (their keys and values read as parallel streams);
    each head's output and the key and value it writes have the bits of that head attended alone, in a call with one
    kv head."""
    runnable(path)
    case = Case(heads, kv_heads, dim, dtype, positions=[0, 3, 17, 64, 299], slots=[3, 0, 4, 1, 2])
    out, cache_k, cache_v = case.run(path)
    group = heads // kv_heads
    for kv_head in range(kv_heads):
        query_heads, kept = slice(kv_head * group, (kv_head + 1) * group), slice(kv_head, kv_head + 1)
        alone_k, alone_v = case.cache_k[:, kept].contiguous(), case.cache_v[:, kept].contiguous()
        alone = attention.decode_attention(case.q[:, query_heads].contiguous(), case.k[:, kept].contiguous(),
                                           case.v[:, kept].contiguous(), case.cos, case.sin, case.slots,
                                           case.positions, alone_k, alone_v, path)  # type: ignore[arg-type]
        assert torch.equal(alone, out[:, query_heads]), f"kv head {kv_head}"
        assert torch.equal(alone_k, cache_k[:, kept]) and torch.equal(alone_v, cache_v[:, kept]), f"kv head {kv_head}"


@pytest.mark.parametrize("path", ["avx512", "avx2"])
def test_a_task_takes_four_heads_unless_a_thread_would_have_fewer_than_two_tasks(path: str) -> None:
    runnable(path)
    assert attention.heads_together(path, 1, 32, 2) == 4  # Llama-2-7B at batch 1 on 2 threads: 8 tasks of 4 heads
    assert attention.heads_together(path, 1, 32, 8) == 2  # on 8 threads: 16 tasks of 2
    assert attention.heads_together(path, 1, 32, 16) == 1  # on 16: 32 tasks of 1
    assert attention.heads_together(path, 4, 32, 16) == 4  # 4 rows on 16 threads: 32 tasks of 4
    assert attention.heads_together(path, 1, 3, 2) == 1  # SmolLM2's 3 kv heads at batch 1: 3 tasks, not 1
    assert attention.heads_together(path, 4, 3, 2) == 4  # at batch 4: 4 tasks of 3 heads
    assert attention.heads_together("scalar", 4, 32, 2) == 1  # the scalar path reads one head at a time


# A prefill chunk's rows: 5 of slot 2 at the start of its cache, a row of slot 0, 21 of slot 1 (a run of 16 rows taken
# together, then 5) far enough in for the keys to span several of attend_rows' 32 KB blocks at every head_dim of
# SHAPES but the smallest (128 keys a block at head_dim 128 in bf16, 682 at 24, 2048 at 8), then 2 rows of slot 2.
CHUNK_ROWS = ([7, 8, 9, 10, 11, 40, *range(1150, 1171), 12, 13], [2] * 5 + [0] + [1] * 21 + [2, 2])


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize(("heads", "kv_heads", "dim", "dtype"), SHAPES)
def test_rows_of_one_slot_in_one_call_are_the_decode_steps_one_by_one(path: str, heads: int, kv_heads: int, dim: int,
                                                                      dtype: torch.dtype) -> None:
    """A prefill chunk's rows (one slot, consecutive positions, another sequence's row beside them) in one call give
    the bits of decoding them one step at a time: outputs and every key and value written."""
    runnable(path)
    positions, slots = CHUNK_ROWS
    case = Case(heads, kv_heads, dim, dtype, positions=positions, slots=slots, n_slots=3, max_len=1200)
    together, cache_k, cache_v = case.run(path)
    step_k, step_v = case.cache_k.clone(), case.cache_v.clone()
    for row in range(len(positions)):
        out = attention.decode_attention(case.q[row:row + 1].contiguous(), case.k[row:row + 1].contiguous(),
                                         case.v[row:row + 1].contiguous(), case.cos, case.sin, case.slots[row:row + 1],
                                         case.positions[row:row + 1], step_k, step_v, path)  # type: ignore[arg-type]
        assert torch.equal(out[0], together[row]), f"row {row} differs"
    assert torch.equal(step_k, cache_k) and torch.equal(step_v, cache_v)


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize(("heads", "kv_heads", "dim"), [(32, 32, 128), (6, 3, 24), (4, 2, 64)])
def test_equal_keys_score_alike_wherever_they_fall(path: str, heads: int, kv_heads: int, dim: int) -> None:
    """Keys that are all one key (bf16) score bitwise alike wherever they fall (a path's blocks of several keys or
    its tail of single ones): then every softmax weight is exactly 1 and the output is the plain fp32 sum of the
    values, in order, times 1 / length. (A path that summed a block's keys in another order would fail it.)"""
    runnable(path)
    for pos in (0, 15, 16, 17, 31, 40, 100):
        case = Case(heads, kv_heads, dim, torch.bfloat16, positions=[pos], slots=[1], max_len=128, seed=pos)
        _, written, _ = case.run(path)
        case.cache_k[1, :, :pos + 1] = written[1, :, pos:pos + 1]  # every key [0, pos] is the one the step writes
        out, _, _ = case.run(path)
        values = case.cache_v[1, :, :pos].float()
        values = torch.cat([values, case.v[0].to(torch.bfloat16).float()[:, None]], dim=1)  # [Hkv, pos + 1, D]
        total = torch.zeros(kv_heads, dim)
        for position in range(pos + 1):
            total = total + values[:, position]
        expected = total * (torch.tensor(1.0) / (pos + 1))  # fp32 throughout
        group = heads // kv_heads
        assert torch.equal(out[0], expected.repeat_interleave(group, dim=0)), pos


def test_auto_takes_the_widest_path() -> None:
    assert attention.resolve("auto") == attention.cpu_paths()[-1]
    case = Case(8, 4, 8, torch.bfloat16, positions=[5, 9])
    assert torch.equal(case.run("auto")[0], case.run(attention.resolve("auto"))[0])


def test_bad_slots_and_positions_are_refused_before_any_write() -> None:
    for slots, positions in [([0, 0], [3, 3]), ([0, 5], [3, 4]), ([0, 1], [3, 320]), ([0, -1], [3, 4])]:
        case = Case(8, 4, 8, torch.bfloat16, positions=positions, slots=slots, n_slots=5, max_len=320)
        cache_k = case.cache_k.clone()
        with pytest.raises(ValueError, match="out of range, or a slot twice at one position"):
            attention.decode_attention(case.q, case.k, case.v, case.cos, case.sin, case.slots, case.positions,
                                       cache_k, case.cache_v.clone())
        assert torch.equal(cache_k, case.cache_k)


def test_bad_shapes_and_dtypes_are_refused() -> None:
    case = Case(8, 4, 8, torch.bfloat16, positions=[3])
    with pytest.raises(ValueError, match="do not fit"):
        attention.decode_attention(case.q, case.k[:, :2].contiguous(), case.v, case.cos, case.sin, case.slots,
                                   case.positions, case.cache_k, case.cache_v)
    with pytest.raises(ValueError, match="fp32, bf16, fp16 or int8"):
        attention.decode_attention(case.q, case.k, case.v, case.cos, case.sin, case.slots, case.positions,
                                   case.cache_k.double(), case.cache_v.double())


def test_setting_is_validated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(attention.ENV, "AVX2")
    assert attention.setting() == "avx2"
    monkeypatch.setenv(attention.ENV, "fast")
    with pytest.raises(ValueError, match="INT8SERVE_ATTENTION"):
        attention.setting()


# ---- the model ---------------------------------------------------------------------------------------------------


def decode_logits(model, prompts: list[list[int]]) -> torch.Tensor:
    """Prefill each prompt into its own slot, then one decode step for all of them together: logits [B, V]."""
    cache = model.new_cache(len(prompts) + 1, 48)
    for i, prompt in enumerate(prompts):
        model(torch.tensor([prompt]), cache, [i + 1], [0])
    return model(torch.tensor([[9]] * len(prompts)), cache, list(range(1, len(prompts) + 1)),
                 [len(p) for p in prompts])


PROMPTS = [[1, 403, 407], [1, 403, 407, 261, 378, 100, 20], [1, 5, 77, 12, 499, 300, 20, 8, 9, 10, 11]]


@pytest.mark.parametrize("precision", ["int8", "fp32"])
def test_model_decode_matches_the_torch_path_on_every_path(stories_int8, stories_fp32, precision: str,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    model = (stories_int8 if precision == "int8" else stories_fp32).model  # grouped-query: 8 heads, 4 kv heads
    monkeypatch.setenv(attention.ENV, "torch")
    reference = decode_logits(model, PROMPTS)
    for path in attention.cpu_paths():
        monkeypatch.setenv(attention.ENV, path)
        logits = decode_logits(model, PROMPTS)
        # int8 layers round their outputs to bf16: a last-bit difference in attention moves a logit by a bf16 step
        tolerance = 1e-4 if precision == "fp32" else 2**-6 * reference.abs().max().item()
        assert (logits - reference).abs().max().item() <= tolerance, path
        assert torch.equal(logits.argmax(-1), reference.argmax(-1)), path
        if precision == "int8":  # (fp32 nn.Linear rounds a row by how many rows come with it: not invariant)
            alone = torch.cat([decode_logits(model, [prompt]) for prompt in PROMPTS])
            assert torch.equal(alone, logits), path  # batch invariant on every path


@pytest.fixture
def fresh_load(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """Forget the cached load result for one test (whose environment then decides), and again after."""
    attention._load.cache_clear()
    yield monkeypatch
    monkeypatch.undo()
    attention._load.cache_clear()


def no_compiler(*args: object, **kwargs: object) -> None:
    raise BuildError("no C++ compiler found (set CXX, or install g++)")


def test_without_a_compiler_the_model_keeps_the_torch_path(fresh_load: pytest.MonkeyPatch, stories_int8,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    fresh_load.setenv(attention.ENV, "torch")
    reference = decode_logits(stories_int8.model, PROMPTS)
    fresh_load.setenv(attention.ENV, "auto")
    fresh_load.setattr(attention, "build", no_compiler)  # only this library: the int8 kernels keep theirs
    assert not attention.available()
    assert "no C++ compiler" in (attention.unavailable_reason() or "")
    assert torch.equal(decode_logits(stories_int8.model, PROMPTS), reference)
    decode_logits(stories_int8.model, PROMPTS)
    assert caplog.text.count("attention kernel not available") == 1  # said once


def test_disabled_by_environment(fresh_load: pytest.MonkeyPatch) -> None:
    fresh_load.setenv("INT8SERVE_KERNELS", "0")
    assert not attention.available()
    assert "INT8SERVE_KERNELS=0" in (attention.unavailable_reason() or "")


def test_a_failing_build_leaves_no_library(fresh_load: pytest.MonkeyPatch, tmp_path) -> None:
    fresh_load.setenv("INT8SERVE_CACHE", str(tmp_path))
    fresh_load.setenv("CXX", "/bin/false")
    assert not attention.available()
    assert "BuildError" in (attention.unavailable_reason() or "")
    assert not list(tmp_path.rglob("*.so"))
