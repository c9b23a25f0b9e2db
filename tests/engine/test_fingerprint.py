"""The model fingerprint in the response cache's key: the same for the same weights and numerics (replicas share
cached answers), different otherwise (a server on other weights under the same card never answers from them)."""

from __future__ import annotations

from pathlib import Path

import torch

from int8serve.engine.fingerprint import model_fingerprint
from int8serve.engine.loader import load_model


def test_the_same_weights_give_the_same_fingerprint_and_anything_else_another(stories_hf: Path) -> None:
    int8, again = load_model(stories_hf, "int8"), load_model(stories_hf, "int8")
    assert model_fingerprint(int8.model) == model_fingerprint(again.model)  # two loads: two replicas
    fp32 = load_model(stories_hf, "fp32")
    seen = {model_fingerprint(int8.model), model_fingerprint(fp32.model)}
    again.model.set_kv_cache("fp16")
    seen.add(model_fingerprint(again.model))
    w1 = fp32.model.layers[2].feed_forward.w1.weight
    with torch.no_grad():
        w1.view(-1)[w1.numel() // 2] += 0.5  # one value of one feed-forward weight, as a fine-tune moves them all
    seen.add(model_fingerprint(fp32.model))
    assert len(seen) == 4
