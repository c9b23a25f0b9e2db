"""The engine's errors that a user can fix, importable without torch.

The command line reports them in one line (a missing checkpoint, a Hub id it cannot fetch) before or without
loading a model, so they live apart from the modules that read tensors.
"""

from __future__ import annotations

__all__ = ["CheckpointError", "EngineVariableError"]


class CheckpointError(ValueError):
    """A checkpoint is missing, unreadable, or does not fit the model its config describes."""


class EngineVariableError(ValueError):
    """An engine variable (INT8SERVE_ATTENTION, _ACTIVATION, _DECODE_PLAN, ...) holds a value it does not take."""
