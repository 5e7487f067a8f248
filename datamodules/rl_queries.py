"""``RLQueryDataModule``: Stage-2 batches of training queries with their positive document ids, and the
corpus the RL environment embeds.

RL needs no negatives (the environment ranks the whole corpus) and no tokenisation here (the module
samples reasoning from the raw query text), so a batch is plain lists. The corpus is the dataset's
BEIR corpus, optionally capped (every document judged for a training query is kept, so no positive is
lost). Validation mirrors Stage 1: the first ``val_queries`` *train* queries are held out from training
and retrieved against a capped corpus, so model selection never sees a test query.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, Dataset

from search_r3.datamodules.beir import BEIRDataModule, RetrievalTask
from search_r3.datamodules.beir_files import DataFormatError, find_file
from search_r3.datamodules.sources import DatasetName
from search_r3.datamodules.training_rows import NoDuplicatesBatchSampler, resumable_loader

log = logging.getLogger(__name__)


class QueryPositives(Dataset):
    def __init__(self, task: RetrievalTask, query_ids: list[str]) -> None:
        self.task, self.query_ids = task, query_ids

    def __len__(self) -> int:
        return len(self.query_ids)

    def __getitem__(self, i: int) -> dict[str, Any]:
        qid = self.query_ids[i]
        return {"query_id": qid, "query": self.task.queries[qid],
                "positives": [d for d, grade in self.task.qrels[qid].items() if grade > 0]}


def collate_lists(items: list[dict[str, Any]]) -> dict[str, list[Any]]:
    return {key: [it[key] for it in items] for key in items[0]}


class RLQueryDataModule(L.LightningDataModule):
    """Args:
        data_root: a folder holding the BEIR datasets, searched first (``None``: the mirrors, the cache and a
            download; see :mod:`search_r3.datamodules.sources`).
        dataset: one dataset name (``beir/scifact``, ``hf:BeIR/scifact``) or folder (the environment
            indexes one corpus).
        split: qrels split the training queries come from.
        max_corpus_docs: cap on the environment's corpus (judged documents of the split always kept).
        max_queries: cap on training queries after the hold-out (quick runs).
        batch_size: queries per step (each is sampled ``group_size`` times by the module).
        val_queries / val_corpus_docs: size of the held-out validation task.
        seed: shuffling seed (the order of each epoch is a function of it and the epoch).
    """

    def __init__(self, data_root: str | None = None, dataset: str = "beir/scifact", split: str = "train",
                 max_corpus_docs: int | None = None, max_queries: int | None = None, batch_size: int = 2,
                 val_queries: int = 50, val_corpus_docs: int = 500, seed: int = 0) -> None:
        super().__init__()
        self.data_root = data_root
        self.dataset, self.split = dataset, split
        self.max_corpus_docs, self.max_queries = max_corpus_docs, max_queries
        self.batch_size, self.val_queries, self.val_corpus_docs, self.seed = batch_size, val_queries, val_corpus_docs, seed
        self.task: RetrievalTask | None = None
        self.train_query_ids: list[str] = []
        self.corpus_texts: list[str] = []
        self.validation: BEIRDataModule | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.task is not None:
            return
        self.validation = BEIRDataModule(data_root=self.data_root, datasets=[self.dataset], split=self.split,
                                         max_queries=self.val_queries, max_corpus_docs=self.val_corpus_docs)
        self.validation.setup("validate")
        held_out = {q for task in self.validation.tasks for q in task.queries}
        loader = BEIRDataModule(data_root=self.data_root, split=self.split, max_corpus_docs=self.max_corpus_docs)
        self.folder = loader.resolve(self.dataset)
        self.task = loader.load_task(self.folder, DatasetName(self.dataset).name)
        ids = [q for q in self.task.queries if q not in held_out and
               any(g > 0 for g in self.task.qrels[q].values())]
        random.Random(self.seed).shuffle(ids)
        self.train_query_ids = ids[: self.max_queries] if self.max_queries else ids
        if not self.train_query_ids:
            raise DataFormatError(f"{self.folder}: no training query with a positive is left after "
                                  f"holding out {len(held_out)} for validation")
        self.corpus_texts = self.task.load_texts()
        log.info("%s/%s: %d training queries, environment corpus of %d documents%s", self.task.name, self.split,
                 len(self.train_query_ids), len(self.corpus_texts), " (capped)" if self.task.capped else "")

    def training_sources(self) -> list[tuple[str, Path]]:
        """(name, file) of what trains the model, for a run's record of its inputs: the judgements that
        pick the training queries and reward them, and the environment's corpus."""
        folder = self.folder if self.task is not None else \
            BEIRDataModule(data_root=self.data_root, split=self.split).resolve(self.dataset)
        name = DatasetName(self.dataset).name
        return [(f"{name}/{self.split}-qrels", find_file(folder / "qrels", f"{self.split}.tsv")),
                (f"{name}/corpus", find_file(folder, "corpus.jsonl"))]

    @property
    def corpus_ids(self) -> list[str]:
        assert self.task is not None, "call setup() first"
        return self.task.doc_ids

    def train_dataloader(self) -> DataLoader:
        assert self.task is not None, "call setup() first"
        # The Stage-1 sampler with one key per query: a shuffle that is a pure function of (seed, epoch),
        # so a run resumed mid-epoch goes on with the queries it had not reached, and sharded by rank
        # under DDP (`trainer.use_distributed_sampler: false`, as in Stage 1).
        sampler = NoDuplicatesBatchSampler([{q} for q in self.train_query_ids], self.batch_size, seed=self.seed)
        return resumable_loader(QueryPositives(self.task, self.train_query_ids), sampler, collate_lists,
                                getattr(self, "trainer", None))

    def val_dataloader(self) -> list[DataLoader]:
        assert self.validation is not None, "call setup() first"
        return self.validation.val_dataloader()
