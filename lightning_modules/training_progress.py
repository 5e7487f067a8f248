"""Progress of a training run, with an ETA, in a log file.

Lightning's progress bar is for terminals. In a log file (``nohup``, a batch job) it shows only its final
state, per epoch, and for a run bounded by ``max_steps`` as "Epoch 1/-2": a 200-step RL run on a CPU
said nothing for an hour. Where stderr is not a terminal this callback logs one plain line about every
``every`` seconds instead: ``train: <done>/<total> steps (<share>), <elapsed> elapsed, ETA <time>``.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import lightning as L

from search_r3.model.progress import ProgressLine


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
