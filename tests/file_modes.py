"""The permission bits of what int8serve writes, for the tests that another user may read it."""

from __future__ import annotations

from pathlib import Path


def modes(folder: Path) -> dict[str, str]:
    """Each entry of `folder` (and `folder` itself, as ".") by its permission bits, e.g. "644"."""
    return {(p.relative_to(folder).as_posix() if p != folder else "."): f"{p.stat().st_mode & 0o777:o}"
            for p in [folder, *folder.rglob("*")]}
