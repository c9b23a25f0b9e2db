"""`int8serve generate` gives the server's tokens for the same seeded request, with the default settings.

generate prefilled a prompt in plain forwards of up to 512 tokens, the server's engine in aligned chunks of its
--prefill-chunk (128): an int8 layer chooses its kernel by the chunk's rows, and on a Sapphire Rapids (AMX) a short
prompt took our int8 kernel in generate, the bf16 prefill kernel in the server. The prompt's keys and values differed
in their last bits, and seeded replies parted after a while: stories260K's "Once upon a time" at token 117-223 of 256
for seeds 2, 3 and 6 of 1-6, SmolLM2's at token 2 for seed 3 (README: "the same seed gives the server's text").
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from tests.fresh_cache import fresh_cache

from int8serve import cli, server
from int8serve.catalog.registry import Catalog
from int8serve.engine import generate as engine_generate
from int8serve.engine.loader import LoadedModel
from int8serve.engine.model import Transformer
from int8serve.engine.model_cache import cache_folder
from int8serve.engine.packed_checkpoint import save_packed_checkpoint
from int8serve.engine.sampling_params import SamplingParams
from int8serve.engine.scheduler import Engine, GenerationRequest
from int8serve.model_specs import served_model_specs
from int8serve.prompt_templates import template_named
from int8serve.settings import ServeSettings
from int8serve.startup import ServedModel

PROMPT = "Once upon a time"
LONG_PROMPT = "Once upon a time, there was a little girl named Lily. She loved to play outside in the sun. " * 12
SMOLLM2 = "@hf/huggingfacetb/smollm2-135m-instruct"


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The $INT8SERVE_CACHE both the command and the server map their int8 copy from; serve's default settings."""
    for name in ("PREFILL_CHUNK", "SOLO_PREFILL_TOKENS", "KV_CACHE", "PREFIX_CACHE", "PREFIX_CACHE_TOKENS"):
        monkeypatch.delenv(f"INT8SERVE_{name}", raising=False)
    folder = fresh_cache(tmp_path / "cache")
    monkeypatch.setenv("INT8SERVE_CACHE", str(folder))
    return folder


def served_engine(spec: str, source: Path, loaded: LoadedModel) -> Engine:
    """The engine `serve --model spec` starts with its default settings, on `loaded`'s int8 weights."""
    save_packed_checkpoint(loaded, cache_folder(source))  # (quantized once, by the session's fixture)
    (named,) = served_model_specs([spec])
    card = Catalog.load().get(named.name or "")
    engine, _ = server._start_engine(ServeSettings(model=[spec]),
                                     ServedModel(card, template_named(card.prompt_template), source, builtin=False))
    return engine


def generated(spec: str, prompt: str, seed: int, max_tokens: int, monkeypatch: pytest.MonkeyPatch
              ) -> tuple[GenerationRequest, list[int]]:
    """`int8serve generate --raw --seed seed prompt`: the request it ran (prompt ids, sampling) and its tokens."""
    runs: list[tuple[GenerationRequest, list[int]]] = []
    real = engine_generate.generate

    def recorded(model: Transformer, prompt_ids: list[int], params: SamplingParams, limit: int, *args: Any,
                 **kwargs: Any) -> Iterator[int]:
        tokens = list(real(model, prompt_ids, params, limit, *args, **kwargs))
        runs.append((GenerationRequest(list(prompt_ids), limit, params, continues_prompt=True), tokens))
        yield from tokens

    with monkeypatch.context() as patched:
        patched.setattr(engine_generate, "generate", recorded)
        cli.main(["generate", "--model", spec, "--raw", "--seed", str(seed), "--max-tokens", str(max_tokens), prompt])
    (run,) = runs
    return run


def served_tokens(engine: Engine, request: GenerationRequest) -> list[int]:
    events = engine.submit(request).iter_events(timeout=120)
    return [event.token_id for event in events if event.token_id is not None]


# model: its --model, its fixtures (source path, int8 model), (prompt, seeds, tokens a reply) to run. The long prompt
# takes several aligned chunks (in one forward where the engine takes them so: solo_prefill_chunks). SmolLM2 runs the
# seeds up to the one that parted (3): each of its seeds costs ~4 s (the command loads the model every time).
MODELS = {"stories260K": (lambda source: str(source), "stories_hf", "stories_int8",
                          [(PROMPT, range(1, 7), 256), (LONG_PROMPT, range(1, 4), 128)]),
          "SmolLM2": (lambda source: f"{SMOLLM2}={source}", "smollm2_gguf", "smollm2_int8",
                      [(PROMPT, range(1, 4), 96)])}


@pytest.mark.parametrize("model", MODELS)
def test_generate_gives_the_servers_tokens_for_a_seed(model: str, cache: Path, request: pytest.FixtureRequest,
                                                      monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    spec_of, source_fixture, loaded_fixture, runs = MODELS[model]
    source = request.getfixturevalue(source_fixture)
    spec = spec_of(source)
    engine = served_engine(spec, source, request.getfixturevalue(loaded_fixture))
    try:
        for prompt, seeds, max_tokens in runs:
            for seed in seeds:
                asked, tokens = generated(spec, prompt, seed, max_tokens, monkeypatch)
                assert asked.params.seed == seed and len(tokens) > max_tokens // 2
                assert served_tokens(engine, asked) == tokens, f"{model}, {len(asked.prompt_ids)} tokens, seed {seed}"
    finally:
        engine.stop()
    assert "generated tokens" in capsys.readouterr().err  # the command's figures line
