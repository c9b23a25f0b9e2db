"""Prefill chunks (engine/chunking.py): where they end, and several aligned chunks in one forward computing every row
with the bits the chunks give one by one, on each prefill path this CPU has."""

from __future__ import annotations

import random

import pytest
import torch

from int8serve.engine import int8
from int8serve.engine.chunking import PrefillChunk, aligned_chunk
from int8serve.engine.kernels import matmul as prefill_matmul
from int8serve.engine.loader import LoadedModel
from int8serve.engine.model import Attention


def test_a_chunk_ends_at_the_next_multiple_of_its_size_counted_from_the_prompts_start() -> None:
    assert aligned_chunk(0, 300, 128, 2048) == (128, PrefillChunk(rows=128, keys_end=128))
    assert aligned_chunk(40, 300, 128, 2048) == (128, PrefillChunk(rows=128, keys_end=128))  # after a reused prefix
    assert aligned_chunk(256, 300, 128, 2048) == (300, PrefillChunk(rows=128, keys_end=384))  # the prompt's end
    assert aligned_chunk(256, 300, 128, 320) == (300, PrefillChunk(rows=128, keys_end=320))  # the cache's end
    assert aligned_chunk(0, 300, 128, 2048, row_exact=True)[1].row_exact


def test_several_chunks_end_where_the_last_of_them_would() -> None:
    assert aligned_chunk(0, 1000, 128, 2048, chunks=4) == (512, PrefillChunk(rows=128, keys_end=512))
    assert aligned_chunk(40, 1000, 128, 2048, chunks=2) == (256, PrefillChunk(rows=128, keys_end=256))
    assert aligned_chunk(0, 300, 128, 2048, chunks=4) == (300, PrefillChunk(rows=128, keys_end=384))  # fewer left
    assert aligned_chunk(0, 300, 128, 320, chunks=8) == (300, PrefillChunk(rows=128, keys_end=320))
    with pytest.raises(ValueError, match="chunks must be >= 1, got 0"):
        aligned_chunk(0, 300, 128, 2048, chunks=0)


def test_a_forwards_pieces_are_its_aligned_chunks_each_with_its_own_keys() -> None:
    four = PrefillChunk(rows=128, keys_end=512)
    assert four.pieces(0, 512) == [(0, 128, 128), (128, 128, 256), (256, 128, 384), (384, 128, 512)]
    assert four.pieces(40, 472) == [(0, 88, 128), (88, 128, 256), (216, 128, 384), (344, 128, 512)]
    assert PrefillChunk(rows=128, keys_end=384).pieces(0, 300) == [(0, 128, 128), (128, 128, 256), (256, 44, 384)]
    assert PrefillChunk(rows=128, keys_end=320).pieces(256, 44) == [(0, 44, 320)]  # capped by the cache
    assert PrefillChunk(rows=128, keys_end=128).pieces(5, 1) == [(0, 1, 128)]


def test_a_calls_rows_are_placed_at_their_offsets_in_their_aligned_chunks() -> None:
    """A call's rows are the last ones of each sequence's in the forward: all of them, or the last alone."""
    chunk = PrefillChunk(rows=128, keys_end=256, ends=(82,))
    assert chunk.placements(65) == [(0, 65, 17)] and chunk.placements(1) == [(0, 1, 81)]
    assert PrefillChunk(rows=128, keys_end=256, ends=(200,)).placements(160) == [(0, 88, 40), (88, 72, 0)]
    assert PrefillChunk(rows=64, keys_end=64, ends=(30, 50)).placements(20) == [(0, 10, 20), (10, 10, 40)]
    with pytest.raises(ValueError, match="3 rows for 2 sequences"):
        PrefillChunk(rows=64, keys_end=64, ends=(30, 50)).placements(3)


def prefill(model: torch.nn.Module, tokens: list[int], chunk: int, chunks: int, reused: int = 0
            ) -> tuple[torch.Tensor, object]:
    """Prefill `tokens` into slot 1 as the scheduler would (`reused` tokens first, as a prefix-cache hit leaves the
    rest), `chunks` aligned chunks a forward: (the last logits, the cache)."""
    cache = model.new_cache(2, 512)
    row_exact = model.row_exact_prefill(chunk, 4)
    done, logits = 0, None
    if reused:
        end, how = aligned_chunk(0, reused, chunk, cache.max_seq_len, row_exact=row_exact)
        model(torch.tensor([tokens[:end]]), cache, [1], [0], prefill=how)
        done = end
    while done < len(tokens):
        end, how = aligned_chunk(done, len(tokens), chunk, cache.max_seq_len, row_exact=row_exact, chunks=chunks)
        logits = model(torch.tensor([tokens[done:end]]), cache, [1], [done], prefill=how)
        done = end
    return logits, cache


def assert_same_prefill(model: torch.nn.Module, tokens: list[int], chunk: int, chunks: int, reused: int) -> None:
    one_by_one, together = (prefill(model, tokens, chunk, n, reused) for n in (1, chunks))
    assert torch.equal(one_by_one[0], together[0]), "last logits differ"
    for layer in range(model.config.n_layers):
        for name in ("k", "v"):
            mine, theirs = (getattr(cache, name)[layer][1, :, :len(tokens)] for cache in (one_by_one[1], together[1]))
            assert torch.equal(mine, theirs), f"layer {layer}'s {name} differ"


# INT8SERVE_PREFILL_MATMUL: each setting's prefill path on this CPU (the default; the bf16 kernel where the CPU has
# it, else the default; one int8 pass a row; decode's arithmetic for every chunk on AMX)
SETTINGS = ["auto", "bf16", "int8", "row-exact"]


@pytest.mark.parametrize("setting", SETTINGS)
@pytest.mark.parametrize("chunk", [16, 64])  # within our int8 kernel's rows on every path, and past them on amx
@pytest.mark.parametrize("reused", [0, 23])
def test_chunks_in_one_forward_give_the_bits_of_one_by_one(stories_int8: LoadedModel, monkeypatch: pytest.MonkeyPatch,
                                                           setting: str, chunk: int, reused: int) -> None:
    monkeypatch.setenv(prefill_matmul.ENV, setting)
    model = stories_int8.model
    path = "our int8 kernel" if int8.kernel_takes(chunk) else "the bf16 kernel" if prefill_matmul.takes(chunk) else \
        "the dense path"
    assert model.prefill_rows_independent(chunk), f"{setting}, {chunk}-row chunks on {path}"
    tokens = [random.Random(chunk).randint(3, 500) for _ in range(250)]
    assert_same_prefill(model, tokens, chunk, chunks=3, reused=reused)


def test_the_real_chat_models_chunks_in_one_forward_give_the_same_bits(smollm2_int8: LoadedModel) -> None:
    model = smollm2_int8.model
    assert model.prefill_rows_independent(64)
    assert_same_prefill(model, [random.Random(1).randint(3, 40000) for _ in range(300)], 64, chunks=4, reused=40)


# Prefill paths that are not row-exact (their attention is SDPA's over each chunk, not the decode kernel's per row) but
# compute each row on its own, so that several chunks go in one forward: one int8 pass a row on every CPU with our
# int8 kernel, the bf16 kernel where the CPU has it (elsewhere INT8SERVE_PREFILL_MATMUL=bf16 leaves prefill row-exact)
@pytest.mark.parametrize("setting", ["int8", "bf16"])
def test_each_chunk_of_a_forward_attends_as_its_own_forward_would(stories_int8: LoadedModel, setting: str,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The same attention calls (queries, keys, first position, the aligned chunk's rows) whether the chunks go one by
    one or together: SDPA's bits may depend on how many queries and keys it is given (chunking.py), so a forward never
    merges them, and each call places its queries among the chunk's rows."""
    if setting == "bf16" and not prefill_matmul.available():
        pytest.skip(f"this CPU has no bf16 prefill kernel: {prefill_matmul.unavailable_reason()}")
    calls: list[tuple[int, int, int, int | None]] = []
    original = Attention._prefill_attention

    def recorded(self: Attention, queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int,
                 chunk_rows: int | None = None) -> torch.Tensor:
        calls.append((queries.shape[0], keys.shape[1], start, chunk_rows))
        return original(self, queries, keys, values, start, chunk_rows)

    monkeypatch.setattr(Attention, "_prefill_attention", recorded)
    monkeypatch.setenv(prefill_matmul.ENV, setting)
    model, tokens = stories_int8.model, list(range(3, 203))
    assert not model.row_exact_prefill(64, 4) and model.prefill_rows_independent(64), setting
    seen = []
    for chunks in (1, 4):
        calls.clear()
        prefill(model, tokens, 64, chunks, reused=10)
        seen.append(list(calls))
    # the reused prefix's chunk, then [10, 64), [64, 128), [128, 192), [192, 200), each with its aligned keys; one by
    # one layer after layer for each chunk, together each layer's four in turn
    expected = [(10, 64, 0, 64), (54, 64, 10, 64), (64, 128, 64, 64), (64, 192, 128, 64),
                (8, 256, 192, 64)] * model.config.n_layers
    assert sorted(seen[0]) == sorted(seen[1]) == sorted(expected)


def test_the_dense_path_takes_one_chunk_a_forward(stories_int8: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """INT8SERVE_PREFILL_MATMUL=dense: chunks past our int8 kernel's rows dequantize for oneDNN, which may round a row
    by the rows with it (its AMX kernels do): the model does not claim row independence, and the engine takes one
    chunk a step."""
    monkeypatch.setenv(prefill_matmul.ENV, "dense")
    assert not int8.kernel_takes(64) and not prefill_matmul.takes(64)
    assert not stories_int8.model.prefill_rows_independent(64)
    assert stories_int8.model.prefill_rows_independent(16)  # within our int8 kernel's rows: still its path


def test_reference_models_take_one_chunk_a_forward(stories_fp32: LoadedModel) -> None:
    assert not stories_fp32.model.prefill_rows_independent(16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_query_attends_with_the_same_bits_wherever_its_call_starts_and_ends(smollm2_int8: LoadedModel,
                                                                              dtype: torch.dtype) -> None:
    """A prefill call's queries are those of its aligned chunk that the prefix cache did not supply and the prompt
    has: any run of its rows. Each row must come out with the bits it has in the whole chunk's call. SDPA rounds a
    query by the size of the block of queries it multiplies it in (on an AMD Zen 5, fp32 blocks of 1-3 rows unlike
    those of 4 or more), so the call places its queries among the chunk's rows (SmolLM2's 64-wide heads, 9 of them
    over 3 key heads)."""
    attention: Attention = smollm2_int8.model.layers[0].attention
    chunk, start = 128, 256  # the third aligned chunk of a prompt: keys [0, 384)
    generator = torch.Generator().manual_seed(0)
    queries = torch.randn(chunk, attention.n_heads, attention.head_dim, generator=generator).to(dtype)
    keys, values = (torch.randn(attention.n_kv_heads, start + chunk, attention.head_dim, generator=generator)
                    .to(dtype) for _ in range(2))
    whole = attention._prefill_attention(queries, keys, values, start, chunk)
    rng = random.Random(0)
    runs = [(first, count) for first in (0, 1, 17, 31, 32, 63, 64, 100, 125) for count in (1, 2, 3, 4, 5, 33)
            if first + count <= chunk] + [(rng.randrange(chunk), 0) for _ in range(20)]
    for first, count in runs:
        count = count or rng.randint(1, chunk - first)
        part = attention._prefill_attention(queries[first:first + count], keys, values, start + first, chunk)
        assert torch.equal(part, whole[first:first + count]), f"rows [{first}, {first + count}) of the chunk"
