"""The engine's path variables (INT8SERVE_KERNEL, _ATTENTION, _ACTIVATION, _DECODE_PLAN): how a value is read and
refused, importable without torch.

The engine reads each where it picks a path (kernels.env_choice is this module's `env_choice`), and every command
checks them all at its start (settings.check_engine_variables), before torch is imported: both read a value and word
a refusal through `env_choice`, so that the two can never say different things.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from .errors import EngineVariableError

__all__ = ["env_choice"]


def env_choice(variable: str, choices: Iterable[str], environ: Mapping[str, str] | None = None) -> str:
    """The value of a path variable in `environ` (the process's environment by default), case and spaces ignored:
    "auto" when unset or empty; EngineVariableError (a ValueError, said in one line by every command) naming the
    variable for a value not among `choices`."""
    value = (os.environ if environ is None else environ).get(variable, "auto").strip().lower() or "auto"
    if value not in choices:
        raise EngineVariableError(f"{variable}={value!r}: expected one of {', '.join(choices)}")
    return value
