"""Progress of long work (corpus encoding, training, evaluation) that reads well in a terminal *and* in a
log file: the one place progress is reported.

In a terminal: a tqdm bar (or Lightning's) with total, rate and ETA. Redirected to a file (a batch job,
``nohup``), a bar is one endless line of carriage returns, and Lightning's shows only its final state per
epoch (a 200-step RL run on a CPU said nothing for an hour). There, one plain line is logged (logger
``search_r3.progress``) about every 30-60 seconds instead:
``encode documents: 12/38 batches (32%), 3m25s elapsed, ETA 7m20s``. :func:`progress` wraps a loop,
:class:`TrainingProgress` and :class:`EvaluationProgress` are the Lightning callbacks for ``fit`` and for
``test``/``validate``.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import lightning as L
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


class TrainingProgress(L.Callback):
    """Logs ``train: done/total steps (pct), elapsed, ETA`` (logger ``search_r3.progress``) during ``fit``.

    The total is ``max_steps`` (or Lightning's estimate of the stepping batches for an epoch-bounded
    run). A resumed run's ETA counts only the steps it trained itself, so the restored ones do not make
    it promise the rest at no cost. Silent in a terminal (Lightning's bar is there) and on ranks other
    than 0. Validation time falls between steps, so the ETA includes its share."""

    def __init__(self, every: float = 60.0) -> None:
        self.every = every
        self._line: ProgressLine | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._line = None
        if sys.stderr.isatty() or not trainer.is_global_zero:
            return
        total = trainer.max_steps if trainer.max_steps > 0 else trainer.estimated_stepping_batches
        self._line = ProgressLine("train", int(total) if math.isfinite(total) else None, unit="steps",
                                  every=self.every)
        self._line.skip(trainer.global_step)

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self._line is not None:
            self._line.update(trainer.global_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._line is not None:
            self._line.update(trainer.global_step, force=True)
            self._line = None


class EvaluationProgress(L.Callback):
    """Logs ``evaluate: done/total batches (pct), elapsed, ETA`` about every 30 s during ``test`` and
    ``validate`` where stderr is not a terminal; batches a resumed run already had stay out of the ETA."""

    def __init__(self) -> None:
        self.line: ProgressLine | None = None
        self.done = 0
        self.skipped = 0  # batches a resumed run already had (left out of the ETA)

    def _start(self, trainer: L.Trainer, totals: Any) -> None:
        total = sum(t for t in (totals if isinstance(totals, list) else [totals]) if t != float("inf"))
        self.line = None if sys.stderr.isatty() else ProgressLine("evaluate", int(total) or None)
        self.done = self.skipped = 0

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, trainer.num_test_batches)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start(trainer, trainer.num_val_batches)

    def _step(self, skipped: bool = False) -> None:
        self.done += 1
        self.skipped += skipped
        if self.line is not None:
            if skipped:  # a batch a resumed run already had: left out of the ETA
                self.line.skip()
            self.line.update(self.done)

    def on_test_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, *args: Any,
                          **kwargs: Any) -> None:
        # test_step says how many texts it encoded: 0 for a batch a resumed run already has
        self._step(skipped=isinstance(outputs, dict) and outputs.get("encoded") == 0)

    def on_validation_batch_end(self, *args: Any, **kwargs: Any) -> None:
        self._step()
