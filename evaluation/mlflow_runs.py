"""How a ``search-r3 test`` lands in MLflow so the UI can compare it.

The command's run (Lightning's ``MLFlowLogger``) is the *parent*: it keeps the config, the run files,
the markdown table and the bar chart. Each (dataset, retriever, mode) row becomes a *child* run with
the same metric keys everywhere (``test/nDCG_at_10``, ``test/R_at_100``, ``test/RR_at_10``) and the
row's identity as params (dataset, retriever, mode, checkpoint digest, protocol, dtype), so MLflow's
compare view and charts put any two retrievers, adapters or modes on one axis, and a search such as
``params.dataset = 'scifact'`` selects rows across commands. Datasets are logged as run inputs (name,
content digest, source folder), and a reasoning row carries its analyses as a table the UI shows.

Why not plain ``log_metrics`` on one run: a key that embeds the retriever's name
(``test/scifact/bm25/nDCG_at_10``) is a different metric for every system, so nothing lines up.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from search_r3.evaluation.report import ResultRow
from search_r3.datamodules.bm25 import corpus_digest
from search_r3.common.digests import file_digest

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# MLflow 3 opens an experiment without this tag on its GenAI overview ("No data"); this value asks for
# the model-training view (runs table, charts, compare). The 3.17 UI lets its GenAI / Model training
# switch (remembered by the browser, GenAI at first) override the tag, so links carry the switch too.
MODEL_TRAINING_KIND = "custom_model_development"
MODEL_TRAINING_QUERY = "workflowType=machine_learning"
PARENT_TAG = "mlflow.parentRunId"
ROW_PARAMS = ("dataset", "split", "retriever", "mode", "checkpoint", "checkpoint_digest", "protocol", "dtype",
              "num_queries", "num_docs", "corpus_size", "device", "documents_from_cache")


def runs_named(tracking_uri: str, experiment: str, run_name: str, newest_first: bool = False) -> tuple[Any, Any, list]:
    """(client, experiment, runs of that name in start order) from a store, or exit with what is missing."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"no experiment {experiment!r} in {tracking_uri}")
    runs = client.search_runs([found.experiment_id], filter_string=f"attributes.run_name = '{run_name}'",
                              order_by=[f"attributes.start_time {'DESC' if newest_first else 'ASC'}"])
    if not runs:
        raise SystemExit(f"no run named {run_name!r} in experiment {experiment!r}")
    return client, found, runs


def ui_path(experiment_id: str, run_id: str | None = None) -> str:
    """The UI page of an experiment (or run) in the model-training view, to append to the UI's address."""
    page = f"#/experiments/{experiment_id}" + (f"/runs/{run_id}" if run_id else "")
    return f"{page}?{MODEL_TRAINING_QUERY}"


def run_pointer(loggers: Sequence[Any], detail: str = "") -> str:
    """``MLflow run <id><detail> (browse: ...)`` for the first MLflow logger, "" without one: the last
    line of every command says where its numbers went."""
    for logger in loggers:
        if type(logger).__name__ == "MLFlowLogger":
            return (f"MLflow run {logger.run_id}{detail} (browse: mlflow ui --backend-store-uri "
                    f"{logger.experiment.tracking_uri}, then {ui_path(logger.experiment_id, logger.run_id)})")
    return ""


def metric_name(measure: str, stage: str = "test") -> str:
    """``test/nDCG_at_10``: the same key for every row (MLflow rejects '@' in metric names)."""
    return f"{stage}/{measure.replace('@', '_at_')}"


def row_run_name(row: ResultRow) -> str:
    return f"{row.dataset}/{row.label}"


def row_params(row: ResultRow) -> dict[str, str]:
    """The row's identity as string params (MLflow params are strings; ``-`` stands for none)."""
    values: dict[str, Any] = {"dataset": row.dataset, "split": row.split, "retriever": row.retriever,
                              "mode": row.mode, "checkpoint": row.checkpoint,
                              "checkpoint_digest": row.checkpoint_digest, "protocol": row.protocol,
                              "dtype": row.precision, "num_queries": row.num_queries, "num_docs": row.num_docs,
                              "corpus_size": row.corpus_size, "device": row.device,
                              "documents_from_cache": row.documents_from_cache}
    return {k: "-" if values[k] is None else str(values[k]) for k in ROW_PARAMS}


def row_metrics(row: ResultRow) -> dict[str, float]:
    out = {metric_name(m): float(v) for m, v in row.metrics.items()}
    out[metric_name("wall_time_s")] = float(row.wall_time_s)
    out.update({metric_name(k): float(v) for k, v in (row.reasoning or {}).items()})
    return out


@dataclass(frozen=True)
class DatasetRef:
    """A dataset split as MLflow shows it among a run's inputs."""

    name: str  # ``scifact/test``
    digest: str  # content digest of the corpus (and document selection)
    source: str  # the folder it was read from
    profile: dict[str, Any]  # sizes: queries, documents, judgements

    def to_input(self, context: str) -> Any:
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=self.name, digest=self.digest, source_type="local", source=self.source,
                          profile=json.dumps(self.profile, default=str))
        return DatasetInput(dataset=dataset, tags=[InputTag(key="mlflow.data.context", value=context)])


def task_ref(task: Any, digest: str) -> DatasetRef:
    """A :class:`~search_r3.datamodules.beir.RetrievalTask` (``digest``: its ``corpus_digest``)."""
    return DatasetRef(name=f"{task.name}/{task.split}", digest=digest, source=str(task.corpus_path.parent),
                      profile=task.describe())


def file_ref(name: str, path: Path) -> DatasetRef:
    return DatasetRef(name=name, digest=file_digest(path), source=str(path), profile={"bytes": path.stat().st_size})


def log_fit_inputs(client: Any, run_id: str, datamodule: Any) -> None:
    """A training run's inputs: its training files (context ``train``) and held-out tasks (``validation``)."""
    inputs = [file_ref(name, path).to_input("train") for name, path in getattr(datamodule, "training_sources", list)()]
    validation = getattr(datamodule, "validation", None)
    inputs += [task_ref(task, corpus_digest(task)).to_input("validation") for task in getattr(validation, "tasks", [])]
    if inputs:
        client.log_inputs(run_id, datasets=inputs)


def mark_model_training(client: Any, experiment_id: str) -> None:
    """Open the experiment in MLflow's model-training view, unless someone chose another kind."""
    tags = client.get_experiment(experiment_id).tags
    if EXPERIMENT_KIND_TAG not in tags:
        client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING_KIND)


def log_dataset_inputs(client: Any, run_id: str, datasets: Sequence[DatasetRef], context: str = "test") -> None:
    if datasets:
        client.log_inputs(run_id, datasets=[d.to_input(context) for d in datasets])


def log_row_runs(client: Any, parent_run_id: str, rows: Sequence[ResultRow], datasets: dict[str, DatasetRef],
                 reasoning_samples: dict[tuple[str, str], list[dict[str, Any]]] | None = None) -> list[str]:
    """One finished child run per row under ``parent_run_id``; returns their ids in row order.

    ``reasoning_samples`` maps (dataset, row label) to the row's analyses (dicts of equal keys), logged
    as ``reasoning_samples.json``, a table in the run's artifacts and in the UI's evaluation view.
    """
    from mlflow.entities import Metric, Param, RunTag
    from mlflow.utils.time import get_current_time_millis

    parent = client.get_run(parent_run_id)
    experiment_id = parent.info.experiment_id
    ids = []
    for row in rows:
        run = client.create_run(experiment_id, run_name=row_run_name(row), tags={PARENT_TAG: parent_run_id})
        run_id = run.info.run_id
        now = get_current_time_millis()
        client.log_batch(
            run_id,
            metrics=[Metric(k, v, now, 0) for k, v in row_metrics(row).items()],
            params=[Param(k, v) for k, v in row_params(row).items()],
            tags=[RunTag("command", row.command[:5000])],
        )
        if row.dataset in datasets:
            log_dataset_inputs(client, run_id, [datasets[row.dataset]])
        samples = (reasoning_samples or {}).get((row.dataset, row.label))
        if samples:
            table = {key: [s[key] for s in samples] for key in samples[0]}
            client.log_table(run_id, data=table, artifact_file="reasoning_samples.json")
        client.set_terminated(run_id)
        ids.append(run_id)
    return ids


def rows_from_child_runs(runs: Sequence[Any], measure: str) -> list[ResultRow]:
    """Rebuild result rows (one measure) from child runs that :func:`log_row_runs` wrote."""
    key = metric_name(measure)
    rows = []
    for run in runs:
        params, metrics = run.data.params, run.data.metrics
        if key not in metrics or "dataset" not in params:
            continue

        def param(name: str) -> str | None:
            value = params.get(name, "-")
            return None if value == "-" else value

        rows.append(ResultRow(
            retriever=params["retriever"], mode=param("mode"), checkpoint=param("checkpoint"),
            dataset=params["dataset"], split=params.get("split", "test"), metrics={measure: metrics[key]},
            num_queries=int(params.get("num_queries", 0)), num_docs=int(params.get("num_docs", 0)),
            corpus_size=int(params.get("corpus_size", 0)), command=run.data.tags.get("command", ""),
            wall_time_s=metrics.get(metric_name("wall_time_s"), 0.0), checkpoint_digest=param("checkpoint_digest"),
            precision=param("dtype"),
        ))
    return rows
