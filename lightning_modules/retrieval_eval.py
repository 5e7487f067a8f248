"""``RetrievalEvalModule``: ``search-r3 test`` for any list of retrievers on every task of the DataModule.

The test loop streams each task's documents, then its queries (see ``BEIRDataModule``). Dense
retrievers encode them here (document embeddings are cached on disk, keyed by the retriever's
fingerprint and the corpus content); lexical ones (BM25) index the corpus file themselves. At the end
of the epoch every (retriever, mode, task) is searched and scored with ir-measures and reported: in
MLflow one child run per row with uniform keys (``test/nDCG_at_10``; see ``evaluation/mlflow_runs.py``)
under the command's run, which keeps TREC run files, ``metrics.json``, a markdown table and a bar
chart as artifacts; other loggers get ``test/<task>/<retriever>[.<mode>]/<measure>`` keys; a table on
the console and, only when asked (``record_results``), rows in ``docs/results.json``.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import MLFlowLogger
from torch import nn

from search_r3.datamodules.beir import RetrievalTask
from search_r3.evaluation.dense_eval import (EmbeddingStore, collect_rows, owned_documents, score_run,
                                             score_task)
from search_r3.common.distributed import gather_objects, gather_to_rank_zero, shard_range
from search_r3.evaluation.metrics import DEFAULT_MEASURES
from search_r3.evaluation.mlflow_runs import log_dataset_inputs, log_row_runs, run_pointer, task_ref
from search_r3.evaluation.report import (
    ResultRow,
    print_table,
    reasoning_length_stats,
    write_bar_chart,
    write_markdown_tables,
)
from search_r3.evaluation.results_record import record_rows
from search_r3.common.atomic_files import atomic_save
from search_r3.lightning_modules.partial_files import PartialFile, record_from_dict, record_to_dict
from search_r3.datamodules.bm25 import corpus_digest
from search_r3.evaluation.retrievers import DenseRetriever, Retriever
from search_r3.evaluation.run_files import RunProvenance, meta_path, write_trec_run
from search_r3.model.analysis_measures import analysis_rates
from search_r3.model.reasoning import ReasoningRecord
from search_r3.common.progress import EvaluationProgress

log = logging.getLogger(__name__)


def device_label(device: torch.device) -> str:
    """``cpu`` or ``cuda:0 (NVIDIA H200)``: a recorded row's wall time means little without the card."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def metric_key(stage: str, task: str, system: str, measure: str) -> str:
    """``test/scifact/bm25/nDCG_at_10``: MLflow rejects '@' in metric names."""
    return f"{stage}/{task}/{system}/{measure.replace('@', '_at_')}"


class RetrievalEvalModule(L.LightningModule):
    """Evaluate ``retrievers`` side by side on the DataModule's tasks.

    Args:
        retrievers: the systems to compare (``EmbeddingLMRetriever``, ``SentenceTransformerRetriever``,
            ``BM25Retriever`` ...); each gives one row per query mode.
        top_k: depth of the ranking kept per query (100 covers R@100).
        measures: ir-measures names.
        record_results: upsert the rows in ``results_file`` (and re-render its markdown).
        results_file: where recorded rows go.
        output_dir: local copy of run files, tables and plots (also logged to MLflow as artifacts).
        embedding_cache_dir: cached document embeddings of dense retrievers; ``null`` disables it.
        partial_save_s: while a corpus or a query set is being encoded, save what is done at most this
            often (seconds) beside the cache, so an interrupted run resumes where it stopped (queries
            with what the model wrote for them); ``0`` saves after every batch, ``null`` never (see
            ``partial_files.py``). Needs ``embedding_cache_dir``.
    """

    def __init__(
        self,
        retrievers: list[Retriever],
        top_k: int = 100,
        measures: list[str] | None = None,
        record_results: bool = False,
        results_file: str = "docs/results.json",
        output_dir: str = "runs/eval",
        embedding_cache_dir: str | None = ".cache/search_r3/doc_embeddings",
        partial_save_s: float | None = 120.0,
    ) -> None:
        super().__init__()
        if not retrievers:
            raise ValueError("RetrievalEvalModule needs at least one retriever")
        names = [r.name for r in retrievers]
        if len(set(names)) != len(names):
            raise ValueError(f"retriever names must be unique, got {names}")
        self.retrievers = nn.ModuleList(retrievers)
        self.top_k = top_k
        self.measures = list(measures) if measures else list(DEFAULT_MEASURES)
        self.record_results = record_results
        self.results_file = results_file
        self.output_dir = output_dir
        self.embedding_cache_dir = Path(embedding_cache_dir) if embedding_cache_dir else None
        self.store = EmbeddingStore()
        self.rows: list[ResultRow] = []
        self._seconds: dict[tuple, float] = defaultdict(float)
        # per reasoning query (by index): what the model wrote before its embedding
        self._reasoning: dict[tuple, dict[int, ReasoningRecord]] = defaultdict(dict)
        self._samples: dict[tuple[str, str], list[dict[str, Any]]] = {}  # (dataset, row label) -> analyses
        self._cached: dict[tuple[int, str], torch.Tensor] = {}
        self.partial_save_s = partial_save_s
        # indices taken from a partial file: (i, task) documents, (i, task, mode) queries
        self._resumed: dict[tuple, set[int]] = {}
        self._partial: dict[tuple[int, str], PartialFile] = {}  # each corpus being encoded
        self._query_partial: dict[tuple[int, str], PartialFile] = {}  # each query set being encoded

    # ------------------------------------------------------------------ loop
    def on_test_epoch_start(self) -> None:
        self.store.clear()
        self.rows = []
        self._seconds.clear()
        self._reasoning.clear()
        self._samples = {}
        self._cached = {}
        self._resumed = {}
        self._partial = {}
        self._query_partial = {}
        for i, retriever in enumerate(self.retrievers):
            if isinstance(retriever, DenseRetriever):
                for task in self.trainer.datamodule.tasks:
                    path = self._cache_path(retriever, task)
                    if path is not None and path.is_file():
                        self._cached[(i, task.name)] = torch.load(path, weights_only=True)
                        log.info("%s: reusing cached %s document embeddings (%s)", retriever.name, task.name, path)
                    elif path is not None:
                        # Resolved once here: the cache key hashes the corpus, too slow for every batch.
                        self._partial[(i, task.name)] = PartialFile(
                            path.with_name(f"{path.stem}.partial-rank{self.global_rank}.pt"), self.partial_save_s)
                        self._load_partial(i, retriever, task)
                    if self.embedding_cache_dir is not None:
                        self._query_partial[(i, task.name)] = PartialFile(
                            self._query_partial_path(retriever, task), self.partial_save_s)
                        self._load_query_partial(i, retriever, task)

    def test_step(self, batch: dict[str, list[Any]], batch_idx: int, dataloader_idx: int = 0) -> dict[str, int]:
        """Encode the batch with every dense retriever; returns how many texts were encoded (for the ETA)."""
        task, kind, texts = batch["task"][0], batch["kind"][0], batch["text"]
        encoded = 0
        for i, retriever in enumerate(self.retrievers):
            if not isinstance(retriever, DenseRetriever):
                continue
            if kind == "document":
                if (i, task) in self._cached:
                    continue
                done = self._resumed.get((i, task), set())
                todo = [k for k, index in enumerate(batch["index"]) if index not in done]
                if not todo:
                    continue
                start = time.perf_counter()
                self.store.add((i, task, "document"), [batch["index"][k] for k in todo],
                               retriever.encode_documents([texts[k] for k in todo]))
                encoded += len(todo)
                self._seconds[(i, task)] += time.perf_counter() - start
                self._save_partial(i, task)
            else:
                for mode in retriever.modes:
                    done = self._resumed.get((i, task, mode), set())
                    todo = [k for k, index in enumerate(batch["index"]) if int(index) not in done]
                    if not todo:
                        continue
                    indices = [int(batch["index"][k]) for k in todo]
                    start = time.perf_counter()
                    embeddings, new = retriever.encode_queries_with_records([texts[k] for k in todo], mode)
                    self.store.add((i, task, "query", mode), indices, embeddings)
                    if new:
                        self._reasoning[(i, task, mode)].update(zip(indices, new))
                    self._seconds[(i, task, mode)] += time.perf_counter() - start
                    encoded += len(todo)
                self._save_query_partial(i, retriever, task)
        return {"encoded": encoded}

    def on_test_epoch_end(self) -> None:
        metrics: dict[str, float] = {}
        runs: dict[tuple, dict] = {}
        for task in self.trainer.datamodule.tasks:
            for i, retriever in enumerate(self.retrievers):
                docs = None
                if isinstance(retriever, DenseRetriever):
                    docs = self._documents(i, retriever, task)
                for mode in retriever.modes:
                    start = time.perf_counter()
                    if docs is not None:
                        queries = self._collect((i, task.name, "query", mode), len(task.queries), f"{task.name} queries")
                        metrics_, run = score_task(task, docs[1], queries, self.top_k, self.measures, self.device,
                                                   doc_indices=docs[0])
                    else:
                        run = retriever.search(task, self.top_k)
                        metrics_ = score_run(task, run, self.measures)
                    seconds = time.perf_counter() - start + self._seconds[(i, task.name)] + self._seconds[(i, task.name, mode)]
                    row = self._row(retriever, mode, task, metrics_, seconds, cached=(i, task.name) in self._cached)
                    if mode == "reasoning":
                        # every rank's queries (a query two ranks encoded, as a small set can give, counts once)
                        merged = {k: v for part in gather_objects(self._reasoning[(i, task.name, mode)])
                                  for k, v in part.items()}
                        order = sorted(merged)
                        records = [merged[k] for k in order]
                        query_ids = list(task.queries)
                        row.reasoning = reasoning_length_stats([r.tokens for r in records],
                                                               sum(r.appended for r in records))
                        row.reasoning.update(analysis_rates([r.measures for r in records if r.measures]))
                        self._samples[(task.name, row.label)] = [
                            {"query_id": query_ids[k], "query": r.query, "analysis": r.analysis,
                             "analysis_tokens": r.tokens,
                             "embed_token_appended": r.appended,
                             "copies_query": bool(r.measures and r.measures.copies_query),
                             "begins_with_closing": bool(r.measures and r.measures.begins_with_closing)}
                            for k, r in zip(order, records)]
                    self.rows.append(row)
                    runs[(row.label, task.name)] = run
                    metrics.update({metric_key("test", task.name, row.label, k): v for k, v in metrics_.items()})
                    metrics[metric_key("test", task.name, row.label, "wall_time_s")] = seconds
                    for key, value in (row.reasoning or {}).items():
                        metrics[metric_key("test", task.name, row.label, key)] = value
        if self.trainer.is_global_zero:
            # Straight to the loggers: self.log would print one duplicate column per dataloader. MLflow
            # gets a child run per row instead (in _report), whose keys line up across retrievers.
            for logger in self.trainer.loggers:
                if not isinstance(logger, MLFlowLogger):
                    logger.log_metrics(metrics, step=self.global_step)
            self._report(runs)
        for partial in self._query_partial.values():  # each rank removes its own, once the rows exist
            partial.remove()

    def _documents(self, i: int, retriever: DenseRetriever, task: RetrievalTask) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's part of the corpus embeddings ``(indices, rows)`` for the sharded search (the whole
        corpus on one process): from the cache (each rank keeps one block of it) or as this rank encoded it."""
        if (i, task.name) in self._cached:
            docs = self._cached[(i, task.name)]
            if docs.shape[0] != task.num_docs:
                raise RuntimeError(f"cached {task.name} embeddings have {docs.shape[0]} rows, expected {task.num_docs}")
            block = shard_range(task.num_docs)
            return torch.arange(block.start, block.stop), docs[block.start : block.stop]
        idx, emb = owned_documents(self.store, (i, task.name, "document"), task.num_docs, f"{task.name} documents")
        path = self._cache_path(retriever, task)
        if path is not None:
            # The cache file is the whole matrix: under DDP the parts meet on rank 0 only, to be written.
            parts = gather_to_rank_zero((idx, emb))
            if parts is not None:
                full = torch.empty((task.num_docs, emb.shape[1]), dtype=emb.dtype)
                for part_idx, part_emb in parts:
                    full[part_idx] = part_emb
                atomic_save(full, path)
        if (i, task.name) in self._partial:
            self._partial[(i, task.name)].remove()  # each rank removes its own
        return idx, emb

    # ------------------------------------------------------------------ resumable encoding
    # Partial files are per rank: under DDP each rank encodes its own shard and resumes only that.
    def _load_partial(self, i: int, retriever: DenseRetriever, task: RetrievalTask) -> None:
        partial = self._partial[(i, task.name)]
        saved = partial.load()
        if saved is None:
            return
        indices = saved["indices"].tolist()
        if indices and (min(indices) < 0 or max(indices) >= task.num_docs):
            log.warning("%s: ignoring %s, its document indices do not fit the %d-document corpus",
                        retriever.name, partial.path, task.num_docs)
            return
        self.store.add((i, task.name, "document"), indices, saved["embeddings"])
        self._resumed[(i, task.name)] = set(indices)
        self._seconds[(i, task.name)] += float(saved.get("seconds", 0.0))
        log.info("%s: resuming %s documents, %d of %d already encoded (%s)", retriever.name, task.name,
                 len(set(indices)), task.num_docs, partial.path)

    def _save_partial(self, i: int, task: str) -> None:
        def payload() -> dict[str, Any]:
            indices, embeddings = self.store.stacked((i, task, "document"))
            return {"indices": indices, "embeddings": embeddings, "seconds": self._seconds[(i, task)]}

        if (i, task) in self._partial:
            self._partial[(i, task)].maybe_save(payload)

    def _query_partial_path(self, retriever: Retriever, task: RetrievalTask) -> Path:
        """Keyed by the retriever and the exact query set (ids and texts, in order): a partial file of
        another query selection or another model is never read."""
        queries = hashlib.sha256(json.dumps(list(task.queries.items())).encode()).hexdigest()
        key = hashlib.sha256(f"{retriever.fingerprint()}|{queries}".encode()).hexdigest()[:20]
        assert self.embedding_cache_dir is not None
        return self.embedding_cache_dir / f"{task.name}-{retriever.name}-{key}.queries.partial-rank{self.global_rank}.pt"

    def _load_query_partial(self, i: int, retriever: DenseRetriever, task: RetrievalTask) -> None:
        partial = self._query_partial[(i, task.name)]
        saved = partial.load()
        if saved is None:
            return
        by_name = {str(m): m for m in retriever.modes}  # saved as str keys (a retriever's one mode may be None)
        for name, part in saved["modes"].items():
            if name not in by_name:
                continue
            mode = by_name[name]
            indices = part["indices"].tolist()
            self.store.add((i, task.name, "query", mode), indices, part["embeddings"])
            self._resumed[(i, task.name, mode)] = set(indices)
            self._reasoning[(i, task.name, mode)].update(
                {int(k): record_from_dict(r) for k, r in part["records"].items()})
            self._seconds[(i, task.name, mode)] += float(part["seconds"])
            log.info("%s: resuming %s queries (%s), %d of %d already encoded (%s)", retriever.name, task.name,
                     mode, len(set(indices)), len(task.queries), partial.path)

    def _save_query_partial(self, i: int, retriever: DenseRetriever, task: str) -> None:
        def payload() -> dict[str, Any]:
            modes: dict[str, Any] = {}
            for mode in retriever.modes:
                indices, embeddings = self.store.stacked((i, task, "query", mode))
                if not indices.numel():
                    continue
                records = {int(k): record_to_dict(r) for k, r in self._reasoning[(i, task, mode)].items()}
                modes[str(mode)] = {"indices": indices, "embeddings": embeddings, "records": records,
                                    "seconds": self._seconds[(i, task, mode)]}
            return {"modes": modes}

        if (i, task) in self._query_partial:
            self._query_partial[(i, task)].maybe_save(payload)

    def _cache_path(self, retriever: Retriever, task: RetrievalTask) -> Path | None:
        if self.embedding_cache_dir is None:
            return None
        key = hashlib.sha256(f"{retriever.fingerprint()}|{corpus_digest(task)}".encode()).hexdigest()[:20]
        return self.embedding_cache_dir / f"{task.name}-{retriever.name}-{key}.pt"

    def _collect(self, key: tuple, expected: int, what: str) -> torch.Tensor:
        return collect_rows(self.store, key, expected, what, self.trainer.world_size, self.all_gather, self.device)

    def configure_callbacks(self) -> list[L.Callback]:
        return [EvaluationProgress()]

    # ------------------------------------------------------------------ outputs
    def _row(self, retriever: Retriever, mode: str | None, task: RetrievalTask, metrics: dict[str, float],
             seconds: float, cached: bool) -> ResultRow:
        return ResultRow(
            retriever=retriever.name, mode=mode, checkpoint=retriever.checkpoint,
            checkpoint_digest=retriever.checkpoint_digest, dataset=task.name,
            split=task.split, metrics={k: round(v, 4) for k, v in metrics.items()},
            num_queries=len(task.queries), num_docs=task.num_docs, corpus_size=task.corpus_size,
            command="search-r3 " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            wall_time_s=round(seconds, 1), device=device_label(self.device), documents_from_cache=cached,
            trained_on=retriever.trained_on, precision=retriever.precision,
        )

    def _new_output_folder(self) -> Path:
        """``<output_dir>/<time>-<MLflow run id>``, created exclusively: two commands that finish in the same
        second never share (and overwrite) one folder, and a folder names the run that holds its artifacts."""
        run_id = next((lg.run_id for lg in self.trainer.loggers if isinstance(lg, MLFlowLogger)), None)
        name = time.strftime("%Y%m%d-%H%M%S") + (f"-{run_id[:8]}" if run_id else "")
        base = Path(self.output_dir)
        base.mkdir(parents=True, exist_ok=True)
        for attempt in itertools.count():
            out = base / (name if attempt == 0 else f"{name}-{attempt}")
            try:
                out.mkdir()
                return out
            except FileExistsError:
                continue
        raise AssertionError("unreachable")

    def _report(self, runs: dict[tuple, dict]) -> None:
        out = self._new_output_folder()
        tasks = {task.name: task for task in self.trainer.datamodule.tasks}
        digests = {name: corpus_digest(task) for name, task in tasks.items()}  # one pass over each corpus
        artifacts = []
        for (label, name), run in runs.items():
            task = tasks[name]
            provenance = RunProvenance(dataset=name, split=task.split, corpus_documents=task.num_docs,
                                       corpus_size=task.corpus_size, corpus_digest=digests[name],
                                       capped=task.capped, query_ids=tuple(task.queries))
            run_file = write_trec_run(run, out / f"run.{name}.{label}.trec", tag=label, provenance=provenance)
            artifacts += [run_file, meta_path(run_file)]
        for (name, label), samples in self._samples.items():  # per query, beside the run files (a breakdown reads them)
            path = out / f"analyses.{name}.{label}.jsonl"
            path.write_text("".join(json.dumps(s) + "\n" for s in samples))
            artifacts.append(path)
        records = [row.record() for row in self.rows]
        (out / "metrics.json").write_text(json.dumps(records, indent=2))
        artifacts += [out / "metrics.json", write_markdown_tables(self.rows, self.measures, out / "results.md"),
                      write_bar_chart(self.rows, self.measures[0], out / f"{self.measures[0].replace('@', '_at_')}.png")]
        for measure in self.measures:
            print_table(self.rows, measure)
        params: dict[str, Any] = {f"retriever/{r.name}": r.fingerprint() for r in self.retrievers}
        for task in self.trainer.datamodule.tasks:
            params.update({f"data/{task.name}/{k}": v for k, v in task.describe().items()})
        datasets = {name: task_ref(task, digests[name]) for name, task in tasks.items()}
        children: list[str] = []
        for logger in self.trainer.loggers:
            logger.log_hyperparams(params)
            if isinstance(logger, MLFlowLogger):
                client = logger.experiment
                for path in artifacts:
                    client.log_artifact(logger.run_id, str(path))
                log_dataset_inputs(client, logger.run_id, list(datasets.values()))
                children = log_row_runs(client, logger.run_id, self.rows, datasets, self._samples)
        if self.record_results:
            log.info("recorded %d rows in %s", len(records), record_rows(records, self.results_file))
        pointer = run_pointer(self.trainer.loggers, f" with {len(children)} child runs, one per row")
        print(f"outputs: {out}" + (f"; {pointer}" if pointer else ""))
