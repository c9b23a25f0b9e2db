"""The prefix cache's store: blocks keyed by their whole prefix, copied in and out of slots, bounded, least recently
used first (its use by the scheduler, and exactness, are in test_scheduler.py)."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from int8serve.engine import int8, kernels
from int8serve.engine.chunking import aligned_chunk
from int8serve.engine.config import ModelConfig
from int8serve.engine.int8 import kernel_rows
from int8serve.engine.kernels import matmul as prefill_matmul
from int8serve.engine.loader import LoadedModel
from int8serve.engine.model import KVCache
from int8serve.engine.prefix_cache import PUBLIC, PrefixCache
from int8serve.engine.sampling_params import SamplingParams
from int8serve.engine.scheduler import Engine, GenerationRequest
from int8serve.engine.tokenizer import Tokenizer

CONFIG = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, hidden_dim=64, max_seq_len=128)
B = 4  # tokens per block


def filled_cache(slots: int = 2) -> KVCache:
    cache = KVCache(CONFIG, slots, 64, torch.float16)
    for layer in range(CONFIG.n_layers):
        cache.k[layer].copy_(torch.randn_like(cache.k[layer], dtype=torch.float32).half())
        cache.v[layer].copy_(torch.randn_like(cache.v[layer], dtype=torch.float32).half())
    return cache


def test_a_shared_prefix_is_found_to_the_token_and_copied_exactly() -> None:
    prefix = PrefixCache(CONFIG, torch.float16, capacity_tokens=64, block_tokens=B)
    cache = filled_cache()
    prompt = list(range(1, 15))  # 3 full blocks and 2 tokens
    prefix.store(prompt, cache, slot=0, computed=len(prompt))
    assert prefix.cached_tokens == 12 and prefix.stats.stored_blocks == 3  # the partial block only when final
    other = [*prompt[:9], 60, 61, 62, 63]  # shares 2 full blocks (8 tokens) and one token of the third
    hit = prefix.lookup(other, limit=len(other) - 1)
    assert (hit.tokens, len(hit.blocks), hit.tail) == (9, 3, 1)
    cache.k[0][1].zero_()
    prefix.load(hit, cache, slot=1)
    for layer in range(CONFIG.n_layers):
        assert torch.equal(cache.k[layer][1, :, :9], cache.k[layer][0, :, :9])
        assert torch.equal(cache.v[layer][1, :, :9], cache.v[layer][0, :, :9])
    assert not cache.k[0][1, :, 9:12].any()  # only the matching positions of the last block are copied
    assert prefix.lookup([2, *prompt[1:]], limit=20).tokens == 0  # a different first token: nothing in common
    assert prefix.lookup(prompt, limit=10).tokens == 10  # at most `limit` tokens: the last one is always computed


def test_blocks_are_stored_once_full_and_the_last_when_the_prompt_is_done() -> None:
    prefix = PrefixCache(CONFIG, torch.float16, capacity_tokens=64, block_tokens=B)
    cache = filled_cache()
    prompt = list(range(1, 20))
    prefix.store(prompt, cache, slot=0, computed=6)  # a prefill chunk so far: 1 full block
    assert prefix.cached_tokens == 4
    prefix.store(prompt, cache, slot=0, computed=19, final=True)  # the rest, and its last 3 tokens
    prefix.store(prompt, cache, slot=1, computed=19, final=True)  # another sequence, same prompt: nothing new
    assert prefix.cached_tokens == 19 and prefix.stats.stored_blocks == 5
    longer = [*prompt, 40, 41, 42]  # continues the whole prompt: all of it is reused, the partial block too
    assert prefix.lookup(longer, limit=len(longer) - 1).tokens == 19


def test_least_recently_used_chains_go_first_descendants_before_ancestors() -> None:
    prefix = PrefixCache(CONFIG, torch.float16, capacity_tokens=4 * B, block_tokens=B)
    cache = filled_cache()
    a = [1] * B + [2] * B + [3] * B  # 3 blocks
    b = [9] * B  # 1 block
    prefix.store(a, cache, 0, len(a))
    prefix.store(b, cache, 1, len(b))
    assert prefix.cached_tokens == 4 * B
    prefix.lookup(b, limit=B)  # b is the most recent
    c = [7] * (2 * B)
    prefix.store(c, cache, 1, len(c))  # needs 2 blocks: a's last two go (its descendants), not its first
    assert prefix.stats.evicted_blocks == 2
    assert prefix.lookup(a, limit=len(a)).tokens == B
    assert prefix.lookup(b, limit=B).tokens == B and prefix.lookup(c, limit=len(c)).tokens == 2 * B


def test_the_index_stays_within_the_capacity_however_many_prompts_pass() -> None:
    """Distinct prompts, as a server sees over weeks: the blocks stay at capacity, and so does the index of which
    blocks continue which chain (it kept an empty entry for every chain ever evicted)."""
    prefix = PrefixCache(CONFIG, torch.float16, capacity_tokens=8 * B, block_tokens=B)
    cache = filled_cache()
    rng = random.Random(0)
    for _ in range(500):
        prompt = [rng.randrange(1, 64) for _ in range(rng.randint(B, 40))]
        prefix.lookup(prompt, limit=len(prompt) - 1)
        prefix.store(prompt, cache, 0, len(prompt), final=True)
    assert prefix.stats.evicted_blocks > 1000
    assert len(prefix._blocks) <= 8 and 0 < len(prefix._children) <= 8


def test_a_block_is_reused_only_by_owners_that_computed_it_or_when_public() -> None:
    """Accounts are isolated: another account's cached prompt is neither found (cached tokens, speed) nor copied."""
    prefix = PrefixCache(CONFIG, torch.float16, capacity_tokens=64, block_tokens=B)
    cache = filled_cache()
    secret = list(range(1, 15))
    prefix.store(secret, cache, slot=0, computed=len(secret), final=True, owner="alice")
    assert prefix.lookup(secret, limit=13, owner="alice").tokens == 13
    assert prefix.lookup(secret, limit=13, owner="mallory").tokens == 0  # neither whole blocks nor a partial one
    assert prefix.lookup(secret[:6], limit=6, owner="mallory").tokens == 0
    assert prefix.lookup(secret, limit=13).tokens == 0  # the engine's default owner is an owner too
    stored = prefix.stats.stored_blocks
    prefix.store(secret, cache, slot=1, computed=8, owner="bob")  # bob computed the first two blocks himself
    assert prefix.stats.stored_blocks == stored  # the same keys and values: one copy, now bob's as well
    assert prefix.lookup(secret, limit=13, owner="bob").tokens == 8
    assert prefix.lookup(secret, limit=13, owner="alice").tokens == 13
    system = [50, 51, 52, 53, 54, 55]
    prefix.store(system, cache, slot=0, computed=6, final=True, owner=PUBLIC)  # the card's default system prompt
    assert all(prefix.lookup([*system, 9], limit=6, owner=who).tokens == 6 for who in ("alice", "mallory", ""))
    prefix.store([*system, 7, 7, 7], cache, slot=0, computed=9, final=True, owner="alice")
    assert prefix.lookup([*system, 7, 7, 7, 1], limit=9, owner="mallory").tokens == 6  # the public part only
    assert prefix.lookup([*system, 7, 7, 7, 1], limit=9, owner="alice").tokens == 9


def test_capacity_below_one_block_is_refused() -> None:
    with pytest.raises(ValueError):
        PrefixCache(CONFIG, torch.float16, capacity_tokens=3, block_tokens=B)


# --- the scheduler with a prefix cache: exact ----------------------------------------------------------------------


class Recording:
    """The model, noting the logits of every forward (one request at a time: they are that request's)."""

    def __init__(self, model: Any) -> None:
        self.model, self.config, self.logits = model, model.config, []

    def new_cache(self, *args: Any, **kwargs: Any) -> Any:
        return self.model.new_cache(*args, **kwargs)

    def row_exact_prefill(self, prefill_chunk: int, max_slots: int) -> bool:
        return self.model.row_exact_prefill(prefill_chunk, max_slots)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.model(*args, **kwargs)
        self.logits.append(out.clone())
        return out


def run_alone(engine: Engine, prompt: list[int], params: SamplingParams, max_tokens: int = 6
              ) -> tuple[list[int], list[torch.Tensor], int]:
    """Token ids, every logits row computed for the request, and its prompt tokens reused from the cache."""
    model: Recording = engine.model  # type: ignore[assignment]
    model.logits.clear()
    handle = engine.submit(GenerationRequest(prompt, max_tokens, params))
    events = []
    while not events or events[-1].finish_reason is None:
        engine.step()
        events += list(_drain(handle))
    ids = [e.token_id for e in events if e.token_id is not None]
    return ids, list(model.logits), events[-1].cached_tokens


def _drain(handle: Any) -> Any:
    while not handle._sync_queue.empty():
        yield handle._sync_queue.get()


def engine_for(loaded: LoadedModel, tokenizer: Tokenizer, prefix_tokens: int | None, chunk: int = 32) -> Engine:
    prefix = PrefixCache(loaded.model.config, loaded.model.cache_dtype, prefix_tokens) if prefix_tokens else None
    return Engine(Recording(loaded.model), tokenizer, max_slots=4, max_seq_len=512, prefill_chunk=chunk,  # type: ignore
                  prefix_cache=prefix)


STORY = "Once upon a time there was a little girl named Lily. She loved to play in the park with her dog. "


OTHER = "The big brown dog ran after the red ball in the garden, and the cat watched him from the tree. "


def prompts(tokenizer: Tokenizer) -> list[list[int]]:
    base = tokenizer.encode(STORY * 2, bos=True)
    other = tokenizer.encode(OTHER * 2, bos=True)  # another prefix: a small cache must evict for it
    return [base + tokenizer.encode(tail) for tail in ("One day", "The sun was hot and", "Tom came")] + [
        base[:70], other]


@pytest.fixture(params=["bf16", "fp16", "int8"])
def kv_cache(request: pytest.FixtureRequest, stories_int8: LoadedModel) -> Iterator[str]:
    """stories260K's KV caches (and so the prefix cache's blocks) in bf16, in fp16, then as int8 rows (kv_int8.py)."""
    stories_int8.model.set_kv_cache(request.param)
    try:
        yield request.param
    finally:
        stories_int8.model.set_kv_cache("bf16")  # (a fixture of the whole session)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0), SamplingParams(temperature=0.9, top_p=0.9, seed=7)])
def test_logits_and_tokens_are_the_same_bits_with_the_cache_cold_warm_and_evicted(
        stories_int8: LoadedModel, stories_tokenizer: Tokenizer, params: SamplingParams, kv_cache: str) -> None:
    plain = engine_for(stories_int8, stories_tokenizer, None)
    cached = engine_for(stories_int8, stories_tokenizer, 512)
    tiny = engine_for(stories_int8, stories_tokenizer, 64)  # 4 blocks: evicts as it goes
    reused = []
    for prompt in [*prompts(stories_tokenizer), *prompts(stories_tokenizer)]:  # cold, then warm
        want_ids, want_logits, none = run_alone(plain, prompt, params)
        assert none == 0
        for engine in (cached, tiny):
            ids, logits, from_cache = run_alone(engine, prompt, params)
            assert ids == want_ids
            # from the end: the decode steps and the prefill chunks both runs computed (a reused prefix skips the
            # first ones)
            assert len(logits) >= len(ids) and len(logits) == len(want_logits) - from_cache // 32
            tail = len(logits)
            assert all(torch.equal(a, b) for a, b in zip(logits, want_logits[-tail:], strict=True)), "logits differ"
            reused.append(from_cache)
    assert max(reused) >= 64 and cached.prefilled_tokens < plain.prefilled_tokens
    assert tiny.prefix_cache is not None and tiny.prefix_cache.stats.evicted_blocks > 0
    assert cached.prefix_cache is not None and cached.prefix_cache.k[0].dtype == stories_int8.model.cache_dtype


def test_a_prefix_shared_by_concurrent_requests(stories_int8: LoadedModel, stories_tokenizer: Tokenizer) -> None:
    """Four requests with one long prefix, admitted together: they take turns at prefill, a chunk each, and each
    reuses the blocks the others prefilled a step before, so the common prefix is computed once between them (as
    many tokens reused as when the later ones reuse all that the first prefilled); every answer equals the one
    computed without the cache."""
    greedy = SamplingParams(temperature=0)
    plain = engine_for(stories_int8, stories_tokenizer, None)
    shared = prompts(stories_tokenizer)[:4]
    want = [run_alone(plain, p, greedy, max_tokens=20)[0] for p in shared]
    cached = engine_for(stories_int8, stories_tokenizer, 512)
    handles = [cached.submit(GenerationRequest(p, 20, greedy)) for p in shared]
    events: list[list[Any]] = [[] for _ in handles]
    while not all(e and e[-1].finish_reason is not None for e in events):
        cached.step()
        for got, handle in zip(events, handles, strict=True):
            got += list(_drain(handle))
    assert [[e.token_id for e in got if e.token_id is not None] for got in events] == want
    first = shared[0]
    common = [next((i for i, (a, b) in enumerate(zip(first, p, strict=False)) if a != b), min(len(first), len(p)))
              for p in shared[1:]]
    expected = [min(n, len(p) - 1) for n, p in zip(common, shared[1:], strict=True)]  # to the token
    reused = [got[-1].cached_tokens for got in events]
    assert sum(reused) == sum(expected) and min(expected) >= 48 and all(n > 0 for n in reused)
    assert cached.prefilled_tokens == sum(len(p) for p in shared) - sum(expected)


def test_warming_the_default_system_prompt(stories_int8: LoadedModel, stories_tokenizer: Tokenizer) -> None:
    engine = engine_for(stories_int8, stories_tokenizer, 512)
    system = prompts(stories_tokenizer)[0][:50]
    assert engine.warm(system) == 50  # all of it, to the token
    stats = engine.prefix_cache.stats  # type: ignore[union-attr]
    assert (stats.hits, stats.reused_tokens) == (0, 0)  # the warm-up is no request's hit (it was: found by an audit)
    _ids, _logits, reused = run_alone(engine, prompts(stories_tokenizer)[0], SamplingParams(temperature=0))
    assert reused == 50
    assert (stats.hits, stats.reused_tokens) == (1, 50)


def test_a_prefix_that_leaves_no_room_in_the_context_is_not_warmed(stories_int8: LoadedModel,
                                                                     stories_tokenizer: Tokenizer,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Found by an audit: warming a default system prompt longer than the context window prefilled past the KV cache
    ("position 128 exceeds the KV cache's 100") and stopped the server's start. A prefix that leaves no room for one
    more prompt token and one generated token is skipped, and the log says so."""
    prompt = stories_tokenizer.encode(STORY * 4, bos=True)
    engine = Engine(stories_int8.model, stories_tokenizer, max_slots=2, max_seq_len=64, prefill_chunk=32,
                    prefix_cache=PrefixCache(stories_int8.model.config, stories_int8.model.cache_dtype, 256))
    with caplog.at_level("INFO", logger="int8serve.engine.scheduler"):
        assert engine.warm(prompt[:100]) == 0  # past the context window
        assert engine.warm(prompt[:63]) == 0  # fits, but no prompt that starts with it does
    assert [r.getMessage() for r in caplog.records] == [
        f"prefix cache: not warming the {n} tokens every templated prompt starts with: they leave no room for a "
        "prompt and its reply in the context of 64 tokens" for n in (100, 63)]
    assert engine.prefix_cache is not None and engine.prefix_cache.cached_tokens == 0
    assert engine.warm(prompt[:62]) == 62  # room for one more prompt token and one generated


def test_accounts_do_not_reuse_each_others_prompts_but_all_reuse_the_warmed_one(
        stories_int8: LoadedModel, stories_tokenizer: Tokenizer) -> None:
    """Found by an audit: an account learned another's prompt word by word from its cached-token count."""
    engine = engine_for(stories_int8, stories_tokenizer, 512)
    system, prompt = prompts(stories_tokenizer)[0][:40], prompts(stories_tokenizer)[0]
    engine.warm(system)

    def reused(owner: str) -> tuple[list[int], int]:
        handle = engine.submit(GenerationRequest(prompt, 6, SamplingParams(temperature=0), owner=owner))
        events: list[Any] = []
        while not events or events[-1].finish_reason is None:
            engine.step()
            events += list(_drain(handle))
        return [e.token_id for e in events if e.token_id is not None], events[-1].cached_tokens

    first, none = reused("alice")
    assert none == 40  # the public system prompt only
    assert reused("alice")[1] == len(prompt) - 1  # her own prompt, to its last token
    assert reused("mallory") == (first, 40)  # the same answer, without alice's blocks
    assert reused("mallory")[1] == len(prompt) - 1  # once computed for himself, his own


def test_prompts_of_any_length_share_their_prefix_exactly(stories_int8: LoadedModel,
                                                          stories_tokenizer: Tokenizer) -> None:
    """With chunks of 128 (the server's default), a short prompt stores blocks that a long one reuses, and the reverse:
    the layers choose their kernel by the chunk size, not by where each prompt ends (a 22-token prompt choosing int8
    activations and a 71-token one the dense path computed their shared positions differently)."""
    greedy = SamplingParams(temperature=0)
    rng = random.Random(0)
    plain = engine_for(stories_int8, stories_tokenizer, None, chunk=128)
    cached = engine_for(stories_int8, stories_tokenizer, 2048, chunk=128)
    reused = []
    for short, long in ((20, 70), (70, 20), (10, 150), (150, 30), (5, 12)):
        first = [1] + [rng.randint(3, 500) for _ in range(short)]
        shared = rng.randint(4, short)
        second = first[:shared] + [rng.randint(3, 500) for _ in range(long)]
        for prompt in (first, second):
            want_ids, want_logits, _ = run_alone(plain, prompt, greedy, max_tokens=3)
            ids, logits, from_cache = run_alone(cached, prompt, greedy, max_tokens=3)
            assert ids == want_ids
            assert all(torch.equal(a, b) for a, b in zip(logits, want_logits[-len(logits):], strict=True)), \
                f"logits differ: {len(prompt)} tokens, {from_cache} from the cache"
        reused.append(from_cache)
    assert min(reused) >= 4


# INT8SERVE_PREFILL_MATMUL=dense, and the default where our bf16 kernel is not available: the dense path on AMX CPUs,
# our int8 kernel's row-exact GEMM on the others
DENSE_PATHS = ["dense", "auto without the bf16 kernel"]


@pytest.mark.parametrize("setting", DENSE_PATHS)
def test_the_dense_path_gives_the_same_bits_whatever_prefix_the_cache_held(
        smollm2_int8: LoadedModel, smollm2_tokenizer: Tokenizer, setting: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by an audit on a Sapphire Rapids: with INT8SERVE_PREFILL_MATMUL=dense, SmolLM2's answer to a chat's next
    turn changed with the prefix cache (5 of 6 prompts gave other first logits). oneDNN's bf16 matmul on AMX rounds a
    row by how many come with it, and a cached prefix removes rows from the front of the aligned chunk: the dense path
    must compute a chunk's rows as the whole aligned chunk would (chunking.py). SmolLM2, whose 576-wide layers show it
    (stories260K's 64-wide ones do not). On an AMD Zen 5 the dense path's answers changed with the cache too: SDPA
    rounded a query by the size of its block of queries (1-3 rows against 4 or more), which the cache changed."""
    if setting == "dense":
        monkeypatch.setenv(prefill_matmul.ENV, "dense")
        assert not int8.kernel_takes(128)  # the chunks dequantize for oneDNN
    else:
        monkeypatch.setattr(prefill_matmul, "_load", lambda: "not built (the test's)")
    assert not prefill_matmul.takes(128)
    greedy, rng = SamplingParams(temperature=0), random.Random(5)
    plain = engine_for(smollm2_int8, smollm2_tokenizer, None, chunk=128)
    for length, reused in ((82, 17), (82, 16), (60, 30), (200, 150), (120, 3), (140, 139)):
        prompt = [1] + [rng.randint(3, 40000) for _ in range(length - 1)]
        want_ids, want_logits, _ = run_alone(plain, prompt, greedy, max_tokens=1)
        cached = engine_for(smollm2_int8, smollm2_tokenizer, 8192, chunk=128)
        assert cached.warm(prompt[:reused]) == reused
        ids, logits, from_cache = run_alone(cached, prompt, greedy, max_tokens=1)
        assert from_cache == reused
        assert torch.equal(logits[-1], want_logits[-1]), f"{length} tokens, {reused} from the cache: logits differ"
        assert ids == want_ids


# --- a reply's own tokens (row-exact prefill) -----------------------------------------------------------------------


def test_prefill_with_one_int8_pass_is_not_row_exact(stories_int8: LoadedModel, monkeypatch: pytest.MonkeyPatch
                                                    ) -> None:
    """INT8SERVE_PREFILL_MATMUL=int8 gives our kernel every prefill call, but with one int8 pass a row where decode
    takes two: its chunks are not what decode computes, so the prefix cache must not keep replies."""
    monkeypatch.setenv(prefill_matmul.ENV, "int8")
    assert kernel_rows() == int8.ALL_ROWS
    assert not stories_int8.model.row_exact_prefill(32, 4)


@pytest.mark.parametrize(("path", "chunk"), [(None, 32), ("avx2", 32), ("avxvnni", 32), ("amx", 128)])
def test_decode_writes_the_keys_and_values_prefill_would(stories_int8: LoadedModel, path: str | None, chunk: int,
                                                          kv_cache: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Row-exact prefill: a prompt prefilled in chunks, and the same tokens decoded one step at a time after a short
    prefill (beside another sequence), leave the same bits in every layer's cache, and give the same logits. On this
    CPU's own kernel path, on the two whose kernel takes every prefill chunk as a GEMM on 16-bit rows, and on the amx
    path with INT8SERVE_PREFILL_MATMUL=row-exact, whose 128-row chunks go through its AMX-INT8 GEMM."""
    if path is not None:
        if not kernels.cpu_has(path):
            pytest.skip(f"this CPU lacks the {path} path")
        monkeypatch.setenv(kernels.ENV_PATH, path)
        if path == "amx":
            monkeypatch.setenv(prefill_matmul.ENV, "row-exact")
        assert kernel_rows() > 128  # every chunk through our kernel
    model = stories_int8.model
    assert model.row_exact_prefill(32, 4) == (kernel_rows() >= 32)  # 32, or 128 with row-exact prefill
    if not model.row_exact_prefill(32, 4):  # this CPU's prefill takes the dense path: nothing to compare
        assert not model.row_exact_prefill(kernel_rows() * 2, 1)
        return
    rng = random.Random(3)
    tokens = [1] + [rng.randint(3, 500) for _ in range(150)]
    prefilled, stepped = model.new_cache(2, 256), model.new_cache(2, 256)
    want = _prefill(model, tokens, prefilled, slot=0, upto=len(tokens), chunk=chunk, all_logits=True)
    _prefill(model, tokens, stepped, slot=1, upto=40)
    for position in range(40, len(tokens)):
        other = rng.randint(3, 500)  # a second sequence decoding in slot 0 of the same step
        logits = model(torch.tensor([[other], [tokens[position]]]), stepped, [0, 1], [position - 40, position])
        assert torch.equal(logits[1], want[position]), f"logits differ at position {position}"
    for layer in range(model.config.n_layers):
        assert torch.equal(prefilled.k[layer][0, :, :len(tokens)], stepped.k[layer][1, :, :len(tokens)])
        assert torch.equal(prefilled.v[layer][0, :, :len(tokens)], stepped.v[layer][1, :, :len(tokens)])
    assert not model.row_exact_prefill(kernel_rows() * 2, 4)  # chunks the kernel does not take: the dense path


def _prefill(model: Any, tokens: list[int], cache: KVCache, slot: int, upto: int, chunk: int = 32,
             all_logits: bool = False) -> torch.Tensor:
    """Prefill tokens[:upto] into `slot` row-exact, in chunks as the engine cuts them: the logits of every row."""
    done, logits = 0, []
    while done < upto:
        end, how = aligned_chunk(done, upto, chunk, cache.max_seq_len, row_exact=True)
        out = model(torch.tensor([tokens[done:end]]), cache, [slot], [done], all_logits=all_logits, prefill=how)
        logits += list(out[0]) if all_logits else [out[0]]
        done = end
    return torch.stack(logits)


@pytest.mark.parametrize("params", [SamplingParams(temperature=0), SamplingParams(temperature=0.9, top_p=0.9, seed=7)])
@pytest.mark.parametrize("chunk", [32, 128, 256])
def test_the_next_turn_reuses_the_reply_exactly(stories_int8: LoadedModel, stories_tokenizer: Tokenizer,
                                                params: SamplingParams, chunk: int) -> None:
    """A 3-turn conversation resent whole each turn, token by token: with row-exact prefill (every chunk size where
    our kernel takes every call: CPUs without AMX; on AMX CPUs chunks of 32, or any with
    INT8SERVE_PREFILL_MATMUL=row-exact) each turn reuses the previous prompt and all of its reply that is in the cache
    (every generated token but the last); with chunks the kernel does not take (128 and 256 on AMX CPUs by default:
    the bf16 kernel) only prompts are reused. Either way every
    token and every logits row equals the no-cache engine's, bit for bit, though another request ran beside turn 1."""
    plain = engine_for(stories_int8, stories_tokenizer, None, chunk=chunk)
    cached = engine_for(stories_int8, stories_tokenizer, 2048, chunk=chunk)
    replies_cached = cached.row_exact_prefill
    assert replies_cached == (kernel_rows() >= chunk)
    conversation = stories_tokenizer.encode(STORY, bos=True)
    # turn 1 decodes beside another request (its reply's keys and values come from batched decode steps)
    prompt = conversation + stories_tokenizer.encode("Tom came")
    want_ids, _, _ = run_alone(plain, prompt, params, max_tokens=12)
    handles = [cached.submit(GenerationRequest(p, n, params))
               for p, n in ((prompt, 12), (stories_tokenizer.encode(OTHER, bos=True), 30))]
    events: list[list[Any]] = [[], []]
    while not all(e and e[-1].finish_reason is not None for e in events):
        cached.step()
        for got, handle in zip(events, handles, strict=True):
            got += list(_drain(handle))
    ids = [e.token_id for e in events[0] if e.token_id is not None]
    assert ids == want_ids and len(ids) == 12
    previous_prompt, conversation = len(prompt), prompt + ids
    for turn, said in enumerate(("The sun was hot and", "One day"), 2):
        prompt = conversation + stories_tokenizer.encode(said)
        want_ids, want_logits, _ = run_alone(plain, prompt, params, max_tokens=12)
        ids, logits, reused = run_alone(cached, prompt, params, max_tokens=12)
        assert ids == want_ids
        assert all(torch.equal(a, b) for a, b in zip(logits, want_logits[-len(logits):], strict=True)), \
            f"turn {turn}: logits differ"
        # the reply's last token was sampled but never fed back: it is not in the cache
        assert reused == (len(conversation) - 1 if replies_cached else previous_prompt), (turn, reused)
        previous_prompt, conversation = len(prompt), prompt + ids
