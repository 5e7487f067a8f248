"""Files written so that a process killed mid-write never leaves a truncated one: checkpoints' environment
blocks, evaluation caches and partial files all go through :func:`atomic_save`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


def atomic_save(obj: Any, path: Path) -> None:
    """Write then rename: a run killed mid-write leaves the previous file, never a truncated one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
