"""Content digests: the one way this project keys caches and names what a result was computed from.

Content, never sizes or dates: a retrained model of the same shape, or another release of a wheel,
must not be served stale vectors or conversions. Blocks of 1 MiB, since corpora and weights run to
gigabytes. (Recorded result rows carry these digests: the formulas must not change.)
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any


def hash_file(path: str | Path, h: Any) -> None:
    """Feed a file's bytes to the hash object ``h``."""
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)


def file_digest(path: str | Path, length: int = 16) -> str:
    h = hashlib.sha256()
    hash_file(path, h)
    return h.hexdigest()[:length]


def folder_digest(folder: str | Path | None) -> str:
    """Every file in a folder, names and bytes, in sorted order; ``no-adapter`` for None."""
    if folder is None:
        return "no-adapter"
    h = hashlib.sha256()
    for f in sorted(Path(folder).rglob("*")):
        if f.is_file():
            h.update(f.name.encode())
            hash_file(f, h)
    return h.hexdigest()[:16]
