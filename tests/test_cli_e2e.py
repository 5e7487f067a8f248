"""`search-r3 test --config cli.yaml` end to end (capped SciFact), checked through the MLflow client."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.model]
REPO = Path(__file__).resolve().parents[1]


def test_cli_test_prints_the_numbers_logged_to_mlflow(tmp_path: Path, data_root: Path) -> None:
    from mlflow import MlflowClient

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    results = tmp_path / "results.json"
    cmd = [
        str(Path(os.sys.executable).parent / "search-r3"), "test", "--config", "cli.yaml",
        "--data.init_args.data_root", str(data_root),
        "--data.init_args.max_queries", "12", "--data.init_args.max_corpus_docs", "60",
        "--trainer.logger.init_args.tracking_uri", db,
        "--trainer.logger.init_args.artifact_location", str(tmp_path / "artifacts"),
        "--trainer.logger.init_args.run_name", "e2e",
        "--trainer.enable_progress_bar", "false",
        "--model.init_args.output_dir", str(tmp_path / "runs"),
        "--model.init_args.record_results", "true",
        "--model.init_args.results_file", str(results),
        "--model.init_args.embedding_cache_dir", str(tmp_path / "emb"),
    ]
    # An empty network namespace proves the whole command needs no network (root only).
    if shutil.which("unshare") and os.geteuid() == 0:
        cmd = ["unshare", "-n", *cmd]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    client = MlflowClient(tracking_uri=db)
    experiment = client.get_experiment_by_name("search-r3")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on the runs, not GenAI
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2  # the command's run and one child per (dataset, retriever, mode)
    run, = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    child, = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == run.info.run_id]
    assert child.info.run_name == "scifact/smollm2-untrained.direct"
    ndcg = child.data.metrics["test/nDCG_at_10"]  # the same key for every retriever: comparable in the UI
    assert 0.0 < ndcg <= 1.0 and {"test/R_at_100", "test/RR_at_10", "test/wall_time_s"} <= set(child.data.metrics)
    assert not any(k.startswith("test/") for k in run.data.metrics)  # the rows live in the children
    assert f"{ndcg:.4f}" in proc.stdout  # the printed table shows the logged number
    assert f"MLflow run {run.info.run_id} with 1 child runs" in proc.stdout
    assert f"#/experiments/{experiment.experiment_id}/runs/{run.info.run_id}?workflowType=machine_learning" in proc.stdout
    assert {k: child.data.params[k] for k in ("dataset", "retriever", "mode", "split")} == {
        "dataset": "scifact", "retriever": "smollm2-untrained", "mode": "direct", "split": "test"}
    assert child.data.params["dtype"] in {"bf16", "fp32"}
    for logged in (run, child):  # the dataset is an input of both, with its corpus digest
        inputs = logged.inputs.dataset_inputs
        assert [(d.dataset.name, d.dataset.source_type) for d in inputs] == [("scifact/test", "local")]
        assert len(inputs[0].dataset.digest) == 16 and json.loads(inputs[0].dataset.profile)["num_docs"] == 60
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config_test.yaml", "metrics.json", "results.md", "nDCG_at_10.png",
            "run.scifact.smollm2-untrained.direct.trec"} <= artifacts
    assert run.data.params["data/scifact/num_docs"] == "60"

    rows = json.loads(results.read_text())
    assert len(rows) == 1 and rows[0]["retriever"] == "smollm2-untrained" and rows[0]["mode"] == "direct"
    assert rows[0]["nDCG@10"] == round(ndcg, 4) and rows[0]["R@100"] == round(child.data.metrics["test/R_at_100"], 4)
    assert rows[0]["command"].startswith("search-r3 test --config cli.yaml")
    assert rows[0]["precision"] in {"bf16", "fp32"}  # dtype auto resolved, and recorded with the numbers
    assert results.with_suffix(".md").is_file()


def test_two_commands_at_once_keep_their_own_outputs(tmp_path: Path, data_root: Path, tiny_lm_dir: Path) -> None:
    """Two `search-r3 test` started together write to one output_dir: each run's folder, named by its
    MLflow run, holds its own metrics, and the artifacts MLflow keeps for a run are that run's."""
    import yaml
    from mlflow import MlflowClient

    procs = []
    for name, queries in (("a", 6), ("b", 10)):
        config = {
            "trainer": {"accelerator": "cpu", "devices": 1, "enable_progress_bar": False, "logger": {
                "class_path": "lightning.pytorch.loggers.MLFlowLogger", "init_args": {
                    "experiment_name": "two", "tracking_uri": f"sqlite:///{tmp_path / name}.db",
                    "artifact_location": str(tmp_path / f"artifacts-{name}")}}},
            "model": {"class_path": "search_r3.lightning_modules.RetrievalEvalModule", "init_args": {
                "retrievers": [{"class_path": "search_r3.evaluation.retrievers.EmbeddingLMRetriever", "init_args": {
                    "name": f"tiny-{name}", "modes": ["direct"], "encoder": {"class_path": "search_r3.model.EmbeddingLM",
                    "init_args": {"base_model": str(tiny_lm_dir), "dtype": "float32", "max_document_tokens": 32}}}}],
                "output_dir": str(tmp_path / "runs"), "embedding_cache_dir": str(tmp_path / f"emb-{name}")}},
            "data": {"class_path": "search_r3.datamodules.BEIRDataModule", "init_args": {
                "data_root": str(data_root), "datasets": ["beir/scifact"], "max_queries": queries, "max_corpus_docs": 60}},
        }
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(config))
        cmd = [str(Path(os.sys.executable).parent / "search-r3"), "test", "--config", str(tmp_path / f"{name}.yaml")]
        procs.append((name, subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    for _, proc in procs:
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-3000:]
    folders = sorted((tmp_path / "runs").iterdir())
    assert len(folders) == 2
    for name, queries in (("a", 6), ("b", 10)):
        client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / name}.db")
        (run,) = [r for r in client.search_runs([client.get_experiment_by_name("two").experiment_id])
                  if "mlflow.parentRunId" not in r.data.tags]
        (folder,) = [f for f in folders if f.name.endswith(run.info.run_id[:8])]
        (local,) = json.loads((folder / "metrics.json").read_text())
        logged = json.loads(Path(client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path / name)))
                            .read_text())
        assert logged == [local] and local["retriever"] == f"tiny-{name}" and local["num_queries"] == queries


def test_output_folders_made_in_the_same_second_are_distinct(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from search_r3.lightning_modules.retrieval_eval import RetrievalEvalModule

    module = SimpleNamespace(trainer=SimpleNamespace(loggers=[]), output_dir=str(tmp_path / "runs"))
    first, second = (RetrievalEvalModule._new_output_folder(module) for _ in range(2))
    assert first != second and first.is_dir() and second.is_dir()
