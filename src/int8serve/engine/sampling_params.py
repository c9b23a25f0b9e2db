"""A request's sampling parameters, checked: what the HTTP layer parses into and the engine samples by.

Apart from `sampling.py` (which draws tokens with torch) so that the service layer and the command line can build
and check them without importing torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["MAX_SEED", "SamplingParams"]

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.6  # Workers AI's default for this model
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    repetition_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None  # None = a fresh random seed per request
    stop: tuple[str, ...] = ()  # stop strings: generation ends before the first one in the text (`stops.py`)

    def __post_init__(self) -> None:
        # an infinite or NaN value reaches the logits as inf or NaN: softmax gives NaN and sampling fails mid-way
        checks = [
            (math.isfinite(self.temperature) and self.temperature >= 0, "temperature must be a finite number >= 0"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0"),
            (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0,
             "repetition_penalty must be a finite number > 0"),
            (math.isfinite(self.frequency_penalty), "frequency_penalty must be a finite number"),
            (math.isfinite(self.presence_penalty), "presence_penalty must be a finite number"),
            (self.seed is None or 0 <= self.seed <= MAX_SEED, f"seed must be in [0, {MAX_SEED}]"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
