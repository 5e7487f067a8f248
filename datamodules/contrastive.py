"""``ContrastiveDataModule``: Stage-1 batches of (query, positive, hard negatives), plus held-out validation.

Training rows come from prepared triples files, a BEIR dataset's train qrels with negatives mined on the
fly, or a Hugging Face triplet dataset (:mod:`search_r3.datamodules.training_sources`); document texts
are loaded for the ids the rows use only. Batches are built by
:class:`NoDuplicatesBatchSampler` and tokenised in the collator with the model's own prompts (the
LightningModule attaches its :class:`EmbeddingLM` in ``setup``).

Validation: the first ``val_queries`` queries of each dataset's *train* qrels are held out (their rows
are removed from training) and retrieved against a capped corpus, so model selection never sees a
test query.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from search_r3.datamodules.beir import BEIRDataModule
from search_r3.datamodules.beir_files import DataFormatError
from search_r3.datamodules.training_rows import NoDuplicatesBatchSampler, TrainingRow, resumable_loader
from search_r3.datamodules.training_sources import RowSource, hf_triplet_source, mined_source, prepared_source

log = logging.getLogger(__name__)


class RowDataset(Dataset):
    def __init__(self, rows: list[TrainingRow], texts: dict[str, str], num_negatives: int) -> None:
        self.rows, self.texts, self.num_negatives = rows, texts, num_negatives

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        r = self.rows[i]
        negs = list(r.neg_ids[: self.num_negatives])
        return {"query_id": r.query_id, "query": r.query, "positive": self.texts[r.pos_id],
                "negatives": [self.texts[n] for n in negs], "doc_ids": [r.pos_id, *negs]}


def known_positive_mask(query_ids: list[str], doc_ids: list[str], positive_index: list[int],
                        relevant: dict[str, set[str]]) -> Tensor:
    """``[queries, documents]`` bool: True where a document is judged relevant to a query (``relevant``)
    but is not that query's own positive (``positive_index``), so InfoNCE drops it from the query's
    denominator instead of pushing it away. One function for the local batch (the collator) and for the
    global batch of every rank (Stage 1 under DDP)."""
    exclude = torch.zeros((len(query_ids), len(doc_ids)), dtype=torch.bool)
    for i, (qid, own) in enumerate(zip(query_ids, positive_index)):
        known = relevant.get(qid, set())
        for j, doc_id in enumerate(doc_ids):
            exclude[i, j] = j != own and doc_id in known
    return exclude


class ContrastiveCollator:
    """Tokenises a batch through the attached encoder: queries and documents with the full assistant
    turn (for the LM loss) and the masks of the response tokens.

    ``relevant`` (query id -> documents the qrels judge relevant to it) marks, per query, the batch's
    documents that are known positives of that query but belong to another row (``exclude``): the
    no-duplicates sampler keeps ids unique, but on NFCorpus a document is relevant to ~30 train queries,
    so about 1.5% of other-row pairs are such false negatives (4.0 per batch of 12 rows with one hard
    negative each, counted on the shipped rows).
    """

    def __init__(self, relevant: dict[str, set[str]] | None = None) -> None:
        self.encoder = None
        self.relevant = relevant

    def _side(self, texts: list[str], side: str) -> dict[str, Tensor]:
        seqs, starts = self.encoder.direct_training_ids(texts, side)
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), self.encoder.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        response = torch.zeros((len(seqs), width), dtype=torch.bool)
        for i, (s, start) in enumerate(zip(seqs, starts)):
            ids[i, : len(s)] = torch.tensor(s)
            mask[i, : len(s)] = 1
            response[i, start : len(s)] = True
        return {"input_ids": ids, "attention_mask": mask, "response_mask": response}

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        if self.encoder is None:
            raise RuntimeError("ContrastiveCollator has no encoder: the LightningModule attaches it in setup()")
        k = min(len(it["negatives"]) for it in items)
        docs = [it["positive"] for it in items] + [n for it in items for n in it["negatives"][:k]]
        doc_ids = [it["doc_ids"][0] for it in items] + [n for it in items for n in it["doc_ids"][1 : 1 + k]]
        query_ids = [it["query_id"] for it in items]
        out = {"queries": self._side([it["query"] for it in items], "query"),
               "documents": self._side(docs, "document"), "num_negatives": k,
               "query_ids": query_ids, "doc_ids": doc_ids}
        out["exclude"] = known_positive_mask(query_ids, doc_ids, list(range(len(items))), self.relevant or {})
        return out


class ContrastiveDataModule(L.LightningDataModule):
    """Args:
        data_root: a folder holding ``beir/<dataset>`` and the triples files, searched first (``None``:
            ``$SEARCH_R3_DATA``, the offline mirrors, the cache and downloads; see
            :mod:`search_r3.datamodules.sources`).
        train_files: prepared triples files (``train/scifact_train_triples.jsonl.gz``), under a local root or
            as paths.
        train_datasets: BEIR datasets (``beir/scifact``) whose ``train`` qrels are the rows, with BM25 hard
            negatives mined on the fly and cached by content (``mine_window``, ``mine_negatives``).
        hf_triplets: Hugging Face datasets (``hf:org/name`` or a local folder) in the sentence-transformers
            or Tevatron triplet layouts, streamed (split ``hf_split``, config ``hf_config``).
        val_datasets: BEIR datasets whose first ``val_queries`` *train* queries are held out for validation;
            default: those of the prepared and mined sources.
        num_negatives: hard negatives per query (each also serves as an in-batch negative for the others).
        batch_size: queries per batch.
        max_rows: cap on training rows after hold-out (quick runs); ``None`` keeps all.
        val_queries / val_corpus_docs: size of the held-out validation task per dataset.
        seed: shuffling seed (also reshuffled per epoch).
        mask_known_positives: drop from each query's InfoNCE denominator the batch documents that the
            dataset's qrels (any split, grade >= 1) judge relevant to it (see :class:`ContrastiveCollator`).

    With no source given, the rows are SciFact's train qrels with mined negatives (``train_datasets:
    [beir/scifact]``), which needs nothing prepared.
    """

    def __init__(self, data_root: str | None = None, train_files: list[str] | None = None,
                 train_datasets: list[str] | None = None, hf_triplets: list[str] | None = None,
                 hf_split: str = "train", hf_config: str | None = None, val_datasets: list[str] | None = None,
                 num_negatives: int = 1, batch_size: int = 16, max_rows: int | None = None, val_queries: int = 50,
                 val_corpus_docs: int = 1000, seed: int = 0, mask_known_positives: bool = True,
                 mine_window: tuple[int, int] = (0, 100), mine_negatives: int = 30) -> None:
        super().__init__()
        self.data_root = data_root
        self.train_files = list(train_files or [])
        self.train_datasets = list(train_datasets or [])
        self.hf_triplets = list(hf_triplets or [])
        if not (self.train_files or self.train_datasets or self.hf_triplets):
            self.train_datasets = ["beir/scifact"]
        self.hf_split, self.hf_config, self.val_datasets = hf_split, hf_config, val_datasets
        self.mine_window, self.mine_negatives = (int(mine_window[0]), int(mine_window[1])), mine_negatives
        self.num_negatives, self.batch_size, self.max_rows = num_negatives, batch_size, max_rows
        self.val_queries, self.val_corpus_docs, self.seed = val_queries, val_corpus_docs, seed
        self.mask_known_positives = mask_known_positives
        self.collator = ContrastiveCollator()
        self.rows: list[TrainingRow] = []
        self.sources: list[RowSource] = []
        self.validation: BEIRDataModule | None = None

    def training_sources(self) -> list[tuple[str, Path]]:
        """(name, file) of what trains the model, for a run's record of its inputs."""
        return [(f"{source.name}/{kind}", path) for source in self.sources for kind, path in source.files]

    def load_sources(self) -> list[RowSource]:
        sources = [prepared_source(rel, self.data_root, self.num_negatives) for rel in self.train_files]
        sources += [mined_source(spec, self.data_root, self.num_negatives, self.mine_window, self.mine_negatives)
                    for spec in self.train_datasets]
        sources += [hf_triplet_source(spec, self.hf_split, self.hf_config) for spec in self.hf_triplets]
        return sources

    def setup(self, stage: str | None = None) -> None:
        if self.rows:
            return
        self.sources = self.load_sources()
        val = self.val_datasets if self.val_datasets is not None else \
            list(dict.fromkeys(s.validation for s in self.sources if s.validation))
        self.validation = BEIRDataModule(data_root=self.data_root, datasets=val, split="train",
                                         max_queries=self.val_queries, max_corpus_docs=self.val_corpus_docs)
        if val:
            self.validation.setup("validate")
        # Every id is namespaced by its source (see TrainingRow.namespaced): corpora's ids may clash.
        held_out = {f"{task.name}/{q}" for task in self.validation.tasks for q in task.queries}
        texts: dict[str, str] = {}
        relevant: dict[str, set[str]] = {}
        for source in self.sources:
            name = source.name
            for qid, docs in source.relevant.items():
                relevant.setdefault(f"{name}/{qid}", set()).update(f"{name}/{d}" for d in docs)
            texts.update({f"{name}/{d}": t for d, t in source.texts.items()})
            rows = [r.namespaced(name) for r in source.rows]
            kept = [r for r in rows if r.query_id not in held_out and len(r.neg_ids) >= self.num_negatives]
            log.info("%s: %d training rows (%d held out for validation or short of negatives)", name, len(kept),
                     len(rows) - len(kept))
            self.rows.extend(kept)
        if self.max_rows:
            self.rows = self.rows[: self.max_rows]
        if not self.rows:
            raise DataFormatError(f"no training rows left from {[s.name for s in self.sources]} after the hold-out "
                                  f"and with at least {self.num_negatives} negatives each")
        self.texts = texts
        self.collator.relevant = relevant if self.mask_known_positives else None

    def train_dataloader(self) -> DataLoader:
        dataset = RowDataset(self.rows, self.texts, self.num_negatives)
        sampler = NoDuplicatesBatchSampler([r.keys(self.num_negatives) for r in self.rows], self.batch_size,
                                           seed=self.seed)
        return resumable_loader(dataset, sampler, self.collator, getattr(self, "trainer", None))

    def val_dataloader(self) -> list[DataLoader]:
        assert self.validation is not None
        return self.validation.val_dataloader()
