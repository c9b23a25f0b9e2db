"""Which weights and numerics a model is, in 16 hex digits, for the response cache's key.

The cache's key named only the card (`@cf/meta/llama-2-7b-chat-int8`), so replicas sharing a Redis — or one server
restarted on new weights, another `--dtype` or `--kv-cache` — served each other's cached answers for up to the TTL:
another model's text. The fingerprint is the same for every replica that loaded the same weights with the same
numerics, and differs otherwise: the config, the precision and KV cache dtype, and each weight's name, shape, dtype
and three samples of its bytes (start, middle, end: a few KiB each, so that a 7B model costs a millisecond, not a
pass over its gigabytes). Weights that differ only outside every sample are not told apart; a new checkpoint or
fine-tune differs everywhere.
"""

from __future__ import annotations

import hashlib
import itertools
import json

import torch

from .model import Transformer

__all__ = ["model_fingerprint"]

SAMPLE_BYTES = 4096


def model_fingerprint(model: Transformer) -> str:
    """`model`'s fingerprint; an object standing in for a Transformer (a test's wrapper) gives what it has."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    numerics = {"class": type(model).__name__, "config": config.to_dict() if config is not None else None,
                "precision": getattr(model, "precision", None), "kv_cache": str(getattr(model, "cache_dtype", None))}
    digest.update(json.dumps(numerics, sort_keys=True).encode("utf-8"))
    if not isinstance(model, torch.nn.Module):
        return digest.hexdigest()[:16]
    tensors = itertools.chain(model.named_parameters(), model.named_buffers())
    for name, tensor in sorted(tensors, key=lambda item: item[0]):
        if tensor is None or tensor.is_meta or tensor.numel() == 0:
            continue
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        data = tensor.detach().reshape(-1).view(torch.uint8) if tensor.is_contiguous() else None
        if data is None:
            continue  # (none of ours: the weights and their packed copies are contiguous)
        size = data.numel()
        for start in sorted({0, size // 2, max(0, size - SAMPLE_BYTES)}):
            digest.update(data[start:start + SAMPLE_BYTES].numpy().tobytes())
    return digest.hexdigest()[:16]
