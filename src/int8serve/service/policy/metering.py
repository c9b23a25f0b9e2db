"""What one request costs, in neurons: the card's `neurons.metrics` applied to the tokens that were billed.

neurons = Σ over the card's metrics of count × `neuron_cost` (in decimal, rounded half up to 6 decimals), where
`input_tokens` is the prompt after the chat template and `output_tokens` the generated tokens
(`ModelCard.policy.neurons`). Which tokens are billed depends on how the request ended (`Outcome`):

* `ok` — a complete answer: all of them;
* `aborted` — the client went away: the tokens the engine actually generated, plus the prompt if the engine had
  started on it (a request dropped while still queued costs nothing);
* `error` — the server failed (engine error, shutdown): nothing; the row still records the tokens;
* a cache hit: 0 neurons, whatever the tokens (it still counts for the rate limit).

Neurons are reported with up to 6 decimals (`format_neurons`), in the `cf-ai-neurons` header of a JSON answer and
in the final usage frame of a stream.
"""

from __future__ import annotations

from enum import StrEnum

from int8serve.catalog.card import ModelCard

__all__ = ["NEURONS_HEADER", "Outcome", "billed_neurons", "format_neurons"]

NEURONS_HEADER = "cf-ai-neurons"


class Outcome(StrEnum):
    OK = "ok"
    ABORTED = "aborted"
    ERROR = "error"


def billed_neurons(card: ModelCard, outcome: Outcome, prompt_tokens: int, completion_tokens: int, *,
                   started: bool = True, cached: bool = False) -> float:
    """The neurons charged for a request that ended with `outcome` (see the module docstring)."""
    if cached or outcome is Outcome.ERROR:
        return 0.0
    if outcome is Outcome.ABORTED and not started:
        return 0.0
    return card.policy.neurons(prompt_tokens, completion_tokens)


def format_neurons(neurons: float) -> str:
    """`47.1852`, `0`: at most 6 decimals, no trailing zeros, never an exponent."""
    text = f"{neurons:.6f}".rstrip("0").rstrip(".")
    return text if text not in ("", "-0") else "0"
