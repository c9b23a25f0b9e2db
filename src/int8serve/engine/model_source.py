"""What `--model` names, turned into something on local disk that `load_model` reads.

`--model` is one of: a local folder (Hugging Face, Meta, int8serve int8), a local `.gguf` file, or a Hub id
`org/name[@revision]`. A local path always wins, so that a folder that happens to look like `org/name` is never
sent to the Hub; only a string that is not on disk and has the shape of a Hub id is looked up there.
"""

from __future__ import annotations

from pathlib import Path

from .errors import CheckpointError
from .hub import HubId, fetch, parse_hub_id

MODEL_HELP = ("the model: a checkpoint folder (Hugging Face config.json, Meta params.json, or an int8 checkpoint "
              "from 'int8serve quantize'), a llama.cpp .gguf file (F32/F16/BF16/Q8_0/Q4_1), or a Hugging Face Hub id "
              "org/name[@revision] (downloaded into the Hub cache; HF_TOKEN, HF_HOME, HF_HUB_CACHE, HF_HUB_OFFLINE "
              "honoured)")


def hub_id_of(spec: str | Path) -> HubId | None:
    """The Hub id `spec` names, or None when it is a local path (existing, or not shaped like a Hub id)."""
    if Path(spec).expanduser().exists():
        return None
    return parse_hub_id(str(spec))


def check_local(spec: str | Path) -> None:
    """Fail at once if `spec` is neither an existing folder or .gguf file nor shaped like a Hub id."""
    path = Path(spec).expanduser()
    if path.is_dir() or (path.is_file() and path.suffix == ".gguf") or hub_id_of(spec) is not None:
        return
    if path.is_file():
        raise CheckpointError(f"{spec}: a model is a folder (config.json, params.json or int8serve.json) or a "
                              ".gguf file")
    raise CheckpointError(f"{spec}: no such model folder or .gguf file (a Hub id is org/name[@revision])")


def resolve(spec: str | Path, endpoint: str | None = None) -> Path:
    """The local folder or file `spec` names; a Hub id is fetched (or found in the Hub cache) first."""
    check_local(spec)
    hub_id = hub_id_of(spec)
    return Path(spec).expanduser() if hub_id is None else fetch(hub_id, endpoint)
