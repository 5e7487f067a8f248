"""Contrastive training rows (query, positive, hard negatives) and the batch sampler that keeps them honest.

Row format (prepared ``train/*_train_triples.jsonl.gz`` files, and what our miner writes)::

    {"dataset": "nfcorpus", "query_id": "PLAIN-1", "query": "...", "pos_id": "MED-10", "neg_ids": ["MED-…", …]}

Texts of documents come from the dataset's corpus by id.
"""

from __future__ import annotations

import logging
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from search_r3.datamodules.beir_files import DataFormatError, iter_jsonl

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingRow:
    query_id: str
    query: str
    pos_id: str
    neg_ids: tuple[str, ...] = field(default_factory=tuple)

    def namespaced(self, dataset: str) -> TrainingRow:
        """The row with every id prefixed by its dataset (``scifact/123``): where several datasets train
        together, two corpora's document "123" are two documents (texts, masks and sampler keys)."""
        return TrainingRow(f"{dataset}/{self.query_id}", self.query, f"{dataset}/{self.pos_id}",
                           tuple(f"{dataset}/{n}" for n in self.neg_ids))

    def keys(self, num_negatives: int) -> set[str]:
        """Ids that must not repeat inside a batch: the query and every document it brings."""
        return {f"q:{self.query_id}", f"d:{self.pos_id}", *(f"d:{n}" for n in self.neg_ids[:num_negatives])}


def read_training_rows(path: str | Path) -> list[TrainingRow]:
    """All rows of a triples file; a row without query/positive, or with an empty query, names its line."""
    path = Path(path)
    if not path.is_file():
        raise DataFormatError(f"{path}: no such training file")
    rows = []
    for lineno, obj in iter_jsonl(path):
        missing = [k for k in ("query_id", "query", "pos_id") if k not in obj]
        if missing:
            raise DataFormatError(f"{path}:{lineno}: training row without {missing}")
        if not isinstance(obj["query"], str) or not obj["query"].strip():
            raise DataFormatError(f"{path}:{lineno}: empty query (query {obj['query_id']!r})")
        negs = obj.get("neg_ids") or []
        if not isinstance(negs, list):
            raise DataFormatError(f"{path}:{lineno}: neg_ids must be a list")
        pos = str(obj["pos_id"])
        rows.append(TrainingRow(str(obj["query_id"]), obj["query"].strip(), pos,
                                tuple(str(n) for n in negs if str(n) != pos)))
    if not rows:
        raise DataFormatError(f"{path}: no training rows")
    return rows


class NoDuplicatesBatchSampler(Sampler[list[int]]):
    """Shuffled batches in which no query and no document occurs twice.

    A duplicate would be scored as a negative of itself: the same passage as one query's positive and
    another's in-batch negative, or the same query twice with different positives. A row that clashes
    with the batch being built waits for a later batch; every row is yielded exactly once per epoch.
    ``set_epoch`` (called by Lightning at every epoch start, see :attr:`sampler`) reshuffles
    deterministically from ``seed``.

    Distributed training: ``batch_size`` is per rank. Every rank packs the same epoch (same seed) into
    *global* batches of ``batch_size × num_replicas`` rows and takes its contiguous share of each
    (rank r: the r-th slice). So the global batch has no duplicate across ranks either (with
    cross-device negatives, a document on two ranks would be its own negative), and N processes with
    batch B see exactly the rows that one process with batch N·B sees, in the same steps. A global batch
    at an epoch's tail with fewer rows than ranks is dropped (a rank would get none); shorter ones split
    as evenly as they can. ``num_replicas``/``rank`` default to ``torch.distributed``'s when it is
    initialised. Lightning must not inject its own sampler (``trainer.use_distributed_sampler: false``):
    it cannot know what a clash is.
    """

    def __init__(self, keys: Sequence[set[str]], batch_size: int, seed: int = 0, shuffle: bool = True,
                 drop_last: bool = False, num_replicas: int | None = None, rank: int | None = None) -> None:
        if isinstance(keys, Sampler):
            raise TypeError("NoDuplicatesBatchSampler got a sampler instead of row keys: Lightning tried to inject a "
                            "distributed sampler. Set `trainer.use_distributed_sampler: false`; this sampler shards "
                            "its batches by rank itself.")
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        self.num_replicas, self.rank = num_replicas, rank
        self.keys = list(keys)
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.epoch = 0
        self._len_cache: tuple[int, int] | None = None
        self._steps_done: Callable[[], int] | None = None

    @property
    def sampler(self) -> NoDuplicatesBatchSampler:
        """This batch sampler is its own sampler: where Lightning looks for one.

        Lightning sets the epoch on ``loader.sampler`` and ``loader.batch_sampler.sampler`` (torch's
        ``BatchSampler`` layout), never on the batch sampler itself. Without this, ``set_epoch`` was never
        called: every epoch replayed epoch 0's order, and a run resumed in a later epoch (placed by
        :meth:`resume_after`) went on in another order than the uninterrupted run."""
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_after(self, steps_done: Callable[[], int]) -> None:
        """Start the first pass where a run that has trained ``steps_done()`` batches goes on.

        A run interrupted mid-epoch must go on with the batches it had not reached; replaying the
        epoch's first ones would train on them twice and never on the rest. The count is read at the
        first batch, not now: Lightning may build and even ``iter`` the training loader before it
        restores the checkpoint (``trainer.estimated_stepping_batches`` does, in a run bounded by
        ``max_epochs``), and a checkpoint from an epoch's last batch goes on with the next epoch, whose
        first iterator Lightning makes before it calls ``set_epoch``. The packing is a pure function of
        (seed, epoch), so the place is a function of the count alone (:meth:`position`)."""
        self._steps_done = steps_done

    def position(self, steps: int) -> tuple[int, int]:
        """(epoch, batches of it already done) after ``steps`` of this rank's batches from the start of
        epoch 0 (epoch lengths vary with the packing)."""
        epoch = 0
        while 0 < (length := self._length(epoch)) <= steps:
            steps -= length
            epoch += 1
        return epoch, steps

    def __iter__(self) -> Iterator[list[int]]:
        # A generator: nothing below runs until the first batch is asked for (see resume_after).
        skip = 0
        if self._steps_done is not None:
            steps, self._steps_done = self._steps_done(), None
            if steps > 0:
                self.epoch, skip = self.position(steps)
        batches = self._shard(self._batches(self.epoch))
        if skip:
            log.info("resuming epoch %d after its first %d of %d batches", self.epoch, skip, len(batches))
        yield from batches[skip:]

    def _replicas(self) -> tuple[int, int]:
        if self.num_replicas is not None:
            return self.num_replicas, self.rank or 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_world_size(), torch.distributed.get_rank()
        return 1, 0

    def _shard(self, batches: list[list[int]]) -> list[list[int]]:
        world, rank = self._replicas()
        if world == 1:
            return batches
        shares = []
        for batch in batches:
            if len(batch) < world:
                continue
            bounds = [len(batch) * r // world for r in range(world + 1)]
            shares.append(batch[bounds[rank] : bounds[rank + 1]])
        return shares

    def _batches(self, epoch: int) -> list[list[int]]:
        """The epoch's batches, computed whole: ``__len__`` needs the same greedy packing to be exact."""
        size = self.batch_size * self._replicas()[0]  # a global batch
        order = list(range(len(self.keys)))
        if self.shuffle:
            random.Random(self.seed + epoch).shuffle(order)
        batches: list[list[int]] = []
        pending = order
        while pending:
            batch: list[int] = []
            used: set[str] = set()
            waiting: list[int] = []
            for pos, i in enumerate(pending):
                if len(batch) == size:
                    waiting.extend(pending[pos:])
                    break
                if self.keys[i] & used:
                    waiting.append(i)
                    continue
                batch.append(i)
                used |= self.keys[i]
            pending = waiting
            if len(batch) < size and self.drop_last:
                break
            batches.append(batch)
        return batches

    def __len__(self) -> int:
        # Clashes push rows into later, partly filled batches, so the count depends on the shuffle:
        # pack the epoch once (cached) rather than guess, so progress bars and LR schedules are right.
        if self._len_cache is None or self._len_cache[0] != self.epoch:
            self._len_cache = (self.epoch, self._length(self.epoch))
        return self._len_cache[1]

    def _length(self, epoch: int) -> int:
        """This rank's batches in ``epoch``."""
        return len(self._shard(self._batches(epoch)))


def resumable_loader(dataset: Dataset, sampler: NoDuplicatesBatchSampler, collate_fn: Callable[[list[Any]], Any],
                     trainer: Any | None) -> DataLoader:
    """A training loader that, after ``fit(ckpt_path=...)``, goes on with the batch after the last one
    trained (:meth:`NoDuplicatesBatchSampler.resume_after`), and that never draws from the global random
    streams.

    A plain DataLoader restarts its epoch. Both stage modules take one optimizer step per batch, so the
    restored ``global_step`` says where the run stands. (Gradient accumulation would break that count;
    the stage modules do not use it.) The loader's own generator keeps its per-epoch seed draw off
    torch's global stream, which the training steps share (dropout, rollout sampling) and which a
    resumed run restores from the checkpoint.
    """
    if trainer is not None:
        sampler.resume_after(lambda: trainer.global_step)
        # Lightning cannot see that this loader resumes (it is not a torchdata StatefulDataLoader) and
        # warns on a mid-epoch resume that the rest of the epoch is unreliable; here it is not.
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch")
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn,
                      generator=torch.Generator().manual_seed(sampler.seed))
