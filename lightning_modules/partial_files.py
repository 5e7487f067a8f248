"""Saved progress of a long evaluation encoding, so that a killed ``search-r3 test`` resumes where it stopped.

A full corpus takes about an hour per retriever on a 2-core CPU, and reasoning-mode queries (one
generation each) several minutes more per retriever and dataset: losing them to a crash or a killed job
is the common case, not the exception. What was encoded is written beside the embedding cache at most
every ``every_s`` seconds (write then rename, so a kill mid-write leaves the previous file), read back by
the next run and removed once the run has its result. Files are per rank: under DDP each rank encodes
its own share and resumes only that, so a resumed run must use the same world size.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import torch

from search_r3.common.atomic_files import atomic_save
from search_r3.model.analysis_measures import AnalysisMeasures
from search_r3.model.reasoning import ReasoningRecord


class PartialFile:
    """One encoding's progress file: ``load`` what an earlier run left, ``maybe_save`` as work is done.

    ``every_s``: at most this often (seconds); ``0`` after every call, ``None`` never."""

    def __init__(self, path: Path, every_s: float | None) -> None:
        self.path = path
        self.every_s = every_s
        self._last = time.monotonic()

    def load(self) -> dict[str, Any] | None:
        return torch.load(self.path, weights_only=True) if self.path.is_file() else None

    def maybe_save(self, payload: Callable[[], dict[str, Any]]) -> None:
        """Save ``payload()`` if ``every_s`` has passed since the last save (built only then)."""
        if self.every_s is None or time.monotonic() - self._last < self.every_s:
            return
        self._last = time.monotonic()
        atomic_save(payload(), self.path)

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)


def record_to_dict(record: ReasoningRecord) -> dict[str, Any]:
    """A reasoning record as plain types (what ``torch.load(weights_only=True)`` reads back)."""
    return dataclasses.asdict(record)


def record_from_dict(saved: dict[str, Any]) -> ReasoningRecord:
    measures = saved.get("measures")
    return ReasoningRecord(**{**saved, "measures": AnalysisMeasures(**measures) if measures else None})
