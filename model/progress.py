"""Progress of long work (corpus encoding, evaluation) that reads well in a terminal *and* in a log file.

In a terminal: a tqdm bar with total, rate and ETA. Redirected to a file (a batch job, ``nohup``), a bar
is one endless line of carriage returns, so instead one plain line is logged about every 30 seconds:
``encode documents: 12/38 batches (32%), 3m25s elapsed, ETA 7m20s``.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
log = logging.getLogger("search_r3.progress")


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class ProgressLine:
    """Logs ``desc: done/total unit (pct), elapsed, ETA`` at most every ``every`` seconds."""

    def __init__(self, desc: str, total: int | None, unit: str = "batches", every: float = 30.0) -> None:
        self.desc, self.total, self.unit, self.every = desc, total, unit, every
        self.start = self.last = time.perf_counter()
        self.skipped = 0

    def skip(self, count: int = 1) -> None:
        """Count units that cost nothing (work a resumed run already has): they advance ``done`` but stay
        out of the rate, or a resumed run would promise an ETA as if every unit were that cheap."""
        self.skipped += count

    def line(self, done: int) -> str:
        elapsed = time.perf_counter() - self.start
        if not self.total:
            return f"{self.desc}: {done} {self.unit}, {_clock(elapsed)} elapsed"
        worked = done - self.skipped
        eta = elapsed / worked * (self.total - done) if worked > 0 else float("nan")
        eta_text = _clock(eta) if worked > 0 else "?"
        return (f"{self.desc}: {done}/{self.total} {self.unit} ({100 * done / self.total:.0f}%), "
                f"{_clock(elapsed)} elapsed, ETA {eta_text}")

    def update(self, done: int, force: bool = False) -> None:
        now = time.perf_counter()
        if force or now - self.last >= self.every:
            self.last = now
            log.info(self.line(done))


def progress(items: Iterable[T], total: int | None, desc: str, unit: str = "batches", enabled: bool = True,
             every: float = 30.0) -> Iterator[T]:
    """``items`` with a bar (interactive) or periodic log lines (not a terminal); silent if not enabled."""
    if not enabled:
        yield from items
        return
    if sys.stderr.isatty():
        yield from tqdm(items, total=total, desc=desc, unit=unit.rstrip("s") or unit)
        return
    line = ProgressLine(desc, total, unit, every)
    done = 0
    for item in items:
        yield item
        done += 1
        line.update(done)
    line.update(done, force=True)
