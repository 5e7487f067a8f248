"""``BEIRDataModule``: BEIR-format retrieval tasks for ``search-r3 test`` / ``validate``.

``setup`` reads qrels and queries (small) and scans the corpus once for ids, so that every id problem
is reported with its file and line *before* minutes of encoding are spent. The corpus text itself is
streamed from disk by :class:`CorpusStream` and never held in memory.

Capping (``max_queries`` / ``max_corpus_docs``) is for quick runs only: the kept queries' judged
documents are always kept, and the rest of the budget is filled with the first other documents of
the corpus file. A capped corpus has fewer distractors, so its nDCG/recall are *higher* than the full
corpus would give; such numbers are labelled with the cap wherever they are recorded.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from search_r3.common.distributed import world_and_rank
from search_r3.datamodules.beir_files import (
    DataFormatError,
    OnBadRow,
    Qrels,
    ReadReport,
    find_file,
    find_queries_file,
    iter_corpus,
    read_qrels,
    read_queries,
)
from search_r3.datamodules.sources import DatasetName, data_roots, resolve_beir

log = logging.getLogger(__name__)


@dataclass
class RetrievalTask:
    """One dataset split ready for evaluation: what to encode and how to judge it."""

    name: str
    split: str
    corpus_path: Path
    queries: dict[str, str]  # the evaluated queries, id -> text, in qrels order
    qrels: Qrels  # judgements of those queries only
    keep_docs: set[str] | None  # None: the full corpus
    doc_ids: list[str]  # ids of the encoded documents, in corpus order (position = stream index)
    corpus_size: int  # documents in the corpus file
    report: ReadReport = field(default_factory=ReadReport)
    on_bad_row: OnBadRow = "error"  # every later pass over the corpus drops the lines the first one did

    @property
    def num_docs(self) -> int:
        return len(self.doc_ids)

    @property
    def capped(self) -> bool:
        return self.keep_docs is not None

    def load_texts(self) -> list[str]:
        """The encoded documents' texts in ``doc_ids`` order, read in one pass (for in-memory users such
        as the RL environment; evaluation streams through ``CorpusStream`` instead)."""
        texts = [text for _, doc_id, text in iter_corpus(self.corpus_path, on_bad_row=self.on_bad_row)
                 if self.keep_docs is None or doc_id in self.keep_docs]
        if len(texts) != len(self.doc_ids):
            raise DataFormatError(f"{self.corpus_path} changed while in use: {len(texts)} documents, expected {len(self.doc_ids)}")
        return texts

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "num_queries": len(self.queries),
            "num_docs": self.num_docs,
            "corpus_size": self.corpus_size,
            "num_qrels": sum(len(v) for v in self.qrels.values()),
        }
        out.update({f"skipped {reason}": n for reason, n in self.report.skipped.items()})
        return out


def collate_records(rows: list[dict[str, Any]]) -> dict[str, list[Any]]:
    """Lists of strings/ints by key: the model tokenises, so no tensor work is done here."""
    return {key: [r[key] for r in rows] for key in rows[0]}


def dealt_batches(rows: Iterable[dict[str, Any]], count: int, batch_size: int) -> Iterator[list[dict[str, Any]]]:
    """This process's share of the ``count`` ``rows`` cut into consecutive batches of ``batch_size``: batch
    ``j`` goes to rank ``j % world``, and within a rank to DataLoader worker ``(j // world) % workers``.

    Why whole batches rather than every n-th text: in bf16 a text's embedding depends slightly on the batch
    it is encoded in (the kernels' blocking follows the batch's shape; ``benchmarks/bf16_batch_spread.py``).
    Cutting the one global sequence into batches first makes every batch, and so every embedding, the same
    on any number of processes or workers: only ``batch_size`` still changes bf16 scores.

    With fewer batches than ranks (a small validation set), every rank gets one batch instead, the rows
    split as evenly as they go, and a row repeated where there are fewer rows than ranks (the merge keeps
    one copy): Lightning refuses a rank whose loader is empty."""
    world, rank = world_and_rank()
    info = get_worker_info()
    workers, worker = (info.num_workers, info.id) if info else (1, 0)
    mine = lambda j: j % world == rank and (j // world) % workers == worker  # noqa: E731
    if -(-count // batch_size) < world:
        listed = list(rows)
        for j in range(world if count else 0):
            if mine(j):
                yield listed[j * count // world : (j + 1) * count // world] if count >= world else [listed[j % count]]
        return
    batch: list[dict[str, Any]] = []
    j = 0
    for row in rows:
        batch.append(row)
        if len(batch) == batch_size:
            if mine(j):
                yield batch
            batch, j = [], j + 1
    if batch and mine(j):
        yield batch


def batches_on_this_rank(count: int, batch_size: int) -> int:
    """How many of :func:`dealt_batches`'s batches this rank gets (all its workers together)."""
    world, rank = world_and_rank()
    return len(range(rank, max(-(-count // batch_size), world if count else 0), world))


class CorpusStream(IterableDataset):
    """Streams a task's documents from disk in batches, sorted by length inside windows of ``sort_window``.

    Window sorting keeps batches of similar length (little padding) without reading the whole corpus
    first. Every process reads the corpus and keeps only its batches (:func:`dealt_batches`), so every
    document is encoded by exactly one process, beside the same neighbours whatever the world size;
    ``index`` (position among encoded documents) lets the ranks' results be merged again. Load it with
    ``DataLoader(batch_size=None)``: the stream yields whole batches.
    """

    def __init__(self, task: RetrievalTask, batch_size: int = 32, sort_window: int = 1024) -> None:
        self.task = task
        self.batch_size = batch_size
        self.sort_window = sort_window

    def __len__(self) -> int:
        """Batches this rank streams (all its workers together): gives progress bars a total and an ETA."""
        return batches_on_this_rank(self.task.num_docs, self.batch_size)

    def _sorted_windows(self) -> Iterator[dict[str, Any]]:
        """Every encoded document, in corpus order, each window of ``sort_window`` sorted longest first
        (a stable sort: ties keep corpus order, so the sequence is the same in every process)."""
        keep = self.task.keep_docs
        buffer: list[dict[str, Any]] = []
        index = 0
        for _, doc_id, text in iter_corpus(self.task.corpus_path, on_bad_row=self.task.on_bad_row):
            if keep is not None and doc_id not in keep:
                continue
            buffer.append({"task": self.task.name, "kind": "document", "index": index, "id": doc_id, "text": text})
            index += 1
            if len(buffer) >= self.sort_window:
                yield from sorted(buffer, key=lambda r: -len(r["text"]))
                buffer = []
        yield from sorted(buffer, key=lambda r: -len(r["text"]))

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        return dealt_batches(self._sorted_windows(), self.task.num_docs, self.batch_size)


class QueryBatches(IterableDataset):
    """A task's queries in qrels order, in batches dealt like the corpus's (:func:`dealt_batches`): a query
    is encoded, and its analysis generated, beside the same queries on any number of processes."""

    def __init__(self, task: RetrievalTask, batch_size: int = 32) -> None:
        self.rows = [
            {"task": task.name, "kind": "query", "index": i, "id": qid, "text": text}
            for i, (qid, text) in enumerate(task.queries.items())
        ]
        self.batch_size = batch_size

    def __len__(self) -> int:
        return batches_on_this_rank(len(self.rows), self.batch_size)

    def __iter__(self) -> Iterator[list[dict[str, Any]]]:
        return dealt_batches(self.rows, len(self.rows), self.batch_size)


class BEIRDataModule(L.LightningDataModule):
    """BEIR datasets by name, evaluated one after the other in a single test run.

    Args:
        data_root: a folder holding the datasets (``<data_root>/beir/scifact``), searched first; ``None``
            (default): ``$SEARCH_R3_DATA``, then the offline mirrors, the cache and a download
            (:mod:`search_r3.datamodules.sources` gives the order).
        datasets: dataset names (``beir/scifact``, ``hf:BeIR/scifact``, ``hf:mteb/scifact``) or local
            folders; each resolves to ``corpus.jsonl[.gz]``, ``queries.jsonl[.gz]`` and ``qrels/<split>.tsv``.
        split: which qrels file to evaluate.
        max_queries: evaluate only the first N judged queries (quick runs).
        max_corpus_docs: encode at most N documents, the judged ones always included (see module doc).
        batch_size: texts per batch (the encoder may split further).
        sort_window: documents read ahead and sorted by length before batching.
        on_bad_row: ``"error"`` or ``"skip"`` (counted, logged) for an empty query, a judgement naming
            an unknown query or document, or a duplicate judgement.
        num_workers: DataLoader workers for reading the corpus.
    """

    def __init__(
        self,
        data_root: str | None = None,
        datasets: list[str] | None = None,
        split: str = "test",
        max_queries: int | None = None,
        max_corpus_docs: int | None = None,
        batch_size: int = 32,
        sort_window: int = 1024,
        on_bad_row: OnBadRow = "error",
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.data_root = data_root
        self.dataset_paths = list(datasets) if datasets else ["beir/scifact"]
        self.split = split
        self.max_queries = max_queries
        self.max_corpus_docs = max_corpus_docs
        self.batch_size = batch_size
        self.sort_window = sort_window
        self.on_bad_row = on_bad_row
        self.num_workers = num_workers
        self.tasks: list[RetrievalTask] = []

    def setup(self, stage: str | None = None) -> None:
        if self.tasks:
            return
        self.tasks = [self.load_task(self.resolve(spec), DatasetName(spec).name) for spec in self.dataset_paths]
        for task in self.tasks:
            log.info("%s/%s: %s", task.name, task.split, task.describe())

    def resolve(self, spec: str) -> Path:
        """The local BEIR folder of a dataset name (fetched into the cache if it is nowhere local)."""
        return resolve_beir(spec, self.data_root, self.split)

    def load_task(self, folder: Path, name: str | None = None) -> RetrievalTask:
        report = ReadReport()
        qrels_path = find_file(folder / "qrels", f"{self.split}.tsv")
        qrels, qrel_lines = read_qrels(qrels_path, report, self.on_bad_row)
        queries_path = find_queries_file(folder, self.split)
        queries, empty = read_queries(queries_path, set(qrels), report, self.on_bad_row)
        for qid in list(qrels):
            if qid not in queries:
                first = min(line for (q, _), line in qrel_lines.items() if q == qid)
                if qid not in empty:
                    report.skip(f"judgement names a query missing from {queries_path.name}",
                                f"{qrels_path}:{first}", f"query {qid!r}", self.on_bad_row)
                del qrels[qid]
        kept_ids = list(qrels)[: self.max_queries] if self.max_queries else list(qrels)
        qrels = {qid: qrels[qid] for qid in kept_ids}
        queries = {qid: queries[qid] for qid in kept_ids}
        if not queries:
            raise DataFormatError(f"{qrels_path}: no evaluable query left (split {self.split!r})")

        corpus_path = find_file(folder, "corpus.jsonl")
        judged = {did for judgements in qrels.values() for did in judgements}
        budget = None if self.max_corpus_docs is None else max(self.max_corpus_docs - len(judged), 0)
        seen: dict[str, int] = {}  # insertion order = corpus order
        keep: set[str] = set()
        for lineno, doc_id, _ in iter_corpus(corpus_path, report, self.on_bad_row):
            if doc_id in seen:
                raise DataFormatError(f"{corpus_path}:{lineno}: duplicate document id {doc_id!r} (first at line {seen[doc_id]})")
            seen[doc_id] = lineno
            if budget is not None and (doc_id in judged or len(keep - judged) < budget):
                keep.add(doc_id)
        for qid, judgements in qrels.items():
            for did in list(judgements):
                if did not in seen:
                    report.skip(f"judgement names a document missing from {corpus_path.name}",
                                f"{qrels_path}:{qrel_lines[(qid, did)]}", f"document {did!r}", self.on_bad_row)
                    del judgements[did]
        keep_docs = keep if budget is not None and len(keep) < len(seen) else None
        doc_ids = [d for d in seen if keep_docs is None or d in keep_docs]
        return RetrievalTask(
            name=name or folder.name,
            split=self.split,
            corpus_path=corpus_path,
            queries=queries,
            qrels=qrels,
            keep_docs=keep_docs,
            doc_ids=doc_ids,
            corpus_size=len(seen),
            report=report,
            on_bad_row=self.on_bad_row,
        )

    def _loaders(self) -> list[DataLoader]:
        loaders = []
        for task in self.tasks:
            # Documents first: the module searches once a task's corpus and queries are both encoded.
            # batch_size=None: the datasets yield whole batches, dealt to ranks (see dealt_batches)
            loaders.append(DataLoader(CorpusStream(task, self.batch_size, self.sort_window), batch_size=None,
                                      num_workers=self.num_workers, collate_fn=collate_records))
            loaders.append(DataLoader(QueryBatches(task, self.batch_size), batch_size=None,
                                      collate_fn=collate_records))
        return loaders

    def test_dataloader(self) -> list[DataLoader]:
        return self._loaders()

    def val_dataloader(self) -> list[DataLoader]:
        return self._loaders()

    def predict_dataloader(self) -> list[DataLoader]:
        return self._loaders()


class BEIRSuiteDataModule(BEIRDataModule):
    """Every BEIR folder under ``search_dirs`` of the local roots (``data_root`` or ``$SEARCH_R3_DATA``,
    then the offline mirrors) that has a corpus and ``qrels/<split>.tsv``.

    The suite grows by itself: adding ``corpus.jsonl.gz`` to, say, ``beir_queries_qrels_only/fiqa``
    adds FiQA to the next run. Folders without a corpus are listed in the log, not silently dropped.
    """

    def __init__(self, data_root: str | None = None, search_dirs: list[str] | None = None,
                 exclude: list[str] | None = None, **kwargs: Any) -> None:
        super().__init__(data_root=data_root, **kwargs)
        self.search_dirs = list(search_dirs) if search_dirs else ["beir", "beir_queries_qrels_only"]
        self.exclude = set(exclude or [])

    def setup(self, stage: str | None = None) -> None:
        if not self.tasks:
            self.dataset_paths = self.discover()
            if not self.dataset_paths:
                roots = [str(root) for _, root in data_roots(self.data_root)] or ["(no local root)"]
                raise DataFormatError(f"no BEIR folder with a corpus under {roots} / {self.search_dirs}")
        super().setup(stage)

    def discover(self) -> list[str]:
        """Folders (absolute paths) of the suite in root, search-dir and name order; the first root holding a name wins."""
        found: dict[str, str] = {}
        for _, root in data_roots(self.data_root):
            for sub in self.search_dirs:
                for folder in sorted((root / sub).glob("*")):
                    if not folder.is_dir() or folder.name in self.exclude or folder.name in found:
                        continue
                    has_corpus = any((folder / n).is_file() for n in ("corpus.jsonl", "corpus.jsonl.gz"))
                    has_qrels = any((folder / "qrels" / n).is_file() for n in (f"{self.split}.tsv", f"{self.split}.tsv.gz"))
                    if has_corpus and has_qrels:
                        found[folder.name] = str(folder.resolve())
                    elif has_qrels:
                        log.info("suite: %s/%s has %s qrels but no corpus yet; skipped", sub, folder.name, self.split)
        return list(found.values())
