"""``RetrievalEvalModule``: ``search-r3 test`` for a dense encoder on every task of the DataModule.

The test loop streams each task's documents, then its queries (see ``BEIRDataModule``); this module
encodes them, and at the end of the epoch searches, scores with ir-measures, logs
``test/<task>/<measure>`` to every logger, writes TREC run files and a markdown table as artifacts,
prints a short table and, only when asked (``record_results``), records the rows in
``docs/results.json``.
"""

from __future__ import annotations

import json
import logging
import shlex
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import MLFlowLogger
from rich.console import Console
from rich.table import Table

from evaluation.dense_eval import EmbeddingStore, TaskResult, gather_rows, ordered, score_task
from evaluation.metrics import DEFAULT_MEASURES
from evaluation.results_record import record_rows
from evaluation.run_files import write_trec_run
from lightning_modules.embedding_lm import EmbeddingLM, Mode

log = logging.getLogger(__name__)


def metric_key(stage: str, task: str, measure: str) -> str:
    """``test/scifact/nDCG_at_10``: MLflow rejects '@' in metric names."""
    return f"{stage}/{task}/{measure.replace('@', '_at_')}"


class RetrievalEvalModule(L.LightningModule):
    """Evaluate ``encoder`` (queries in ``mode``, documents always direct) on the DataModule's tasks.

    Args:
        encoder: the :class:`EmbeddingLM` to evaluate.
        mode: ``direct`` (one forward pass per query) or ``reasoning`` (generate, then embed).
        retriever_name: the row label in results tables (``smollm2-untrained``, ``smollm2-sft`` ...).
        top_k: depth of the ranking kept per query (100 covers R@100).
        measures: ir-measures names.
        record_results: append the rows to ``results_file`` (and re-render its markdown).
        results_file: where recorded rows go.
        output_dir: local copy of run files and tables (also logged to MLflow as artifacts).
    """

    def __init__(
        self,
        encoder: EmbeddingLM,
        mode: Mode = "direct",
        retriever_name: str = "smollm2-untrained",
        top_k: int = 100,
        measures: list[str] | None = None,
        record_results: bool = False,
        results_file: str = "docs/results.json",
        output_dir: str = "runs/eval",
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.mode = mode
        self.retriever_name = retriever_name
        self.top_k = top_k
        self.measures = list(measures) if measures else list(DEFAULT_MEASURES)
        self.record_results = record_results
        self.results_file = results_file
        self.output_dir = output_dir
        self.store = EmbeddingStore()
        self.results: list[TaskResult] = []
        self._seconds: dict[str, float] = defaultdict(float)
        self._mark = 0.0

    # ------------------------------------------------------------------ loop
    def on_test_epoch_start(self) -> None:
        self.store.clear()
        self.results = []
        self._seconds.clear()
        self.encoder.missing_embed_token_count = 0
        self._mark = time.perf_counter()

    def test_step(self, batch: dict[str, list[Any]], batch_idx: int, dataloader_idx: int = 0) -> None:
        task, kind, texts = batch["task"][0], batch["kind"][0], batch["text"]
        if kind == "document":
            emb = self.encoder.encode_documents(texts)
        else:
            emb = self.encoder.encode_queries(texts, mode=self.mode)
        self.store.add(task, kind, batch["index"], emb)
        now = time.perf_counter()
        self._seconds[task] += now - self._mark  # includes reading this batch from disk
        self._mark = now

    def on_test_epoch_end(self) -> None:
        tasks = self.trainer.datamodule.tasks
        metrics: dict[str, float] = {}
        for task in tasks:
            start = time.perf_counter()
            docs = self._collect(task.name, "document", task.num_docs)
            queries = self._collect(task.name, "query", len(task.queries))
            result = score_task(task, docs, queries, self.top_k, self.measures)
            self._seconds[task.name] += time.perf_counter() - start
            self.results.append(result)
            metrics.update({metric_key("test", task.name, k): v for k, v in result.metrics.items()})
            metrics[metric_key("test", task.name, "wall_time_s")] = self._seconds[task.name]
        if self.mode == "reasoning":
            total = sum(len(t.queries) for t in tasks)
            metrics["test/missing_embed_token_rate"] = self.encoder.missing_embed_token_count / max(total, 1)
        if self.trainer.is_global_zero:
            # Straight to the loggers: self.log would print one duplicate column per dataloader.
            for logger in self.trainer.loggers:
                logger.log_metrics(metrics, step=self.global_step)
            self._report(tasks)

    def _collect(self, task: str, kind: str, expected: int):
        idx, emb = self.store.stacked(task, kind)
        if self.trainer.world_size > 1:
            idx, emb = gather_rows(idx.to(self.device), emb.to(self.device), self.all_gather)
        return ordered(idx, emb, expected, f"{task} {kind}s")

    # ------------------------------------------------------------------ outputs
    def _report(self, tasks) -> None:
        out = Path(self.output_dir) / time.strftime("%Y%m%d-%H%M%S")
        artifacts = []
        for result in self.results:
            artifacts.append(write_trec_run(result.run, out / f"run.{result.task}.{result.split}.trec",
                                            tag=f"{self.retriever_name}-{self.mode}"))
        rows = [self._row(r, tasks) for r in self.results]
        (out / "metrics.json").write_text(json.dumps(rows, indent=2))
        artifacts.append(out / "metrics.json")
        self._print_table(rows)
        for logger in self.trainer.loggers:
            logger.log_hyperparams(self._data_params(tasks))
            if isinstance(logger, MLFlowLogger):
                for path in artifacts:
                    logger.experiment.log_artifact(logger.run_id, str(path))
        if self.record_results:
            path = record_rows(rows, self.results_file)
            log.info("recorded %d rows in %s", len(rows), path)

    def _row(self, result: TaskResult, tasks) -> dict[str, Any]:
        row: dict[str, Any] = {
            "retriever": self.retriever_name,
            "mode": self.mode,
            "checkpoint": self.encoder.adapter_path,
            "dataset": result.task,
            "split": result.split,
        }
        row.update({name: round(value, 4) for name, value in result.metrics.items()})
        row.update({
            "num_queries": result.num_queries,
            "num_docs": result.num_docs,
            "corpus_size": result.corpus_size,
            "command": "search-r3 " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "wall_time_s": round(self._seconds[result.task], 1),
            "device": str(self.device),
            "date": time.strftime("%Y-%m-%d"),
        })
        return row

    def _data_params(self, tasks) -> dict[str, Any]:
        params: dict[str, Any] = {"retriever": self.retriever_name, "mode": self.mode,
                                  "encoder_fingerprint": self.encoder.fingerprint()}
        for task in tasks:
            params.update({f"data/{task.name}/{k}": v for k, v in task.describe().items()})
        return params

    def _print_table(self, rows: list[dict[str, Any]]) -> None:
        table = Table(title=f"{self.retriever_name} ({self.mode})")
        for col in ["dataset", "split", *self.measures, "queries", "docs", "wall time (s)"]:
            table.add_column(col)
        for r in rows:
            docs = f"{r['num_docs']}" + ("" if r["num_docs"] == r["corpus_size"] else f" of {r['corpus_size']}")
            table.add_row(r["dataset"], r["split"], *[f"{r[m]:.4f}" for m in self.measures],
                          str(r["num_queries"]), docs, f"{r['wall_time_s']:.0f}")
        if len(rows) > 1:
            means = [sum(r[m] for r in rows) / len(rows) for m in self.measures]
            table.add_row("mean", "", *[f"{v:.4f}" for v in means], "", "", "")
        Console().print(table)
