"""`--model org/name[@revision]`: a Hugging Face Hub id, fetched into the Hub's own cache with `huggingface_hub`.

Why through `huggingface_hub` rather than plain HTTP: users already have models in its cache (`HF_HOME`,
`HF_HUB_CACHE`), log in with it (`HF_TOKEN`, `hf auth login`) and work offline with it (`HF_HUB_OFFLINE=1`);
using the library means the same files are never downloaded twice and every one of those settings just works.

Only what the loader reads is fetched: config, the tokenizer and one copy of the weights (a repo such as
`meta-llama/Llama-2-7b-chat-hf` holds both safetensors and `.bin` shards: 13 GB each). The tokenizer is
SentencePiece's tokenizer.model when the repo has one; else a byte-level BPE tokenizer.json (a repo such as
`HuggingFaceTB/SmolLM2-135M-Instruct` has no tokenizer.model), with the tokenizer_config.json beside it when there
is one (it names the BOS and EOS tokens: bpe_tokenizer.py). The environment is read at
each call (not when `huggingface_hub` was imported), and the library's errors become one sentence that says what
to do: gated without a token, no such repo or revision, no network and nothing cached.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError

log = logging.getLogger(__name__)

# org/name with the Hub's allowed characters, optionally @revision (a branch, tag or commit hash).
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<revision>[\w./-]+))?")
# What the loader can read, by layout; every file at the top level of the repo.
CANDIDATE_PATTERNS = ["config.json", "params.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                      "*.safetensors",
                      "model.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json",
                      "consolidated.*.pth"]


class HubError(CheckpointError):
    """A Hub model that cannot be had: gated, missing, or neither reachable nor cached."""


@dataclass(frozen=True)
class HubId:
    repo: str
    revision: str | None = None

    def __str__(self) -> str:
        return self.repo + (f"@{self.revision}" if self.revision else "")


def parse_hub_id(text: str) -> HubId | None:
    """`org/name[@revision]` -> HubId; anything else (a path such as ./x, /x, x/y/z, x.gguf) -> None."""
    match = _HUB_ID.fullmatch(text)
    if match is None or text.startswith((".", "~")) or match.group("repo").endswith(".gguf"):
        return None
    return HubId(match.group("repo"), match.group("revision"))


def choose_files(names: list[str]) -> list[str]:
    """The files of a repo the loader needs: config, tokenizer, and safetensors in preference to .bin."""
    top = {n for n in names if "/" not in n}
    tokenizer = _tokenizer_files(top)
    if "config.json" in top:
        weights = _hf_weights(top)
        chosen = ["config.json", *weights]
    elif "params.json" in top:
        chosen = ["params.json", *sorted(n for n in top if re.fullmatch(r"consolidated\.\d+\.pth", n))]
        if len(chosen) == 1:
            raise HubError("the repo has params.json but no consolidated.*.pth weights")
    else:
        raise HubError("the repo has neither config.json (Hugging Face layout) nor params.json (Meta layout)")
    return [*chosen, *tokenizer]


def _tokenizer_files(top: set[str]) -> list[str]:
    """SentencePiece's tokenizer.model if the repo has one (as the loader prefers it); else tokenizer.json, with
    tokenizer_config.json when there is one."""
    if "tokenizer.model" in top:
        return ["tokenizer.model"]
    if "tokenizer.json" in top:
        return ["tokenizer.json", *(["tokenizer_config.json"] if "tokenizer_config.json" in top else [])]
    raise HubError("the repo has neither tokenizer.model (SentencePiece) nor tokenizer.json (byte-level BPE)")


def _hf_weights(top: set[str]) -> list[str]:
    for index, pattern in (("model.safetensors.index.json", r"model.*\.safetensors"),
                           ("pytorch_model.bin.index.json", r"pytorch_model.*\.bin")):
        if index in top:
            return [index, *sorted(n for n in top if re.fullmatch(pattern, n))]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if single in top:
            return [single]
    raise HubError("the repo has config.json but no model.safetensors, sharded safetensors or pytorch_model.bin")


def hub_cache_dir() -> Path:
    """Where `huggingface_hub` keeps repos: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface/hub."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or "~/.cache") / "huggingface"
    return Path(home).expanduser() / "hub"


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def fetch(hub_id: HubId, endpoint: str | None = None) -> Path:
    """The local snapshot folder of `hub_id`, downloading what the loader needs unless it is cached."""
    import huggingface_hub.errors as hub_errors

    try:
        return _fetch(hub_id, endpoint)
    except hub_errors.GatedRepoError as err:
        raise HubError(_gated_message(hub_id)) from err
    except hub_errors.RevisionNotFoundError as err:
        raise HubError(f"{hub_id}: the Hub repo {hub_id.repo} has no revision {hub_id.revision!r}") from err
    except hub_errors.RepositoryNotFoundError as err:
        raise HubError(f"{hub_id}: no such model on the Hub (or it is private: set HF_TOKEN to a token that can "
                       "read it); a local folder or .gguf file of that name does not exist either") from err
    except (hub_errors.LocalEntryNotFoundError, hub_errors.IncompleteSnapshotError) as err:
        raise HubError(_unreachable_message(hub_id)) from err
    except HubError as err:  # the cached snapshot lacks what the loader reads
        raise HubError(f"{hub_id}: the cached snapshot is incomplete ({err}), and {_unreachable_message(hub_id)}") \
            from err
    except hub_errors.HfHubHTTPError as err:
        raise HubError(f"{hub_id}: the Hub answered {_first_line(err)}") from err
    except OSError as err:  # a full disk, an unwritable cache
        raise HubError(f"{hub_id}: could not store the download in {hub_cache_dir()} ({err})") from err


def _fetch(hub_id: HubId, endpoint: str | None) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import DryRunError

    # the library reads HF_HUB_OFFLINE once, when first imported; the variable as it is now is what counts
    constants.HF_HUB_OFFLINE = offline()
    common = dict(repo_id=hub_id.repo, revision=hub_id.revision, cache_dir=hub_cache_dir(), endpoint=endpoint,
                  token=os.environ.get("HF_TOKEN") or None)
    # From the cache, only tokenizer.model is asked for by name (no file, when the repo has none): the library checks
    # the snapshot against the repo's whole listing, which names files never fetched (the .bin copy, the
    # tokenizer.json of a repo that has a tokenizer.model); the loader's choice is checked after.
    if offline():
        return _cached(Path(snapshot_download(**common, allow_patterns=["tokenizer.model"], local_files_only=True)))
    try:  # list the repo's files without downloading, to choose among them
        listing = snapshot_download(**common, allow_patterns=CANDIDATE_PATTERNS, dry_run=True)
    except DryRunError:  # the Hub cannot be asked: the cached snapshot, or the library's own error about why not
        return _cached(Path(snapshot_download(**common, allow_patterns=["tokenizer.model"])))
    wanted = choose_files([info.filename for info in listing])
    missing = [info for info in listing if info.filename in wanted and info.will_download]
    if missing:
        size = sum(info.file_size or 0 for info in missing)
        log.info("downloading %d files (%.1f GB) of %s into %s", len(missing), size / 1e9, hub_id, hub_cache_dir())
    # by the revision asked for, not the listing's commit: the library then records refs/<branch>, which is what
    # finds the snapshot again offline
    return Path(snapshot_download(**common, allow_patterns=wanted))  # with the library's progress bar


def _cached(snapshot: Path) -> Path:
    """`snapshot`, once it holds every file the loader would fetch (an interrupted download leaves some out)."""
    choose_files([p.name for p in snapshot.iterdir()])
    return snapshot


def _gated_message(hub_id: HubId) -> str:
    url = f"https://huggingface.co/{hub_id.repo}"
    if os.environ.get("HF_TOKEN"):
        return (f"{hub_id}: gated model, and the token in HF_TOKEN has no access to it: accept the license at "
                f"{url} with the account that owns the token (access is granted per account)")
    return (f"{hub_id}: gated model: accept its license at {url}, then set HF_TOKEN to a read token of that account "
            "(https://huggingface.co/settings/tokens), or run 'hf auth login'")


def _unreachable_message(hub_id: HubId) -> str:
    why = "HF_HUB_OFFLINE is set" if offline() else "the Hub cannot be reached (no network?)"
    return (f"{hub_id}: not in the local Hub cache ({hub_cache_dir()}) and {why}. Download it once with network "
            "access, point HF_HUB_CACHE/HF_HOME at a cache that holds it, or pass a local folder or .gguf file")


def _first_line(err: Exception) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__

